// The thread pool under back-to-back jobs of mixed sizes, with more pool threads than cores so
// workers often wake after the caller has claimed every task (late joiners must neither run a
// stale job nor be waited for): every result is checked against a float64 reference.
import assert from 'node:assert/strict';
import os from 'node:os';
import { test } from 'node:test';

import { mulberry32 } from '../src/engine/rng.js';
import { loadNative } from '../src/native/index.js';
import { fileSeed } from './helpers/seed.js';

const seedBase = fileSeed(0, 'base added to each case seed');
function rng(seed: number): () => number {
  const next = mulberry32(seedBase + seed);
  return () => next() - 0.5;
}

test('back-to-back jobs of mixed sizes on an oversubscribed pool give exact results', () => {
  const n = loadNative();
  const before = n.capabilities().threads;
  const rand = rng(99);
  const K = 64;
  const shapes = [1, 16, 256, 2048].map((N) => {
    const w = Float32Array.from({ length: N * K }, rand);
    return { N, w, pw: n.packWeight(w, 'f32', N, K) };
  });
  try {
    for (const threads of [2, Math.max(4, 2 * os.availableParallelism())]) {
      const used = n.setNumThreads(threads);
      assert.ok(used >= 1);
      for (let it = 0; it < 1500; it++) {
        const s = shapes[(it * 7 + (it >> 3)) % shapes.length]!;
        const m = 1 + (it % 3);
        const x = Float32Array.from({ length: m * K }, rand);
        const y = new Float32Array(m * s.N).fill(NaN);
        n.denseGemm(x, m, s.pw, y, null, false, false);
        // Spot-check rows of the output (all of it for small N) against float64.
        for (let r = 0; r < m; r++) {
          for (let j = 0; j < s.N; j += s.N > 64 ? 37 : 1) {
            let ref = 0;
            for (let k = 0; k < K; k++) ref += x[r * K + k]! * s.w[j * K + k]!;
            const got = y[r * s.N + j]!;
            if (!(Math.abs(got - ref) <= 1e-5 * (1 + Math.abs(ref))))
              assert.fail(`threads ${threads} iteration ${it} [${m}x${s.N}] y[${r},${j}] = ${got}, expected ${ref}`);
          }
          // The last element of every row is always checked (the tail task).
          let ref = 0;
          for (let k = 0; k < K; k++) ref += x[r * K + k]! * s.w[(s.N - 1) * K + k]!;
          assert.ok(Math.abs(y[r * s.N + s.N - 1]! - ref) <= 1e-5 * (1 + Math.abs(ref)));
        }
      }
    }
  } finally {
    n.setNumThreads(before);
    for (const s of shapes) s.pw.dispose();
  }
});
