// The narrow view of a checkpoint the model builder needs: named tensors in their stored dtype.
import type { DType } from '../native/index.js';

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
}
