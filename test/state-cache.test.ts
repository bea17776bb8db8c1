// The state cache of hybrid models (qwen3_next): slots taken at admission and given back at finish,
// abort and preemption; the engine over the qwen3_next fixture: sequences batched equal each alone bit
// for bit, chunked prefill carries the state across chunks (HF's greedy tokens), preemption recomputes.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';

import { EngineCore } from '../src/engine/engine-core.js';
import { Scheduler } from '../src/engine/scheduler.js';
import { StateSlotPool } from '../src/engine/state-cache.js';
import { loadModel } from '../src/model/load.js';
import { packageRoot } from '../src/native/index.js';
import { request, runAll } from './helpers/hybrid-engine.js';

const dir = path.join(packageRoot(), 'test', 'fixtures', 'qwen3_next');
const golden = JSON.parse(readFileSync(path.join(dir, 'golden.json'), 'utf8')) as {
  cases: { prompt_ids: number[]; greedy: number[] }[];
};

test('StateSlotPool: distinct slots, reuse after release, a clear error when none is free', () => {
  const pool = new StateSlotPool(2);
  const a = pool.allocate('a');
  const b = pool.allocate('b');
  assert.notEqual(a, b);
  assert.equal(pool.allocate('a'), a, 'a sequence keeps its slot');
  assert.throws(() => pool.allocate('c'), /no free state slot for sequence c \(all 2 in use\)/);
  pool.release('a');
  pool.release('a');  // twice: a no-op
  assert.equal(pool.numUsed, 1);
  assert.equal(pool.allocate('c'), a);
  pool.checkInvariants();
  assert.throws(() => new StateSlotPool(0), /numSlots is 0/);
});

test('scheduler: a running sequence holds one slot; admission waits for a free one; preemption and finish release it', () => {
  // 2 slots for up to 4 sequences, and a KV cache small enough to preempt.
  const s = new Scheduler({ numBlocks: 10, blockSize: 4, maxContext: 64, maxNumSeqs: 4, maxNumBatchedTokens: 64,
    numStateSlots: 2 });
  for (let i = 0; i < 4; i++) s.addSequence({ id: `r${i}`, promptTokenIds: [1, 2, 3, 4, 5, 6], maxTokens: 20 });
  let preemptions = 0;
  let maxRunning = 0;
  for (let step = 0; step < 200 && (s.numRunning + s.numWaiting) > 0; step++) {
    const plan = s.step();
    preemptions += plan.preempted.length;
    const slots = plan.entries.map((e) => e.stateSlot);
    assert.ok(slots.every((x) => x === 0 || x === 1), `slots ${slots}`);
    assert.equal(new Set(slots).size, slots.length, 'two sequences in one step never share a slot');
    assert.equal(s.states!.numUsed, s.numRunning, 'every running sequence holds exactly one slot');
    s.states!.checkInvariants();
    maxRunning = Math.max(maxRunning, s.numRunning);
    for (const e of plan.entries) if (e.sample) s.appendToken(e.seqId, 7);
  }
  assert.equal(s.numRunning + s.numWaiting, 0, 'every sequence finished');
  assert.equal(maxRunning, 2, 'the two slots bound the running sequences');
  assert.ok(preemptions > 0, 'the small KV cache should have preempted');
  assert.equal(s.states!.numUsed, 0);
  // abort gives the slot back too
  s.addSequence({ id: 'x', promptTokenIds: [1, 2], maxTokens: 4 });
  s.step();
  assert.equal(s.states!.numUsed, 1);
  s.abort('x');
  assert.equal(s.states!.numUsed, 0);
});


test('engine, qwen3_next: sequences batched equal each alone bit for bit (tokens and logprobs)', () => {
  const loaded = loadModel(dir, { fast: false });
  try {
    const reqs = golden.cases.map((c, i) => request(`c${i}`, c.prompt_ids, c.greedy.length));
    // Alone: one request per engine; batched: all at once (every prefill in one step, then decodes together).
    const alone = reqs.map((r) => runAll(loaded, {}, [r]).out.get(r.id)!);
    const { out: batched, core } = runAll(loaded, {}, reqs);
    reqs.forEach((r, i) => {
      assert.deepEqual(batched.get(r.id)!.tokens, alone[i]!.tokens, `${r.id} tokens`);
      assert.deepEqual(batched.get(r.id)!.logprobs, alone[i]!.logprobs, `${r.id} logprobs`);
      // And the tokens are HF's greedy continuation (the f32 goldens).
      assert.deepEqual(alone[i]!.tokens, golden.cases[i]!.greedy, `${r.id}: HF's greedy tokens`);
    });
    const st = core.stats();
    assert.equal(st.stateSlotsTotal, 8);
    assert.equal(st.stateBytesTotal, 8 * loaded.model.stateBytesPerSlot!);
    assert.equal(st.stateBytesUsed, 0);
  } finally {
    loaded.model.dispose();
  }
});

test('engine, qwen3_next: chunked prefill carries the state across chunks; preemption recomputes it (HF greedy tokens)', () => {
  const loaded = loadModel(dir, { fast: false });
  try {
    const reqs = golden.cases.map((c, i) => request(`c${i}`, c.prompt_ids, c.greedy.length));
    // Chunks of at most 7 tokens: the 67-token prompt takes 10 steps, with decodes of the others beside it.
    const chunked = runAll(loaded, { maxNumBatchedTokens: 7, maxNumSeqs: 4 }, reqs);
    reqs.forEach((r, i) => assert.deepEqual(chunked.out.get(r.id)!.tokens, golden.cases[i]!.greedy, `${r.id} chunked`));
    // 26 blocks of 4 tokens cannot hold the four sequences (92 + 35 + 27 + 22 tokens at their ends) at once.
    const tight = runAll(loaded, { kvCacheBlocks: 26 }, reqs);
    assert.ok(tight.preemptions > 0, 'the tight KV cache should have preempted');
    reqs.forEach((r, i) => assert.deepEqual(tight.out.get(r.id)!.tokens, golden.cases[i]!.greedy, `${r.id} preempted`));
  } finally {
    loaded.model.dispose();
  }
});

test('engine, qwen3_next: the state cache comes out of --kv-cache-gb, and a budget too small for it is refused', () => {
  const loaded = loadModel(dir, { fast: false });
  try {
    const perSlot = loaded.model.stateBytesPerSlot!;
    // 6 linear layers x (conv 128 x 3 + state 4 x 16 x 16) f32
    assert.equal(perSlot, 6 * (128 * 3 + 4 * 16 * 16) * 4);
    const base = { kvCacheBlocks: 0, blockSize: 4, maxNumBatchedTokens: 64, servedModelName: 't' };
    const gib = 0.0001;  // ~105 KB
    const core = new EngineCore(loaded, { ...base, kvCacheGb: gib, maxNumSeqs: 2 });
    const kvBytes = core.numBlocks * core.kvBytesPerBlock;
    assert.ok(kvBytes + 2 * perSlot <= gib * 2 ** 30, 'KV blocks and state slots fit the budget together');
    assert.ok(kvBytes + 2 * perSlot + core.kvBytesPerBlock > gib * 2 ** 30, 'and use it');
    assert.throws(() => new EngineCore(loaded, { ...base, kvCacheGb: gib, maxNumSeqs: 64 }),
      /--kv-cache-gb 0.0001 does not hold the state cache of qwen3_next \(64 sequences x 0.03 MiB/);
  } finally {
    loaded.model.dispose();
  }
});
