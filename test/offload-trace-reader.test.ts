// Reading a rotated trace set: every file, oldest first, streamed line by line (the reader has read
// a small part of the set when the first step comes out); summary and replay over many files equal
// references computed from the trace in memory; a torn last line is skipped with a warning.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';

import { scanTrace, traceCommand } from '../src/cli/trace.js';
import { replay, REPLAY_POLICIES } from '../src/offload/replay.js';
import { syntheticTrace, DEFAULT_SYNTHETIC } from '../src/offload/synthetic-trace.js';
import { TRACE_FILE, traceFiles, traceSteps, type Trace, type TraceStep } from '../src/offload/trace-file.js';
import { TraceWriter } from '../src/offload/trace-writer.js';
import { fileSeed } from './helpers/seed.js';

const CAP = 64 * 1024;
const seed = fileSeed(DEFAULT_SYNTHETIC.seed, 'synthetic traces');
const trace = syntheticTrace({ ...DEFAULT_SYNTHETIC, seed, requests: 120, numLayers: 12, numExperts: 48 });
const totalBytes = trace.steps.reduce((a, st) => a + JSON.stringify(st).length + 1, 0);

async function writeSet(t: Trace, opts: { maxFileBytes?: number } = {}): Promise<string> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'expertd-trace-reader-'));
  const w = new TraceWriter(dir, t.meta, { maxFileBytes: opts.maxFileBytes ?? CAP, maxFiles: 10_000 });
  for (const st of t.steps) w.append(st);
  await w.close();
  return dir;
}
const dirPromise = writeSet(trace);

async function capture(fn: () => Promise<number>): Promise<{ code: number; out: string; err: string }> {
  const lines: string[] = [];
  const errs: string[] = [];
  const log = console.log;
  const write = process.stderr.write.bind(process.stderr);
  console.log = (...a: unknown[]) => { lines.push(a.join(' ')); };
  process.stderr.write = ((s: string) => { errs.push(String(s)); return true; }) as typeof process.stderr.write;
  try {
    const code = await fn();
    return { code, out: lines.join('\n'), err: errs.join('') };
  } finally {
    console.log = log;
    process.stderr.write = write;
  }
}

/** Plain loops over the in-memory trace: what a streaming pass must find. */
function reference(steps: TraceStep[], L: number, E: number) {
  const pop = new Float64Array(L * E);
  const perRequest = new Map<string, Float64Array>();
  let finished = 0;
  for (const st of steps) {
    for (const r of st.requests) {
      if (!perRequest.has(r.id)) perRequest.set(r.id, new Float64Array(L * E));
      const m = perRequest.get(r.id)!;
      for (let l = 0; l < L; l++) {
        const row = r.layers[l]!;
        for (let i = 0; i < row.length; i += 2) { pop[l * E + row[i]!]! += row[i + 1]!; m[l * E + row[i]!]! += row[i + 1]!; }
      }
    }
    finished += st.finished?.length ?? 0;
  }
  return { steps: steps.length, requests: perRequest.size, finished, pop, perRequest };
}

test('a multi-file set bigger than the cap: the streaming scan equals the in-memory reference', async () => {
  const dir = await dirPromise;
  const files = traceFiles(dir);
  assert.ok(totalBytes > 10 * CAP && files.length > 10, `${files.length} files for ${totalBytes} bytes`);
  for (const f of files) assert.ok(fs.statSync(f).size <= CAP);
  const { numLayers: L, numExperts: E } = trace.meta;
  const ref = reference(trace.steps, L, E);
  const scan = await scanTrace(dir, { maxRequests: 10_000 });
  assert.equal(scan.steps, ref.steps);
  assert.equal(scan.requests, ref.requests);
  assert.equal(scan.finishedRequests, ref.finished);
  assert.deepEqual(Array.from(scan.popularity.counts), Array.from(ref.pop));
  // Every request's whole-life EAM, in order of first appearance.
  assert.deepEqual(scan.eams.map((m) => Array.from(m.counts)), [...ref.perRequest.values()].map((m) => Array.from(m)));
  // The summary prints the same totals.
  const { code, out } = await capture(() => traceCommand(['summary', '--trace-dir', dir, '--json']));
  assert.equal(code, 0);
  const s = JSON.parse(out) as { steps: number; requests: number; layers: { tokens: number }[] };
  assert.equal(s.steps, ref.steps);
  assert.equal(s.requests, ref.requests);
  s.layers.forEach((row, l) => assert.equal(row.tokens, ref.pop.slice(l * E, (l + 1) * E).reduce((a, b) => a + b, 0)));
});

test('the reader streams: the first step comes out after a small part of the set is read, one file open at a time', async () => {
  const dir = await dirPromise;
  let bytesRead = 0;
  let open = 0;
  let maxOpen = 0;
  const createReadStream = (f: string) => {
    const s = fs.createReadStream(f, { highWaterMark: 16 * 1024 });
    open++;
    maxOpen = Math.max(maxOpen, open);
    s.on('data', (c) => { bytesRead += c.length; });
    s.on('end', () => { open--; });
    return s;
  };
  const it = traceSteps(dir, { createReadStream });
  const first = await it.next();
  assert.deepEqual(first.value, trace.steps[0]);
  assert.ok(bytesRead < totalBytes / 8, `read ${bytesRead} of ${totalBytes} bytes before the first step`);
  let n = 1;
  for (let r = await it.next(); !r.done; r = await it.next()) n++;
  assert.equal(n, trace.steps.length);
  assert.equal(bytesRead, totalBytes);
  assert.equal(maxOpen, 1);
});

test('replay over a rotated set equals replay of the trace in memory, every policy', async () => {
  const small = syntheticTrace({ ...DEFAULT_SYNTHETIC, seed, requests: 24, numLayers: 6, numExperts: 32 });
  const dir = await writeSet(small, { maxFileBytes: 8192 });
  assert.ok(traceFiles(dir).length > 4);
  const { code, out } = await capture(() => traceCommand(['replay', '--trace-dir', dir, '--capacity', '0.25', '--json']));
  assert.equal(code, 0);
  const got = JSON.parse(out) as unknown[];
  const want = REPLAY_POLICIES.map((policy) => replay(small, { policy, capacity: 0.25 }));
  assert.deepEqual(got, JSON.parse(JSON.stringify(want)));
  // Belady past its memory cap is skipped with a warning.
  const capped = await capture(() => traceCommand(['replay', '--trace-dir', dir, '--json', '--policy', 'belady', '--belady-max-accesses', '1000']));
  assert.deepEqual(JSON.parse(capped.out), []);
  assert.match(capped.err, /belady skipped: the trace has more than 1000 expert accesses/);
});

test('a torn last line (a crash, then a restart) is skipped with a warning; a bad line inside a file is an error', async () => {
  const small = syntheticTrace({ ...DEFAULT_SYNTHETIC, seed, requests: 12, numLayers: 4, numExperts: 16, familySetSize: 6 });
  const half = Math.floor(small.steps.length / 2);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'expertd-trace-torn-'));
  // First run: ends mid-line. Second run: a new file after it.
  const w1 = new TraceWriter(dir, small.meta);
  for (const st of small.steps.slice(0, half)) w1.append(st);
  await w1.close();
  fs.appendFileSync(traceFiles(dir)[0]!, JSON.stringify(small.steps[half]).slice(0, 40));
  const w2 = new TraceWriter(dir, small.meta);
  for (const st of small.steps.slice(half + 1)) w2.append(st);
  await w2.close();
  assert.equal(traceFiles(dir).length, 2);
  const kept = small.steps.filter((_, i) => i !== half);
  const { code, out, err } = await capture(() => traceCommand(['summary', '--trace-dir', dir, '--json']));
  assert.equal(code, 0);
  assert.match(err, /warning: .*trace-000001\.jsonl:\d+: skipped a torn last line/);
  const ref = reference(kept, 4, 16);
  const s = JSON.parse(out) as { steps: number; requests: number; layers: { tokens: number }[] };
  assert.equal(s.steps, ref.steps);
  s.layers.forEach((row, l) => assert.equal(row.tokens, ref.pop.slice(l * 16, (l + 1) * 16).reduce((a, b) => a + b, 0)));
  // Corruption that is not at a file's end is not silently skipped.
  const f = traceFiles(dir)[1]!;
  const lines = fs.readFileSync(f, 'utf8').split('\n');
  lines[1] = '{"step": oops';
  fs.writeFileSync(f, lines.join('\n'));
  await assert.rejects(traceCommand(['summary', '--trace-dir', dir]), new RegExp(`trace-000002\\.jsonl:2: `));
});

test('a pre-rotation trace.jsonl is read first; summary samples at most --max-requests EAMs, the same every run', async () => {
  const dir = await writeSet({ meta: trace.meta, steps: trace.steps.slice(200) });
  fs.writeFileSync(path.join(dir, TRACE_FILE), trace.steps.slice(0, 200).map((st) => `${JSON.stringify(st)}\n`).join(''));
  assert.equal(path.basename(traceFiles(dir)[0]!), TRACE_FILE);
  const all: TraceStep[] = [];
  for await (const st of traceSteps(dir)) all.push(st);
  assert.deepEqual(all, trace.steps);
  const run = async () => JSON.parse((await capture(() => traceCommand(['summary', '--trace-dir', dir, '--json', '--max-requests', '10']))).out) as
    { requests: number; similarity: { requestsCompared: number; sizes: number[]; withinMean: number } };
  const a = await run();
  const b = await run();
  assert.equal(a.requests, 120);
  assert.equal(a.similarity.requestsCompared, 10);
  assert.deepEqual(a.similarity, b.similarity);
  const text = await capture(() => traceCommand(['summary', '--trace-dir', dir, '--max-requests', '10']));
  assert.match(text.out, /over a sample of 10 of the 120 requests/);
});
