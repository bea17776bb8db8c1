// Messages between the main thread (EngineClient) and the engine worker. Plain data only.
import type { KvDtype } from '../model/kv-dtype.js';
import type { OffloadConfig } from '../offload/setup.js';
import type { ExpertCacheDelta } from '../offload/offloader.js';
import type { TraceCounts } from '../offload/trace-writer.js';
import type { EngineEvent, EngineStats, GenerateRequest, ModelInfo } from './types.js';
import type { QuantizeSpec } from '../model/quantize.js';

export interface EngineOptions {
  modelDir: string;
  computeDtype: 'f32' | 'bf16';
  /** KV cache size: blocks, or GiB when kvCacheBlocks is 0. */
  kvCacheBlocks: number;
  kvCacheGb: number;
  /** Element type of the KV cache (resolved: auto is f32 with computeDtype f32, else bf16). */
  kvCacheDtype?: KvDtype;
  blockSize: number;
  maxNumSeqs: number;
  maxNumBatchedTokens: number;
  /** 0 = all cores. */
  threads: number;
  servedModelName: string;
  /**
   * Expert parallelism in one process: ranks 1..N-1 in worker threads, each holding a slice of the
   * routed experts; the MoE layers' all2all over a loopback group (CPU) or NCCL (device ranks on
   * cuda:r). Absent or 1 = off.
   */
  expertParallel?: number;
  /** With expertParallel: the owner rank of each routed expert (--expert-placement; absent = contiguous slices). */
  expertPlacement?: number[];
  /**
   * Expert parallelism across rank processes (serve --nproc-per-node/--nnodes, --dist-moe expert):
   * this rank holds its slice of the routed experts, joins the Gloo group through the front's
   * store, and steps in lockstep with the other ranks (an empty batch when it has no work).
   */
  distExperts?: import('../dist/lockstep.js').DistExperts;
  /** 'cpu' or 'cuda:N' (resolved: never 'auto'). Absent = cpu. */
  device?: string;
  /** EPS-MoE expert kernel: auto (calibrated choice per layer and step), group or dense. */
  expertKernel?: 'auto' | 'group' | 'dense';
  /** EPS-MoE pipeline chunks per MoE layer: auto (the planner, per layer and step) or a fixed count. */
  pipelineChunks?: 'auto' | number;
  /** Expert offloading (MoE-Infinity); absent = every expert resident, no tracing. */
  offload?: OffloadConfig;
  /** Automatic prefix caching (--prefix-caching); absent = on. */
  prefixCaching?: boolean;
  /** --quantize: routed experts quantized at load (CPU engine); absent/null = checkpoint precision. */
  quantize?: QuantizeSpec | null;
}

export type ToWorker =
  | { type: 'init'; options: EngineOptions }
  | { type: 'generate'; req: GenerateRequest }
  | { type: 'abort'; id: string }
  /** Backpressure: stop stepping these requests (their client is not reading), or step them again. */
  | { type: 'pause'; ids: string[] }
  | { type: 'resume'; ids: string[] }
  | { type: 'shutdown' };

export type FromWorker =
  | { type: 'progress'; tensorsDone: number; tensorsTotal: number; bytesDone: number; bytesTotal: number }
  | { type: 'ready'; info: ModelInfo; summary: string }
  | { type: 'events'; events: EngineEvent[]; stats: EngineStats; step?: StepMetrics }
  | { type: 'fatal'; message: string; code?: string }
  /** Something the operator should see that does not stop the engine (the trace writer dropping). */
  | { type: 'warning'; message: string };

export interface StepMetrics {
  prefillTokens: number;
  decodeTokens: number;
  durationMs: number;
  preemptions: number;
  /** Per MoE layer: tokens routed to each expert this step ([moeLayers][E]). */
  expertTokens?: number[][];
  /** Time each request first scheduled in this step waited since it reached the engine (ms). */
  queueTimesMs?: number[];
  /** Prefix caching on: tokens of the sequences admitted this step, and those found cached. */
  prefixCache?: { queriedTokens: number; hitTokens: number };
  /** Expert parallelism: all2all bytes sent and seconds spent this step. */
  all2all?: { bytes: number; seconds: number; overlap: number | null; hidden?: number | null };
  /** Per MoE layer: EPS-MoE pipeline chunks and expert kernel this step. */
  layerPlans?: { chunks: number; kernel: string }[];
  /** MoE layers per expert kernel this step (EPS-MoE choice). */
  kernelChoices?: Record<string, number>;
  /** Expert cache activity this step (offloading on). */
  expertCache?: { delta: ExpertCacheDelta; occupancy: number; layerHitRate: number[] };
  /** Routing trace records written and dropped this step (--trace-dir). */
  trace?: TraceCounts;
}
