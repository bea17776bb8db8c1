// Prompt logprobs (completions' echo with logprobs, which lm-eval's loglikelihood reads): every
// prompt token's logprob given the tokens before it equals HF transformers' log-softmax of its own
// logits at the previous position (the fixture goldens), with the top alternatives; in one prefill
// or in chunks, beside requests without them, and never from the prefix cache.
import assert from 'node:assert/strict';
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';

import { EngineCore } from '../src/engine/engine-core.js';
import type { EngineEvent, GenerateRequest, TokenLogprob } from '../src/engine/types.js';
import { loadModel } from '../src/model/load.js';
import { packageRoot } from '../src/native/index.js';

const fixturesDir = path.join(packageRoot(), 'test', 'fixtures');
const fixtures = readdirSync(fixturesDir).filter((d) => existsSync(path.join(fixturesDir, d, 'golden.json'))).sort();

interface Golden { cases: { prompt_ids: number[]; logits: number[][] }[] }

const request = (id: string, promptTokenIds: number[], promptLogprobs: number | null): GenerateRequest => ({
  id, promptTokenIds, maxTokens: 2, stopTokenIds: [], ignoreEos: true, minTokens: 0, returnRoutedExperts: false,
  sampling: { temperature: 0, topP: 1, topK: 0, minP: 0, repetitionPenalty: 1, presencePenalty: 0, frequencyPenalty: 0 },
  ...(promptLogprobs !== null ? { promptLogprobs } : {}),
});

/** Runs the requests to the end; each one's prompt logprobs (from its first tokens event) and events. */
function run(core: EngineCore, reqs: GenerateRequest[]): Map<string, { prompt?: (TokenLogprob | null)[]; events: EngineEvent[] }> {
  const out = new Map(reqs.map((r) => [r.id, { events: [] as EngineEvent[] } as { prompt?: (TokenLogprob | null)[]; events: EngineEvent[] }]));
  for (const r of reqs) assert.equal(core.add(r), null);
  for (let guard = 0; core.hasWork() && guard < 1000; guard++) {
    const res = core.step();
    if (!res) break;
    for (const ev of res.events) {
      const o = out.get(ev.id)!;
      o.events.push(ev);
      if (ev.type === 'tokens' && ev.promptLogprobs) {
        assert.equal(o.prompt, undefined, `${ev.id}: prompt logprobs come once`);
        o.prompt = ev.promptLogprobs;
      }
    }
  }
  return out;
}

/** log-softmax of a row, in float64. */
function logSoftmax(row: number[]): number[] {
  const max = Math.max(...row);
  const lse = max + Math.log(row.reduce((s, x) => s + Math.exp(x - max), 0));
  return row.map((x) => x - lse);
}

test('fixtures with goldens exist', () => assert.ok(fixtures.length >= 7, fixtures.join(',')));

for (const name of fixtures) {
  test(`${name}: prompt logprobs equal HF's log-softmax at the previous position`, () => {
    const golden = JSON.parse(readFileSync(path.join(fixturesDir, name, 'golden.json'), 'utf8')) as Golden;
    const loaded = loadModel(path.join(fixturesDir, name), { fast: false });
    // Chunks of 4 tokens (every golden prompt is longer), prefix caching on: a prompt-logprobs request
    // must compute every position even when an earlier request left the prompt's blocks cached.
    const core = new EngineCore(loaded, {
      kvCacheBlocks: 128, kvCacheGb: 0, blockSize: 4, maxNumSeqs: 4, maxNumBatchedTokens: 4, servedModelName: name,
      prefixCacheKey: name,
    });
    try {
      golden.cases.forEach((c, ci) => {
        const P = c.prompt_ids.length;
        run(core, [request(`warm${ci}`, c.prompt_ids, null)]);
        const plain = run(core, [request(`plain${ci}`, c.prompt_ids, null)]).get(`plain${ci}`)!;
        assert.equal(plain.prompt, undefined, 'no prompt logprobs unless asked');
        const plainEnd = plain.events.at(-1)!;
        if (core.prefixCachingRefused === null)
          assert.ok(plainEnd.type === 'finished' && (plainEnd.cachedTokens ?? 0) > 0, `${name}: the prompt's blocks are cached`);
        const got = run(core, [request(`lp${ci}`, c.prompt_ids, 3), request(`other${ci}`, [...c.prompt_ids].reverse(), null)]).get(`lp${ci}`)!;
        const lps = got.prompt!;
        assert.equal(lps.length, P);
        assert.equal(lps[0], null, 'the first prompt token has no logprob');
        for (let j = 1; j < P; j++) {
          const ref = logSoftmax(c.logits[j - 1]!);
          const lp = lps[j]!;
          const at = `${name} case ${ci} position ${j}`;
          assert.equal(lp.tokenId, c.prompt_ids[j], at);
          assert.ok(Math.abs(lp.logprob - ref[c.prompt_ids[j]!]!) <= 2e-3, `${at}: ${lp.logprob} vs HF ${ref[c.prompt_ids[j]!]}`);
          assert.equal(lp.top.length, 3, at);
          const order = ref.map((v, id) => [v, id] as const).sort((a, b) => b[0] - a[0]);
          lp.top.forEach((t, k) => {
            assert.ok(Math.abs(t.logprob - ref[t.tokenId]!) <= 2e-3, `${at} top ${k}`);
            // The same ids where HF's order is clear of the tolerance.
            if (order[k]![0] - order[k + 1]![0] > 5e-3 && (k === 0 || order[k - 1]![0] - order[k]![0] > 5e-3))
              assert.equal(t.tokenId, order[k]![1], `${at} top ${k} id`);
          });
        }
        const fin = got.events.at(-1)!;
        assert.ok(fin.type === 'finished' && fin.reason === 'length' && fin.cachedTokens === 0, `${name} case ${ci}: computed, not cached`);
      });
    } finally {
      loaded.model.dispose();
    }
  });
}
