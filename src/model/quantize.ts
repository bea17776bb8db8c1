// --quantize: routed experts quantized at load (int8 per output row, int4 in groups, fp8 with
// 128 x 128 block scales), kept so in memory and read directly by the GEMM kernels. The router,
// norms, attention, embeddings and dense FFNs stay in the checkpoint's precision.
import type { QuantFormat } from '../native/index.js';

export interface QuantizeSpec {
  format: QuantFormat;
  /** k per scale: int8 0 (one per output row), int4 32 or 128, fp8 128 (block columns). */
  group: number;
}

export const QUANTIZE_FORMATS = ['none', 'int8', 'int4', 'fp8'] as const;

/** --quantize FORMAT with --quantize-group N (int4 only) -> spec, or null for none. */
export function quantizeSpec(format: string, group: number): QuantizeSpec | null {
  switch (format) {
    case 'none': return null;
    case 'int8': return { format: 'int8', group: 0 };
    case 'fp8': return { format: 'fp8', group: 128 };
    case 'int4':
      if (group !== 32 && group !== 128) throw new RangeError(`--quantize-group ${group}: int4 groups are 32 or 128`);
      return { format: 'int4', group };
    default:
      throw new RangeError(`--quantize '${format}' is not one of ${QUANTIZE_FORMATS.join(', ')}`);
  }
}

/**
 * Bytes a quantized weight [n, k] holds (codes and f32 scales), as the native allocation lays it
 * out (native/cpu/quant.cc alloc_quant_weight): rows padded to 16 (gate_up: each half), k to even
 * then to the group.
 */
export function quantizedBytes(q: QuantizeSpec, n: number, k: number, gateUp: boolean): number {
  const up16 = (v: number) => Math.ceil(v / 16) * 16;
  const np = gateUp ? 2 * up16(n / 2) : up16(n);
  const kEven = Math.ceil(k / 2) * 2;
  const group = q.group === 0 ? kEven : q.group;
  const kp = Math.ceil(kEven / group) * group;
  const bits = q.format === 'int4' ? 4 : 8;
  return np * kp * bits / 8 + np * (kp / group) * 4;
}

/** For logs and summaries: "int4 (groups of 32)". */
export function describeQuantize(q: QuantizeSpec): string {
  if (q.format === 'int8') return 'int8 (per output row)';
  if (q.format === 'fp8') return 'fp8 e4m3 (128 x 128 blocks)';
  return `int4 (groups of ${q.group})`;
}
