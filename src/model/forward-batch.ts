// One forward step's input: several sequences' new tokens (prefill chunks and decode tokens mixed)
// over the paged KV cache, and the per-step scratch shared by the layers.
import type { SampleBatchArgs, SampleBatchOut } from '../native/types.js';
import type { KvDtype } from './kv-dtype.js';

export interface ForwardBatch {
  /** [T] new tokens of all sequences, sequence after sequence. */
  tokenIds: Int32Array;
  /** [T] absolute position of each token in its sequence. */
  positions: Int32Array;
  numSeqs: number;
  /** [numSeqs, 3] (qStart, qLen, ctxLen): rows of the batch and tokens in cache after this step. */
  seqInfo: Int32Array;
  /** [numSeqs, maxBlocks] physical KV blocks of each sequence. */
  blockTables: Int32Array;
  maxBlocks: number;
  /** [T] KV cache slot (block * blockSize + offset) for each new token. */
  slots: Int32Array;
  /**
   * [numSeqs] each sequence's state slot (models with linear-attention layers; absent otherwise): the
   * slot's state is reset where the sequence's first token this step is position 0.
   */
  stateSlots?: Int32Array;
  /** Rows whose logits are wanted (usually the last token of each sampling sequence). */
  logitRows: Int32Array;
  /**
   * The engine samples on the device (ForwardModel.sampleLogits): the model keeps the logits there
   * and returns an empty `logits`.
   */
  logitsOnDevice?: boolean;
  /**
   * A buffer the model may write the logits into (at least logitRows.length * vocab floats) instead
   * of allocating them every step: the result's logits are then a view of it, overwritten by the next
   * forward given the same buffer. Absent: a fresh array per forward.
   */
  logitsOut?: Float32Array;
}

export interface ForwardResult {
  /** [logitRows.length, vocab] */
  logits: Float32Array;
  /** Per MoE layer (in order): [T, k] chosen expert ids, best first. */
  routedIds: Int32Array[];
}

/** Grow-only float arena: returns views of at least n elements without reallocating per step. */
export class Scratch {
  private readonly bufs = new Map<string, Float32Array>();
  private readonly ibufs = new Map<string, Int32Array>();

  f32(name: string, n: number): Float32Array {
    let b = this.bufs.get(name);
    if (!b || b.length < n) {
      b = new Float32Array(Math.max(n, Math.ceil((b?.length ?? 0) * 1.5)));
      this.bufs.set(name, b);
    }
    return b.subarray(0, n);
  }

  i32(name: string, n: number): Int32Array {
    let b = this.ibufs.get(name);
    if (!b || b.length < n) {
      b = new Int32Array(Math.max(n, Math.ceil((b?.length ?? 0) * 1.5)));
      this.ibufs.set(name, b);
    }
    return b.subarray(0, n);
  }
}

/**
 * What the engine drives: the CPU model (MoeModel) and the device model (CudaModel) both. C is the
 * model's KV cache (host arrays or device buffers), opaque to the engine.
 */
export interface ForwardModel<C = unknown> {
  readonly spec: import('./spec.js').ModelSpec;
  /** 'cpu' or 'cuda:N'. */
  readonly device: string;
  /** KV caches: one per attention (two per LongCat-Flash layer). */
  readonly numCaches: number;
  readonly numMoeLayers: number;
  /** Elements per token per cache: [k, v] (of the cache dtype). */
  cacheFloatsPerToken(): [number, number];
  /** KV heads per cache row (1 for MLA's latent): fp8 keeps one scale per kv head. */
  cacheKvHeads(): number;
  /** The cache dtypes this model's attention kernels read. */
  readonly kvDtypes: readonly KvDtype[];
  allocateKvCache(numBlocks: number, blockSize: number, dtype?: KvDtype): C;
  /**
   * Hybrid models (linear attention): bytes of one sequence's state over all layers, and the
   * allocation of `slots` of them (ForwardBatch.stateSlots index them). Absent or 0: no state.
   */
  readonly stateBytesPerSlot?: number;
  allocateStateCache?(slots: number): void;
  forward(batch: ForwardBatch, cache: C, blockSize: number): ForwardResult;
  /**
   * Samples the last forward's logits rows where they are (a forward with logitsOnDevice): the
   * batched sampler's arguments (src/engine/batch-sampler.ts); only ids and logprobs come back.
   * Absent: the model returns its logits to the host.
   */
  sampleLogits?(rows: number, batch: SampleBatchArgs, out: SampleBatchOut): void;
  /** EPS-MoE kernel choice ('auto' calibrates where the model supports it). */
  setExpertKernel(mode: 'auto' | 'group' | 'dense'): void;
  /** Kernel choices of the last step: kernel -> MoE layers that used it. */
  kernelChoices(): Record<string, number>;
  /** EPS-MoE pipeline chunks per MoE layer (models that pipeline): 'auto' or a fixed count. */
  setPipelineChunks?(mode: 'auto' | number): void;
  /** Per MoE layer, the pipeline chunks and expert kernel of the last step (models that pipeline). */
  layerPlans?(): { chunks: number; kernel: string }[];
  /**
   * Expert parallelism: all2all bytes sent and seconds spent since the last call, the overlap ratio,
   * and the hidden share of the all2all time (absent or null: not measured).
   */
  takeCommDelta?(): { bytes: number; seconds: number; overlap: number | null; hidden?: number | null } | null;
  dispose(): void;
}
