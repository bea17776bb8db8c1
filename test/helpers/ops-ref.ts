// Shared pieces of the op tests: a seeded PRNG, NaN-poisoned outputs, error measures against
// float64 references, plain bit-level dtype conversions, and a runner over both SIMD levels.
import assert from 'node:assert/strict';

import { loadNative } from '../../src/native/index.js';
import { mulberry32 } from '../../src/engine/rng.js';
import { fileSeed } from './seed.js';

export const native = loadNative();

const seedBase = fileSeed(0, 'base added to each case seed');
export const rng = (seed: number) => mulberry32(seedBase + seed);

export function uniform(n: number, r: () => number, amp = 1): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = (r() * 2 - 1) * amp;
  return a;
}

/** Values on a 1/64 grid: distinct values are far apart (no rounding-level near-ties) and
 * equal values tie exactly, which is what a tie-breaking test needs. */
export function grid(n: number, r: () => number, amp = 4): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = Math.round((r() * 2 - 1) * amp * 64) / 64;
  return a;
}

export function nanF32(n: number): Float32Array {
  return new Float32Array(n).fill(NaN);
}

export function poisonI32(n: number): Int32Array {
  return new Int32Array(n).fill(-0x7ead);
}

export interface ErrStats { maxAbs: number; relL2: number }

export function errStats(got: ArrayLike<number>, ref: ArrayLike<number>): ErrStats {
  assert.equal(got.length, ref.length, 'length mismatch');
  let maxAbs = 0;
  let num = 0;
  let den = 0;
  for (let i = 0; i < ref.length; i++) {
    const d = Math.abs(got[i]! - ref[i]!);
    if (!(d <= maxAbs)) maxAbs = Number.isNaN(d) ? Infinity : d;
    num += d * d;
    den += ref[i]! * ref[i]!;
  }
  return { maxAbs, relL2: den > 0 ? Math.sqrt(num / den) : Math.sqrt(num) };
}

/** Fails with both measures in the message when either bound is exceeded (NaN fails). */
export function assertClose(got: ArrayLike<number>, ref: ArrayLike<number>,
  tol: { maxAbs: number; relL2: number }, label: string): ErrStats {
  const e = errStats(got, ref);
  assert.ok(e.maxAbs <= tol.maxAbs && e.relL2 <= tol.relL2,
    `${label}: maxAbs ${e.maxAbs.toExponential(3)} (tol ${tol.maxAbs}), ` +
    `relL2 ${e.relL2.toExponential(3)} (tol ${tol.relL2})`);
  return e;
}

/** Runs fn under the best kernels, the AVX2 ones and the portable ones (each where present), restoring 'auto'. */
export function bothSimd(fn: (level: 'auto' | 'avx2' | 'scalar') => void): void {
  // 'avx2': the AVX2 + FMA kernels of CPUs without AVX-512 (what the CPU has, where it lacks AVX2).
  for (const level of ['auto', 'avx2', 'scalar'] as const) {
    native.setSimdLevel(level);
    try {
      fn(level);
    } finally {
      native.setSimdLevel('auto');
    }
  }
}

/** Runs fn with the pool at 1 thread and at its usual size (both code paths of parallel ops). */
export function bothThreadCounts(fn: (threads: number) => void): void {
  const before = native.capabilities().threads;
  const counts = [...new Set([1, Math.max(2, before)])];
  try {
    for (const n of counts) fn(native.setNumThreads(n));
  } finally {
    native.setNumThreads(before);
  }
}

// ---- dtype conversions written plainly from the IEEE definitions (the references)
const f32buf = new Float32Array(1);
const u32buf = new Uint32Array(f32buf.buffer);

export function f32Bits(x: number): number {
  f32buf[0] = x;
  return u32buf[0]!;
}

export function bitsF32(u: number): number {
  u32buf[0] = u >>> 0;
  return f32buf[0]!;
}

function roundHalfEven(q: number): number {
  const f = Math.floor(q);
  const d = q - f;
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}

export function bf16ToF32(h: number): number {
  return bitsF32((h & 0xffff) << 16);
}

export function f32ToBf16(x: number): number {
  const u = f32Bits(x);
  if ((u & 0x7fffffff) > 0x7f800000) return ((u >>> 16) | 0x40) & 0xffff;
  // the 16 dropped bits decide: above half up, below down, exactly half to even
  const hi = u >>> 16;
  const lo = u & 0xffff;
  if (lo > 0x8000 || (lo === 0x8000 && (hi & 1) === 1)) return (hi + 1) & 0xffff;
  return hi;
}

export function f16ToF32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 31) return mant ? NaN : sign * Infinity;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

export function f32ToF16(x: number): number {
  if (Number.isNaN(x)) return (f32Bits(x) >>> 16 & 0x8000) | 0x7e00;
  const sign = x < 0 || Object.is(x, -0) ? 0x8000 : 0;
  const a = Math.abs(x);
  if (a < 2 ** -14) return sign | roundHalfEven(a / 2 ** -24);  // 1024 becomes the min normal
  let e = Math.floor(Math.log2(a));
  if (2 ** e > a) e--;
  if (2 ** (e + 1) <= a) e++;
  let frac = roundHalfEven((a / 2 ** e - 1) * 1024);
  if (frac === 1024) { frac = 0; e++; }
  if (e + 15 >= 31) return sign | 0x7c00;
  return sign | ((e + 15) << 10) | frac;
}

/** OCP fp8 e4m3fn (no infinities; 0x7f and 0xff are NaN). */
export function fp8E4m3ToF32(v: number): number {
  const sign = v & 0x80 ? -1 : 1;
  const exp = (v >> 3) & 0xf;
  const mant = v & 7;
  if (exp === 15 && mant === 7) return NaN;
  if (exp === 0) return sign * mant * 2 ** -9;
  return sign * (1 + mant / 8) * 2 ** (exp - 7);
}
