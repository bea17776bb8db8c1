// --quantize's formats written from their definitions, for references: the quantize-dequantize of
// one [n, k] weight (int8 per row, int4 in groups, fp8 e4m3 in 128 x 128 blocks) as f32 values.
import type { QuantizeSpec } from '../../src/model/quantize.js';
import type { HostTensor } from '../../src/model/tensor-source.js';
import { bf16ToF32, f32ToBf16 } from '../../src/model/kv-dtype.js';
import { toF32 } from '../../src/model/weights.js';
import { e4m3, toE4m3 } from './fp8-checkpoint.js';

/**
 * Symmetric round-to-nearest-even quantize-dequantize of one [n, k] weight, per row in groups of
 * `group` (0 = the whole row), qmax 127 (int8) or 7 (int4), in f32 steps (int4: the step rounded
 * to bf16, to nearest even, before the codes are): what --quantize's per-row formats define,
 * written here from that definition.
 */
export function quantDequant(t: HostTensor, qmax: number, group: number): HostTensor {
  const [n, k] = t.shape as [number, number];
  const x = toF32(t);
  const out = new Float32Array(n * k);
  const g = group === 0 ? k : group;
  const rne = (v: number) => {
    const r = Math.round(v);
    return r - v === 0.5 && r % 2 !== 0 ? r - 1 : r;  // Math.round takes .5 up; ties go to even
  };
  for (let r = 0; r < n; r++)
    for (let c0 = 0; c0 < k; c0 += g) {
      const c1 = Math.min(k, c0 + g);
      let amax = 0;
      for (let c = c0; c < c1; c++) amax = Math.max(amax, Math.abs(x[r * k + c]!));
      const sc = qmax === 7 ? bf16ToF32(f32ToBf16(Math.fround(amax / qmax))) : Math.fround(amax / qmax);
      for (let c = c0; c < c1; c++) {
        const code = sc > 0 ? Math.max(-qmax, Math.min(qmax, rne(Math.fround(x[r * k + c]! / sc)))) : 0;
        out[r * k + c] = Math.fround(code * sc);
      }
    }
  return { dtype: 'f32', shape: t.shape, data: out };
}

/**
 * fp8 e4m3 quantize-dequantize of one [n, k] weight with a scale per `block` x `block` block
 * (absmax / 448, f32), codes the nearest e4m3 value of w / scale (ties to the even code). The
 * values are returned in float64: e4m3 value x f32 scale is exact there.
 */
export function fp8QuantDequant(t: HostTensor, block = 128): Float64Array {
  const [n, k] = t.shape as [number, number];
  const x = toF32(t);
  const nbc = Math.ceil(k / block);
  const scale = new Float32Array(Math.ceil(n / block) * nbc);
  for (let r = 0; r < n; r++)
    for (let c = 0; c < k; c++) {
      const i = Math.floor(r / block) * nbc + Math.floor(c / block);
      scale[i] = Math.max(scale[i]!, Math.abs(x[r * k + c]!));
    }
  for (let i = 0; i < scale.length; i++) scale[i] = Math.fround(scale[i]! / 448);
  const out = new Float64Array(n * k);
  for (let r = 0; r < n; r++)
    for (let c = 0; c < k; c++) {
      const sc = scale[Math.floor(r / block) * nbc + Math.floor(c / block)]!;
      out[r * k + c] = sc > 0 ? e4m3(toE4m3(Math.fround(x[r * k + c]! / sc))) * sc : 0;
    }
  return out;
}

/** The quantize-dequantize of `q`'s format (int8 per row, int4 in q.group, fp8 blocks) in float64. */
export function quantDequantF64(t: HostTensor, q: QuantizeSpec): Float64Array {
  if (q.format === 'fp8') return fp8QuantDequant(t, q.group);
  return Float64Array.from(quantDequant(t, q.format === 'int8' ? 127 : 7, q.format === 'int8' ? 0 : q.group).data as Float32Array);
}
