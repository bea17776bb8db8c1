// The engine worker through its client: the main thread stays responsive during a long prefill,
// and preemption under a tiny KV cache recomputes without changing any greedy output.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { monitorEventLoopDelay } from 'node:perf_hooks';

import { EngineClient } from '../src/engine/engine-client.js';
import type { EngineOptions } from '../src/engine/protocol.js';
import type { EngineEvent, GenerateRequest } from '../src/engine/types.js';
import { ensureDemoModel } from '../src/model/demo.js';

function options(over: Partial<EngineOptions> = {}): EngineOptions {
  return {
    modelDir: ensureDemoModel(), computeDtype: 'f32', kvCacheBlocks: 0, kvCacheGb: 0, blockSize: 16,
    maxNumSeqs: 8, maxNumBatchedTokens: 512, threads: 0, servedModelName: 'demo', ...over,
  };
}

function request(id: string, prompt: number[], maxTokens: number): GenerateRequest {
  return {
    id, promptTokenIds: prompt, maxTokens, stopTokenIds: [], ignoreEos: true, minTokens: 0, returnRoutedExperts: false,
    sampling: { temperature: 0, topP: 1, topK: 0, minP: 0, repetitionPenalty: 1, presencePenalty: 0, frequencyPenalty: 0 },
  };
}

function run(engine: EngineClient, req: GenerateRequest): Promise<{ tokens: number[]; end: EngineEvent }> {
  return new Promise((resolve) => {
    const tokens: number[] = [];
    engine.generate(req, (ev) => {
      if (ev.type === 'tokens') tokens.push(...ev.tokenIds);
      else resolve({ tokens, end: ev });
    });
  });
}

function prompt(seed: number, n: number): number[] {
  return Array.from({ length: n }, (_, i) => 100 + ((seed * 7919 + i * 104729) % 20000));
}

test('the event loop stays responsive (< 20 ms lag) while a long prefill runs', async () => {
  const engine = new EngineClient(options({ maxNumBatchedTokens: 4096, kvCacheBlocks: 512 }));
  try {
    await engine.ready;
    const h = monitorEventLoopDelay({ resolution: 5 });
    h.enable();
    const t0 = performance.now();
    const r = await run(engine, request('long', prompt(1, 4000), 4));
    const elapsed = performance.now() - t0;
    h.disable();
    assert.equal(r.end.type === 'finished' && r.end.reason, 'length');
    const p99 = h.percentile(99) / 1e6;
    assert.ok(elapsed > 40, `the prefill should take a while to prove anything (took ${elapsed.toFixed(0)} ms)`);
    assert.ok(p99 < 20, `event loop p99 delay ${p99.toFixed(1)} ms during a ${elapsed.toFixed(0)} ms prefill`);
  } finally {
    await engine.close();
  }
});

test('preemption under a tiny KV cache recomputes without changing greedy outputs', async () => {
  const reqs = [0, 1, 2, 3, 4, 5].map((i) => request(`r${i}`, prompt(i + 2, 20 + 9 * i), 40));
  const roomy = new EngineClient(options());
  let expected: number[][];
  try {
    await roomy.ready;
    expected = (await Promise.all(reqs.map((r) => run(roomy, r)))).map((x) => x.tokens);
  } finally {
    await roomy.close();
  }
  // 14 blocks of 4 tokens: not enough for six sequences of ~60-105 tokens at once.
  const tight = new EngineClient(options({ kvCacheBlocks: 28, blockSize: 4 }));
  try {
    await tight.ready;
    const got = await Promise.all(reqs.map((r) => run(tight, r)));
    assert.deepEqual(got.map((x) => x.tokens), expected);
    assert.ok(tight.stats().preemptionsTotal > 0, 'the tight cache should have forced preemptions');
    assert.equal(tight.stats().kvBlocksUsed, 0);
  } finally {
    await tight.close();
  }
});

test('a request that can never fit fails cleanly; the engine keeps serving', async () => {
  const engine = new EngineClient(options({ kvCacheBlocks: 4, blockSize: 4 }));
  try {
    await engine.ready;
    const big = await run(engine, request('big', prompt(9, 40), 8));
    assert.equal(big.end.type, 'finished');
    assert.equal((big.end as { reason: string }).reason, 'error');
    assert.match((big.end as { error?: string }).error ?? '', /KV blocks/);
    const small = await run(engine, request('small', prompt(9, 4), 4));
    assert.equal(small.tokens.length, 4);
  } finally {
    await engine.close();
  }
});

test('pause: a paused request stops stepping while others run, resumes with the same greedy output; abort frees its KV', async () => {
  const engine = new EngineClient(options());
  const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
  try {
    await engine.ready;
    const alone = await run(engine, request('alone', prompt(3, 12), 60));
    // The same request, paused after its first tokens.
    const tokens: number[] = [];
    let end: EngineEvent | null = null;
    let pausedOnce = false;
    const finished = new Promise<void>((resolve) => engine.generate(request('p', prompt(3, 12), 60), (ev) => {
      if (ev.type !== 'tokens') { end = ev; resolve(); return; }
      tokens.push(...ev.tokenIds);
      if (tokens.length >= 3 && !pausedOnce) { pausedOnce = true; engine.pause(['p']); }
    }));
    while (!pausedOnce) await sleep(2);
    // NOTE: the worker takes messages in order between steps, so once 'other' (posted after the
    // pause) has its first token, every token of p still in flight has landed: none may follow.
    let settled = -1;
    const otherTokens: number[] = [];
    const otherDone = new Promise<void>((resolve) => engine.generate(request('other', prompt(4, 8), 20), (ev) => {
      if (ev.type !== 'tokens') { resolve(); return; }
      if (settled < 0) settled = tokens.length;
      otherTokens.push(...ev.tokenIds);
    }));
    await otherDone;
    assert.equal(otherTokens.length, 20, 'another request is served meanwhile');
    assert.ok(settled >= 3 && settled < 60, `paused before the end (at ${settled})`);
    assert.equal(tokens.length, settled, 'no token while paused');
    assert.ok(engine.stats().kvBlocksUsed > 0, 'the paused request keeps its KV');
    engine.resume(['p']);
    await finished;
    assert.deepEqual(tokens, alone.tokens, 'resumed from its cached K/V: the same greedy tokens');
    const last = end as EngineEvent | null;
    assert.equal(last?.type === 'finished' && last.reason, 'length');

    // Paused, then aborted: its blocks are freed.
    // NOTE: paused from its first token event, not after a sleep: a fast machine finishes all 60
    // tokens within any fixed delay.
    let qEnd: EngineEvent | null = null;
    let qPaused = false;
    const aborted = new Promise<void>((resolve) => engine.generate(request('q', prompt(5, 12), 60), (ev) => {
      if (ev.type !== 'tokens') { qEnd = ev; resolve(); return; }
      if (!qPaused) { qPaused = true; engine.pause(['q']); }
    }));
    while (!qPaused) await sleep(2);
    await sleep(50);
    engine.abort('q');
    await aborted;
    const qLast = qEnd as EngineEvent | null;
    assert.equal(qLast?.type === 'finished' && qLast.reason, 'abort');
    assert.equal(engine.stats().kvBlocksUsed, 0);
    assert.equal(engine.stats().running, 0);
  } finally {
    await engine.close();
  }
});
