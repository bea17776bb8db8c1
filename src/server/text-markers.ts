// Streaming text split on markers (<think>, <tool_call>, ...): how much of a buffer is safe to
// emit now, holding back a tail that could still grow into a marker.

/** The longest suffix of text that is a proper prefix of one of the markers. */
export function partialMarkerLength(text: string, markers: readonly string[]): number {
  let best = 0;
  for (const m of markers) {
    for (let n = Math.min(m.length - 1, text.length); n > best; n--) {
      if (text.endsWith(m.slice(0, n))) { best = n; break; }
    }
  }
  return best;
}

/** The first occurrence of any marker: [index, marker], or null. */
export function findMarker(text: string, markers: readonly string[], from = 0): [number, string] | null {
  let best: [number, string] | null = null;
  for (const m of markers) {
    const i = text.indexOf(m, from);
    if (i >= 0 && (best === null || i < best[0])) best = [i, m];
  }
  return best;
}
