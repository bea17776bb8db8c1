// The routing trace writer: steps only queue (no synchronous file call on the step path, a stalled
// disk drops and counts instead of blocking), files rotate by size and only the newest N stay
// (across restarts too), sampling keeps or drops whole requests, and failures are counted.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';

import { Offloader } from '../src/offload/offloader.js';
import type { ExpertStore } from '../src/offload/expert-store.js';
import { syntheticTrace, DEFAULT_SYNTHETIC } from '../src/offload/synthetic-trace.js';
import { traceFiles, type TraceStep } from '../src/offload/trace-file.js';
import { sampleKey, TraceWriter, type TraceFs } from '../src/offload/trace-writer.js';
import { fileSeed } from './helpers/seed.js';

const tmpDir = () => fs.mkdtempSync(path.join(os.tmpdir(), 'expertd-trace-writer-'));
const meta = { numLayers: 4, numExperts: 16, topK: 2, model: 'test' };
const seed = fileSeed(DEFAULT_SYNTHETIC.seed, 'synthetic trace');

/** Steps of `requests` requests each, every request routed to a few experts per layer. */
function steps(n: number, requests = 2, from = 0): TraceStep[] {
  return Array.from({ length: n }, (_, s) => ({
    step: from + s,
    requests: Array.from({ length: requests }, (_, r) => ({
      id: `req-${Math.floor((from + s) / 10)}-${r}`,
      layers: Array.from({ length: meta.numLayers }, (_, l) => [(s + l + r) % 16, 1 + r, (s * 3 + l) % 16, 2]),
    })),
    ...((from + s) % 10 === 9 ? { finished: Array.from({ length: requests }, (_, r) => `req-${Math.floor((from + s) / 10)}-${r}`) } : {}),
  }));
}

const lineOf = (st: TraceStep) => `${JSON.stringify(st)}\n`;

/** Calls to any fs.*Sync function while fn runs (the writer and the offloader use the default export). */
async function countSyncCalls(fn: () => Promise<void>): Promise<{ count: number; names: Set<string> }> {
  const mod = fs as unknown as Record<string, unknown>;
  const saved = new Map<string, unknown>();
  const out = { count: 0, names: new Set<string>() };
  for (const k of Object.keys(mod)) {
    const f = mod[k];
    if (!k.endsWith('Sync') || typeof f !== 'function') continue;
    saved.set(k, f);
    mod[k] = function (this: unknown, ...a: unknown[]) { out.count++; out.names.add(k); return (f as (...x: unknown[]) => unknown).apply(this, a); };
  }
  try {
    await fn();
  } finally {
    for (const [k, f] of saved) mod[k] = f;
  }
  return out;
}

/** A store that moves nothing (the trace is all that is under test). */
const nullStore: ExpertStore = {
  expertBytes: 1, slotBytes: 1, overlapsCompute: true, inFlight: 0,
  submit: () => 1, wait: () => undefined, done: () => true, cancel: () => false, dispose: () => undefined,
};

/** Runs `n` engine steps through the offloader's hooks: 2 requests, top-2 routing on every layer. */
function runSteps(off: Offloader, n: number, from = 0): void {
  const k = 2;
  for (let s = from; s < from + n; s++) {
    const rows = [{ id: `r${Math.floor(s / 8)}a`, rows: 2 }, { id: `r${Math.floor(s / 8)}b`, rows: 1 }];
    off.beginStep(rows);
    for (let l = 0; l < meta.numLayers; l++) {
      const ids = Int32Array.from({ length: 3 * k }, (_, j) => (s + l * 5 + j * 3) % meta.numExperts);
      off.onRouted(l, ids, new Int32Array(meta.numExperts), 3);
    }
    off.endStep();
    if (s % 8 === 7) { off.finishRequest(rows[0]!.id); off.finishRequest(rows[1]!.id); }
  }
}

test('rotation keeps at most N files, each at most the cap, holding the newest records, across restarts', async () => {
  const dir = tmpDir();
  const maxFileBytes = 4096;
  const all = steps(1500);
  const w = new TraceWriter(dir, meta, { maxFileBytes, maxFiles: 3, maxQueueBytes: 64 * 2 ** 20 });
  for (let i = 0; i < all.length; i++) {
    w.append(all[i]!);
    if (i % 100 === 99) await w.flush(); // the engine keeps stepping while the writer catches up
  }
  await w.close();
  const check = (expect: TraceStep[]) => {
    const files = traceFiles(dir);
    assert.ok(files.length <= 3, `${files.length} files: ${files.map((f) => path.basename(f)).join(', ')}`);
    for (const f of files) assert.ok(fs.statSync(f).size <= maxFileBytes, `${f} is ${fs.statSync(f).size} bytes`);
    const kept = files.map((f) => fs.readFileSync(f, 'utf8')).join('');
    const full = expect.map(lineOf).join('');
    // The newest records, whole lines, oldest first: a suffix of everything written.
    assert.ok(kept.length > 2 * maxFileBytes - 200, `kept ${kept.length} bytes`);
    assert.ok(full.endsWith(kept) && (full.length === kept.length || full[full.length - kept.length - 1] === '\n'));
  };
  check(all);
  assert.equal(w.counts().written, all.length * 2);
  assert.deepEqual(w.counts().dropped, { sampled_out: 0, queue_full: 0, too_large: 0, write_error: 0 });
  // A restart continues the numbering (a new file) and the bound holds over both runs.
  const before = traceFiles(dir).map((f) => path.basename(f));
  const more = steps(400, 2, 1500);
  const w2 = new TraceWriter(dir, meta, { maxFileBytes, maxFiles: 3 });
  for (const st of more) w2.append(st);
  await w2.close();
  const after = traceFiles(dir).map((f) => path.basename(f));
  assert.ok(after[after.length - 1]! > before[before.length - 1]!, `${after} after ${before}`);
  check([...all, ...more]);
});

test('the step path makes no synchronous file call, through rotations and the EAM collection save', async () => {
  const dir = tmpDir();
  const off = new Offloader(nullStore, {
    numLayers: meta.numLayers, numExperts: meta.numExperts, topK: 2, policy: 'lru', traceDir: dir, modelId: 'test',
    trace: { maxFileBytes: 2048, maxFiles: 2 },
  });
  const calls = await countSyncCalls(async () => {
    for (let i = 0; i < 10; i++) {
      runSteps(off, 40, i * 40);
      await new Promise((r) => setImmediate(r)); // the worker's event loop turns between steps
    }
    await off.save();
  });
  assert.equal(calls.count, 0, `sync calls: ${[...calls.names].join(', ')}`);
  await off.close();
  const files = traceFiles(dir);
  assert.ok(files.length === 2, files.join(', '));
  const lines = files.flatMap((f) => fs.readFileSync(f, 'utf8').split('\n').filter(Boolean));
  assert.equal(JSON.parse(lines[lines.length - 1]!).step, 399);
  assert.ok(fs.existsSync(path.join(dir, 'eam-collection.bin')));
  off.dispose();
});

test('a stalled disk never holds a step: records past the queue cap are dropped, counted and reported once', async () => {
  const dir = tmpDir();
  let release!: () => void;
  const stalled = new Promise<void>((r) => { release = r; });
  const written: string[] = [];
  let appends = 0;
  const slowFs: TraceFs = {
    open: async () => ({
      appendFile: async (data: string) => { appends++; await stalled; written.push(data); },
      close: async () => undefined,
    }),
    unlink: async () => undefined,
  };
  const warnings: string[] = [];
  const off = new Offloader(nullStore, {
    numLayers: meta.numLayers, numExperts: meta.numExperts, topK: 2, policy: 'lru', traceDir: dir, modelId: 'test',
    trace: { fs: slowFs, maxQueueBytes: 16 * 1024, warn: (m) => warnings.push(m) },
  });
  const t0 = performance.now();
  for (let i = 0; i < 20; i++) {
    runSteps(off, 25, i * 25);
    await new Promise((r) => setImmediate(r));
  }
  const ms = performance.now() - t0;
  const w = off.traceWriter!;
  const total = 500 * 2;
  const c = w.counts();
  assert.equal(appends, 1, 'one write in flight, stalled');
  assert.ok(c.dropped.queue_full > 0, JSON.stringify(c));
  assert.ok(w.pendingBytes <= 16 * 1024, `${w.pendingBytes} bytes queued`);
  assert.equal(warnings.length, 1, warnings.join('\n'));
  assert.match(warnings[0]!, /fell behind .* dropping records .*expertd_trace_records_dropped_total\{reason="queue_full"\}/);
  assert.ok(ms < 10_000, `500 steps took ${ms} ms`);
  release();
  await w.flush();
  const after = w.counts();
  assert.equal(after.written + after.dropped.queue_full, total);
  // What was written is the accepted steps, whole and in order.
  const got = written.join('').split('\n').filter(Boolean).map((l) => JSON.parse(l) as TraceStep);
  assert.equal(got.reduce((a, st) => a + st.requests.length, 0), after.written);
  for (let i = 1; i < got.length; i++) assert.ok(got[i]!.step > got[i - 1]!.step);
  const d = off.takeTraceDelta()!;
  assert.deepEqual(d, after);
  assert.equal(off.takeTraceDelta()!.written, 0);
  off.dispose();
});

test('--trace-sample keeps or drops whole requests by id, and counts the dropped', async () => {
  const dir = tmpDir();
  const all = steps(200, 3);
  const w = new TraceWriter(dir, meta, { sampleRate: 0.5 });
  for (const st of all) w.append(st);
  await w.close();
  const lines = traceFiles(dir).flatMap((f) => fs.readFileSync(f, 'utf8').split('\n').filter(Boolean)).map((l) => JSON.parse(l) as TraceStep);
  const ids = new Set(all.flatMap((st) => st.requests.map((r) => r.id)));
  const kept = [...ids].filter((id) => sampleKey(id) < 0.5);
  assert.ok(kept.length > 0 && kept.length < ids.size, `${kept.length} of ${ids.size}`);
  // Every step of a kept request is there, with its routing; nothing of a dropped one.
  const want = all.map((st) => ({ ...st, requests: st.requests.filter((r) => kept.includes(r.id)), finished: st.finished?.filter((id) => kept.includes(id)) }))
    .filter((st) => st.requests.length || st.finished?.length)
    .map((st) => JSON.parse(JSON.stringify({ step: st.step, requests: st.requests, ...(st.finished?.length ? { finished: st.finished } : {}) })) as TraceStep);
  assert.deepEqual(lines, want);
  const n = all.reduce((a, st) => a + st.requests.length, 0);
  assert.equal(w.counts().written + w.counts().dropped.sampled_out, n);
  assert.equal(w.counts().written, want.reduce((a, st) => a + st.requests.length, 0));
});

test('a failing disk is counted as write errors and reported once; close never waits past its timeout', async () => {
  const dir = tmpDir();
  const warnings: string[] = [];
  const failing: TraceFs = { open: async () => { throw Object.assign(new Error('ENOSPC: no space left on device'), { code: 'ENOSPC' }); }, unlink: async () => undefined };
  const w = new TraceWriter(dir, meta, { fs: failing, warn: (m) => warnings.push(m) });
  for (const st of steps(50)) { w.append(st); await new Promise((r) => setImmediate(r)); }
  await w.flush();
  assert.equal(w.counts().dropped.write_error, 100);
  assert.equal(w.counts().written, 0);
  assert.equal(warnings.length, 1);
  assert.match(warnings[0]!, /writing to .* failed \(ENOSPC: no space left on device\)/);

  const never: TraceFs = { open: async () => ({ appendFile: () => new Promise<void>(() => undefined), close: async () => undefined }), unlink: async () => undefined };
  const w2 = new TraceWriter(tmpDir(), meta, { fs: never, warn: () => undefined });
  for (const st of steps(20)) w2.append(st);
  const t0 = performance.now();
  await w2.close(50);
  assert.ok(performance.now() - t0 < 5000);
  assert.equal(w2.counts().dropped.write_error, 40);
  w2.append(steps(1)[0]!);
  assert.equal(w2.counts().dropped.write_error, 42, 'appends after close are counted');
});

test('a step line larger than a whole file is dropped as too_large, not written past the cap', async () => {
  const dir = tmpDir();
  const w = new TraceWriter(dir, meta, { maxFileBytes: 300 });
  const big = steps(1, 8)[0]!;
  const small: TraceStep = { step: 1, requests: [{ id: 'a', layers: [[1, 1], [], [], []] }] };
  w.append(big);
  w.append(small);
  await w.close();
  assert.equal(w.counts().dropped.too_large, 8);
  assert.equal(w.counts().written, 1);
  assert.deepEqual(traceFiles(dir).map((f) => fs.readFileSync(f, 'utf8')), [lineOf(small)]);
});

test('a synthetic run: queue, rotate and read back equal the trace (summary of what the reader gets)', async () => {
  const dir = tmpDir();
  const trace = syntheticTrace({ ...DEFAULT_SYNTHETIC, seed, requests: 20, numLayers: 4, numExperts: 16, familySetSize: 6 });
  const w = new TraceWriter(dir, trace.meta, { maxFileBytes: 8192, maxFiles: 1000 });
  for (const st of trace.steps) w.append(st);
  await w.close();
  assert.ok(traceFiles(dir).length > 3);
  const lines = traceFiles(dir).flatMap((f) => fs.readFileSync(f, 'utf8').split('\n').filter(Boolean)).map((l) => JSON.parse(l) as TraceStep);
  assert.deepEqual(lines, trace.steps);
});

test('the daemon\'s step metrics carry the writer\'s counts into expertd_trace_records_*_total', async () => {
  const { createMetrics } = await import('../src/metrics/registry.js');
  const { wireEngineMetrics } = await import('../src/cli/serve.js');
  const { EventEmitter } = await import('node:events');
  const metrics = createMetrics({ defaultMetrics: false });
  const engine = new EventEmitter();
  wireEngineMetrics(engine as never, metrics);
  const step = { prefillTokens: 0, decodeTokens: 1, durationMs: 1, preemptions: 0 };
  engine.emit('step', { ...step, trace: { written: 5, dropped: { sampled_out: 3, queue_full: 0, too_large: 0, write_error: 0 } } });
  engine.emit('step', { ...step, trace: { written: 2, dropped: { sampled_out: 0, queue_full: 4, too_large: 0, write_error: 0 } } });
  const text = await metrics.registry.metrics();
  assert.match(text, /^expertd_trace_records_written_total 7$/m);
  assert.match(text, /^expertd_trace_records_dropped_total\{reason="sampled_out"\} 3$/m);
  assert.match(text, /^expertd_trace_records_dropped_total\{reason="queue_full"\} 4$/m);
  assert.doesNotMatch(text, /reason="write_error"/);
});

test('flush() waits for what was queued at the call, not for a queue that steps keep refilling', async () => {
  const tick = () => new Promise<void>((r) => setImmediate(r));
  const busyFs: TraceFs = {
    open: async () => ({ appendFile: async () => { await tick(); await tick(); }, close: async () => undefined }),
    unlink: async () => undefined,
  };
  const w = new TraceWriter(tmpDir(), meta, { fs: busyFs });
  const all = steps(5000);
  let i = 0;
  let flushed = false;
  for (; i < 10; i++) w.append(all[i]!);
  const f = w.flush().then(() => { flushed = true; });
  // The engine keeps stepping: one more step every turn of the event loop.
  for (; i < all.length && !flushed; i++) { w.append(all[i]!); await tick(); }
  await f;
  assert.ok(i < all.length, 'flush() waited until the steps stopped');
  assert.ok(w.counts().written >= 20);
  await w.close();
});

test('an unreadable trace-meta.json is set aside with its files, not appended to', async () => {
  const dir = tmpDir();
  fs.writeFileSync(path.join(dir, 'trace-meta.json'), '{"numLayers": 4, "num');
  fs.writeFileSync(path.join(dir, 'trace-000003.jsonl'), '{"step":0,"requests":[]}\n');
  const w = new TraceWriter(dir, meta);
  w.append(steps(1)[0]!);
  await w.close();
  assert.deepEqual(traceFiles(dir).map((f) => path.basename(f)), ['trace-000001.jsonl']);
  assert.equal(fs.readdirSync(dir).filter((f) => f.endsWith('.old')).length, 2);
  assert.deepEqual(JSON.parse(fs.readFileSync(path.join(dir, 'trace-meta.json'), 'utf8')), meta);
});
