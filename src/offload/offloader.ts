// The offloader: MoE-Infinity's pieces as MoeHooks. onRouted updates the running requests' EAMs
// (and the trace); ensureResident loads the layer's missing experts on demand at top priority
// (pinned until the next layer), waits for them and for prefetched ones still in flight, binds the
// slots into the layer's ExpertTable, then submits the coming layers' likely experts by priority
// within an in-flight byte window (they load on the store's copy thread while the following layers
// compute). Offloading never changes the numbers.
import type { PackedWeight } from '../native/index.js';
import type { MoeHooks } from '../moe/moe-layer.js';
import type { MoeModel } from '../model/model.js';
import { EamCollection } from './eam-collection.js';
import { ExpertCache, slotsFor, type EvictionPolicy } from './expert-cache.js';
import type { ExpertStore, SlotWeights } from './expert-store.js';
import { planPrefetch } from './prefetcher.js';
import { ActivationTracker, type BatchCombine, type StepRows } from './predictor.js';
import { sparseCounts, type TraceRequestStep } from './trace-file.js';
import { TraceWriter, type TraceCounts, type TraceWriterOptions } from './trace-writer.js';

export interface OffloaderOptions {
  numLayers: number;  // MoE layers
  numExperts: number;
  topK: number;
  policy: EvictionPolicy;
  /** Cache size: a byte budget (--expert-cache-gb), else a fraction of all experts, else all. */
  budgetBytes?: number;
  fraction?: number;
  /**
   * Prefetch the coming layers (default: with the 'eam' policy when the store overlaps compute;
   * off for the baselines and for synchronous tiers, where a prefetch is one more stall).
   */
  prefetch?: boolean;
  /** Bytes of prefetches in flight at most (default: 2 x topK experts). */
  prefetchWindowBytes?: number;
  /**
   * Experts predicted below this probability are not prefetched (default 0.05: on the structured
   * replay traces 1e-3 doubled the wasted loads at 50% capacity for +0.1 points of hit rate).
   */
  prefetchMinProbability?: number;
  combine?: BatchCombine;
  protectLayers?: number;
  collection?: EamCollection;
  /** Folder of the persisted EAM collection and the routing trace (--trace-dir). */
  traceDir?: string;
  /** Model identity checked when the collection reloads. */
  modelId?: string;
  /** Finished requests' EAMs kept at most (--eam-capacity, default 1000). */
  eamCapacity?: number;
  /** The trace writer's bounds, sampling and warnings (--trace-max-file-mb, --trace-max-files, --trace-sample). */
  trace?: TraceWriterOptions;
}

/** What the metrics registry's recordExpertCache takes (an interval's increments). */
export interface ExpertCacheDelta {
  hits: number;
  misses: number;
  prefetchUsed: number;
  prefetchWasted: number;
  bytesLoaded: number;
  loadStallSeconds: number;
}

export interface OffloadStats extends ExpertCacheDelta {
  policy: EvictionPolicy;
  slots: number;
  totalExperts: number;
  occupancy: number;
  hitRate: number;
  prefetchLoads: number;
  demandLoads: number;
  /** Prefetches dropped before they started (their slot was needed for something better). */
  prefetchCancelled: number;
  /** Hits on a prefetch still in flight (the engine waited for the rest of its load). */
  prefetchLate: number;
  /** [L] hits / (hits + misses) per MoE layer (NaN where never accessed). */
  layerHitRate: number[];
  collectionSize: number;
}

/** What the cache binds slots into: one MoE layer's expert table (CPU ExpertTable, CudaExpertTable). */
export interface SlotTable<W> {
  set(expert: number, gateUp: W, down: W): void;
  clear(expert: number): void;
}

/**
 * W is the slot weight type: PackedWeight on the CPU (slots filled from the checkpoint file), CudaBuffer
 * on a GPU (slots in device memory filled from pinned host memory on a copy stream).
 */
export class Offloader<W extends { dispose(): void } = PackedWeight> implements MoeHooks<SlotTable<W>> {
  readonly cache: ExpertCache;
  readonly tracker: ActivationTracker;
  readonly collection: EamCollection;
  private readonly slots: SlotWeights<W>[];
  /** [numSlots] ticket of the load into each slot not yet waited for (0: none; the slot is bound). */
  private readonly slotTicket: number[];
  private tables: SlotTable<W>[] = [];
  private readonly prefetch: boolean;
  private readonly windowBytes: number;
  private readonly trace: TraceWriter | null;
  private stepIndex = 0;
  private saving: Promise<void> | null = null;
  private stepRows: StepRows[] = [];
  /** [requests in step] per-request [L, E] counts of the step being traced. */
  private stepCounts: Float32Array[] = [];
  private finishedThisStep: string[] = [];
  private readonly totals: ExpertCacheDelta = { hits: 0, misses: 0, prefetchUsed: 0, prefetchWasted: 0, bytesLoaded: 0, loadStallSeconds: 0 };
  private reported: ExpertCacheDelta = { ...this.totals };
  prefetchLoads = 0;
  demandLoads = 0;
  prefetchCancelled = 0;
  prefetchLate = 0;

  constructor(readonly store: ExpertStore<W>, readonly opts: OffloaderOptions) {
    const { numLayers: L, numExperts: E } = opts;
    const numSlots = slotsFor({ numLayers: L, numExperts: E, expertBytes: store.slotBytes,
      ...(opts.budgetBytes !== undefined ? { budgetBytes: opts.budgetBytes } : {}),
      ...(opts.fraction !== undefined ? { fraction: opts.fraction } : {}) });
    this.collection = opts.collection ?? (opts.traceDir
      ? EamCollection.load(opts.traceDir, L, E, {
        ...(opts.modelId ? { model: opts.modelId } : {}), ...(opts.eamCapacity ? { capacity: opts.eamCapacity } : {}),
      })
      : new EamCollection(L, E, opts.eamCapacity, opts.modelId));
    this.tracker = new ActivationTracker(this.collection, opts.combine ?? 'sum');
    this.cache = new ExpertCache({
      numSlots, numLayers: L, numExperts: E, policy: opts.policy, prediction: this.tracker.prediction,
      ...(opts.protectLayers !== undefined ? { protectLayers: opts.protectLayers } : {}),
    });
    this.slots = Array.from({ length: numSlots }, () => ({ gateUp: null, down: null }));
    this.slotTicket = new Array<number>(numSlots).fill(0);
    this.prefetch = opts.prefetch ?? (opts.policy === 'eam' && store.overlapsCompute);
    this.windowBytes = opts.prefetchWindowBytes ?? 2 * opts.topK * store.expertBytes;
    this.trace = opts.traceDir
      ? new TraceWriter(opts.traceDir, { numLayers: L, numExperts: E, topK: opts.topK, model: opts.modelId ?? `${L}x${E}` }, opts.trace)
      : null;
  }

  /** Model option: no expert is packed at load, the cache fills on demand. */
  readonly loadExpert = (): boolean => false;

  /** Binds to a model loaded with `loadExpert`: takes its MoE layers' tables and becomes its hooks. */
  attach(this: Offloader<PackedWeight>, model: MoeModel): void {
    this.attachTables(model.moeLayers.map((m) => m.weights.experts));
    model.hooks = this;
  }

  /** The per-MoE-layer expert tables the cache binds its slots into. */
  attachTables(tables: SlotTable<W>[]): void {
    if (tables.length !== this.opts.numLayers)
      throw new RangeError(`got ${tables.length} expert tables, the offloader was made for ${this.opts.numLayers} MoE layers`);
    this.tables = tables;
  }

  /** The coming step's rows by request, in batch order (the engine calls this before forward). */
  beginStep(rows: StepRows[]): void {
    this.stepRows = rows;
    this.tracker.beginStep(rows);
    if (this.trace) this.stepCounts = rows.map(() => new Float32Array(this.opts.numLayers * this.opts.numExperts));
  }

  endStep(): void {
    if (this.stepRows.length === 0 && this.stepCounts.length === 0) return;
    this.tracker.endStep();
    this.cache.unpinAll();
    if (this.trace) {
      const { numLayers: L, numExperts: E } = this.opts;
      const requests: TraceRequestStep[] = this.stepRows.map((r, i) => ({ id: r.id, layers: sparseCounts(this.stepCounts[i]!, L, E) }));
      this.trace.append({ step: this.stepIndex, requests, ...(this.finishedThisStep.length ? { finished: this.finishedThisStep } : {}) });
    }
    this.finishedThisStep = [];
    this.stepRows = [];
    this.stepCounts = [];
    this.stepIndex++;
  }

  /** A request finished normally: its EAM joins the collection. */
  finishRequest(id: string): void {
    this.tracker.finish(id);
    this.finishedThisStep.push(id);
  }

  /** A request was aborted or failed: forget it. */
  dropRequest(id: string): void {
    this.tracker.drop(id);
    this.finishedThisStep.push(id);
  }

  onRouted(moeLayer: number, ids: Int32Array, _counts: Int32Array, tokens: number): void {
    const k = this.opts.topK;
    if (this.stepRows.length === 0) this.beginStep([{ id: '', rows: tokens }]);
    this.tracker.onRouted(moeLayer, ids, k, tokens);
    if (this.trace) {
      const E = this.opts.numExperts;
      let row = 0;
      this.stepRows.forEach((r, i) => {
        const c = this.stepCounts[i]!;
        for (let j = row * k; j < Math.min(row + r.rows, tokens) * k; j++) {
          const e = ids[j]!;
          if (e >= 0 && e < E) c[moeLayer * E + e]! += 1;
        }
        row += r.rows;
      });
    }
  }

  ensureResident(moeLayer: number, counts: Int32Array, table: SlotTable<W>): void {
    const { cache } = this;
    const E = this.opts.numExperts;
    if (this.tables.length === 0) throw new Error('Offloader.ensureResident before attach(model)');
    if (table !== this.tables[moeLayer]) throw new Error(`MoE layer ${moeLayer} passed a table the offloader was not attached to`);
    cache.beginLayer(moeLayer);
    const before = { used: cache.prefetchUsed, wasted: cache.prefetchWasted };
    // Hits first, so that they are pinned before any miss picks a victim.
    const missing: number[] = [];
    const awaiting: number[] = []; // slots whose loads must finish before the layer computes
    for (let e = 0; e < E; e++) {
      if (counts[e]! <= 0) continue;
      const s = cache.access(moeLayer, e);
      if (s < 0) {
        missing.push(e);
        continue;
      }
      this.totals.hits++;
      if (this.slotTicket[s]) awaiting.push(s);
    }
    if (missing.length || awaiting.length) {
      const t0 = performance.now();
      for (const s of awaiting) if (!this.store.done(this.slotTicket[s]!)) this.prefetchLate++;
      // Every demand load is queued at top priority before the first wait, so the copy thread
      // goes from one to the next without a round trip through this thread.
      for (const e of missing) {
        awaiting.push(this.fill(moeLayer, e, false, Infinity));
        this.totals.misses++;
        this.demandLoads++;
      }
      for (const s of awaiting) this.settle(s);
      // Time this thread spent blocked on loads (all of a synchronous tier's load time).
      this.totals.loadStallSeconds += (performance.now() - t0) / 1000;
    }
    if (this.prefetch) {
      const t0 = performance.now();
      this.prefetchAfter(moeLayer);
      if (!this.store.overlapsCompute) this.totals.loadStallSeconds += (performance.now() - t0) / 1000;
    }
    this.totals.prefetchUsed += cache.prefetchUsed - before.used;
    this.totals.prefetchWasted += cache.prefetchWasted - before.wasted;
  }

  private prefetchAfter(cur: number): void {
    const { cache, store } = this;
    // The window counts loads in flight, the demand loads just waited for excluded (done).
    const free = this.windowBytes - store.inFlight * store.expertBytes;
    if (free < store.expertBytes) return;
    const plan = planPrefetch(cache, this.tracker.prediction, cur, free, store.expertBytes, this.opts.prefetchMinProbability ?? 0.05);
    for (const c of plan) {
      const victim = cache.victim();
      if (victim < 0) break;
      const held = cache.slotKey[victim]!;
      // Never displace an expert worth more than the one fetched (same scale as eviction).
      const priority = c.priority;
      if (held >= 0 && (this.opts.policy !== 'eam' || cache.score(held) >= cache.reuseScore(c.layer, c.expert, true))) break;
      // A victim whose own prefetch is running: stop rather than block this thread on it.
      const t = this.slotTicket[victim]!;
      if (t && !store.done(t) && !this.dropLoad(victim)) break;
      this.fill(c.layer, c.expert, true, priority, victim);
      this.prefetchLoads++;
    }
  }

  /** Cancels the slot's load if it has not started (true: the slot is free to refill). */
  private dropLoad(slot: number): boolean {
    const t = this.slotTicket[slot]!;
    if (!t || !this.store.cancel(t)) return false;
    this.slotTicket[slot] = 0;
    this.prefetchCancelled++;
    this.prefetchLoads--;
    this.totals.bytesLoaded -= this.store.expertBytes;
    const old = this.cache.evict(slot, true);
    if (old >= 0) this.tables[Math.floor(old / this.opts.numExperts)]!.clear(old % this.opts.numExperts);
    return true;
  }

  /** Waits for the slot's load (if any) and binds the slot into its layer's table. */
  private settle(slot: number): void {
    const t = this.slotTicket[slot]!;
    if (!t) return;
    this.slotTicket[slot] = 0;
    try {
      this.store.wait(t);
    } catch (err) {
      // The slot holds neither the old expert nor the new one: empty it so that a retry reloads.
      this.cache.evict(slot, true);
      throw err;
    }
    const key = this.cache.slotKey[slot]!;
    const w = this.slots[slot]!;
    if (key >= 0) this.tables[Math.floor(key / this.opts.numExperts)]!.set(key % this.opts.numExperts, w.gateUp!, w.down!);
  }

  /**
   * Starts loading (layer, expert) into a victim slot; returns the slot. The slot is bound into
   * the layer's table by settle(), once its load is done.
   */
  private fill(layer: number, expert: number, prefetched: boolean, priority: number, slot = this.cache.victim()): number {
    const { cache } = this;
    if (slot < 0) throw new Error(`expert cache: all ${cache.numSlots} slots are pinned; cannot load (${layer}, ${expert})`);
    // The slot's previous load must not write into it after the new one: drop it, or let it end.
    if (this.slotTicket[slot] && !this.dropLoad(slot)) this.settle(slot);
    const old = cache.evict(slot);
    if (old >= 0) this.tables[Math.floor(old / this.opts.numExperts)]!.clear(old % this.opts.numExperts);
    const w = this.slots[slot]!;
    this.slotTicket[slot] = this.store.submit(layer, expert, w, priority);
    this.totals.bytesLoaded += this.store.expertBytes;
    cache.insert(layer, expert, slot, prefetched);
    return slot;
  }

  stats(): OffloadStats {
    const { cache } = this;
    const layerHitRate: number[] = [];
    for (let l = 0; l < this.opts.numLayers; l++) {
      const h = cache.counters.hits[l]!;
      const m = cache.counters.misses[l]!;
      layerHitRate.push(h + m > 0 ? h / (h + m) : NaN);
    }
    return {
      ...this.totals, policy: cache.policy, slots: cache.numSlots, totalExperts: this.opts.numLayers * this.opts.numExperts,
      occupancy: cache.occupancy(), hitRate: cache.hitRate(), prefetchLoads: this.prefetchLoads, demandLoads: this.demandLoads,
      prefetchCancelled: this.prefetchCancelled, prefetchLate: this.prefetchLate, layerHitRate, collectionSize: this.collection.size,
    };
  }

  /** Increments since the last call, in the metrics registry's recordExpertCache shape. */
  takeDelta(): ExpertCacheDelta {
    const t = this.totals;
    const r = this.reported;
    const d: ExpertCacheDelta = {
      hits: t.hits - r.hits, misses: t.misses - r.misses, prefetchUsed: t.prefetchUsed - r.prefetchUsed,
      prefetchWasted: t.prefetchWasted - r.prefetchWasted, bytesLoaded: t.bytesLoaded - r.bytesLoaded,
      loadStallSeconds: t.loadStallSeconds - r.loadStallSeconds,
    };
    this.reported = { ...t };
    return d;
  }

  /** Trace records written and dropped since the last call (null: no trace). */
  takeTraceDelta(): TraceCounts | null {
    return this.trace?.takeDelta() ?? null;
  }

  /** The trace writer (null without --trace-dir). */
  get traceWriter(): TraceWriter | null {
    return this.trace;
  }

  /**
   * Persists the EAM collection and waits for the trace queued so far (now and then, off the
   * step path: the collection is serialised here and written asynchronously). A save still
   * running makes this one a no-op.
   */
  async save(): Promise<void> {
    if (this.saving) return this.saving;
    this.saving = (async () => {
      await this.trace?.flush();
      if (this.opts.traceDir) await this.collection.saveAsync(this.opts.traceDir);
    })().finally(() => { this.saving = null; });
    return this.saving;
  }

  /** On shutdown: writes what the trace has queued (at most timeoutMs) and saves the collection. */
  async close(timeoutMs = 5000): Promise<void> {
    await this.saving?.catch(() => undefined);
    await this.trace?.close(timeoutMs);
    if (this.opts.traceDir) await this.collection.saveAsync(this.opts.traceDir);
  }

  dispose(): void {
    // The trace's file handle too (close() first keeps what is queued; here it is dropped), or a
    // disposed offloader leaves it for the garbage collector to close.
    void this.trace?.close(0).catch(() => undefined);
    // The store first: its copy thread finishes the running load before the slots go.
    this.store.dispose();
    this.slotTicket.fill(0);
    for (const w of this.slots) {
      w.gateUp?.dispose();
      w.down?.dispose();
      w.gateUp = null;
      w.down = null;
    }
  }
}
