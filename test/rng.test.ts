// The seeded PRNG: bit-exact xoshiro128**, reproducible per seed and stream, uniform floats.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { Rng } from '../src/engine/rng.js';

test('xoshiro128** matches the reference implementation from state {1, 2, 3, 4}', () => {
  const rng = new Rng(0);
  rng.setState([1, 2, 3, 4]);
  // Printed by the authors' C reference (xoshiro128starstar.c) from the same state.
  const first = Array.from({ length: 8 }, () => rng.nextUint32());
  assert.deepEqual(first, [11520, 0, 5927040, 70819200, 2031721883, 1637235492, 1287239034, 3734860849]);
  for (let i = 0; i < 992; i++) rng.nextUint32();
  assert.equal(rng.nextUint32(), 136054147);
  assert.throws(() => rng.setState([0, 0, 0, 0]), RangeError);
});

test('same seed and stream give the same sequence; other seeds and streams differ', () => {
  const draw = (r: Rng): number[] => Array.from({ length: 64 }, () => r.nextUint32());
  const seeds = [0, 1, 2, -1, 42, 2 ** 32, 2 ** 32 + 1, 2 ** 53 - 1, 123456789012];
  const seen = new Set<string>();
  for (const seed of seeds) {
    for (const stream of [0, 1, 7]) {
      const a = draw(new Rng(seed, stream));
      assert.deepEqual(draw(new Rng(seed, stream)), a);
      const key = a.join(',');
      assert.ok(!seen.has(key), `seed ${seed} stream ${stream} repeats another sequence`);
      seen.add(key);
    }
  }
  // Interleaving two generators does not change either one's stream.
  const x = new Rng(5), y = new Rng(6);
  const xs: number[] = [], ys: number[] = [];
  for (let i = 0; i < 64; i++) {
    xs.push(x.nextUint32());
    if (i % 3 === 0) ys.push(y.nextUint32());
  }
  assert.deepEqual(xs, draw(new Rng(5)));
  assert.deepEqual(ys, draw(new Rng(6)).slice(0, ys.length));
});

test('nextFloat is uniform on [0, 1)', () => {
  const rng = new Rng(2024);
  const n = 200_000;
  const bins = new Array<number>(20).fill(0);
  let sum = 0;
  for (let i = 0; i < n; i++) {
    const u = rng.nextFloat();
    assert.ok(u >= 0 && u < 1);
    bins[Math.floor(u * 20)]!++;
    sum += u;
  }
  // Chi-square with 19 degrees of freedom: 43.8 is the 0.999 quantile.
  const expected = n / 20;
  const chi2 = bins.reduce((acc, b) => acc + (b - expected) ** 2 / expected, 0);
  assert.ok(chi2 < 43.8, `chi2 ${chi2}`);
  assert.ok(Math.abs(sum / n - 0.5) < 0.005);
});

test('bad seeds and streams are RangeErrors', () => {
  assert.throws(() => new Rng(NaN), { name: 'RangeError', message: 'seed is NaN, expected a finite number' });
  assert.throws(() => new Rng(1, -1), {
    name: 'RangeError', message: 'stream is -1, expected an integer 0..4294967295',
  });
  const s = Rng.randomSeed();
  assert.ok(Number.isInteger(s) && s >= 0);
});
