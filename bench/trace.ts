// The routing trace writer on the engine thread: time spent in append() per step by the async
// queue (TraceWriter) against a synchronous writer (the pre-rotation behaviour: appendFileSync of
// 64 buffered lines), on a local file and on a FIFO drained at a throttled rate (a slow disk).
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';

import { syntheticTrace, DEFAULT_SYNTHETIC } from '../src/offload/synthetic-trace.js';
import type { TraceStep } from '../src/offload/trace-file.js';
import { TraceWriter } from '../src/offload/trace-writer.js';
import { fmt, markdownTable, median, parsePositiveInt, runInfo, writeJson } from './harness.js';

/** The reference: what --trace-dir did before this writer (sync appends every 64 steps, one file). */
class SyncWriter {
  private buffered: string[] = [];
  constructor(private readonly file: string) {}
  append(st: TraceStep): void {
    this.buffered.push(JSON.stringify(st));
    if (this.buffered.length >= 64) this.flush();
  }
  flush(): void {
    if (this.buffered.length) fs.appendFileSync(this.file, `${this.buffered.join('\n')}\n`);
    this.buffered = [];
  }
}

interface Run { totalMs: number; maxMs: number; dropped: number }

async function runOnce(kind: 'async' | 'sync', disk: 'local' | 'slow fifo', steps: TraceStep[], fifoKBps: number): Promise<Run> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'expertd-bench-trace-'));
  // The async writer's first file is trace-000001.jsonl; the sync one writes trace.jsonl.
  const file = path.join(dir, kind === 'async' ? 'trace-000001.jsonl' : 'trace.jsonl');
  let reader: ReturnType<typeof spawn> | null = null;
  if (disk === 'slow fifo') {
    execFileSync('mkfifo', [file]);
    const chunk = Math.max(1, Math.round(fifoKBps * 1024 / 10));
    reader = spawn('bash', ['-c', `exec 3<"${file}"; while head -c ${chunk} <&3 >/dev/null; do sleep 0.1; done`], { stdio: 'ignore' });
  }
  const meta = { numLayers: DEFAULT_SYNTHETIC.numLayers, numExperts: DEFAULT_SYNTHETIC.numExperts, topK: DEFAULT_SYNTHETIC.topK, model: 'bench' };
  const w = kind === 'async' ? new TraceWriter(dir, meta) : new SyncWriter(file);
  let total = 0;
  let max = 0;
  for (const st of steps) {
    const t0 = performance.now();
    w.append(st);
    const dt = performance.now() - t0;
    total += dt;
    if (dt > max) max = dt;
    // The engine worker yields to its event loop between steps.
    await new Promise((r) => setImmediate(r));
  }
  const dropped = w instanceof TraceWriter ? w.counts().dropped.queue_full : 0;
  reader?.kill('SIGKILL');
  if (w instanceof TraceWriter) await w.close(100);
  fs.rmSync(dir, { recursive: true, force: true });
  return { totalMs: total, maxMs: max, dropped };
}

export async function runTraceBench(argv: string[]): Promise<void> {
  const { values } = parseArgs({ args: argv, options: { json: { type: 'string' }, reps: { type: 'string' }, steps: { type: 'string' }, 'fifo-kbps': { type: 'string' } } });
  const reps = parsePositiveInt('reps', values.reps, 5);
  const nSteps = parsePositiveInt('steps', values.steps, 1000);
  const fifoKBps = parsePositiveInt('fifo-kbps', values['fifo-kbps'], 640);
  const trace = syntheticTrace({ ...DEFAULT_SYNTHETIC, requests: 8 + Math.ceil(nSteps * 8 / DEFAULT_SYNTHETIC.decodeTokens), batch: 8 });
  const steps = trace.steps.slice(0, nSteps);
  const bytes = steps.reduce((a, st) => a + JSON.stringify(st).length + 1, 0);
  const rows: Record<string, unknown>[] = [];
  for (const disk of ['local', 'slow fifo'] as const) {
    const runs: Record<'async' | 'sync', Run[]> = { async: [], sync: [] };
    // Interleaved, after one untimed warm-up of each.
    for (let r = 0; r <= reps; r++)
      for (const kind of ['sync', 'async'] as const) {
        const run = await runOnce(kind, disk, steps, fifoKBps);
        if (r > 0) runs[kind].push(run);
      }
    for (const kind of ['sync', 'async'] as const) {
      const t = runs[kind].map((x) => x.totalMs);
      rows.push({
        disk: disk === 'slow fifo' ? `FIFO drained at ${fifoKBps} KB/s` : 'local file', writer: kind === 'async' ? 'TraceWriter (queue)' : 'sync appends (reference)',
        totalMsMedian: median(t), totalMsMin: Math.min(...t), totalMsMax: Math.max(...t),
        maxStepMsMedian: median(runs[kind].map((x) => x.maxMs)), dropped: median(runs[kind].map((x) => x.dropped)),
        vsSync: median(t) / median(runs.sync.map((x) => x.totalMs)),
      });
    }
  }
  console.log(`\n### routing trace writer: engine-thread time in append(), ${steps.length} steps (${(bytes / 2 ** 20).toFixed(1)} MiB of lines), ` +
    `median [min-max] of ${reps} reps, interleaved; load average ${os.loadavg().map((x) => x.toFixed(1)).join(' ')}\n`);
  console.log(markdownTable(['disk', 'writer', 'ms total', 'min-max', 'slowest step ms', 'records dropped', 'vs sync'],
    rows.map((r) => [r['disk'] as string, r['writer'] as string, r['totalMsMedian'] as number,
      `${fmt(r['totalMsMin'] as number)}-${fmt(r['totalMsMax'] as number)}`, r['maxStepMsMedian'] as number, r['dropped'] as number, r['vsSync'] as number])));
  if (values.json) writeJson(values.json, { info: runInfo(), steps: steps.length, bytes, reps, fifoKBps, rows });
}
