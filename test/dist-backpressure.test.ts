// SSE backpressure across rank processes (`expertd serve --nproc-per-node 2`): a raw socket that
// never reads fills its buffers, the front pauses the request's sequences on the ranks that own
// them (RankGroup.pause -> RemoteEngine -> rank-main -> EngineClient), they stop generating while
// other requests are served on the same ranks, and after --stream-stall-timeout the request is
// aborted with its KV freed on every rank. The single-process version is in test/daemon.test.ts.
import assert from 'node:assert/strict';
import net from 'node:net';
import { test } from 'node:test';

import { startDaemon } from './helpers/daemon.js';

const MODEL = 'expertd-demo';
const STALL_S = 6;

/** Samples of `name` from /metrics: label text ('' when none) -> value. */
async function samples(base: string, name: string): Promise<Map<string, number>> {
  const text = await (await fetch(`${base}/metrics`)).text();
  const out = new Map<string, number>();
  for (const m of text.matchAll(/^([a-z_]+)(?:\{([^}]*)\})? (\S+)$/gm)) if (m[1] === name) out.set(m[2] ?? '', Number(m[3]));
  assert.ok(out.size > 0, `metric ${name} missing`);
  return out;
}

async function metric(base: string, name: string): Promise<number> {
  return [...(await samples(base, name)).values()].reduce((a, b) => a + b, 0);
}

/** Running sequences per rank (expertd_rank_sequences{state="running"}), by rank. */
async function runningPerRank(base: string): Promise<number[]> {
  const out: number[] = [];
  for (const [labels, v] of await samples(base, 'expertd_rank_sequences')) {
    const m = /rank="(\d+)",state="running"/.exec(labels);
    if (m) out[Number(m[1])] = v;
  }
  return out;
}

interface LogLine { time: number; msg: string }

test('2 rank processes: a raw socket that never reads pauses its sequences on their ranks (others are served there), and after --stream-stall-timeout they are aborted with their KV freed', { timeout: 120_000 }, async () => {
  const d = await startDaemon(['--nproc-per-node', '2', '--max-num-seqs', '128', '--stream-stall-timeout', String(STALL_S), '--log-level', 'debug']);
  const sock = net.connect(Number(new URL(d.base).port), '127.0.0.1');
  try {
    sock.on('error', () => undefined);
    const closed = new Promise<void>((r) => sock.on('close', () => r()));
    sock.pause(); // NOTE: a paused socket does not read from the kernel: its receive window fills
    // n=128 choices with 20 top logprobs each (~190 KB of SSE per step): the buffers fill in some
    // steps. Each choice is one engine request, so the front spreads them over both ranks.
    const body = JSON.stringify({ model: MODEL, messages: [{ role: 'user', content: 'hi' }], n: 128, max_tokens: 3000,
      logprobs: true, top_logprobs: 20, ignore_eos: true, stream: true });
    sock.write(`POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`);
    const tokens = () => metric(d.base, 'expertd_generation_tokens_total');
    const logLines = (): LogLine[] => d.logs.join('').split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as LogLine);
    const flowLines = () => logLines().filter((l) => /stream (paused|resumed)/.test(l.msg));
    // The kernel's buffers may take a few more chunks after the first pause (pause, drain, resume,
    // pause): try until a pause holds across the whole check.
    let last = -1;
    let pausedAt = 0;
    const t0 = Date.now();
    for (let ok = false; !ok;) {
      assert.ok(Date.now() - t0 < 60_000, 'the request never stayed paused');
      const lines = flowLines();
      if (!/stream paused/.test(lines.at(-1)?.msg ?? '')) { await new Promise((r) => setTimeout(r, 50)); continue; }
      pausedAt = lines.at(-1)!.time;
      const before = await tokens();
      // One request more on each rank (least loaded first, ties in turn: the 64 + 64 choices are
      // even). NOTE: a rank takes the front's messages in order and its engine worker too, so once
      // both are done each rank has honoured the pause posted before them.
      const others = await Promise.all(['Meanwhile', 'Elsewhere'].map(async (prompt) => {
        const r = await fetch(`${d.base}/v1/completions`, {
          method: 'POST', headers: { 'content-type': 'application/json' },
          body: JSON.stringify({ model: MODEL, prompt, max_tokens: 5, temperature: 0 }),
        });
        return (await r.json()) as { usage: { completion_tokens: number } };
      }));
      for (const o of others) assert.equal(o.usage.completion_tokens, 5);
      last = await tokens();
      await new Promise((r) => setTimeout(r, 1000));
      const after = await tokens();
      ok = flowLines().length === lines.length; // no drain (resume) came in between
      if (ok) {
        assert.ok(last >= before + 10);
        assert.equal(after, last, 'the paused sequences generated nothing on either rank while their client did not read');
      }
    }
    assert.ok(last < 128 * 3000 / 2, `paused after ${last} tokens`);
    const spread = [...(await samples(d.base, 'expertd_rank_requests_total')).values()];
    assert.deepEqual(spread, [65, 65], 'the 128 choices and the two other requests, half on each rank');
    // Still held on their ranks (running, with their KV) until the stall timeout.
    const held = await runningPerRank(d.base);
    const usage = await metric(d.base, 'expertd_kv_cache_usage_ratio');
    if (!logLines().some((l) => /stream aborted/.test(l.msg))) {
      assert.ok(held.length === 2 && held.every((n) => n > 0), `paused sequences running on both ranks: ${JSON.stringify(held)}`);
      assert.ok(usage > 0, 'the paused sequences keep their KV');
    }
    // Aborted after the stall timeout: KV freed on every rank, no sequence left, the socket closed.
    const t2 = Date.now();
    for (;;) {
      assert.ok(Date.now() - t2 < 30_000, 'KV never freed');
      if (await metric(d.base, 'expertd_kv_cache_usage_ratio') === 0) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.deepEqual(await runningPerRank(d.base), [0, 0]);
    assert.equal(await metric(d.base, 'expertd_requests_running'), 0);
    const aborted = logLines().find((l) => /stream aborted: the client stopped reading/.test(l.msg));
    assert.ok(aborted, 'the abort is logged');
    assert.ok(aborted.time - pausedAt >= STALL_S * 1000 - 50, `aborted ${aborted.time - pausedAt} ms after the pause`);
    sock.resume();
    await closed;
  } finally {
    sock.destroy();
    d.proc.kill('SIGTERM');
    await d.exit;
  }
});
