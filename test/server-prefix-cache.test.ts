// Prefix caching through the API: the real daemon (demo model, f32) with prefix caching on (the
// default) and off, driven by the openai client. Prompts sharing a long prefix are served from the
// cache (usage.prompt_tokens_details.cached_tokens, streamed usage too, and the two metrics), and
// every output equals the --no-prefix-caching daemon's, logprobs included; and in rank processes.
import assert from 'node:assert/strict';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';

import parsePrometheusTextFormat from 'parse-prometheus-text-format';

import { packageRoot } from '../src/native/index.js';
import { startDaemon, type Daemon } from './helpers/daemon.js';

const MODEL = 'expertd-demo';

async function tokenize(base: string, prompt: string): Promise<number[]> {
  const r = await fetch(`${base}/tokenize`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ prompt }) });
  return ((await r.json()) as { tokens: number[] }).tokens;
}

/** What a prompt finds after another was served: the whole 16-token blocks they share, short of its last token. */
function expectedCached(before: number[], prompt: number[]): number {
  let common = 0;
  while (common < before.length && common < prompt.length && before[common] === prompt[common]) common++;
  return Math.floor(Math.min(common, prompt.length - 1) / 16) * 16;
}

async function metric(base: string, name: string): Promise<number> {
  const text = await (await fetch(`${base}/metrics`)).text();
  const fam = parsePrometheusTextFormat(text).find((f) => f.name === name);
  assert.ok(fam, `metric ${name} missing`);
  return Number((fam.metrics[0] as { value: string }).value);
}

// Shared system text of several full 16-token blocks.
const SYSTEM = 'You are a careful assistant. Answer briefly, cite the question, and never invent facts. ' +
  'The user is an engineer who serves mixture-of-experts models and wants short, exact answers. ' +
  'Keep every answer under three sentences; say so plainly when you do not know something. ';

describe('prefix caching through the API (demo model, f32)', () => {
  let on: Daemon;
  let off: Daemon;
  before(async () => { [on, off] = await Promise.all([startDaemon(), startDaemon(['--no-prefix-caching'])]); });
  after(async () => {
    on?.proc.kill('SIGKILL');
    off?.proc.kill('SIGKILL');
    await Promise.all([on?.exit, off?.exit]);
  });

  test('the startup line says whether prefix caching is on', () => {
    assert.match(on.logs.join(''), /prefix caching on/);
    assert.match(off.logs.join(''), /prefix caching off/);
  });

  test('completions: a warm prompt reports cached tokens, metrics count them, outputs equal the uncached daemon\'s', async () => {
    const ask = (d: Daemon, q: string, n = 1) => d.client.completions.create({
      model: MODEL, prompt: SYSTEM + q, max_tokens: 8, temperature: 0.8, seed: 5, n, logprobs: 2,
    });
    const q0 = await ask(on, 'Question: what is a KV cache?');
    assert.equal(q0.usage!.prompt_tokens_details!.cached_tokens, 0, 'the first prompt finds nothing');
    const q1 = await ask(on, 'Question: what is an expert?');
    const cached = q1.usage!.prompt_tokens_details!.cached_tokens!;
    const t0 = await tokenize(on.base, SYSTEM + 'Question: what is a KV cache?');
    const t1 = await tokenize(on.base, SYSTEM + 'Question: what is an expert?');
    assert.equal(cached, expectedCached(t0, t1));
    assert.ok(cached >= 48, `cached_tokens ${cached}`);
    // n = 2: both choices find the system prompt.
    const q2 = await ask(on, 'Question: why share a prefix?', 2);
    assert.equal(q2.usage!.prompt_tokens_details!.cached_tokens, cached);
    const q0off = await ask(off, 'Question: what is a KV cache?');
    const q1off = await ask(off, 'Question: what is an expert?');
    const q2off = await ask(off, 'Question: why share a prefix?', 2);
    for (const [a, b] of [[q0, q0off], [q1, q1off], [q2, q2off]] as const) {
      assert.deepEqual(a.choices.map((c) => [c.text, c.logprobs]), b.choices.map((c) => [c.text, c.logprobs]));
      assert.equal(b.usage!.prompt_tokens_details!.cached_tokens, 0);
      assert.equal(a.usage!.prompt_tokens, b.usage!.prompt_tokens);
    }
    // Three sequences of q0's length are looked up before q2 runs; hits are the reported cached tokens.
    const hits = await metric(on.base, 'expertd_prefix_cache_hits_total');
    const queries = await metric(on.base, 'expertd_prefix_cache_queries_total');
    assert.ok(hits >= cached * 3, `hits ${hits}`);
    assert.ok(queries >= q0.usage!.prompt_tokens + q1.usage!.prompt_tokens + q2.usage!.prompt_tokens * 2, `queries ${queries}`);
    assert.equal(await metric(off.base, 'expertd_prefix_cache_hits_total'), 0);
    assert.equal(await metric(off.base, 'expertd_prefix_cache_queries_total'), 0);
    // A new prompt with n = 2: the second choice starts on the blocks the first computes in the same
    // step (a hit in the metrics), but the prompt was computed once, so usage reports no cached tokens.
    const fresh = await on.client.completions.create({
      model: MODEL, prompt: `A new system text, never seen. ${SYSTEM.split('').reverse().join('')}`, max_tokens: 2, n: 2, temperature: 0,
    });
    assert.equal(fresh.usage!.prompt_tokens_details!.cached_tokens, 0);
    assert.ok(await metric(on.base, 'expertd_prefix_cache_hits_total') > hits, 'the second choice found the first one\'s blocks');
  });

  test('chat: cached tokens in the usage, streamed (stream_options.include_usage) and not', async () => {
    const messages = (q: string) => [{ role: 'system' as const, content: SYSTEM }, { role: 'user' as const, content: q }];
    await on.client.chat.completions.create({ model: MODEL, messages: messages('Hello'), max_tokens: 4, temperature: 0 });
    const warm = await on.client.chat.completions.create({ model: MODEL, messages: messages('Hi again'), max_tokens: 4, temperature: 0 });
    const cached = warm.usage!.prompt_tokens_details!.cached_tokens!;
    assert.ok(cached >= 64, `chat cached_tokens ${cached}`);
    const stream = await on.client.chat.completions.create({
      model: MODEL, messages: messages('Hi again'), max_tokens: 4, temperature: 0, stream: true, stream_options: { include_usage: true },
    });
    let text = '';
    let usage: { prompt_tokens_details?: { cached_tokens?: number } } | null | undefined = null;
    for await (const chunk of stream) {
      text += chunk.choices[0]?.delta.content ?? '';
      if (chunk.usage) usage = chunk.usage;
    }
    assert.equal(text, warm.choices[0]!.message.content);
    // The same prompt again: every full block but the one holding its last token.
    assert.ok(usage!.prompt_tokens_details!.cached_tokens! >= cached, JSON.stringify(usage));
    const offWarm = await off.client.chat.completions.create({ model: MODEL, messages: messages('Hi again'), max_tokens: 4, temperature: 0 });
    assert.equal(offWarm.choices[0]!.message.content, warm.choices[0]!.message.content);
    assert.deepEqual(offWarm.usage!.prompt_tokens_details, { cached_tokens: 0 });
  });
});

describe('prefix caching in rank processes (--nproc-per-node 2, mixtral fixture, f32)', () => {
  test('each rank caches what it served: warm requests report cached tokens, outputs equal one engine without caching', async () => {
    const model = path.join(packageRoot(), 'test', 'fixtures', 'mixtral');
    const ask = async (d: Daemon, q: string) => d.client.completions.create({
      model: 'mixtral', prompt: SYSTEM + q, max_tokens: 6, temperature: 0, logprobs: 2,
    });
    const one = await startDaemon(['--model', model, '--no-prefix-caching']);
    let want: Awaited<ReturnType<typeof ask>>[];
    try {
      want = [await ask(one, 'First question?'), await ask(one, 'Second question?')];
    } finally {
      one.proc.kill('SIGKILL');
      await one.exit;
    }
    const d = await startDaemon(['--model', model, '--nproc-per-node', '2']);
    try {
      // One at a time, so the front alternates the ranks: requests 1 and 2 are cold on their rank,
      // 3 and 4 find the system prompt their rank computed.
      const got = [];
      for (const q of ['First question?', 'Second question?', 'First question?', 'Second question?']) got.push(await ask(d, q));
      got.forEach((g, i) => assert.deepEqual(g.choices.map((c) => [c.text, c.logprobs]), want[i % 2]!.choices.map((c) => [c.text, c.logprobs]), `request ${i}`));
      const cached = got.map((g) => g.usage!.prompt_tokens_details!.cached_tokens!);
      assert.equal(cached[0], 0);
      assert.equal(cached[1], 0);
      assert.ok(cached[2]! >= 32 && cached[3]! >= 32, `cached_tokens ${JSON.stringify(cached)}`);
      // The front sums the ranks' counters.
      assert.equal(await metric(d.base, 'expertd_prefix_cache_hits_total'), cached[2]! + cached[3]!);
    } finally {
      d.proc.kill('SIGTERM');
      await d.exit;
    }
  });
});
