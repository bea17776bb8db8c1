// Loads a Hugging Face checkpoint folder into a runnable MoeModel: config -> ModelSpec, the
// safetensors files mapped (no copy through JS), validated against the spec, then packed.
import path from 'node:path';

import { loadNative, type CudaAddon } from '../native/index.js';
import { parseModelConfig, validateCheckpoint, type CheckpointReport } from './config.js';
import type { DeviceExpertComm } from '../moe/device-ep.js';
import { CudaModel } from './cuda-model.js';
import type { ForwardModel } from './forward-batch.js';
import { MoeModel, type ModelOptions } from './model.js';
import { openCheckpoint, type Checkpoint, type Fp8Weight } from './safetensors.js';
import type { QuantizeSpec } from './quantize.js';
import { fp8ScaleSuffix, type ModelSpec } from './spec.js';
import type { HostTensor, IntWeight, TensorSource } from './tensor-source.js';
import { dequantInt } from './compressed-tensors.js';

export interface LoadedModel<M extends ForwardModel = MoeModel> {
  spec: ModelSpec;
  model: M;
  checkpoint: Checkpoint;
  report: CheckpointReport;
  loadMs: number;
}

export interface LoadProgress {
  tensorsDone: number;
  tensorsTotal: number;
  bytesDone: number;
  bytesTotal: number;
}

/** A TensorSource over a checkpoint that also counts what was read (for progress). */
export class CheckpointSource implements TensorSource {
  tensorsDone = 0;
  bytesDone = 0;

  constructor(readonly checkpoint: Checkpoint, private readonly onProgress?: (p: LoadProgress) => void,
              private readonly totals = { tensors: checkpoint.tensors.size, bytes: sumBytes(checkpoint) }) {}

  has(name: string): boolean {
    return this.checkpoint.has(name) || this.checkpoint.isCompressed(name);
  }

  getInt(name: string): IntWeight | null {
    const w = this.checkpoint.loadInt(name);
    if (w) this.progress(w.codes.length * w.bits / 8 + w.scales.byteLength);
    return w;
  }

  get(name: string): HostTensor {
    const iw = this.getInt(name);
    if (iw) return { dtype: 'f32', shape: [iw.rows, iw.cols], data: dequantInt(iw) };
    const info = this.checkpoint.getTensor(name);
    const w = this.checkpoint.loadWeightBf16OrNative(name);
    this.progress(info.sizeBytes);
    return { dtype: w.dtype, shape: info.shape, data: w.data };
  }

  getFp8(name: string): Fp8Weight | null {
    const w = this.checkpoint.loadFp8(name);
    if (w) this.progress(this.checkpoint.getTensor(name).sizeBytes);
    return w;
  }

  getU8(name: string): { shape: number[]; data: Uint8Array } {
    const info = this.checkpoint.getTensor(name);
    if (info.dtype !== 'U8') throw new Error(`tensor ${name} has dtype ${info.dtype}, expected U8`);
    this.progress(info.sizeBytes);
    return { shape: info.shape, data: info.data() as Uint8Array };
  }

  private progress(bytes: number): void {
    this.tensorsDone++;
    this.bytesDone += bytes;
    this.onProgress?.({ tensorsDone: this.tensorsDone, tensorsTotal: this.totals.tensors,
      bytesDone: this.bytesDone, bytesTotal: this.totals.bytes });
  }
}

function sumBytes(c: Checkpoint): number {
  let b = 0;
  for (const t of c.tensors.values()) b += t.sizeBytes;
  return b;
}

function openValidated(dir: string) {
  const spec = parseModelConfig(path.resolve(dir));
  const options = (q: ModelSpec['quantization']) => q?.method === 'fp8'
    ? { fp8BlockSize: q.blockSize, fp8ScaleSuffix: fp8ScaleSuffix(q) }
    : q?.method === 'compressed-tensors' ? { compressed: q.schemes } : q?.method === 'gptq' ? { gptq: q } : {};
  let checkpoint = openCheckpoint(dir, options(spec.quantization));
  const q = spec.quantization;
  if (q?.method === 'fp8' && q.scaleSuffix === undefined && fp8ScalesNamedScale(checkpoint)) {
    // quant_method "fp8" as AutoFP8 / vLLM write it: one `X.weight_scale` per tensor (no
    // weight_scale_inv), spread over the block grid like any per-tensor scale.
    spec.quantization = { ...q, scaleSuffix: '_scale' };
    checkpoint = openCheckpoint(dir, options(spec.quantization));
  }
  const report = validateCheckpoint(spec, checkpoint);
  return { spec, checkpoint, report };
}

/** True when the checkpoint's FP8 weights carry `X.weight_scale` and none `X.weight_scale_inv`. */
function fp8ScalesNamedScale(c: Checkpoint): boolean {
  let scale = false;
  for (const [name, t] of c.tensors) {
    if (name.endsWith('.weight_scale_inv')) return false;
    if (t.dtype === 'F8_E4M3' && c.tensors.has(`${name}_scale`)) scale = true;
  }
  return scale;
}

/** Loads a checkpoint onto the CPU engine. */
export function loadModel(dir: string, opts: ModelOptions & { onProgress?: (p: LoadProgress) => void }):
    LoadedModel {
  const t0 = performance.now();
  const { spec, checkpoint, report } = openValidated(dir);
  const model = new MoeModel(spec, new CheckpointSource(checkpoint, opts.onProgress), opts);
  // The pages read while packing would otherwise stay in the process's RSS as long as the mapping
  // lives (a bf16 checkpoint's whole size beside a quantized model).
  checkpoint.releasePages();
  return { spec, model, checkpoint, report, loadMs: performance.now() - t0 };
}

/**
 * Loads a checkpoint onto a CUDA device (weights uploaded as they are read; the host copy is the
 * mapped file). `cuda` replaces the addon's op surface (tests run the device model on a stand-in).
 */
export function loadCudaModel(dir: string, opts: { device: number; cuda?: CudaAddon; loadExperts?: boolean;
    ep?: DeviceExpertComm; quantize?: QuantizeSpec | null; onProgress?: (p: LoadProgress) => void }): LoadedModel<CudaModel> {
  const t0 = performance.now();
  const { spec, checkpoint, report } = openValidated(dir);
  const model = new CudaModel(spec, new CheckpointSource(checkpoint, opts.onProgress), {
    device: opts.device, ...(opts.cuda ? { cuda: opts.cuda } : {}),
    ...(opts.loadExperts !== undefined ? { loadExperts: opts.loadExperts } : {}),
    ...(opts.ep ? { ep: opts.ep } : {}),
    ...(opts.quantize ? { quantize: opts.quantize } : {}),
  });
  return { spec, model, checkpoint, report, loadMs: performance.now() - t0 };
}

/** Counts parameters (total and active per token; matrices, not norms or per-head vectors) for the load summary. */
export function countParams(spec: ModelSpec): { total: number; active: number } {
  const H = spec.hidden;
  const a = spec.attention;
  let attn: number;
  if (a.kind === 'mla') {
    const qk = a.qkNopeHeadDim + a.qkRopeHeadDim;
    const q = a.qLoraRank ? H * a.qLoraRank + a.qLoraRank * a.heads * qk : H * a.heads * qk;
    attn = q + H * (a.kvLoraRank + a.qkRopeHeadDim) + a.kvLoraRank * a.heads * (a.qkNopeHeadDim + a.vHeadDim) +
      a.heads * a.vHeadDim * H;
  } else {
    // q (with Qwen3-Next's output gate: twice the rows), o, k, v
    attn = H * a.heads * a.headDim * (a.outputGate ? 3 : 2) + H * a.kvHeads * a.headDim * 2;
  }
  // Gated DeltaNet: in_proj [2 Kd + 2 Vd + 2 Hv, H], out_proj [H, Vd], the depthwise conv [C, K]
  const la = spec.linearAttention;
  const linear = la ? (2 * la.keyHeads * la.keyHeadDim + 2 * la.valueHeads * la.valueHeadDim + 2 * la.valueHeads) * H +
    H * la.valueHeads * la.valueHeadDim + (2 * la.keyHeads * la.keyHeadDim + la.valueHeads * la.valueHeadDim) * la.convKernel : 0;
  const m = spec.moe;
  const expert = 3 * H * m.intermediate;
  const shared = 3 * H * m.sharedIntermediate + (m.sharedGate ? H : 0);
  let total = 2 * spec.vocabSize * H;
  let active = total;
  for (const l of spec.layers) {
    const mixer = l.mixer === 'linear_attention' ? linear : attn;
    total += mixer;
    active += mixer;
    if (l.ffn === 'moe') {
      total += m.numExperts * expert + shared + m.numExperts * H;
      active += m.router.topK * expert + shared + m.numExperts * H;
    } else {
      total += 3 * H * spec.denseIntermediate;
      active += 3 * H * spec.denseIntermediate;
    }
  }
  return { total, active };
}

/** ", cuBLASLt <file>" or ", cuBLASLt none (DenseGemm: in-house kernel)" on a full build; "" elsewhere. */
function cublasLtNote(): string {
  const n = loadNative() as Partial<CudaAddon>;
  if (typeof n.cudaLibraries !== 'function') return '';
  const lt = n.cudaLibraries().cublasLt.path;
  return lt ? `, cuBLASLt ${lt}` : ', cuBLASLt none (DenseGemm: in-house kernel)';
}

/** How the checkpoint is quantized, for the load line ('' for plain weights). */
export function describeCheckpointQuant(spec: ModelSpec): string {
  const q = spec.quantization;
  if (!q) return '';
  if (q.method === 'fp8')
    return ` FP8 e4m3 (${q.blockSize.join('x')} blocks, weight${fp8ScaleSuffix(q)})`;
  if (q.method === 'mxfp4') return ' MXFP4 experts';
  if (q.method === 'gptq')
    return ` ${q.packing === 'awq' ? 'AWQ' : 'GPTQ'} int${q.bits} ${q.groupSize === -1 ? 'per channel' : `g${q.groupSize}`}` +
      (q.packing === 'awq' ? ' (GEMM packing)' : ` (${q.checkpointFormat}${q.descAct ? ', desc_act' : ''})`);
  const bits = q.schemes.bits.map((b) => `int${b}`).join('/');
  return ` compressed-tensors ${q.format} ${bits}${q.schemes.groupSizes.length ? ` ${q.schemes.groupSizes.map((g) => (g === -1 ? 'per channel' : `g${g}`)).join('/')}` : ''}` +
    (q.actOrderGroups ? ' (actorder group)' : '');
}

export function loadSummary(loaded: LoadedModel<ForwardModel>): string {
  const { spec } = loaded;
  const p = countParams(spec);
  const caps = loadNative().capabilities();
  const moeLayers = spec.layers.filter((l) => l.ffn === 'moe').length;
  const gb = (x: number) => (x / 2 ** 30).toFixed(2);
  let bytes = 0;
  for (const t of loaded.checkpoint.tensors.values()) bytes += t.sizeBytes;
  return `loaded ${spec.modelType}: ${(p.total / 1e6).toFixed(1)}M params (${(p.active / 1e6).toFixed(1)}M active), ` +
    `${spec.numLayers} layers (${moeLayers} MoE), ${spec.moe.numExperts} experts top-${spec.moe.router.topK}, ` +
    `checkpoint ${gb(bytes)} GiB${describeCheckpointQuant(spec)}, ${loaded.loadMs.toFixed(0)} ms; ` +
    (loaded.model.device !== 'cpu' ? `device ${loaded.model.device}${cublasLtNote()}; ` : '') +
    `cpu ${caps.simd}${caps.amxTiles ? ' (bf16 GEMMs on AMX tiles)' : ''} x${caps.threads} threads, ` +
    `${caps.build} build${caps.cudaDevices ? `, ${caps.cudaDevices} CUDA device(s)` : caps.cudaError ? ` (${caps.cudaError})` : ''}`;
}
