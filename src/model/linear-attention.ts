// Gated DeltaNet linear attention (Qwen3-Next, Qwen3.5): one projection gives q/k/v (through a causal
// depthwise conv + SiLU), the output gate z and the per-head b (beta) and a (decay); the gated delta
// rule updates a per-sequence state [Hv, Dk, Dv]; a gated RMSNorm and out_proj finish. The conv and
// recurrent states live in slots of a LinearStatePool (one slot per running sequence, engine-owned).
import { loadNative, type PackedWeight } from '../native/index.js';
import type { AttentionContext } from './attention.js';
import type { QuantizeSpec } from './quantize.js';
import type { LinearAttentionSpec } from './spec.js';
import type { HostTensor, TensorSource } from './tensor-source.js';
import { checkShape, packLinear, toF32, vectorF32 } from './weights.js';

/** One linear layer's state slots: conv [slots, C, K-1] and recurrent [slots, Hv, Dk, Dv], f32. */
export interface LinearLayerState {
  conv: Float32Array;
  recurrent: Float32Array;
}

/** f32 elements of one sequence's state in one linear layer: [conv, recurrent]. */
export function linearStateFloats(la: LinearAttentionSpec): [number, number] {
  const C = 2 * la.keyHeads * la.keyHeadDim + la.valueHeads * la.valueHeadDim;
  return [C * (la.convKernel - 1), la.valueHeads * la.keyHeadDim * la.valueHeadDim];
}

/** Rows of a 2-D tensor gathered in the order of `rows` (load time: de-interleaves fused projections). */
export function gatherRows(t: HostTensor, rows: number[]): HostTensor {
  const cols = t.shape[1]!;
  const out = t.dtype === 'f32' ? new Float32Array(rows.length * cols) : new Uint16Array(rows.length * cols);
  rows.forEach((r, i) => (out as Uint16Array).set((t.data as Uint16Array).subarray(r * cols, (r + 1) * cols), i * cols));
  return { dtype: t.dtype, shape: [rows.length, cols], data: out };
}

/**
 * A Gated DeltaNet layer's input projections in the order the kernels want them: qkv [C, H] (q | k | v,
 * the conv's channel order), z [Vd, H] and ba [2 Hv, H] (b | a), from Qwen3-Next's fused
 * in_proj_qkvz / in_proj_ba or Qwen3.5's split in_proj_qkv / _z / _b / _a (shapes checked).
 */
export function deltaNetInProj(la: LinearAttentionSpec, src: TensorSource, p: string, H: number):
    { qkv: HostTensor; z: HostTensor; ba: HostTensor } {
  const { keyHeads: Hk, valueHeads: Hv, keyHeadDim: Dk, valueHeadDim: Dv } = la;
  const Kd = Hk * Dk;
  const Vd = Hv * Dv;
  const r = Hv / Hk;
  if (src.has(`${p}in_proj_qkvz.weight`)) {
    // Qwen3-Next: rows grouped per key head g: [q_g (Dk), k_g (Dk), v_g (r Dv), z_g (r Dv)]; ba per g:
    // [b_g (r), a_g (r)]. Value head h = g r + j (transformers' fix_query_key_value_ordering).
    const qkvz = src.get(`${p}in_proj_qkvz.weight`);
    checkShape(`${p}in_proj_qkvz.weight`, qkvz, [2 * Kd + 2 * Vd, H]);
    const ba = src.get(`${p}in_proj_ba.weight`);
    checkShape(`${p}in_proj_ba.weight`, ba, [2 * Hv, H]);
    const G = 2 * Dk + 2 * r * Dv;
    const q: number[] = [], k: number[] = [], v: number[] = [], z: number[] = [], b: number[] = [], a: number[] = [];
    for (let g = 0; g < Hk; g++) {
      for (let i = 0; i < Dk; i++) { q.push(g * G + i); k.push(g * G + Dk + i); }
      for (let i = 0; i < r * Dv; i++) { v.push(g * G + 2 * Dk + i); z.push(g * G + 2 * Dk + r * Dv + i); }
      for (let j = 0; j < r; j++) { b.push(g * 2 * r + j); a.push(g * 2 * r + r + j); }
    }
    return { qkv: gatherRows(qkvz, [...q, ...k, ...v]), z: gatherRows(qkvz, z), ba: gatherRows(ba, [...b, ...a]) };
  }
  // Qwen3.5: in_proj_qkv [q | k | v] (the conv's channel order), in_proj_z, in_proj_b, in_proj_a.
  const get = (name: string, rows: number): HostTensor => {
    const t = src.get(`${p}${name}.weight`);
    checkShape(`${p}${name}.weight`, t, [rows, H]);
    return t;
  };
  const b = get('in_proj_b', Hv), a = get('in_proj_a', Hv);
  const ba: HostTensor = b.dtype === a.dtype
    ? { dtype: b.dtype, shape: [2 * Hv, H], data: concat(b.data, a.data) }
    : { dtype: 'f32', shape: [2 * Hv, H], data: concat(toF32(b), toF32(a)) };
  return { qkv: get('in_proj_qkv', 2 * Kd + Vd), z: get('in_proj_z', Vd), ba };
}

function concat<A extends Float32Array | Uint16Array>(x: A, y: A): A {
  const out = new (x.constructor as new (n: number) => A)(x.length + y.length);
  out.set(x, 0);
  out.set(y, x.length);
  return out;
}

function softplus(x: number): number {
  // torch.nn.functional.softplus (beta 1, threshold 20)
  return x > 20 ? x : Math.log1p(Math.exp(x));
}

export class GatedDeltaNet {
  /**
   * [q (Kd) | k (Kd) | v (Vd) | z (Vd) | b (Hv) | a (Hv), H]: one GEMM for every input projection; with
   * --quantize-dense, [q | k | v | z, H] quantized and `inProjBa` [b | a, H] beside it in its precision.
   */
  private readonly inProj: PackedWeight;
  private readonly inProjBa: PackedWeight | null;
  private readonly outProj: PackedWeight;    // [H, Vd]
  private readonly convW: Float32Array;      // [C, K]
  private readonly negA: Float32Array;       // [Hv] -exp(A_log)
  private readonly dtBias: Float32Array;     // [Hv]
  private readonly normW: Float32Array;      // [Dv]
  private readonly C: number;
  private readonly P: number;

  /** Resident bytes of the two projections (codes and scales where --quantize-dense quantized them). */
  readonly weightBytes: number;
  /** The projection weights in the order a forward reads them (for the read-ahead hints). */
  readonly projections: PackedWeight[];

  /**
   * `quantize` (--quantize-dense): in_proj's q / k / v / z rows and out_proj quantized in that format,
   * else kept in their dtype. The b / a rows stay in the checkpoint's precision (2 Hv rows, a tiny share
   * of the bytes): they set the delta rule's step size and decay, where rounding compounds over tokens.
   */
  constructor(private readonly la: LinearAttentionSpec, src: TensorSource, p: string, hidden: number,
              private readonly eps: number, quantize: QuantizeSpec | null = null) {
    const { keyHeads: Hk, valueHeads: Hv, keyHeadDim: Dk, valueHeadDim: Dv, convKernel: K } = la;
    const H = hidden;
    const Kd = Hk * Dk;
    const Vd = Hv * Dv;
    this.C = 2 * Kd + Vd;
    this.P = 2 * Kd + 2 * Vd + 2 * Hv;
    // One fused float weight: a checkpoint's int codes come as their exact dequantised values (src.get:
    // f32, so the fused weight is widened to f32), as an FP8 checkpoint's e4m3 codes do.
    const { qkv, z, ba } = deltaNetInProj(la, src, p, H);
    const parts = [qkv, z, ba];
    const same = parts.every((t) => t.dtype === parts[0]!.dtype);
    const dtype = same ? parts[0]!.dtype : 'f32';
    const all = dtype === 'f32' ? new Float32Array(this.P * H) : new Uint16Array(this.P * H);
    let off = 0;
    for (const t of parts) {
      if (same) (all as Uint16Array).set(t.data as Uint16Array, off);
      else (all as Float32Array).set(toF32(t), off);
      off += t.data.length;
    }
    const n = loadNative();
    if (quantize) {
      const Q = 2 * Kd + 2 * Vd;
      this.inProj = n.packWeight(all.subarray(0, Q * H), dtype, Q, H, quantize.format, quantize.group);
      this.inProjBa = n.packWeight(all.subarray(Q * H), dtype, 2 * Hv, H);
    } else {
      this.inProj = n.packWeight(all, dtype, this.P, H);
      this.inProjBa = null;
    }
    this.outProj = packLinear(src, `${p}out_proj.weight`, H, Vd, quantize);
    this.weightBytes = this.inProj.sizeBytes + (this.inProjBa?.sizeBytes ?? 0) + this.outProj.sizeBytes;
    this.projections = this.inProjBa ? [this.inProj, this.inProjBa, this.outProj] : [this.inProj, this.outProj];
    const cw = src.get(`${p}conv1d.weight`);
    checkShape(`${p}conv1d.weight`, cw, [this.C, 1, K]);
    this.convW = toF32(cw);
    this.negA = vectorF32(src, `${p}A_log`, Hv).map((x) => -Math.exp(x));
    this.dtBias = vectorF32(src, `${p}dt_bias`, Hv);
    this.normW = vectorF32(src, `${p}norm.weight`, Dv);
  }

  /** Allocates this layer's state for `slots` sequences (zeroed). */
  allocState(slots: number): LinearLayerState {
    const [c, s] = linearStateFloats(this.la);
    return { conv: new Float32Array(slots * c), recurrent: new Float32Array(slots * s) };
  }

  /**
   * x [T, H] -> out [T, H] for the batch's sequences; each reads and advances the state in its slot
   * (batch.stateSlots). A sequence whose first token is position 0 starts from a zero state. The
   * conv and the delta rule run as one batched native call each (chunkwise for a prefill chunk, one
   * recurrent step for a decode token); each sequence gets the bits it would get alone.
   */
  forward(ctx: AttentionContext, x: Float32Array, state: LinearLayerState, out: Float32Array): void {
    const n = loadNative();
    const { keyHeads: Hk, valueHeads: Hv, keyHeadDim: Dk, valueHeadDim: Dv, convKernel: K } = this.la;
    const T = ctx.tokens;
    const { C, P } = this;
    const Kd = Hk * Dk;
    const Vd = Hv * Dv;
    const slots = ctx.batch.stateSlots;
    if (!slots) throw new Error('this model has linear-attention layers: the batch needs stateSlots (one per sequence)');
    const S = ctx.batch.numSeqs;
    // [T, q | k | v | z | b | a] (one GEMM), or [T, q | k | v | z] and [T, b | a] (quantized q/k/v/z rows)
    const qkvzWidth = this.inProjBa ? P - 2 * Hv : P;
    const proj = ctx.scratch.f32('la.proj', T * qkvzWidth);
    n.denseGemm(x, T, this.inProj, proj, null, false, ctx.fast);
    let ba = proj;            // where b and a are: row t at t * baStride + baOffset
    let baStride = P;
    let baOffset = C + Vd;
    if (this.inProjBa) {
      ba = ctx.scratch.f32('la.ba', T * 2 * Hv);
      n.denseGemm(x, T, this.inProjBa, ba, null, false, ctx.fast);
      baStride = 2 * Hv;
      baOffset = 0;
    }
    const qkv = ctx.scratch.f32('la.qkv', T * C);              // [T, C] conv input, then its output (in place)
    const z = ctx.scratch.f32('la.z', T * Vd);                 // [T, Hv, Dv]
    const g = ctx.scratch.f32('la.g', T * Hv);                 // [T, Hv] log decay
    const beta = ctx.scratch.f32('la.beta', T * Hv);           // [T, Hv]
    for (let t = 0; t < T; t++) {
      const row = proj.subarray(t * qkvzWidth, (t + 1) * qkvzWidth);
      qkv.set(row.subarray(0, C), t * C);
      z.set(row.subarray(C, C + Vd), t * Vd);
      const b0 = t * baStride + baOffset;
      for (let h = 0; h < Hv; h++) {
        // HF: beta = sigmoid(b); g = -exp(A_log) * softplus(a + dt_bias), in f32.
        beta[t * Hv + h] = 1 / (1 + Math.exp(-ba[b0 + h]!));
        g[t * Hv + h] = this.negA[h]! * softplus(Math.fround(ba[b0 + Hv + h]! + this.dtBias[h]!));
      }
    }
    const [convFloats, recFloats] = linearStateFloats(this.la);
    const seqStarts = ctx.scratch.i32('la.seqStarts', S + 1);
    const info = ctx.batch.seqInfo;
    for (let s = 0; s < S; s++) {
      seqStarts[s] = info[s * 3]!;
      // A sequence computed from position 0 (new, or recomputed after preemption) starts from zeros.
      if (info[s * 3 + 2]! - info[s * 3 + 1]! === 0) {
        const slot = slots[s]!;
        state.conv.fill(0, slot * convFloats, (slot + 1) * convFloats);
        state.recurrent.fill(0, slot * recFloats, (slot + 1) * recFloats);
      }
    }
    seqStarts[S] = T;
    const slotView = slots.subarray(0, S);
    n.causalConv1dBatch(qkv, T, C, this.convW, null, K, state.conv, slotView, seqStarts, true, qkv);
    const core = ctx.scratch.f32('la.core', T * Vd);           // [T, Hv, Dv]
    n.gatedDeltaRuleBatch(qkv, qkv.subarray(Kd), qkv.subarray(2 * Kd), g, beta, state.recurrent, slotView, seqStarts,
      core, { T, Hk, Hv, Dk, Dv, l2normQk: true, qStride: C, kStride: C, vStride: C });
    n.gatedRmsNorm(core, z, this.normW, this.eps, T * Hv, Dv, core);
    n.denseGemm(core, T, this.outProj, out, null, false, ctx.fast);
  }

  dispose(): void {
    this.inProj.dispose();
    this.inProjBa?.dispose();
    this.outProj.dispose();
  }
}
