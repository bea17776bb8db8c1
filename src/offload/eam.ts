// The Expert Activation Matrix (MoE-Infinity): per request, an L_moe x E matrix of token counts,
// one row per MoE layer; every forward step (prefill and decode) adds the tokens routed to each
// (layer, expert). Similarity between two EAMs is the per-layer cosine averaged over layers.

export class ExpertActivationMatrix {
  /** [numLayers, numExperts] f32 token counts. */
  readonly counts: Float32Array;

  constructor(readonly numLayers: number, readonly numExperts: number, counts?: Float32Array) {
    if (!Number.isInteger(numLayers) || numLayers < 1) throw new RangeError(`numLayers is ${numLayers}, expected a positive integer`);
    if (!Number.isInteger(numExperts) || numExperts < 1) throw new RangeError(`numExperts is ${numExperts}, expected a positive integer`);
    if (counts && counts.length !== numLayers * numExperts)
      throw new RangeError(`counts.length is ${counts.length}, expected ${numLayers * numExperts} (${numLayers} x ${numExperts})`);
    this.counts = counts ?? new Float32Array(numLayers * numExperts);
  }

  /** Adds routed ids ([rows, k], rows [rowStart, rowEnd)) of one MoE layer. */
  addIds(layer: number, ids: Int32Array, k: number, rowStart = 0, rowEnd = ids.length / k): void {
    this.checkLayer(layer);
    const base = layer * this.numExperts;
    for (let i = rowStart * k; i < rowEnd * k; i++) {
      const e = ids[i]!;
      // Negative ids are "no expert" slots (padding, zero-computation experts).
      if (e >= 0 && e < this.numExperts) this.counts[base + e]! += 1;
    }
  }

  /** Adds per-expert counts ([E]) of one MoE layer. */
  addCounts(layer: number, counts: ArrayLike<number>): void {
    this.checkLayer(layer);
    const base = layer * this.numExperts;
    for (let e = 0; e < this.numExperts; e++) this.counts[base + e]! += counts[e]!;
  }

  /** Adds another EAM of the same shape (e.g. to build a global frequency). */
  addMatrix(other: ExpertActivationMatrix): void {
    if (other.numLayers !== this.numLayers || other.numExperts !== this.numExperts)
      throw new RangeError(`EAM shape ${other.numLayers}x${other.numExperts} does not match ${this.numLayers}x${this.numExperts}`);
    for (let i = 0; i < this.counts.length; i++) this.counts[i]! += other.counts[i]!;
  }

  rowSum(layer: number): number {
    let s = 0;
    const base = layer * this.numExperts;
    for (let e = 0; e < this.numExperts; e++) s += this.counts[base + e]!;
    return s;
  }

  /** Total tokens routed (summed over layers and experts: tokens x k x layers). */
  total(): number {
    let s = 0;
    for (let i = 0; i < this.counts.length; i++) s += this.counts[i]!;
    return s;
  }

  /** Layers with at least one routed token. */
  layersSeen(): number {
    let n = 0;
    for (let l = 0; l < this.numLayers; l++) if (this.rowSum(l) > 0) n++;
    return n;
  }

  /** Row `layer` normalised to sum 1 (all zeros when nothing was routed) into out [E]. */
  normalisedRow(layer: number, out: Float32Array = new Float32Array(this.numExperts)): Float32Array {
    const s = this.rowSum(layer);
    const base = layer * this.numExperts;
    for (let e = 0; e < this.numExperts; e++) out[e] = s > 0 ? this.counts[base + e]! / s : 0;
    return out;
  }

  /** Every row normalised to sum 1: the per-layer expert probabilities, [L, E]. */
  normalised(): Float32Array {
    const out = new Float32Array(this.counts.length);
    for (let l = 0; l < this.numLayers; l++) this.normalisedRow(l, out.subarray(l * this.numExperts, (l + 1) * this.numExperts));
    return out;
  }

  /** Every row scaled to unit L2 norm (zero rows stay zero): cosine = dot of unit rows, [L, E]. */
  unitRows(): Float32Array {
    return unitRows(this.counts, this.numLayers, this.numExperts);
  }

  clone(): ExpertActivationMatrix {
    return new ExpertActivationMatrix(this.numLayers, this.numExperts, Float32Array.from(this.counts));
  }

  reset(): void {
    this.counts.fill(0);
  }

  private checkLayer(layer: number): void {
    if (!Number.isInteger(layer) || layer < 0 || layer >= this.numLayers)
      throw new RangeError(`layer is ${layer}, expected an integer in [0, ${this.numLayers - 1}]`);
  }
}

/** counts [L, E] -> rows scaled to unit L2 norm (zero rows stay zero). */
export function unitRows(counts: Float32Array, L: number, E: number): Float32Array {
  const out = new Float32Array(L * E);
  for (let l = 0; l < L; l++) {
    let ss = 0;
    for (let e = 0; e < E; e++) ss += counts[l * E + e]! * counts[l * E + e]!;
    if (ss === 0) continue;
    const inv = 1 / Math.sqrt(ss);
    for (let e = 0; e < E; e++) out[l * E + e] = counts[l * E + e]! * inv;
  }
  return out;
}

/**
 * Per-layer cosine similarity of `a` (the running request, possibly partial) with `b`, averaged
 * over the layers `a` has seen (rows with tokens). Cosine is scale-free, so normalising rows to
 * sum 1 first would not change it. Returns 0 when `a` has seen no layer.
 */
export function eamSimilarity(a: ExpertActivationMatrix, b: ExpertActivationMatrix): number {
  if (a.numLayers !== b.numLayers || a.numExperts !== b.numExperts)
    throw new RangeError(`EAM shapes differ: ${a.numLayers}x${a.numExperts} vs ${b.numLayers}x${b.numExperts}`);
  return unitSimilarity(a.unitRows(), b.unitRows(), a.numLayers, a.numExperts);
}

/** Same as eamSimilarity on precomputed unit rows; layers where ua is all zero are skipped. */
export function unitSimilarity(ua: Float32Array, ub: Float32Array, L: number, E: number): number {
  let sum = 0;
  let seen = 0;
  for (let l = 0; l < L; l++) {
    let dot = 0;
    let any = false;
    for (let e = l * E; e < (l + 1) * E; e++) {
      const x = ua[e]!;
      if (x !== 0) any = true;
      dot += x * ub[e]!;
    }
    if (!any) continue;
    sum += dot;
    seen++;
  }
  return seen ? sum / seen : 0;
}
