// The MoE transformer on a CUDA device (`--device cuda`): the same layers, schedule and math as
// MoeModel (model.ts), with weights, activations and the paged KV cache resident on the device.
// Per step, one host-to-device copy brings the batch's integers and one device-to-host copy each
// brings back the logits rows and every MoE layer's routing.
import { loadNative, type CudaAddon, type CudaBuffer, type CudaEvent, type CudaExpertTable, type CudaStream, type NativeAddon,
  type SampleBatchArgs, type SampleBatchOut } from '../native/index.js';
import { CudaGqaAttention, CudaMlaAttention, type DeviceAttentionBlock, type DeviceLayerCache, type DeviceStep } from './cuda-attention.js';
import { BF16, Device, F32, I32, intDeviceQuant, type DeviceWeight } from './device.js';
import { cachedCostTable, EpsPlanner, type CostTable, type ExpertKernel } from '../moe/eps-planner.js';
import type { DeviceExpertComm } from '../moe/device-ep.js';
import { heldInt4Group } from './compressed-tensors.js';
import type { MoeHooks } from '../moe/moe-layer.js';
import { mulberry32 } from '../engine/rng.js';
import type { ForwardBatch, ForwardModel, ForwardResult } from './forward-batch.js';
import { moeTensors } from './moe-tensors.js';
import { kvDtypeBytes, type KvDtype } from './kv-dtype.js';
import { intCodeMethodName, intCodeQuant, type ModelSpec } from './spec.js';
import { withWeightPrefix, type HostTensor, type IntWeight, type TensorSource } from './tensor-source.js';
import { CudaGatedDeltaNet, type DeviceLinearState, type DeviceStateStep } from './cuda-linear-attention.js';
import { linearStateFloats } from './linear-attention.js';
import { checkExpert, checkShape, ffnSource, vectorF32, type ExpertSource } from './weights.js';
import { deviceQuantError, deviceQuantOf, intFfnMatrices, plainOrders, quantizedExpert, quantizeMatrix, type DeviceQuant } from './cuda-quant.js';
import type { QuantizeSpec } from './quantize.js';

export interface CudaModelOptions {
  /** CUDA device index. */
  device: number;
  /** The op surface: the native addon (default) or a stand-in with the same contract (tests). */
  cuda?: CudaAddon;
  /** false: routed experts are left out of the tables (the device expert cache fills them). */
  loadExperts?: boolean;
  /** Expert parallelism: the comm to the other ranks; only this rank's slice of experts is loaded. */
  ep?: DeviceExpertComm;
  /**
   * --quantize: routed experts quantized at load and kept so on the device (group_gemm_quant.cu); with
   * `dense` (--quantize-dense) the attention projections, Gated DeltaNet in_proj q/k/v/z and out_proj,
   * dense FFNs and shared experts too, in the same format.
   */
  quantize?: QuantizeSpec | null;
}

/** A gated FFN (dense layer, shared experts) as a one-expert GroupGemm table. */
interface DeviceFfn {
  table: CudaExpertTable;
  inter: number;
  /** An act-order FFN's input order [H] i32 (its codes in group order): runFfn gathers x by it. */
  inputOrder: CudaBuffer | null;
}

interface DeviceMoe {
  moeIndex: number;
  gate: DeviceWeight;                 // router [E + Z, H], reference precision
  gateBias: CudaBuffer | null;        // [E + Z]
  correctionBias: CudaBuffer | null;  // [E + Z]
  experts: CudaExpertTable;
  /** The same experts' buffers, for the per-expert DenseGemm path: gate_up [2I, H], down [H, I] bf16
   * (quantized experts: their codes and scales, and the DenseGemm path is off). */
  expertWeights: { gateUp: CudaBuffer; down: CudaBuffer }[];
  shared: DeviceFfn | null;
  sharedGate: DeviceWeight | null;    // [1, H]
  /** gpt-oss: the experts' biases (resident even when the experts are cached): gate_up [E, 2I] as
   * [gate (I) | up (I)] per expert, down [E, H]; with the clamped SwiGLU between the GEMMs. */
  bias: { gateUp: CudaBuffer; down: CudaBuffer } | null;
  /** Act-order experts: every expert's input order [E, H] i32 (the plain order for the others), by which
   * groupFfn gathers each row of x before the GroupGemm; null when no expert has one. */
  inputOrders: CudaBuffer | null;
}

interface DeviceSub {
  inputNorm: CudaBuffer;
  postNorm: CudaBuffer;
  /** Full attention, or null where the layer's mixer is linear attention. */
  attn: DeviceAttentionBlock | null;
  /** KV cache index of this attention (-1 for a linear-attention layer). */
  cacheIndex: number;
  /** Gated DeltaNet (hybrid models), with its index among the linear layers (state pools); else null. */
  linear: CudaGatedDeltaNet | null;
  linearIndex: number;
  dense: DeviceFfn | null;
}

interface DeviceLayer { subs: DeviceSub[]; moe: DeviceMoe | null; shortcut: boolean }

export class CudaModel implements ForwardModel<DeviceLayerCache[]> {
  readonly device: string;
  readonly kvDtypes: readonly KvDtype[] = ['f32', 'bf16', 'fp8'];
  readonly numCaches: number;
  readonly numMoeLayers: number;
  private readonly dev: Device;
  private readonly cu: CudaAddon;
  private readonly layers: DeviceLayer[] = [];
  private readonly embed: { buf: CudaBuffer; dtype: HostTensor['dtype'] };
  private readonly finalNorm: CudaBuffer;
  private readonly lmHead: DeviceWeight;
  private readonly tables: CudaExpertTable[] = [];
  /** Every cache allocated, with its block count. */
  private readonly caches = new Map<DeviceLayerCache[], number>();
  private readonly k: number;
  private expertKernel: ExpertKernel = 'group';
  /** The last forward's logits left on the device for sampleLogits ([rows, V] f32 scratch). */
  private lastLogits: { buf: CudaBuffer; rows: number; stream: CudaStream | null } | null = null;
  private planner: EpsPlanner | null = null;
  /** MoE layers per expert kernel in the last step. */
  private readonly choices = new Map<ExpertKernel, number>();
  private readonly loadExperts: boolean;
  /** The routed experts' device format: --quantize's, an FP8 checkpoint's, or null (bf16). */
  readonly expertQuant: DeviceQuant | null;
  /** --quantize: the experts were quantized here (an FP8 checkpoint's too, from its dequantised weights). */
  readonly quantizedAtLoad: boolean;
  private readonly ep: DeviceExpertComm | null;
  private disposed = false;
  /** EPS-MoE pipeline chunks asked for (expert parallelism only; 'auto' is 1 on the device for now). */
  private pipelineChunks = 1;
  /** Per MoE layer, the chunks of the last step. */
  private readonly chunksUsed = new Map<number, number>();
  /** The pipeline's comm stream and its events (made on first use). */
  private commStream: CudaStream | null = null;
  private readonly pipeEvents: CudaEvent[] = [];
  /** ScMoE fork and join between the main and the side stream (re-recorded per layer). */
  private forked: CudaEvent;
  private joined: CudaEvent;
  /** Tracing and expert residency (the device expert cache); routing comes back to the host per layer when set. */
  hooks: MoeHooks<CudaExpertTable> = {};
  /** Linear-attention layers (hybrid models): their state pools, one per layer, once allocated. */
  readonly numLinearLayers: number;
  private linearStates: DeviceLinearState[] = [];
  private stateSlots = 0;

  constructor(readonly spec: ModelSpec, checkpointSrc: TensorSource, opts: CudaModelOptions) {
    const src = withWeightPrefix(checkpointSrc, spec.weightPrefix);
    const native = loadNative() as NativeAddon & Partial<CudaAddon>;
    const cu = opts.cuda ?? (native.cudaBuffer ? native as CudaAddon : null);
    if (!cu) throw new Error('--device cuda needs the full build with CUDA (npm run build:gpu); this addon has none');
    if (!opts.cuda) {
      const n = native.capabilities().cudaDevices;
      if (opts.device >= n) throw new RangeError(`CUDA device ${opts.device} does not exist (${n} device(s) found)`);
      cu.cudaSetDevice(opts.device);
    }
    this.cu = cu;
    this.dev = new Device(cu, opts.device);
    this.device = `cuda:${opts.device}`;
    this.k = spec.moe.router.topK;
    this.loadExperts = opts.loadExperts ?? true;
    this.ep = opts.ep ?? null;
    this.expertQuant = expertQuantFor(spec, opts.quantize ?? null);
    this.quantizedAtLoad = !!opts.quantize;
    const H = spec.hidden;
    const dev = this.dev;
    dev.denseQuant = opts.quantize?.dense ? deviceQuantOf(opts.quantize) : null;
    try {
      const embed = src.get('model.embed_tokens.weight');
      checkShape('model.embed_tokens.weight', embed, [spec.vocabSize, H]);
      this.embed = dev.table(embed);
      // Zero-centred RMSNorm weights (Qwen3-Next): x * (1 + w), with 1 + w formed once here in f32.
      const norm = (name: string): CudaBuffer => {
        const w = vectorF32(src, name, H);
        if (spec.zeroCentredNorms) for (let i = 0; i < H; i++) w[i] = 1 + w[i]!;
        return dev.vector(w);
      };
      this.finalNorm = norm('model.norm.weight');
      this.lmHead = spec.tieWordEmbeddings && !src.has('lm_head.weight')
        ? dev.linear('model.embed_tokens.weight', embed, spec.vocabSize, H)
        : dev.linear('lm_head.weight', src.get('lm_head.weight'), spec.vocabSize, H);
      let moeIndex = 0;
      let cacheIndex = 0;
      let linearIndex = 0;
      // A layer's own window (gpt-oss layer_types) overrides the model's, as on the CPU.
      const attention = (p: string, i: number): DeviceAttentionBlock => {
        const w = spec.layers[i]!.slidingWindow;
        const a = w === undefined ? spec.attention : { ...spec.attention, slidingWindow: w };
        return a.kind === 'mla' ? new CudaMlaAttention(dev, a, src, p, H)
          : new CudaGqaAttention(dev, a, src, p, H, spec.rmsNormEps, spec.zeroCentredNorms ? 1 : 0);
      };
      for (let i = 0; i < spec.numLayers; i++) {
        const p = `model.layers.${i}.`;
        const ls = spec.layers[i]!;
        if (ls.shortcut) {
          const subs = [0, 1].map((j) => ({
            inputNorm: dev.vector(vectorF32(src, `${p}input_layernorm.${j}.weight`, H)),
            postNorm: dev.vector(vectorF32(src, `${p}post_attention_layernorm.${j}.weight`, H)),
            attn: attention(`${p}self_attn.${j}.`, i),
            cacheIndex: cacheIndex++, linear: null, linearIndex: -1,
            dense: this.ffn(src, `${p}mlps.${j}.`, spec.denseIntermediate),
          }));
          this.layers.push({ subs, moe: this.buildMoe(src, p, moeIndex++), shortcut: true });
          continue;
        }
        const moe = ls.ffn === 'moe' ? this.buildMoe(src, p, moeIndex++) : null;
        const linear = ls.mixer === 'linear_attention'
          ? new CudaGatedDeltaNet(dev, spec.linearAttention!, src, `${p}linear_attn.`, H, spec.rmsNormEps) : null;
        this.layers.push({
          subs: [{
            inputNorm: norm(`${p}input_layernorm.weight`),
            postNorm: norm(`${p}post_attention_layernorm.weight`),
            attn: linear ? null : attention(`${p}self_attn.`, i), cacheIndex: linear ? -1 : cacheIndex++,
            linear, linearIndex: linear ? linearIndex++ : -1,
            dense: moe ? null : this.ffn(src, `${p}mlp.`, spec.denseIntermediate),
          }],
          moe, shortcut: false,
        });
      }
      this.numCaches = cacheIndex;
      this.numMoeLayers = moeIndex;
      this.numLinearLayers = linearIndex;
      // Weights were uploaded from pageable memory on the default stream: the DMA may still be in
      // flight when the copy call returns, so the forward's own streams start after a full sync.
      dev.main = new cu.CudaStream();
      if (this.layers.some((l) => l.shortcut)) dev.side = new cu.CudaStream();
      this.forked = new cu.CudaEvent(false);
      this.joined = new cu.CudaEvent(false);
      cu.cudaSynchronize();
    } catch (e) {
      this.dispose();
      throw e;
    }
  }

  /** Bytes of weights on the device. */
  get weightBytes(): number {
    return this.dev.weightBytes;
  }

  private table(experts: number, inter: number, quant: DeviceQuant | null = null): CudaExpertTable {
    const t = new this.cu.CudaExpertTable(experts, this.spec.hidden, inter, quant);
    this.tables.push(t);
    return t;
  }

  /** A gated FFN's gate_up [2I, H] and down [H, I] on the device (bf16), shapes checked. */
  private upload(ex: ExpertSource, name: string, inter: number): { gateUp: CudaBuffer; down: CudaBuffer } {
    checkExpert(ex, name, this.spec.hidden, inter);
    return { gateUp: this.dev.gateUp(ex.gate, ex.up), down: this.dev.bf16(ex.down) };
  }

  /** A routed expert in the table's quantized format (cuda-quant.ts's quantizedExpert), uploaded. */
  private uploadQuant(q: DeviceQuant, t: ReturnType<typeof moeTensors>, e: number, name: string, inter: number):
      { gateUp: CudaBuffer; down: CudaBuffer } {
    const b = quantizedExpert(q, () => t.expert(e), t.expertFp8(e), this.quantizedAtLoad, name, this.spec.hidden, inter);
    return { gateUp: this.dev.upload(b.gateUp), down: this.dev.upload(b.down) };
  }

  /**
   * A gated FFN an int-code checkpoint stores as codes (gate, up, down), uploaded in layout q (the table's
   * format); an act-order one's in group order, with the input order `perm` its caller gathers x by
   * (groupFfn, runFfn).
   */
  private uploadInt(q: DeviceQuant, names: string[], gate: IntWeight | null, up: IntWeight | null, down: IntWeight | null,
                    inter: number): { gateUp: CudaBuffer; down: CudaBuffer; perm: Int32Array | null } {
    const m = intFfnMatrices(q, names, gate, up, down, this.spec.hidden, inter, true);
    return { gateUp: this.dev.upload(m.gateUp), down: this.dev.upload(m.down), perm: m.perm };
  }

  /**
   * A dense FFN or shared expert as a one-expert table: bf16, with --quantize-dense quantized (the fused
   * GroupGemm), or as the checkpoint's int8 / int4 codes where it stores all three so (and the table takes them).
   */
  private ffn(src: TensorSource, prefix: string, inter: number): DeviceFfn {
    const name = prefix.replace(/\.$/, '');
    const q = this.dev.denseQuant;
    const [gi, ui, di] = q ? [null, null, null] : ['gate_proj', 'up_proj', 'down_proj'].map((p) => src.getInt?.(`${prefix}${p}.weight`) ?? null);
    if (gi && ui && di) {
      // Zero points in any of the three: the table's layout carries them (a symmetric one's are 0).
      const iq = { ...intDeviceQuant(gi), ...(gi.zeros || ui.zeros || di.zeros ? { zeros: true as const } : {}) };
      if (!deviceQuantError(iq, this.spec.hidden, inter)) {
        // Act-order: the codes in group order, x gathered by the FFN's input order (runFfn).
        const w = this.uploadInt(iq, ['gate_proj', 'up_proj', 'down_proj'].map((p) => `${prefix}${p}.weight`), gi, ui, di, inter);
        const table = this.table(1, inter, iq);
        table.set(0, w.gateUp, w.down);
        return { table, inter, inputOrder: w.perm ? this.dev.upload(w.perm) : null };
      }
    }
    if (q) {
      const H = this.spec.hidden;
      const why = deviceQuantError(q, H, inter);
      if (why) throw new RangeError(`--quantize-dense ${q.format} on the device: ${name}: ${why}`);
      const ex = ffnSource(src, prefix);
      checkExpert(ex, name, H, inter);
      const table = this.table(1, inter, q);
      table.set(0, this.dev.upload(quantizeMatrix(q, ex.gate, ex.up, inter, H)), this.dev.upload(quantizeMatrix(q, ex.down, null, H, inter)));
      return { table, inter, inputOrder: null };
    }
    const w = this.upload(ffnSource(src, prefix), name, inter);
    const table = this.table(1, inter);
    table.set(0, w.gateUp, w.down);
    return { table, inter, inputOrder: null };
  }

  private buildMoe(src: TensorSource, layerPrefix: string, moeIndex: number): DeviceMoe {
    const { spec, dev } = this;
    const H = spec.hidden;
    const m = spec.moe;
    const t = moeTensors(spec, src, layerPrefix);
    const q = this.expertQuant;
    const experts = this.table(m.numExperts, m.intermediate, q);
    const expertWeights: DeviceMoe['expertWeights'] = [];
    // Act-order experts (GPTQ desc_act): each one's input order, row e of [E, H] (the plain order for the
    // others); their rows of x are gathered so before the GroupGemm (groupFfn).
    let orders: Int32Array | null = null;
    for (let e = 0; e < m.numExperts && this.loadExperts; e++) {
      if (this.ep && !this.ep.ownsExpert(e)) continue;
      const name = `${t.prefix}experts.${e}`;
      const iw = this.quantizedAtLoad ? null : t.expertInt?.(e);
      const iq = intCodeQuant(spec.quantization);
      if (!iw && q && iq && !this.quantizedAtLoad)
        throw new RangeError(`${name} is not stored as int codes, but this ${intCodeMethodName(iq)} checkpoint's experts are read ` +
          `as ${q.format} on the device; serve it with --quantize ${q.format}, or on the CPU engine`);
      const iu = iw && q ? this.uploadInt(q, iw.names, iw.gate, iw.up, iw.down, m.intermediate) : null;
      const w = iu ?? (q ? this.uploadQuant(q, t, e, name, m.intermediate) : this.upload(t.expert(e), name, m.intermediate));
      experts.set(e, w.gateUp, w.down);
      expertWeights.push({ gateUp: w.gateUp, down: w.down });
      const perm = iu?.perm;
      if (perm) {
        orders ??= plainOrders(m.numExperts, H);
        orders.set(perm, e * H);
      }
    }
    return {
      moeIndex, experts, expertWeights,
      gate: dev.linear(t.routerName, t.router, t.router.shape[0]!, H, true),
      gateBias: t.routerBias ? dev.vector(t.routerBias) : null,
      correctionBias: t.correctionBias ? dev.vector(t.correctionBias) : null,
      shared: t.sharedPrefix ? this.ffn(src, t.sharedPrefix, m.sharedIntermediate) : null,
      sharedGate: t.sharedGate ? dev.linear(`${t.prefix}shared_expert_gate.weight`, t.sharedGate, 1, H, true) : null,
      bias: t.expertBias ? { gateUp: dev.vector(t.expertBias.gateUp), down: dev.vector(t.expertBias.down) } : null,
      inputOrders: orders ? dev.upload(orders) : null,
    };
  }

  /**
   * EPS-MoE on the device: 'group' (one GroupGemm launch for every expert), 'dense' (a DenseGemm per
   * expert with rows, cuBLASLt when loaded; it needs the per-expert row counts on the host: one
   * device sync per MoE layer), or 'auto': a cost table timed on this device for this expert shape
   * (CUDA events, once, cached beside the CPU's in eps-cost.json) picks per step from the batch's
   * expected load (T*k rows over min(E, T*k) experts: no device sync to decide).
   */
  setExpertKernel(mode: 'auto' | 'group' | 'dense'): void {
    if (mode === 'dense' && this.expertQuant)
      throw new RangeError(`--expert-kernel dense runs bf16 experts only; the device holds ${this.expertQuant.format} experts ` +
        '(use --expert-kernel group or auto)');
    if (mode === 'dense' && this.ep)
      throw new RangeError('--expert-kernel dense is not available with expert parallelism on the device');
    if (mode === 'dense' && !this.loadExperts)
      throw new RangeError('--expert-kernel dense needs every expert resident on the device (no expert offloading)');
    this.planner = null;
    this.expertKernel = mode === 'dense' ? 'dense' : 'group';
    if (mode !== 'auto' || !this.loadExperts || this.ep || this.numMoeLayers === 0 || this.expertQuant) return;
    const { spec } = this;
    const name = this.cu.cudaDeviceInfo(this.dev.index).name;
    const key = `cuda|${name}|E${spec.moe.numExperts}|H${spec.hidden}|I${spec.moe.intermediate}|bf16`;
    this.planner = new EpsPlanner(cachedCostTable(key, () => this.calibrate()));
  }

  /** Rows per expert from which the calibrated DenseGemm beats the GroupGemm (Infinity: never; null: no table). */
  crossoverRows(): number | null {
    return this.planner ? this.planner.crossoverRows() : null;
  }

  kernelChoices(): Record<string, number> {
    return Object.fromEntries(this.choices);
  }

  /** The batched sampler's kernel over the last forward's logits (a forward with logitsOnDevice). */
  sampleLogits(rows: number, batch: SampleBatchArgs, out: SampleBatchOut): void {
    const last = this.lastLogits;
    if (!last || last.rows !== rows) {
      throw new Error(`sampleLogits: the last forward left ${last?.rows ?? 0} logits rows on the device, not ${rows}`);
    }
    this.cu.cudaSampleBatch(last.buf, rows, this.spec.vocabSize, batch, out, last.stream);
    if (this.cu.cudaDeviceLost()) throw Object.assign(new Error('the CUDA device was lost (sticky error); restart the daemon'), { code: 'E_CUDA' });
  }

  /**
   * EPS-MoE pipeline with expert parallelism: N chunks per MoE layer, each chunk's dispatch and
   * combine on a comm stream, its GroupGemm on the compute stream, ordered by events. 'auto' is 1
   * here (the device has no calibrated link model yet).
   */
  setPipelineChunks(mode: 'auto' | number): void {
    this.pipelineChunks = mode === 'auto' ? 1 : mode;
  }

  layerPlans(): { chunks: number; kernel: string }[] {
    return this.layers.filter((l) => l.moe).map((l) => ({
      chunks: this.chunksUsed.get(l.moe!.moeIndex) ?? 1, kernel: this.ep ? 'group' : this.expertKernel,
    }));
  }

  /** Times both expert kernels on the first MoE layer's experts (random bf16 rows, 4 experts active). */
  private calibrate(): CostTable {
    const { cu, dev, spec } = this;
    const m = this.layers.find((l) => l.moe)!.moe!;
    const H = spec.hidden, I = spec.moe.intermediate, E = spec.moe.numExperts;
    const A = Math.min(E, 4);
    const rowsList = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];
    const maxRows = A * rowsList[rowsList.length - 1]!;
    const rand = mulberry32(7);
    const xf = Float32Array.from({ length: maxRows * H }, () => rand() * 2 - 1);
    const xb = new Uint16Array(xf.length);
    loadNative().convert(xf, 'f32', xb, 'bf16');
    const st = dev.main;
    const x = cu.cudaBuffer(xb.byteLength), offsets = cu.cudaBuffer((E + 1) * I32);
    const y = cu.cudaBuffer(maxRows * H * F32), hs = cu.cudaBuffer(maxRows * I * BF16);
    const t0 = new cu.CudaEvent(true), t1 = new cu.CudaEvent(true);
    const groupMs: number[] = [], denseMs: number[] = [];
    try {
      cu.cudaCopyToDevice(x, 0, xb, st);
      const time = (fn: () => void): number => {
        fn();
        const ms: number[] = [];
        for (let i = 0; i < 3; i++) {
          t0.record(st);
          fn();
          t1.record(st);
          t1.synchronize();
          ms.push(t1.elapsedMs(t0));
        }
        return ms.sort((a, b) => a - b)[1]!;
      };
      for (const r of rowsList) {
        const offs = Int32Array.from({ length: E + 1 }, (_, e) => Math.min(e, A) * r);
        cu.cudaCopyToDevice(offsets, 0, offs, st);
        groupMs.push(time(() => this.experts(m, x, offsets, A * r, hs, y, st, 'group')) / A);
        denseMs.push(time(() => this.experts(m, x, offsets, A * r, hs, y, st, 'dense')) / A);
      }
    } finally {
      cu.cudaSynchronize();
      for (const b of [x, offsets, y, hs]) b.dispose();
      t0.dispose();
      t1.dispose();
    }
    return { key: '', rows: rowsList, groupMs, denseMs };
  }

  takeCommDelta(): { bytes: number; seconds: number; overlap: number | null } | null {
    return this.ep?.takeDelta() ?? null;
  }

  /** The streams the forward pass computes on (an expert cache orders its copies after them). */
  computeStreams(): (CudaStream | null)[] {
    return [this.dev.main, ...(this.dev.side ? [this.dev.side] : [])];
  }

  /** Each MoE layer's expert table, in order (what the device expert cache binds its slots into). */
  expertTables(): CudaExpertTable[] {
    return this.layers.filter((l) => l.moe).map((l) => l.moe!.experts);
  }

  cacheFloatsPerToken(): [number, number] {
    for (const l of this.layers) for (const sub of l.subs) if (sub.attn) return sub.attn.cacheFloatsPerToken;
    return [0, 0];
  }

  /** Bytes of one sequence's state over every linear-attention layer (0 for a model without any). */
  get stateBytesPerSlot(): number {
    if (!this.spec.linearAttention) return 0;
    const [c, r] = linearStateFloats(this.spec.linearAttention);
    return this.numLinearLayers * (c + r) * F32;
  }

  /**
   * Allocates (replacing any before) the linear-attention state pools on the device for `slots`
   * sequences, zeroed: batch.stateSlots index them (the engine's StateSlotPool decides the numbers).
   * A sequence's slot is zeroed again when its first scheduled token is position 0 (admission,
   * or recomputation after preemption).
   */
  allocateStateCache(slots: number): void {
    if (!Number.isInteger(slots) || slots < 1) throw new RangeError(`slots is ${slots}, expected a positive integer`);
    this.freeStateCache();
    for (const l of this.layers) {
      for (const sub of l.subs) {
        if (!sub.linear) continue;
        try {
          this.linearStates.push(sub.linear.allocState(slots));
        } catch (e) {
          this.freeStateCache();
          throw e;
        }
      }
    }
    this.stateSlots = slots;
  }

  private freeStateCache(): void {
    if (this.linearStates.length) this.cu.cudaSynchronize();  // work queued may still read the old pools
    for (const s of this.linearStates) { s.conv.dispose(); s.recurrent.dispose(); }
    this.linearStates = [];
    this.stateSlots = 0;
  }

  cacheKvHeads(): number {
    const a = this.spec.attention;
    return a.kind === 'mla' ? 1 : a.kvHeads;
  }

  /** The per-layer device KV cache of `dtype` (fp8: static per-kv-head scales 1.0, as on the CPU). */
  allocateKvCache(numBlocks: number, blockSize: number, dtype: KvDtype = 'f32'): DeviceLayerCache[] {
    const [kf, vf] = this.cacheFloatsPerToken();
    const slots = numBlocks * blockSize;
    const eb = kvDtypeBytes(dtype);
    const kvHeads = this.cacheKvHeads();
    const cache: DeviceLayerCache[] = [];
    try {
      for (let i = 0; i < this.numCaches; i++) {
        cache.push({
          k: this.cu.cudaBuffer(slots * kf * eb), v: vf > 0 ? this.cu.cudaBuffer(slots * vf * eb) : null, dtype,
          kScales: dtype === 'fp8' ? new Float32Array(kvHeads).fill(1) : null,
          vScales: dtype === 'fp8' && vf > 0 ? new Float32Array(kvHeads).fill(1) : null,
        });
      }
    } catch (e) {
      for (const c of cache) { c.k.dispose(); c.v?.dispose(); }
      throw e;
    }
    this.caches.set(cache, numBlocks);
    return cache;
  }

  forward(batch: ForwardBatch, cache: DeviceLayerCache[], blockSize: number): ForwardResult {
    const { spec, cu, dev } = this;
    const { scratch } = dev;
    const H = spec.hidden;
    const T = batch.tokenIds.length;
    const S = batch.numSeqs;
    const R = batch.logitRows.length;
    const k = this.k;
    const L = this.numMoeLayers;
    this.choices.clear();
    this.ep?.beginStep();

    // The step's integers in one copy: [tokens T | positions T | slots T | seqInfo 3S |
    // blockTables S*maxBlocks | logitRows R | dense offsets 2 | (hybrid models) state slots S |
    // sequence starts S+1].
    const parts = [batch.tokenIds, batch.positions, batch.slots, batch.seqInfo,
      batch.blockTables.subarray(0, S * batch.maxBlocks), batch.logitRows, Int32Array.of(0, T)];
    const hybrid = this.numLinearLayers > 0;
    if (hybrid) {
      if (this.linearStates.length < this.numLinearLayers)
        throw new Error(`${spec.modelType} keeps per-sequence state: call allocateStateCache(slots) before forward`);
      const ss = batch.stateSlots;
      if (!ss || ss.length < S)
        throw new Error(`batch.stateSlots has ${ss?.length ?? 0} entries, expected one per sequence (${S})`);
      for (let s = 0; s < S; s++)
        if (!(ss[s]! >= 0 && ss[s]! < this.stateSlots)) throw new RangeError(`batch.stateSlots[${s}] is ${ss[s]}, expected 0..${this.stateSlots - 1}`);
      const starts = new Int32Array(S + 1);
      for (let s = 0; s < S; s++) starts[s] = batch.seqInfo[3 * s]!;
      starts[S] = T;
      parts.push(ss.subarray(0, S), starts);
    }
    const total = parts.reduce((a, p) => a + p.length, 0);
    const host = new Int32Array(total);
    const views: CudaBuffer[] = [];
    const ints = scratch.get('step.ints', total * I32);
    let off = 0;
    for (const p of parts) {
      host.set(p, off);
      views.push(ints.view(off * I32, Math.max(4, p.length * I32)));
      off += p.length;
    }
    const st = dev.main;
    cu.cudaCopyToDevice(ints, 0, host, st);
    const [tokenIds, positions, slots, seqInfo, blockTables, logitRows, denseOffsets, stSlots, stStarts] = views as
      [CudaBuffer, CudaBuffer, CudaBuffer, CudaBuffer, CudaBuffer, CudaBuffer, CudaBuffer, CudaBuffer?, CudaBuffer?];
    const stateStep: DeviceStateStep | null = hybrid ? { slots: stSlots!, seqStarts: stStarts! } : null;
    if (hybrid) {
      // A sequence computed from position 0 (new, or recomputed after preemption) starts from zeros:
      // its slot may hold a finished or preempted sequence's state.
      // TODO(perf): one kernel over the step's new slots instead of two memsets per sequence and layer.
      const [cf, rf] = linearStateFloats(spec.linearAttention!);
      for (let s = 0; s < S; s++) {
        if (batch.seqInfo[3 * s + 2]! - batch.seqInfo[3 * s + 1]! !== 0) continue;
        const slot = batch.stateSlots![s]!;
        for (const ls of this.linearStates) {
          if (cf > 0) cu.cudaFill(ls.conv.view(slot * cf * F32, cf * F32), 0, st);
          cu.cudaFill(ls.recurrent.view(slot * rf * F32, rf * F32), 0, st);
        }
      }
    }
    let maxContext = 1;
    for (let s = 0; s < S; s++) maxContext = Math.max(maxContext, batch.seqInfo[3 * s + 2]!);
    const numBlocks = this.caches.get(cache);
    if (numBlocks === undefined) throw new Error('forward: the KV cache was not allocated by this model');

    const residual = scratch.get('residual', T * H * F32);
    const delta = scratch.get('delta', T * H * F32);   // the sub-block output added to the residual next
    const normed = scratch.get('normed', T * H * F32);
    const xb = { buf: scratch.get('normed.bf16', T * H * BF16), ready: false };
    const step: DeviceStep = {
      batch, tokens: T, positions, slots, seqInfo, blockTables, blockSize, numBlocks, maxContext, xb, stream: st,
    };
    const ids = scratch.get('moe.ids.all', Math.max(1, L * T * k) * I32); // [L, T, k]
    const norm = (w: CudaBuffer) => {
      cu.cudaRmsNorm(delta, T, H, w, spec.rmsNormEps, normed, residual, st);
      xb.ready = false;
    };
    cu.cudaEmbedding(this.embed.buf, this.embed.dtype, spec.vocabSize, H, tokenIds, T, delta, st);
    cu.cudaFill(residual, 0, st);
    for (const layer of this.layers) {
      if (layer.shortcut) {
        // ScMoE schedule (LongCat-Flash), as on the CPU: the MoE reads the first sub-block's
        // normalised output; its result joins at the end of the layer.
        const [s0, s1] = layer.subs as [DeviceSub, DeviceSub];
        norm(s0.inputNorm);
        s0.attn!.forward(step, normed, cache[s0.cacheIndex]!, delta);
        norm(s0.postNorm);
        // The MoE runs on the side stream from its own copy of the input while the main stream
        // runs MLP0, MLA1 and MLP1; the main stream waits for it only at the join.
        const scX = scratch.get('sc.x', T * H * F32);
        const moeOut = scratch.get('sc.out', T * H * F32);
        cu.cudaCopyDevice(scX, 0, normed, 0, T * H * F32, st);
        const side = dev.side!;
        this.forked.record(st);
        side.waitEvent(this.forked);
        this.moe(layer.moe!, scX, { buf: scratch.get('sc.x.bf16', T * H * BF16), ready: false }, T, moeOut, ids, denseOffsets, side);
        this.joined.record(side);
        this.runFfn(s0.dense!, normed, xb, T, delta, denseOffsets, st);
        norm(s1.inputNorm);
        s1.attn!.forward(step, normed, cache[s1.cacheIndex]!, delta);
        norm(s1.postNorm);
        this.runFfn(s1.dense!, normed, xb, T, delta, denseOffsets, st);
        st!.waitEvent(this.joined);
        cu.cudaAdd(delta, moeOut, T * H, st);
        continue;
      }
      const sub = layer.subs[0]!;
      norm(sub.inputNorm);
      if (sub.linear) sub.linear.forward(step, normed, this.linearStates[sub.linearIndex]!, stateStep!, delta);
      else sub.attn!.forward(step, normed, cache[sub.cacheIndex]!, delta);
      norm(sub.postNorm);
      if (layer.moe) this.moe(layer.moe, normed, xb, T, delta, ids, denseOffsets, st);
      else this.runFfn(sub.dense!, normed, xb, T, delta, denseOffsets, st);
    }
    norm(this.finalNorm);
    // Gather the rows whose logits are wanted (an f32 "embedding" lookup over normed), then the head.
    const rows = scratch.get('logit.rows', R * H * F32);
    cu.cudaEmbedding(normed, 'f32', T, H, logitRows, R, rows, st);
    const logitsDev = scratch.get('logits', R * spec.vocabSize * F32);
    dev.gemm(rows, R, this.lmHead, logitsDev, null, false, null, st);
    // With device sampling only the sampled ids cross later (sampleLogits); else the rows do here.
    this.lastLogits = batch.logitsOnDevice ? { buf: logitsDev, rows: R, stream: st } : null;
    const logits = new Float32Array(batch.logitsOnDevice ? 0 : R * spec.vocabSize);
    // Pageable host memory: these copies return when the stream's work and the copy are done.
    if (R > 0 && !batch.logitsOnDevice) cu.cudaCopyToHost(logits, logitsDev, 0, st);
    const allIds = new Int32Array(L * T * k);
    if (allIds.length) cu.cudaCopyToHost(allIds, ids, 0, st);
    const routedIds = Array.from({ length: L }, (_, m) => allIds.subarray(m * T * k, (m + 1) * T * k));
    if (cu.cudaDeviceLost()) throw Object.assign(new Error('the CUDA device was lost (sticky error); restart the daemon'), { code: 'E_CUDA' });
    return { logits, routedIds };
  }

  /** out [T, H] = FFN(x) through a one-expert table (overwrites). */
  private runFfn(f: DeviceFfn, x: CudaBuffer, xb: { buf: CudaBuffer; ready: boolean }, T: number,
                 out: CudaBuffer, offsets: CudaBuffer, st: CudaStream | null): void {
    const { cu } = this;
    if (!xb.ready) {
      cu.cudaConvert(x, 'f32', xb.buf, 'bf16', T * this.spec.hidden, st);
      xb.ready = true;
    }
    const side = st === this.dev.side;
    let xg = xb.buf;
    if (f.inputOrder && T > 0) {
      // Act-order: x in the FFN's input order (one "expert", offsets [0, T]).
      xg = this.dev.scratch.get(side ? 'ffn.xg.side' : 'ffn.xg', T * this.spec.hidden * BF16);
      cu.cudaGatherExpertColumns(xb.buf, offsets, 1, T, this.spec.hidden, f.inputOrder, xg, st);
    }
    const hs = this.dev.scratch.get(side ? 'ffn.h.side' : 'ffn.h', T * f.inter * BF16);
    cu.cudaGroupGemmFfn(xg, offsets, f.table, T, hs, out, null, st);
  }

  /**
   * Router (reference precision) -> route -> permute (expert-contiguous, bf16) -> one GroupGemm over
   * every expert -> identity experts' rows copied through -> unpermute + combine -> shared expert.
   */
  private moe(m: DeviceMoe, x: CudaBuffer, xb: { buf: CudaBuffer; ready: boolean }, T: number,
              out: CudaBuffer, allIds: CudaBuffer, denseOffsets: CudaBuffer, st: CudaStream | null): void {
    const { cu, spec, dev } = this;
    const { scratch } = dev;
    const H = spec.hidden;
    const E = spec.moe.numExperts;
    const Z = spec.moe.zeroExperts ?? 0;
    const ET = E + Z;
    const k = this.k;
    const r = spec.moe.router;
    const logits = scratch.get('moe.logits', T * ET * F32);
    dev.gemm(x, T, m.gate, logits, m.gateBias, false, null, st);
    const ids = allIds.view(m.moeIndex * T * k * I32, Math.max(4, T * k * I32));
    const weights = scratch.get('moe.weights', T * k * F32);
    const counts = scratch.get('moe.counts', ET * I32);
    cu.cudaRoute(logits, T, ET, k, {
      scoring: r.scoring, bias: m.correctionBias, nGroup: r.nGroup, topkGroup: r.topkGroup,
      groupScore: r.groupScore, renormalize: r.renormalize, scale: r.scale,
    }, ids, weights, counts, st);
    if (this.hooks.onRouted || this.hooks.ensureResident) {
      // The tracer and the cache work on the host: one device sync per MoE layer.
      const hostIds = new Int32Array(T * k), hostCounts = new Int32Array(ET);
      cu.cudaCopyToHost(hostIds, ids, 0, st);
      cu.cudaCopyToHost(hostCounts, counts, 0, st);
      this.hooks.onRouted?.(m.moeIndex, hostIds, hostCounts, T);
      this.hooks.ensureResident?.(m.moeIndex, hostCounts.subarray(0, E), m.experts);
    }
    if (this.ep) {
      const PN = Math.max(1, this.ep.agreeChunks(this.pipelineChunks));
      this.chunksUsed.set(m.moeIndex, PN);
      if (PN > 1) {
        this.choices.set('group', (this.choices.get('group') ?? 0) + 1);
        let sh: ReturnType<CudaModel['sharedY']> = null;
        this.pipelined(m, x, T, ids, weights, PN, st, () => { sh = this.sharedY(m, x, xb, T, denseOffsets, st); }, out);
        this.addShared(sh, T, out, st);
        return;
      }
    }
    const rows = T * k;
    const kernel = this.chooseKernel(rows);
    const permIndex = scratch.get('moe.perm', rows * I32);
    const offsets = scratch.get('moe.offsets', (ET + 1) * I32);
    const yPerm = scratch.get('moe.yperm', rows * H * F32);
    const hs = scratch.get('moe.h', rows * spec.moe.intermediate * BF16);
    if (Z === 0) {
      const xPerm = scratch.get('moe.xperm.bf16', rows * H * BF16);
      cu.cudaPermute(x, T, H, ids, k, ET, xPerm, permIndex, offsets, 'bf16', st);
      this.expertsOrRemote(m, xPerm, offsets, rows, hs, yPerm, st, kernel, ET);
    } else {
      // Identity experts return weight * x exactly: permute in f32, feed the GEMM a bf16 copy and
      // copy the identity rows (after the real experts' rows) through unrounded.
      const xPermF = scratch.get('moe.xperm.f32', rows * H * F32);
      const xPerm = scratch.get('moe.xperm.bf16', rows * H * BF16);
      cu.cudaPermute(x, T, H, ids, k, ET, xPermF, permIndex, offsets, 'f32', st);
      cu.cudaConvert(xPermF, 'f32', xPerm, 'bf16', rows * H, st);
      this.expertsOrRemote(m, xPerm, offsets, rows, hs, yPerm, st, kernel, ET);
      cu.cudaCopyRowRange(yPerm, xPermF, offsets, E, ET, H * F32, rows, st);
    }
    cu.cudaUnpermuteCombine(yPerm, permIndex, weights, T, k, H, out, false, st);
    this.addShared(this.sharedY(m, x, xb, T, denseOffsets, st), T, out, st);
  }

  /** The shared expert of x (and its gate logits), when the layer has one: [T, H] f32. */
  private sharedY(m: DeviceMoe, x: CudaBuffer, xb: { buf: CudaBuffer; ready: boolean }, T: number, denseOffsets: CudaBuffer,
                  st: CudaStream | null): { y: CudaBuffer; g: CudaBuffer | null } | null {
    if (!m.shared) return null;
    const { dev, spec } = this;
    const y = dev.scratch.get('moe.shared.y', T * spec.hidden * F32);
    this.runFfn(m.shared, x, xb, T, y, denseOffsets, st);
    let g: CudaBuffer | null = null;
    if (m.sharedGate) {
      g = dev.scratch.get('moe.shared.gate', T * F32);
      dev.gemm(x, T, m.sharedGate, g, null, false, null, st);
    }
    return { y, g };
  }

  /** out += the shared expert's output (gated). */
  private addShared(s: { y: CudaBuffer; g: CudaBuffer | null } | null, T: number, out: CudaBuffer, st: CudaStream | null): void {
    if (!s) return;
    const H = this.spec.hidden;
    if (s.g) this.cu.cudaGatedAdd(out, s.y, s.g, T, H, st);
    else this.cu.cudaAdd(out, s.y, T * H, st);
  }

  /** The pipeline's i-th event (made on first use). */
  private pipeEvent(i: number): CudaEvent {
    while (this.pipeEvents.length <= i) this.pipeEvents.push(new this.cu.CudaEvent(false));
    return this.pipeEvents[i]!;
  }

  /**
   * EPS-MoE on the device with expert parallelism: tokens in PN chunks; chunk c+1's dispatch and
   * chunk c-1's combine run on the comm stream while chunk c's GroupGemm runs on `st`, ordered by
   * events; the shared expert computes on `st` while the first dispatch travels. The collectives
   * are queued in the same order on every rank (d0, d1, c0, d2, c1, ...), as on the CPU.
   * T = 0 (an expert rank): empty chunks, the same schedule. Writes out [T, H] (+ shared).
   */
  private pipelined(m: DeviceMoe, x: CudaBuffer | null, T: number, ids: CudaBuffer | null, weights: CudaBuffer | null,
                    PN: number, st: CudaStream | null, shared: () => void = () => {}, out: CudaBuffer | null = null): void {
    const { cu, dev, spec } = this;
    const ep = this.ep!;
    const H = spec.hidden, E = spec.moe.numExperts, Z = spec.moe.zeroExperts ?? 0, ET = E + Z, k = this.k;
    const get = (c: number) => (name: string, bytes: number) => dev.scratch.get(`${name}.${c}`, bytes);
    const cs = (this.commStream ??= new cu.CudaStream());
    const bounds = Array.from({ length: PN + 1 }, (_, c) => Math.floor((c * T) / PN));
    // Permute each chunk's tokens (its own permutation, offsets and permIndex).
    const hostOffsets = Array.from({ length: PN }, () => new Int32Array(ET + 1));
    const chunk = bounds.slice(0, PN).map((a, c) => {
      const b = bounds[c + 1]!, rows = (b - a) * k;
      const g = get(c);
      const xPerm = g('moe.xperm.bf16', rows * H * BF16);
      const xPermF = Z > 0 ? g('moe.xperm.f32', rows * H * F32) : null;
      const permIndex = g('moe.perm', rows * I32);
      const offsets = g('moe.offsets', (ET + 1) * I32);
      const yPerm = g('moe.yperm', rows * H * F32);
      if (rows > 0) {
        const xc = x!.view(a * H * F32, (b - a) * H * F32), idc = ids!.view(a * k * I32, rows * I32);
        if (xPermF) {
          cu.cudaPermute(xc, b - a, H, idc, k, ET, xPermF, permIndex, offsets, 'f32', st);
          cu.cudaConvert(xPermF, 'f32', xPerm, 'bf16', rows * H, st);
        } else {
          cu.cudaPermute(xc, b - a, H, idc, k, ET, xPerm, permIndex, offsets, 'bf16', st);
        }
        cu.cudaCopyToHost(hostOffsets[c]!, offsets.view(0, (ET + 1) * I32), 0, st);
      }
      return { a, b, rows, xPerm, xPermF, permIndex, offsets, yPerm };
    });
    const ev = (i: number) => this.pipeEvent(i);
    ev(0).record(st);
    cs.waitEvent(ev(0));
    const dispatch = (c: number) => {
      const local = ep.dispatch(chunk[c]!.xPerm, hostOffsets[c]!, H, cs, get(c));
      ev(1 + 3 * c).record(cs);
      return local;
    };
    const locals = [dispatch(0)];
    shared();
    for (let c = 0; c < PN; c++) {
      const local = locals[c]!;
      const g = get(c);
      st?.waitEvent(ev(1 + 3 * c));
      const offs = g('ep.local.offsets', (E + 1) * I32);
      cu.cudaCopyToDevice(offs, 0, local.offsets, st);
      const yLocal = g('ep.ylocal', local.rows * H * F32);
      const hs = g('ep.h', local.rows * spec.moe.intermediate * BF16);
      this.groupFfn(m, local.x, offs, local.rows, hs, yLocal, st, g);
      ev(2 + 3 * c).record(st);
      // NOTE: the next dispatch is queued after this chunk's GEMM, so that the compute stream has
      // work while the host waits on the comm stream for that dispatch's counts.
      if (c + 1 < PN) locals.push(dispatch(c + 1));
      cs.waitEvent(ev(2 + 3 * c));
      ep.combine(yLocal, chunk[c]!.yPerm, H, cs, g);
      ev(3 + 3 * c).record(cs);
    }
    st?.waitEvent(ev(3 * PN));
    if (!out) return;
    for (const ch of chunk) {
      if (ch.rows === 0) continue;
      if (ch.xPermF) cu.cudaCopyRowRange(ch.yPerm, ch.xPermF, ch.offsets, E, ET, H * F32, ch.rows, st);
      cu.cudaUnpermuteCombine(ch.yPerm, ch.permIndex, weights!.view(ch.a * k * F32, ch.rows * F32), ch.b - ch.a, k, H,
        out.view(ch.a * H * F32, (ch.b - ch.a) * H * F32), false, st);
    }
  }

  /**
   * The experts' part of a MoE layer: here, or with expert parallelism dispatched to the ranks
   * owning them (this rank computes the rows routed to its own slice, from every rank).
   */
  private expertsOrRemote(m: DeviceMoe, xPerm: CudaBuffer, offsets: CudaBuffer, rows: number, hs: CudaBuffer,
                          yPerm: CudaBuffer, st: CudaStream | null, kernel: ExpertKernel, ET: number): void {
    const ep = this.ep;
    if (!ep) {
      this.experts(m, xPerm, offsets, rows, hs, yPerm, st, kernel);
      return;
    }
    const host = new Int32Array(ET + 1);
    this.cu.cudaCopyToHost(host, offsets.view(0, (ET + 1) * I32), 0, st);
    this.remoteExperts(m, xPerm, host, yPerm, st);
  }

  /** Dispatch -> this rank's GroupGemm over its slice -> combine into yPerm rows [0, offsets[E]). */
  private remoteExperts(m: DeviceMoe, xPerm: CudaBuffer, hostOffsets: Int32Array, yPerm: CudaBuffer,
                        st: CudaStream | null): void {
    const { cu, dev, spec } = this;
    const ep = this.ep!;
    const H = spec.hidden, E = spec.moe.numExperts;
    const get = (name: string, bytes: number) => dev.scratch.get(name, bytes);
    const local = ep.dispatch(xPerm, hostOffsets, H, st, get);
    const offs = get('ep.local.offsets', (E + 1) * I32);
    cu.cudaCopyToDevice(offs, 0, local.offsets, st);
    const yLocal = get('ep.ylocal', local.rows * H * F32);
    const hs = get('ep.h', local.rows * spec.moe.intermediate * BF16);
    this.groupFfn(m, local.x, offs, local.rows, hs, yLocal, st, get);
    ep.combine(yLocal, yPerm, H, st, get);
  }

  /**
   * The device expert cache's act-order experts (PinnedExpertStore.inputOrders, per MoE layer): x gathered
   * by them before each GroupGemm, as for resident ones (a model loaded with its experts keeps its own).
   */
  setExpertInputOrders(orders: (Int32Array | null)[]): void {
    if (this.loadExperts) return;  // resident experts: the model read their orders itself
    if (orders.length !== this.numMoeLayers) throw new RangeError(`${orders.length} layers of input orders for ${this.numMoeLayers} MoE layers`);
    for (const l of this.layers) {
      if (!l.moe) continue;
      const o = orders[l.moe.moeIndex];
      if (o && o.length !== this.spec.moe.numExperts * this.spec.hidden)
        throw new RangeError(`input orders of MoE layer ${l.moe.moeIndex}: ${o.length} entries, expected experts x hidden`);
      l.moe.inputOrders = o ? this.dev.upload(o) : null;
    }
  }

  /** An expert rank's step (expert parallelism): every MoE layer's remote part, in order. */
  serveExperts(): void {
    const ET = this.spec.moe.numExperts + (this.spec.moe.zeroExperts ?? 0);
    const none = this.dev.scratch.get('ep.none', 16);
    for (const l of this.layers) {
      if (!l.moe) continue;
      const PN = Math.max(1, this.ep!.agreeChunks(0));
      if (PN > 1) this.pipelined(l.moe, null, 0, null, null, PN, this.dev.main);
      else this.remoteExperts(l.moe, none, new Int32Array(ET + 1), none, this.dev.main);
    }
  }

  /** The EPS choice for a layer of `rows` routed rows (the expected load: no device sync). */
  private chooseKernel(rows: number): ExpertKernel {
    let kernel = this.expertKernel;
    if (this.planner) {
      const active = Math.min(this.spec.moe.numExperts, rows);
      kernel = this.planner.plan(new Float64Array(active).fill(rows / active), this.spec.hidden * F32).kernel;
    }
    this.choices.set(kernel, (this.choices.get(kernel) ?? 0) + 1);
    return kernel;
  }

  /**
   * y [rows, H] f32 = the GroupGemm FFN of x [rows, H] bf16 over the table's experts (rows by
   * offsets); gpt-oss's biased, clamped-SwiGLU experts through cudaGroupGemmBiasedFfn (bf16 or quantized).
   */
  private groupFfn(m: DeviceMoe, x: CudaBuffer, offsets: CudaBuffer, rows: number, hs: CudaBuffer, y: CudaBuffer,
                   st: CudaStream | null, get: (name: string, bytes: number) => CudaBuffer): void {
    if (m.inputOrders && rows > 0) {
      // Act-order experts hold their columns in group order: each row of x in its expert's input order.
      const H = this.spec.hidden;
      const xg = get('moe.x.gathered', rows * H * BF16);
      this.cu.cudaGatherExpertColumns(x, offsets, this.spec.moe.numExperts, rows, H, m.inputOrders, xg, st);
      x = xg;
    }
    const act = this.spec.moe.clampedSwiglu;
    if (!m.bias || !act) {
      this.cu.cudaGroupGemmFfn(x, offsets, m.experts, rows, hs, y, null, st);
      return;
    }
    const gu = get('moe.gu', Math.max(1, rows) * 2 * this.spec.moe.intermediate * F32);
    this.cu.cudaGroupGemmBiasedFfn(x, offsets, m.experts, rows, gu, hs, y,
      { gateUpBias: m.bias.gateUp, downBias: m.bias.down, alpha: act.alpha, limit: act.limit }, st);
  }

  /** yPerm [rows, H] f32 = expert FFNs of xPerm [rows, H] bf16 in expert-contiguous order. */
  private experts(m: DeviceMoe, xPerm: CudaBuffer, offsets: CudaBuffer, rows: number, hs: CudaBuffer,
                  yPerm: CudaBuffer, st: CudaStream | null, kernel: ExpertKernel): void {
    const { cu } = this;
    if (kernel === 'group') {
      this.groupFfn(m, xPerm, offsets, rows, hs, yPerm, st, (name, bytes) => this.dev.scratch.get(name, bytes));
      return;
    }
    const H = this.spec.hidden, I = this.spec.moe.intermediate, E = this.spec.moe.numExperts;
    const offs = new Int32Array(E + 1);
    cu.cudaCopyToHost(offs, offsets.view(0, (E + 1) * I32), 0, st);
    let most = 0;
    for (let e = 0; e < E; e++) most = Math.max(most, offs[e + 1]! - offs[e]!);
    const gu = this.dev.scratch.get('moe.dense.gu', most * 2 * I * F32);
    const h = this.dev.scratch.get('moe.dense.h', most * I * F32);
    for (let e = 0; e < E; e++) {
      const r0 = offs[e]!, n = offs[e + 1]! - r0;
      if (n === 0) continue;
      const w = m.expertWeights[e]!;
      const b = m.bias;
      cu.cudaDenseGemm(xPerm.view(r0 * H * BF16, n * H * BF16), n, w.gateUp, 2 * I, H, gu,
        b ? b.gateUp.view(e * 2 * I * F32, 2 * I * F32) : null, false, null, st);
      const act = this.spec.moe.clampedSwiglu;
      if (act) cu.cudaClampedSwiglu(gu, n, I, act.alpha, act.limit, h, st);
      else cu.cudaSiluMul(gu, n, I, h, st);
      // The GroupGemm stores SiLU(gate)*up as bf16 too: both paths feed the down GEMM the same.
      cu.cudaConvert(h, 'f32', hs, 'bf16', n * I, st);
      cu.cudaDenseGemm(hs, n, w.down, H, I, yPerm.view(r0 * H * F32, n * H * F32),
        b ? b.down.view(e * H * F32, H * F32) : null, false, null, st);
    }
  }

  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    this.forked?.dispose();
    this.joined?.dispose();
    this.commStream?.synchronize();
    this.commStream?.dispose();
    for (const e of this.pipeEvents) e.dispose();
    for (const t of this.tables) t.dispose();
    this.freeStateCache();
    for (const c of this.caches.keys()) for (const l of c) { l.k.dispose(); l.v?.dispose(); }
    this.dev.dispose();
  }
}

/**
 * The routed experts' device format, the same for resident experts and the device expert cache's
 * slots: --quantize's; else an FP8 checkpoint's block layout when the device kernels take it (block
 * columns a multiple of 16); else null (bf16, dequantised at load).
 */
function expertQuantFor(spec: ModelSpec, quantize: QuantizeSpec | null): DeviceQuant | null {
  const H = spec.hidden, I = spec.moe.intermediate;
  if (quantize) {
    // gpt-oss's biased, clamped-SwiGLU experts run the quantized GroupGemm's plain passes
    // (cudaGroupGemmBiasedFfn over a quantized table).
    const q = deviceQuantOf(quantize);
    const why = deviceQuantError(q, H, I);
    if (why) throw new RangeError(`--quantize ${quantize.format} on the device: ${why}`);
    return q;
  }
  if (intCodeQuant(spec.quantization)) return compressedExpertQuant(spec);
  if (spec.quantization?.method !== 'fp8') return null;
  const [br, bc] = spec.quantization.blockSize;
  const q: DeviceQuant = { format: 'fp8', group: bc, blockRows: br };
  return deviceQuantError(q, H, I) ? null : q;
}

/**
 * Int-code checkpoints (compressed-tensors, GPTQ): the routed experts' device format from the config's
 * one scheme (int8 per row, or int4 in groups of 32 / 128), kept as stored; refused where the device cannot.
 */
function compressedExpertQuant(spec: ModelSpec): DeviceQuant {
  const q = intCodeQuant(spec.quantization);
  if (!q) throw new Error('not an int-code checkpoint spec');
  const method = intCodeMethodName(q);
  // The device expert cache's pinned store (src/offload/device-store.ts) holds the int codes as stored too.
  const { bits, groupSizes } = q.schemes;
  if (bits.length !== 1 || groupSizes.length > 1)
    throw new RangeError(`a ${method} checkpoint with several weight schemes (num_bits ${bits.join(', ')}` +
      `${groupSizes.length ? `, group_size ${groupSizes.join(', ')}` : ''}) is not read on the device: one table holds one format`);
  // Zero points (AWQ, GPTQ sym false, compressed-tensors symmetric false) in every matrix of the table.
  const z = q.zeroPoints ? { zeros: true as const } : {};
  const dq: DeviceQuant = bits[0] === 8 ? { format: 'int8', group: 0, blockRows: 0, ...z } : { format: 'int4', group: heldInt4Group(groupSizes[0]!), blockRows: 0, ...z };
  const why = deviceQuantError(dq, spec.hidden, spec.moe.intermediate);
  if (why) throw new RangeError(`this ${method} checkpoint on the device: ${why}`);
  return dq;
}
