// Replays a routing trace through a simulated expert cache of a given capacity: the live
// Offloader itself driven with a weightless store (so the replay evicts and prefetches by the same
// code as the server) for 'eam', 'lru' and 'lfu', and Belady's offline optimum (evict the expert
// whose next use is farthest) as the bound no demand-fetching policy can beat.
import type { ExpertTable, PackedWeight } from '../native/index.js';
import { EamCollection } from './eam-collection.js';
import { slotsFor, type EvictionPolicy } from './expert-cache.js';
import type { ExpertStore } from './expert-store.js';
import { Offloader } from './offloader.js';
import type { Trace } from './trace-file.js';

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

export function replay(trace: Trace, opts: ReplayOptions): ReplayResult {
  if (!(opts.capacity > 0 && opts.capacity <= 1)) throw new RangeError(`capacity is ${opts.capacity}, expected a fraction in (0, 1]`);
  if (opts.policy === 'belady') return replayBelady(trace, opts.capacity);
  const { numLayers: L, numExperts: E } = trace.meta;
  const collection = opts.collection ?? new EamCollection(L, E, opts.collectionCapacity);
  const off = new Offloader(new NullStore(), {
    numLayers: L, numExperts: E, topK: trace.meta.topK, policy: opts.policy, fraction: opts.capacity,
    prefetch: opts.prefetch ?? false, collection,
    ...(opts.prefetchWindowExperts !== undefined ? { prefetchWindowBytes: opts.prefetchWindowExperts } : {}),
    ...(opts.prefetchMinProbability !== undefined ? { prefetchMinProbability: opts.prefetchMinProbability } : {}),
  });
  const tables = Array.from({ length: L }, () => new NullTable(E));
  off.attachTables(tables);
  let accesses = 0;
  for (const step of trace.steps) {
    // Each routed (token, expert) pair becomes one row with k = 1: the EAM counts are the same.
    const perReq = step.requests.map((r) => Array.from({ length: L }, (_, l) => layerIds(r, l)));
    off.beginStep(step.requests.map((r, i) => ({ id: r.id, rows: Math.max(...perReq[i]!.map((x) => x.length), 0) })));
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
    for (const id of step.finished ?? []) off.finishRequest(id);
  }
  const st = off.stats();
  return {
    policy: opts.policy, prefetch: opts.prefetch ?? false, slots: st.slots, totalExperts: st.totalExperts,
    accesses, hits: st.hits, misses: st.misses, hitRate: accesses ? st.hits / accesses : 0,
    loads: st.demandLoads + st.prefetchLoads, prefetchUsed: st.prefetchUsed, prefetchWasted: st.prefetchWasted,
    layerHitRate: st.layerHitRate,
  };
}

/** The trace as a sequence of layer visits, each the set of experts it needs. */
function layerVisits(trace: Trace): { layer: number; experts: number[] }[] {
  const { numLayers: L } = trace.meta;
  const visits: { layer: number; experts: number[] }[] = [];
  for (const step of trace.steps) {
    for (let l = 0; l < L; l++) {
      const set = new Set<number>();
      for (const r of step.requests) {
        const row = r.layers[l] ?? [];
        for (let i = 0; i < row.length; i += 2) if (row[i + 1]! > 0) set.add(row[i]!);
      }
      visits.push({ layer: l, experts: [...set].sort((a, b) => a - b) });
    }
  }
  return visits;
}

/** Belady's MIN on layer visits: on a miss, evict the unneeded resident used farthest in the future. */
export function replayBelady(trace: Trace, capacity: number): ReplayResult {
  const { numLayers: L, numExperts: E } = trace.meta;
  const slots = slotsFor({ numLayers: L, numExperts: E, expertBytes: 1, fraction: capacity });
  const visits = layerVisits(trace);
  // next[v][j]: index of the next visit that needs visits[v].experts[j] again (Infinity: never).
  const nextOf = new Float64Array(L * E).fill(Infinity);
  const next: Float64Array[] = new Array(visits.length);
  for (let v = visits.length - 1; v >= 0; v--) {
    const { layer, experts } = visits[v]!;
    next[v] = Float64Array.from(experts, (e) => nextOf[layer * E + e]!);
    for (const e of experts) nextOf[layer * E + e] = v;
  }
  const resident = new Map<number, number>(); // key -> next use
  const hits = new Float64Array(L);
  const misses = new Float64Array(L);
  let accesses = 0;
  for (let v = 0; v < visits.length; v++) {
    const { layer, experts } = visits[v]!;
    const need = new Set(experts.map((e) => layer * E + e));
    experts.forEach((e, j) => {
      const key = layer * E + e;
      accesses++;
      if (resident.has(key)) {
        hits[layer]!++;
      } else {
        misses[layer]!++;
        if (resident.size >= slots) {
          let victim = -1;
          let far = -1;
          for (const [k, nu] of resident) if (!need.has(k) && nu > far) { far = nu; victim = k; }
          resident.delete(victim);
        }
      }
      resident.set(key, next[v]![j]!);
    });
  }
  const h = hits.reduce((a, b) => a + b, 0);
  const m = misses.reduce((a, b) => a + b, 0);
  return {
    policy: 'belady', prefetch: false, slots, totalExperts: L * E, accesses, hits: h, misses: m,
    hitRate: accesses ? h / accesses : 0, loads: m, prefetchUsed: 0, prefetchWasted: 0,
    layerHitRate: Array.from(hits, (x, l) => (x + misses[l]! > 0 ? x / (x + misses[l]!) : NaN)),
  };
}
