// What a hostile or careless client can ask for, against the real HTTP server on a port (FakeEngine
// test double behind it): prompt and sequence caps (400 naming the limit and the value), the queue
// counted in sequences (429 + Retry-After for what does not fit now), and the serve flags behind them.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { APIError } from 'openai';
import { serveFlags, serverLimits } from '../src/cli/serve.js';
import { parseFlags } from '../src/cli/options.js';
import { MODEL, errorOf, post, startServer, waitFor } from './helpers/server-harness.js';

test('1,000 prompts x n=4 under a queue of 4 sequences: refused with 400 before any engine work', async () => {
  const h = await startServer({}, { maxQueuedSequences: 4 });
  try {
    const prompts = Array.from({ length: 1000 }, (_, i) => `p${i}`);
    // Over --max-prompts-per-request (128): the schema refuses it and says the limit and the value.
    let r = await post(h.base, '/v1/completions', { prompt: prompts, n: 4, max_tokens: 1 });
    assert.equal(r.status, 400);
    let e = errorOf(r);
    assert.equal(e.type, 'invalid_request_error');
    assert.equal(e.param, 'prompt');
    assert.equal(e.message, "Invalid value for 'prompt': must hold at most 128 prompts, the server's limit per request (got 1000).");
    // The same as token-id lists.
    r = await post(h.base, '/v1/completions', { prompt: prompts.map(() => [5, 6]), max_tokens: 1 });
    assert.equal(r.status, 400);
    assert.match(errorOf(r).message, /at most 128 prompts.*\(got 1000\)/);
    // Under the prompt cap, but 8 x 4 = 32 sequences can never fit a queue of 4.
    r = await post(h.base, '/v1/completions', { prompt: prompts.slice(0, 8), n: 4, max_tokens: 1 });
    assert.equal(r.status, 400);
    e = errorOf(r);
    assert.equal(e.param, 'n');
    assert.equal(e.code, 'too_many_sequences');
    assert.equal(e.message, "This request asks for 32 sequences (8 prompts x n=4), but the server queues at most 4 sequences, so it could never be admitted. Lower 'n' or split the prompts over several requests.");
    // An empty queue does not let a too-big request through (it did: 'a lone big request' was admitted).
    r = await post(h.base, '/v1/completions', { prompt: 'x', n: 5, max_tokens: 1 });
    assert.equal(r.status, 400);
    assert.match(errorOf(r).message, /5 sequences \(1 prompt x n=5\).*at most 4/);
    // Chat counts n too, and the openai client sees a BadRequest.
    await assert.rejects(
      h.client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'x' }], n: 5, max_tokens: 1 }),
      (err: unknown) => err instanceof APIError && err.status === 400 && /queues at most 4/.test(err.message));
    assert.equal(h.engine.requests.length, 0, 'nothing reached the engine');
    // What fits is served.
    const ok = await h.client.completions.create({ model: MODEL, prompt: ['a', 'b'], n: 2, max_tokens: 2 });
    assert.equal(ok.choices.length, 4);
  } finally {
    await h.close();
  }
});

test('sequences per request and n are capped; one long token-id prompt is one prompt', async () => {
  const h = await startServer({}, { maxSequencesPerRequest: 6, maxPromptsPerRequest: 3 });
  try {
    let r = await post(h.base, '/v1/completions', { prompt: ['a', 'b', 'c'], n: 3, max_tokens: 1 });
    assert.equal(r.status, 400);
    assert.equal(errorOf(r).message, "This request asks for 9 sequences (3 prompts x n=3), but the server accepts at most 6 sequences per request. Lower 'n' or split the prompts over several requests.");
    r = await post(h.base, '/v1/completions', { prompt: ['a', 'b', 'c', 'd'], max_tokens: 1 });
    assert.equal(r.status, 400);
    assert.match(errorOf(r).message, /at most 3 prompts.*\(got 4\)/);
    r = await post(h.base, '/v1/completions', { prompt: 'a', n: 500, max_tokens: 1 });
    assert.equal(r.status, 400);
    assert.equal(errorOf(r).message, "Invalid value for 'n': must be an integer between 1 and 128 (got 500).");
    // A single list of 200 token ids is one prompt, not 200.
    r = await post(h.base, '/v1/completions', { prompt: Array.from({ length: 200 }, () => 9), max_tokens: 2 });
    assert.equal(r.status, 200, r.text);
    r = await post(h.base, '/v1/completions', { prompt: ['a', 'b', 'c'], n: 2, max_tokens: 1 });
    assert.equal(r.status, 200, r.text);
    assert.equal(r.json.choices.length, 6);
  } finally {
    await h.close();
  }
});

test('the queue counts sequences: a request that does not fit the room left gets 429 + Retry-After', async () => {
  const h = await startServer({ tokenIntervalMs: 10, maxRunning: 1 }, { maxQueuedSequences: 4 });
  const ac = new AbortController();
  try {
    // One request, 3 sequences: 1 runs, 2 wait.
    const first = fetch(`${h.base}/v1/completions`, {
      method: 'POST', signal: ac.signal, headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ prompt: 'q', n: 3, max_tokens: 250 }),
    }).catch(() => null);
    await waitFor(() => h.engine.stats().running === 1 && h.engine.stats().waiting === 2, 3000, '1 running + 2 waiting');
    // 2 waiting + 3 > 4: refused now, though it would fit an empty queue.
    let r = await post(h.base, '/v1/completions', { prompt: ['x', 'y', 'z'], max_tokens: 1 });
    assert.equal(r.status, 429);
    const e = errorOf(r);
    assert.equal(e.type, 'rate_limit_error');
    assert.equal(e.code, 'queue_full');
    assert.equal(e.message, 'The server is overloaded: 2 sequences are waiting and this request adds 3, more than the 4 the queue holds. Retry later.');
    assert.equal(r.headers.get('retry-after'), '1');
    // 2 + 2 fits.
    const fits = post(h.base, '/v1/completions', { prompt: 'w', n: 2, max_tokens: 1 });
    await waitFor(() => h.engine.requests.length === 5, 3000, 'the fitting request queued');
    // Now the queue is full: even one sequence waits its turn elsewhere.
    r = await post(h.base, '/v1/completions', { prompt: 'v', max_tokens: 1 });
    assert.equal(r.status, 429);
    ac.abort();
    assert.equal((await fits).status, 200);
    await first;
  } finally {
    ac.abort();
    await h.close();
  }
});

test('503 + Retry-After while the model loads, even for a request over the free room', async () => {
  const h = await startServer({}, { maxQueuedSequences: 4 });
  try {
    h.engine.currentState = 'loading';
    const r = await post(h.base, '/v1/completions', { prompt: 'x', n: 4, max_tokens: 1 });
    assert.equal(r.status, 503);
    assert.equal(errorOf(r).code, 'model_loading');
    assert.equal(r.headers.get('retry-after'), '1');
  } finally {
    h.engine.currentState = 'ready';
    await h.close();
  }
});

test('serve flags: --max-queued-sequences, its old name --max-queued-requests, and the per-request caps', () => {
  const limits = (argv: string[], env: NodeJS.ProcessEnv = {}) => serverLimits(parseFlags(serveFlags, argv, env).flags);
  assert.deepEqual(limits([]), { maxQueuedSequences: 256, maxPromptsPerRequest: 128, maxSequencesPerRequest: 256 });
  assert.equal(limits(['--max-queued-requests', '8']).maxQueuedSequences, 8);
  assert.equal(limits([], { EXPERTD_MAX_QUEUED_REQUESTS: '9' }).maxQueuedSequences, 9);
  assert.equal(limits(['--max-queued-sequences', '12', '--max-queued-requests', '8']).maxQueuedSequences, 12);
  assert.deepEqual(limits(['--max-prompts-per-request', '4', '--max-sequences-per-request', '16']),
    { maxQueuedSequences: 256, maxPromptsPerRequest: 4, maxSequencesPerRequest: 16 });
  assert.throws(() => limits(['--max-queued-sequences', '0']), /below the minimum 1/);
});
