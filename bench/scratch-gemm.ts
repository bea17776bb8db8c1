// Scratch timing of the CPU GEMM kernels (not part of npm test or the bench suite): GroupGemm
// decode (bytes streamed per second) and prefill (GFLOP/s) at an OLMoE-like expert shape.
// Usage: node dist/bench/scratch-gemm.js [threads]
import { loadNative } from '../src/native/index.js';

const native = loadNative();
const threads = Number(process.argv[2] ?? 0);
native.setNumThreads(threads);
const H = 1024, I = 2816, E = 8;

function randomBf16(n: number, scale: number): Uint16Array {
  const f = new Float32Array(n);
  for (let i = 0; i < n; i++) f[i] = (Math.random() * 2 - 1) * scale;
  const u = new Uint32Array(f.buffer);
  const out = new Uint16Array(n);
  for (let i = 0; i < n; i++) out[i] = u[i]! >>> 16;  // truncation: fine for timing
  return out;
}

const gate = randomBf16(I * H, 0.05), up = randomBf16(I * H, 0.05), down = randomBf16(H * I, 0.05);
const table = new native.ExpertTable(E, H, I);
let expertBytes = 0;
for (let e = 0; e < E; e++) {
  const gu = native.packGateUp(gate, up, 'bf16', I, H);
  const dn = native.packWeight(down, 'bf16', H, I);
  expertBytes = gu.sizeBytes + dn.sizeBytes;
  table.set(e, gu, dn);
}

function median(a: number[]): number {
  const s = [...a].sort((p, q) => p - q);
  return s[Math.floor(s.length / 2)]!;
}

// Wall time (median, best) and process CPU time per call: on a shared box, CPU seconds per call
// divided by the threads in use is the time the kernel would take with the cores to itself.
function time(fn: (i: number) => void, reps: number): { med: number; min: number; cpu: number } {
  for (let i = 0; i < 3; i++) fn(i);
  const t: number[] = [];
  const c0 = process.cpuUsage();
  for (let i = 0; i < reps; i++) {
    const t0 = process.hrtime.bigint();
    fn(i);
    t.push(Number(process.hrtime.bigint() - t0) / 1e9);
  }
  const c = process.cpuUsage(c0);
  const nt = native.capabilities().threads;
  return { med: median(t), min: Math.min(...t), cpu: (c.user + c.system) / 1e6 / reps / nt };
}

// Decode: top-2 of 8, one token -> 2 experts x 1 row. The pair rotates so that the weights come
// from DRAM (8 experts = 138 MB > L3), as in a real decode step.
const x1 = new Float32Array(2 * H).map(() => Math.random() - 0.5);
const y1 = new Float32Array(2 * H);
const offs: Int32Array[] = [];
for (let p = 0; p < E / 2; p++) {
  const o = new Int32Array(E + 1);
  for (let e = 0; e <= E; e++) o[e] = e <= 2 * p ? 0 : e === 2 * p + 1 ? 1 : 2;
  offs.push(o);
}
for (const fast of [true, false]) {
  const d = time((i) => native.groupGemmFfn(x1, offs[i % offs.length]!, table, y1, fast), 60);
  const bytes = 2 * expertBytes;
  console.log(`decode group fast=${fast}: ${(d.med * 1e3).toFixed(3)} ms median, ` +
    `${(bytes / d.med / 1e9).toFixed(2)} GB/s (median), ${(bytes / d.min / 1e9).toFixed(2)} GB/s (best), ` +
    `${(bytes / d.cpu / 1e9).toFixed(2)} GB/s per CPU-time`);
}

// Prefill: 512 tokens x top-2 = 1024 rows, 128 per expert.
const rows = 1024;
const xp = new Float32Array(rows * H).map(() => Math.random() - 0.5);
const yp = new Float32Array(rows * H);
const op = new Int32Array(E + 1);
for (let e = 0; e <= E; e++) op[e] = (rows / E) * e;
const flops = rows * (2 * H * 2 * I + 2 * I * H);
for (const fast of [true, false]) {
  const p = time(() => native.groupGemmFfn(xp, op, table, yp, fast), fast ? 8 : 3);
  console.log(`prefill group fast=${fast}: ${(p.med * 1e3).toFixed(1)} ms median, ` +
    `${(flops / p.med / 1e9).toFixed(1)} GFLOP/s (median), ${(flops / p.min / 1e9).toFixed(1)} GFLOP/s (best), ` +
    `${(flops / p.cpu / 1e9).toFixed(1)} GFLOP/s per CPU-time`);
}
console.log(`threads ${native.capabilities().threads}, simd ${native.capabilities().simd}`);
