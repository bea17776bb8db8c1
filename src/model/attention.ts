// Attention blocks over the paged KV cache: grouped-query (Mixtral, Qwen, OLMoE) and DeepSeek's
// multi-head latent attention, which caches the compressed latent and absorbs the up-projections.
import { loadNative, type AttentionOptions, type KvArray, type PackedWeight } from '../native/index.js';
import type { ForwardBatch, Scratch } from './forward-batch.js';
import type { AttentionSpec } from './spec.js';
import type { TensorSource } from './tensor-source.js';
import { checkShape, packLinear, packStacked, rowsOf, transpose, vectorF32 } from './weights.js';
import type { QuantizeSpec } from './quantize.js';

export interface LayerCache {
  /** [slots, kvHeads, dk] of the cache dtype (f32, bf16 bits or fp8 e4m3 bits). */
  k: KvArray;
  /** null for MLA (values are read from the latent in k). */
  v: KvArray | null;
  /** fp8 only: static dequantisation scales per kv head [kvHeads] (null otherwise). */
  kScales: Float32Array | null;
  vScales: Float32Array | null;
}

export interface AttentionContext {
  batch: ForwardBatch;
  tokens: number;
  fast: boolean;
  scratch: Scratch;
  blockSize: number;
}

export interface AttentionBlock {
  /** Floats per token per layer in the KV cache: [k floats, v floats]. */
  readonly cacheFloatsPerToken: [number, number];
  /** Bytes of the projection weights held (codes and scales when quantized). */
  readonly weightBytes: number;
  forward(ctx: AttentionContext, x: Float32Array, cache: LayerCache, out: Float32Array): void;
  /** The projection weights in the order a forward reads them (for prefetch hints). */
  readonly projections: PackedWeight[];
  dispose(): void;
}

/**
 * One attention block's pagedAttention options, built once with every field present (a fixed
 * object shape): each call writes this step's numSeqs, blockSize and maxBlocks into it. A fresh
 * object per call (a spread of the static part) cost V8 a new hidden class per layer and step.
 */
class AttentionCall {
  private readonly opts: AttentionOptions;

  constructor(o: Omit<AttentionOptions, 'numSeqs' | 'blockSize' | 'maxBlocks'>) {
    this.opts = {
      numSeqs: 0, heads: o.heads, kvHeads: o.kvHeads, dk: o.dk, dv: o.dv, vStride: o.vStride, vOffset: o.vOffset,
      blockSize: 1, maxBlocks: 0, scale: o.scale, slidingWindow: o.slidingWindow, qRowStride: o.qRowStride,
      kScales: undefined, vScales: undefined, sinks: o.sinks ?? null,
    };
  }

  /** The options for this step and cache. */
  options(ctx: AttentionContext, cache: LayerCache): AttentionOptions {
    const o = this.opts;
    o.numSeqs = ctx.batch.numSeqs;
    o.blockSize = ctx.blockSize;
    o.maxBlocks = ctx.batch.maxBlocks;
    o.kScales = cache.kScales ?? undefined;
    o.vScales = cache.kScales ? (cache.vScales ?? cache.kScales) : undefined;
    return o;
  }
}

export class GqaAttention implements AttentionBlock {
  // q, k and v projections as one packed weight [(heads + 2 kvHeads) * headDim, hidden]: one
  // GEMM per layer instead of three (at decode the small k and v GEMVs are dominated by per-call
  // costs, not by their 0.5 MB of weights).
  private readonly qkv: PackedWeight;
  private readonly o: PackedWeight;
  private readonly qkvBias: Float32Array | null; // [(heads + 2 kvHeads) * headDim]
  private readonly oBias: Float32Array | null;
  private readonly qNorm: Float32Array | null;
  private readonly kNorm: Float32Array | null;
  private readonly sinks: Float32Array | null;     // [heads] (gpt-oss)
  private readonly call: AttentionCall;
  readonly cacheFloatsPerToken: [number, number];
  readonly projections: PackedWeight[];

  readonly weightBytes: number;
  /** Qwen3-Next's output gate: q_proj rows per head [q (headDim) | gate (headDim)]. */
  private readonly gated: boolean;

  /**
   * `quantize`: the projections quantized in that format (--quantize-dense), else kept in their dtype.
   * normOffset: 1 for zero-centred q/k norm weights (Qwen3-Next: x * (1 + w)), else 0.
   */
  constructor(private readonly spec: AttentionSpec, src: TensorSource, prefix: string,
              hidden: number, private readonly eps: number, quantize: QuantizeSpec | null = null, normOffset = 0) {
    const { heads, kvHeads, headDim } = spec;
    const p = prefix;
    this.gated = spec.outputGate === true;
    // With the output gate, q_proj gives [heads, 2 headDim]: the packed "q" part is q and gate interleaved per head.
    const qDim = heads * headDim * (this.gated ? 2 : 1);
    const kvDim = kvHeads * headDim;
    this.qkv = packStacked(src, [`${p}q_proj.weight`, `${p}k_proj.weight`, `${p}v_proj.weight`],
      [qDim, kvDim, kvDim], hidden, quantize);
    this.o = packLinear(src, `${p}o_proj.weight`, hidden, heads * headDim, quantize);
    this.weightBytes = this.qkv.sizeBytes + this.o.sizeBytes;
    if (spec.qkvBias) {
      this.qkvBias = new Float32Array(qDim + 2 * kvDim);
      this.qkvBias.set(vectorF32(src, `${p}q_proj.bias`, qDim), 0);
      this.qkvBias.set(vectorF32(src, `${p}k_proj.bias`, kvDim), qDim);
      this.qkvBias.set(vectorF32(src, `${p}v_proj.bias`, kvDim), qDim + kvDim);
    } else {
      this.qkvBias = null;
    }
    this.oBias = spec.oBias ? vectorF32(src, `${p}o_proj.bias`, hidden) : null;
    const qn = spec.qkNorm === 'per_head' ? headDim : heads * headDim;
    const kn = spec.qkNorm === 'per_head' ? headDim : kvHeads * headDim;
    const normW = (name: string, len: number) => {
      const w = vectorF32(src, name, len);
      if (normOffset) for (let i = 0; i < len; i++) w[i] = normOffset + w[i]!;
      return w;
    };
    this.qNorm = spec.qkNorm === 'none' ? null : normW(`${p}q_norm.weight`, qn);
    this.kNorm = spec.qkNorm === 'none' ? null : normW(`${p}k_norm.weight`, kn);
    this.sinks = spec.sinks ? vectorF32(src, `${p}sinks`, heads) : null;
    this.cacheFloatsPerToken = [kvHeads * headDim, kvHeads * headDim];
    this.projections = [this.qkv, this.o];
    this.call = new AttentionCall({
      heads, kvHeads, dk: headDim, dv: headDim, scale: spec.softmaxScale, slidingWindow: spec.slidingWindow ?? 0, sinks: this.sinks,
    });
  }

  forward(ctx: AttentionContext, x: Float32Array, cache: LayerCache, out: Float32Array): void {
    const n = loadNative();
    const { heads, kvHeads, headDim, rope } = this.spec;
    const T = ctx.tokens;
    const q = ctx.scratch.f32('attn.q', T * heads * headDim);       // [T, heads, headDim]
    const k = ctx.scratch.f32('attn.k', T * kvHeads * headDim);     // [T, kvHeads, headDim]
    const v = ctx.scratch.f32('attn.v', T * kvHeads * headDim);
    const qDim = heads * headDim;
    const kvDim = kvHeads * headDim;
    const qw = this.gated ? 2 * qDim : qDim;
    const W = qw + 2 * kvDim;
    const qkv = ctx.scratch.f32('attn.qkv', T * W);                 // [T, q | k | v]
    n.denseGemm(x, T, this.qkv, qkv, this.qkvBias, false, ctx.fast);
    const gate = this.gated ? ctx.scratch.f32('attn.gate', T * qDim) : null;  // [T, heads, headDim]
    for (let t = 0; t < T; t++) {
      const r = t * W;
      if (gate) {
        for (let h = 0; h < heads; h++) {
          const src = r + h * 2 * headDim;
          q.set(qkv.subarray(src, src + headDim), t * qDim + h * headDim);
          gate.set(qkv.subarray(src + headDim, src + 2 * headDim), t * qDim + h * headDim);
        }
      } else {
        q.set(qkv.subarray(r, r + qDim), t * qDim);
      }
      k.set(qkv.subarray(r + qw, r + qw + kvDim), t * kvDim);
      v.set(qkv.subarray(r + qw + kvDim, r + W), t * kvDim);
    }
    if (this.qNorm && this.kNorm) {
      if (this.spec.qkNorm === 'per_head') {
        n.rmsNorm(q, T * heads, headDim, this.qNorm, this.eps, q, null);
        n.rmsNorm(k, T * kvHeads, headDim, this.kNorm, this.eps, k, null);
      } else {
        n.rmsNorm(q, T, heads * headDim, this.qNorm, this.eps, q, null);
        n.rmsNorm(k, T, kvHeads * headDim, this.kNorm, this.eps, k, null);
      }
    }
    const clip = this.spec.clipQkv;
    if (clip !== null) for (const a of [q, k, v]) clamp(a, clip);
    const pos = ctx.batch.positions;
    n.rope(q, T, heads, heads * headDim, headDim, 0, pos, rope.invFreq, rope.attnScale, rope.interleaved);
    n.rope(k, T, kvHeads, kvHeads * headDim, headDim, 0, pos, rope.invFreq, rope.attnScale, rope.interleaved);
    n.kvCacheWrite(k, v, T, ctx.batch.slots, cache.k, cache.v, kvHeads, headDim, headDim, headDim,
      cache.kScales, cache.vScales);
    const attn = ctx.scratch.f32('attn.out', T * heads * headDim);
    n.pagedAttention(q, cache.k, cache.v!, ctx.batch.seqInfo, ctx.batch.blockTables, this.call.options(ctx, cache), attn);
    if (gate) for (let i = 0; i < T * qDim; i++) attn[i] = attn[i]! * (1 / (1 + Math.exp(-gate[i]!)));
    n.denseGemm(attn, T, this.o, out, this.oBias, false, ctx.fast);
  }

  dispose(): void {
    this.qkv.dispose();
    this.o.dispose();
  }
}

function clamp(a: Float32Array, c: number): void {
  for (let i = 0; i < a.length; i++) {
    const x = a[i]!;
    if (x > c) a[i] = c;
    else if (x < -c) a[i] = -c;
  }
}

/**
 * DeepSeek MLA. The cache holds per token [c_kv (kvLoraRank), k_pe (qkRopeHeadDim)] once for all
 * heads. Each head's query is absorbed into latent space (q_lat = W_UK^T q_nope), attention runs as
 * one-KV-head attention with dk = kvLoraRank + rope and dv = kvLoraRank (values = the latent), and
 * W_UV maps each head's latent output back to v_head_dim before o_proj.
 */
export class MlaAttention implements AttentionBlock {
  private readonly qProj: PackedWeight | null;
  private readonly qA: PackedWeight | null;
  private readonly qANorm: Float32Array | null;
  private readonly qB: PackedWeight | null;
  private readonly kvA: PackedWeight;
  private readonly kvANorm: Float32Array;
  private readonly ukT: PackedWeight[] = []; // per head [kvLoraRank, nope]: q_lat = q_nope * W_UK
  private readonly uv: PackedWeight[] = [];  // per head [v, kvLoraRank]
  private readonly o: PackedWeight;
  private readonly call: AttentionCall;
  readonly projections: PackedWeight[];
  readonly cacheFloatsPerToken: [number, number];
  // NOTE: HF builds q_a_layernorm / kv_a_layernorm with the RMSNorm default eps (1e-6), not
  // config.rms_norm_eps.
  private readonly latentEps = 1e-6;

  readonly weightBytes: number;

  /**
   * `quantize` (--quantize-dense): q, kv_a and o projections in that format. kv_b stays in its dtype:
   * decode absorbs it per head into [kvLoraRank, nope] / [v, kvLoraRank] pieces whose k (nope) is
   * below a quantization group, and it is a few percent of the layer's bytes.
   */
  constructor(private readonly spec: AttentionSpec, src: TensorSource, prefix: string,
              hidden: number, quantize: QuantizeSpec | null = null) {
    const { heads, qLoraRank, kvLoraRank, qkNopeHeadDim: nope, qkRopeHeadDim: rope, vHeadDim } = spec;
    const p = prefix;
    const qDim = heads * (nope + rope);
    const q = quantize;
    if (qLoraRank) {
      this.qProj = null;
      this.qA = packLinear(src, `${p}q_a_proj.weight`, qLoraRank, hidden, q);
      this.qANorm = vectorF32(src, `${p}q_a_layernorm.weight`, qLoraRank);
      this.qB = packLinear(src, `${p}q_b_proj.weight`, qDim, qLoraRank, q);
    } else {
      this.qProj = packLinear(src, `${p}q_proj.weight`, qDim, hidden, q);
      this.qA = null;
      this.qANorm = null;
      this.qB = null;
    }
    this.kvA = packLinear(src, `${p}kv_a_proj_with_mqa.weight`, kvLoraRank + rope, hidden, q);
    this.kvANorm = vectorF32(src, `${p}kv_a_layernorm.weight`, kvLoraRank);
    // LongCat-Flash scales: q = q_b(norm(q_a x) * w) * s_q and latent = norm(c) * w * s_kv. Both are
    // linear in the norm weight, so they fold into it (exact up to f32 rounding).
    if (spec.qScale !== undefined && spec.qScale !== 1) {
      if (!this.qANorm) throw new Error('MLA q scaling needs q_lora_rank');
      for (let i = 0; i < this.qANorm.length; i++) this.qANorm[i] = this.qANorm[i]! * spec.qScale;
    }
    if (spec.kvScale !== undefined && spec.kvScale !== 1)
      for (let i = 0; i < this.kvANorm.length; i++) this.kvANorm[i] = this.kvANorm[i]! * spec.kvScale;
    // Absorbed into the query and output sides in f32: a checkpoint's int codes come as their exact
    // dequantised values (src.get), as an FP8 checkpoint's e4m3 codes do.
    const kvB = src.get(`${p}kv_b_proj.weight`);
    checkShape(`${p}kv_b_proj.weight`, kvB, [heads * (nope + vHeadDim), kvLoraRank]);
    const n = loadNative();
    for (let h = 0; h < heads; h++) {
      const base = h * (nope + vHeadDim);
      const uk = transpose(rowsOf(kvB, base, base + nope)); // [kvLoraRank, nope]
      this.ukT.push(n.packWeight(uk.data, uk.dtype, kvLoraRank, nope));
      const uv = rowsOf(kvB, base + nope, base + nope + vHeadDim); // [v, kvLoraRank]
      this.uv.push(n.packWeight(uv.data, uv.dtype, vHeadDim, kvLoraRank));
    }
    this.o = packLinear(src, `${p}o_proj.weight`, hidden, heads * vHeadDim, q);
    this.cacheFloatsPerToken = [kvLoraRank + rope, 0];
    const dk = kvLoraRank + rope;
    this.call = new AttentionCall({ heads, kvHeads: 1, dk, dv: kvLoraRank, vStride: dk, vOffset: 0, scale: spec.softmaxScale });
    this.projections = [this.qProj, this.qA, this.qB, this.kvA, ...this.ukT, ...this.uv, this.o]
      .filter((w): w is PackedWeight => w !== null);
    let bytes = 0;
    for (const w of this.projections) bytes += w.sizeBytes;
    this.weightBytes = bytes;
  }

  forward(ctx: AttentionContext, x: Float32Array, cache: LayerCache, out: Float32Array): void {
    const n = loadNative();
    const { heads, qLoraRank, kvLoraRank: lora, qkNopeHeadDim: nope, qkRopeHeadDim: rope,
      vHeadDim, rope: ropeSpec } = this.spec;
    const T = ctx.tokens;
    const s = ctx.scratch;
    const qk = nope + rope;
    const q = s.f32('mla.q', T * heads * qk); // [T, heads, nope + rope]
    if (this.qProj) {
      n.denseGemm(x, T, this.qProj, q, null, false, ctx.fast);
    } else {
      const qa = s.f32('mla.qa', T * qLoraRank!);
      n.denseGemm(x, T, this.qA!, qa, null, false, ctx.fast);
      n.rmsNorm(qa, T, qLoraRank!, this.qANorm!, this.latentEps, qa, null);
      n.denseGemm(qa, T, this.qB!, q, null, false, ctx.fast);
    }
    const dk = lora + rope;
    const kv = s.f32('mla.kv', T * dk); // [T, lora + rope]: c_kv then k_pe
    n.denseGemm(x, T, this.kvA, kv, null, false, ctx.fast);
    // Normalise c_kv in place (rows are strided by dk: copy through a contiguous buffer).
    const c = s.f32('mla.c', T * lora);
    for (let t = 0; t < T; t++) c.set(kv.subarray(t * dk, t * dk + lora), t * lora);
    n.rmsNorm(c, T, lora, this.kvANorm, this.latentEps, c, null);
    for (let t = 0; t < T; t++) kv.set(c.subarray(t * lora, (t + 1) * lora), t * dk);
    const pos = ctx.batch.positions;
    n.rope(q, T, heads, heads * qk, qk, nope, pos, ropeSpec.invFreq, ropeSpec.attnScale, ropeSpec.interleaved);
    n.rope(kv, T, 1, dk, dk, lora, pos, ropeSpec.invFreq, ropeSpec.attnScale, ropeSpec.interleaved);
    n.kvCacheWrite(kv, null, T, ctx.batch.slots, cache.k, null, 1, dk, 0, 0, cache.kScales, null);

    // Absorb: qFull [T, heads, lora + rope] = [q_nope W_UK, q_pe].
    const qFull = s.f32('mla.qfull', T * heads * dk);
    const qNope = s.f32('mla.qnope', T * nope);
    const qLat = s.f32('mla.qlat', T * lora);
    for (let h = 0; h < heads; h++) {
      for (let t = 0; t < T; t++) {
        const src = (t * heads + h) * qk;
        qNope.set(q.subarray(src, src + nope), t * nope);
        qFull.set(q.subarray(src + nope, src + qk), (t * heads + h) * dk + lora);
      }
      n.denseGemm(qNope, T, this.ukT[h]!, qLat, null, false, false);
      for (let t = 0; t < T; t++) qFull.set(qLat.subarray(t * lora, (t + 1) * lora), (t * heads + h) * dk);
    }
    const oLat = s.f32('mla.olat', T * heads * lora); // [T, heads, lora]
    n.pagedAttention(qFull, cache.k, cache.k, ctx.batch.seqInfo, ctx.batch.blockTables, this.call.options(ctx, cache), oLat);
    // Un-absorb: v_h = o_lat_h W_UV^T -> [T, heads, v].
    const attn = s.f32('mla.attn', T * heads * vHeadDim);
    const oh = s.f32('mla.oh', T * lora);
    const vh = s.f32('mla.vh', T * vHeadDim);
    for (let h = 0; h < heads; h++) {
      for (let t = 0; t < T; t++) oh.set(oLat.subarray((t * heads + h) * lora, (t * heads + h + 1) * lora), t * lora);
      n.denseGemm(oh, T, this.uv[h]!, vh, null, false, false);
      for (let t = 0; t < T; t++) attn.set(vh.subarray(t * vHeadDim, (t + 1) * vHeadDim), (t * heads + h) * vHeadDim);
    }
    n.denseGemm(attn, T, this.o, out, null, false, ctx.fast);
  }

  dispose(): void {
    for (const w of [this.qProj, this.qA, this.qB, this.kvA, this.o, ...this.ukT, ...this.uv]) w?.dispose();
  }
}
