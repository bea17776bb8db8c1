// The real daemon end to end: `expertd serve` as a child process on the demo model (f32 mode),
// driven over a real port by the official openai client and raw HTTP. Covers what only the real
// engine can show: batching equals running alone, seeds, KV blocks freed on disconnect, /health and
// /metrics answering while the engine is saturated, and a SIGTERM drain that loses nothing.
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, statSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';

import parsePrometheusTextFormat from 'parse-prometheus-text-format';

import { packageRoot } from '../src/native/index.js';
import { EamCollection } from '../src/offload/eam-collection.js';
import { readTrace, traceFiles } from '../src/offload/trace-file.js';
import { startDaemon, stopDaemon, type Daemon } from './helpers/daemon.js';

async function metric(base: string, name: string): Promise<number> {
  const text = await (await fetch(`${base}/metrics`)).text();
  const fam = parsePrometheusTextFormat(text).find((f) => f.name === name);
  assert.ok(fam, `metric ${name} missing`);
  return Number((fam.metrics[0] as { value: string }).value);
}

const MODEL = 'expertd-demo';

describe('expertd serve (demo model, f32)', () => {
  let d: Daemon;
  before(async () => { d = await startDaemon(); });
  after(async () => { d.proc.kill('SIGKILL'); await d.exit; });

  test('completions and chat through the openai client', async () => {
    const c = await d.client.completions.create({ model: MODEL, prompt: 'The weather today', max_tokens: 12, temperature: 0 });
    assert.equal(c.choices.length, 1);
    assert.equal(c.choices[0]!.finish_reason, 'length');
    assert.equal(c.usage!.completion_tokens, 12);
    assert.ok(c.choices[0]!.text.length > 0);
    const chat = await d.client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'Hello there' }], max_tokens: 6 });
    assert.equal(chat.choices[0]!.message.role, 'assistant');
    assert.equal(chat.usage!.completion_tokens, 6);
    const models = await d.client.models.list();
    assert.deepEqual(models.data.map((m) => m.id), [MODEL]);
  });

  test('concurrent greedy requests of different lengths give exactly what each gives alone', async () => {
    const prompts = ['One', 'Two words here', 'A somewhat longer prompt with more tokens in it than the others', 'x y z'];
    const alone: string[] = [];
    for (const p of prompts) {
      const r = await d.client.completions.create({ model: MODEL, prompt: p, max_tokens: 10 + p.length % 7, temperature: 0 });
      alone.push(r.choices[0]!.text);
    }
    const together = await Promise.all(prompts.map((p) =>
      d.client.completions.create({ model: MODEL, prompt: p, max_tokens: 10 + p.length % 7, temperature: 0 })));
    assert.deepEqual(together.map((r) => r.choices[0]!.text), alone);
  });

  test('same seed, same sampled output; n > 1 gives n choices', async () => {
    const req = { model: MODEL, prompt: 'Sampling', max_tokens: 16, temperature: 1.0, top_p: 0.9, seed: 1234 };
    const a = await d.client.completions.create(req);
    const b = await d.client.completions.create(req);
    assert.equal(a.choices[0]!.text, b.choices[0]!.text);
    const n = await d.client.completions.create({ ...req, n: 3 });
    assert.equal(n.choices.length, 3);
    assert.deepEqual(n.choices.map((c) => c.index).sort(), [0, 1, 2]);
  });

  test('routed experts are returned for every processed position', async () => {
    const res = await fetch(`${d.base}/v1/completions`, {
      method: 'POST', headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: MODEL, prompt: 'Route me', max_tokens: 4, return_routed_experts: true, return_token_ids: true }),
    });
    const body = await res.json() as { choices: { routed_experts: number[][][]; prompt_token_ids: number[]; token_ids: number[] }[] };
    const ch = body.choices[0]!;
    assert.equal(ch.routed_experts.length, ch.prompt_token_ids.length + ch.token_ids.length - 1);
    for (const pos of ch.routed_experts) {
      assert.equal(pos.length, 2); // the demo model's two MoE layers
      for (const ids of pos) {
        assert.equal(ids.length, 2);
        assert.notEqual(ids[0], ids[1]);
        for (const e of ids) assert.ok(e >= 0 && e < 8);
      }
    }
  });

  test('an aborted stream cancels its request and frees its KV blocks', async () => {
    const ac = new AbortController();
    const stream = await d.client.completions.create({ model: MODEL, prompt: 'Stream for a long time', max_tokens: 400, stream: true },
      { signal: ac.signal });
    let got = 0;
    try {
      for await (const _ of stream) { if (++got === 3) ac.abort(); }
    } catch { /* aborted */ }
    const deadline = Date.now() + 5000;
    let running = 1;
    let usage = 1;
    while (Date.now() < deadline) {
      running = await metric(d.base, 'expertd_requests_running');
      usage = await metric(d.base, 'expertd_kv_cache_usage_ratio');
      if (running === 0 && usage === 0) break;
      await new Promise((r) => setTimeout(r, 50));
    }
    assert.equal(running, 0);
    assert.equal(usage, 0, 'KV cache blocks still in use after the client went away');
  });

  test('/health and /metrics answer within 50 ms while the engine is saturated', async () => {
    const load = Array.from({ length: 8 }, (_, i) =>
      d.client.completions.create({ model: MODEL, prompt: `busy ${i} `.repeat(40), max_tokens: 60, temperature: 0 }));
    await new Promise((r) => setTimeout(r, 100));
    const times: number[] = [];
    for (let i = 0; i < 15; i++) {
      for (const p of ['/health', '/metrics']) {
        const t0 = performance.now();
        const r = await fetch(d.base + p);
        await r.text();
        times.push(performance.now() - t0);
        assert.equal(r.status, 200);
      }
    }
    await Promise.all(load);
    times.sort((a, b) => a - b);
    const median = times[Math.floor(times.length / 2)]!;
    assert.ok(median < 50, `median /health+/metrics latency ${median.toFixed(1)} ms under load`);
  });
});

describe('expertd serve drain', () => {
  test('SIGTERM finishes in-flight completions, refuses new ones, exits 0', async () => {
    const d = await startDaemon(['--shutdown-timeout', '60']);
    const inflight = Array.from({ length: 4 }, (_, i) =>
      d.client.completions.create({ model: MODEL, prompt: `drain ${i}`, max_tokens: 40, temperature: 0 }));
    await new Promise((r) => setTimeout(r, 200));
    d.proc.kill('SIGTERM');
    await new Promise((r) => setTimeout(r, 50));
    const late = await fetch(`${d.base}/v1/completions`, {
      method: 'POST', headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: MODEL, prompt: 'too late', max_tokens: 2 }),
    }).then((r) => r.status).catch(() => 'refused');
    assert.ok(late === 503 || late === 'refused', `late request got ${late}`);
    const done = await Promise.all(inflight);
    for (const r of done) {
      assert.equal(r.choices[0]!.finish_reason, 'length');
      assert.equal(r.usage!.completion_tokens, 40);
    }
    assert.equal(await d.exit, 0);
  });
});

describe('expertd serve with expert offloading (MoE-Infinity)', () => {
  test('a cache of 25% of the experts gives identical outputs; hits, misses and the collection survive a restart', async () => {
    const fixture = path.join(packageRoot(), 'test', 'fixtures', 'mixtral');
    const traceDir = mkdtempSync(path.join(os.tmpdir(), 'expertd-trace-'));
    const prompts = ['The first prompt', 'Another one, a bit longer than the first', 'x'];
    const ask = async (d: Daemon) => {
      const out: string[] = [];
      for (const p of prompts) {
        const r = await d.client.completions.create({ model: 'mixtral', prompt: p, max_tokens: 12, temperature: 0 });
        out.push(r.choices[0]!.text);
      }
      return out;
    };
    const resident = await startDaemon(['--model', fixture]);
    const want = await ask(resident);
    assert.equal(await stopDaemon(resident), 0);

    // A 4 KiB x 3 trace: rotation and retention in the daemon (a step line is ~130 bytes here).
    const args = ['--model', fixture, '--expert-cache-fraction', '0.25', '--cache-policy', 'eam', '--trace-dir', traceDir,
      '--trace-max-file-mb', String(4 / 1024), '--trace-max-files', '3'];
    const off = await startDaemon(args);
    assert.deepEqual(await ask(off), want);
    const hits = await metric(off.base, 'expertd_expert_cache_hits_total');
    const misses = await metric(off.base, 'expertd_expert_cache_misses_total');
    const loaded = await metric(off.base, 'expertd_expert_loaded_bytes_total');
    assert.ok(misses > 0 && loaded > 0, `a 25% cache must miss (hits ${hits}, misses ${misses})`);
    assert.ok(hits > 0, 'decode steps reuse experts');
    assert.equal(await stopDaemon(off), 0);
    assert.ok(existsSync(path.join(traceDir, 'eam-collection.bin')), 'the EAM collection was not saved');
    const files = traceFiles(traceDir);
    assert.ok(files.length >= 2 && files.length <= 3, files.join(', '));
    for (const f of files) assert.ok(statSync(f).size <= 4096, `${f}: ${statSync(f).size} bytes`);
    assert.ok((await readTrace(traceDir)).steps.length > 0);

    // --trace-sample 0: nothing more is traced, every record is counted as sampled out, and the
    // EAM collection still learns from every request.
    const again = await startDaemon([...args, '--trace-sample', '0']);
    assert.match(again.logs.join(''), /EAM collection 3\b/);
    assert.deepEqual(await ask(again), want);
    const sampledOut = await metric(again.base, 'expertd_trace_records_dropped_total');
    assert.ok(sampledOut >= 3 * 12, `sampled out ${sampledOut}`);
    assert.equal(await metric(again.base, 'expertd_trace_records_written_total'), 0);
    assert.equal(await stopDaemon(again), 0);
    assert.deepEqual(traceFiles(traceDir), files);
    assert.equal(EamCollection.load(traceDir, 4, 8).size, 6);
  });
});
