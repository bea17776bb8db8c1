// The engine's step loop with the native batched sampler against the JS sampler, on every fixture
// model: the same requests (every sampling option, seeded, several in one batch, chunked prefills)
// produce the same tokens and finish reasons, and logprobs within f32 rounding.
import assert from 'node:assert/strict';
import { existsSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';

import { EngineCore } from '../src/engine/engine-core.js';
import type { EngineEvent, GenerateRequest, TokenLogprob } from '../src/engine/types.js';
import { loadModel } from '../src/model/load.js';
import { packageRoot } from '../src/native/index.js';
import { SAMPLING_CASES } from './helpers/sampling-cases.js';
import { testSeed } from './helpers/seed.js';

const fixturesDir = path.join(packageRoot(), 'test', 'fixtures');
const fixtures = readdirSync(fixturesDir).filter((d) => existsSync(path.join(fixturesDir, d, 'config.json'))).sort();

interface Outcome { tokens: number[]; logprobs: TokenLogprob[]; end?: EngineEvent }

function runAll(core: EngineCore, reqs: GenerateRequest[]): Map<string, Outcome> {
  const out = new Map<string, Outcome>(reqs.map((r) => [r.id, { tokens: [], logprobs: [] }]));
  for (const r of reqs) assert.equal(core.add(r), null);
  for (let guard = 0; core.hasWork() && guard < 10_000; guard++) {
    const res = core.step();
    if (!res) break;
    for (const ev of res.events) {
      const o = out.get(ev.id)!;
      if (ev.type === 'tokens') {
        o.tokens.push(...ev.tokenIds);
        if (ev.logprobs) o.logprobs.push(...ev.logprobs);
      } else {
        o.end = ev;
      }
    }
  }
  return out;
}

test('fixtures exist to compare on', () => assert.ok(fixtures.length >= 7, fixtures.join(',')));

for (const name of fixtures) {
  test(`${name}: native batched sampling gives the JS sampler's tokens for every option and seed`, (t) => {
    const seed = testSeed(t, 1000);
    const make = (sampler: 'native' | 'js'): EngineCore => new EngineCore(loadModel(path.join(fixturesDir, name), { fast: false }), {
      kvCacheBlocks: 256, kvCacheGb: 0, blockSize: 4, maxNumSeqs: 32, maxNumBatchedTokens: 48,
      servedModelName: name, sampler,
    });
    const reqs: GenerateRequest[] = SAMPLING_CASES.map((c, i) => ({
      id: `r${i}`, promptTokenIds: Array.from({ length: 5 + (i % 7) }, (_, j) => (seed + 31 * i + 17 * j) % 1000),
      maxTokens: 6, stopTokenIds: [], ignoreEos: i % 2 === 0, minTokens: 0, returnRoutedExperts: false,
      sampling: {
        temperature: 1, topP: 1, topK: 0, minP: 0, repetitionPenalty: 1, presencePenalty: 0, frequencyPenalty: 0,
        seed: seed + i, ...c,
      },
    }));
    const js = runAll(make('js'), reqs);
    const native = runAll(make('native'), reqs);
    for (const r of reqs) {
      const a = native.get(r.id)!, b = js.get(r.id)!;
      const where = `${name} ${JSON.stringify(r.sampling)}`;
      assert.deepEqual(a.tokens, b.tokens, `${where}: tokens`);
      assert.equal(a.end?.type === 'finished' && a.end.reason, b.end?.type === 'finished' && b.end.reason, `${where}: finish`);
      assert.equal(a.logprobs.length, b.logprobs.length, `${where}: logprobs`);
      a.logprobs.forEach((lp, k) => {
        const ref = b.logprobs[k]!;
        assert.ok(Math.abs(lp.logprob - ref.logprob) <= 1e-7 * (1 + Math.abs(ref.logprob)), `${where}: logprob ${k}`);
        assert.deepEqual(lp.top.map((x) => x.tokenId), ref.top.map((x) => x.tokenId), `${where}: top ids ${k}`);
      });
    }
  });
}
