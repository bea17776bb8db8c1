// Continuous batching against a fake engine that checks every plan: chunked prefill, budgets,
// decode-first order, preemption of the youngest with recomputation, aborts, context limits,
// prefix caching (the fake engine keeps what every KV slot holds and checks each step reads only
// its own tokens' K/V), and a long random simulation where the oldest sequence must progress every step.
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
  /** keys[p]: the name of tokens[0..p] (what the K/V at position p depends on). */
  keys: number[];
}

/** The fake engine: checks a plan against its own model of every sequence, then "runs" it. */
class Harness {
  readonly s: Scheduler;
  readonly live = new Map<string, Live>();
  readonly finished: string[] = [];
  /** The fake K/V: slot -> the name of the token prefix whose last position was written there. */
  readonly kv = new Map<number, number>();
  /** Names token prefixes: `${name of the prefix before}:${token}` -> name (a trie, so names are exact). */
  private readonly prefixNames = new Map<string, number>();
  /** Tokens that admitted sequences found cached (startPosition > 0 on their first entry). */
  cachedTokens = 0;
  steps = 0;
  /** Called with each sampled token; true stops the sequence (an eos, say). */
  stop: (id: string, token: number) => boolean = () => false;

  constructor(readonly cfg: SchedulerConfig) {
    this.s = new Scheduler(cfg);
  }

  /** Prompts of ids of one length are equal (or one a prefix of the other) unless given. */
  add(id: string, promptLength: number, maxTokens: number, given?: number[], usePrefixCache?: boolean): void {
    const prompt = given ?? Array.from({ length: promptLength }, (_, i) => 1000 + ((i * 37 + id.length) % 500));
    this.s.addSequence({ id, promptTokenIds: prompt, maxTokens, ...(usePrefixCache === undefined ? {} : { usePrefixCache }) });
    this.live.set(id, { prompt, output: [], maxTokens, computed: 0, keys: [] });
  }

  private key(seq: Live, p: number): number {
    for (let i = seq.keys.length; i <= p; i++) {
      const token = i < seq.prompt.length ? seq.prompt[i]! : seq.output[i - seq.prompt.length]!;
      const k = `${i === 0 ? -1 : seq.keys[i - 1]!}:${token}`;
      let name = this.prefixNames.get(k);
      if (name === undefined) this.prefixNames.set(k, name = this.prefixNames.size);
      seq.keys.push(name);
    }
    return seq.keys[p]!;
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
    assert.equal(plan.prefixHitTokens <= plan.prefixQueriedTokens, true);
    if (cfg.prefixCacheKey == null) assert.deepEqual([plan.prefixQueriedTokens, plan.prefixHitTokens], [0, 0]);

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
      if (seq.computed === 0 && e.startPosition > 0) {
        // Admitted on cached blocks: whole blocks, short of the last token (checked below: they hold its K/V).
        assert.ok(cfg.prefixCacheKey != null, `${e.seqId} starts at ${e.startPosition} with prefix caching off`);
        assert.equal(e.startPosition % cfg.blockSize, 0);
        assert.ok(e.startPosition < tokens.length);
        seq.computed = e.startPosition;
        this.cachedTokens += e.startPosition;
      }
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
        this.kv.set(slot, this.key(seq, pos));
      });
      seq.computed += n;
      assert.equal(s.cache.numTokens(e.seqId), seq.computed);
    }
    // The step's attention reads (after every K/V of the step is written, as the models do): each
    // position of each sequence holds the K/V of that sequence's own tokens.
    for (const e of plan.entries) {
      const seq = this.live.get(e.seqId)!;
      for (let p = 0; p < seq.computed; p++) {
        const slot = e.blockTable[Math.floor(p / cfg.blockSize)]! * cfg.blockSize + (p % cfg.blockSize);
        assert.equal(this.kv.get(slot), this.key(seq, p), `${e.seqId} reads position ${p} (slot ${slot}) holding other K/V`);
      }
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

/** Random arrivals, stops and aborts for 3000 steps; checks every step; returns the harness drained. */
function simulate(seed: number, cfg: SchedulerConfig): Harness {
  const rng = new Rng(seed);
  const rand = (n: number): number => Math.floor(rng.nextFloat() * n);
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
    `worst arrival-to-finish ${worstLatency} steps, ${h.cachedTokens} tokens started from the prefix cache`);
  return h;
}

test('random simulation: budgets and invariants every step, the oldest always progresses, all finish', (t) => {
  const cfg: SchedulerConfig = { numBlocks: 48, blockSize: 8, maxContext: 256, maxNumSeqs: 8, maxNumBatchedTokens: 64 };
  const h = simulate(testSeed(t, 4242), cfg);
  assert.equal(h.cachedTokens, 0);
});

test('random simulation with prefix caching: every step reads only its own K/V, and many prompts start cached', (t) => {
  const cfg: SchedulerConfig = { numBlocks: 36, blockSize: 8, maxContext: 256, maxNumSeqs: 8, maxNumBatchedTokens: 64, prefixCacheKey: 'sim' };
  const h = simulate(testSeed(t, 4243), cfg);
  const totals = h.s.prefixCacheTotals;
  assert.equal(totals.hitTokens, h.cachedTokens, 'the hits counted are the positions plans skipped');
  assert.ok(h.cachedTokens > 1000, `only ${h.cachedTokens} tokens came from the cache`);
  assert.ok(h.s.cache.evictionsTotal > 0, 'the cache should have been under pressure');
  h.s.cache.checkInvariants();
});

test('a paused sequence is not stepped, keeps its blocks, and resumes where it stopped; others go on', () => {
  const h = new Harness({ ...base, maxNumBatchedTokens: 32 });
  h.add('a', 6, 20);
  h.add('b', 5, 20);
  h.step();
  h.step();
  assert.ok(h.s.pause('a'));
  assert.equal(h.s.numPaused, 1);
  const blocks = [...h.s.cache.blockTable('a')];
  const computed = h.s.sequenceInfo('a').numComputed;
  for (let i = 0; i < 5; i++) {
    const p = h.step();
    assert.deepEqual(p.entries.map((e) => e.seqId), ['b'], 'only b steps while a is paused');
  }
  assert.deepEqual(h.s.sequenceInfo('a'), { state: 'running', paused: true, numComputed: computed, outputTokenIds: h.live.get('a')!.output, numPreemptions: 0, cachedTokens: 0 });
  assert.deepEqual([...h.s.cache.blockTable('a')], blocks, 'its KV blocks are kept');
  assert.ok(h.s.resume('a'));
  assert.equal(h.s.numPaused, 0);
  const p = h.step();
  const e = p.entries.find((x) => x.seqId === 'a')!;
  assert.ok(!e.isPrefillChunk, 'no recomputation: a decodes on from its cached K/V');
  assert.equal(e.startPosition, computed);
  h.drain();
  assert.equal(h.s.cache.numUsedBlocks, 0);
  assert.ok(!h.s.pause('a'), 'a finished sequence is unknown');
});

test('a paused waiting sequence does not hold up the queue, and abort of a paused one frees its blocks', () => {
  const h = new Harness({ ...base, maxNumSeqs: 2, maxNumBatchedTokens: 64 });
  for (const id of ['a', 'b', 'c', 'd']) h.add(id, 3, 4);
  h.s.pause('c');
  let p = h.step();
  assert.deepEqual(p.entries.map((e) => e.seqId), ['a', 'b']);
  for (let i = 0; i < 20 && h.live.size > 1; i++) h.step();
  // c is paused: everyone behind it finished.
  assert.deepEqual(h.finished, ['a', 'b', 'd']);
  assert.deepEqual(h.s.order(), { running: [], waiting: ['c'] });
  assert.equal(h.s.step().entries.length, 0, 'nothing to run while c is paused');
  h.s.resume('c');
  p = h.step();
  assert.deepEqual(p.entries.map((e) => e.seqId), ['c']);
  h.s.pause('c');
  assert.ok(h.s.cache.numUsedBlocks > 0);
  h.abort('c');
  assert.equal(h.s.cache.numUsedBlocks, 0);
  assert.equal(h.s.numPaused, 0);
});

test('out of blocks, a paused sequence gives up its blocks before any active one', () => {
  // As in the preemption test above, but a (the oldest) is paused: it goes instead of c.
  const h = new Harness({ numBlocks: 6, blockSize: 4, maxContext: 64, maxNumSeqs: 4, maxNumBatchedTokens: 32 });
  for (const id of ['a', 'b', 'c']) h.add(id, 7, 6);
  h.step();
  h.step();
  h.s.pause('a');
  const p = h.step(); // b and c need a block at position 8
  assert.deepEqual(p.preempted, ['a']);
  assert.deepEqual(p.entries.map((e) => e.seqId), ['b', 'c']);
  assert.deepEqual(h.s.order(), { running: ['b', 'c'], waiting: ['a'] });
  assert.deepEqual(h.s.sequenceInfo('a'), { state: 'waiting', paused: true, numComputed: 0, outputTokenIds: h.live.get('a')!.output, numPreemptions: 1, cachedTokens: 0 });
  h.s.resume('a');
  h.drain();
  assert.deepEqual(h.finished.sort(), ['a', 'b', 'c']);
  assert.equal(h.s.cache.numUsedBlocks, 0);
});

test('paused sequences cannot hold the engine: a waiting one takes the slot of the youngest paused', () => {
  const h = new Harness({ ...base, maxNumSeqs: 2, maxNumBatchedTokens: 64 });
  h.add('a', 3, 6);
  h.add('b', 3, 6);
  h.step();
  h.s.pause('a');
  h.s.pause('b');
  h.add('c', 3, 6);
  const p = h.step();
  assert.deepEqual(p.preempted, ['b'], 'the youngest paused one gives up its slot');
  assert.deepEqual(p.entries.map((e) => e.seqId), ['c']);
  assert.deepEqual(h.s.order(), { running: ['a', 'c'], waiting: ['b'] });
  assert.equal(h.s.sequenceInfo('a').state, 'running', 'a keeps its slot and blocks: nobody else needs them');
  h.s.resume('a');
  h.s.resume('b');
  h.drain();
  assert.deepEqual(h.finished.sort(), ['a', 'b', 'c']);
  assert.equal(h.s.cache.numUsedBlocks, 0);
});

const cachedCfg: SchedulerConfig = { ...base, maxNumBatchedTokens: 64, prefixCacheKey: 'test' };

test('prefix caching: a later prompt starts after the cached full blocks of its prefix, never past its last token', () => {
  const h = new Harness(cachedCfg);
  const prompt = Array.from({ length: 10 }, (_, i) => 500 + i);
  h.add('a', 0, 2, prompt);
  h.drain();
  // Same prompt: 2 full blocks (8 tokens) cached; the 2 others computed.
  h.add('b', 0, 2, prompt);
  let p = h.step();
  assert.deepEqual(p.entries.map((e) => [e.seqId, e.startPosition, e.tokenIds.length]), [['b', 8, 2]]);
  assert.deepEqual([p.prefixQueriedTokens, p.prefixHitTokens], [10, 8]);
  assert.equal(h.s.sequenceInfo('b').cachedTokens, 8);
  h.drain();
  // A prompt of exactly 2 blocks: its last token must be computed (its logits), so 1 block is reused
  // and the second is recomputed into a fresh block, not written into the cached one.
  const cachedBlocks = h.s.cache.numCachedBlocks;
  h.add('c', 0, 1, prompt.slice(0, 8));
  p = h.step();
  assert.deepEqual(p.entries.map((e) => [e.seqId, e.startPosition, e.tokenIds.length]), [['c', 4, 4]]);
  assert.equal(h.s.cache.numCachedBlocks, cachedBlocks, 'its recomputed block duplicates a cached one: not named twice');
  h.drain();
  // Diverging inside the second block: only the first is shared.
  h.add('d', 0, 1, [...prompt.slice(0, 6), 1, 2, 3]);
  p = h.step();
  assert.deepEqual(p.entries.map((e) => [e.seqId, e.startPosition]), [['d', 4]]);
  h.drain();
  // A different first token shares nothing.
  h.add('e', 0, 1, [1, ...prompt.slice(1)]);
  assert.deepEqual(h.step().entries.map((e) => e.startPosition), [0]);
  h.drain();
  assert.equal(h.s.cache.numUsedBlocks, 0);
  assert.deepEqual(h.s.prefixCacheTotals, { queriedTokens: 10 + 10 + 8 + 9 + 10, hitTokens: 8 + 4 + 4 });
});

test('prefix caching: siblings admitted in one step share the blocks the first one computes in that step (n > 1)', () => {
  const h = new Harness({ ...cachedCfg, maxNumBatchedTokens: 24 });
  const prompt = Array.from({ length: 14 }, (_, i) => 700 + i);
  for (const id of ['n0', 'n1', 'n2']) h.add(id, 0, 3, prompt);
  const p = h.step();
  // n0 computes 14 tokens (3 full blocks named as scheduled); n1 and n2 start at 12 with 2 each.
  assert.deepEqual(p.entries.map((e) => [e.seqId, e.startPosition, e.tokenIds.length]), [['n0', 0, 14], ['n1', 12, 2], ['n2', 12, 2]]);
  const tables = ['n0', 'n1', 'n2'].map((id) => Array.from(h.s.cache.blockTable(id)));
  assert.deepEqual(tables[1]!.slice(0, 3), tables[0]!.slice(0, 3));
  assert.deepEqual(tables[2]!.slice(0, 3), tables[0]!.slice(0, 3));
  assert.equal(h.s.cache.refCount(tables[0]![0]!), 3);
  assert.equal(h.s.cache.numUsedBlocks, 3 + 3, 'three shared blocks and one own block each');
  h.drain();
});

test('prefix caching: a preempted sequence comes back on its own cached blocks (prompt and output)', () => {
  // As the preemption test above with one more block, and prefix caching: b takes c's last block
  // (leaves are evicted first), c's first block stays cached while c waits.
  const h = new Harness({ numBlocks: 7, blockSize: 4, maxContext: 64, maxNumSeqs: 4, maxNumBatchedTokens: 32, prefixCacheKey: 'test' });
  for (const id of ['a', 'b', 'c']) h.add(id, 0, 6, Array.from({ length: 7 }, (_, i) => id.charCodeAt(0) * 100 + i));
  h.step();
  h.step();
  const p = h.step();
  assert.deepEqual(p.preempted, ['c']);
  let resumed: { start: number; n: number } | null = null;
  while (h.live.has('c')) {
    const e = h.step().entries.find((x) => x.seqId === 'c');
    if (e && !resumed) resumed = { start: e.startPosition, n: e.tokenIds.length };
  }
  // c held 9 tokens (7 prompt + 2 generated) and comes back on its first block.
  assert.deepEqual(resumed, { start: 4, n: 5 });
  assert.equal(h.cachedTokens, 4);
  h.drain();
});

test('prefix caching: a sequence that must compute every position (usePrefixCache false) skips the lookup but offers its blocks', () => {
  const h = new Harness(cachedCfg);
  const prompt = Array.from({ length: 9 }, (_, i) => 300 + i);
  h.add('a', 0, 1, prompt);
  h.drain();
  h.add('b', 0, 1, prompt, false);
  let p = h.step();
  assert.deepEqual(p.entries.map((e) => [e.seqId, e.startPosition]), [['b', 0]]);
  assert.deepEqual([p.prefixQueriedTokens, p.prefixHitTokens], [0, 0]);
  h.drain();
  h.add('c', 0, 1, [...prompt, 5]);
  p = h.step();
  assert.deepEqual(p.entries.map((e) => [e.seqId, e.startPosition]), [['c', 8]]);
  h.drain();
  // Off: the same sequence of requests computes everything.
  const off = new Harness({ ...cachedCfg, prefixCacheKey: null });
  off.add('a', 0, 1, prompt);
  off.drain();
  off.add('b', 0, 1, prompt);
  assert.deepEqual(off.step().entries.map((e) => e.startPosition), [0]);
  off.drain();
  assert.equal(off.s.cache.numCachedBlocks, 0);
});
