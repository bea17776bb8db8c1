// Float64 references for the GEMM tests (gemm.test.ts, quant-gemm.test.ts): y = x * W^T with
// optional bf16 rounding of x, SiLU, and the normalised-L2 / max-abs comparison.
import assert from 'node:assert/strict';

const f32buf = new Float32Array(1);
const u32buf = new Uint32Array(f32buf.buffer);

/** v rounded to bf16 (nearest even), as a number. */
export function roundBf16(v: number): number {
  f32buf[0] = v;
  const u = u32buf[0]!;
  u32buf[0] = (((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) << 16) >>> 0;
  return f32buf[0]!;
}

/** n uniform values in [-scale, scale). */
export function uniform(rand: () => number, n: number, scale = 1): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = (rand() * 2 - 1) * scale;
  return a;
}

/** y[m, n] = x[m, k] * w[n, k]^T in float64 (x rounded to bf16 first when roundX). */
export function refGemm(x: ArrayLike<number>, m: number, w: Float64Array, n: number, k: number,
                 roundX: boolean): Float64Array {
  const y = new Float64Array(m * n);
  const xr = new Float64Array(m * k);
  for (let i = 0; i < m * k; i++) xr[i] = roundX ? roundBf16(x[i]!) : x[i]!;
  for (let r = 0; r < m; r++)
    for (let j = 0; j < n; j++) {
      let s = 0;
      for (let c = 0; c < k; c++) s += xr[r * k + c]! * w[j * k + c]!;
      y[r * n + j] = s;
    }
  return y;
}

export function silu(v: number): number {
  return v / (1 + Math.exp(-v));
}

/** Asserts normalised L2 and max-abs (relative to max |ref|) errors within tol; returns the L2. */
export function compare(got: Float32Array, ref: Float64Array, tol: number, label: string): number {
  let num = 0, den = 0, maxAbs = 0, maxRef = 0;
  for (let i = 0; i < ref.length; i++) {
    const g = got[i]!;
    if (!Number.isFinite(g)) assert.fail(`${label}: element ${i} is ${g} (not written?)`);
    const d = g - ref[i]!;
    num += d * d;
    den += ref[i]! * ref[i]!;
    maxAbs = Math.max(maxAbs, Math.abs(d));
    maxRef = Math.max(maxRef, Math.abs(ref[i]!));
  }
  const l2 = den > 0 ? Math.sqrt(num / den) : Math.sqrt(num);
  assert.ok(l2 <= tol, `${label}: normalised L2 error ${l2.toExponential(2)} > ${tol}`);
  assert.ok(maxAbs <= tol * Math.max(maxRef, 1e-30),
    `${label}: max-abs error ${maxAbs.toExponential(2)} > ${tol} * max|ref| ${maxRef.toExponential(2)}`);
  return l2;
}

/** Asserts a and b hold the same f32 bits element for element (batch invariance checks). */
export function bitsEqual(a: Float32Array, b: Float32Array, label: string): void {
  assert.equal(a.length, b.length, `${label}: lengths`);
  const ua = new Uint32Array(a.buffer, a.byteOffset, a.length);
  const ub = new Uint32Array(b.buffer, b.byteOffset, b.length);
  for (let i = 0; i < ua.length; i++)
    if (ua[i] !== ub[i]) assert.fail(`${label}: element ${i} differs: ${a[i]} vs ${b[i]}`);
}
