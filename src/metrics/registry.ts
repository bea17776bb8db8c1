// Every Prometheus metric expertd exports, in one prom-client Registry of its own.
// Names: prefix expertd_, base units (seconds, bytes), counters end in _total, ratios are 0-1, no colons.
// The server records request-level figures; the engine side calls the record*/set* methods for the rest.

import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { EngineStats } from '../engine/types.js';

export type FinishedReasonLabel = 'stop' | 'length' | 'abort' | 'error';

/** Expert-cache events of one engine step (or any interval); every field optional, all added. */
/** Routing trace records (one request in one step) written and dropped by reason, as increments. */
export interface TraceRecordDelta {
  written: number;
  dropped: Record<string, number>;
}

export interface ExpertCacheDelta {
  hits?: number;
  misses?: number;
  prefetchUsed?: number;
  prefetchWasted?: number;
  bytesLoaded?: number;
  loadStallSeconds?: number;
}

// Latency buckets in seconds: sub-millisecond CPU steps up to multi-minute CPU prefills.
const ttftBuckets = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160, 640];
const itlBuckets = [0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 10];
const requestBuckets = [0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920];
const tokenCountBuckets = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384];

export interface MetricsOptions {
  /** Also export process/Node metrics (CPU, memory, event-loop lag) under the same prefix. */
  defaultMetrics?: boolean;
}

export class Metrics {
  readonly registry = new Registry();
  private statsSource: (() => EngineStats) | null = null;
  private lastPreemptions = 0;

  // --- request level (recorded by the server) ---
  readonly requestsRunning: Gauge;
  readonly requestsWaiting: Gauge;
  readonly kvCacheUsage: Gauge;
  readonly kvCacheBytes: Gauge;
  readonly kvCacheUsedBytes: Gauge;
  readonly preemptions: Counter;
  readonly promptTokens: Counter;
  readonly generationTokens: Counter;
  readonly requestSuccess: Counter<'finished_reason'>;
  readonly httpRequests: Counter<'route' | 'status'>;
  readonly timeToFirstToken: Histogram;
  readonly interTokenLatency: Histogram;
  readonly e2eLatency: Histogram;
  // --- engine level (recorded by the engine side) ---
  readonly queueTime: Histogram;
  readonly prefillTime: Histogram;
  readonly decodeTime: Histogram;
  readonly prefillStep: Histogram;
  readonly decodeStep: Histogram;
  readonly iterationTokens: Histogram;
  readonly prefixCacheQueries: Counter;
  readonly prefixCacheHits: Counter;
  // --- MoE ---
  readonly expertTokens: Counter<'layer' | 'expert'>;
  readonly layerLoadImbalance: Gauge<'layer'>;
  readonly kernelChoice: Counter<'kernel'>;
  readonly expertCacheHits: Counter;
  readonly expertCacheMisses: Counter;
  readonly expertPrefetchUsed: Counter;
  readonly expertPrefetchWasted: Counter;
  readonly expertBytesLoaded: Counter;
  readonly expertLoadStall: Counter;
  readonly traceRecordsWritten: Counter;
  readonly traceRecordsDropped: Counter<'reason'>;
  readonly expertCacheOccupancy: Gauge;
  readonly expertCacheLayerHit: Gauge<'layer'>;
  readonly all2allBytes: Counter;
  readonly all2allSeconds: Counter;
  readonly commOverlap: Gauge;
  /** EPS-MoE: PN per MoE layer, labelled with the layer's expert kernel; the hidden all2all share. */
  readonly pipelineChunks: Gauge<'layer' | 'kernel'>;
  readonly all2allHidden: Gauge;
  // data-parallel ranks (serve --nproc-per-node / --nnodes)
  readonly rankRequests: Counter<'rank'>;
  readonly rankSequences: Gauge<'rank' | 'state'>;
  private rankStatsSource: (() => EngineStats[]) | null = null;

  constructor(options: MetricsOptions = {}) {
    const registers = [this.registry];
    if (options.defaultMetrics) collectDefaultMetrics({ register: this.registry, prefix: 'expertd_' });
    // Gauges read engine.stats() at scrape time, so they are never stale and cost nothing between scrapes.
    const self = this;
    this.requestsRunning = new Gauge({
      name: 'expertd_requests_running', help: 'Sequences in the running batch of the engine.', registers,
      collect() { const s = self.stats(); if (s) this.set(s.running); },
    });
    this.requestsWaiting = new Gauge({
      name: 'expertd_requests_waiting', help: 'Sequences waiting in the engine queue.', registers,
      collect() { const s = self.stats(); if (s) this.set(s.waiting); },
    });
    this.kvCacheUsage = new Gauge({
      name: 'expertd_kv_cache_usage_ratio', help: 'Fraction of KV cache blocks in use (0-1).', registers,
      collect() { const s = self.stats(); if (s) this.set(s.kvBlocksTotal > 0 ? s.kvBlocksUsed / s.kvBlocksTotal : 0); },
    });
    // In bytes of the cache's element type (--kv-cache-dtype): bf16 and fp8 blocks cost 1/2 and 1/4.
    this.kvCacheBytes = new Gauge({
      name: 'expertd_kv_cache_bytes', help: 'Size of the KV cache in bytes (its element type).', registers,
      collect() { const s = self.stats(); if (s?.kvBytesTotal !== undefined) this.set(s.kvBytesTotal); },
    });
    this.kvCacheUsedBytes = new Gauge({
      name: 'expertd_kv_cache_used_bytes', help: 'Bytes of the KV cache blocks in use.', registers,
      collect() { const s = self.stats(); if (s?.kvBytesUsed !== undefined) this.set(s.kvBytesUsed); },
    });
    // Hybrid models (Qwen3-Next): the state cache beside the KV cache, one slot per running sequence.
    // Registered for every model; a model without linear attention reports 0.
    new Gauge({
      name: 'expertd_state_cache_usage_ratio', registers,
      help: 'Fraction of state cache slots (per-sequence linear-attention state) in use (0-1).',
      collect() {
        const s = self.stats();
        if (s?.stateSlotsTotal) this.set((s.stateSlotsUsed ?? 0) / s.stateSlotsTotal);
      },
    });
    new Gauge({
      name: 'expertd_state_cache_bytes', help: 'Size of the state cache in bytes (f32 conv and recurrent state).', registers,
      collect() { const s = self.stats(); if (s?.stateBytesTotal !== undefined) this.set(s.stateBytesTotal); },
    });
    new Gauge({
      name: 'expertd_state_cache_used_bytes', help: 'Bytes of the state cache slots in use.', registers,
      collect() { const s = self.stats(); if (s?.stateBytesUsed !== undefined) this.set(s.stateBytesUsed); },
    });
    this.preemptions = new Counter({
      name: 'expertd_preemptions_total', help: 'Sequences preempted because KV blocks ran out.', registers,
      collect() {
        // The engine reports a running total; a counter can only grow, so add the difference.
        const s = self.stats();
        if (s && s.preemptionsTotal > self.lastPreemptions) {
          this.inc(s.preemptionsTotal - self.lastPreemptions);
          self.lastPreemptions = s.preemptionsTotal;
        }
      },
    });
    this.promptTokens = new Counter({ name: 'expertd_prompt_tokens_total', help: 'Prompt tokens processed (once per engine request).', registers });
    this.generationTokens = new Counter({ name: 'expertd_generation_tokens_total', help: 'Tokens generated and returned.', registers });
    this.requestSuccess = new Counter({
      name: 'expertd_request_success_total', help: 'Engine requests finished, by finish reason.', labelNames: ['finished_reason'], registers,
    });
    this.httpRequests = new Counter({
      name: 'expertd_http_requests_total', help: 'HTTP requests answered, by route and status code.', labelNames: ['route', 'status'], registers,
    });
    this.timeToFirstToken = new Histogram({ name: 'expertd_time_to_first_token_seconds', help: 'Time from request arrival to its first generated token.', buckets: ttftBuckets, registers });
    this.interTokenLatency = new Histogram({ name: 'expertd_inter_token_latency_seconds', help: 'Time between consecutive generated tokens of a request.', buckets: itlBuckets, registers });
    this.e2eLatency = new Histogram({ name: 'expertd_e2e_request_latency_seconds', help: 'Time from request arrival to its last token.', buckets: requestBuckets, registers });
    this.queueTime = new Histogram({ name: 'expertd_request_queue_time_seconds', help: 'Time a request waited in the engine queue before its first step.', buckets: requestBuckets, registers });
    // Per sequence (one engine request: an n > 1 request counts n times), as vLLM defines them.
    this.prefillTime = new Histogram({
      name: 'expertd_request_prefill_time_seconds', buckets: requestBuckets, registers,
      help: 'Per finished sequence: time from its first scheduling to its first generated token (prefill, chunks and preemptions included).',
    });
    this.decodeTime = new Histogram({
      name: 'expertd_request_decode_time_seconds', buckets: requestBuckets, registers,
      help: 'Per finished sequence: time from its first generated token to its last (decode).',
    });
    this.prefillStep = new Histogram({
      name: 'expertd_prefill_step_seconds', buckets: ttftBuckets, registers,
      help: 'Duration of each engine step that processed prompt tokens (steps mixing prefill and decode count here).',
    });
    this.decodeStep = new Histogram({ name: 'expertd_decode_step_seconds', help: 'Duration of each decode-only engine step.', buckets: itlBuckets, registers });
    this.iterationTokens = new Histogram({ name: 'expertd_iteration_tokens', help: 'Tokens processed per engine step (prefill + decode).', buckets: tokenCountBuckets, registers });
    // vLLM's pair: the hit rate is hits / queries.
    this.prefixCacheQueries = new Counter({
      name: 'expertd_prefix_cache_queries_total', registers,
      help: 'Tokens looked up in the prefix cache: every token of each sequence admitted without K/V (again after a preemption).',
    });
    this.prefixCacheHits = new Counter({
      name: 'expertd_prefix_cache_hits_total', registers,
      help: 'Tokens of those found in the prefix cache (their K/V reused, not computed).',
    });

    this.expertTokens = new Counter({
      name: 'expertd_expert_tokens_total', help: 'Tokens routed to each expert of each MoE layer.', labelNames: ['layer', 'expert'], registers,
    });
    this.layerLoadImbalance = new Gauge({
      name: 'expertd_moe_load_imbalance', help: 'Per MoE layer, max over mean tokens per expert in the last step (1 = balanced).', labelNames: ['layer'], registers,
    });
    this.kernelChoice = new Counter({
      name: 'expertd_moe_kernel_choice_total', help: 'Expert GEMM kernel chosen by the planner, per layer-step.', labelNames: ['kernel'], registers,
    });
    this.expertCacheHits = new Counter({ name: 'expertd_expert_cache_hits_total', help: 'Expert lookups served by the fast tier.', registers });
    this.expertCacheMisses = new Counter({ name: 'expertd_expert_cache_misses_total', help: 'Expert lookups that had to load from the slow tier on demand.', registers });
    this.expertPrefetchUsed = new Counter({ name: 'expertd_expert_prefetch_used_total', help: 'Prefetched experts that were used before eviction.', registers });
    this.expertPrefetchWasted = new Counter({ name: 'expertd_expert_prefetch_wasted_total', help: 'Prefetched experts evicted without being used.', registers });
    this.expertBytesLoaded = new Counter({ name: 'expertd_expert_loaded_bytes_total', help: 'Bytes of expert weights copied into the fast tier.', registers });
    this.expertLoadStall = new Counter({ name: 'expertd_expert_load_stall_seconds_total', help: 'Time compute waited for expert weights to arrive.', registers });
    this.traceRecordsWritten = new Counter({ name: 'expertd_trace_records_written_total', help: 'Routing trace records (one request in one step) written under --trace-dir.', registers });
    this.traceRecordsDropped = new Counter({ name: 'expertd_trace_records_dropped_total', help: 'Routing trace records not written: sampled_out (--trace-sample), queue_full (the writer fell behind), too_large (a line over --trace-max-file-mb), write_error.', labelNames: ['reason'], registers });
    this.expertCacheOccupancy = new Gauge({ name: 'expertd_expert_cache_occupancy_ratio', help: 'Fraction of expert cache slots holding an expert (0-1).', registers });
    this.expertCacheLayerHit = new Gauge({ name: 'expertd_expert_cache_layer_hit_ratio', help: 'Expert cache hits / accesses per MoE layer since start (0-1).', labelNames: ['layer'], registers });
    this.all2allBytes = new Counter({ name: 'expertd_all2all_bytes_total', help: 'Bytes sent by all2all (dispatch + combine).', registers });
    this.all2allSeconds = new Counter({ name: 'expertd_all2all_seconds_total', help: 'Time spent in all2all.', registers });
    this.commOverlap = new Gauge({ name: 'expertd_comm_overlap_ratio', help: 'Fraction of all2all time hidden behind compute in the last step (0-1).', registers });
    this.pipelineChunks = new Gauge({ name: 'expertd_moe_pipeline_chunks', help: 'EPS-MoE pipeline chunks (PN) of each MoE layer in the last step, labelled with its expert kernel.', labelNames: ['layer', 'kernel'], registers });
    this.all2allHidden = new Gauge({ name: 'expertd_all2all_hidden_ratio', help: 'Share of all2all time in the last step that the engine did not wait for (0-1).', registers });
    this.rankRequests = new Counter({
      name: 'expertd_rank_requests_total', help: 'Engine requests the front sent to each data-parallel rank.', labelNames: ['rank'], registers,
    });
    this.rankSequences = new Gauge({
      name: 'expertd_rank_sequences', help: 'Sequences running or waiting on each data-parallel rank.', labelNames: ['rank', 'state'], registers,
      collect() {
        let all: EngineStats[] | null = null;
        try { all = self.rankStatsSource?.() ?? null; } catch { all = null; }
        all?.forEach((s, rank) => {
          this.set({ rank: String(rank), state: 'running' }, s.running);
          this.set({ rank: String(rank), state: 'waiting' }, s.waiting);
        });
      },
    });
  }

  /** Per-rank figures of a data-parallel group, read at scrape time. */
  bindRankStats(source: () => EngineStats[]): void {
    this.rankStatsSource = source;
  }

  recordRankRequest(rank: number): void {
    this.rankRequests.inc({ rank: String(rank) });
  }

  /** Gauges of running/waiting/KV usage and the preemption counter read this at scrape time. */
  bindEngineStats(source: () => EngineStats): void {
    this.statsSource = source;
  }

  private stats(): EngineStats | null {
    if (!this.statsSource) return null;
    try {
      return this.statsSource();
    } catch {
      return null; // a scrape must never fail because the engine is down
    }
  }

  /** Prometheus text exposition. */
  async text(): Promise<string> {
    return this.registry.metrics();
  }

  get contentType(): string {
    return this.registry.contentType;
  }

  // ---- called by the server ----
  recordFinished(reason: FinishedReasonLabel): void {
    this.requestSuccess.inc({ finished_reason: reason });
  }

  // ---- called by the engine side ----
  recordQueueTime(seconds: number): void { this.queueTime.observe(seconds); }
  /** One finished sequence that generated at least one token: its prefill and decode phases. */
  recordRequestPhases(prefillSeconds: number, decodeSeconds: number): void {
    this.prefillTime.observe(prefillSeconds);
    this.decodeTime.observe(decodeSeconds);
  }
  recordPrefillStep(seconds: number): void { this.prefillStep.observe(seconds); }
  recordDecodeStep(seconds: number): void { this.decodeStep.observe(seconds); }
  recordIterationTokens(tokens: number): void { this.iterationTokens.observe(tokens); }
  recordPrefixCache(queriedTokens: number, hitTokens: number): void {
    if (queriedTokens > 0) this.prefixCacheQueries.inc(queriedTokens);
    if (hitTokens > 0) this.prefixCacheHits.inc(hitTokens);
  }

  /** counts[expert] = tokens routed to that expert in this layer; also updates the layer's imbalance. */
  recordExpertTokens(layer: number, counts: ArrayLike<number>): void {
    let sum = 0;
    let max = 0;
    for (let e = 0; e < counts.length; e++) {
      const c = counts[e]!;
      if (c > 0) this.expertTokens.inc({ layer: String(layer), expert: String(e) }, c);
      sum += c;
      if (c > max) max = c;
    }
    if (sum > 0) this.layerLoadImbalance.set({ layer: String(layer) }, max / (sum / counts.length));
  }

  setLayerLoadImbalance(layer: number, maxOverMean: number): void {
    this.layerLoadImbalance.set({ layer: String(layer) }, maxOverMean);
  }

  recordKernelChoice(kernel: string, count = 1): void {
    this.kernelChoice.inc({ kernel }, count);
  }

  recordExpertCache(delta: ExpertCacheDelta): void {
    if (delta.hits) this.expertCacheHits.inc(delta.hits);
    if (delta.misses) this.expertCacheMisses.inc(delta.misses);
    if (delta.prefetchUsed) this.expertPrefetchUsed.inc(delta.prefetchUsed);
    if (delta.prefetchWasted) this.expertPrefetchWasted.inc(delta.prefetchWasted);
    if (delta.bytesLoaded) this.expertBytesLoaded.inc(delta.bytesLoaded);
    if (delta.loadStallSeconds) this.expertLoadStall.inc(delta.loadStallSeconds);
  }

  recordTrace(delta: TraceRecordDelta): void {
    if (delta.written) this.traceRecordsWritten.inc(delta.written);
    for (const [reason, n] of Object.entries(delta.dropped)) if (n) this.traceRecordsDropped.inc({ reason }, n);
  }

  setExpertCacheOccupancy(ratio: number): void {
    this.expertCacheOccupancy.set(ratio);
  }

  /** Per MoE layer hits / (hits + misses) since start (layers never accessed are skipped). */
  setExpertCacheLayerHitRatio(layerHitRate: readonly number[]): void {
    layerHitRate.forEach((r, layer) => { if (Number.isFinite(r)) this.expertCacheLayerHit.set({ layer: String(layer) }, r); });
  }

  recordAll2all(bytes: number, seconds: number): void {
    if (bytes > 0) this.all2allBytes.inc(bytes);
    if (seconds > 0) this.all2allSeconds.inc(seconds);
  }

  setCommOverlap(ratio: number): void {
    this.commOverlap.set(ratio);
  }

  setLayerPlans(plans: readonly { chunks: number; kernel: string }[], hidden: number | null | undefined): void {
    this.pipelineChunks.reset();
    plans.forEach((p, layer) => this.pipelineChunks.set({ layer: String(layer), kernel: p.kernel }, p.chunks));
    if (hidden !== null && hidden !== undefined) this.all2allHidden.set(hidden);
  }
}

export function createMetrics(options: MetricsOptions = {}): Metrics {
  return new Metrics(options);
}
