// Replays a routing trace through a simulated expert cache of a given capacity: the live
// Offloader itself driven with a weightless store (so the replay evicts and prefetches by the same
// code as the server) for 'eam', 'lru' and 'lfu', and Belady's offline optimum (evict the expert
// whose next use is farthest) as the bound no demand-fetching policy can beat.
import type { ExpertTable, PackedWeight } from '../native/index.js';
import { EamCollection } from './eam-collection.js';
import { slotsFor, type EvictionPolicy } from './expert-cache.js';
import type { ExpertStore } from './expert-store.js';
import { Offloader } from './offloader.js';
import type { Trace, TraceMeta, TraceStep } from './trace-file.js';

export type ReplayPolicy = EvictionPolicy | 'belady';
export const REPLAY_POLICIES: readonly ReplayPolicy[] = ['eam', 'lru', 'lfu', 'belady'];

export interface ReplayOptions {
  policy: ReplayPolicy;
  /** Fraction of all (layer, expert) pairs the cache holds (clamped to at least one layer). */
  capacity: number;
  /** Prefetch coming layers (eam only; default off so that hit rates compare with Belady). */
  prefetch?: boolean;
  /** Starting collection (e.g. one saved by an earlier run); default empty, filled as requests finish. */
  collection?: EamCollection;
  collectionCapacity?: number;
  /** Prefetch knobs (see OffloaderOptions). */
  prefetchWindowExperts?: number;
  prefetchMinProbability?: number;
}

export interface ReplayResult {
  policy: ReplayPolicy;
  prefetch: boolean;
  slots: number;
  totalExperts: number;
  accesses: number;
  hits: number;
  misses: number;
  hitRate: number;
  /** Experts moved into the cache (demand misses + prefetches). */
  loads: number;
  prefetchUsed: number;
  prefetchWasted: number;
  /** [L] per-layer hit ratio (NaN where never accessed). */
  layerHitRate: number[];
}

/** A store that moves nothing: the replay only counts (every load is done at once). */
class NullStore implements ExpertStore {
  readonly expertBytes = 1;
  readonly slotBytes = 1;
  readonly overlapsCompute = true;
  readonly inFlight = 0;
  private ticket = 0;
  submit(): number { return ++this.ticket; }
  wait(): void {}
  done(): boolean { return true; }
  cancel(): boolean { return false; }
  dispose(): void {}
}

/** A table that only remembers which experts are bound (checks the offloader's bindings). */
class NullTable implements ExpertTable {
  private readonly bound: Uint8Array;
  constructor(readonly numExperts: number) { this.bound = new Uint8Array(numExperts); }
  set(e: number, _g: PackedWeight, _d: PackedWeight): void { this.bound[e] = 1; }
  clear(e: number): void { this.bound[e] = 0; }
  has(e: number): boolean { return this.bound[e] === 1; }
  get(): null { return null; }
  dispose(): void {}
}

/** Decodes a trace step's per-request layer rows into ids [T, k]-like lists for the hooks. */
function layerIds(req: { layers: number[][] }, layer: number): number[] {
  const out: number[] = [];
  const row = req.layers[layer] ?? [];
  for (let i = 0; i < row.length; i += 2) for (let c = 0; c < row[i + 1]!; c++) out.push(row[i]!);
  return out;
}

/** A replay fed one step at a time (the CLI streams a trace from disk through it). */
export interface StepReplayer {
  step(st: TraceStep): void;
  result(): ReplayResult;
}

/** The live Offloader under 'eam', 'lru' or 'lfu' on a weightless store, fed step by step. */
export function offloaderReplayer(meta: TraceMeta, opts: ReplayOptions & { policy: EvictionPolicy }): StepReplayer {
  if (!(opts.capacity > 0 && opts.capacity <= 1)) throw new RangeError(`capacity is ${opts.capacity}, expected a fraction in (0, 1]`);
  const { numLayers: L, numExperts: E } = meta;
  const collection = opts.collection ?? new EamCollection(L, E, opts.collectionCapacity);
  const off = new Offloader(new NullStore(), {
    numLayers: L, numExperts: E, topK: meta.topK, policy: opts.policy, fraction: opts.capacity,
    prefetch: opts.prefetch ?? false, collection,
    ...(opts.prefetchWindowExperts !== undefined ? { prefetchWindowBytes: opts.prefetchWindowExperts } : {}),
    ...(opts.prefetchMinProbability !== undefined ? { prefetchMinProbability: opts.prefetchMinProbability } : {}),
  });
  const tables = Array.from({ length: L }, () => new NullTable(E));
  off.attachTables(tables);
  let accesses = 0;
  const step = (st: TraceStep): void => {
    // Each routed (token, expert) pair becomes one row with k = 1: the EAM counts are the same.
    const perReq = st.requests.map((r) => Array.from({ length: L }, (_, l) => layerIds(r, l)));
    off.beginStep(st.requests.map((r, i) => ({ id: r.id, rows: Math.max(...perReq[i]!.map((x) => x.length), 0) })));
    for (let l = 0; l < L; l++) {
      const rowsPerReq = perReq.map((p) => Math.max(...p.map((x) => x.length), 0));
      const T = rowsPerReq.reduce((a, b) => a + b, 0);
      const ids = new Int32Array(T).fill(-1);
      const counts = new Int32Array(E);
      let row = 0;
      perReq.forEach((p, i) => {
        p[l]!.forEach((e, j) => { ids[row + j] = e; counts[e]!++; });
        row += rowsPerReq[i]!;
      });
      off.onRouted(l, ids, counts, T);
      off.ensureResident(l, counts, tables[l]!);
      for (let e = 0; e < E; e++) if (counts[e]! > 0) {
        accesses++;
        if (!tables[l]!.has(e)) throw new Error(`replay: expert (${l}, ${e}) not bound after ensureResident`);
      }
    }
    off.endStep();
    for (const id of st.finished ?? []) off.finishRequest(id);
  };
  const result = (): ReplayResult => {
    const st = off.stats();
    return {
      policy: opts.policy, prefetch: opts.prefetch ?? false, slots: st.slots, totalExperts: st.totalExperts,
      accesses, hits: st.hits, misses: st.misses, hitRate: accesses ? st.hits / accesses : 0,
      loads: st.demandLoads + st.prefetchLoads, prefetchUsed: st.prefetchUsed, prefetchWasted: st.prefetchWasted,
      layerHitRate: st.layerHitRate,
    };
  };
  return { step, result };
}

export function replay(trace: Trace, opts: ReplayOptions): ReplayResult {
  if (opts.policy === 'belady') return replayBelady(trace, opts.capacity);
  const r = offloaderReplayer(trace.meta, { ...opts, policy: opts.policy });
  for (const st of trace.steps) r.step(st);
  return r.result();
}

/** The experts a step's layer visit needs, ascending. */
function visitExperts(st: TraceStep, l: number): number[] {
  const set = new Set<number>();
  for (const r of st.requests) {
    const row = r.layers[l] ?? [];
    for (let i = 0; i < row.length; i += 2) if (row[i + 1]! > 0) set.add(row[i]!);
  }
  return [...set].sort((a, b) => a - b);
}

/**
 * Belady's MIN on layer visits (one per step and MoE layer): on a miss, evict the unneeded
 * resident expert used farthest in the future. Offline, so two passes over the trace: observe()
 * every step first (it keeps, per expert, the visits that use it: 4 bytes per access, refused past
 * maxAccesses), then step() every step again.
 */
export class BeladyReplayer implements StepReplayer {
  readonly slots: number;
  private readonly L: number;
  private readonly E: number;
  /** [L * E] visit indices that use each (layer, expert), ascending, and how many. */
  private readonly uses: Int32Array[];
  private readonly useCount: Int32Array;
  private readonly cursor: Int32Array;
  private observedVisits = 0;
  private observedAccesses = 0;
  /** Set when observe() passed maxAccesses: the index was freed and there is no result. */
  overLimit = false;
  private visit = 0;
  private readonly resident = new Map<number, number>(); // key -> next use
  private readonly hits: Float64Array;
  private readonly misses: Float64Array;
  private accesses = 0;

  constructor(meta: TraceMeta, capacity: number, readonly maxAccesses = Infinity) {
    if (!(capacity > 0 && capacity <= 1)) throw new RangeError(`capacity is ${capacity}, expected a fraction in (0, 1]`);
    this.L = meta.numLayers;
    this.E = meta.numExperts;
    this.slots = slotsFor({ numLayers: this.L, numExperts: this.E, expertBytes: 1, fraction: capacity });
    this.uses = Array.from({ length: this.L * this.E }, () => new Int32Array(4));
    this.useCount = new Int32Array(this.L * this.E);
    this.cursor = new Int32Array(this.L * this.E);
    this.hits = new Float64Array(this.L);
    this.misses = new Float64Array(this.L);
  }

  /** Pass 1: records which experts each of the step's layer visits needs. */
  observe(st: TraceStep): void {
    if (this.overLimit) return;
    for (let l = 0; l < this.L; l++, this.observedVisits++) {
      for (const e of visitExperts(st, l)) {
        const key = l * this.E + e;
        let a = this.uses[key]!;
        const n = this.useCount[key]!;
        if (n === a.length) {
          const b = new Int32Array(a.length * 2);
          b.set(a);
          this.uses[key] = a = b;
        }
        a[n] = this.observedVisits;
        this.useCount[key] = n + 1;
        if (++this.observedAccesses > this.maxAccesses) {
          this.overLimit = true;
          this.uses.fill(new Int32Array(0));
          return;
        }
      }
    }
  }

  /** Pass 2: simulates the step's layer visits (after every step was observed). */
  step(st: TraceStep): void {
    if (this.overLimit) throw new Error(`belady: the trace has more than ${this.maxAccesses} expert accesses`);
    const { E } = this;
    for (let l = 0; l < this.L; l++, this.visit++) {
      const experts = visitExperts(st, l);
      const need = new Set(experts.map((e) => l * E + e));
      for (const e of experts) {
        const key = l * E + e;
        // This visit is uses[key][cursor]; the next use follows it.
        const c = ++this.cursor[key]!;
        const nextUse = c < this.useCount[key]! ? this.uses[key]![c]! : Infinity;
        this.accesses++;
        if (this.resident.has(key)) {
          this.hits[l]!++;
        } else {
          this.misses[l]!++;
          if (this.resident.size >= this.slots) {
            let victim = -1;
            let far = -1;
            for (const [k, nu] of this.resident) if (!need.has(k) && nu > far) { far = nu; victim = k; }
            this.resident.delete(victim);
          }
        }
        this.resident.set(key, nextUse);
      }
    }
  }

  result(): ReplayResult {
    const h = this.hits.reduce((a, b) => a + b, 0);
    const m = this.misses.reduce((a, b) => a + b, 0);
    return {
      policy: 'belady', prefetch: false, slots: this.slots, totalExperts: this.L * this.E, accesses: this.accesses, hits: h, misses: m,
      hitRate: this.accesses ? h / this.accesses : 0, loads: m, prefetchUsed: 0, prefetchWasted: 0,
      layerHitRate: Array.from(this.hits, (x, l) => (x + this.misses[l]! > 0 ? x / (x + this.misses[l]!) : NaN)),
    };
  }
}

/** Belady's MIN on an in-memory trace. */
export function replayBelady(trace: Trace, capacity: number): ReplayResult {
  const b = new BeladyReplayer(trace.meta, capacity);
  for (const st of trace.steps) b.observe(st);
  for (const st of trace.steps) b.step(st);
  return b.result();
}
