// Automatic prefix caching changes no output, bit for bit: the engine with and without it on every
// fixture architecture (GQA with a sliding window shorter than the shared prefix, MLA latent blocks,
// LongCat-Flash's two MLA caches per layer), in both compute modes and on the device engine (the CUDA
// emulator, and a GPU where there is one), with prompts that share whole blocks, diverge inside a
// block, repeat exactly, run as n > 1 siblings admitted in one step, and are preempted under a tight cache.
import assert from 'node:assert/strict';
import { existsSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';

import { EngineCore, type EngineCoreOptions } from '../src/engine/engine-core.js';
import type { EngineEvent, GenerateRequest } from '../src/engine/types.js';
import type { ForwardModel } from '../src/model/forward-batch.js';
import { loadCudaModel, loadModel, type LoadedModel } from '../src/model/load.js';
import { packageRoot } from '../src/native/index.js';
import { createCudaEmulator, withLazyStreams } from './helpers/cuda-emu.js';
import { needsCudaDevice } from './helpers/cuda-skip.js';

const fixturesDir = path.join(packageRoot(), 'test', 'fixtures');
const fixtures = readdirSync(fixturesDir).filter((d) => existsSync(path.join(fixturesDir, d, 'golden.json'))).sort();

function request(id: string, prompt: number[], over: Partial<GenerateRequest> = {}): GenerateRequest {
  return {
    id, promptTokenIds: prompt, maxTokens: 8, stopTokenIds: [], ignoreEos: true, minTokens: 0, returnRoutedExperts: false,
    sampling: { temperature: 0, topP: 1, topK: 0, minP: 0, repetitionPenalty: 1, presencePenalty: 0, frequencyPenalty: 0, logprobs: 3 },
    ...over,
  };
}

interface Outcome { tokens: number[]; logprobs: unknown[]; cachedTokens: number | undefined; reason: string }

/** Runs waves of requests (each wave after the previous one finished); every request's tokens and logprobs. */
function run(loaded: LoadedModel<ForwardModel>, opts: Partial<EngineCoreOptions>, waves: GenerateRequest[][]):
    { out: Map<string, Outcome>; core: EngineCore; hits: number; queries: number } {
  const core = new EngineCore(loaded, {
    kvCacheBlocks: 128, kvCacheGb: 0, blockSize: 4, maxNumSeqs: 8, maxNumBatchedTokens: 64, servedModelName: 't', ...opts,
  });
  const out = new Map<string, Outcome>();
  let hits = 0;
  let queries = 0;
  for (const wave of waves) {
    for (const r of wave) {
      assert.equal(core.add(r), null);
      out.set(r.id, { tokens: [], logprobs: [], cachedTokens: undefined, reason: '' });
    }
    for (let steps = 0; core.hasWork(); steps++) {
      assert.ok(steps < 500, 'the engine should finish');
      const res = core.step();
      hits += res?.metrics.prefixCache?.hitTokens ?? 0;
      queries += res?.metrics.prefixCache?.queriedTokens ?? 0;
      for (const ev of res?.events ?? [] as EngineEvent[]) {
        const o = out.get(ev.id)!;
        if (ev.type === 'tokens') {
          o.tokens.push(...ev.tokenIds);
          o.logprobs.push(...(ev.logprobs ?? []));
        } else {
          o.reason = ev.reason;
          o.cachedTokens = ev.cachedTokens;
        }
      }
    }
  }
  return { out, core, hits, queries };
}

const tokens = (seed: number, n: number) => Array.from({ length: n }, (_, i) => 3 + ((seed * 7919 + i * 104729) % 1000));

/** A 21-token system prompt (5 full blocks of 4 and one token) and the requests that share it. */
function workload(): GenerateRequest[][] {
  const system = tokens(1, 21);
  const seeded = { temperature: 0.9, topP: 0.95, topK: 0, minP: 0, repetitionPenalty: 1.1, presencePenalty: 0, frequencyPenalty: 0.2, logprobs: 2 };
  return [
    [request('cold', [...system, ...tokens(2, 5)])],
    [
      request('warm', [...system, ...tokens(3, 6)]),                        // 5 blocks cached
      request('diverges', [...system.slice(0, 10), ...tokens(4, 9)]),        // inside block 2: 2 blocks
      request('repeat', [...system, ...tokens(2, 3)]),                       // exactly 24 = 6 blocks: 5 cached, the last recomputed
      request('n0', [...tokens(5, 13)], { sampling: { ...seeded, seed: 11 } }),  // siblings, one step: n1 starts on n0's blocks
      request('n1', [...tokens(5, 13)], { sampling: { ...seeded, seed: 12 } }),
      request('routed', [...system, ...tokens(6, 2)], { returnRoutedExperts: true }), // computes every position
    ],
  ];
}

/** The workload with prefix caching on and off on one model: identical outputs, and the expected hits. */
function checkSame(loaded: LoadedModel<ForwardModel>, label: string): void {
  const off = run(loaded, {}, workload());
  const on = run(loaded, { prefixCacheKey: label }, workload());
  for (const [id, o] of off.out) assert.deepEqual(on.out.get(id)!.tokens, o.tokens, `${label} ${id}: tokens`);
  for (const [id, o] of off.out) assert.deepEqual(on.out.get(id)!.logprobs, o.logprobs, `${label} ${id}: logprobs`);
  if (loaded.spec.recurrentState) {
    // Hybrid models (qwen3_next): prefix caching is refused, so nothing is found or cached.
    assert.match(on.core.prefixCachingRefused ?? '', /prefix caching is off: .* keeps recurrent state/);
    assert.ok([...on.out.values()].every((o) => o.cachedTokens === 0), `${label}: nothing is cached`);
    assert.equal(on.hits, 0);
    return;
  }
  const cached = Object.fromEntries([...on.out].map(([id, o]) => [id, o.cachedTokens]));
  assert.deepEqual(cached, { cold: 0, warm: 20, diverges: 8, repeat: 20, n0: 0, n1: 12, routed: 0 }, label);
  assert.ok([...off.out.values()].every((o) => o.cachedTokens === 0), 'off: nothing is cached');
  assert.equal(off.queries, 0);
  assert.equal(on.hits, 20 + 8 + 20 + 12);
  // Every admitted sequence's tokens, but the routed one's (it does not look up).
  assert.equal(on.queries, 26 + 27 + 19 + 24 + 13 + 13);
  assert.equal(on.core.stats().kvBlocksUsed, 0, 'cached blocks are free');
  assert.ok(on.core.scheduler.cache.numCachedBlocks > 0);
  on.core.scheduler.cache.checkInvariants();
}

for (const name of fixtures) {
  test(`${name}: outputs with prefix caching equal those without, bit for bit (logprobs too), f32 and bf16`, () => {
    for (const fast of [false, true]) {
      const loaded = loadModel(path.join(fixturesDir, name), { fast });
      try {
        checkSame(loaded, `${name} ${fast ? 'bf16' : 'f32'}`);
      } finally {
        loaded.model.dispose();
      }
    }
  });
}

const deviceBackends = [
  { label: 'emulator', cuda: () => createCudaEmulator(), skip: false as string | false },
  // Work held back on the model's streams until something orders it: a read of K/V that a step
  // wrote without the order that makes it visible would see stale data.
  { label: 'emulator, lazy streams', cuda: () => withLazyStreams(createCudaEmulator()), skip: false as string | false },
  { label: 'gpu', cuda: () => undefined, skip: needsCudaDevice },
];

for (const b of deviceBackends) {
  test(`device engine (${b.label}): outputs with prefix caching equal those without, bit for bit`, { skip: b.skip }, () => {
    for (const name of ['mixtral', 'deepseek_v3', 'longcat_flash']) {
      const cuda = b.cuda();
      const loaded = loadCudaModel(path.join(fixturesDir, name), { device: 0, ...(cuda ? { cuda } : {}) });
      try {
        checkSame(loaded, `${name} on ${b.label}`);
      } finally {
        loaded.model.dispose();
      }
    }
  });
}

test('preemption under a tight cache with prefix caching: outputs equal a roomy engine without it', () => {
  for (const name of ['mixtral', 'deepseek_v3']) {
    const loaded = loadModel(path.join(fixturesDir, name), { fast: false });
    try {
      const shared = tokens(9, 18);
      const reqs = [0, 1, 2, 3, 4, 5].map((i) => request(`p${i}`, [...shared, ...tokens(20 + i, 3 + 2 * i)], { maxTokens: 14 }));
      const roomy = run(loaded, {}, [reqs]);
      // 16 blocks of 4 tokens: six sequences of ~35-45 tokens cannot all hold their K/V at once.
      const tight = run(loaded, { prefixCacheKey: name, kvCacheBlocks: 16 }, [reqs]);
      for (const [id, o] of roomy.out) {
        assert.deepEqual(tight.out.get(id)!.tokens, o.tokens, `${name} ${id}: tokens`);
        assert.deepEqual(tight.out.get(id)!.logprobs, o.logprobs, `${name} ${id}: logprobs`);
      }
      assert.ok(tight.core.stats().preemptionsTotal > 0, `${name}: the tight cache should have forced preemptions`);
      assert.ok(tight.hits > 0, `${name}: the shared prefix should have been found`);
      tight.core.scheduler.cache.checkInvariants();
    } finally {
      loaded.model.dispose();
    }
  }
});

test('a model with recurrent state (hybrid linear attention) turns prefix caching off and says why', () => {
  const loaded = loadModel(path.join(fixturesDir, 'mixtral'), { fast: false });
  try {
    loaded.spec.recurrentState = true;
    const { core, out } = run(loaded, { prefixCacheKey: 'mixtral' }, workload());
    assert.equal(core.scheduler.cache.prefixCaching, false);
    assert.equal(core.prefixCachingRefused,
      'prefix caching is off: mixtral keeps recurrent state (linear attention layers) that KV blocks alone cannot restore');
    assert.ok([...out.values()].every((o) => o.cachedTokens === 0));
  } finally {
    loaded.model.dispose();
  }
});
