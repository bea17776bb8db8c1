// Softmax / log-softmax rows (including a vocabulary-sized row split across threads) and top-n
// (descending, ties to the lower index, NaN last) against float64 / exact references.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import {
  assertClose, bothSimd, bothThreadCounts, grid, nanF32, native, poisonI32, rng, uniform,
} from './helpers/ops-ref.js';

function refSoftmax(x: Float32Array, rows: number, cols: number, log: boolean): Float64Array {
  const out = new Float64Array(rows * cols);
  for (let r = 0; r < rows; r++) {
    const row = x.subarray(r * cols, (r + 1) * cols);
    let mx = -Infinity;
    for (const v of row) mx = Math.max(mx, v);
    let sum = 0;
    for (const v of row) sum += Math.exp(v - mx);
    for (let i = 0; i < cols; i++)
      out[r * cols + i] = log ? row[i]! - mx - Math.log(sum) : Math.exp(row[i]! - mx) / sum;
  }
  return out;
}

test('softmax / log-softmax: sweep vs float64 (vocabulary rows split over threads), in place', () => {
  let seed = 800;
  bothSimd((level) => {
    bothThreadCounts((threads) => {
      for (const [rows, cols] of [[1, 1], [2, 7], [3, 16], [1, 33], [9, 1000], [1, 151_936], [2, 70_000], [40, 2048]] as const) {
        const r = rng(seed++);
        const x = uniform(rows * cols, r, 12);
        for (const log of [false, true]) {
          const label = `${level}/${threads} ${rows}x${cols} log ${log}`;
          const out = nanF32(rows * cols);
          native.softmax(x, rows, cols, out, log);
          const ref = refSoftmax(x, rows, cols, log);
          if (log) {
            // log-probabilities are O(10): absolute error of a few f32 ulps of the operands
            assertClose(out, ref, { maxAbs: 1e-5, relL2: 1e-6 }, label);
          } else {
            // probabilities, per element: exp ~1 ulp and the scale 1 ulp (5e-7 together), plus
            // the f32 rounding of x - max (torch subtracts in f32 too): half an ulp of |x - max|
            // is an absolute error of the exponent, i.e. a relative error of the result.
            let worst = 0;
            for (let rr = 0; rr < rows; rr++) {
              let mx = -Infinity;
              for (let i = 0; i < cols; i++) mx = Math.max(mx, x[rr * cols + i]!);
              for (let i = rr * cols; i < (rr + 1) * cols; i++) {
                const allowed = 5e-7 + Math.abs(x[i]! - mx) * 2 ** -24;
                const rel = Math.abs(out[i]! - ref[i]!) / Math.max(ref[i]!, 1e-30) / allowed;
                if (!(rel <= worst)) worst = Number.isNaN(rel) ? Infinity : rel;
              }
            }
            assert.ok(worst <= 1, `${label}: worst relative error ${worst} of the allowed`);
            for (let rr = 0; rr < rows; rr++) {
              let s = 0;
              for (let i = 0; i < cols; i++) s += out[rr * cols + i]!;
              assert.ok(Math.abs(s - 1) < 1e-5, `${label}: row ${rr} sums to ${s}`);
            }
          }
          const inPlace = Float32Array.from(x);
          native.softmax(inPlace, rows, cols, inPlace, log);
          assert.deepEqual(inPlace, out, `${label}: in place`);
        }
      }
    });
  });
});

test('softmax: -inf entries get probability 0, extreme spreads do not overflow', () => {
  bothSimd((level) => {
    const x = new Float32Array([0, -Infinity, 80, -80, 88, -1e30, 1e30, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3]);
    const out = nanF32(x.length);
    native.softmax(x, 1, x.length, out, false);
    assert.equal(out[1], 0, level);
    assert.equal(out[6], 1, level);
    assert.equal(out[0], 0, level);
    native.softmax(x, 1, x.length, out, true);
    assert.equal(out[1], -Infinity, level);
    assert.equal(out[6], 0, level);
  });
});

// ---- top-n

function refTopN(x: Float32Array, rows: number, cols: number, n: number) {
  const ids: number[] = [];
  const vals: number[] = [];
  const key = (v: number) => (Number.isNaN(v) ? -Infinity : v);
  for (let r = 0; r < rows; r++) {
    const idx = Array.from({ length: cols }, (_, i) => i);
    const v = (i: number) => x[r * cols + i]!;
    idx.sort((a, b) => {
      const na = Number.isNaN(v(a));
      const nb = Number.isNaN(v(b));
      if (na !== nb) return na ? 1 : -1;  // NaN after everything, even -inf
      return (key(v(b)) - key(v(a))) || (a - b);
    });
    for (let j = 0; j < n; j++) {
      ids.push(idx[j]!);
      vals.push(v(idx[j]!));
    }
  }
  return { ids, vals };
}

test('topN: exact ids and values, ties to the lower index, small and large n', () => {
  const r = rng(900);
  const cases = ([[1, 1, 1], [3, 10, 10], [2, 17, 3], [5, 1000, 8], [1, 151_936, 20], [4, 5000, 64],
    [3, 5000, 65], [2, 300, 300], [64, 1024, 4]] as const).map(([rows, cols, n]) => {
    // a coarse grid over a small range: many exact ties
    const x = grid(rows * cols, r, cols > 1000 ? 50 : 2);
    return { rows, cols, n, x, ref: refTopN(x, rows, cols, n) };
  });
  bothSimd((level) => {
    bothThreadCounts((threads) => {
      for (const { rows, cols, n, x, ref } of cases) {
        const ids = poisonI32(rows * n);
        const vals = nanF32(rows * n);
        native.topN(x, rows, cols, n, ids, vals);
        const label = `${level}/${threads} ${rows}x${cols} n${n}`;
        assert.deepEqual([...ids], ref.ids, label);
        assert.deepEqual([...vals], ref.vals, label);
      }
    });
  });
});

test('topN: NaN ranks after -inf; an ascending row (every element inserts) works', () => {
  bothSimd((level) => {
    const x = new Float32Array(40).fill(NaN);
    x[3] = -Infinity;
    x[30] = 1;
    x[35] = 1;
    const ids = poisonI32(4);
    const vals = nanF32(4);
    native.topN(x, 1, 40, 4, ids, vals);
    assert.deepEqual([...ids], [30, 35, 3, 0], level);
    const asc = Float32Array.from({ length: 100 }, (_, i) => i);
    native.topN(asc, 1, 100, 4, ids, vals);
    assert.deepEqual([...ids], [99, 98, 97, 96], level);
    assert.deepEqual([...vals], [99, 98, 97, 96], level);
  });
});

test('softmax / topN: bad arguments', () => {
  const x = new Float32Array(12);
  assert.throws(() => native.softmax(x, 2, 7, new Float32Array(14), false),
    { name: 'RangeError', message: 'x.length is 12, expected at least 14' });
  assert.throws(() => native.softmax(x, 2, 6, new Float32Array(12), 0 as never),
    { name: 'TypeError', message: 'log must be a boolean' });
  assert.throws(() => native.softmax(x, 2, 0, new Float32Array(12), false),
    { name: 'RangeError', message: 'cols is 0, expected 1..2147483647' });
  assert.throws(() => native.topN(x, 2, 6, 7, new Int32Array(14), new Float32Array(14)),
    { name: 'RangeError', message: 'n is 7, expected 1..6' });
  assert.throws(() => native.topN(x, 2, 6, 3, new Int32Array(5), new Float32Array(6)),
    { name: 'RangeError', message: 'ids.length is 5, expected at least 6' });
  assert.throws(() => native.topN(x, 2, 6, 3, new Int32Array(6), new Float64Array(6) as never),
    { name: 'TypeError', message: 'vals must be a Float32Array' });
});
