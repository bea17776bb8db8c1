// The narrow view of a checkpoint the model builder needs: named tensors in their stored dtype.
import type { DType } from '../native/index.js';
import type { Fp8Weight } from './safetensors.js';

export interface HostTensor {
  dtype: DType;
  shape: number[];
  /** [prod(shape)] in dtype: Float32Array for f32, Uint16Array for bf16/f16 (zero-copy views). */
  data: Float32Array | Uint16Array;
}

/** An int8 / int4 weight [rows, cols] quantized elsewhere: value = codes[r, c] * scales[r, group of c]. */
export interface IntWeight {
  bits: 4 | 8;
  /** [rows, cols] signed values (4-bit: -8..7). */
  codes: Int8Array;
  /** [rows, ceil(cols / group)] f32 (group 0: [rows], one per output row). */
  scales: Float32Array;
  rows: number;
  cols: number;
  /** k per scale: 0 for one per row (int8), else 32 or 128 (int4). */
  group: number;
  /**
   * The dtype the scales were stored in (every value exact in it): an int4 weight keeps them so in
   * memory (bf16 / f16: half the bytes of f32). Absent: f32.
   */
  scaleDtype?: ScaleDtype;
  /**
   * Zero points (AWQ, GPTQ sym false, compressed-tensors symmetric false), laid out as the scales:
   * value = (code - zero) * scale. Absent: symmetric, value = code * scale.
   */
  zeros?: Int8Array;
  /**
   * Act-order (GPTQ desc_act with a permuted g_idx): column j of codes is input perm[j], the columns
   * ordered so that each scale group is contiguous. Absent: the natural order.
   */
  perm?: Int32Array;
}

/** How a quantized weight holds its scales. */
export type ScaleDtype = DType;

export interface TensorSource {
  has(name: string): boolean;
  /** Throws an error naming the tensor when it is missing. */
  get(name: string): HostTensor;
  /** The FP8 codes and block scales of an F8_E4M3 weight, or null when it is not one (or the
   * source cannot keep FP8). */
  getFp8?(name: string): Fp8Weight | null;
  /** The codes and scales of a Linear weight stored as compressed-tensors int8 / int4 (`name` is the
   * logical `X.weight`), or null when it is not one (or the source cannot keep them). */
  getInt?(name: string): IntWeight | null;
  /** A U8 tensor as stored (MXFP4 blocks and e8m0 scales); throws naming a tensor of another dtype. */
  getU8?(name: string): { shape: number[]; data: Uint8Array };
}

/**
 * A source whose decoder tensors live under another prefix (Qwen3.5's model.language_model.*): the
 * model asks for model.X and gets `prefix`X; other names (lm_head.weight) pass through.
 */
export function withWeightPrefix(src: TensorSource, prefix: string | undefined): TensorSource {
  if (!prefix || prefix === 'model.') return src;
  const map = (name: string) => (name.startsWith('model.') ? prefix + name.slice('model.'.length) : name);
  return {
    has: (name) => src.has(map(name)),
    get: (name) => src.get(map(name)),
    ...(src.getFp8 ? { getFp8: (name: string) => src.getFp8!(map(name)) } : {}),
    ...(src.getInt ? { getInt: (name: string) => src.getInt!(map(name)) } : {}),
  };
}
