// `npm run bench -- kv-attention`: decode attention over an f32, bf16 and fp8 paged KV cache at the
// bench models' attention shape (16 heads, 4 KV heads, head dim 64): median and spread per cache
// dtype, the three interleaved rep by rep (a noisy machine hits them alike), as ratios to f32.
import { parseArgs } from 'node:util';

import { mulberry32 } from '../src/engine/rng.js';
import { allocKvArray, kvDtypeBytes, type KvDtype } from '../src/model/kv-dtype.js';
import { loadNative } from '../src/native/index.js';
import { fmt, markdownTable, parseIntList, parsePositiveInt, runInfo, stats, writeJson, type Cell } from './harness.js';

export async function runKvAttention(argv: string[]): Promise<void> {
  const { values } = parseArgs({ args: argv, options: {
    json: { type: 'string' }, reps: { type: 'string' }, seqs: { type: 'string' }, ctx: { type: 'string' }, threads: { type: 'string' },
  }, strict: true });
  const native = loadNative();
  const threads = parsePositiveInt('threads', values.threads, 0);
  if (threads > 0) native.setNumThreads(threads);
  const reps = parsePositiveInt('reps', values.reps, 30);
  const seqCounts = values.seqs ? parseIntList('seqs', values.seqs) : [16, 64];
  const ctxs = values.ctx ? parseIntList('ctx', values.ctx) : [160, 1024];
  const heads = 16, kvHeads = 4, d = 64, blockSize = 16;
  const dtypes: KvDtype[] = ['f32', 'bf16', 'fp8'];
  const rand = mulberry32(7);
  const rows: Cell[][] = [];
  const json: unknown[] = [];
  for (const t of seqCounts) for (const ctxLen of ctxs) {
    const maxBlocks = Math.ceil(ctxLen / blockSize);
    const slots = t * maxBlocks * blockSize;
    const seqInfo = new Int32Array(t * 3);
    const tables = new Int32Array(t * maxBlocks);
    for (let s = 0; s < t; s++) {
      seqInfo.set([s, 1, ctxLen], s * 3);
      for (let b = 0; b < maxBlocks; b++) tables[s * maxBlocks + b] = s * maxBlocks + b;
    }
    const q = Float32Array.from({ length: t * heads * d }, () => rand() * 2 - 1);
    const k = Float32Array.from({ length: slots * kvHeads * d }, () => rand() * 2 - 1);
    const v = Float32Array.from({ length: slots * kvHeads * d }, () => rand() * 2 - 1);
    const all = Int32Array.from({ length: slots }, (_, i) => i);
    const scales = new Float32Array(kvHeads).fill(1 / 256);
    const caches = dtypes.map((dt) => {
      const kc = allocKvArray(dt, slots * kvHeads * d), vc = allocKvArray(dt, slots * kvHeads * d);
      native.kvCacheWrite(k, v, slots, all, kc, vc, kvHeads, d, d, d, scales, scales);
      return { dt, kc, vc, out: new Float32Array(t * heads * d), times: [] as number[], cpuMs: [] as number[] };
    });
    const opts = { numSeqs: t, heads, kvHeads, dk: d, dv: d, blockSize, maxBlocks, scale: 0.125, kScales: scales, vScales: scales };
    for (let r = 0; r < reps + 3; r++) {
      for (const c of caches) {
        // CPU time (this process, all threads) beside wall time: on a shared machine a call that
        // waits for a core grows in wall time only.
        const c0 = process.cpuUsage();
        const t0 = performance.now();
        native.pagedAttention(q, c.kc, c.vc, seqInfo, tables, opts, c.out);
        const dt = performance.now() - t0;
        const cu = process.cpuUsage(c0);
        if (r >= 3) { c.times.push(dt); c.cpuMs.push((cu.user + cu.system) / 1000); }
      }
    }
    const base = stats(caches[0]!.times).medianMs, baseCpu = stats(caches[0]!.cpuMs).medianMs;
    for (const c of caches) {
      const st = stats(c.times), cpu = stats(c.cpuMs);
      const bytes = 2 * t * ctxLen * kvHeads * d * kvDtypeBytes(c.dt);
      rows.push([t, ctxLen, c.dt, st.medianMs, `${fmt(st.minMs)}-${fmt(st.maxMs)}`, bytes / 2 ** 20, bytes / (st.medianMs * 1e6), `${fmt(base / st.medianMs)}x`,
        cpu.medianMs, `${fmt(cpu.minMs)}-${fmt(cpu.maxMs)}`, `${fmt(baseCpu / cpu.medianMs)}x`]);
      json.push({ seqs: t, ctx: ctxLen, dtype: c.dt, ...st, cpuMs: c.cpuMs, kvBytes: bytes });
    }
  }
  const info = runInfo();
  console.log(`## decode attention over the paged KV cache by dtype (heads ${heads}, kv heads ${kvHeads}, d ${d}, block ${blockSize}; ${reps} reps, interleaved)\n`);
  console.log(markdownTable(['sequences', 'ctx', 'KV', 'median ms', 'min-max ms', 'KV MiB read', 'GB/s', 'speed vs f32',
    'cpu ms', 'cpu min-max', 'cpu vs f32'], rows));
  console.log(`\nload average ${(info.loadAverage as number[]).map((x) => x.toFixed(1)).join(' ')}`);
  if (values.json) writeJson(values.json, { bench: 'kv-attention', run: info, rows: json });
}
