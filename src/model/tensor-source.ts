// The narrow view of a checkpoint the model builder needs: named tensors in their stored dtype.
import type { DType } from '../native/index.js';
import type { Fp8Weight } from './safetensors.js';

export interface HostTensor {
  dtype: DType;
  shape: number[];
  /** [prod(shape)] in dtype: Float32Array for f32, Uint16Array for bf16/f16 (zero-copy views). */
  data: Float32Array | Uint16Array;
}

export interface TensorSource {
  has(name: string): boolean;
  /** Throws an error naming the tensor when it is missing. */
  get(name: string): HostTensor;
  /** The FP8 codes and block scales of an F8_E4M3 weight, or null when it is not one (or the
   * source cannot keep FP8). */
  getFp8?(name: string): Fp8Weight | null;
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
  };
}
