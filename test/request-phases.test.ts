// Per-request prefill and decode time (vLLM's meaning), on two clocks: the engine core on a clock
// the test moves (each forward "takes" 10 ms per token), so every figure is known exactly; and the
// real daemon's /metrics, where each finished sequence is one observation and the phases fit inside
// the request's end-to-end latency, while step durations go to the step histograms.
import assert from 'node:assert/strict';
import path from 'node:path';
import { test } from 'node:test';

import parsePrometheusTextFormat from 'parse-prometheus-text-format';

import { EngineCore } from '../src/engine/engine-core.js';
import type { EngineEvent, GenerateRequest } from '../src/engine/types.js';
import { loadModel } from '../src/model/load.js';
import { packageRoot } from '../src/native/index.js';
import { startDaemon, stopDaemon } from './helpers/daemon.js';

const fixture = path.join(packageRoot(), 'test', 'fixtures', 'mixtral');
const MS_PER_TOKEN = 10;

function request(id: string, promptLength: number, maxTokens: number): GenerateRequest {
  return {
    id, promptTokenIds: Array.from({ length: promptLength }, (_, i) => 3 + i), maxTokens,
    sampling: { temperature: 0, topP: 1, topK: 0, minP: 0, repetitionPenalty: 1, presencePenalty: 0, frequencyPenalty: 0 },
    stopTokenIds: [], ignoreEos: true, minTokens: 0, returnRoutedExperts: false,
  };
}

test('engine core: prefill = first scheduling to first token, decode = first token to last, on a controlled clock', () => {
  const loaded = loadModel(fixture, { fast: false });
  let now = 1000;
  const forward = loaded.model.forward.bind(loaded.model);
  loaded.model.forward = (batch, cache, blockSize) => {
    now += MS_PER_TOKEN * batch.tokenIds.length; // the step's cost: known, not measured
    return forward(batch, cache, blockSize);
  };
  const core = new EngineCore(loaded, {
    kvCacheBlocks: 64, kvCacheGb: 0, blockSize: 4, maxNumSeqs: 4, maxNumBatchedTokens: 8, servedModelName: 't',
    clock: () => now,
  });
  const finished = new Map<string, Extract<EngineEvent, { type: 'finished' }>>();
  const steps: { prefillTokens: number; decodeTokens: number; durationMs: number }[] = [];
  const run = () => {
    const r = core.step();
    if (!r) return;
    steps.push(r.metrics);
    for (const ev of r.events) if (ev.type === 'finished') finished.set(ev.id, ev);
  };

  // a: a 10-token prompt arrives at 1000 and waits 50 ms; with 8 tokens a step its prefill takes two
  // steps (8 tokens: 80 ms, then 2 tokens: 20 ms, which samples its first token), then 3 decodes.
  assert.equal(core.add(request('a', 10, 4)), null);
  now += 50;
  run(); // 1050 -> 1130, a's first chunk
  run(); // 1130 -> 1150, a's last chunk + its first token
  // b arrives now and joins a's decodes: prompt 3 tokens + a's decode = 4 tokens (40 ms) a step.
  assert.equal(core.add(request('b', 3, 5)), null);
  // c arrives and is aborted before it is ever scheduled: no phases to report.
  assert.equal(core.add(request('c', 2, 5)), null);
  const cAbort = core.abort('c')!;
  assert.equal(cAbort.type, 'finished');
  assert.equal('prefillMs' in cAbort, false);
  assert.equal('decodeMs' in cAbort, false);
  run(); // 1150 -> 1190: a decodes (token 2), b prefills and samples its first token
  run(); // 1190 -> 1210: a token 3, b token 2
  run(); // 1210 -> 1230: a token 4 (a ends: length), b token 3
  assert.deepEqual(steps.map((s) => s.durationMs), [80, 20, 40, 20, 20]);
  assert.deepEqual(steps.map((s) => s.prefillTokens), [8, 2, 3, 0, 0]);
  const a = finished.get('a')!;
  assert.equal(a.reason, 'length');
  assert.equal(a.completionTokens, 4);
  assert.equal(a.prefillMs, 1150 - 1050, 'first scheduled at 1050, first token at 1150 (both chunks)');
  assert.equal(a.decodeMs, 1230 - 1150, 'first token 1150, last token 1230');
  // b is aborted after 3 tokens (a stop string, a client gone): still one set of phases.
  const b = core.abort('b')!;
  assert.equal(b.type === 'finished' && b.reason, 'abort');
  assert.equal(b.type === 'finished' && b.prefillMs, 1190 - 1150);
  assert.equal(b.type === 'finished' && b.decodeMs, 1230 - 1190);
  // One token only: decode time 0, not absent.
  assert.equal(core.add(request('d', 2, 1)), null);
  now += 5;
  run(); // 1235 -> 1255
  const d = finished.get('d')!;
  assert.deepEqual([d.prefillMs, d.decodeMs], [20, 0]);
});

type Families = ReturnType<typeof parsePrometheusTextFormat>;
/** A histogram's _count and _sum from a scrape. */
function hist(fams: Families, name: string): { count: number; sum: number } {
  const f = fams.find((x) => x.name === name);
  assert.ok(f, `missing ${name}`);
  const m = f.metrics[0]!;
  return { count: Number(m.count), sum: Number(m.sum) };
}

test('live /metrics: one prefill and one decode observation per finished sequence; steps under step names', async () => {
  const d = await startDaemon(['--model', fixture]);
  try {
    const scrape = async () => parsePrometheusTextFormat(await (await fetch(`${d.base}/metrics`)).text());
    const names = ['expertd_request_prefill_time_seconds', 'expertd_request_decode_time_seconds',
      'expertd_prefill_step_seconds', 'expertd_decode_step_seconds', 'expertd_e2e_request_latency_seconds'];
    const before = await scrape();
    const maxTokens = 8;
    const t0 = performance.now();
    const res = await d.client.completions.create({
      model: 'mixtral', prompt: 'The cat sat', max_tokens: maxTokens, n: 2, temperature: 0,
      // @ts-expect-error vLLM extension: every sequence runs to max_tokens
      ignore_eos: true,
    });
    const wallSeconds = (performance.now() - t0) / 1000;
    assert.deepEqual(res.choices.map((c) => c.finish_reason), ['length', 'length']);
    const after = await scrape();
    const delta = Object.fromEntries(names.map((n) => {
      const a = hist(after, n);
      const b = hist(before, n);
      return [n, { count: a.count - b.count, sum: a.sum - b.sum }];
    }));
    // Per sequence: n = 2 -> 2 observations each (step durations would be >= 8).
    assert.equal(delta.expertd_request_prefill_time_seconds!.count, 2);
    assert.equal(delta.expertd_request_decode_time_seconds!.count, 2);
    assert.equal(delta.expertd_e2e_request_latency_seconds!.count, 2);
    const prefill = delta.expertd_request_prefill_time_seconds!.sum;
    const decode = delta.expertd_request_decode_time_seconds!.sum;
    assert.ok(prefill > 0 && decode > 0, `prefill ${prefill} s, decode ${decode} s`);
    // Each sequence's phases lie inside its end-to-end latency (arrival to last token), which lies
    // inside the client's wall time.
    assert.ok(prefill + decode <= delta.expertd_e2e_request_latency_seconds!.sum,
      `prefill ${prefill} + decode ${decode} <= e2e ${delta.expertd_e2e_request_latency_seconds!.sum}`);
    assert.ok(delta.expertd_e2e_request_latency_seconds!.sum <= 2 * wallSeconds);
    // Steps: at least one with the prompts, and the 7 further tokens of each sequence in decode-only
    // steps (batched together or not).
    assert.ok(delta.expertd_prefill_step_seconds!.count >= 1);
    assert.ok(delta.expertd_decode_step_seconds!.count >= maxTokens - 1);
    assert.ok(delta.expertd_decode_step_seconds!.sum <= wallSeconds);
  } finally {
    assert.equal(await stopDaemon(d), 0);
  }
});
