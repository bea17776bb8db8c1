// Bounded fuzz of the HTTP surface: >= 10,000 malformed requests through fastify.inject plus a few
// hundred over real HTTP (and raw sockets). Every answer must be a 4xx in the OpenAI error shape,
// no malformed request may reach the engine, and the server must stay up.

import assert from 'node:assert/strict';
import { connect } from 'node:net';
import type { AddressInfo } from 'node:net';
import { test } from 'node:test';
import { BOS } from './helpers/fake-engine.js';
import { MODEL, startServer } from './helpers/server-harness.js';
import { fileSeed } from './helpers/seed.js';

// --- seeded PRNG (xorshift32) so a failure can be replayed ---
const SEED = fileSeed(0x5eed);
let s = SEED || 1;
const rand = () => { s ^= s << 13; s >>>= 0; s ^= s >>> 17; s ^= s << 5; s >>>= 0; return s / 4294967296; };
const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rand() * xs.length)]!;
const int = (lo: number, hi: number) => lo + Math.floor(rand() * (hi - lo + 1));

// --- what each known field accepts (written from the API description, independent of the schemas) ---
type Check = (v: unknown) => boolean;
const isInt = (lo: number, hi: number): Check => (v) => v === null || (Number.isInteger(v) && (v as number) >= lo && (v as number) <= hi);
const isNum = (lo: number, hi: number, exclusiveLo = false): Check => (v) =>
  v === null || (typeof v === 'number' && Number.isFinite(v) && (exclusiveLo ? v > lo : v >= lo) && v <= hi);
const isBool: Check = (v) => v === null || typeof v === 'boolean';
const isStr: Check = (v) => v === null || typeof v === 'string';
const isStop: Check = (v) => v === null || (typeof v === 'string' && v.length > 0) ||
  (Array.isArray(v) && v.length <= 64 && v.every((x) => typeof x === 'string' && x.length > 0));
const isIdArray: Check = (v) => v === null || (Array.isArray(v) && v.every((x) => Number.isInteger(x) && x >= 0 && x < 264));
const isBias: Check = (v) => v === null || (typeof v === 'object' && !Array.isArray(v) &&
  Object.entries(v as object).every(([k, x]) => /^\d+$/.test(k) && Number(k) < 264 && typeof x === 'number' && x >= -100 && x <= 100));
const isStreamOpts: Check = (v) => v === null; // only valid together with stream: true, never set here
const MAX = Number.MAX_SAFE_INTEGER;

const common: Record<string, Check> = {
  model: (v) => v === null || v === MODEL,
  max_tokens: isInt(1, 250), // what fits next to the short base prompts
  temperature: isNum(0, 2), top_p: isNum(0, 1, true), n: isInt(1, 128), stop: isStop, seed: isInt(-MAX, MAX),
  presence_penalty: isNum(-2, 2), frequency_penalty: isNum(-2, 2), logit_bias: isBias, user: isStr, stream: isBool,
  stream_options: isStreamOpts, top_k: isInt(-1, MAX), min_p: isNum(0, 1), repetition_penalty: isNum(0, 100, true),
  stop_token_ids: isIdArray, ignore_eos: isBool, min_tokens: isInt(0, 1), skip_special_tokens: isBool,
  return_token_ids: isBool, return_routed_experts: isBool,
};
const completionFields: Record<string, Check> = {
  ...common,
  prompt: (v) => typeof v === 'string' || (Array.isArray(v) && v.length > 0 && (v.every((x) => typeof x === 'string') ||
    v.every((x) => Number.isInteger(x) && x >= 0 && x < 264) ||
    v.every((x) => Array.isArray(x) && x.length > 0 && x.every((y) => Number.isInteger(y) && y >= 0 && y < 264)))),
  logprobs: isInt(0, 20), echo: isBool,
};
const chatFields: Record<string, Check> = {
  ...common,
  messages: (v) => Array.isArray(v) && v.length > 0 && v.every((m) => m && typeof m === 'object' &&
    ['system', 'developer', 'user', 'assistant', 'tool'].includes((m as { role: string }).role) &&
    (typeof (m as { content: unknown }).content === 'string' || (m as { content: unknown }).content == null)),
  max_completion_tokens: isInt(1, 250), logprobs: isBool, top_logprobs: (v) => v === null,
};

function deep(depth: number, leaf: unknown = 1): unknown {
  let v: unknown = leaf;
  for (let i = 0; i < depth; i++) v = [v];
  return v;
}

const POOL: unknown[] = [
  '5', '', 'abc', '1e400', true, false, 1.5, -1, 0, 1, 3, 21, 64, 129, 300, 1e300, -1e300, 2 ** 53 + 2, -(2 ** 60),
  [], [1], ['a'], [''], [[1]], [1e9], [-3], {}, { a: 1 }, { '5': 1000 }, { x: 1 }, deep(40), 'x'.repeat(3000),
  [{ role: 'user', content: 1 }], [{ role: 'robot', content: 'x' }], [{ content: 'x' }], [{ role: 'user', content: [{ type: 'image_url' }] }],
  { include_usage: 'yes' }, Array.from({ length: 70 }, () => 'a'), [null], [true],
];

const baseCompletion = () => ({ model: MODEL, prompt: 'hi', max_tokens: 1 });
const baseChat = () => ({ model: MODEL, messages: [{ role: 'user', content: 'hi' }], max_tokens: 1 });

interface Req { method: string; url: string; headers: Record<string, string>; payload?: string | Buffer }
const json = (url: string, body: unknown): Req => ({ method: 'POST', url, headers: { 'content-type': 'application/json' }, payload: typeof body === 'string' ? body : JSON.stringify(body) });

/** One malformed request; every branch is invalid by construction. */
function malformed(allowHuge: boolean): Req {
  const chat = rand() < 0.5;
  const url = chat ? '/v1/chat/completions' : '/v1/completions';
  const fields = chat ? chatFields : completionFields;
  const base = chat ? baseChat() : baseCompletion();
  const kind = int(0, 13);
  switch (kind) {
    case 0: case 1: case 2: case 3: { // a known field with a value it does not accept
      const name = pick(Object.keys(fields));
      const bad = POOL.filter((v) => !fields[name]!(v));
      return json(url, { ...base, [name]: pick(bad) });
    }
    case 4: { // numbers JSON can write but nothing accepts
      const name = pick(['max_tokens', 'temperature', 'top_p', 'n', 'seed', 'presence_penalty', 'top_k', 'min_p', 'repetition_penalty', 'min_tokens', chat ? 'top_logprobs' : 'logprobs']);
      const text = JSON.stringify({ ...base, [name]: '__X__' }).replace('"__X__"', pick(['1e400', '-1e400', '1e30', '-1e30', '123456789012345678901234567890']));
      return json(url, text);
    }
    case 5: { // deep nesting in a known field or as the whole body
      // Built as text: JSON.stringify itself recurses.
      const d = pick([10, 100, 1000, 10000, 50000]);
      const nested = '['.repeat(d) + '1' + ']'.repeat(d);
      if (rand() < 0.3) return json(url, nested);
      return json(url, JSON.stringify({ ...base, [chat ? 'messages' : 'prompt']: '__X__' }).replace('"__X__"', nested));
    }
    case 6: { // invalid UTF-8 inside an otherwise fine body
      const text = JSON.stringify({ ...base, user: '@@' });
      const i = text.indexOf('@@');
      const junk = Buffer.from(pick([[0xff], [0xc3], [0xe2, 0x82], [0xed, 0xa0, 0x80], [0xc0, 0xaf], [0xf8, 0x88, 0x80, 0x80, 0x80]]));
      return json(url, Buffer.concat([Buffer.from(text.slice(0, i)), junk, Buffer.from(text.slice(i + 2))]) as unknown as string);
    }
    case 7: { // truncated JSON or garbage
      const text = JSON.stringify({ ...base, stop: ['a', 'b'], temperature: 0.5 });
      if (rand() < 0.6) return json(url, text.slice(0, int(1, text.length - 1)));
      const bytes = Buffer.from(Array.from({ length: int(1, 64) }, () => int(0, 255)));
      return json(url, bytes as unknown as string);
    }
    case 8: { // not an object, or required field missing
      const alt: unknown[] = [[], [base], 'str', 5, null, true, {}, { model: MODEL }, chat ? { prompt: 'x' } : { messages: [{ role: 'user', content: 'x' }] }];
      const v = pick(alt);
      return json(url, v === null ? 'null' : JSON.stringify(v));
    }
    case 9: { // semantically invalid: unknown model, too long, token ids outside the vocabulary
      const opts: unknown[] = [
        { ...base, model: 'no-such-model' },
        { ...base, max_tokens: 260 },
        chat ? { ...base, messages: [{ role: 'user', content: 'y'.repeat(300) }] } : { ...base, prompt: 'y'.repeat(300) },
        chat ? { ...base, stop_token_ids: [264] } : { ...base, prompt: [BOS, 264 + int(0, 1e6)] },
        { ...base, logit_bias: { [String(264 + int(0, 1000))]: 1 } },
        { ...base, max_tokens: 1, min_tokens: 2 },
        chat ? { ...base, top_logprobs: 2 } : { ...base, stream_options: { include_usage: true } },
      ];
      return json(url, pick(opts));
    }
    case 10: { // wrong content type
      const ct = pick(['text/plain', 'application/x-www-form-urlencoded', 'multipart/form-data; boundary=x', 'application/xml', 'image/png']);
      return { method: 'POST', url, headers: { 'content-type': ct }, payload: JSON.stringify(base) };
    }
    case 11: { // routes that do not exist, methods that are not served
      return pick<Req>([
        { method: 'GET', url, headers: {} },
        { method: 'PUT', url: '/v1/models', headers: {} },
        { method: 'DELETE', url: '/health', headers: {} },
        { method: 'GET', url: `/v1/${'z'.repeat(int(1, 500))}`, headers: {} },
        { method: 'POST', url: '/v1/embeddings', headers: { 'content-type': 'application/json' }, payload: '{}' },
        { method: 'GET', url: '/%E0%A4%A', headers: {} },
      ]);
    }
    case 12: { // tokenize / detokenize with bad bodies
      return pick([
        json('/tokenize', { prompt: 5 }), json('/tokenize', {}), json('/tokenize', { messages: 'x' }),
        json('/tokenize', { prompt: 'x', messages: [{ role: 'user', content: 'x' }] }),
        json('/detokenize', { tokens: [-1] }), json('/detokenize', { tokens: [1e7] }), json('/detokenize', { tokens: 'a' }),
        json('/detokenize', {}), json('/tokenize', { prompt: 'x', add_special_tokens: 'yes' }),
      ]);
    }
    default: { // oversized body
      if (!allowHuge) return json(url, { ...base, n: 0 });
      return json(url, JSON.stringify({ ...base, user: 'u'.repeat(4 * 1024 * 1024 + int(1, 1000)) }));
    }
  }
}

function checkAnswer(status: number, body: string, req: Req): void {
  const where = `${req.method} ${req.url} ${String(req.payload ?? '').slice(0, 200)}`;
  assert.ok(status >= 400 && status < 500, `status ${status} for ${where}: ${body.slice(0, 300)}`);
  let parsed: { error?: Record<string, unknown> };
  try { parsed = JSON.parse(body) as typeof parsed; } catch { throw new Error(`non-JSON ${status} answer for ${where}: ${body.slice(0, 200)}`); }
  const e = parsed.error;
  assert.ok(e && typeof e.message === 'string' && typeof e.type === 'string' && 'param' in e && 'code' in e, `error shape for ${where}: ${body.slice(0, 300)}`);
}

test(`fuzz: 10,000 malformed requests via inject, 300 over HTTP, raw socket garbage (seed ${SEED})`, async () => {
  const h = await startServer({}, { maxQueuedRequests: 4 });
  try {
    const t0 = performance.now();
    const statuses = new Map<number, number>();
    let huge = 0;
    for (let i = 0; i < 10_000; i++) {
      const allowHuge = huge < 30;
      const req = malformed(allowHuge);
      if (req.payload && req.payload.length > 1_000_000) huge++;
      const res = await h.app.inject({ method: req.method as 'POST', url: req.url, headers: req.headers, payload: req.payload });
      checkAnswer(res.statusCode, res.body, req);
      statuses.set(res.statusCode, (statuses.get(res.statusCode) ?? 0) + 1);
    }
    const injectMs = performance.now() - t0;

    // Over real HTTP: same generator, fewer oversized bodies.
    for (let i = 0; i < 300; i++) {
      const req = malformed(i % 100 === 0);
      const res = await fetch(h.base + req.url, { method: req.method, headers: req.headers, body: req.payload ?? null });
      checkAnswer(res.status, await res.text(), req);
    }

    // Malformed HTTP never reaches a route; it still gets the error shape.
    const port = (h.app.server.address() as AddressInfo).port;
    const rawCases = [
      'GARBAGE\r\n\r\n',
      'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n',
      'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n',
      `GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(20000)}\r\n\r\n`,
      'GET /health HTTP/1.1\r\nHo st: x\r\n\r\n',
    ];
    for (const raw of rawCases) {
      const answer = await new Promise<string>((resolve, reject) => {
        const sock = connect(port, '127.0.0.1', () => sock.end(raw));
        let buf = '';
        sock.on('data', (d) => (buf += d.toString('utf8')));
        sock.on('close', () => resolve(buf));
        sock.on('error', reject);
      });
      const m = /^HTTP\/1\.1 (\d{3})/.exec(answer);
      assert.ok(m, `no status line for ${JSON.stringify(raw.slice(0, 60))}: ${answer.slice(0, 100)}`);
      const [head, ...rest] = answer.split('\r\n\r\n');
      assert.ok(head);
      checkAnswer(Number(m[1]), rest.join('\r\n\r\n'), { method: 'RAW', url: '', headers: {}, payload: raw.slice(0, 60) });
    }

    // Nothing malformed reached the engine, and the server still works.
    assert.equal(h.engine.requests.length, 0, 'a malformed request reached the engine');
    const health = await fetch(`${h.base}/health`);
    assert.equal(health.status, 200);
    const ok = await h.client.completions.create({ model: MODEL, prompt: 'still alive', max_tokens: 3 });
    assert.equal(ok.usage!.completion_tokens, 3);
    const mem = process.memoryUsage().heapUsed / 2 ** 20;
    console.log(`# fuzz: 10000 inject in ${(injectMs / 1000).toFixed(1)} s, statuses ${JSON.stringify(Object.fromEntries(statuses))}, heap ${mem.toFixed(0)} MiB`);
    assert.ok(statuses.size >= 4, 'the generator covers several kinds of failure');
  } finally {
    await h.close();
  }
});
