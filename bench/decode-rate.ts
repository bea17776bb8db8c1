// Aggregate decode tokens/s from streamed token arrival times (the serve bench): the tokens after
// each request's first token over the time the daemon was decoding, and over the steady window in
// which every stream was past its prefill. Pure functions, so the arithmetic is unit-tested.

/** One request's token arrivals, absolute ms (a chunk of n tokens gives n equal times). */
export interface Arrivals {
  /** Which closed-loop client sent it and its round (0 = the client's first request). */
  client: number;
  round: number;
  arrivalsMs: readonly number[];
}

export interface DecodeRate {
  /** Tokens after each request's first token (sum over requests of tokens - 1). */
  decodeTokens: number;
  /** Length of the union of [first token, last token] over requests: time some stream was decoding. */
  decodeBusyS: number;
  /** decodeTokens / decodeBusyS. */
  decodeTokPerS: number;
  /** The busy time's disjoint intervals (ms), for CPU accounting. */
  busyIntervalsMs: [number, number][];
  /** [latest first token of a round-0 request, earliest last token of a client's last request] (ms);
   * empty (NaN rate) when not every stream was decoding at once. */
  steadyFromMs: number;
  steadyToMs: number;
  /** Non-first tokens that arrived inside the steady window. */
  steadyTokens: number;
  steadyTokPerS: number;
}

/** The union of closed intervals (ms) as disjoint intervals in time order (empty ones dropped). */
export function mergeIntervals(intervals: readonly (readonly [number, number])[]): [number, number][] {
  const s = intervals.filter(([a, b]) => b > a).map(([a, b]) => [a, b] as [number, number]).sort((x, y) => x[0] - y[0]);
  const out: [number, number][] = [];
  for (const [a, b] of s) {
    const last = out[out.length - 1];
    if (!last || a > last[1]) out.push([a, b]);
    else if (b > last[1]) last[1] = b;
  }
  return out;
}

/** Measure of the union of closed intervals (ms). */
export function unionLengthMs(intervals: readonly (readonly [number, number])[]): number {
  return mergeIntervals(intervals).reduce((t, [a, b]) => t + b - a, 0);
}

/**
 * CPU ms a process spent inside the given intervals, from (wall ms, cumulative CPU ms) samples in
 * time order, interpolated linearly between samples (NaN where an interval is not inside them).
 */
export function cpuMsWithin(samples: readonly (readonly [number, number])[], intervals: readonly (readonly [number, number])[]): number {
  const at = (t: number): number => {
    if (samples.length === 0 || t < samples[0]![0] || t > samples[samples.length - 1]![0]) return NaN;
    let i = 1;
    while (i < samples.length - 1 && samples[i]![0] < t) i++;
    const [t0, c0] = samples[i - 1]!, [t1, c1] = samples[i]!;
    return t1 === t0 ? c1 : c0 + (c1 - c0) * (t - t0) / (t1 - t0);
  };
  return intervals.reduce((sum, [a, b]) => sum + at(b) - at(a), 0);
}

/**
 * NOTE: requests with fewer than two tokens add no decode tokens and no busy time. The steady window
 * needs every client's first request to have its first token before any client's last request ends;
 * with one round per client that is "all streams resident and decoding at once". A window shorter
 * than `minSteadyMs` is reported as empty (its rate would be a few steps' noise).
 */
export function decodeRate(reqs: readonly Arrivals[], minSteadyMs = 1000): DecodeRate {
  let decodeTokens = 0;
  const busy: [number, number][] = [];
  for (const r of reqs) {
    const a = r.arrivalsMs;
    if (a.length < 2) continue;
    decodeTokens += a.length - 1;
    busy.push([a[0]!, a[a.length - 1]!]);
  }
  const busyIntervalsMs = mergeIntervals(busy);
  const decodeBusyS = busyIntervalsMs.reduce((t, [a, b]) => t + b - a, 0) / 1e3;
  // Steady window: from the last stream's first token to the first stream's end.
  const clients = new Set(reqs.map((r) => r.client));
  let from = -Infinity, to = Infinity;
  for (const c of clients) {
    const mine = reqs.filter((r) => r.client === c && r.arrivalsMs.length > 0);
    if (mine.length === 0) continue;
    const first = mine.reduce((x, y) => (y.round < x.round ? y : x));
    const last = mine.reduce((x, y) => (y.round > x.round ? y : x));
    from = Math.max(from, first.arrivalsMs[0]!);
    to = Math.min(to, last.arrivalsMs[last.arrivalsMs.length - 1]!);
  }
  let steadyTokens = 0;
  const ok = Number.isFinite(from) && Number.isFinite(to) && to - from >= minSteadyMs;
  if (ok) {
    for (const r of reqs) for (let i = 1; i < r.arrivalsMs.length; i++) {
      const t = r.arrivalsMs[i]!;
      if (t > from && t <= to) steadyTokens++;
    }
  }
  return {
    decodeTokens, decodeBusyS, decodeTokPerS: decodeBusyS > 0 ? decodeTokens / decodeBusyS : NaN, busyIntervalsMs,
    steadyFromMs: ok ? from : NaN, steadyToMs: ok ? to : NaN, steadyTokens,
    steadyTokPerS: ok ? steadyTokens / ((to - from) / 1e3) : NaN,
  };
}
