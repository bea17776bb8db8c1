// RMSNorm (with fused residual), rotary embedding (rotate-half, interleaved, partial, YaRN
// scale) and SiLU(gate)*up against float64 references, on both SIMD levels and thread counts.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import {
  assertClose, bothSimd, bothThreadCounts, nanF32, native, rng, uniform,
} from './helpers/ops-ref.js';

function refRmsNorm(x: Float32Array, rows: number, dim: number, w: Float32Array, eps: number): Float64Array {
  const out = new Float64Array(rows * dim);
  for (let r = 0; r < rows; r++) {
    let ss = 0;
    for (let i = 0; i < dim; i++) ss += x[r * dim + i]! ** 2;
    const inv = 1 / Math.sqrt(ss / dim + eps);
    for (let i = 0; i < dim; i++) out[r * dim + i] = x[r * dim + i]! * inv * w[i]!;
  }
  return out;
}

// f32 rounding of the result is ~6e-8 relative; three roundings plus the rsqrt: 4e-7.
const NORM_TOL = { maxAbs: 1e-6, relL2: 4e-7 };

test('rmsNorm: rows x dim sweep vs float64, with and without residual, out aliasing x', () => {
  let seed = 500;
  bothSimd((level) => {
    bothThreadCounts((threads) => {
      for (const [rows, dim] of [[1, 1], [1, 15], [3, 16], [2, 17], [7, 64], [1, 7168], [33, 2048], [5, 4099]] as const) {
        const r = rng(seed++);
        const x = uniform(rows * dim, r, 2);
        const w = uniform(dim, r, 1.5);
        const eps = 1e-6;
        const label = `${level}/${threads} ${rows}x${dim}`;
        const out = nanF32(rows * dim);
        native.rmsNorm(x, rows, dim, w, eps, out, null);
        const ref = refRmsNorm(x, rows, dim, w, eps);
        const scale = Math.max(...ref.map(Math.abs));
        assertClose(out, ref, { maxAbs: NORM_TOL.maxAbs * scale, relL2: NORM_TOL.relL2 }, label);

        // residual: residual += x (one f32 add), out = norm(residual)
        const res = uniform(rows * dim, r, 2);
        const sum = res.map((v, i) => v + x[i]!);  // Float32Array.map rounds: the f32 add
        const out2 = nanF32(rows * dim);
        native.rmsNorm(x, rows, dim, w, eps, out2, res);
        assert.deepEqual(res, sum, `${label} residual`);
        const ref2 = refRmsNorm(sum, rows, dim, w, eps);
        assertClose(out2, ref2, { maxAbs: NORM_TOL.maxAbs * Math.max(...ref2.map(Math.abs)), relL2: NORM_TOL.relL2 }, `${label} fused`);

        // in place (out === x) gives the same bits as out-of-place
        const xin = Float32Array.from(x);
        native.rmsNorm(xin, rows, dim, w, eps, xin, null);
        assert.deepEqual(xin, out, `${label} in place`);
      }
    });
  });
});

test('rmsNorm: a zero row gives zeros (eps keeps the rsqrt finite)', () => {
  const out = nanF32(8);
  native.rmsNorm(new Float32Array(8), 1, 8, new Float32Array(8).fill(1), 1e-5, out, null);
  assert.deepEqual([...out], new Array(8).fill(0));
});

test('rmsNorm: bad arguments', () => {
  const x = new Float32Array(8);
  assert.throws(() => native.rmsNorm(x, 2, 4, new Float32Array(3), 1e-6, x, null),
    { name: 'RangeError', message: 'w.length is 3, expected at least 4' });
  assert.throws(() => native.rmsNorm(x, 2, 4, new Float32Array(4), -1, x, null),
    { name: 'RangeError', message: 'eps is -1, expected >= 0' });
  assert.throws(() => native.rmsNorm(x, 2, 4, new Float32Array(4), 1e-6, x, new Float32Array(7)),
    { name: 'RangeError', message: 'residual.length is 7, expected at least 8' });
  assert.throws(() => native.rmsNorm(x, 3, 4, new Float32Array(4), 1e-6, x, null),
    { name: 'RangeError', message: 'x.length is 8, expected at least 12' });
  assert.throws(() => native.rmsNorm(x, 2, 4, new Float32Array(4), '1' as never, x, null),
    { name: 'TypeError', message: 'eps must be a finite number' });
});

// ---- rope

interface RopeCase {
  t: number; heads: number; headStride: number; rowStride: number; offset: number; rot: number;
  interleaved: boolean; attnScale: number; maxPos: number;
}

function invFreqOf(rot: number, base: number): Float32Array {
  const f = new Float32Array(rot / 2);
  for (let i = 0; i < rot / 2; i++) f[i] = 1 / base ** ((2 * i) / rot);
  return f;
}

/** HF: freqs = f32(inv_freq * pos); cos/sin of that f32 angle, times attention scaling. */
function refRope(x: Float32Array, c: RopeCase, pos: Int32Array, invFreq: Float32Array): Float64Array {
  const out = Float64Array.from(x);
  const half = c.rot / 2;
  for (let t = 0; t < c.t; t++) {
    for (let h = 0; h < c.heads; h++) {
      const base = t * c.rowStride + h * c.headStride + c.offset;
      for (let i = 0; i < half; i++) {
        const angle = Math.fround(pos[t]! * invFreq[i]!);
        const cs = Math.cos(angle) * c.attnScale;
        const sn = Math.sin(angle) * c.attnScale;
        const ia = c.interleaved ? base + 2 * i : base + i;
        const ib = c.interleaved ? base + 2 * i + 1 : base + i + half;
        out[ia] = x[ia]! * cs - x[ib]! * sn;
        out[ib] = x[ib]! * cs + x[ia]! * sn;
      }
    }
  }
  return out;
}

test('rope: rotate-half / interleaved, partial rotary, strided heads, long positions', () => {
  const cases: RopeCase[] = [
    { t: 1, heads: 1, headStride: 2, rowStride: 2, offset: 0, rot: 2, interleaved: false, attnScale: 1, maxPos: 10 },
    { t: 5, heads: 4, headStride: 64, rowStride: 256, offset: 0, rot: 64, interleaved: false, attnScale: 1, maxPos: 4096 },
    { t: 3, heads: 8, headStride: 128, rowStride: 1100, offset: 0, rot: 64, interleaved: false, attnScale: 1, maxPos: 100 },
    // DeepSeek MLA q: [nope 128 | rope 64] per head, interleaved, YaRN mscale
    { t: 7, heads: 16, headStride: 192, rowStride: 3072, offset: 128, rot: 64, interleaved: true, attnScale: 1.3, maxPos: 160000 },
    // MLA k_pe: one "head" that is the tail of the latent row
    { t: 9, heads: 1, headStride: 576, rowStride: 576, offset: 512, rot: 64, interleaved: true, attnScale: 1, maxPos: 32768 },
    { t: 64, heads: 32, headStride: 128, rowStride: 4096, offset: 0, rot: 128, interleaved: false, attnScale: 1, maxPos: 1e6 },
  ];
  let seed = 600;
  bothThreadCounts((threads) => {
    for (const c of cases) {
      const r = rng(seed++);
      const n = c.t * c.rowStride;
      const x = uniform(n, r, 2);
      const pos = new Int32Array(c.t);
      for (let t = 0; t < c.t; t++) pos[t] = t === 0 ? c.maxPos : Math.floor(r() * c.maxPos);
      const invFreq = invFreqOf(c.rot, c.maxPos > 1e5 ? 1e6 : 10000);
      const ref = refRope(x, c, pos, invFreq);
      const got = Float32Array.from(x);
      native.rope(got, c.t, c.heads, c.rowStride, c.headStride, c.offset, pos, invFreq, c.attnScale, c.interleaved);
      const label = `${threads} t${c.t} h${c.heads} rot${c.rot} off${c.offset} il ${c.interleaved}`;
      // Rotated values: a few f32 roundings of O(attnScale * 2) numbers.
      assertClose(got, ref, { maxAbs: 1e-6 * 4 * c.attnScale, relL2: 4e-7 }, label);
      // Everything outside the rotary dims is untouched, bit for bit.
      for (let t = 0; t < c.t; t++) {
        for (let i = 0; i < c.rowStride; i++) {
          const inHead = i < c.heads * c.headStride;
          const d = i % c.headStride;
          if (inHead && d >= c.offset && d < c.offset + c.rot) continue;
          assert.ok(Object.is(got[t * c.rowStride + i], x[t * c.rowStride + i]), `${label}: element ${t},${i} changed`);
        }
      }
    }
  });
});

test('rope: the angle is rounded to f32 before cos/sin, as HF does', () => {
  // At position 1e6 the f32 angle differs from the exact product by up to ~0.03 radians.
  const invFreq = new Float32Array([1, 0.7310585975646973]);
  const pos = new Int32Array([999_999]);
  const x = new Float32Array([1, 0, 0, 0]);
  native.rope(x, 1, 1, 4, 4, 0, pos, invFreq, 1, false);
  const angle = Math.fround(999_999 * invFreq[0]!);
  assert.ok(Math.abs(x[0]! - Math.cos(angle)) < 1e-6 && Math.abs(x[2]! - Math.sin(angle)) < 1e-6,
    `got (${x[0]}, ${x[2]}), expected (${Math.cos(angle)}, ${Math.sin(angle)})`);
  const y = new Float32Array([0, 1, 0, 0]);
  native.rope(y, 1, 1, 4, 4, 0, pos, invFreq, 1, false);
  const exact = 999_999 * invFreq[1]!;
  const f32 = Math.fround(exact);
  assert.ok(Math.abs(Math.cos(exact) - Math.cos(f32)) > 1e-3, 'the case must tell the two apart');
  assert.ok(Math.abs(y[1]! - Math.cos(f32)) < 1e-6 && Math.abs(y[3]! - Math.sin(f32)) < 1e-6,
    `cos/sin of the f32 angle: (${y[1]}, ${y[3]}) vs (${Math.cos(f32)}, ${Math.sin(f32)})`);
});

test('rope: the cos/sin table gives the values computed per call (many frequency sets, positions past its end)', () => {
  // The native side keeps cos/sin per position for up to 8 frequency sets and 2^19 positions and
  // computes the rest per call: every way in must give the reference's values, and the same bits
  // as a first call when asked again (a table made by one call, read by the next).
  const c: RopeCase = { t: 12, heads: 3, headStride: 64, rowStride: 192, offset: 0, rot: 64, interleaved: false, attnScale: 1, maxPos: 0 };
  const r = rng(4242);
  for (let set = 0; set < 11; set++) {
    const invFreq = invFreqOf(c.rot, 10000 + 1000 * set);
    const pos = Int32Array.from({ length: c.t }, (_, t) =>
      t < 4 ? t : t < 8 ? (1 << 19) - 2 + (t - 4) : Math.floor(r() * 3e6));
    const x = uniform(c.t * c.rowStride, r, 2);
    const ref = refRope(x, c, pos, invFreq);
    const first = Float32Array.from(x);
    native.rope(first, c.t, c.heads, c.rowStride, c.headStride, c.offset, pos, invFreq, c.attnScale, c.interleaved);
    assertClose(first, ref, { maxAbs: 4e-6, relL2: 4e-7 }, `set ${set}`);
    for (const order of [pos, pos.slice().reverse()]) {
      const again = new Float32Array(c.t * c.rowStride);
      const idx = Array.from(order, (p) => pos.indexOf(p));
      idx.forEach((src, t) => again.set(x.subarray(src * c.rowStride, (src + 1) * c.rowStride), t * c.rowStride));
      native.rope(again, c.t, c.heads, c.rowStride, c.headStride, c.offset, order, invFreq, c.attnScale, c.interleaved);
      idx.forEach((src, t) => {
        for (let i = 0; i < c.rowStride; i++)
          assert.ok(Object.is(again[t * c.rowStride + i], first[src * c.rowStride + i]), `set ${set}: position ${order[t]} element ${i} differs`);
      });
    }
  }
});

test('rope: bad arguments', () => {
  const x = new Float32Array(64);
  const f = new Float32Array(4);
  const p = new Int32Array([0, 1]);
  assert.throws(() => native.rope(x, 2, 2, 16, 8, 1, p, f, 1, false),
    { name: 'RangeError', message: 'offset + rotDim is 9 (rotDim = 2 * invFreq.length), expected at most headStride (8)' });
  assert.throws(() => native.rope(x, 2, 2, 15, 8, 0, p, f, 1, false),
    { name: 'RangeError', message: 'rowStride is 15, expected at least heads * headStride (16)' });
  assert.throws(() => native.rope(x, 2, 2, 16, 8, 0, new Int32Array([0, -3]), f, 1, false),
    { name: 'RangeError', message: 'positions[1] is -3, expected >= 0' });
  assert.throws(() => native.rope(x, 2, 2, 16, 8, 0, new Int32Array(1), f, 1, false),
    { name: 'RangeError', message: 'positions.length is 1, expected at least 2' });
  assert.throws(() => native.rope(new Float32Array(23), 2, 2, 16, 8, 0, p, f, 1, false),
    { name: 'RangeError', message: 'x.length is 23, expected at least 32' });
  assert.throws(() => native.rope(x, 2, 2, 16, 8, 0, p, new Float32Array(0), 1, false),
    { name: 'RangeError', message: 'invFreq.length is 0, expected at least 1' });
  assert.throws(() => native.rope(x, 2, 2, 16, 8, 0, p, f, Infinity, false),
    { name: 'RangeError', message: 'attnScale is Infinity, expected a finite number' });
});

// ---- silu * up

test('siluMul: vs float64 across widths, extremes, both SIMD levels', () => {
  let seed = 700;
  bothSimd((level) => {
    bothThreadCounts((threads) => {
      for (const [t, inter] of [[1, 1], [1, 15], [2, 16], [3, 33], [1, 18432], [33, 1408], [8, 4097]] as const) {
        const r = rng(seed++);
        const gu = uniform(t * 2 * inter, r, 12);
        const out = nanF32(t * inter);
        native.siluMul(gu, t, inter, out);
        const ref = new Float64Array(t * inter);
        for (let tok = 0; tok < t; tok++) {
          for (let i = 0; i < inter; i++) {
            const g = gu[tok * 2 * inter + i]!;
            ref[tok * inter + i] = (g / (1 + Math.exp(-g))) * gu[tok * 2 * inter + inter + i]!;
          }
        }
        // ~3 f32 roundings of values up to 144 (exp ~1 ulp on top)
        const scale = Math.max(...ref.map(Math.abs));
        assertClose(out, ref, { maxAbs: 4e-7 * scale, relL2: 3e-7 }, `${level}/${threads} t${t} i${inter}`);
      }
      const g = new Float32Array([-200, -90, -20, 0, 20, 90, 200, -0, Infinity, -Infinity, NaN, 1e-30, 0, 0, 0, 0, 0]);
      const gu = new Float32Array(g.length * 2);
      gu.set(g);
      gu.fill(1, g.length);
      const out = nanF32(g.length);
      native.siluMul(gu, 1, g.length, out);
      const want = [-0, -0, -20 / (1 + Math.exp(20)), 0, 20 / (1 + Math.exp(-20)), 90, 200, -0, Infinity, NaN, NaN, 1e-30 / 2];
      for (let i = 0; i < want.length; i++) {
        const ok = Number.isNaN(want[i]!) ? Number.isNaN(out[i]) :
          out[i] === want[i] || Math.abs(out[i]! - want[i]!) <= 1e-6 * Math.abs(want[i]!) + 1e-37;
        assert.ok(ok, `${level}: silu(${g[i]}) = ${out[i]}, expected ${want[i]}`);
      }
    });
  });
});

test('siluMul: bad arguments', () => {
  assert.throws(() => native.siluMul(new Float32Array(7), 1, 4, new Float32Array(4)),
    { name: 'RangeError', message: 'gu.length is 7, expected at least 8' });
  assert.throws(() => native.siluMul(new Float32Array(8), 1, 4, new Float32Array(3)),
    { name: 'RangeError', message: 'out.length is 3, expected at least 4' });
  assert.throws(() => native.siluMul(new Float32Array(8), 1, 0, new Float32Array(3)),
    { name: 'RangeError', message: 'i is 0, expected 1..2147483647' });
});
