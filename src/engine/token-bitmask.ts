// Grammar-constrained sampling's one contact with the logits: a per-sequence token bitmask in
// xgrammar's layout ([ceil(V / 32)] i32 words, bit (id & 31) of word (id >> 5) set = allowed),
// applied to a row of logits before sampling. Kept apart so a native batched sampler can take it.

/** Words of a bitmask over a vocabulary of V tokens. */
export function bitmaskWords(vocabSize: number): number {
  return (vocabSize + 31) >>> 5;
}

/**
 * Sets every disallowed token's logit to -Infinity, in place.
 * @param logits [V] f32, one row
 * @param mask [ceil(V / 32)] i32, bit set = allowed
 */
export function applyTokenBitmask(logits: Float32Array, mask: Int32Array): void {
  const V = logits.length;
  const words = bitmaskWords(V);
  if (mask.length < words) throw new RangeError(`mask.length is ${mask.length}, expected ${words} for ${V} logits`);
  for (let w = 0; w < words; w++) {
    const bits = mask[w]!;
    if (bits === -1) continue; // all 32 allowed: the common case for free text inside a string
    const base = w << 5;
    const end = Math.min(32, V - base);
    if (bits === 0) {
      logits.fill(-Infinity, base, base + end);
      continue;
    }
    for (let b = 0; b < end; b++) if (((bits >>> b) & 1) === 0) logits[base + b] = -Infinity;
  }
}
