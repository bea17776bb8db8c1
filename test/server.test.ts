// The HTTP server end to end on a real port, driven by the official `openai` client and raw fetch,
// around a FakeEngine/FakeCodec test double (test/helpers/fake-engine.ts).

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { APIError } from 'openai';
import parsePrometheusTextFormat from 'parse-prometheus-text-format';
import { EOS } from './helpers/fake-engine.js';
import { MODEL, errorOf, get, post, sleep, startServer, waitFor } from './helpers/server-harness.js';

test('completions: text, usage, determinism, token ids, length finish', async () => {
  const h = await startServer();
  try {
    const prompt = 'The experts said';
    const r1 = await h.client.completions.create({ model: MODEL, prompt, max_tokens: 12, temperature: 0, return_token_ids: true } as never);
    const r2 = await h.client.completions.create({ model: MODEL, prompt, max_tokens: 12, temperature: 0 });
    assert.equal(r1.object, 'text_completion');
    assert.equal(r1.model, MODEL);
    assert.match(r1.id, /^cmpl-/);
    assert.equal(r1.choices.length, 1);
    const c = r1.choices[0]! as typeof r1.choices[0] & { token_ids: number[]; prompt_token_ids: number[] };
    assert.equal(c.finish_reason, 'length');
    assert.equal(c.text, r2.choices[0]!.text, 'greedy is deterministic');
    assert.deepEqual(c.prompt_token_ids, h.codec.encode(prompt, true));
    assert.equal(c.token_ids.length, 12);
    assert.equal(c.text, h.codec.decode(c.token_ids, true));
    assert.deepEqual(r1.usage, { prompt_tokens: prompt.length + 1, completion_tokens: 12, total_tokens: prompt.length + 13,
      prompt_tokens_details: { cached_tokens: 0 } });
    // The engine got what the client asked for.
    const req = h.engine.requests[0]!;
    assert.equal(req.maxTokens, 12);
    assert.equal(req.sampling.temperature, 0);
    // Default max_tokens for completions is 16.
    const r3 = await h.client.completions.create({ model: MODEL, prompt: 'x' });
    assert.equal(r3.usage!.completion_tokens, 16);
  } finally {
    await h.close();
  }
});

test('completions: prompt forms (string[], ids, ids[]) and echo', async () => {
  const h = await startServer();
  try {
    const r = await h.client.completions.create({ model: MODEL, prompt: ['ab', 'cd'], max_tokens: 3, temperature: 0, n: 2 });
    assert.deepEqual(r.choices.map((c) => c.index), [0, 1, 2, 3]);
    assert.equal(r.usage!.prompt_tokens, 3 + 3);
    assert.equal(r.usage!.completion_tokens, 12);
    const ids = h.codec.encode('hello', true);
    const a = await h.client.completions.create({ model: MODEL, prompt: ids, max_tokens: 4, temperature: 0 });
    const b = await h.client.completions.create({ model: MODEL, prompt: 'hello', max_tokens: 4, temperature: 0 });
    assert.equal(a.choices[0]!.text, b.choices[0]!.text);
    const m = await h.client.completions.create({ model: MODEL, prompt: [ids, ids], max_tokens: 4, temperature: 0 });
    assert.equal(m.choices[1]!.text, b.choices[0]!.text);
    const e = await h.client.completions.create({ model: MODEL, prompt: 'hello', max_tokens: 4, temperature: 0, echo: true });
    assert.equal(e.choices[0]!.text, 'hello' + b.choices[0]!.text);
  } finally {
    await h.close();
  }
});

test('chat: message, template prompt, max_completion_tokens, content parts', async () => {
  const h = await startServer();
  try {
    const messages = [{ role: 'system' as const, content: 'be brief' }, { role: 'user' as const, content: 'hi there' }];
    const r = await h.client.chat.completions.create({ model: MODEL, messages, max_completion_tokens: 7, temperature: 0 });
    assert.equal(r.object, 'chat.completion');
    assert.match(r.id, /^chatcmpl-/);
    assert.equal(r.choices[0]!.message.role, 'assistant');
    assert.equal(r.choices[0]!.finish_reason, 'length');
    const promptIds = h.codec.encode(h.codec.applyChatTemplate(messages, true), false);
    assert.deepEqual(h.engine.requests[0]!.promptTokenIds, promptIds);
    assert.equal(r.usage!.prompt_tokens, promptIds.length);
    assert.equal(r.usage!.completion_tokens, 7);
    const parts = await h.client.chat.completions.create({
      model: MODEL, max_tokens: 7, temperature: 0,
      messages: [{ role: 'system', content: [{ type: 'text', text: 'be brief' }] }, { role: 'user', content: [{ type: 'text', text: 'hi there' }] }],
    });
    assert.equal(parts.choices[0]!.message.content, r.choices[0]!.message.content);
    // Default max_tokens for chat fills the context.
    const fill = await h.client.chat.completions.create({ model: MODEL, messages, temperature: 0 });
    assert.equal(fill.usage!.total_tokens, 256);
  } finally {
    await h.close();
  }
});

test('streaming completions with include_usage match the non-streamed text; SSE framing is exact', async () => {
  const h = await startServer({ tokenIntervalMs: 1 });
  try {
    const body = { model: MODEL, prompt: 'stream me', max_tokens: 20, temperature: 0 };
    const whole = await h.client.completions.create(body);
    const stream = await h.client.completions.create({ ...body, stream: true, stream_options: { include_usage: true } });
    let text = '';
    const chunks: any[] = [];
    for await (const ch of stream) chunks.push(ch);
    for (const ch of chunks.slice(0, -1)) {
      assert.equal(ch.usage, null, 'usage is null on content chunks');
      text += ch.choices[0]?.text ?? '';
    }
    assert.equal(text, whole.choices[0]!.text);
    const last = chunks.at(-1);
    assert.deepEqual(last.choices, []);
    assert.deepEqual(last.usage, whole.usage);
    assert.equal(chunks.at(-2).choices[0].finish_reason, 'length');
    // Raw framing: only `data: ...\n\n` events, ending in [DONE].
    const res = await fetch(`${h.base}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ ...body, stream: true }) });
    assert.equal(res.status, 200);
    assert.match(res.headers.get('content-type')!, /^text\/event-stream/);
    const raw = await res.text();
    assert.ok(raw.endsWith('data: [DONE]\n\n'));
    const events = raw.split('\n\n').slice(0, -1);
    for (const ev of events) assert.match(ev, /^data: /);
    const parsed = events.slice(0, -1).map((e) => JSON.parse(e.slice(6)));
    assert.equal(parsed.map((p) => p.choices[0].text).join(''), whole.choices[0]!.text);
    assert.ok(parsed.every((p) => !('usage' in p)), 'no usage field without include_usage');
  } finally {
    await h.close();
  }
});

test('streaming chat: role first, content concatenates to the non-streamed message, usage last', async () => {
  const h = await startServer({ tokenIntervalMs: 1, tokensPerEvent: 3 });
  try {
    const body = { model: MODEL, messages: [{ role: 'user' as const, content: 'tell me' }], max_tokens: 15, temperature: 0 };
    const whole = await h.client.chat.completions.create(body);
    const stream = await h.client.chat.completions.create({ ...body, stream: true, stream_options: { include_usage: true } });
    const chunks: any[] = [];
    for await (const ch of stream) chunks.push(ch);
    assert.deepEqual(chunks[0].choices[0].delta, { role: 'assistant', content: '' });
    assert.equal(chunks[0].object, 'chat.completion.chunk');
    const content = chunks.map((c) => c.choices[0]?.delta?.content ?? '').join('');
    assert.equal(content, whole.choices[0]!.message.content);
    assert.equal(chunks.at(-2).choices[0].finish_reason, 'length');
    assert.deepEqual(chunks.at(-1).usage, whole.usage);
  } finally {
    await h.close();
  }
});

test('n > 1 with a seed: indexed choices, seeds seed+i, reproducible', async () => {
  const h = await startServer();
  try {
    const body = { model: MODEL, prompt: 'sample', max_tokens: 24, temperature: 0.8, n: 3, seed: 1234 };
    const a = await h.client.completions.create(body);
    const b = await h.client.completions.create(body);
    assert.deepEqual(a.choices.map((c) => c.index), [0, 1, 2]);
    assert.deepEqual(a.choices.map((c) => c.text), b.choices.map((c) => c.text), 'same seed, same output');
    assert.deepEqual(h.engine.requests.slice(0, 3).map((r) => r.sampling.seed), [1234, 1235, 1236]);
    assert.notEqual(a.choices[0]!.text, a.choices[1]!.text, 'different seeds per choice');
    const c = await h.client.completions.create({ ...body, seed: 99 });
    assert.notDeepEqual(c.choices.map((x) => x.text), a.choices.map((x) => x.text));
    assert.equal(a.usage!.completion_tokens, 72);
    // Streaming n > 1: every index ends with a finish_reason.
    const s = await h.client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'x' }], max_tokens: 5, n: 2, seed: 5, stream: true });
    const done = new Set<number>();
    for await (const ch of s) for (const choice of ch.choices) if (choice.finish_reason) done.add(choice.index);
    assert.deepEqual([...done].sort(), [0, 1]);
  } finally {
    await h.close();
  }
});

test('stop strings: cut before the match, across token boundaries, streamed and not, engine aborted', async () => {
  const h = await startServer({ tokenIntervalMs: 1 });
  try {
    const base = { model: MODEL, prompt: 'stop test', max_tokens: 60, temperature: 0 };
    const full = (await h.client.completions.create({ ...base, return_token_ids: true } as never)).choices[0]! as any;
    const text: string = full.text;
    // A stop string that spans at least three tokens, starting past the beginning.
    const at = 8;
    const stop = text.slice(at, at + 3);
    const first = text.indexOf(stop);
    assert.ok(first >= 0 && Buffer.byteLength(stop) >= 3);
    const r = await h.client.completions.create({ ...base, stop });
    assert.equal(r.choices[0]!.text, text.slice(0, first));
    assert.equal(r.choices[0]!.finish_reason, 'stop');
    assert.equal((r.choices[0] as any).stop_reason, stop);
    assert.ok(r.usage!.completion_tokens < 60);
    await waitFor(() => h.engine.aborted.length > 0, 2000, 'stop-string abort');
    // Streamed: same text, and no chunk ever shows part of the stop string.
    const s = await h.client.completions.create({ ...base, stop: [stop, 'zzzzzz'], stream: true });
    let streamed = '';
    let finish: string | null = null;
    for await (const ch of s) {
      streamed += ch.choices[0]?.text ?? '';
      finish = ch.choices[0]?.finish_reason ?? finish;
      assert.ok(!streamed.includes(stop));
    }
    assert.equal(streamed, text.slice(0, first));
    assert.equal(finish, 'stop');
    // A multi-byte character in the stop string (the fake emits é and € as 2-3 byte tokens).
    const mb = [...text].findIndex((ch) => Buffer.byteLength(ch) > 1);
    assert.ok(mb > 0, 'the fake output has a multi-byte character');
    const chars = [...text];
    const stopMb = chars.slice(mb - 1, mb + 1).join('');
    const r2 = await h.client.completions.create({ ...base, stop: [stopMb] });
    assert.equal(r2.choices[0]!.text, text.slice(0, text.indexOf(stopMb)));
    assert.equal(r2.choices[0]!.finish_reason, 'stop');
    // min_tokens: a stop string that only occurs before min_tokens is ignored.
    const early = text.slice(0, 2);
    assert.equal(text.indexOf(early, 1), -1, 'the fake output has a unique 2-char start');
    const r4 = await h.client.completions.create({ ...base, stop: [early], min_tokens: 10 } as never);
    assert.equal(r4.choices[0]!.text, text);
    assert.equal(r4.choices[0]!.finish_reason, 'length');
    // A stop string that never occurs changes nothing.
    const r3 = await h.client.completions.create({ ...base, stop: ['@@@'] });
    assert.equal(r3.choices[0]!.text, text);
    assert.equal(r3.choices[0]!.finish_reason, 'length');
  } finally {
    await h.close();
  }
});

test('eos and stop_token_ids: finish_reason stop, stop token text excluded; ignore_eos honoured', async () => {
  const h = await startServer({ eosAfter: 5 });
  try {
    const r = await h.client.completions.create({ model: MODEL, prompt: 'eos', max_tokens: 30, temperature: 0, return_token_ids: true } as never);
    const c = r.choices[0]! as any;
    assert.equal(c.finish_reason, 'stop');
    assert.equal(c.stop_reason, EOS);
    assert.equal(c.token_ids.length, 6);
    assert.equal(c.token_ids.at(-1), EOS);
    assert.equal(c.text, h.codec.decode(c.token_ids.slice(0, 5), true));
    const ig = await h.client.completions.create({ model: MODEL, prompt: 'eos', max_tokens: 30, temperature: 0, ignore_eos: true } as never);
    assert.equal(ig.choices[0]!.finish_reason, 'length');
    assert.equal(ig.usage!.completion_tokens, 30);
    // stop_token_ids: stop at the first token equal to the 3rd generated one.
    const third = c.token_ids[2] as number;
    const st = await h.client.completions.create({ model: MODEL, prompt: 'eos', max_tokens: 30, temperature: 0, stop_token_ids: [third], return_token_ids: true } as never);
    const sc = st.choices[0]! as any;
    assert.equal(sc.finish_reason, 'stop');
    assert.equal(sc.stop_reason, third);
    assert.equal(sc.token_ids.at(-1), third);
    assert.equal(sc.text, h.codec.decode(sc.token_ids.slice(0, -1), true));
    assert.deepEqual(h.engine.requests.at(-1)!.stopTokenIds, [third]);
  } finally {
    await h.close();
  }
});

test('logprobs: completions top-n shape and chat logprobs content', async () => {
  const h = await startServer();
  try {
    const r = await h.client.completions.create({ model: MODEL, prompt: 'lp', max_tokens: 6, temperature: 0, logprobs: 3 });
    const lp = r.choices[0]!.logprobs!;
    assert.equal(lp.tokens!.length, 6);
    assert.equal(lp.token_logprobs!.length, 6);
    assert.ok(lp.token_logprobs!.every((x) => typeof x === 'number' && x <= 0));
    assert.equal(lp.top_logprobs!.length, 6);
    assert.ok(lp.top_logprobs!.every((d) => Object.keys(d).length >= 1 && Object.keys(d).length <= 4));
    assert.deepEqual(lp.text_offset!.slice(0, 2), [0, lp.tokens![0]!.length]);
    assert.equal(h.engine.requests[0]!.sampling.logprobs, 3);
    const chat = await h.client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'q' }], max_tokens: 4, logprobs: true, top_logprobs: 2, temperature: 0 });
    const content = chat.choices[0]!.logprobs!.content!;
    assert.equal(content.length, 4);
    for (const e of content) {
      assert.equal(typeof e.token, 'string');
      assert.ok(Array.isArray(e.bytes));
      assert.equal(e.top_logprobs.length, 2);
    }
    const none = await h.client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'q' }], max_tokens: 2 });
    assert.equal(none.choices[0]!.logprobs, null);
    assert.equal(h.engine.requests.at(-1)!.sampling.logprobs, null);
  } finally {
    await h.close();
  }
});

test('extras reach the engine; routed experts cover prompt and generated positions', async () => {
  const h = await startServer();
  try {
    const r = await post(h.base, '/v1/completions', {
      model: MODEL, prompt: 'abc', max_tokens: 5, temperature: 0.5, top_p: 0.9, top_k: 7, min_p: 0.05, repetition_penalty: 1.1,
      presence_penalty: 0.5, frequency_penalty: -0.5, logit_bias: { '42': 5 }, min_tokens: 2, return_routed_experts: true,
      skip_special_tokens: false, user: 'someone', unknown_openai_field: { anything: 1 },
    });
    assert.equal(r.status, 200, r.text);
    const req = h.engine.requests[0]!;
    assert.deepEqual(req.sampling, { temperature: 0.5, topP: 0.9, topK: 7, minP: 0.05, repetitionPenalty: 1.1, presencePenalty: 0.5, frequencyPenalty: -0.5, logprobs: null, logitBias: { 42: 5 } });
    assert.equal(req.minTokens, 2);
    assert.equal(req.returnRoutedExperts, true);
    const routed = r.json.choices[0].routed_experts as number[][][];
    assert.equal(routed.length, 4 + 5 - 1, 'prompt positions, then each generated token fed back');
    for (const pos of routed) {
      assert.equal(pos.length, 2);
      for (const layer of pos) assert.equal(layer.length, 2);
    }
  } finally {
    await h.close();
  }
});

test('client abort mid-stream and mid-request -> engine.abort', async () => {
  const h = await startServer({ tokenIntervalMs: 5 });
  try {
    const ac = new AbortController();
    const stream = await h.client.completions.create({ model: MODEL, prompt: 'long', max_tokens: 200, stream: true }, { signal: ac.signal });
    let n = 0;
    try {
      for await (const _ of stream) if (++n === 3) ac.abort();
    } catch {
      // the client may end the iteration quietly or with an abort error; either is fine
    }
    assert.equal(n, 3);
    await waitFor(() => h.engine.aborted.length === 1, 3000, 'abort after stream cancel');
    assert.equal(h.engine.aborted[0], h.engine.requests[0]!.id);
    // Non-streamed request: the client goes away before the answer.
    const ac2 = new AbortController();
    const p = fetch(`${h.base}/v1/chat/completions`, {
      method: 'POST', signal: ac2.signal, headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ messages: [{ role: 'user', content: 'x' }], max_tokens: 200 }),
    });
    await waitFor(() => h.engine.requests.length === 2, 2000, 'second request');
    await sleep(20);
    ac2.abort();
    await assert.rejects(p);
    await waitFor(() => h.engine.aborted.length === 2, 3000, 'abort after fetch cancel');
    assert.equal(h.engine.aborted[1], h.engine.requests[1]!.id);
    await waitFor(() => h.logs.some((l) => l.status === 499), 2000, 'log line of the aborted request');
  } finally {
    await h.close();
  }
});

test('error responses: statuses and bodies', async () => {
  const h = await startServer({}, { maxModelLen: 64 });
  try {
    const C = '/v1/completions';
    let r = await post(h.base, C, '{"prompt": "x", ');
    assert.equal(r.status, 400);
    assert.equal(errorOf(r).type, 'invalid_request_error');
    assert.equal(errorOf(r).code, 'invalid_json');

    r = await post(h.base, C, { prompt: 'x', max_tokens: '5' });
    assert.equal(r.status, 400);
    assert.equal(errorOf(r).param, 'max_tokens');
    assert.match(errorOf(r).message, /max_tokens/);

    r = await post(h.base, C, { max_tokens: 5 });
    assert.equal(r.status, 400);
    assert.equal(errorOf(r).param, 'prompt');
    assert.match(errorOf(r).message, /Missing required parameter: 'prompt'/);

    r = await post(h.base, C, { prompt: [1, 'a'] });
    assert.equal(errorOf(r).param, 'prompt');
    assert.equal(r.status, 400);

    r = await post(h.base, '/v1/chat/completions', { messages: [{ role: 'user', content: 5 }] });
    assert.equal(r.status, 400);
    assert.equal(errorOf(r).param, 'messages[0].content');

    r = await post(h.base, '/v1/chat/completions', { messages: [{ role: 'user', content: [{ type: 'image_url', image_url: {} }] }] });
    assert.equal(r.status, 400);
    assert.equal(errorOf(r).param, 'messages[0].content');

    r = await post(h.base, C, { prompt: 'x', temperature: 3 });
    assert.equal(errorOf(r).param, 'temperature');
    r = await post(h.base, C, { prompt: 'x', n: 0 });
    assert.equal(errorOf(r).param, 'n');
    r = await post(h.base, C, { prompt: 'x', logit_bias: { abc: 1 } });
    assert.equal(r.status, 400);
    assert.match(errorOf(r).param!, /^logit_bias/);
    r = await post(h.base, C, { prompt: 'x', stream_options: { include_usage: true } });
    assert.equal(errorOf(r).param, 'stream_options');
    r = await post(h.base, C, { prompt: 'x', max_tokens: 5, min_tokens: 9 });
    assert.equal(errorOf(r).param, 'min_tokens');
    r = await post(h.base, C, '[1,2]');
    assert.equal(r.status, 400);
    assert.match(errorOf(r).message, /JSON object/);

    // Context length: both numbers in the message.
    r = await post(h.base, C, { prompt: 'y'.repeat(70) });
    assert.equal(r.status, 400);
    assert.equal(errorOf(r).code, 'context_length_exceeded');
    assert.match(errorOf(r).message, /64/);
    assert.match(errorOf(r).message, /71/);
    r = await post(h.base, C, { prompt: 'y'.repeat(20), max_tokens: 50 });
    assert.equal(r.status, 400);
    assert.equal(errorOf(r).param, 'max_tokens');
    assert.match(errorOf(r).message, /64/);
    assert.match(errorOf(r).message, /71 tokens \(21 in the prompt, 50 for the completion\)/);

    r = await post(h.base, C, { prompt: [5, 99999] });
    assert.equal(r.status, 400);
    assert.equal(errorOf(r).code, 'invalid_token_id');

    r = await post(h.base, '/v1/nope', { prompt: 'x' });
    assert.equal(r.status, 404);
    assert.equal(errorOf(r).type, 'not_found_error');
    r = await get(h.base, '/nothing/here');
    assert.equal(r.status, 404);

    r = await post(h.base, C, { model: 'gpt-4', prompt: 'x' });
    assert.equal(r.status, 404);
    assert.equal(errorOf(r).type, 'not_found_error');
    assert.equal(errorOf(r).param, 'model');
    await assert.rejects(h.client.completions.create({ model: 'other', prompt: 'x' }), (e: unknown) => e instanceof APIError && e.status === 404);

    r = await post(h.base, C, JSON.stringify({ prompt: 'z'.repeat(5 * 1024 * 1024) }));
    assert.equal(r.status, 413);
    assert.equal(errorOf(r).code, 'request_too_large');

    r = await post(h.base, C, JSON.stringify({ prompt: 'x' }), { 'content-type': 'text/plain' });
    assert.equal(r.status, 415);
    assert.equal(errorOf(r).type, 'invalid_request_error');

    r = await post(h.base, C, Buffer.concat([Buffer.from('{"prompt": "'), Buffer.from([0xff, 0xfe, 0xc3]), Buffer.from('"}')]));
    assert.equal(r.status, 400);
    assert.equal(errorOf(r).code, 'invalid_utf8');

    r = await post(h.base, C, '{"prompt": "x", "__proto__": {"polluted": 1}}');
    assert.equal(r.status, 400);

    // Engine failure: 500 without internals (non-stream), an error event and no [DONE] (stream).
    h.engine.failNextAfter = 2;
    r = await post(h.base, C, { prompt: 'x', max_tokens: 10 });
    assert.equal(r.status, 500);
    assert.equal(errorOf(r).type, 'server_error');
    assert.doesNotMatch(r.text, /CUDA|illegal/);
    h.engine.failNextAfter = 2;
    const res = await fetch(h.base + C, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ prompt: 'x', max_tokens: 10, stream: true }) });
    const raw = await res.text();
    assert.equal(res.status, 200);
    assert.ok(!raw.includes('[DONE]'));
    const lastEvent = JSON.parse(raw.trim().split('\n\n').at(-1)!.slice(6));
    assert.equal(lastEvent.error.type, 'server_error');
    assert.doesNotMatch(raw, /CUDA/);
    h.engine.failNextAfter = 1;
    await assert.rejects(async () => {
      const s = await h.client.completions.create({ model: MODEL, prompt: 'x', max_tokens: 10, stream: true });
      for await (const _ of s) { /* drain */ }
    }, (e: unknown) => e instanceof APIError);

    // Loading engine: 503 with Retry-After, /health 503.
    h.engine.currentState = 'loading';
    r = await post(h.base, C, { prompt: 'x' });
    assert.equal(r.status, 503);
    assert.equal(r.headers.get('retry-after'), '1');
    assert.equal(errorOf(r).code, 'model_loading');
    assert.equal((await get(h.base, '/health')).status, 503);
    h.engine.currentState = 'ready';
    assert.equal((await get(h.base, '/health')).status, 200);
  } finally {
    await h.close();
  }
});

test('auth: bearer key on every route except /health and /metrics', async () => {
  const h = await startServer({}, { apiKey: 'sekrit-key' }, 'sekrit-key');
  try {
    let r = await post(h.base, '/v1/completions', { prompt: 'x', max_tokens: 2 });
    assert.equal(r.status, 401);
    assert.equal(errorOf(r).type, 'authentication_error');
    r = await post(h.base, '/v1/completions', { prompt: 'x', max_tokens: 2 }, { authorization: 'Bearer sekrit-kez' });
    assert.equal(r.status, 401);
    r = await post(h.base, '/v1/completions', { prompt: 'x', max_tokens: 2 }, { authorization: 'Bearer sekrit-key-longer' });
    assert.equal(r.status, 401);
    r = await get(h.base, '/v1/models');
    assert.equal(r.status, 401);
    r = await post(h.base, '/tokenize', { prompt: 'x' }, { authorization: 'Basic abc' });
    assert.equal(r.status, 401);
    r = await post(h.base, '/v1/completions', { prompt: 'x', max_tokens: 2 }, { authorization: 'Bearer sekrit-key' });
    assert.equal(r.status, 200);
    assert.equal((await get(h.base, '/health')).status, 200);
    assert.equal((await get(h.base, '/metrics')).status, 200);
    const ok = await h.client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'x' }], max_tokens: 2 });
    assert.equal(ok.choices.length, 1);
    const { default: OpenAI } = await import('openai');
    const bad = new OpenAI({ baseURL: `${h.base}/v1`, apiKey: 'wrong', maxRetries: 0 });
    await assert.rejects(bad.models.list(), (e: unknown) => e instanceof APIError && e.status === 401);
  } finally {
    await h.close();
  }
});

test('429 with Retry-After when the engine queue is full', async () => {
  const h = await startServer({ tokenIntervalMs: 10, maxRunning: 1 }, { maxQueuedRequests: 2 });
  try {
    const body = JSON.stringify({ prompt: 'q', max_tokens: 250 });
    const acs = [new AbortController(), new AbortController(), new AbortController()];
    const pending = acs.map((ac) => fetch(`${h.base}/v1/completions`, { method: 'POST', signal: ac.signal, headers: { 'content-type': 'application/json' }, body }).catch(() => null));
    await waitFor(() => h.engine.stats().running === 1 && h.engine.stats().waiting === 2, 3000, '1 running + 2 waiting');
    const r = await post(h.base, '/v1/completions', { prompt: 'q', max_tokens: 3 });
    assert.equal(r.status, 429);
    assert.equal(errorOf(r).type, 'rate_limit_error');
    assert.equal(r.headers.get('retry-after'), '1');
    // n=2 also does not fit into one free slot.
    acs[2]!.abort();
    await waitFor(() => h.engine.stats().waiting === 1, 3000, 'one waiting');
    const r2 = await post(h.base, '/v1/completions', { prompt: 'q', max_tokens: 3, n: 2 });
    assert.equal(r2.status, 429);
    for (const ac of acs) ac.abort();
    await Promise.all(pending);
    await waitFor(() => h.engine.stats().running === 0 && h.engine.stats().waiting === 0, 3000, 'queue empty');
    const r3 = await post(h.base, '/v1/completions', { prompt: 'q', max_tokens: 3 });
    assert.equal(r3.status, 200);
  } finally {
    await h.close();
  }
});

test('drain: finishes in-flight work, refuses new work with 503, then closes', async () => {
  const h = await startServer({ tokenIntervalMs: 5 });
  const inflight = h.client.completions.create({ model: MODEL, prompt: 'finish me', max_tokens: 30 });
  await waitFor(() => h.engine.requests.length === 1, 2000, 'in-flight request');
  const drained = h.app.drain(5000);
  const r = await post(h.base, '/v1/completions', { prompt: 'late', max_tokens: 3 });
  assert.equal(r.status, 503);
  assert.ok(r.headers.get('retry-after'));
  assert.equal(errorOf(r).code, 'server_shutting_down');
  assert.equal((await get(h.base, '/health')).status, 503);
  const done = await inflight;
  assert.equal(done.choices[0]!.finish_reason, 'length');
  assert.equal(done.usage!.completion_tokens, 30);
  await drained;
  assert.equal(h.engine.aborted.length, 0);
  await assert.rejects(fetch(`${h.base}/health`), 'closed after drain');
});

test('drain timeout aborts what is left', async () => {
  const h = await startServer({ tokenIntervalMs: 5 });
  const p = post(h.base, '/v1/completions', { prompt: 'never ends', max_tokens: 200 });
  await waitFor(() => h.engine.requests.length === 1, 2000, 'first request');
  const s = await fetch(`${h.base}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ prompt: 'x', max_tokens: 200, stream: true }) });
  await waitFor(() => h.engine.requests.length === 2, 2000, 'two requests');
  const t0 = Date.now();
  await h.app.drain(100);
  assert.ok(Date.now() - t0 < 2000);
  const r = await p;
  assert.equal(r.status, 503);
  assert.equal(errorOf(r).code, 'server_shutting_down');
  const raw = await s.text();
  assert.match(raw, /"server_shutting_down"/);
  assert.ok(!raw.includes('[DONE]'));
  assert.deepEqual([...h.engine.aborted].sort(), h.engine.requests.map((q) => q.id).sort());
});

test('metrics: prometheus text parses; names, types and values', async () => {
  const h = await startServer({ tokenIntervalMs: 1 });
  try {
    await h.client.completions.create({ model: MODEL, prompt: 'abcd', max_tokens: 5 });
    await h.client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'hi' }], max_tokens: 3, n: 2 });
    h.engine.preempt();
    h.engine.preempt();
    h.metrics.recordExpertTokens(0, [3, 1, 0, 0]);
    h.metrics.recordKernelChoice('group_gemm');
    h.metrics.recordExpertCache({ hits: 10, misses: 2, bytesLoaded: 4096, loadStallSeconds: 0.25 });
    h.metrics.setExpertCacheOccupancy(0.5);
    h.metrics.recordQueueTime(0.01);
    const r = await get(h.base, '/metrics');
    assert.equal(r.status, 200);
    assert.match(r.headers.get('content-type')!, /^text\/plain/);
    const fams = parsePrometheusTextFormat(r.text);
    const by = new Map(fams.map((f) => [f.name, f]));
    const value = (name: string, labels: Record<string, string> = {}) => {
      const f = by.get(name);
      assert.ok(f, `missing ${name}`);
      const m = f.metrics.find((x) => Object.entries(labels).every(([k, v]) => x.labels?.[k] === v));
      assert.ok(m, `missing sample ${name} ${JSON.stringify(labels)}`);
      return Number(m.value);
    };
    for (const f of fams) {
      assert.match(f.name, /^expertd_[a-z0-9_]+$/, 'prefix, no colons');
      if (f.type === 'COUNTER') assert.match(f.name, /_total$/);
      if (f.name.endsWith('_ratio')) for (const m of f.metrics) assert.ok(Number(m.value) >= 0 && Number(m.value) <= 1);
    }
    const chatPrompt = h.codec.encode(h.codec.applyChatTemplate([{ role: 'user', content: 'hi' }], true), false).length;
    assert.equal(value('expertd_prompt_tokens_total'), 5 + 2 * chatPrompt);
    assert.equal(value('expertd_generation_tokens_total'), 5 + 6);
    assert.equal(value('expertd_request_success_total', { finished_reason: 'length' }), 3);
    assert.equal(value('expertd_preemptions_total'), 2);
    assert.equal(value('expertd_requests_running'), 0);
    assert.equal(value('expertd_kv_cache_usage_ratio'), 0);
    assert.equal(value('expertd_expert_tokens_total', { layer: '0', expert: '0' }), 3);
    assert.equal(value('expertd_moe_load_imbalance', { layer: '0' }), 3);
    assert.equal(value('expertd_moe_kernel_choice_total', { kernel: 'group_gemm' }), 1);
    assert.equal(value('expertd_expert_cache_hits_total'), 10);
    assert.equal(value('expertd_expert_loaded_bytes_total'), 4096);
    assert.equal(value('expertd_expert_cache_occupancy_ratio'), 0.5);
    assert.equal(value('expertd_http_requests_total', { route: '/v1/completions', status: '200' }), 1);
    const ttft = by.get('expertd_time_to_first_token_seconds')!;
    assert.equal(ttft.type, 'HISTOGRAM');
    assert.equal(Number(ttft.metrics[0]!.count), 3);
    assert.equal(Number(by.get('expertd_inter_token_latency_seconds')!.metrics[0]!.count), 4 + 2 * 2);
    assert.equal(Number(by.get('expertd_request_queue_time_seconds')!.metrics[0]!.count), 1);
    for (const name of ['expertd_e2e_request_latency_seconds', 'expertd_request_prefill_time_seconds', 'expertd_request_decode_time_seconds',
      'expertd_prefill_step_seconds', 'expertd_decode_step_seconds', 'expertd_iteration_tokens',
      'expertd_expert_cache_misses_total', 'expertd_expert_prefetch_used_total', 'expertd_expert_prefetch_wasted_total', 'expertd_expert_load_stall_seconds_total',
      'expertd_requests_waiting', 'expertd_all2all_bytes_total', 'expertd_comm_overlap_ratio']) {
      assert.ok(by.has(name), name);
    }
    // Gauges follow the engine live.
    const ac = new AbortController();
    const p = fetch(`${h.base}/v1/completions`, { method: 'POST', signal: ac.signal, headers: { 'content-type': 'application/json' }, body: JSON.stringify({ prompt: 'x', max_tokens: 200 }) }).catch(() => null);
    await waitFor(() => h.engine.stats().running === 1, 2000, 'running');
    const live = parsePrometheusTextFormat((await get(h.base, '/metrics')).text);
    assert.equal(Number(live.find((f) => f.name === 'expertd_requests_running')!.metrics[0]!.value), 1);
    assert.equal(Number(live.find((f) => f.name === 'expertd_kv_cache_usage_ratio')!.metrics[0]!.value), 4 / 64);
    ac.abort();
    await p;
  } finally {
    await h.close();
  }
});

test('/v1/models, /tokenize, /detokenize, /version, /health', async () => {
  const h = await startServer();
  try {
    const models = await h.client.models.list();
    assert.deepEqual(models.data.map((m) => m.id), [MODEL]);
    let r = await post(h.base, '/tokenize', { prompt: 'hé' });
    assert.equal(r.status, 200);
    assert.deepEqual(r.json, { tokens: h.codec.encode('hé', true), count: 4, max_model_len: 256 });
    r = await post(h.base, '/tokenize', { prompt: 'hé', add_special_tokens: false });
    assert.equal(r.json.count, 3);
    r = await post(h.base, '/tokenize', { messages: [{ role: 'user', content: 'hi' }] });
    assert.deepEqual(r.json.tokens, h.codec.encode(h.codec.applyChatTemplate([{ role: 'user', content: 'hi' }], true), false));
    r = await post(h.base, '/tokenize', {});
    assert.equal(r.status, 400);
    errorOf(r);
    r = await post(h.base, '/detokenize', { tokens: h.codec.encode('hé', false) });
    assert.deepEqual(r.json, { prompt: 'hé' });
    r = await post(h.base, '/detokenize', { tokens: [1e6] });
    assert.equal(r.status, 400);
    assert.equal(errorOf(r).param, 'tokens');
    r = await post(h.base, '/detokenize', { tokens: 'abc' });
    assert.equal(errorOf(r).param, 'tokens');
    r = await get(h.base, '/version');
    assert.match(r.json.version, /^\d+\.\d+\.\d+/);
    r = await get(h.base, '/health');
    assert.equal(r.status, 200);
    assert.deepEqual(r.json, { status: 'ok' });
  } finally {
    await h.close();
  }
});

test('/health answers fast while the engine streams to many clients', async () => {
  const h = await startServer({ tokenIntervalMs: 1, tokensPerEvent: 1 });
  try {
    const streams = Array.from({ length: 8 }, () => fetch(`${h.base}/v1/completions`, {
      method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ prompt: 'load', max_tokens: 200, stream: true }),
    }).then((r) => r.text()));
    await waitFor(() => h.engine.stats().running === 8, 2000, '8 running');
    const times: number[] = [];
    for (let i = 0; i < 50; i++) {
      const t0 = performance.now();
      const r = await get(h.base, '/health');
      times.push(performance.now() - t0);
      assert.equal(r.status, 200);
    }
    times.sort((a, b) => a - b);
    const median = times[25]!;
    // Loose bound: the machine is shared; what matters is that health never waits for generation.
    assert.ok(median < 50, `median /health latency ${median.toFixed(2)} ms`);
    await Promise.all(streams);
  } finally {
    await h.close();
  }
});

test('one info log line per generation request, prompt text only with logPrompts', async () => {
  const secret = 'my secret prompt';
  const h = await startServer({ tokenIntervalMs: 1 });
  try {
    await h.client.completions.create({ model: MODEL, prompt: secret, max_tokens: 4 });
    await h.client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: secret }], max_tokens: 3, stream: true }).then(async (s) => { for await (const _ of s) { /* read */ } });
    await post(h.base, '/v1/completions', { prompt: secret, max_tokens: 'x' });
    await get(h.base, '/health');
    await waitFor(() => h.logs.filter((l) => l.msg === 'request completed').length === 3, 2000, 'three lines');
    const lines = h.logs.filter((l) => l.msg === 'request completed');
    assert.equal(lines.length, 3, 'health is not logged at info');
    assert.deepEqual(lines.map((l) => l.status), [200, 200, 400]);
    assert.equal(lines[0]!.promptTokens, secret.length + 1);
    assert.equal(lines[0]!.completionTokens, 4);
    assert.deepEqual(lines[0]!.finishReasons, ['length']);
    assert.equal(typeof lines[0]!.ttftMs, 'number');
    assert.equal(typeof lines[0]!.durationMs, 'number');
    assert.ok(lines[0]!.reqId);
    assert.equal(lines[1]!.stream, true);
    assert.ok(!JSON.stringify(h.logs).includes(secret));
  } finally {
    await h.close();
  }
  const h2 = await startServer({}, { logPrompts: true });
  try {
    await h2.client.completions.create({ model: MODEL, prompt: secret, max_tokens: 2 });
    await waitFor(() => h2.logs.some((l) => l.msg === 'request completed'), 2000, 'line');
    assert.equal(h2.logs.find((l) => l.msg === 'request completed')!.prompt, secret);
  } finally {
    await h2.close();
  }
});

test('completions: suffix, best_of other than n and max_tokens 0 without echo are refused, not ignored', async () => {
  const h = await startServer();
  try {
    const cases: [Record<string, unknown>, string, RegExp][] = [
      [{ suffix: 'tail' }, 'suffix', /'suffix' .* is not supported/],
      [{ best_of: 3 }, 'best_of', /'best_of' is not supported/],
      [{ best_of: 3, n: 2 }, 'best_of', /set it to n \(2\)/],
      [{ max_tokens: 0 }, 'max_tokens', /0 is allowed only with 'echo'/],
    ];
    for (const [extra, param, re] of cases) {
      const r = await post(h.base, '/v1/completions', { model: MODEL, prompt: 'x', max_tokens: 2, ...extra });
      assert.equal(r.status, 400, JSON.stringify(extra));
      assert.equal(r.json.error.param, param);
      assert.match(r.json.error.message, re);
    }
    const n = h.engine.requests.length;
    for (const extra of [{ suffix: '' }, { best_of: 2, n: 2 }, { best_of: 1 }]) {
      const r = await post(h.base, '/v1/completions', { model: MODEL, prompt: 'x', max_tokens: 2, ...extra });
      assert.equal(r.status, 200, JSON.stringify(extra));
    }
    assert.equal(h.engine.requests.length, n + 4, 'the accepted ones ran (n = 2 makes two engine requests)');
  } finally {
    await h.close();
  }
});

test('echo with logprobs on an engine without prompt logprobs (the device engine) is a 400 that says so', async () => {
  const h = await startServer({ info: { promptLogprobs: false } });
  try {
    const r = await post(h.base, '/v1/completions', { model: MODEL, prompt: 'x', max_tokens: 1, echo: true, logprobs: 1 });
    assert.equal(r.status, 400);
    assert.equal(r.json.error.param, 'echo');
    assert.match(r.json.error.message, /CPU engine only/);
    assert.equal(h.engine.requests.length, 0);
    const ok = await post(h.base, '/v1/completions', { model: MODEL, prompt: 'x', max_tokens: 1, echo: true });
    assert.equal(ok.status, 200, 'echo alone still works');
  } finally {
    await h.close();
  }
});

test('stream_options.continuous_usage_stats: every chunk carries its choice\'s usage so far (vLLM)', async () => {
  const h = await startServer();
  try {
    const chunksOf = async (route: string, body: Record<string, unknown>) => {
      const res = await fetch(h.base + route, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
      assert.equal(res.status, 200);
      return (await res.text()).split('\n\n').filter((e) => e.startsWith('data: {')).map((e) => JSON.parse(e.slice(6)) as { choices: { index: number }[]; usage?: any }); // eslint-disable-line @typescript-eslint/no-explicit-any
    };
    for (const [route, extra] of [['/v1/completions', { prompt: 'abc' }], ['/v1/chat/completions', { messages: [{ role: 'user', content: 'q' }] }]] as const) {
      const body = { model: MODEL, max_tokens: 5, n: 2, stream: true, ...extra };
      const cont = await chunksOf(route, { ...body, stream_options: { include_usage: true, continuous_usage_stats: true } });
      const last = new Map<number, number>();
      let prompt = -1;
      for (const ch of cont.filter((c) => c.choices.length > 0)) {
        const u = ch.usage;
        assert.ok(u && typeof u.completion_tokens === 'number', `${route}: a choice chunk carries usage`);
        if (prompt < 0) prompt = u.prompt_tokens;
        assert.equal(u.prompt_tokens, prompt, route);
        assert.equal(u.total_tokens, u.prompt_tokens + u.completion_tokens, route);
        const i = ch.choices[0]!.index;
        assert.ok(u.completion_tokens >= (last.get(i) ?? 0), `${route}: choice ${i}'s count grows`);
        last.set(i, u.completion_tokens);
      }
      assert.deepEqual([...last.values()], [5, 5], `${route}: each choice ends at max_tokens`);
      const final = cont.at(-1)!;
      assert.deepEqual(final.choices, []);
      assert.equal(final.usage.completion_tokens, 10, `${route}: the final usage counts both choices`);
      // Without it, choice chunks say usage null (include_usage) as before.
      const plain = await chunksOf(route, { ...body, stream_options: { include_usage: true } });
      assert.ok(plain.filter((c) => c.choices.length > 0).every((c) => c.usage === null), route);
    }
  } finally {
    await h.close();
  }
});
