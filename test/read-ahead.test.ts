// Read-ahead (NativeAddon.prefetchList / prefetch): the pool's idle workers read the weights a
// decode step's next GEMMs use while the caller runs serial code. Argument checks, the workers
// actually reading a posted list, weights disposed under a posted list, and models whose logits
// are the same bits with read-ahead on and off.
import assert from 'node:assert/strict';
import { existsSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';

import { loadModel } from '../src/model/load.js';
import { quantizeSpec } from '../src/model/quantize.js';
import { loadNative, packageRoot } from '../src/native/index.js';
import { fixtureSequences, forcedLogits } from './helpers/quant-fidelity.js';

const n = loadNative();

function randomWeight(rows: number, k: number, seed: number, format?: 'int4' | 'int8') {
  let s = seed;
  const src = new Float32Array(rows * k).map(() => ((s = (s * 1103515245 + 12345) >>> 0) / 2 ** 32) - 0.5);
  return format ? n.packWeight(src, 'f32', rows, k, format, format === 'int4' ? 32 : 0) : n.packWeight(src, 'f32', rows, k);
}

test('prefetchList and prefetch validate their arguments', () => {
  const w = randomWeight(16, 32, 1);
  assert.throws(() => n.prefetchList(w, {} as never), { name: 'TypeError', message: 'weights[i] must be a PackedWeight' });
  assert.throws(() => n.prefetch({} as never), { name: 'TypeError', message: 'list must be a prefetchList() result or null' });
  assert.throws(() => n.prefetch(w as never), { name: 'TypeError', message: 'list must be a prefetchList() result or null' });
  n.prefetch(n.prefetchList());  // an empty list clears the hint
  n.prefetch(null);
  w.dispose();
  assert.throws(() => n.prefetchList(w), { code: 'E_DISPOSED' });
});

test('idle workers read a posted list; weights disposed under it are skipped', { timeout: 60_000 }, async (t) => {
  const threads = n.setNumThreads(0);
  if (threads < 2) {
    t.skip(`one thread (${threads}): no worker idles while the caller works`);
    return;
  }
  const weights = [randomWeight(1024, 1024, 2, 'int4'), randomWeight(512, 1024, 3, 'int8'), randomWeight(256, 512, 4)];
  const total = weights.reduce((a, w) => a + w.sizeBytes, 0);
  const x = new Float32Array(1024), y = new Float32Array(1024);
  const list = n.prefetchList(...weights);
  const before = n.prefetchedBytes();
  // A GEMM wakes the workers; the list posted right after is read while they spin. A loaded machine
  // may deschedule them past their spin (a CI run beside other work read nothing in 50 tries over 1 s):
  // keep trying for up to 15 s before calling it a failure.
  const deadline = performance.now() + 15_000;
  while (performance.now() < deadline && n.prefetchedBytes() - before < total) {
    n.denseGemm(x, 1, weights[2]!, y, null, false, false);
    n.prefetch(list);
    const until = performance.now() + 20;
    while (performance.now() < until && n.prefetchedBytes() - before < total) { /* the caller's serial work */ }
  }
  const read = n.prefetchedBytes() - before;
  assert.ok(read >= weights[0]!.sizeBytes, `the workers read ${read} of the list's ${total} bytes`);
  // Disposed weights free their memory at once: the posted list skips them.
  n.prefetch(list);
  for (const w of weights) w.dispose();
  n.denseGemm(x, 1, randomWeight(64, 1024, 5), y, null, false, false);
  await new Promise((r) => setTimeout(r, 20));
  n.prefetch(list);
  await new Promise((r) => setTimeout(r, 20));
  n.prefetch(null);
});

test('logits are the same bits with read-ahead on and off', { timeout: 300_000 }, () => {
  const fixturesDir = path.join(packageRoot(), 'test', 'fixtures');
  const fixtures = readdirSync(fixturesDir).filter((d) => existsSync(path.join(fixturesDir, d, 'golden.json'))).sort();
  assert.ok(fixtures.length > 0);
  for (const name of fixtures) {
    const dir = path.join(fixturesDir, name);
    for (const quantize of [null, quantizeSpec('int4', 32, true, true)]) {
      const { model } = loadModel(dir, { fast: true, quantize });
      try {
        const seqs = fixtureSequences(dir).slice(0, 1);
        model.readAheadOn = false;
        const off = forcedLogits(model, seqs);
        model.readAheadOn = true;
        const on = forcedLogits(model, seqs);
        assert.equal(on.length, off.length);
        for (let i = 0; i < on.length; i++) assert.deepEqual(on[i], off[i], `${name} ${quantize ? 'int4' : 'bf16'} position ${i}`);
      } finally {
        model.dispose();
      }
    }
  }
});
