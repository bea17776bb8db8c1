// `npm run bench -- quant-kernels`: the quantized DenseGemm kernels alone (fast mode) against the
// bf16 kernel at the same shape, interleaved round-robin so that every format samples the same
// load: decode rows (1, 8) and a prefill tile (512), ms median and min-max, GB/s of weights read,
// and the ratio to bf16. The whole-model view is `quant`.
import os from 'node:os';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';

import { loadNative } from '../src/native/index.js';
import type { PackedWeight } from '../src/native/index.js';
import { fmt, markdownTable, median, parseIntList, parsePositiveInt, runInfo, writeJson, type Cell } from './harness.js';

export async function runQuantKernels(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: { json: { type: 'string' }, reps: { type: 'string' }, n: { type: 'string' }, k: { type: 'string' }, rows: { type: 'string' } },
  });
  const native = loadNative();
  const reps = parsePositiveInt('reps', values.reps, 7);
  const n = parsePositiveInt('n', values.n, 4096), k = parsePositiveInt('k', values.k, 4096);
  const rowsList = values.rows ? parseIntList('rows', values.rows) : [1, 8, 512];
  let seed = 1;
  const rand = () => ((seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32) - 0.5;
  const src = new Float32Array(n * k).map(rand);
  const bf16 = new Uint16Array(n * k);
  const u32 = new Uint32Array(src.buffer);
  for (let i = 0; i < n * k; i++) bf16[i] = (u32[i]! + 0x7fff + ((u32[i]! >>> 16) & 1)) >>> 16;
  const weights: [string, PackedWeight][] = [
    ['bf16', native.packWeight(bf16, 'bf16', n, k)],
    ['int8', native.packWeight(src, 'f32', n, k, 'int8', 0)],
    ['fp8', native.packWeight(src, 'f32', n, k, 'fp8', 128)],
    ['int4 g32', native.packWeight(src, 'f32', n, k, 'int4', 32)],
    ['int4 g128', native.packWeight(src, 'f32', n, k, 'int4', 128)],
  ];
  const caps = native.capabilities();
  const load: number[] = [];
  const table: Cell[][] = [];
  const json: Record<string, unknown>[] = [];
  for (const m of rowsList) {
    const x = new Float32Array(m * k).map(rand), y = new Float32Array(m * n);
    // Calls per sample: ~20 ms of bf16 work per sample at least.
    const t0 = performance.now();
    native.denseGemm(x, m, weights[0]![1], y, null, false, true);
    const calls = Math.max(1, Math.ceil(20 / Math.max(0.01, performance.now() - t0)));
    const ms: number[][] = weights.map(() => []);
    for (let r = 0; r < reps + 1; r++) {
      load.push(os.loadavg()[0]!);
      weights.forEach(([, w], i) => {
        const a = performance.now();
        for (let c = 0; c < calls; c++) native.denseGemm(x, m, w, y, null, false, true);
        if (r > 0) ms[i]!.push((performance.now() - a) / calls);  // r = 0: warm-up
      });
    }
    const bf16Ms = median(ms[0]!);
    weights.forEach(([name, w], i) => {
      const med = median(ms[i]!);
      table.push([`${m}`, name, fmt(med), `${fmt(Math.min(...ms[i]!))}-${fmt(Math.max(...ms[i]!))}`,
        fmt(w.sizeBytes / med / 1e6), i === 0 ? '-' : `${fmt(bf16Ms / med)}x`, fmt(w.sizeBytes / 2 ** 20)]);
      json.push({ rows: m, format: name, ms: ms[i], medianMs: med, weightBytes: w.sizeBytes, vsBf16: bf16Ms / med });
    });
  }
  for (const [, w] of weights) w.dispose();
  console.log(`## quant-kernels: DenseGemm [${n} x ${k}] fast mode, ${os.cpus()[0]?.model ?? 'cpu'}, ${caps.threads} threads, int8Dot ${caps.int8Dot}, bf16Dot ${caps.bf16Dot}\n`);
  console.log(`${reps} samples after 1 warm-up, formats round-robin; ms per call median and min-max; 1-min load average ${fmt(Math.min(...load))}-${fmt(Math.max(...load))}.\n`);
  console.log(markdownTable(['rows', 'format', 'ms', 'min-max', 'GB/s read', 'vs bf16', 'weights MiB'], table));
  if (values.json) writeJson(values.json, { ...runInfo(), n, k, reps, results: json });
}
