// Keeps constrained output valid UTF-8. xgrammar 0.1.27 decodes UTF-8 leniently and accepts byte
// tokens that no valid text holds (lead bytes C0, C1, F5-F7; overlong E0 80; surrogates ED A0;
// F4 90 above U+10FFFF), which a byte-fallback or byte-level vocabulary can emit one byte at a
// time. The guard tracks the output's UTF-8 decoder state and ANDs the token bitmask with the
// tokens that keep the bytes valid from that state (one precomputed mask per state).
import { bitmaskWords } from '../engine/token-bitmask.js';

/**
 * Decoder states: 0 = between characters; 1..7 = inside a character: continuation bytes still
 * needed and the range the next one must fall in (RFC 3629's table).
 */
const NEED = [0, 1, 2, 2, 2, 3, 3, 3];
const LO = [0, 0x80, 0xa0, 0x80, 0x80, 0x90, 0x80, 0x80];
const HI = [0, 0xbf, 0xbf, 0xbf, 0x9f, 0xbf, 0xbf, 0x8f];
export const UTF8_STATES = NEED.length;
export const UTF8_INVALID = -1;

/** The decoder state after one more byte (UTF8_INVALID if no valid text continues so). */
export function utf8Step(state: number, b: number): number {
  if (state === 0) {
    if (b < 0x80) return 0;
    if (b >= 0xc2 && b <= 0xdf) return 1;
    if (b === 0xe0) return 2;
    if (b === 0xed) return 4;
    if (b >= 0xe1 && b <= 0xef) return 3;
    if (b === 0xf0) return 5;
    if (b >= 0xf1 && b <= 0xf3) return 6;
    if (b === 0xf4) return 7;
    return UTF8_INVALID;
  }
  if (b < LO[state]! || b > HI[state]!) return UTF8_INVALID;
  return NEED[state] === 1 ? 0 : NEED[state] === 2 ? 1 : 3;
}

/** GPT-2's byte-level alphabet: the printable character that stands for each byte. */
function byteLevelDecoder(): Map<string, number> {
  const bs: number[] = [];
  for (let b = 33; b <= 126; b++) bs.push(b);
  for (let b = 161; b <= 172; b++) bs.push(b);
  for (let b = 174; b <= 255; b++) bs.push(b);
  const cs = [...bs];
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (!bs.includes(b)) {
      bs.push(b);
      cs.push(256 + n++);
    }
  }
  return new Map(bs.map((b, i) => [String.fromCodePoint(cs[i]!), b]));
}

/** A token's bytes as the model's decoder writes them; null for special (control) tokens. */
export function tokenBytes(encodedVocab: readonly string[], vocabType: 'byte_fallback' | 'byte_level' | 'raw',
  special: ReadonlySet<number>): (Uint8Array | null)[] {
  const enc = new TextEncoder();
  const bl = vocabType === 'byte_level' ? byteLevelDecoder() : null;
  return encodedVocab.map((tok, id) => {
    if (special.has(id)) return null;
    if (vocabType === 'byte_fallback') {
      const m = /^<0x([0-9A-Fa-f]{2})>$/.exec(tok);
      if (m) return Uint8Array.of(parseInt(m[1]!, 16));
      return enc.encode(tok.replace(/▁/g, ' '));
    }
    if (bl) {
      const out: number[] = [];
      for (const ch of tok) {
        const b = bl.get(ch);
        if (b === undefined) return enc.encode(tok); // an added token spelled as plain text
        out.push(b);
      }
      return Uint8Array.from(out);
    }
    return enc.encode(tok);
  });
}

export class Utf8Guard {
  /** [UTF8_STATES][ceil(V / 32)] i32: tokens that keep the bytes valid from each state. */
  private readonly allowed: Int32Array[];

  constructor(private readonly bytes: readonly (Uint8Array | null)[], vocabSize: number) {
    const words = bitmaskWords(vocabSize);
    this.allowed = [];
    for (let s = 0; s < UTF8_STATES; s++) {
      const mask = new Int32Array(words);
      for (let id = 0; id < vocabSize; id++) {
        if (this.after(s, id) !== UTF8_INVALID) mask[id >> 5]! |= 1 << (id & 31);
      }
      this.allowed.push(mask);
    }
  }

  /** The state after a token (special tokens only between characters; ids past the vocabulary: unchanged). */
  after(state: number, id: number): number {
    const b = this.bytes[id];
    if (b === undefined) return state;
    if (b === null) return state === 0 ? 0 : UTF8_INVALID;
    let s = state;
    for (let i = 0; i < b.length && s !== UTF8_INVALID; i++) s = utf8Step(s, b[i]!);
    return s;
  }

  /**
   * Clears from mask the tokens that would make the bytes invalid from this state. Should that
   * leave nothing (a vocabulary without the bytes it needs), the mask is left as it was.
   */
  restrict(mask: Int32Array, state: number): void {
    const a = this.allowed[state]!;
    let any = 0;
    for (let w = 0; w < a.length; w++) any |= mask[w]! & a[w]!;
    if (any === 0) return;
    for (let w = 0; w < a.length; w++) mask[w]! &= a[w]!;
  }
}
