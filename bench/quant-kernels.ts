// `npm run bench -- quant-kernels`: the quantized DenseGemm kernels alone (fast mode) against the
// bf16 kernel at the same shape, interleaved round-robin so that every format samples the same
// load: decode rows (1, 8) and a prefill tile (512), ms median and min-max, GB/s of weights read,
// and the ratio to bf16. The whole-model view is `quant`.
import os from 'node:os';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';

import { loadNative } from '../src/native/index.js';
import type { ExpertTable, PackedWeight } from '../src/native/index.js';
import { fmt, markdownTable, median, parseIntList, parsePositiveInt, percentile, runInfo, writeJson, type Cell } from './harness.js';
import { mulberry32 } from '../src/engine/rng.js';

/**
 * The formats both tables compare: name, --quantize format (null: bf16; 'mxfp4': random MXFP4
 * checkpoint data, which --quantize cannot make), group.
 */
const ALL_FORMATS: [string, 'int8' | 'fp8' | 'int4' | 'int4-zero' | 'mxfp4' | null, number][] =
  [['bf16', null, 0], ['int8', 'int8', 0], ['fp8', 'fp8', 128], ['int4 g32', 'int4', 32], ['int4 g128', 'int4', 128],
    ['int4 g128 +zeros', 'int4-zero', 128], ['mxfp4', 'mxfp4', 32]];

/** A format's name on the command line: 'int4 g128 +zeros' -> int4-g128-zeros. */
const slug = (name: string) => name.replace(/\s*\+/g, '-').replace(/\s+/g, '-');

type Format = (typeof ALL_FORMATS)[number];

/** The formats a run compares (`--formats`, bf16 always first: the ratios are against it). */
function pickFormats(list: string | undefined): Format[] {
  if (list === undefined) return ALL_FORMATS;
  const names = list.split(',').map((s) => s.trim()).filter(Boolean);
  const known = ALL_FORMATS.map((f) => slug(f[0]));
  for (const n of names)
    if (!known.includes(n)) throw new RangeError(`--formats: '${n}' is not one of ${known.join(', ')}`);
  return ALL_FORMATS.filter((f, i) => i === 0 || names.includes(slug(f[0])));
}

/** Random int4 checkpoint data with zero points (AWQ's: f16 scales, a zero per group) packed as AWQ loads it. */
function int4ZeroWeight(rng: () => number, n: number, k: number, group: number, gateUp: boolean): PackedWeight {
  const groups = Math.ceil(k / group);
  const half = () => ({
    codes: new Int8Array(n * k).map(() => Math.floor(rng() * 16) - 8),
    scales: new Float32Array(n * groups).map(() => (256 + Math.floor(rng() * 768)) / 2 ** 18),
    zeros: new Int8Array(n * groups).map(() => Math.floor(rng() * 16) - 8),
  });
  const g = half(), u = gateUp ? half() : null;
  return loadNative().packInt(g.codes, g.scales, n, k, 'int4', group, u?.codes, u?.scales, 'f16', g.zeros, u?.zeros);
}

/** Random MXFP4 data for an [n, k] matrix (k a multiple of 32): e2m1 code pairs, e8m0 scales 2^-9..2^-5. */
function mxfp4Data(rng: () => number, n: number, k: number): { blocks: Uint8Array; scales: Uint8Array } {
  return {
    blocks: new Uint8Array(n * k / 2).map(() => Math.floor(rng() * 256)),
    scales: new Uint8Array(n * k / 32).map(() => 118 + Math.floor(rng() * 5)),
  };
}

/**
 * One format's [n, k] weight (gate_up when `up` is given: gate rows n, then up rows n) from f32
 * values (bf16 rounded, or quantized at pack), or random MXFP4 data of that shape.
 */
function packFormat(format: Format, rng: () => number, n: number, k: number, w: Float32Array,
                    up?: Float32Array): PackedWeight {
  const native = loadNative();
  const [, q, group] = format;
  if (q === 'int4-zero') return int4ZeroWeight(rng, n, k, group, !!up);
  if (q === 'mxfp4') {
    const g = mxfp4Data(rng, n, k), u = up ? mxfp4Data(rng, n, k) : null;
    return u ? native.packMxfp4(g.blocks, g.scales, n, k, u.blocks, u.scales) : native.packMxfp4(g.blocks, g.scales, n, k);
  }
  if (up) return q ? native.packGateUp(w, up, 'f32', n, k, q, group) : native.packGateUp(bf16Of(w), bf16Of(up), 'bf16', n, k);
  return q ? native.packWeight(w, 'f32', n, k, q, group) : native.packWeight(bf16Of(w), 'bf16', n, k);
}

/** toBf16, once per array (the expert table packs the same three matrices for every expert). */
const bf16Memo = new WeakMap<Float32Array, Uint16Array>();
function bf16Of(a: Float32Array): Uint16Array {
  let b = bf16Memo.get(a);
  if (!b) bf16Memo.set(a, (b = toBf16(a)));
  return b;
}

/** f32 -> bf16 bits, round to nearest even. */
function toBf16(a: Float32Array): Uint16Array {
  const u = new Uint32Array(a.buffer, a.byteOffset, a.length), o = new Uint16Array(a.length);
  for (let i = 0; i < a.length; i++) o[i] = (u[i]! + 0x7fff + ((u[i]! >>> 16) & 1)) >>> 16;
  return o;
}

export async function runQuantKernels(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      json: { type: 'string' }, reps: { type: 'string' }, n: { type: 'string' }, k: { type: 'string' }, rows: { type: 'string' },
      experts: { type: 'string' }, layers: { type: 'string' }, formats: { type: 'string' },
    },
  });
  const formats = pickFormats(values.formats);
  const native = loadNative();
  const reps = parsePositiveInt('reps', values.reps, 7);
  if (values.experts !== undefined) return runExpertShape(formats, values.experts, parsePositiveInt('layers', values.layers, 10), reps, values.json);
  const n = parsePositiveInt('n', values.n, 4096), k = parsePositiveInt('k', values.k, 4096);
  const rowsList = values.rows ? parseIntList('rows', values.rows) : [1, 8, 512];
  let seed = 1;
  const rand = () => ((seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32) - 0.5;
  const src = new Float32Array(n * k).map(rand);
  const mxfp4Rng = mulberry32(2);
  const weights: [string, PackedWeight][] = formats.map((f) => [f[0], packFormat(f, mxfp4Rng, n, k, src)]);
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

/** Expert shapes by name: hidden, expert intermediate, experts, experts per token. */
const EXPERT_SHAPES: Record<string, [number, number, number, number]> = {
  'qwen3moe-like': [1024, 256, 64, 8],
  'mixtral-like': [1024, 2816, 8, 2],
};

/**
 * `--experts NAME|H:I:E:K`: the GroupGemm of a decode step (batch 1: K experts, one row each) at a
 * bench model's expert shape, `layers` layers of E experts per format so that the weights come
 * from memory as in a model's decode (a layer's K experts change every call), not from the cache.
 * Formats round-robin per sample; GB/s counts the K experts' packed bytes.
 */
function runExpertShape(formats: Format[], shapeArg: string, layers: number, reps: number, json?: string): void {
  const native = loadNative();
  const shape = EXPERT_SHAPES[shapeArg] ?? shapeArg.split(':').map(Number);
  if (shape.length !== 4 || !shape.every((v) => Number.isInteger(v) && v > 0))
    throw new RangeError(`--experts is '${shapeArg}', expected ${Object.keys(EXPERT_SHAPES).join(', ')} or H:I:E:K`);
  const [H, I, E, K] = shape as [number, number, number, number];
  if (K > E) throw new RangeError(`--experts ${shapeArg}: K (${K}) exceeds E (${E})`);
  const rng = mulberry32(1);
  const rand = () => (rng() - 0.5) * 0.1;
  const gate = new Float32Array(I * H).map(rand), up = new Float32Array(I * H).map(rand), down = new Float32Array(H * I).map(rand);
  const tables: ExpertTable[][] = [];
  const expertBytes: number[] = [];
  for (const f of formats) {
    const list: ExpertTable[] = [];
    for (let l = 0; l < layers; l++) {
      const t = new native.ExpertTable(E, H, I);
      for (let e = 0; e < E; e++) {
        const gu = packFormat(f, rng, I, H, gate, up);
        const dn = packFormat(f, rng, H, I, down);
        if (l === 0 && e === 0) expertBytes.push(gu.sizeBytes + dn.sizeBytes);
        t.set(e, gu, dn);
        gu.dispose();
        dn.dispose();
      }
      list.push(t);
    }
    tables.push(list);
  }
  // 64 routings of K distinct experts, one row each (rows in expert order, as after the permute).
  const routings: Int32Array[] = [];
  for (let s = 0; s < 64; s++) {
    const pick = new Set<number>();
    while (pick.size < K) pick.add(Math.floor(rng() * E));
    const off = new Int32Array(E + 1);
    let r = 0;
    for (let e = 0; e < E; e++) { off[e] = r; if (pick.has(e)) r++; }
    off[E] = r;
    routings.push(off);
  }
  const x = new Float32Array(K * H).map(rand), y = new Float32Array(K * H);
  const calls = 4 * layers;
  const ms: number[][] = formats.map(() => []);
  const load: number[] = [];
  for (let r = 0; r < reps + 1; r++) {
    load.push(os.loadavg()[0]!);
    formats.forEach((_, i) => {
      const a = performance.now();
      for (let c = 0; c < calls; c++) native.groupGemmFfn(x, routings[(r * calls + c) % 64]!, tables[i]![c % layers]!, y, true);
      if (r > 0) ms[i]!.push((performance.now() - a) / calls);  // r = 0: warm-up
    });
  }
  const bf16Ms = median(ms[0]!);
  const table: Cell[][] = [];
  const results: Record<string, unknown>[] = [];
  formats.forEach(([name], i) => {
    const med = median(ms[i]!), bytes = K * expertBytes[i]!;
    // Bytes per second against bf16's in the same round, sample by sample: the machine's drift
    // between rounds (this VM's read bandwidth moves 24-54 GB/s) cancels in each ratio.
    const paired = ms[i]!.map((m, r) => ms[0]![r]! / m / (expertBytes[0]! / expertBytes[i]!));
    table.push([name, fmt(med), `${fmt(Math.min(...ms[i]!))}-${fmt(Math.max(...ms[i]!))}`, fmt(bytes / med / 1e6),
      i === 0 ? '-' : `${fmt(bf16Ms / med)}x`, fmt(bf16Ms / med / (expertBytes[0]! / expertBytes[i]!) * 100, 2) + '%',
      i === 0 ? '-' : `${fmt(percentile(paired, 0.5), 3)} (${fmt(percentile(paired, 0.1), 3)}-${fmt(percentile(paired, 0.9), 3)})`,
      fmt(expertBytes[i]! / 1024)]);
    results.push({ format: name, ms: ms[i], medianMs: med, expertBytes: expertBytes[i], vsBf16: bf16Ms / med,
      pairedBytesRate: i === 0 ? null : percentile(paired, 0.5) });
  });
  for (const list of tables) for (const t of list) t.dispose();
  const caps = native.capabilities();
  console.log(`## quant-kernels --experts: GroupGemm of one decode step (K ${K} of E ${E} experts, H ${H}, I ${I}, one row each), ${layers} layers per format, fast mode, ${os.cpus()[0]?.model ?? 'cpu'}, ${caps.threads} threads\n`);
  console.log(`${reps} samples of ${calls} calls after 1 warm-up, formats round-robin; ms per call median and min-max; "of bytes ratio": the speed-up over bf16 as a share of the bytes saved; "bytes/s vs bf16 paired": the same per round (each sample against bf16's of its round), median (p10-p90); 1-min load average ${fmt(Math.min(...load))}-${fmt(Math.max(...load))}.\n`);
  console.log(markdownTable(['format', 'ms', 'min-max', 'GB/s read', 'vs bf16', 'of bytes ratio', 'bytes/s vs bf16 paired', 'KiB per expert'], table));
  if (json) writeJson(json, { ...runInfo(), shape: { H, I, E, K }, layers, reps, results });
}
