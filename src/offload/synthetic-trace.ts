// Synthetic routing traces with known structure, for the replay tests and the benchmark: requests
// come from prompt families; each family prefers its own expert set in every layer (with some
// tokens routed by global popularity instead), and requests run in a continuously refilled batch.
import type { Trace, TraceRequestStep, TraceStep } from './trace-file.js';
import { mulberry32 } from '../engine/rng.js';

export interface SyntheticTraceOptions {
  numLayers: number;
  numExperts: number;
  topK: number;
  families: number;
  /** Experts in a family's preferred set per layer (>= topK). */
  familySetSize: number;
  /** Probability that a token's experts come from its family's set (else global popularity). */
  affinity: number;
  /** Zipf exponent of the experts' weights inside a family set (0 = uniform). */
  familySkew: number;
  requests: number;
  batch: number;
  promptTokens: number;
  decodeTokens: number;
  seed: number;
}

export const DEFAULT_SYNTHETIC: SyntheticTraceOptions = {
  numLayers: 16, numExperts: 64, topK: 4, families: 6, familySetSize: 8, affinity: 0.9, familySkew: 0,
  requests: 60, batch: 4, promptTokens: 16, decodeTokens: 24, seed: 7,
};

const rng = mulberry32;

export function syntheticTrace(o: SyntheticTraceOptions): Trace {
  const r = rng(o.seed);
  const { numLayers: L, numExperts: E, topK: k } = o;
  // Family sets: a random subset per (family, layer).
  const sets = Array.from({ length: o.families }, () => Array.from({ length: L }, () => {
    const all = [...Array(E).keys()];
    for (let i = all.length - 1; i > 0; i--) { const j = Math.floor(r() * (i + 1)); [all[i], all[j]] = [all[j]!, all[i]!]; }
    return all.slice(0, o.familySetSize);
  }));
  // Global popularity: Zipf-like weights over a per-layer permutation.
  const zipf = Array.from({ length: L }, () => {
    const perm = [...Array(E).keys()].sort(() => r() - 0.5);
    const w = perm.map((_, i) => 1 / (i + 1));
    return { perm, w, total: w.reduce((a, b) => a + b, 0) };
  });
  const pickGlobal = (l: number): number => {
    const z = zipf[l]!;
    let x = r() * z.total;
    for (let i = 0; i < E; i++) { x -= z.w[i]!; if (x <= 0) return z.perm[i]!; }
    return z.perm[E - 1]!;
  };
  const famW = Array.from({ length: o.familySetSize }, (_, i) => 1 / (i + 1) ** o.familySkew);
  const famTotal = famW.reduce((a, b) => a + b, 0);
  const pickFamily = (family: number, l: number): number => {
    let x = r() * famTotal;
    for (let i = 0; i < famW.length; i++) { x -= famW[i]!; if (x <= 0) return sets[family]![l]![i]!; }
    return sets[family]![l]![famW.length - 1]!;
  };
  const tokenExperts = (family: number, l: number): number[] => {
    const chosen = new Set<number>();
    const fam = r() < o.affinity;
    while (chosen.size < k) chosen.add(fam ? pickFamily(family, l) : pickGlobal(l));
    return [...chosen];
  };
  interface Live { id: string; family: number; left: number; fresh: boolean }
  const live: Live[] = [];
  let started = 0;
  const steps: TraceStep[] = [];
  while (started < o.requests || live.length) {
    while (live.length < o.batch && started < o.requests) {
      const family = Math.floor(r() * o.families);
      live.push({ id: `req-${started++}-f${family}`, family, left: o.decodeTokens, fresh: true });
    }
    const requests: TraceRequestStep[] = live.map((q) => {
      const T = q.fresh ? o.promptTokens : 1;
      const layers = Array.from({ length: L }, (_, l) => {
        const c = new Map<number, number>();
        for (let t = 0; t < T; t++) for (const e of tokenExperts(q.family, l)) c.set(e, (c.get(e) ?? 0) + 1);
        return [...c].sort((a, b) => a[0] - b[0]).flat();
      });
      return { id: q.id, layers };
    });
    const finished: string[] = [];
    for (const q of live) {
      if (!q.fresh) q.left--;
      q.fresh = false;
      if (q.left <= 0) finished.push(q.id);
    }
    steps.push({ step: steps.length, requests, ...(finished.length ? { finished } : {}) });
    for (const id of finished) live.splice(live.findIndex((q) => q.id === id), 1);
  }
  return { meta: { numLayers: L, numExperts: E, topK: k, model: 'synthetic' }, steps };
}
