// The decode step's reused buffers: a forward writes its logits into the buffer the caller lends
// (ForwardBatch.logitsOut) with the bits of a freshly allocated result, and the engine lends one
// buffer to every step without changing any token.
import assert from 'node:assert/strict';
import path from 'node:path';
import { test } from 'node:test';

import { EngineCore } from '../src/engine/engine-core.js';
import type { GenerateRequest } from '../src/engine/types.js';
import type { ForwardBatch, ForwardModel } from '../src/model/forward-batch.js';
import { loadModel } from '../src/model/load.js';
import { packageRoot } from '../src/native/index.js';
import { DirectRunner, argmax } from './helpers/model-runner.js';

const fixture = (name: string): string => path.join(packageRoot(), 'test', 'fixtures', name);

/** The model with every forward given `buf` as its logits buffer (null: none), the rest untouched. */
function lending<C>(model: ForwardModel<C>, buf: Float32Array | null, seen: ForwardBatch[]): ForwardModel<C> {
  const w = Object.create(model) as ForwardModel<C>;
  w.forward = (batch, cache, blockSize) => {
    const b = buf ? { ...batch, logitsOut: buf } : batch;
    seen.push(b);
    return model.forward(b, cache, blockSize);
  };
  return w;
}

for (const name of ['mixtral', 'deepseek_v2']) {
  test(`${name}: logits land in the lent buffer with the bits of a fresh array (prefill rows picked, decode rows in order)`, () => {
    const { model } = loadModel(fixture(name), { fast: false });
    const V = model.spec.vocabSize;
    const prompts = [[5, 9, 13, 2, 77], [8, 3], [40, 41, 42]];
    const buf = new Float32Array(prompts.length * V + 7).fill(NaN);
    const plain = new DirectRunner(model, 4, 256);
    const lent = new DirectRunner(lending(model, buf, []), 4, 256);
    const ps = prompts.map(() => plain.newSeq()), ls = prompts.map(() => lent.newSeq());
    let a = plain.step(ps, prompts, false);
    let b = lent.step(ls, prompts, false);
    for (let step = 0; step < 3; step++) {
      assert.equal(b.logits.buffer, buf.buffer, `step ${step}: the logits are a view of the lent buffer`);
      assert.equal(b.logits.byteOffset, 0);
      assert.equal(b.logits.length, prompts.length * V);
      assert.notEqual(a.logits.buffer, buf.buffer);
      assert.deepEqual(b.logits, a.logits, `step ${step}: the same bits as a fresh array`);
      const next = prompts.map((_, i) => [argmax(a.logits.subarray(i * V, (i + 1) * V))]);
      a = plain.step(ps, next, false);
      b = lent.step(ls, next, false);
    }
    // A buffer too small for the rows is not used.
    const small = new Float32Array(V);
    const r = new DirectRunner(lending(model, small, []), 4, 256);
    const res = r.step(prompts.map(() => r.newSeq()), prompts, false);
    assert.notEqual(res.logits.buffer, small.buffer);
    model.dispose();
  });
}

test('the engine lends one logits buffer to every step, and the tokens are those of fresh arrays', () => {
  const reqs: GenerateRequest[] = Array.from({ length: 6 }, (_, i) => ({
    id: `r${i}`, promptTokenIds: Array.from({ length: 3 + 2 * i }, (_, j) => (17 * i + 5 * j + 3) % 200),
    maxTokens: 5 + i, stopTokenIds: [], ignoreEos: true, minTokens: 0, returnRoutedExperts: false,
    sampling: { temperature: i % 2 ? 0.8 : 0, topP: 0.9, topK: 0, minP: 0, repetitionPenalty: 1, presencePenalty: 0,
      frequencyPenalty: 0, seed: 11 + i },
  }));
  const run = (strip: boolean): { tokens: Map<string, number[]>; batches: ForwardBatch[]; vocab: number } => {
    const loaded = loadModel(fixture('mixtral'), { fast: false });
    const batches: ForwardBatch[] = [];
    const model = loaded.model;
    const w = Object.create(model) as typeof model;
    w.forward = (batch, cache, blockSize) => {
      batches.push(batch);
      const b = { ...batch };
      if (strip) delete b.logitsOut;
      return model.forward(b, cache, blockSize);
    };
    const core = new EngineCore({ ...loaded, model: w }, {
      kvCacheBlocks: 128, kvCacheGb: 0, blockSize: 4, maxNumSeqs: 4, maxNumBatchedTokens: 16, servedModelName: 'm',
    });
    const tokens = new Map<string, number[]>(reqs.map((r) => [r.id, []]));
    for (const r of reqs) assert.equal(core.add(r), null);
    for (let guard = 0; core.hasWork() && guard < 1000; guard++) {
      const res = core.step();
      if (!res) break;
      for (const ev of res.events) if (ev.type === 'tokens') tokens.get(ev.id)!.push(...ev.tokenIds);
    }
    model.dispose();
    return { tokens, batches, vocab: loaded.spec.vocabSize };
  };
  const lent = run(false), fresh = run(true);
  assert.ok(lent.batches.length > 5, `${lent.batches.length} steps`);
  assert.ok(lent.batches.every((b) => b.logitsOut instanceof Float32Array), 'the engine lends a logits buffer to every step');
  // Grow-only: the widest step's rows fit, and after the first widest step the buffer never changes.
  const widest = Math.max(...lent.batches.map((b) => b.logitRows.length));
  const first = lent.batches.findIndex((b) => b.logitRows.length === widest);
  for (const b of lent.batches.slice(first)) assert.equal(b.logitsOut, lent.batches[first]!.logitsOut);
  assert.ok(lent.batches[first]!.logitsOut!.length >= widest * lent.vocab, 'the buffer holds the widest step\'s rows');
  for (const r of reqs) {
    assert.equal(lent.tokens.get(r.id)!.length, r.maxTokens);
    assert.deepEqual(lent.tokens.get(r.id), fresh.tokens.get(r.id), r.id);
  }
});
