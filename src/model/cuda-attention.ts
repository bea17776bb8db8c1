// Attention blocks on the device: grouped-query (with gpt-oss's sinks and per-layer windows, Qwen3-Next's
// output gate) and DeepSeek MLA, the same math as attention.ts (the CPU blocks) built from the cuda*
// ops over a device-resident paged KV cache (f32, bf16 or fp8).
import type { CudaBuffer, CudaStream } from '../native/index.js';
import { BF16, F32, type Device, type DeviceWeight } from './device.js';
import type { ForwardBatch } from './forward-batch.js';
import type { AttentionSpec } from './spec.js';
import type { KvDtype } from './kv-dtype.js';
import type { TensorSource } from './tensor-source.js';
import { gatherRows } from './linear-attention.js';
import { checkShape, rowsOf, transpose, vectorF32 } from './weights.js';

export interface DeviceLayerCache {
  /** [slots, kvHeads, dk] of `dtype`. */
  k: CudaBuffer;
  /** null for MLA (values are read from the latent in k). */
  v: CudaBuffer | null;
  dtype: KvDtype;
  /** fp8 only: static dequantisation scales per kv head [kvHeads] (host; by value to the kernels). */
  kScales: Float32Array | null;
  vScales: Float32Array | null;
}

/** The cache's dtype and scales as cudaPagedAttention takes them. */
function cacheOptions(c: DeviceLayerCache): { kvDtype: KvDtype; kScales?: Float32Array; vScales?: Float32Array } {
  return c.kScales ? { kvDtype: c.dtype, kScales: c.kScales, vScales: c.vScales ?? c.kScales } : { kvDtype: c.dtype };
}

/** One step's inputs on the device, shared by every layer. */
export interface DeviceStep {
  batch: ForwardBatch;
  tokens: number;
  positions: CudaBuffer;  // [T] i32
  slots: CudaBuffer;      // [T] i32
  seqInfo: CudaBuffer;    // [numSeqs, 3] i32
  blockTables: CudaBuffer; // [numSeqs, maxBlocks] i32
  blockSize: number;
  numBlocks: number;
  /** Longest context of the step (sizes the split-K grid). */
  maxContext: number;
  /** bf16 copy of the current normalised input (converted once, shared by the projections). */
  xb: { buf: CudaBuffer; ready: boolean };
  /** The forward pass's stream. */
  stream: CudaStream | null;
}

export interface DeviceAttentionBlock {
  readonly cacheFloatsPerToken: [number, number];
  /** x [T, H] f32 -> out [T, H] f32 (overwritten). */
  forward(step: DeviceStep, x: CudaBuffer, cache: DeviceLayerCache, out: CudaBuffer): void;
}

function attentionGeometry(step: DeviceStep) {
  return {
    numSeqs: step.batch.numSeqs, blockSize: step.blockSize, maxBlocks: step.batch.maxBlocks,
    totalTokens: step.tokens, maxContext: step.maxContext, numBlocks: step.numBlocks,
  };
}

export class CudaGqaAttention implements DeviceAttentionBlock {
  private readonly q: DeviceWeight;
  private readonly k: DeviceWeight;
  private readonly v: DeviceWeight;
  private readonly o: DeviceWeight;
  private readonly qBias: CudaBuffer | null = null;
  private readonly kBias: CudaBuffer | null = null;
  private readonly vBias: CudaBuffer | null = null;
  private readonly oBias: CudaBuffer | null;
  private readonly qNorm: CudaBuffer | null;
  private readonly kNorm: CudaBuffer | null;
  private readonly sinks: CudaBuffer | null;   // [heads] (gpt-oss)
  /** Qwen3-Next's output gate: the gate rows of q_proj [heads * headDim, H] (sigmoid(gate) scales the output). */
  private readonly gate: DeviceWeight | null = null;
  private readonly invFreq: CudaBuffer;
  readonly cacheFloatsPerToken: [number, number];

  /** normOffset: 1 for zero-centred q/k norm weights (Qwen3-Next: x * (1 + w)), else 0. */
  constructor(private readonly dev: Device, private readonly spec: AttentionSpec, src: TensorSource,
              p: string, hidden: number, private readonly eps: number, normOffset = 0) {
    const { heads, kvHeads, headDim } = spec;
    const qDim = heads * headDim, kvDim = kvHeads * headDim;
    // Three GEMMs instead of the CPU's fused qkv: their outputs land contiguous, ready for RoPE.
    if (spec.outputGate) {
      // q_proj [heads, q (headDim) | gate (headDim), H]: split at load into a q and a gate weight.
      const qg = src.get(`${p}q_proj.weight`);
      checkShape(`${p}q_proj.weight`, qg, [2 * qDim, hidden]);
      const rows = (off: number) => Array.from({ length: qDim }, (_, i) => Math.floor(i / headDim) * 2 * headDim + off + (i % headDim));
      this.q = dev.denseLinear(`${p}q_proj.weight (query rows)`, gatherRows(qg, rows(0)), qDim, hidden);
      this.gate = dev.denseLinear(`${p}q_proj.weight (gate rows)`, gatherRows(qg, rows(headDim)), qDim, hidden);
    } else {
      this.q = dev.storedLinear(src, `${p}q_proj.weight`, qDim, hidden);
    }
    this.k = dev.storedLinear(src, `${p}k_proj.weight`, kvDim, hidden);
    this.v = dev.storedLinear(src, `${p}v_proj.weight`, kvDim, hidden);
    this.o = dev.storedLinear(src, `${p}o_proj.weight`, hidden, qDim);
    if (spec.qkvBias) {
      this.qBias = dev.vector(vectorF32(src, `${p}q_proj.bias`, qDim));
      this.kBias = dev.vector(vectorF32(src, `${p}k_proj.bias`, kvDim));
      this.vBias = dev.vector(vectorF32(src, `${p}v_proj.bias`, kvDim));
    }
    this.oBias = spec.oBias ? dev.vector(vectorF32(src, `${p}o_proj.bias`, hidden)) : null;
    const qn = spec.qkNorm === 'per_head' ? headDim : qDim;
    const kn = spec.qkNorm === 'per_head' ? headDim : kvDim;
    const normW = (name: string, len: number) => {
      const w = vectorF32(src, name, len);
      if (normOffset) for (let i = 0; i < len; i++) w[i] = normOffset + w[i]!;
      return dev.vector(w);
    };
    this.qNorm = spec.qkNorm === 'none' ? null : normW(`${p}q_norm.weight`, qn);
    this.kNorm = spec.qkNorm === 'none' ? null : normW(`${p}k_norm.weight`, kn);
    this.sinks = spec.sinks ? dev.vector(vectorF32(src, `${p}sinks`, heads)) : null;
    this.invFreq = dev.vector(spec.rope.invFreq);
    this.cacheFloatsPerToken = [kvDim, kvDim];
  }

  forward(step: DeviceStep, x: CudaBuffer, cache: DeviceLayerCache, out: CudaBuffer): void {
    const { dev } = this;
    const { cu, scratch } = dev;
    const { heads, kvHeads, headDim, rope } = this.spec;
    const T = step.tokens;
    const st = step.stream;
    const qDim = heads * headDim, kvDim = kvHeads * headDim;
    const q = scratch.get('attn.q', T * qDim * F32);   // [T, heads, headDim]
    const k = scratch.get('attn.k', T * kvDim * F32);  // [T, kvHeads, headDim]
    const v = scratch.get('attn.v', T * kvDim * F32);
    dev.gemm(x, T, this.q, q, this.qBias, false, step.xb, st);
    dev.gemm(x, T, this.k, k, this.kBias, false, step.xb, st);
    dev.gemm(x, T, this.v, v, this.vBias, false, step.xb, st);
    const gate = this.gate ? scratch.get('attn.gate', T * qDim * F32) : null; // [T, heads, headDim]
    if (gate) dev.gemm(x, T, this.gate!, gate, null, false, step.xb, st);
    if (this.qNorm && this.kNorm) {
      const perHead = this.spec.qkNorm === 'per_head';
      cu.cudaRmsNorm(q, perHead ? T * heads : T, perHead ? headDim : qDim, this.qNorm, this.eps, q, null, st);
      cu.cudaRmsNorm(k, perHead ? T * kvHeads : T, perHead ? headDim : kvDim, this.kNorm, this.eps, k, null, st);
    }
    const clip = this.spec.clipQkv;
    if (clip !== null) {
      cu.cudaClamp(q, T * qDim, clip, st);
      cu.cudaClamp(k, T * kvDim, clip, st);
      cu.cudaClamp(v, T * kvDim, clip, st);
    }
    cu.cudaRope(q, T, heads, qDim, headDim, 0, step.positions, this.invFreq, rope.rotaryDim, rope.attnScale, rope.interleaved, st);
    cu.cudaRope(k, T, kvHeads, kvDim, headDim, 0, step.positions, this.invFreq, rope.rotaryDim, rope.attnScale, rope.interleaved, st);
    const slots = step.numBlocks * step.blockSize;
    cu.cudaKvCacheWrite(k, v, T, step.slots, cache.k, cache.v, kvHeads, headDim, headDim, headDim, slots, st,
      cache.dtype, cache.kScales, cache.vScales);
    const attn = scratch.get('attn.out', T * qDim * F32);
    cu.cudaPagedAttention(q, cache.k, cache.v!, step.seqInfo, step.blockTables, {
      ...attentionGeometry(step), heads, kvHeads, dk: headDim, dv: headDim, vStride: headDim, vOffset: 0,
      scale: this.spec.softmaxScale, slidingWindow: this.spec.slidingWindow ?? 0, ...cacheOptions(cache),
      ...(this.sinks ? { sinks: this.sinks } : {}),
    }, attn, st);
    if (gate) cu.cudaSigmoidMul(attn, gate, T * qDim, st);
    dev.gemm(attn, T, this.o, out, this.oBias, false, null, st);
  }
}

/**
 * DeepSeek MLA with absorbed up-projections (see MlaAttention): the cache holds [c_kv, k_pe] per
 * token; each head's query is mapped into latent space, attention runs with one KV head, and each
 * head's latent output is mapped back to v_head_dim before o_proj. The per-head absorption GEMMs run
 * in reference precision (f32 activations), as on the CPU.
 */
export class CudaMlaAttention implements DeviceAttentionBlock {
  private readonly qProj: DeviceWeight | null = null;
  private readonly qA: DeviceWeight | null = null;
  private readonly qANorm: CudaBuffer | null = null;
  private readonly qB: DeviceWeight | null = null;
  private readonly kvA: DeviceWeight;
  private readonly kvANorm: CudaBuffer;
  private readonly ukT: DeviceWeight[] = []; // per head [kvLoraRank, nope]
  private readonly uv: DeviceWeight[] = [];  // per head [v, kvLoraRank]
  private readonly o: DeviceWeight;
  private readonly invFreq: CudaBuffer;
  readonly cacheFloatsPerToken: [number, number];
  // HF builds q_a_layernorm / kv_a_layernorm with the RMSNorm default eps.
  private readonly latentEps = 1e-6;

  constructor(private readonly dev: Device, private readonly spec: AttentionSpec, src: TensorSource,
              p: string, hidden: number) {
    const { heads, qLoraRank, kvLoraRank, qkNopeHeadDim: nope, qkRopeHeadDim: rope, vHeadDim } = spec;
    const qDim = heads * (nope + rope);
    if (qLoraRank) {
      this.qA = dev.storedLinear(src, `${p}q_a_proj.weight`, qLoraRank, hidden);
      const qn = vectorF32(src, `${p}q_a_layernorm.weight`, qLoraRank);
      // LongCat-Flash's q scale is linear in the norm weight: folded in, as on the CPU.
      if (spec.qScale !== undefined && spec.qScale !== 1) for (let i = 0; i < qn.length; i++) qn[i] = qn[i]! * spec.qScale;
      this.qANorm = dev.vector(qn);
      this.qB = dev.storedLinear(src, `${p}q_b_proj.weight`, qDim, qLoraRank);
    } else {
      if (spec.qScale !== undefined && spec.qScale !== 1) throw new Error('MLA q scaling needs q_lora_rank');
      this.qProj = dev.storedLinear(src, `${p}q_proj.weight`, qDim, hidden);
    }
    this.kvA = dev.storedLinear(src, `${p}kv_a_proj_with_mqa.weight`, kvLoraRank + rope, hidden);
    const kvn = vectorF32(src, `${p}kv_a_layernorm.weight`, kvLoraRank);
    if (spec.kvScale !== undefined && spec.kvScale !== 1) for (let i = 0; i < kvn.length; i++) kvn[i] = kvn[i]! * spec.kvScale;
    this.kvANorm = dev.vector(kvn);
    const kvB = src.get(`${p}kv_b_proj.weight`);
    checkShape(`${p}kv_b_proj.weight`, kvB, [heads * (nope + vHeadDim), kvLoraRank]);
    for (let h = 0; h < heads; h++) {
      const base = h * (nope + vHeadDim);
      this.ukT.push(dev.linear(`${p}kv_b_proj.weight[uk ${h}]`, transpose(rowsOf(kvB, base, base + nope)), kvLoraRank, nope, true));
      this.uv.push(dev.linear(`${p}kv_b_proj.weight[uv ${h}]`, rowsOf(kvB, base + nope, base + nope + vHeadDim), vHeadDim, kvLoraRank, true));
    }
    this.o = dev.storedLinear(src, `${p}o_proj.weight`, hidden, heads * vHeadDim);
    this.invFreq = dev.vector(spec.rope.invFreq);
    this.cacheFloatsPerToken = [kvLoraRank + rope, 0];
  }

  forward(step: DeviceStep, x: CudaBuffer, cache: DeviceLayerCache, out: CudaBuffer): void {
    const { dev } = this;
    const { cu, scratch } = dev;
    const { heads, qLoraRank, kvLoraRank: lora, qkNopeHeadDim: nope, qkRopeHeadDim: rope, vHeadDim,
      rope: ropeSpec } = this.spec;
    const T = step.tokens;
    const st = step.stream;
    const qk = nope + rope, dk = lora + rope;
    const q = scratch.get('mla.q', T * heads * qk * F32); // [T, heads, nope + rope]
    if (this.qProj) {
      dev.gemm(x, T, this.qProj, q, null, false, step.xb, st);
    } else {
      const qa = scratch.get('mla.qa', T * qLoraRank! * F32);
      dev.gemm(x, T, this.qA!, qa, null, false, step.xb, st);
      cu.cudaRmsNorm(qa, T, qLoraRank!, this.qANorm!, this.latentEps, qa, null, st);
      dev.gemm(qa, T, this.qB!, q, null, false, { buf: scratch.get('mla.qa.bf16', T * qLoraRank! * BF16), ready: false }, st);
    }
    const kv = scratch.get('mla.kv', T * dk * F32); // [T, lora + rope]: c_kv then k_pe
    dev.gemm(x, T, this.kvA, kv, null, false, step.xb, st);
    // Normalise c_kv (rows strided by dk) through a contiguous buffer.
    const c = scratch.get('mla.c', T * lora * F32);
    dev.copy2d(c, 0, lora, kv, 0, dk, lora, T, st);
    cu.cudaRmsNorm(c, T, lora, this.kvANorm, this.latentEps, c, null, st);
    dev.copy2d(kv, 0, dk, c, 0, lora, lora, T, st);
    cu.cudaRope(q, T, heads, heads * qk, qk, nope, step.positions, this.invFreq, ropeSpec.rotaryDim, ropeSpec.attnScale, ropeSpec.interleaved, st);
    cu.cudaRope(kv, T, 1, dk, dk, lora, step.positions, this.invFreq, ropeSpec.rotaryDim, ropeSpec.attnScale, ropeSpec.interleaved, st);
    cu.cudaKvCacheWrite(kv, null, T, step.slots, cache.k, null, 1, dk, 0, 0, step.numBlocks * step.blockSize, st,
      cache.dtype, cache.kScales, null);

    // Absorb: qFull [T, heads, lora + rope] = [q_nope W_UK, q_pe].
    const qFull = scratch.get('mla.qfull', T * heads * dk * F32);
    dev.copy2d(qFull, lora, dk, q, nope, qk, rope, T * heads, st); // every head's q_pe in one copy
    this.perHead(T, q, qk, nope, this.ukT, qFull, dk, lora, st);
    const oLat = scratch.get('mla.olat', T * heads * lora * F32); // [T, heads, lora]
    cu.cudaPagedAttention(qFull, cache.k, cache.k, step.seqInfo, step.blockTables, {
      ...attentionGeometry(step), heads, kvHeads: 1, dk, dv: lora, vStride: dk, vOffset: 0,
      scale: this.spec.softmaxScale, slidingWindow: 0, ...cacheOptions(cache),
    }, oLat, st);
    // Un-absorb: v_h = o_lat_h W_UV^T -> attn [T, heads, v].
    const attn = scratch.get('mla.attn', T * heads * vHeadDim * F32);
    this.perHead(T, oLat, lora, lora, this.uv, attn, vHeadDim, vHeadDim, st);
    dev.gemm(attn, T, this.o, out, null, false, null, st);
  }

  /**
   * dst [T, heads, dstStride][:, h, :outDim] = src [T, heads, srcStride][:, h, :inDim] W_h^T for every
   * head: a gathered copy, a reference-precision GEMM and a scattered copy per head.
   * TODO(perf): one strided-batched GEMM (cuBLASLt) instead of 3 launches per head.
   */
  private perHead(T: number, src: CudaBuffer, srcStride: number, inDim: number, w: DeviceWeight[],
                  dst: CudaBuffer, dstStride: number, outDim: number, st: CudaStream | null): void {
    const { dev } = this;
    const heads = w.length;
    const a = dev.scratch.get('mla.head.in', T * inDim * F32);
    const b = dev.scratch.get('mla.head.out', T * outDim * F32);
    for (let h = 0; h < heads; h++) {
      dev.copy2d(a, 0, inDim, src, h * srcStride, heads * srcStride, inDim, T, st);
      dev.gemm(a, T, w[h]!, b, null, false, null, st);
      dev.copy2d(dst, h * dstStride, heads * dstStride, b, 0, outDim, outDim, T, st);
    }
  }
}
