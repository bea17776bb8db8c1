// The expert cache's bookkeeping: a fixed number of slots (one expert's gate_up + down each),
// the resident map (layer, expert) -> slot, the pins of the layer being computed, and eviction by
// policy ('eam': lowest predicted reuse with the first layers protected; 'lru'; 'lfu'). It holds
// no weights: the live offloader keeps one packed weight pair per slot, the replay keeps none.

export type EvictionPolicy = 'eam' | 'lru' | 'lfu';
export const EVICTION_POLICIES: readonly EvictionPolicy[] = ['eam', 'lru', 'lfu'];

/** Slot index in [0, numSlots). */
export type SlotIndex = number & { readonly __slot: unique symbol };

export interface CacheOptions {
  numSlots: number;
  numLayers: number;
  numExperts: number;
  policy: EvictionPolicy;
  /** 'eam': the first `protectLayers` MoE layers get their score multiplied by `protectBoost`. */
  protectLayers?: number;
  protectBoost?: number;
  /** 'eam': the batch's predicted [L, E] probabilities (read at each eviction). */
  prediction?: Float32Array;

}

export interface LayerCounters {
  hits: Float64Array;   // [L]
  misses: Float64Array; // [L]
}

const EMPTY = -1;

/** Slots needed so that one layer's demand always fits: capacity is clamped up to this. */
export function minSlots(numExperts: number): number {
  return numExperts;
}

/** Slots for a byte budget or a fraction of all experts, never below one layer's worth. */
export function slotsFor(opts: { numLayers: number; numExperts: number; expertBytes: number; budgetBytes?: number; fraction?: number }): number {
  const total = opts.numLayers * opts.numExperts;
  let n: number;
  if (opts.budgetBytes !== undefined && opts.budgetBytes > 0) n = Math.floor(opts.budgetBytes / opts.expertBytes);
  else if (opts.fraction !== undefined) n = Math.round(opts.fraction * total);
  else n = total;
  return Math.min(total, Math.max(minSlots(opts.numExperts), n));
}

export class ExpertCache {
  readonly numSlots: number;
  readonly numLayers: number;
  readonly numExperts: number;
  readonly policy: EvictionPolicy;
  readonly protectLayers: number;
  readonly protectBoost: number;
  prediction: Float32Array | null;
  /** [numSlots] key (layer * E + expert) held by each slot, -1 when empty. */
  readonly slotKey: Int32Array;
  /** [L * E] slot of each key, -1 when not resident. */
  readonly keySlot: Int32Array;
  /** [numSlots] last access tick (LRU, and the tie-break of every policy). */
  private readonly lastUse: Float64Array;
  /** [L * E] accesses of each key over the cache's life (LFU remembers evicted experts too). */
  private readonly freq: Float64Array;
  /** [numSlots] 1 while pinned (the current layer's experts). */
  private readonly pinned: Uint8Array;
  private readonly pins: number[] = [];
  /** [numSlots] 1 when filled by a prefetch and not used since. */
  private readonly prefetchedUnused: Uint8Array;
  private tick = 0;
  /** The layer being computed (eviction distance is measured from it). */
  currentLayer = 0;
  readonly counters: LayerCounters;
  prefetchUsed = 0;
  prefetchWasted = 0;
  evictions = 0;
  used = 0;

  constructor(opts: CacheOptions) {
    const { numLayers: L, numExperts: E } = opts;
    if (!Number.isInteger(opts.numSlots) || opts.numSlots < minSlots(E) || opts.numSlots > L * E)
      throw new RangeError(`numSlots is ${opts.numSlots}, expected an integer in [${minSlots(E)}, ${L * E}] ` +
        '(at least one layer of experts, at most all of them)');
    if (!EVICTION_POLICIES.includes(opts.policy))
      throw new RangeError(`policy is '${String(opts.policy)}', expected one of ${EVICTION_POLICIES.join(', ')}`);
    this.numSlots = opts.numSlots;
    this.numLayers = L;
    this.numExperts = E;
    this.policy = opts.policy;
    this.protectLayers = opts.protectLayers ?? Math.max(1, Math.floor(L / 10));
    this.protectBoost = opts.protectBoost ?? 2;
    this.prediction = opts.prediction ?? null;
    this.slotKey = new Int32Array(this.numSlots).fill(EMPTY);
    this.keySlot = new Int32Array(L * E).fill(EMPTY);
    this.lastUse = new Float64Array(this.numSlots);
    this.freq = new Float64Array(L * E);
    this.pinned = new Uint8Array(this.numSlots);
    this.prefetchedUnused = new Uint8Array(this.numSlots);
    this.counters = { hits: new Float64Array(L), misses: new Float64Array(L) };
  }

  slotOf(layer: number, expert: number): number {
    return this.keySlot[layer * this.numExperts + expert]!;
  }

  isResident(layer: number, expert: number): boolean {
    return this.slotOf(layer, expert) !== EMPTY;
  }

  /** Slots holding an expert / all slots. */
  occupancy(): number {
    return this.used / this.numSlots;
  }

  /** The layer about to compute: unpins the previous layer's experts. */
  beginLayer(layer: number): void {
    this.currentLayer = layer;
    this.unpinAll();
  }

  unpinAll(): void {
    for (const s of this.pins) this.pinned[s] = 0;
    this.pins.length = 0;
  }

  /**
   * A demand access: counts a hit or a miss, pins the slot if resident. Returns the slot, or -1
   * on a miss (the caller then claims a slot and fills it).
   */
  access(layer: number, expert: number): number {
    const key = layer * this.numExperts + expert;
    this.freq[key]! += 1;
    const s = this.keySlot[key]!;
    if (s === EMPTY) {
      this.counters.misses[layer]! += 1;
      return EMPTY;
    }
    this.counters.hits[layer]! += 1;
    this.touch(s);
    this.pin(s);
    if (this.prefetchedUnused[s]) {
      this.prefetchedUnused[s] = 0;
      this.prefetchUsed++;
    }
    return s;
  }

  /**
   * The slot to fill next: an empty one, else the unpinned slot with the lowest retention score
   * (ties: least recently used). -1 when every slot is pinned. Evicting it is the caller's move.
   */
  victim(): number {
    if (this.used < this.numSlots) {
      for (let s = 0; s < this.numSlots; s++) if (this.slotKey[s] === EMPTY) return s;
    }
    let best = EMPTY;
    let bestScore = Infinity;
    let bestTick = Infinity;
    for (let s = 0; s < this.numSlots; s++) {
      if (this.pinned[s]) continue;
      const sc = this.score(this.slotKey[s]!);
      const t = this.lastUse[s]!;
      if (sc < bestScore || (sc === bestScore && t < bestTick)) {
        best = s;
        bestScore = sc;
        bestTick = t;
      }
    }
    return best;
  }

  /** Retention score of a resident key: higher is kept longer. */
  score(key: number): number {
    switch (this.policy) {
      case 'lru': return this.lastUse[this.keySlot[key]!]!;
      case 'lfu': return this.freq[key]!;
      default: return this.reuseScore(Math.floor(key / this.numExperts), key % this.numExperts, true);
    }
  }

  /**
   * Predicted reuse of (layer, expert) seen from the current layer: the paper's prefetch priority
   * (p + 1e-8) * (1 - d / (L + 1)) with d the layers until `layer` computes again, wrapped into
   * the next step (1..L: an expert of the layer just computed is needed again only after every
   * other layer), times protectBoost for the first layers, whose misses no prefetch can hide
   * (nothing computes before them in a step). Evicting the lowest score behaves like Belady on
   * decode's cyclic layer order: the experts needed farthest ahead go first.
   * (Measured alternative, kept out: the expected next-use distance d + L(1 - q)/q with
   * q = 1 - exp(-k p) scored 4-6 points lower on the structured replay traces.)
   */
  reuseScore(layer: number, expert: number, wrap: boolean): number {
    const L = this.numLayers;
    const p = this.prediction ? this.prediction[layer * this.numExperts + expert]! : 0;
    let d = layer - this.currentLayer;
    if (d <= 0) {
      if (!wrap) return 0;
      d += L;
    }
    let s = (p + 1e-8) * (1 - d / (L + 1));
    if (layer < this.protectLayers) s *= this.protectBoost;
    return s;
  }

  /**
   * Empties a slot; returns the key it held (or -1). Counts a wasted prefetch if unused, unless
   * `cancelled` (its load was dropped before it moved a byte).
   */
  evict(slot: number, cancelled = false): number {
    const key = this.slotKey[slot]!;
    if (key === EMPTY) return EMPTY;
    if (this.prefetchedUnused[slot]) {
      this.prefetchedUnused[slot] = 0;
      if (!cancelled) this.prefetchWasted++;
    }
    this.keySlot[key] = EMPTY;
    this.slotKey[slot] = EMPTY;
    this.used--;
    this.evictions++;
    return key;
  }

  /** Puts (layer, expert) into an empty slot; demand loads are pinned, prefetches are not. */
  insert(layer: number, expert: number, slot: number, prefetched: boolean): void {
    const key = layer * this.numExperts + expert;
    if (this.slotKey[slot] !== EMPTY) throw new Error(`slot ${slot} is not empty`);
    if (this.keySlot[key] !== EMPTY) throw new Error(`expert (${layer}, ${expert}) is already resident`);
    this.slotKey[slot] = key;
    this.keySlot[key] = slot;
    this.used++;
    this.prefetchedUnused[slot] = prefetched ? 1 : 0;
    this.touch(slot);
    if (!prefetched) this.pin(slot);
  }

  pin(slot: number): void {
    if (!this.pinned[slot]) {
      this.pinned[slot] = 1;
      this.pins.push(slot);
    }
  }

  isPinned(slot: number): boolean {
    return this.pinned[slot] === 1;
  }

  /** Prefetched slots never used, still resident (wasted if evicted before use). */
  pendingPrefetches(): number {
    let n = 0;
    for (let s = 0; s < this.numSlots; s++) n += this.prefetchedUnused[s]!;
    return n;
  }

  hitRate(): number {
    let h = 0;
    let m = 0;
    for (let l = 0; l < this.numLayers; l++) {
      h += this.counters.hits[l]!;
      m += this.counters.misses[l]!;
    }
    return h + m > 0 ? h / (h + m) : 0;
  }

  private touch(slot: number): void {
    this.lastUse[slot] = ++this.tick;
  }
}
