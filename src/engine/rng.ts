// Seeded PRNG for sampling: one stream per request, so the same seed gives the same tokens
// whatever else shares the batch. xoshiro128** on 32-bit ints, seeded through splitmix32.

import { randomInt } from 'node:crypto';

/** splitmix32 step: a well-mixed 32-bit value from a 32-bit counter. */
function splitmix32(x: number): number {
  let z = (x + 0x9e3779b9) | 0;
  z = Math.imul(z ^ (z >>> 16), 0x21f0aaad);
  z = Math.imul(z ^ (z >>> 15), 0x735a2d97);
  return (z ^ (z >>> 15)) >>> 0;
}

export class Rng {
  private s0 = 0;
  private s1 = 0;
  private s2 = 0;
  private s3 = 0;

  /**
   * @param seed any finite number; integers up to 2^53 in magnitude are distinct seeds
   *   (fractions are truncated).
   * @param stream selects an independent stream for the same seed (e.g. choice i of n).
   */
  constructor(seed: number, stream = 0) {
    if (!Number.isFinite(seed)) throw new RangeError(`seed is ${seed}, expected a finite number`);
    if (!Number.isInteger(stream) || stream < 0 || stream > 0xffffffff) {
      throw new RangeError(`stream is ${stream}, expected an integer 0..4294967295`);
    }
    const s = BigInt.asUintN(64, BigInt(Math.trunc(seed)));
    const lo = Number(s & 0xffffffffn);
    const hi = Number(s >> 32n);
    // Chain the words through splitmix so nearby seeds give unrelated states.
    let x = splitmix32(lo);
    x = splitmix32(x ^ hi);
    x = splitmix32(x ^ Math.imul(stream, 0x85ebca6b));
    this.s0 = x;
    this.s1 = splitmix32(x + 1);
    this.s2 = splitmix32(x + 2);
    this.s3 = splitmix32(x + 3);
    // NOTE: xoshiro must never have an all-zero state.
    if ((this.s0 | this.s1 | this.s2 | this.s3) === 0) this.s0 = 1;
  }

  /** A seed for requests that did not give one. */
  static randomSeed(): number {
    return randomInt(0, 2 ** 48 - 1);
  }

  /** Next uint32 (xoshiro128**). */
  nextUint32(): number {
    const s1 = this.s1;
    const m = Math.imul(s1, 5);
    const result = Math.imul((m << 7) | (m >>> 25), 9) >>> 0;
    const t = s1 << 9;
    this.s2 ^= this.s0;
    this.s3 ^= this.s1;
    this.s1 ^= this.s2;
    this.s0 ^= this.s3;
    this.s2 ^= t;
    this.s3 = (this.s3 << 11) | (this.s3 >>> 21);
    return result;
  }

  /** Uniform in [0, 1) with 53 random bits. */
  nextFloat(): number {
    const a = this.nextUint32() >>> 5;   // 27 bits
    const b = this.nextUint32() >>> 6;   // 26 bits
    return (a * 67108864 + b) / 9007199254740992;
  }

  /** Snapshot of the state (to checkpoint or to replay a stream). */
  getState(): [number, number, number, number] {
    return [this.s0 >>> 0, this.s1 >>> 0, this.s2 >>> 0, this.s3 >>> 0];
  }

  setState(state: readonly [number, number, number, number]): void {
    if ((state[0] | state[1] | state[2] | state[3]) === 0) {
      throw new RangeError('state is all zero, which xoshiro128** cannot leave');
    }
    [this.s0, this.s1, this.s2, this.s3] = [state[0] | 0, state[1] | 0, state[2] | 0, state[3] | 0];
  }
}

/**
 * mulberry32: a tiny deterministic stream of floats in [0, 1) for synthetic data (the demo model's
 * weights, test and bench inputs). Not for sampling: requests use Rng above.
 */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
