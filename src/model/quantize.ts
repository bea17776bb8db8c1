// --quantize: routed experts quantized at load (int8 per output row, int4 in groups, fp8 with
// 128 x 128 block scales), kept so in memory and read directly by the GEMM kernels; with
// --quantize-dense the attention projections, dense FFNs and shared experts too, with
// --quantize-lm-head the LM head (a quantized copy of tied embeddings). The router, norms and the
// embedding lookup stay in the checkpoint's precision.
import type { DType, QuantFormat } from '../native/index.js';

export interface QuantizeSpec {
  format: QuantFormat;
  /** k per scale: int8 0 (one per output row), int4 32 or 128, fp8 128 (block columns). */
  group: number;
  /** --quantize-dense: attention projections, dense FFNs and shared experts quantized too. */
  dense?: boolean;
  /** --quantize-lm-head: the LM head quantized too (tied embeddings: a quantized copy; the lookup keeps the table). */
  lmHead?: boolean;
}

export const QUANTIZE_FORMATS = ['none', 'int8', 'int4', 'fp8'] as const;

/**
 * --quantize FORMAT with --quantize-group N (int4 only), --quantize-dense and --quantize-lm-head ->
 * spec, or null for none.
 */
export function quantizeSpec(format: string, group: number, dense = false, lmHead = false): QuantizeSpec | null {
  let q: QuantizeSpec;
  switch (format) {
    case 'none':
      if (dense) throw new RangeError('--quantize-dense needs --quantize int8, int4 or fp8 (it quantizes the dense weights in that format)');
      if (lmHead) throw new RangeError('--quantize-lm-head needs --quantize int8, int4 or fp8 (it quantizes the LM head in that format)');
      return null;
    case 'int8': q = { format: 'int8', group: 0 }; break;
    case 'fp8': q = { format: 'fp8', group: 128 }; break;
    case 'int4':
      if (group !== 32 && group !== 128) throw new RangeError(`--quantize-group ${group}: int4 groups are 32 or 128`);
      q = { format: 'int4', group };
      break;
    default:
      throw new RangeError(`--quantize '${format}' is not one of ${QUANTIZE_FORMATS.join(', ')}`);
  }
  return { ...q, ...(dense ? { dense: true } : {}), ...(lmHead ? { lmHead: true } : {}) };
}

/** The spec for the dense weights (attention, dense FFNs, shared experts): q with --quantize-dense, else null. */
export function denseQuantize(q: QuantizeSpec | null | undefined): QuantizeSpec | null {
  return q?.dense ? q : null;
}

/**
 * Bytes a quantized weight [n, k] holds (codes and scales: scaleDtype, by default --quantize's: bf16
 * for int4, f32 otherwise), as the native allocation lays it out (native/cpu/quant.cc alloc_quant_weight): rows padded to 16
 * (gate_up: each half), k to even then to the group.
 */
export function quantizedBytes(q: QuantizeSpec, n: number, k: number, gateUp: boolean,
                               scaleDtype: DType = q.format === 'int4' ? 'bf16' : 'f32', zeros = false): number {
  const up16 = (v: number) => Math.ceil(v / 16) * 16;
  const np = gateUp ? 2 * up16(n / 2) : up16(n);
  const kEven = Math.ceil(k / 2) * 2;
  const group = q.group === 0 ? kEven : q.group;
  const kp = Math.ceil(kEven / group) * group;
  const bits = q.format === 'int4' ? 4 : 8;
  // Zero points (AWQ, asymmetric GPTQ): one byte per row and group beside the scale.
  return np * kp * bits / 8 + np * (kp / group) * ((scaleDtype === 'f32' ? 4 : 2) + (zeros ? 1 : 0));
}

/** The spec for the LM head: q with --quantize-lm-head, else null. */
export function lmHeadQuantize(q: QuantizeSpec | null | undefined): QuantizeSpec | null {
  return q?.lmHead ? q : null;
}

/** For logs and summaries: "int4 (groups of 32)". */
export function describeQuantize(q: QuantizeSpec): string {
  const f = q.format === 'int8' ? 'int8 (per output row)' : q.format === 'fp8' ? 'fp8 e4m3 (128 x 128 blocks)'
    : `int4 (groups of ${q.group})`;
  const also = [q.dense ? 'dense weights' : '', q.lmHead ? 'LM head' : ''].filter(Boolean);
  return also.length ? `${f}, ${also.join(' and ')} too` : f;
}

/** Rank identity and cache keys: 'int8/0', 'int4/32/dense', 'fp8/128/dense/lm_head'. */
export function quantizeKey(q: QuantizeSpec | null | undefined): string {
  return q ? `${q.format}/${q.group}${q.dense ? '/dense' : ''}${q.lmHead ? '/lm_head' : ''}` : 'none';
}
