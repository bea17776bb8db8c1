// Continuous batching against a fake engine that checks every plan: chunked prefill, budgets,
// decode-first order, preemption of the youngest with recomputation, aborts, context limits,
// and a long random simulation where the oldest sequence must progress every step.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { Rng } from '../src/engine/rng.js';
import { KvCapacityError, Scheduler, type SchedulerConfig, type StepPlan } from '../src/engine/scheduler.js';
import { testSeed } from './helpers/seed.js';

/** The token a deterministic fake model emits for seq at position pos. */
const gen = (id: string, pos: number): number => (id.length * 7919 + Number(id.replace(/\D/g, '') || 0) * 131 + pos * 104729) % 50_000;

interface Live {
  prompt: number[];
  output: number[];
  maxTokens: number;
  /** Positions our fake engine holds K/V for. */
  computed: number;
}

/** The fake engine: checks a plan against its own model of every sequence, then "runs" it. */
class Harness {
  readonly s: Scheduler;
  readonly live = new Map<string, Live>();
  readonly finished: string[] = [];
  steps = 0;
  /** Called with each sampled token; true stops the sequence (an eos, say). */
  stop: (id: string, token: number) => boolean = () => false;

  constructor(readonly cfg: SchedulerConfig) {
    this.s = new Scheduler(cfg);
  }

  add(id: string, promptLength: number, maxTokens: number): void {
    const prompt = Array.from({ length: promptLength }, (_, i) => 1000 + ((i * 37 + id.length) % 500));
    this.s.addSequence({ id, promptTokenIds: prompt, maxTokens });
    this.live.set(id, { prompt, output: [], maxTokens, computed: 0 });
  }

  abort(id: string): void {
    assert.ok(this.s.abort(id));
    this.live.delete(id);
  }

  step(): StepPlan {
    const { s, cfg } = this;
    const plan = s.step();
    this.steps++;
    for (const id of plan.preempted) this.live.get(id)!.computed = 0;

    // Budgets and shape.
    assert.ok(plan.numBatchedTokens <= cfg.maxNumBatchedTokens, 'token budget');
    assert.equal(plan.numBatchedTokens, plan.entries.reduce((acc, e) => acc + e.tokenIds.length, 0));
    assert.ok(s.numRunning <= cfg.maxNumSeqs && plan.entries.length <= cfg.maxNumSeqs, 'sequence budget');
    assert.equal(new Set(plan.entries.map((e) => e.seqId)).size, plan.entries.length, 'one entry per sequence');
    const firstPrefill = plan.entries.findIndex((e) => e.isPrefillChunk);
    if (firstPrefill >= 0) assert.ok(plan.entries.slice(firstPrefill).every((e) => e.isPrefillChunk), 'decodes first');
    s.cache.checkInvariants();
    const slotsSeen = new Set<number>();

    for (const e of plan.entries) {
      const seq = this.live.get(e.seqId)!;
      const n = e.tokenIds.length;
      const tokens = [...seq.prompt, ...seq.output];
      assert.ok(n >= 1);
      assert.equal(e.startPosition, seq.computed, `${e.seqId} resumes where its K/V ends`);
      assert.deepEqual(e.tokenIds, tokens.slice(e.startPosition, e.startPosition + n), `${e.seqId} tokens`);
      assert.ok(e.startPosition + n <= cfg.maxContext, 'positions stay inside the context');
      assert.equal(e.sample, e.startPosition + n === tokens.length);
      assert.equal(e.completesPrefill, e.isPrefillChunk && e.sample);
      if (!e.isPrefillChunk) assert.equal(n, 1, 'a decode is one token');
      assert.equal(e.blockTable.length, Math.ceil((e.startPosition + n) / cfg.blockSize));
      e.slots.forEach((slot, i) => {
        const pos = e.startPosition + i;
        assert.equal(slot, e.blockTable[Math.floor(pos / cfg.blockSize)]! * cfg.blockSize + (pos % cfg.blockSize));
        assert.ok(!slotsSeen.has(slot), `slot ${slot} twice in one step`);
        slotsSeen.add(slot);
      });
      seq.computed += n;
      assert.equal(s.cache.numTokens(e.seqId), seq.computed);
    }
    // Sample after the whole plan ran, as the engine does.
    for (const e of plan.entries) {
      if (!e.sample) continue;
      const seq = this.live.get(e.seqId)!;
      const token = gen(e.seqId, seq.prompt.length + seq.output.length);
      seq.output.push(token);
      const atLimit = s.appendToken(e.seqId, token);
      const total = seq.prompt.length + seq.output.length;
      assert.equal(atLimit, seq.output.length >= seq.maxTokens || total >= cfg.maxContext);
      if (atLimit) assert.ok(!s.has(e.seqId), 'a sequence at its limit is finished by appendToken');
      if (atLimit || this.stop(e.seqId, token)) {
        assert.equal(s.finish(e.seqId), !atLimit);
        this.live.delete(e.seqId);
        this.finished.push(e.seqId);
      }
    }
    assert.equal(s.numRunning + s.numWaiting, this.live.size);
    // Every running sequence but the youngest has finished its prefill (see step (b)).
    const { running, waiting } = s.order();
    for (const id of running.slice(0, -1)) {
      const seq = this.live.get(id)!;
      assert.equal(s.sequenceInfo(id).numComputed, seq.prompt.length + seq.output.length - 1, `${id} is decoding`);
    }
    for (const id of waiting) assert.equal(s.sequenceInfo(id).numComputed, 0);
    return plan;
  }

  /** Steps until nothing is left; returns the number of steps. */
  drain(maxSteps = 10_000): number {
    const start = this.steps;
    while (this.live.size > 0) {
      this.step();
      assert.ok(this.steps - start < maxSteps, 'did not drain');
    }
    return this.steps - start;
  }
}

const base: SchedulerConfig = { numBlocks: 64, blockSize: 4, maxContext: 128, maxNumSeqs: 4, maxNumBatchedTokens: 8 };

test('a long prompt is prefilled in budget-sized chunks, then decodes one token per step', () => {
  const h = new Harness(base);
  h.add('a', 19, 3);
  const shapes: string[] = [];
  while (h.live.size > 0) {
    const [e] = h.step().entries;
    shapes.push(`${e!.isPrefillChunk ? 'P' : 'D'}${e!.tokenIds.length}${e!.sample ? '*' : ''}`);
  }
  assert.deepEqual(shapes, ['P8', 'P8', 'P3*', 'D1*', 'D1*']);
  assert.equal(h.s.cache.numUsedBlocks, 0, 'finish frees the blocks');
});

test('sequences join and leave between steps; decodes go first, chunks fill the rest', () => {
  const h = new Harness(base);
  h.add('a', 5, 10);
  let p = h.step();
  assert.deepEqual(p.entries.map((e) => [e.seqId, e.tokenIds.length]), [['a', 5]]);
  h.add('b', 20, 10);
  h.add('c', 2, 10);
  p = h.step();   // a decodes (1), b takes the remaining 7; c waits behind b (FIFO)
  assert.deepEqual(p.entries.map((e) => [e.seqId, e.tokenIds.length, e.isPrefillChunk]), [['a', 1, false], ['b', 7, true]]);
  assert.deepEqual(h.s.order(), { running: ['a', 'b'], waiting: ['c'] });
  p = h.step();   // a decodes, b continues with 7, c gets nothing
  assert.deepEqual(p.entries.map((e) => [e.seqId, e.tokenIds.length]), [['a', 1], ['b', 7]]);
  h.abort('a');
  p = h.step();   // b finishes its prefill (6 left), c admitted with 2: 8 tokens
  assert.deepEqual(p.entries.map((e) => [e.seqId, e.tokenIds.length, e.sample]), [['b', 6, true], ['c', 2, true]]);
  p = h.step();
  assert.deepEqual(p.entries.map((e) => [e.seqId, e.tokenIds.length, e.isPrefillChunk]), [['b', 1, false], ['c', 1, false]]);
  h.drain();
});

test('maxNumSeqs caps the running set', () => {
  const h = new Harness({ ...base, maxNumSeqs: 2, maxNumBatchedTokens: 64 });
  for (const id of ['a', 'b', 'c']) h.add(id, 3, 5);
  const p = h.step();
  assert.deepEqual(p.entries.map((e) => e.seqId), ['a', 'b']);
  assert.equal(h.s.numWaiting, 1);
  h.drain();
  assert.deepEqual(h.finished, ['a', 'b', 'c']);
});

test('out of blocks, the youngest running sequence is preempted and recomputed from prompt + output', () => {
  // 6 blocks of 4 tokens. Three sequences of 7-token prompts take 2 blocks each; the first
  // decode that crosses into a third block must evict the youngest.
  const h = new Harness({ numBlocks: 6, blockSize: 4, maxContext: 64, maxNumSeqs: 4, maxNumBatchedTokens: 32 });
  for (const id of ['a', 'b', 'c']) h.add(id, 7, 6);
  h.step();                       // three prefills of 7: 6 blocks used
  assert.equal(h.s.cache.numFreeBlocks, 0);
  let p = h.step();               // decodes at position 7 still fit in the second blocks
  assert.deepEqual(p.preempted, []);
  const cOutput = [...h.live.get('c')!.output];
  p = h.step();                   // a and b need a block at position 8: c (youngest) goes
  assert.deepEqual(p.preempted, ['c']);
  assert.equal(h.s.preemptionsTotal, 1);
  assert.deepEqual(h.s.order(), { running: ['a', 'b'], waiting: ['c'] });
  assert.deepEqual(h.s.stats(), { running: 2, waiting: 1, kvBlocksTotal: 6, kvBlocksUsed: 6, preemptionsTotal: 1 });
  assert.deepEqual(p.entries.map((e) => e.seqId), ['a', 'b']);
  assert.equal(h.s.sequenceInfo('c').numPreemptions, 1);
  // c comes back as a prefill of everything it had: its prompt and its 2 generated tokens.
  let resumed = false;
  while (h.live.has('c')) {
    p = h.step();
    const e = p.entries.find((x) => x.seqId === 'c');
    if (e && !resumed) {
      resumed = true;
      assert.equal(e.startPosition, 0);
      assert.ok(e.isPrefillChunk);
      assert.deepEqual(e.tokenIds, [...h.live.get('c')!.prompt, ...cOutput]);
    }
  }
  assert.ok(resumed);
  h.drain();
  assert.equal(h.s.cache.numUsedBlocks, 0);
});

test('a prefill chunk without blocks waits when it is the youngest; the decode that needs a block evicts it', () => {
  const g = new Harness({ numBlocks: 4, blockSize: 4, maxContext: 64, maxNumSeqs: 2, maxNumBatchedTokens: 12 });
  g.add('a', 14, 1);
  g.add('b', 4, 8);
  let p = g.step();    // a takes the whole budget (12 tokens, 3 blocks); b waits
  assert.deepEqual(p.entries.map((e) => [e.seqId, e.tokenIds.length]), [['a', 12]]);
  g.abort('a');
  g.add('c', 14, 1);   // now b is older than c
  p = g.step();        // b prefills 4 (1 block), c gets the other 8 (2 blocks)
  assert.deepEqual(p.entries.map((e) => [e.seqId, e.tokenIds.length]), [['b', 4], ['c', 8]]);
  p = g.step();        // b decodes into the last free block; c has no block for its 6 tokens
  assert.deepEqual(p.entries.map((e) => [e.seqId, e.tokenIds.length]), [['b', 1]]);
  assert.deepEqual(p.preempted, [], 'the youngest does not evict itself for a chunk');
  assert.equal(g.s.sequenceInfo('c').numComputed, 8, 'c keeps its K/V while it waits');
  for (let i = 0; i < 3; i++) assert.deepEqual(g.step().preempted, []);   // b at positions 5, 6, 7
  p = g.step();        // b at position 8 needs a block: c, the youngest, is evicted
  assert.deepEqual(p.preempted, ['c']);
  assert.equal(g.s.preemptionsTotal, 1);
  assert.deepEqual(g.s.order(), { running: ['b'], waiting: ['c'] });
  g.drain();
  assert.deepEqual(g.finished, ['b', 'c']);
});

test('abort frees blocks at once, waiting or running, and usage returns to its previous value', () => {
  const h = new Harness(base);
  h.add('a', 9, 20);
  h.step();
  h.step();
  const usage = h.s.cache.usage();
  h.add('b', 30, 20);
  h.step();
  assert.ok(h.s.cache.usage() > usage);
  h.abort('b');                          // running, mid-prefill
  assert.equal(h.s.cache.usage(), usage);
  h.add('c', 5, 5);
  h.abort('c');                          // still waiting
  assert.equal(h.s.cache.usage(), usage);
  assert.equal(h.s.abort('c'), false, 'unknown ids are reported, not thrown');
  h.step();
  h.drain();
});

test('context limit: never more than maxContext positions; appendToken refuses to grow past it', () => {
  const h = new Harness({ ...base, maxContext: 12 });
  h.add('a', 10, 100);
  h.drain();
  assert.deepEqual(h.finished, ['a']);
  // The prompt plus the 2 tokens the context allows.
  const s = new Scheduler({ ...base, maxContext: 12 });
  s.addSequence({ id: 'x', promptTokenIds: new Array(11).fill(1), maxTokens: 5 });
  const p = s.step();
  assert.equal(p.entries[0]!.tokenIds.length, 8);
  assert.throws(() => s.appendToken('x', 3), /not waiting for a sampled token/, 'no token before the chunk ends');
  assert.equal(s.step().entries[0]!.tokenIds.length, 3);
  assert.equal(s.appendToken('x', 2), true, '12 tokens: at the limit');
  assert.equal(s.has('x'), false);
  assert.equal(s.cache.numUsedBlocks, 0);
  assert.deepEqual(s.step().entries, []);
  assert.throws(() => s.appendToken('x', 3), /unknown sequence x/);
});

test('requests that can never fit fail at once with a clear error', () => {
  const s = new Scheduler({ numBlocks: 4, blockSize: 4, maxContext: 64, maxNumSeqs: 4, maxNumBatchedTokens: 8 });
  assert.throws(() => s.addSequence({ id: 'big', promptTokenIds: new Array(10).fill(1), maxTokens: 20 }), (err: unknown) => {
    assert.ok(err instanceof KvCapacityError);
    assert.equal(err.code, 'E_KV_CAPACITY');
    assert.equal(err.message, 'sequence big needs 8 KV blocks (10 prompt + 20 generated tokens at 4 per block), ' +
      'but the cache has 4 in all; lower max_tokens or give the cache more memory');
    return true;
  });
  // 10 + 7 = 17 tokens: the last is never processed, 16 fit in 4 blocks exactly.
  s.addSequence({ id: 'fits', promptTokenIds: new Array(10).fill(1), maxTokens: 7 });
  assert.throws(() => s.addSequence({ id: 'long', promptTokenIds: new Array(64).fill(1), maxTokens: 1 }), {
    name: 'RangeError',
    message: 'sequence long: the prompt has 64 tokens, but the context holds 64 positions including at least one generated token',
  });
  assert.throws(() => s.addSequence({ id: 'fits', promptTokenIds: [1], maxTokens: 1 }), /already scheduled/);
  assert.throws(() => s.addSequence({ id: 'e', promptTokenIds: [], maxTokens: 1 }), /prompt is empty/);
  assert.throws(() => new Scheduler({ ...base, maxNumSeqs: 16, maxNumBatchedTokens: 8 }), {
    name: 'RangeError', message: 'maxNumBatchedTokens is 8, expected at least maxNumSeqs (16)',
  });
  const h = new Harness({ numBlocks: 4, blockSize: 4, maxContext: 64, maxNumSeqs: 4, maxNumBatchedTokens: 8 });
  h.add('fits', 10, 7);
  h.drain();
  assert.equal(h.live.size, 0);
});

test('random simulation: budgets and invariants every step, the oldest always progresses, all finish', (t) => {
  const rng = new Rng(testSeed(t, 4242));
  const rand = (n: number): number => Math.floor(rng.nextFloat() * n);
  const cfg: SchedulerConfig = { numBlocks: 48, blockSize: 8, maxContext: 256, maxNumSeqs: 8, maxNumBatchedTokens: 64 };
  const h = new Harness(cfg);
  h.stop = () => rng.nextFloat() < 0.03;
  const arrivals: string[] = [];
  const arrivedAt = new Map<string, number>();
  let worstLatency = 0;
  let n = 0;
  for (let step = 0; step < 3000; step++) {
    if (step < 2000 && rng.nextFloat() < 0.25) {
      const id = `r${n++}`;
      const prompt = rng.nextFloat() < 0.15 ? 100 + rand(150) : 1 + rand(40);
      h.add(id, prompt, 1 + rand(80));
      arrivals.push(id);
      arrivedAt.set(id, h.steps);
    }
    if (h.live.size > 0 && rng.nextFloat() < 0.01) {
      const ids = [...h.live.keys()];
      h.abort(ids[rand(ids.length)]!);
    }
    const oldest = arrivals.find((id) => h.live.has(id));
    const before = new Set(h.live.keys());
    const plan = h.step();
    // NOTE: the no-starvation property: the oldest live sequence is in every plan.
    if (oldest !== undefined) assert.ok(plan.entries.some((e) => e.seqId === oldest), `step ${h.steps}: ${oldest} starved`);
    for (const id of before) {
      if (!h.live.has(id) && arrivedAt.has(id)) {
        worstLatency = Math.max(worstLatency, h.steps - arrivedAt.get(id)!);
        arrivedAt.delete(id);
      }
    }
  }
  h.drain(2000);
  assert.ok(h.s.preemptionsTotal > 20, `only ${h.s.preemptionsTotal} preemptions: the test is not under pressure`);
  assert.ok(h.finished.length > 300);
  assert.equal(h.s.cache.numUsedBlocks, 0);
  console.log(`simulation: ${n} sequences, ${h.finished.length} finished, ${h.s.preemptionsTotal} preemptions, ` +
    `worst arrival-to-finish ${worstLatency} steps`);
});
