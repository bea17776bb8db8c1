// `npm run bench -- kernels`: the CPU kernels of the MoE layer (GroupGemm, a DenseGemm loop,
// routing, permute+combine, rmsNorm, decode attention) at Mixtral-like and Qwen3-MoE-like shapes,
// each against the machine's measured limits and the OpenBLAS per-expert loop from the same run.
import os from 'node:os';
import { parseArgs } from 'node:util';

import type { ExpertTable, NativeAddon, PackedWeight } from '../src/native/index.js';
import { loadNative } from '../src/native/index.js';
import { seriesChart, type Series } from '../src/plot/charts.js';
import { writePlot } from '../src/plot/render.js';
import { runKernelsCuda } from './kernels-cuda.js';
import {
  CacheFlusher, fmt, markdownTable, measure, parseIntList, parsePositiveInt, pct, runInfo, stats,
  writeJson, type Cell, type Stats,
} from './harness.js';
import { runOpenBlasPeer, type PeerCase, type PeerRun } from './peers/openblas.js';
import { runProbe, type MachineLimits } from './probe/probe.js';
import { mulberry32 } from '../src/engine/rng.js';

export interface MoeShape {
  name: string;
  h: number;
  inter: number;
  experts: number;
  topK: number;
  /** attention decode geometry (scaled to H like the FFN) */
  heads: number;
  kvHeads: number;
  headDim: number;
}

export const SHAPES: MoeShape[] = [
  { name: 'mixtral-like', h: 1024, inter: 2816, experts: 8, topK: 2, heads: 8, kvHeads: 2, headDim: 128 },
  { name: 'qwen3moe-like', h: 1024, inter: 256, experts: 64, topK: 8, heads: 16, kvHeads: 2, headDim: 64 },
];

/** Token counts at or below this are decode shapes (bandwidth-bound); above, prefill. */
const DECODE_MAX_TOKENS = 8;

export interface Row {
  model: string;
  tokens: number;
  op: string;
  status: 'ok' | 'skipped';
  note?: string;
  stats?: Stats;
  flops: number;
  bytes: number;
  gflops?: number;
  gbps?: number;
  /** achieved / limit: bandwidth for decode shapes and memory-bound ops, peak FMA for prefill GEMMs */
  limitRatio?: number;
  limitLabel?: string;
  /** median ms of the OpenBLAS loop this row is compared with, and peer / ours (>1: we are faster) */
  peerOp?: string;
  peerMs?: number;
  vsPeer?: number;
  /** relative error of checked output rows against a float64 reference */
  checkRelErr?: number;
}

interface Options {
  json?: string;
  plot?: string;
  reps: number;
  warmup: number;
  device: string;
  tokens: number[];
  models: MoeShape[];
  peer: boolean;
  hot: boolean;
  threads: number;
  ctx: number;
  /** dispatch levels the fast GEMMs also run at, beside 'auto' (e.g. noamx: AMX tiles vs vdpbf16ps) */
  simd: SimdCompare[];
}

const SIMD_COMPARE = ['amx', 'noamx', 'avx512bf16', 'avx512', 'scalar'] as const;
type SimdCompare = (typeof SIMD_COMPARE)[number];

function parseOptions(argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    options: {
      json: { type: 'string' }, plot: { type: 'string' }, reps: { type: 'string' },
      warmup: { type: 'string' }, device: { type: 'string' }, tokens: { type: 'string' },
      models: { type: 'string' }, 'no-peer': { type: 'boolean' }, hot: { type: 'boolean' },
      threads: { type: 'string' }, ctx: { type: 'string' }, simd: { type: 'string' },
    },
    strict: true,
  });
  const device = values.device ?? 'cpu';
  if (device !== 'cpu')
    throw new RangeError(`--device is "${device}", expected "cpu", "cuda" or "cuda:N"`);
  const names = (values.models ?? SHAPES.map((s) => s.name).join(',')).split(',');
  const models = names.map((n) => {
    const s = SHAPES.find((x) => x.name === n.trim());
    if (!s) throw new RangeError(`--models has "${n}", expected some of ${SHAPES.map((x) => x.name).join(', ')}`);
    return s;
  });
  const simd = (values.simd ?? '').split(',').map((v) => v.trim()).filter(Boolean).map((v) => {
    if (!(SIMD_COMPARE as readonly string[]).includes(v))
      throw new RangeError(`--simd has "${v}", expected some of ${SIMD_COMPARE.join(', ')}`);
    return v as SimdCompare;
  });
  return {
    json: values.json,
    plot: values.plot,
    reps: Math.max(1, parsePositiveInt('reps', values.reps, 10)),
    warmup: parsePositiveInt('warmup', values.warmup, 2),
    device,
    tokens: values.tokens ? parseIntList('tokens', values.tokens) : [1, 8, 64, 512],
    models,
    peer: !values['no-peer'],
    hot: values.hot ?? false,
    threads: parsePositiveInt('threads', values.threads, os.availableParallelism()),
    ctx: Math.max(16, parsePositiveInt('ctx', values.ctx, 512)),
    simd,
  };
}

// ---------------------------------------------------------------------------------------------
// Inputs

const prng = mulberry32;

function randomF32(n: number, rand: () => number, scale = 1): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = (rand() * 2 - 1) * scale;
  return a;
}

/** Random bf16 values (upper halves of f32), uniform in [-scale, scale). */
function randomBf16(n: number, rand: () => number, scale: number): Uint16Array {
  const f = randomF32(n, rand, scale);
  const u = new Uint32Array(f.buffer);
  const out = new Uint16Array(n);
  for (let i = 0; i < n; i++) out[i] = u[i]! >>> 16;
  return out;
}

const bf16ToF32 = (() => {
  const u = new Uint32Array(1);
  const f = new Float32Array(u.buffer);
  return (b: number) => {
    u[0] = b << 16;
    return f[0]!;
  };
})();

interface Routing {
  ids: Int32Array;       // [T, k]
  weights: Float32Array; // [T, k]
  counts: Int32Array;    // [E]
  offsets: Int32Array;   // [E + 1]
  logits: Float32Array;  // [T, E]
  source: 'native' | 'js';
}

/** Softmax top-k with renormalisation, ties to the lower id: the fallback when route() is absent. */
function routeJs(logits: Float32Array, t: number, e: number, k: number, ids: Int32Array,
                 weights: Float32Array, counts: Int32Array): void {
  counts.fill(0);
  const order = Array.from({ length: e }, (_, i) => i);
  for (let r = 0; r < t; r++) {
    const row = logits.subarray(r * e, (r + 1) * e);
    order.sort((a, b) => row[b]! - row[a]! || a - b);
    let sum = 0;
    for (let j = 0; j < k; j++) sum += Math.exp(row[order[j]!]! - row[order[0]!]!);
    for (let j = 0; j < k; j++) {
      ids[r * k + j] = order[j]!;
      weights[r * k + j] = Math.exp(row[order[j]!]! - row[order[0]!]!) / sum;
      counts[order[j]!]!++;
    }
  }
}

/** Routes random tokens with route() (JS fallback when the native op is not implemented). */
function routeTokens(native: NativeAddon, shape: MoeShape, t: number, rand: () => number): Routing {
  const { experts: e, topK: k } = shape;
  const logits = randomF32(t * e, rand, 2);
  const ids = new Int32Array(t * k);
  const weights = new Float32Array(t * k);
  const counts = new Int32Array(e);
  let source: Routing['source'] = 'native';
  try {
    native.route(logits, t, e, k, { scoring: 'softmax', renormalize: true }, ids, weights, counts);
  } catch {
    routeJs(logits, t, e, k, ids, weights, counts);
    source = 'js';
  }
  const offsets = new Int32Array(e + 1);
  for (let i = 0; i < e; i++) offsets[i + 1] = offsets[i]! + counts[i]!;
  return { ids, weights, counts, offsets, logits, source };
}

// ---------------------------------------------------------------------------------------------
// Expert weights (random bf16, kept in source form for the output check)

interface ExpertSource {
  gate: Uint16Array; // [I, H] bf16
  up: Uint16Array;   // [I, H] bf16
  down: Uint16Array; // [H, I] bf16
}

interface Layer {
  src: ExpertSource[];
  table?: ExpertTable;        // GroupGemm: gate_up (interleaved) + down per expert
  gateUpPlain?: PackedWeight[]; // DenseGemm: [2I, H] plain, gate rows then up rows
  downPlain?: PackedWeight[];   // [H, I]
  packError?: string;
}

function makeLayer(native: NativeAddon, shape: MoeShape, rand: () => number): Layer {
  const { h, inter, experts } = shape;
  const src: ExpertSource[] = [];
  for (let e = 0; e < experts; e++) {
    src.push({
      gate: randomBf16(inter * h, rand, 1 / Math.sqrt(h)),
      up: randomBf16(inter * h, rand, 1 / Math.sqrt(h)),
      down: randomBf16(h * inter, rand, 1 / Math.sqrt(inter)),
    });
  }
  const layer: Layer = { src };
  try {
    const table = new native.ExpertTable(experts, h, inter);
    for (let e = 0; e < experts; e++) {
      const s = src[e]!;
      table.set(e, native.packGateUp(s.gate, s.up, 'bf16', inter, h), native.packWeight(s.down, 'bf16', h, inter));
    }
    layer.table = table;
  } catch (err) {
    layer.packError = notImplemented(err);
  }
  try {
    layer.gateUpPlain = [];
    layer.downPlain = [];
    for (let e = 0; e < experts; e++) {
      const s = src[e]!;
      const gu = new Uint16Array(2 * inter * h);
      gu.set(s.gate, 0);
      gu.set(s.up, inter * h);
      layer.gateUpPlain.push(native.packWeight(gu, 'bf16', 2 * inter, h));
      layer.downPlain.push(native.packWeight(s.down, 'bf16', h, inter));
    }
  } catch (err) {
    layer.gateUpPlain = undefined;
    layer.downPlain = undefined;
    layer.packError ??= notImplemented(err);
  }
  return layer;
}

function disposeLayer(layer: Layer): void {
  layer.table?.dispose();
  for (const w of [...(layer.gateUpPlain ?? []), ...(layer.downPlain ?? [])]) w.dispose();
}

/** float64 evaluation of one row through expert e; returns max |ref - y| / max |ref|. */
function checkFfnRow(s: ExpertSource, h: number, inter: number, x: Float32Array, y: Float32Array): number {
  const act = new Float64Array(inter);
  for (let i = 0; i < inter; i++) {
    let g = 0;
    let u = 0;
    for (let c = 0; c < h; c++) {
      g += bf16ToF32(s.gate[i * h + c]!) * x[c]!;
      u += bf16ToF32(s.up[i * h + c]!) * x[c]!;
    }
    act[i] = (g / (1 + Math.exp(-g))) * u;
  }
  let err = 0;
  let norm = 0;
  for (let c = 0; c < h; c++) {
    let acc = 0;
    for (let i = 0; i < inter; i++) acc += bf16ToF32(s.down[c * inter + i]!) * act[i]!;
    err = Math.max(err, Math.abs(acc - y[c]!));
    norm = Math.max(norm, Math.abs(acc));
  }
  return Number.isNaN(err) || y.some(Number.isNaN) ? Infinity : err / Math.max(norm, 1e-30);
}

/** Checks the first and last row of the expert with most rows. */
function checkFfn(layer: Layer, shape: MoeShape, routing: Routing, x: Float32Array, y: Float32Array): number {
  const { h, inter } = shape;
  let best = 0;
  for (let e = 1; e < shape.experts; e++) if (routing.counts[e]! > routing.counts[best]!) best = e;
  const rows = [routing.offsets[best]!, routing.offsets[best + 1]! - 1];
  return Math.max(...rows.map((r) =>
    checkFfnRow(layer.src[best]!, h, inter, x.subarray(r * h, (r + 1) * h), y.subarray(r * h, (r + 1) * h))));
}

// ---------------------------------------------------------------------------------------------
// Running ops

/** A short reason for a failed native call: unimplemented ops are expected while kernels land. */
function notImplemented(err: unknown): string {
  const msg = err instanceof Error ? err.message : String(err);
  if (/not implemented/i.test(msg) || (err instanceof TypeError && /is not a (function|constructor)/.test(msg)))
    return 'not implemented in this build';
  return `failed: ${msg}`;
}

interface Context {
  opts: Options;
  limits: MachineLimits;
  flusher: CacheFlusher | null;
  peer: PeerRun | null;
  rows: Row[];
}

interface OpSpec {
  model: string;
  tokens: number;
  op: string;
  flops: number;
  bytes: number;
  /** 'bw' = memory-bound op; 'bf16'/'f32' = GEMM whose prefill bound is that peak rate */
  bound: 'bw' | 'bf16' | 'f32';
  cold: boolean;
  run: () => void;
  check?: () => number;
  peerId?: string;
}

function limitFor(ctx: Context, spec: OpSpec, gflops: number, gbps: number): { ratio: number; label: string } {
  const l = ctx.limits;
  if (spec.bound === 'bw' || spec.tokens <= DECODE_MAX_TOKENS)
    return { ratio: gbps / l.readBandwidthGBps, label: 'bw' };
  if (spec.bound === 'bf16' && l.peakBf16Gflops !== null) return { ratio: gflops / l.peakBf16Gflops, label: 'bf16 peak' };
  return { ratio: gflops / l.peakF32Gflops, label: 'f32 peak' };
}

function runOp(ctx: Context, spec: OpSpec): Row {
  const row: Row = { model: spec.model, tokens: spec.tokens, op: spec.op, status: 'ok', flops: spec.flops, bytes: spec.bytes };
  try {
    const before = spec.cold && ctx.flusher ? () => ctx.flusher!.flush() : undefined;
    const times = measure(spec.run, { warmup: ctx.opts.warmup, reps: ctx.opts.reps, before });
    row.stats = stats(times);
    if (spec.check) row.checkRelErr = spec.check();
  } catch (err) {
    row.status = 'skipped';
    row.note = notImplemented(err);
    return row;
  }
  fillRates(ctx, spec, row);
  const peer = spec.peerId ? ctx.peer?.results.get(spec.peerId) : undefined;
  if (peer?.timesMs?.length) {
    row.peerOp = `openblas ${peer.dtype}`;
    row.peerMs = stats(peer.timesMs).medianMs;
    row.vsPeer = row.peerMs / row.stats!.medianMs;
  }
  return row;
}

function fillRates(ctx: Context, spec: OpSpec, row: Row): void {
  const s = row.stats!.medianMs / 1e3;
  row.gflops = spec.flops / s / 1e9;
  row.gbps = spec.bytes / s / 1e9;
  const lim = limitFor(ctx, spec, row.gflops, row.gbps);
  row.limitRatio = lim.ratio;
  row.limitLabel = lim.label;
}

const skipped = (model: string, tokens: number, op: string, note: string): Row =>
  ({ model, tokens, op, status: 'skipped', note, flops: 0, bytes: 0 });

/** The OpenBLAS loop as rows of its own, so its GFLOP/s sits in the same table. */
function peerRows(ctx: Context, shape: MoeShape, t: number, flops: number, activeWeights: number): Row[] {
  const out: Row[] = [];
  for (const dtype of ['f32', 'bf16'] as const) {
    const op = `openblas loop ${dtype}`;
    if (!ctx.peer) { out.push(skipped(shape.name, t, op, 'peer disabled (--no-peer)')); continue; }
    if (!ctx.peer.info.available) { out.push(skipped(shape.name, t, op, ctx.peer.info.reason ?? 'n/a')); continue; }
    const r = ctx.peer.results.get(peerId(shape, t, dtype));
    if (!r?.timesMs?.length) {
      out.push(skipped(shape.name, t, op, `n/a (${r?.error ?? 'no result'})`));
      continue;
    }
    const bytesPerWeight = dtype === 'f32' ? 4 : 2;
    const spec = { model: shape.name, tokens: t, op, flops, bytes: activeWeights * bytesPerWeight,
      bound: dtype, cold: true, run: () => {} } satisfies OpSpec;
    const row: Row = { model: shape.name, tokens: t, op, status: 'ok', flops, bytes: spec.bytes,
      stats: stats(r.timesMs), checkRelErr: r.checkRelErr };
    fillRates(ctx, spec, row);
    out.push(row);
  }
  return out;
}

const peerId = (shape: MoeShape, t: number, dtype: string) => `${shape.name}/${t}/${dtype}`;

/** The GEMM runs of a shape: fast at 'auto' and at each --simd level, then the reference mode. */
function variants(ctx: Context): { fast: boolean; level: SimdCompare | null }[] {
  return [{ fast: true, level: null }, ...ctx.opts.simd.map((level) => ({ fast: true, level })),
    { fast: false, level: null }];
}

function atLevel<T>(native: NativeAddon, level: SimdCompare | null, fn: () => T): T {
  if (!level) return fn();
  native.setSimdLevel(level);
  try {
    return fn();
  } finally {
    native.setSimdLevel('auto');
  }
}

function benchShape(ctx: Context, native: NativeAddon, shape: MoeShape, routings: Map<number, Routing>): void {
  const { h, inter, experts, topK } = shape;
  const rand = prng(0x5eed + h + experts);
  console.error(`# ${shape.name}: making ${experts} experts of random bf16 weights...`);
  const layer = makeLayer(native, shape, rand);
  const expertParams = 3 * h * inter;
  const fastPeer = ctx.peer?.info.sbgemm ? 'bf16' : 'f32';

  for (const t of ctx.opts.tokens) {
    const routing = routings.get(t)!;
    const rows = t * topK;
    const active = Array.from(routing.counts).filter((c) => c > 0).length;
    const ffnFlops = 2 * rows * expertParams;
    const activeWeights = active * expertParams; // elements; bf16 = 2 bytes each
    const x = randomF32(rows * h, rand);          // [T*k, H] f32, expert-contiguous
    const y = new Float32Array(rows * h);         // [T*k, H] f32
    const base = { model: shape.name, tokens: t, flops: ffnFlops, bytes: activeWeights * 2, cold: !ctx.opts.hot };

    const poisoned = (run: () => void) => () => { y.fill(NaN); run(); return checkFfn(layer, shape, routing, x, y); };

    // GroupGemm: one call over all experts
    for (const { fast, level } of variants(ctx)) {
      const op = `groupGemm ${fast ? 'fast' : 'ref'}${level ? ` [${level}]` : ''}`;
      if (!layer.table) { ctx.rows.push(skipped(shape.name, t, op, layer.packError ?? 'no weights')); continue; }
      const table = layer.table;
      const run = () => native.groupGemmFfn(x, routing.offsets, table, y, fast);
      ctx.rows.push(atLevel(native, level, () => runOp(ctx, { ...base, op, bound: fast ? 'bf16' : 'f32', run,
        check: poisoned(run), peerId: peerId(shape, t, fast ? fastPeer : 'f32') })));
    }

    // DenseGemm: a plain GEMM per expert (the vendor-library shape of the work)
    const gu = new Float32Array(Math.max(...routing.counts, 1) * 2 * inter); // [rows_e, 2I]
    const act = new Float32Array(Math.max(...routing.counts, 1) * inter);    // [rows_e, I]
    for (const { fast, level } of variants(ctx)) {
      const op = `denseGemm loop ${fast ? 'fast' : 'ref'}${level ? ` [${level}]` : ''}`;
      if (!layer.gateUpPlain || !layer.downPlain) {
        ctx.rows.push(skipped(shape.name, t, op, layer.packError ?? 'no weights'));
        continue;
      }
      const gateUp = layer.gateUpPlain;
      const down = layer.downPlain;
      const run = () => {
        for (let e = 0; e < experts; e++) {
          const r0 = routing.offsets[e]!;
          const m = routing.offsets[e + 1]! - r0;
          if (m === 0) continue;
          native.denseGemm(x.subarray(r0 * h, (r0 + m) * h), m, gateUp[e]!, gu, null, false, fast);
          native.siluMul(gu, m, inter, act);
          native.denseGemm(act, m, down[e]!, y.subarray(r0 * h, (r0 + m) * h), null, false, fast);
        }
      };
      ctx.rows.push(atLevel(native, level, () => runOp(ctx, { ...base, op, bound: fast ? 'bf16' : 'f32', run,
        check: poisoned(run), peerId: peerId(shape, t, fast ? fastPeer : 'f32') })));
    }

    ctx.rows.push(...peerRows(ctx, shape, t, ffnFlops, activeWeights));

    // routing: logits [T, E] -> ids, weights, counts
    {
      const ids = new Int32Array(rows);
      const w = new Float32Array(rows);
      const counts = new Int32Array(experts);
      ctx.rows.push(runOp(ctx, {
        model: shape.name, tokens: t, op: 'route', flops: 0, bytes: t * experts * 4 + rows * 8 + experts * 4,
        bound: 'bw', cold: false,
        run: () => native.route(routing.logits, t, experts, topK, { scoring: 'softmax', renormalize: true }, ids, w, counts),
      }));
    }

    // permute + combine: x [T, H] -> xPerm [T*k, H]; yPerm [T*k, H] -> out [T, H]
    {
      const xTok = randomF32(t * h, rand);
      const xPerm = new Float32Array(rows * h);
      const permIndex = new Int32Array(rows);
      const offs = new Int32Array(experts + 1);
      const out = new Float32Array(t * h);
      ctx.rows.push(runOp(ctx, {
        model: shape.name, tokens: t, op: 'permute+combine', flops: 2 * rows * h,
        bytes: 2 * (t + rows) * h * 4, bound: 'bw', cold: false,
        run: () => {
          native.permute(xTok, t, h, routing.ids, topK, experts, xPerm, permIndex, offs);
          native.unpermuteCombine(x, permIndex, routing.weights, t, topK, h, out, false);
        },
      }));
    }

    // rmsNorm with residual: x, residual [T, H]
    {
      const xn = randomF32(t * h, rand);
      const res = randomF32(t * h, rand);
      const w = randomF32(h, rand);
      const out = new Float32Array(t * h);
      ctx.rows.push(runOp(ctx, {
        model: shape.name, tokens: t, op: 'rmsNorm+residual', flops: 4 * t * h,
        bytes: (4 * t * h + h) * 4, bound: 'bw', cold: false,
        run: () => native.rmsNorm(xn, t, h, w, 1e-6, out, res),
      }));
    }

    ctx.rows.push(attentionDecode(ctx, native, shape, t, rand));
  }
  disposeLayer(layer);
}

/** T sequences decoding one token each over ctx cached tokens (paged, block 16). */
function attentionDecode(ctx: Context, native: NativeAddon, shape: MoeShape, t: number, rand: () => number): Row {
  const { heads, kvHeads, headDim: d } = shape;
  const blockSize = 16;
  const ctxLen = ctx.opts.ctx;
  const maxBlocks = Math.ceil(ctxLen / blockSize);
  const op = `attention decode ctx ${ctxLen}`;
  const cacheFloats = t * maxBlocks * blockSize * kvHeads * d;
  const kCache = randomF32(cacheFloats, rand); // [blocks, 16, kvHeads, d] f32
  const vCache = randomF32(cacheFloats, rand); // [blocks, 16, kvHeads, d] f32
  const q = randomF32(t * heads * d, rand);     // [T, heads, d] f32
  const out = new Float32Array(t * heads * d);  // [T, heads, d] f32
  const seqInfo = new Int32Array(t * 3);        // [T, 3] (qStart, qLen, ctxLen)
  const blockTables = new Int32Array(t * maxBlocks);
  for (let s = 0; s < t; s++) {
    seqInfo.set([s, 1, ctxLen], s * 3);
    for (let b = 0; b < maxBlocks; b++) blockTables[s * maxBlocks + b] = s * maxBlocks + b;
  }
  return runOp(ctx, {
    model: shape.name, tokens: t, op,
    flops: t * heads * ctxLen * d * 4,
    bytes: (2 * t * ctxLen * kvHeads * d + 2 * t * heads * d) * 4,
    bound: 'bw', cold: !ctx.opts.hot,
    run: () => native.pagedAttention(q, kCache, vCache, seqInfo, blockTables, {
      numSeqs: t, heads, kvHeads, dk: d, dv: d, blockSize, maxBlocks, scale: 1 / Math.sqrt(d),
    }, out),
  });
}

// ---------------------------------------------------------------------------------------------
// Output

function printTables(rows: Row[], models: MoeShape[]): void {
  const headers = ['T', 'op', 'median ms', 'min-max ms', 'GFLOP/s', 'GB/s', 'of limit', 'OpenBLAS ms', 'vs OpenBLAS', 'check'];
  for (const m of models) {
    console.log(`\n### ${m.name}: H ${m.h}, I ${m.inter}, E ${m.experts}, top-${m.topK}\n`);
    const body: Cell[][] = rows.filter((r) => r.model === m.name).map((r) => r.status !== 'ok'
      ? [r.tokens, r.op, r.note ?? 'skipped', '', '', '', '', '', '', '']
      : [
        r.tokens, r.op, r.stats!.medianMs, `${fmt(r.stats!.minMs)}-${fmt(r.stats!.maxMs)}`,
        r.flops ? r.gflops : null, r.gbps, `${pct(r.limitRatio)} ${r.limitLabel}`,
        r.peerMs ?? null, r.vsPeer !== undefined ? `${fmt(r.vsPeer)}x` : '-',
        r.checkRelErr !== undefined ? r.checkRelErr.toExponential(1) : '-',
      ]);
    console.log(markdownTable(headers, body, ['right', 'left', 'right', 'right', 'right', 'right', 'right', 'right', 'right', 'right']));
  }
}

/** Each fast GEMM at 'auto' against the same op at each --simd level: the level's median / auto's. */
function printSimdRatios(rows: Row[], models: MoeShape[], levels: SimdCompare[], auto: string): void {
  console.log(`\n### fast GEMMs at ${auto} (auto) vs ${levels.join(', ')}: time ratio (> 1: auto is faster), GFLOP/s\n`);
  const body: Cell[][] = [];
  for (const m of models)
    for (const r of rows)
      if (r.model === m.name && r.status === 'ok' && (r.op === 'groupGemm fast' || r.op === 'denseGemm loop fast'))
        for (const level of levels) {
          const o = rows.find((x) => x.model === r.model && x.tokens === r.tokens && x.op === `${r.op} [${level}]` && x.status === 'ok');
          if (!o) continue;
          body.push([m.name, r.tokens, r.op, level, `${fmt(o.stats!.medianMs / r.stats!.medianMs)}x`, r.gflops ?? null, o.gflops ?? null]);
        }
  console.log(markdownTable(['model', 'T', 'op', 'vs', 'time ratio', `GFLOP/s ${auto}`, 'GFLOP/s vs'], body,
    ['left', 'right', 'left', 'left', 'right', 'right', 'right']));
}

/** Per model: each op's GFLOP/s over tokens (min-max over reps as bars), and the measured limit of the fast GroupGemm. */
async function plot(file: string, rows: Row[], models: MoeShape[], tokens: number[]): Promise<void> {
  const ops = ['groupGemm fast', 'groupGemm ref', 'denseGemm loop fast', 'denseGemm loop ref', 'openblas loop f32', 'openblas loop bf16'];
  for (const m of models) {
    const at = (op: string, t: number) => rows.find((r) => r.model === m.name && r.tokens === t && r.op === op && r.status === 'ok' && r.flops > 0);
    const series: Series[] = ops.map((op) => ({
      name: op,
      values: tokens.map((t) => at(op, t)?.gflops ?? null),
      lo: tokens.map((t) => { const r = at(op, t); return r ? r.flops / (r.stats!.maxMs / 1e3) / 1e9 : null; }),
      hi: tokens.map((t) => { const r = at(op, t); return r ? r.flops / (r.stats!.minMs / 1e3) / 1e9 : null; }),
    })).filter((s) => s.values.some((v) => v !== null));
    // The limit a row is judged against (measured read bandwidth x its arithmetic intensity, or the
    // measured peak), as GFLOP/s: its GFLOP/s over its share of the limit.
    series.push({
      name: 'limit of groupGemm fast (measured bandwidth or peak)', dashed: true,
      values: tokens.map((t) => { const r = at('groupGemm fast', t); return r?.gflops && r.limitRatio ? r.gflops / r.limitRatio : null; }),
    });
    const out = models.length > 1 ? file.replace(/(\.png)?$/i, `-${m.name}.png`) : file;
    const w = await writePlot(out, seriesChart({
      title: `Expert FFN ${m.name} (H ${m.h}, I ${m.inter}, E ${m.experts}, top-${m.topK}) vs the machine's measured limit`,
      note: 'median over reps, bars: min-max',
      x: tokens, xTitle: 'tokens per step', yTitle: 'throughput (GFLOP/s)', legendTitle: 'kernel', series, logY: 'auto',
    }));
    console.error(`# wrote ${w.png}, ${w.svg} and ${w.spec}`);
  }
}

/** The --device value of argv, if any (`--device X` or `--device=X`). */
function deviceFlag(argv: string[]): string | undefined {
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--device') return argv[i + 1];
    if (argv[i]!.startsWith('--device=')) return argv[i]!.slice('--device='.length);
  }
  return undefined;
}

export async function runKernels(argv: string[]): Promise<void> {
  if (/^cuda(:|$)/.test(deviceFlag(argv) ?? '')) return runKernelsCuda(argv);
  const opts = parseOptions(argv);
  const native = loadNative();
  native.setNumThreads(opts.threads);
  const caps = native.capabilities();

  console.error(`# probing the machine (${opts.threads} threads)...`);
  const limits = runProbe({ threads: opts.threads });
  const flusher = opts.hot ? null : new CacheFlusher(Math.max(64 << 20, 3 * limits.l3Bytes));

  // Routing first, so that our kernels and the peer see the same rows per expert.
  const routings = new Map<string, Map<number, Routing>>();
  for (const shape of opts.models) {
    const rand = prng(0x12345 + shape.experts);
    routings.set(shape.name, new Map(opts.tokens.map((t) => [t, routeTokens(native, shape, t, rand)])));
  }
  const routingSource = [...routings.values()][0]?.values().next().value?.source ?? 'native';

  let peer: PeerRun | null = null;
  if (opts.peer) {
    console.error('# running the OpenBLAS peer...');
    const cases: PeerCase[] = [];
    for (const shape of opts.models)
      for (const t of opts.tokens)
        for (const dtype of ['f32', 'bf16'] as const)
          cases.push({ id: peerId(shape, t, dtype), dtype, h: shape.h, inter: shape.inter,
            counts: routings.get(shape.name)!.get(t)!.counts, reps: opts.reps, warmup: opts.warmup,
            flushBytes: flusher?.bytes ?? 0 });
    peer = runOpenBlasPeer(cases, opts.threads);
  }

  const ctx: Context = { opts, limits, flusher, peer, rows: [] };
  for (const shape of opts.models) benchShape(ctx, native, shape, routings.get(shape.name)!);

  console.log(`## kernels (${opts.device}, ${caps.simd}, ${opts.threads} threads, median of ${opts.reps} after ${opts.warmup} warm-up)\n`);
  console.log(`Machine: ${limits.cpuModel}, ${limits.threads} threads, L3 ${(limits.l3Bytes / 2 ** 20).toFixed(0)} MiB; ` +
    `read bandwidth ${fmt(limits.readBandwidthGBps)} GB/s; peak f32 FMA (${limits.f32Isa}) ${fmt(limits.peakF32Gflops)} GFLOP/s; ` +
    `peak bf16 dot ${limits.peakBf16Gflops === null ? 'n/a' : `${fmt(limits.peakBf16Gflops)} GFLOP/s`}` +
    `${caps.amxTiles ? ' (vdpbf16ps; the fast GEMMs run on AMX tiles, which can pass it)' : ''}.`);
  if (peer) {
    const i = peer.info;
    console.log(i.available
      ? `Peer: ${i.config} (${i.library}), core ${i.corename}, ${i.threads} threads, sbgemm ${i.sbgemm ? 'yes' : 'no'}` +
        `${Object.keys(i.unsetEnv).length ? `; unset for the peer: ${Object.entries(i.unsetEnv).map(([k, v]) => `${k}=${v}`).join(' ')}` : ''}.`
      : `Peer: ${i.reason} (${i.error ?? ''}).`);
  }
  console.log(`Routing of random tokens: ${routingSource === 'js' ? 'JS fallback (native route() not implemented in this build)' : 'native route()'}; ` +
    `weights flushed from the caches before each timed run: ${flusher ? 'yes' : 'no (--hot)'}; ` +
    `load average at start ${os.loadavg().map((v) => v.toFixed(1)).join(' ')}.`);
  printTables(ctx.rows, opts.models);
  if (opts.simd.length) printSimdRatios(ctx.rows, opts.models, opts.simd, caps.simd);

  if (opts.json)
    writeJson(opts.json, {
      bench: 'kernels', run: runInfo(), options: { ...opts, models: opts.models.map((m) => m.name) },
      capabilities: caps, limits, peer: peer?.info ?? null, routingSource,
      loads: Object.fromEntries([...routings].map(([name, m]) => [name, Object.fromEntries([...m].map(([t, r]) => [t, Array.from(r.counts)]))])),
      rows: ctx.rows,
    });
  if (opts.plot) await plot(opts.plot, ctx.rows, opts.models, opts.tokens);
}
