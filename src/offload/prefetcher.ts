// Prefetch planning (MoE-Infinity): after layer `cur` is routed, every non-resident expert of a
// coming layer l > cur gets priority (p + 1e-8) * (1 - (l - cur) / (L + 1)), p its predicted
// probability for the batch; the highest priorities are fetched first, within an in-flight byte
// window. Demand misses are not planned here: they are fetched before any prefetch (top priority).
import type { ExpertCache } from './expert-cache.js';

export interface PrefetchCandidate {
  layer: number;
  expert: number;
  priority: number;
}

/** Priority of fetching (layer, expert) while layer `cur` computes (0 for layers <= cur). */
export function prefetchPriority(p: number, layer: number, cur: number, numLayers: number): number {
  if (layer <= cur) return 0;
  return (p + 1e-8) * (1 - (layer - cur) / (numLayers + 1));
}

/**
 * The experts to fetch now, best first: non-resident, layers after `cur`, within `windowBytes`
 * (whole experts of `expertBytes`), each worth more than the slot it would displace.
 * `minProbability` skips experts the prediction gives (almost) no chance.
 */
export function planPrefetch(cache: ExpertCache, prediction: Float32Array, cur: number, windowBytes: number,
                             expertBytes: number, minProbability = 1e-3): PrefetchCandidate[] {
  const L = cache.numLayers;
  const E = cache.numExperts;
  const budget = Math.floor(windowBytes / Math.max(1, expertBytes));
  if (budget <= 0) return [];
  const out: PrefetchCandidate[] = [];
  for (let l = cur + 1; l < L; l++) {
    for (let e = 0; e < E; e++) {
      const p = prediction[l * E + e]!;
      if (p < minProbability || cache.isResident(l, e)) continue;
      out.push({ layer: l, expert: e, priority: prefetchPriority(p, l, cur, L) });
    }
  }
  out.sort((a, b) => b.priority - a.priority || a.layer - b.layer || a.expert - b.expert);
  return out.slice(0, budget);
}
