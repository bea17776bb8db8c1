// SSE backpressure against the real HTTP server on a port (FakeEngine test double behind it): a raw
// socket that sends a streaming request and never reads pauses its request in the engine (no more
// tokens while other requests are served), resumes when it reads, and is aborted after the stall
// timeout with a log line, its KV freed.

import assert from 'node:assert/strict';
import net from 'node:net';
import { test } from 'node:test';
import parsePrometheusTextFormat from 'parse-prometheus-text-format';
import { MODEL, get, sleep, startServer, waitFor, type Harness } from './helpers/server-harness.js';

/** A streaming completion sent over a raw socket that does not read until told to. */
function rawStream(h: Harness, body: unknown): { sock: net.Socket; received: () => number; closed: Promise<void> } {
  const port = Number(new URL(h.base).port);
  const sock = net.connect(port, '127.0.0.1');
  let bytes = 0;
  sock.on('data', (d: Buffer) => { bytes += d.length; });
  sock.pause(); // NOTE: a paused socket stops reading from the kernel: its receive window fills
  const json = JSON.stringify(body);
  sock.write(`POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(json)}\r\n\r\n${json}`);
  const closed = new Promise<void>((resolve) => { sock.on('close', () => resolve()); sock.on('error', () => undefined); });
  return { sock, received: () => bytes, closed };
}

/**
 * Waits until the request is paused for good: the socket may drain into the kernel's buffers a few
 * times (pause, resume, pause) before they are full. Returns the generated count then.
 */
async function settledPause(h: Harness, id: string): Promise<number> {
  const t0 = Date.now();
  for (;;) {
    assert.ok(Date.now() - t0 < 15_000, 'the request never stayed paused');
    const calls = h.engine.flowCalls.filter(([, i]) => i === id);
    if (calls.at(-1)?.[0] === 'pause') {
      const n = calls.length;
      const generated = h.engine.generatedOf(id);
      await sleep(300);
      if (h.engine.flowCalls.filter(([, i]) => i === id).length === n) return generated;
    } else {
      await sleep(5);
    }
  }
}

async function kvUsage(h: Harness): Promise<number> {
  const fam = parsePrometheusTextFormat((await get(h.base, '/metrics')).text).find((f) => f.name === 'expertd_kv_cache_usage_ratio');
  return Number((fam!.metrics[0] as { value: string }).value);
}

/** Big events (400 tokens with top-5 logprobs and ids, ~60 KB of SSE) fill the socket buffers in a moment. */
const bigEvents = { tokenIntervalMs: 1, tokensPerEvent: 400 };
const endless = { model: MODEL, prompt: 'x', max_tokens: 9_000_000, stream: true, logprobs: 5, return_token_ids: true, ignore_eos: true };

test('a stream whose client does not read pauses its request while others are served, and resumes when it reads', async () => {
  const h = await startServer(bigEvents, { maxModelLen: 10_000_000, streamStallTimeoutMs: 120_000, streamBufferLimitBytes: 64 << 20 });
  const s = rawStream(h, endless);
  try {
    await waitFor(() => h.engine.requests.length === 1, 3000, 'request started');
    const id = h.engine.requests[0]!.id;
    // Paused: the generated count stops growing while the socket's peer does not read ...
    const atPause = await settledPause(h, id);
    assert.equal(h.engine.generatedOf(id), atPause, 'no tokens generated while paused');
    await sleep(300);
    assert.equal(h.engine.generatedOf(id), atPause, 'no tokens generated while paused');
    // ... and other requests are still served meanwhile.
    const other = await h.client.completions.create({ model: MODEL, prompt: 'other', max_tokens: 5 });
    assert.equal(other.usage!.completion_tokens, 5);
    assert.equal(h.engine.generatedOf(id), atPause);
    assert.ok(await kvUsage(h) > 0, 'a paused request keeps its KV');

    // Reading resumes it.
    const callsBefore = h.engine.flowCalls.length;
    s.sock.resume();
    await waitFor(() => h.engine.flowCalls.slice(callsBefore).some(([k, i]) => k === 'resume' && i === id), 5000, 'the request resumed');
    await waitFor(() => h.engine.generatedOf(id) > atPause, 5000, 'tokens after resume');
    assert.ok(s.received() > 0);
    assert.ok(!h.engine.aborted.includes(id));
  } finally {
    s.sock.destroy();
    await h.close();
  }
});

test('a stream stalled longer than --stream-stall-timeout is aborted with a log line, its KV freed', async () => {
  const h = await startServer(bigEvents, { maxModelLen: 10_000_000, streamStallTimeoutMs: 1500, streamBufferLimitBytes: 64 << 20 });
  const s = rawStream(h, endless);
  try {
    await waitFor(() => h.engine.requests.length === 1, 3000, 'request started');
    const id = h.engine.requests[0]!.id;
    await waitFor(() => h.engine.flowCalls.some(([k, i]) => k === 'pause' && i === id), 10_000, 'paused');
    const pausedAt = Date.now();
    await waitFor(() => h.engine.aborted.includes(id), 8000, 'aborted after the stall timeout');
    const waited = Date.now() - pausedAt;
    assert.ok(waited >= 1000, `aborted after ${waited} ms, not before the 1.5 s timeout`);
    await waitFor(() => h.engine.stats().running === 0, 3000, 'engine idle');
    assert.equal(await kvUsage(h), 0, 'KV freed');
    const line = h.logs.find((l) => l.msg === 'stream aborted: the client stopped reading');
    assert.ok(line, 'a log line says why');
    assert.equal(line.status, 499);
    assert.equal(line.stallTimeoutMs, 1500);
    assert.match(String(line.error), /client stopped reading for 1.5 s/);
    s.sock.resume(); // drain what is left so 'close' can arrive
    await s.closed;
  } finally {
    s.sock.destroy();
    await h.close();
  }
});

test('a stream that queues more than the buffer limit in the process is aborted at once', async () => {
  // An engine whose events keep coming after the pause (as the ones in flight do): what is queued in
  // the process passes 1 MiB and the request is aborted, long before the stall timeout.
  const h = await startServer({ ...bigEvents, ignorePause: true },
    { maxModelLen: 10_000_000, streamStallTimeoutMs: 60_000, streamBufferLimitBytes: 1 << 20 });
  const s = rawStream(h, endless);
  try {
    await waitFor(() => h.engine.requests.length === 1, 3000, 'request started');
    const id = h.engine.requests[0]!.id;
    await waitFor(() => h.engine.aborted.includes(id), 10_000, 'aborted on overflow');
    const line = h.logs.find((l) => l.msg === 'stream aborted: the client stopped reading');
    assert.ok(line);
    assert.equal(line.bufferLimitBytes, 1 << 20);
    assert.ok(Number(line.bufferedBytes) > 1 << 20);
    await waitFor(() => h.engine.stats().running === 0, 3000, 'engine idle');
  } finally {
    s.sock.destroy();
    await h.close();
  }
});

test('a client that reads as fast as it can is never paused', async () => {
  const h = await startServer({ tokenIntervalMs: 1, tokensPerEvent: 4 });
  try {
    const stream = await h.client.completions.create({ model: MODEL, prompt: 'x', max_tokens: 200, stream: true });
    let n = 0;
    for await (const c of stream) n += c.choices.length;
    assert.ok(n > 0);
    assert.deepEqual(h.engine.flowCalls, []);
  } finally {
    await h.close();
  }
});
