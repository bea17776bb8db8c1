// `npm run bench -- e2e`: whole-model speed on the bench checkpoints in fast (bf16) mode:
// prefill 512 tokens, greedy decode at batch 1 and 8, against the weights-read bandwidth bound
// (bytes each decode step really reads, from its routing, over the probed bandwidth) and against
// HF transformers bf16 on the CPU with the same checkpoint, workloads and thread count.
//
// The model is driven directly (MoeModel.forward over a paged KV cache, no scheduler or worker):
// each step's routing is needed for the bound, and engine overheads are the serve bench's subject.
import os from 'node:os';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';

import type { LayerCache } from '../src/model/attention.js';
import type { ForwardBatch, ForwardResult } from '../src/model/forward-batch.js';
import { countParams, loadModel, type LoadedModel } from '../src/model/load.js';
import { kvDtypeBytes, resolveKvDtype, type KvDtype } from '../src/model/kv-dtype.js';
import type { MoeModel } from '../src/model/model.js';
import { quantizedBytes } from '../src/model/quantize.js';
import type { ModelSpec } from '../src/model/spec.js';
import { loadNative } from '../src/native/index.js';
import { BENCH_MODEL_NAMES, ensureBenchModel, type BenchModelName } from './bench-models.js';
import { seriesChart, type Series } from '../src/plot/charts.js';
import { writePlot } from '../src/plot/render.js';
import { fmt, markdownTable, median, parseIntList, parsePositiveInt, pct, runInfo, writeJson, type Cell } from './harness.js';
import { OpProfiler } from './op-profile.js';
import { FORMATS, runQuantBench } from './quant.js';
import { HfPeer, hfPython, type HfDecodeRun, type HfInfo } from './peers/hf.js';
import { runProbe, type MachineLimits } from './probe/probe.js';

const BLOCK_SIZE = 16;

interface Seq { blocks: number[]; len: number; slot: number }

/** What the bench headers say about the KV cache (Runner's default in the fast mode). */
export const KV_NOTE = 'KV cache bf16 (the daemon\'s --kv-cache-dtype auto)';

/**
 * A minimal paged-KV driver: contiguous block hand-out, reset between repetitions. Hybrid models
 * (linear-attention layers) get a state slot per sequence, in order, out of `maxSeqs`.
 */
export class Runner {
  readonly cache: LayerCache[];
  private next = 0;
  private nextSlot = 0;
  /**
   * kvDtype: the daemon's default unless given (`--kv-cache-dtype auto`: bf16 in the fast mode,
   * f32 in the reference mode), so a bench step reads the cache a served step reads.
   */
  constructor(readonly model: MoeModel, readonly numBlocks: number, readonly maxSeqs = 64,
              readonly kvDtype: KvDtype = resolveKvDtype('auto', model.fast ? 'bf16' : 'f32')) {
    this.cache = model.allocateKvCache(numBlocks, BLOCK_SIZE, kvDtype);
    if (model.numLinearLayers > 0) model.allocateStateCache(maxSeqs);
  }
  reset(): void {
    this.next = 0;
    this.nextSlot = 0;
  }
  newSeq(): Seq {
    if (this.nextSlot >= this.maxSeqs) throw new Error('e2e runner: out of state slots');
    return { blocks: [], len: 0, slot: this.nextSlot++ };
  }
  /** One step; chunks[i] are seqs[i]'s new tokens; logits of each chunk's last token. */
  step(seqs: Seq[], chunks: number[][]): ForwardResult {
    const T = chunks.reduce((a, c) => a + c.length, 0);
    const tokenIds = new Int32Array(T);
    const positions = new Int32Array(T);
    const slots = new Int32Array(T);
    const seqInfo = new Int32Array(seqs.length * 3);
    const logitRows = new Int32Array(seqs.length);
    let row = 0;
    seqs.forEach((seq, s) => {
      const start = row;
      for (const id of chunks[s]!) {
        const pos = seq.len++;
        while (seq.blocks.length * BLOCK_SIZE <= pos) {
          if (this.next >= this.numBlocks) throw new Error('e2e runner: out of KV blocks');
          seq.blocks.push(this.next++);
        }
        tokenIds[row] = id;
        positions[row] = pos;
        slots[row] = seq.blocks[Math.floor(pos / BLOCK_SIZE)]! * BLOCK_SIZE + (pos % BLOCK_SIZE);
        row++;
      }
      seqInfo.set([start, chunks[s]!.length, seq.len], s * 3);
      logitRows[s] = row - 1;
    });
    const maxBlocks = Math.max(1, ...seqs.map((s) => s.blocks.length));
    const blockTables = new Int32Array(seqs.length * maxBlocks);
    seqs.forEach((s, i) => blockTables.set(s.blocks, i * maxBlocks));
    // A sequence starting at position 0 starts from a zero state (the model resets its slot).
    const stateSlots = Int32Array.from(seqs, (s) => s.slot);
    const batch: ForwardBatch = {
      tokenIds, positions, numSeqs: seqs.length, seqInfo, blockTables, maxBlocks, slots, logitRows, stateSlots,
    };
    return this.model.forward(batch, this.cache, BLOCK_SIZE);
  }
}

export function argmaxRows(logits: Float32Array, rows: number, V: number): number[] {
  const out: number[] = [];
  for (let r = 0; r < rows; r++) {
    let best = 0;
    let bv = -Infinity;
    for (let i = 0; i < V; i++) {
      const v = logits[r * V + i]!;
      if (v > bv) { bv = v; best = i; }
    }
    if (!Number.isFinite(bv)) throw new Error(`e2e: non-finite logits in row ${r}`);
    out.push(best);
  }
  return out;
}

/** Deterministic prompt token ids in [100, 30100) (no special tokens). */
export function promptIds(seed: number, n: number): number[] {
  let a = (seed * 2654435761) >>> 0 || 1;
  return Array.from({ length: n }, () => {
    a ^= a << 13; a ^= a >>> 17; a ^= a << 5; a >>>= 0;
    return 100 + (a % 30000);
  });
}

/**
 * Bytes one decode step reads: dense weights (attention or Gated DeltaNet projections, router, shared
 * expert and its gate, norms, LM head), the experts its routing chose, the KV cache of the full-attention
 * layers, and each sequence's linear-attention state (f32 recurrent [Hv, Dk, Dv] and conv [C, K-1], read
 * and written back, as the engine stores them).
 */
export class DecodeBytes {
  /** Bytes every step reads whatever the routing (set lower by quant.ts for --quantize-dense and --quantize-lm-head). */
  denseBytes: number;
  expertBytes: number;
  /** Linear-attention state bytes per sequence per step over all linear layers (read + write). */
  readonly stateBytesPerSeq: number;
  private readonly kvBytesPerTokenLayer: number;
  private readonly attentionLayers: number;
  constructor(private readonly spec: ModelSpec, kvDtype: KvDtype) {
    const H = spec.hidden;
    const a = spec.attention;
    if (a.kind !== 'gqa') throw new Error('e2e: the bound is written for GQA models');
    // bf16 q (with Qwen3-Next's output gate: twice the rows), k, v, o
    const attn = (a.outputGate ? 3 : 2) * H * a.heads * a.headDim * 2 + 2 * H * a.kvHeads * a.headDim * 2;
    const norms = 2 * H * 4 + (a.qkNorm !== 'none' ? 2 * a.headDim * 4 : 0);
    const m = spec.moe;
    const moe = m.numExperts * H * 2 + 3 * H * m.sharedIntermediate * 2 + (m.sharedGate ? H * 2 : 0);
    let linear = 0;
    let state = 0;
    const la = spec.linearAttention;
    if (la) {
      const Kd = la.keyHeads * la.keyHeadDim;
      const Vd = la.valueHeads * la.valueHeadDim;
      const C = 2 * Kd + Vd;
      // in_proj [q | k | v | z | b | a] and out_proj in bf16; the conv weight [C, K] f32; the gated norm f32.
      linear = (2 * Kd + 2 * Vd + 2 * la.valueHeads) * H * 2 + H * Vd * 2 + C * la.convKernel * 4 + la.valueHeadDim * 4 + 2 * H * 4;
      state = 2 * 4 * (la.valueHeads * la.keyHeadDim * la.valueHeadDim + C * (la.convKernel - 1));
    }
    let dense = 0;
    let stateBytes = 0;
    this.attentionLayers = 0;
    for (const l of spec.layers) {
      if (l.mixer === 'linear_attention') {
        dense += linear;
        stateBytes += state;
      } else {
        dense += attn + norms;
        this.attentionLayers++;
      }
      dense += l.ffn === 'moe' ? moe : 3 * H * spec.denseIntermediate * 2;
    }
    this.denseBytes = dense + spec.vocabSize * H * 2 + H * 4;
    this.stateBytesPerSeq = stateBytes;
    this.expertBytes = 3 * H * m.intermediate * 2;
    this.kvBytesPerTokenLayer = 2 * a.kvHeads * a.headDim * kvDtypeBytes(kvDtype);  // K and V
  }
  /** routedIds per MoE layer [B, k]; ctxLens = each sequence's tokens in cache after the step. */
  step(routedIds: Int32Array[], ctxLens: number[], batch: number): { bytes: number; experts: number } {
    let experts = 0;
    for (const ids of routedIds) experts += new Set(ids).size;
    const kv = ctxLens.reduce((a, c) => a + c, 0) * this.kvBytesPerTokenLayer * this.attentionLayers;
    const embedRows = batch * this.spec.hidden * 2;
    return { bytes: this.denseBytes + experts * this.expertBytes + kv + embedRows + batch * this.stateBytesPerSeq, experts };
  }
}

interface DecodeRep {
  stepMs: number[];
  tokPerS: number;
  boundTokPerS: number;
  bytesPerStep: number;
  expertsPerStep: number;
  tokens: number[];
}

/** The peer's side of a model's run: figures, or why there are none. */
interface HfSide {
  info: HfInfo | null;
  reason?: string;
  prefillS: number[];
  decode: Record<string, HfDecodeRun[]>;
}

interface ModelResult {
  model: BenchModelName;
  dir: string;
  params: { total: number; active: number };
  loadMs: number;
  limits: MachineLimits;
  /** Read bandwidth of every probe of this model's run (before, and after each decode workload). */
  bandwidthSamplesGBps: number[];
  /** The bound's bandwidth: the best probe of the run (the machine's capability, conservative). */
  bandwidthGBps: number;
  /** 1-minute load average before each of our repetitions (warm-ups included). */
  loadAverages: number[];
  prefillMs: number[];
  decode: Record<string, DecodeRep[]>;
  hf: HfSide | null;
}

interface Options {
  reps: number;
  warmup: number;
  prefill: number;
  decodePrompt: number;
  steps: number;
  batches: number[];
  threads: number;
  python: string | null;
}

/**
 * Runs one model's workloads. NOTE: our repetitions and the peer's alternate (ours, HF, ours,
 * HF, ...), so on a shared machine both sample the same load and the ratio stays meaningful.
 */
async function measureModel(name: BenchModelName, o: Options): Promise<ModelResult> {
  const dir = ensureBenchModel(name, (s) => console.error(s));
  const n = loadNative();
  n.setNumThreads(o.threads);
  const threads = o.threads || os.availableParallelism();
  let peer: HfPeer | null = null;
  let hf: HfSide | null = null;
  if (o.python) {
    console.error(`# ${name}: starting the HF transformers peer (${o.python})...`);
    try {
      peer = await HfPeer.start(o.python, dir, threads);
      hf = { info: peer.info, prefillS: [], decode: {} };
    } catch (e) {
      hf = { info: null, reason: (e as Error).message, prefillS: [], decode: {} };
      console.error(`# ${name}: HF peer unavailable: ${hf.reason}`);
    }
  }
  console.error(`# ${name}: probing the machine (same run)...`);
  const limits = runProbe({ threads: o.threads || undefined });
  console.error(`# ${name}: read bandwidth ${fmt(limits.readBandwidthGBps)} GB/s; loading ${dir} (bf16 fast mode)...`);
  const loaded: LoadedModel = loadModel(dir, { fast: true });
  const { model, spec } = loaded;
  const V = spec.vocabSize;
  const maxB = Math.max(...o.batches);
  const perSeqBlocks = Math.ceil((o.decodePrompt + o.steps + 2) / BLOCK_SIZE);
  const runner = new Runner(model, Math.max(Math.ceil((o.prefill + 1) / BLOCK_SIZE), maxB * perSeqBlocks));
  const bytes = new DecodeBytes(spec, runner.kvDtype);
  const res: ModelResult = {
    model: name, dir, params: countParams(spec), loadMs: loaded.loadMs, limits,
    bandwidthSamplesGBps: [limits.readBandwidthGBps], bandwidthGBps: NaN, loadAverages: [],
    prefillMs: [], decode: {}, hf,
  };
  const tag = (r: number) => (r < o.warmup ? ' (warm-up)' : '');
  try {
    const prefillPrompt = promptIds(1, o.prefill);
    for (let r = 0; r < o.warmup + o.reps; r++) {
      res.loadAverages.push(os.loadavg()[0]!);
      runner.reset();
      const seq = runner.newSeq();
      const t0 = performance.now();
      const out = runner.step([seq], [prefillPrompt]);
      argmaxRows(out.logits, 1, V);
      const ms = performance.now() - t0;
      console.error(`# ${name}: prefill ${o.prefill} tokens ${ms.toFixed(0)} ms${tag(r)}`);
      if (r >= o.warmup) res.prefillMs.push(ms);
      if (peer && hf) {
        const sec = await peer.prefill(prefillPrompt);
        console.error(`# ${name}: HF prefill ${o.prefill} tokens ${(sec * 1e3).toFixed(0)} ms${tag(r)}`);
        if (r >= o.warmup) hf.prefillS.push(sec);
      }
    }
    for (const B of o.batches) {
      const prompts = Array.from({ length: B }, (_, i) => promptIds(100 + i, o.decodePrompt));
      const reps: DecodeRep[] = [];
      const hfRuns: HfDecodeRun[] = [];
      for (let r = 0; r < o.warmup + o.reps; r++) {
        res.loadAverages.push(os.loadavg()[0]!);
        runner.reset();
        const seqs = prompts.map(() => runner.newSeq());
        let next = argmaxRows(runner.step(seqs, prompts).logits, B, V);
        const tokens = [next[0]!];
        const stepMs: number[] = [];
        let bytesSum = 0;
        let expertsSum = 0;
        for (let s = 0; s < o.steps; s++) {
          const t0 = performance.now();
          const out = runner.step(seqs, next.map((t) => [t]));
          next = argmaxRows(out.logits, B, V);
          stepMs.push(performance.now() - t0);
          tokens.push(next[0]!);
          const b = bytes.step(out.routedIds, seqs.map((q) => q.len), B);
          bytesSum += b.bytes;
          expertsSum += b.experts;
        }
        const totalS = stepMs.reduce((a, b) => a + b, 0) / 1e3;
        const rep: DecodeRep = {
          stepMs, tokPerS: (B * o.steps) / totalS, boundTokPerS: NaN,
          bytesPerStep: bytesSum / o.steps, expertsPerStep: expertsSum / o.steps, tokens,
        };
        console.error(`# ${name}: decode batch ${B}: ${fmt(rep.tokPerS)} tok/s, median step ${fmt(median(stepMs))} ms, ` +
          `${fmt(rep.bytesPerStep / 1e6)} MB/step${tag(r)}`);
        if (r >= o.warmup) reps.push(rep);
        if (peer) {
          const run = await peer.decode(prompts, o.steps);
          console.error(`# ${name}: HF decode batch ${B}: median step ${fmt(median(run.stepS) * 1e3)} ms${tag(r)}`);
          if (r >= o.warmup) hfRuns.push(run);
        }
      }
      res.decode[String(B)] = reps;
      if (hf && peer) hf.decode[String(B)] = hfRuns;
      // Probe again: on a shared machine the bandwidth moves; the bound uses the best probe.
      const bw = runProbe({ threads: o.threads || undefined }).readBandwidthGBps;
      console.error(`# ${name}: read bandwidth ${fmt(bw)} GB/s`);
      res.bandwidthSamplesGBps.push(bw);
    }
    res.bandwidthGBps = Math.max(...res.bandwidthSamplesGBps);
    // Bound: B tokens per step, a step no faster than reading its bytes at the best bandwidth.
    for (const [B, reps] of Object.entries(res.decode))
      for (const rep of reps) rep.boundTokPerS = Number(B) / (rep.bytesPerStep / (res.bandwidthGBps * 1e9));
  } finally {
    model.dispose();
    await peer?.close();
  }
  return res;
}

/**
 * `--profile`: per-op time shares of prefill and decode (ops wrapped with timers; no peer), with
 * `--formats` in each quantize format of the quant bench.
 */
function profileModel(name: BenchModelName, o: Options, format = 'bf16'): void {
  const dir = ensureBenchModel(name, (s) => console.error(s));
  const n = loadNative();
  n.setNumThreads(o.threads);
  const limits = runProbe({ threads: o.threads || undefined });
  const quantize = FORMATS[format] ?? undefined;
  const { model, spec } = loadModel(dir, quantize ? { fast: true, quantize } : { fast: true });
  // One routed expert's gate_up and down as the table holds them (packed bytes in the format).
  const H = spec.hidden, I = spec.moe.intermediate;
  const oneExpert = quantize ? quantizedBytes(quantize, 2 * I, H, true) + quantizedBytes(quantize, H, I, false) : 3 * H * I * 2;
  const prof = new OpProfiler(n, (E) => (E === spec.moe.numExperts ? oneExpert : NaN));
  prof.install();
  const V = spec.vocabSize;
  const maxB = Math.max(...o.batches);
  const runner = new Runner(model, Math.max(Math.ceil((o.prefill + 1) / BLOCK_SIZE),
    maxB * Math.ceil((o.decodePrompt + o.steps + 2) / BLOCK_SIZE)));
  const region = (steps: number, f: () => void): void => {
    prof.reset();
    prof.enabled = true;
    const t0 = performance.now();
    f();
    prof.regionMs = performance.now() - t0;
    prof.enabled = false;
    console.log(prof.table(steps, limits.readBandwidthGBps));
  };
  try {
    console.log(`\n### ${name}: per-op profile (${format === 'bf16' ? 'bf16' : `--quantize ${format},`} fast mode; read bandwidth ${fmt(limits.readBandwidthGBps)} GB/s, ` +
      `load avg ${load(os.loadavg())})\n`);
    const prompt = promptIds(1, o.prefill);
    runner.reset();
    runner.step([runner.newSeq()], [prompt]); // warm-up
    console.log(`#### prefill ${o.prefill}\n`);
    region(1, () => {
      runner.reset();
      argmaxRows(runner.step([runner.newSeq()], [prompt]).logits, 1, V);
    });
    for (const B of o.batches) {
      runner.reset();
      const prompts = Array.from({ length: B }, (_, i) => promptIds(100 + i, o.decodePrompt));
      const seqs = prompts.map(() => runner.newSeq());
      let next = argmaxRows(runner.step(seqs, prompts).logits, B, V);
      next = argmaxRows(runner.step(seqs, next.map((t) => [t])).logits, B, V); // warm-up step
      console.log(`\n#### decode batch ${B} (${o.steps} steps)\n`);
      region(o.steps, () => {
        for (let s = 0; s < o.steps; s++) next = argmaxRows(runner.step(seqs, next.map((t) => [t])).logits, B, V);
      });
    }
  } finally {
    prof.uninstall();
    model.dispose();
  }
}

const load = (l: number[]): string => l.map((v) => v.toFixed(1)).join(' ');
const range = (v: number[]): string => `${fmt(Math.min(...v))}-${fmt(Math.max(...v))}`;

interface Verdict { model: string; target: string; value: number | null; need: number; pass: boolean | null }

function report(results: ModelResult[], o: Options): { table: string; verdicts: Verdict[] } {
  const rows: Cell[][] = [];
  const verdicts: Verdict[] = [];
  for (const r of results) {
    const hfPrefill = r.hf?.prefillS.length ? r.hf.prefillS.map((s) => o.prefill / s) : null;
    const ours = r.prefillMs.map((ms) => o.prefill / (ms / 1e3));
    const vsHf = hfPrefill ? median(ours) / median(hfPrefill) : null;
    rows.push([r.model, `prefill ${o.prefill}`, `TTFT ${fmt(median(r.prefillMs))}`, median(ours), range(ours), '-', '-',
      hfPrefill ? median(hfPrefill) : null, hfPrefill ? range(hfPrefill) : '-', vsHf === null ? '-' : `${fmt(vsHf)}x`]);
    verdicts.push({ model: r.model, target: `prefill ${o.prefill} >= 1.5x HF bf16`, value: vsHf, need: 1.5,
      pass: vsHf === null ? null : vsHf >= 1.5 });
    for (const [B, reps] of Object.entries(r.decode)) {
      const tps = reps.map((x) => x.tokPerS);
      const bound = median(reps.map((x) => x.boundTokPerS));
      const itl = median(reps.flatMap((x) => x.stepMs));
      const hfRuns = r.hf?.decode[B]?.length ? r.hf.decode[B]! : null;
      const hfTps = hfRuns ? hfRuns.map((x) => (Number(B) * x.stepS.length) / x.stepS.reduce((a, b) => a + b, 0)) : null;
      const ofBound = median(tps) / bound;
      const vs = hfTps ? median(tps) / median(hfTps) : null;
      rows.push([r.model, `decode b${B}`, `ITL ${fmt(itl)}`, median(tps), range(tps), bound, pct(ofBound),
        hfTps ? median(hfTps) : null, hfTps ? range(hfTps) : '-', vs === null ? '-' : `${fmt(vs)}x`]);
      if (B === '1') verdicts.push({ model: r.model, target: 'decode b1 >= 75% of the bandwidth bound', value: ofBound, need: 0.75, pass: ofBound >= 0.75 });
      if (B === '8') verdicts.push({ model: r.model, target: 'decode b8 >= 1.5x HF bf16', value: vs, need: 1.5, pass: vs === null ? null : vs >= 1.5 });
    }
  }
  const table = markdownTable(
    ['model', 'workload', 'ms (median)', 'expertd tok/s', 'min-max', 'bw bound tok/s', 'of bound', 'HF bf16 tok/s', 'HF min-max', 'vs HF'],
    rows, ['left', 'left', 'right', 'right', 'right', 'right', 'right', 'right', 'right', 'right']);
  return { table, verdicts };
}

/** Per model: tokens/s of each phase (prefill, decode per batch) for expertd, the HF peer and the bandwidth bound. */
async function plot(file: string, results: ModelResult[], o: Options): Promise<void> {
  for (const r of results) {
    const x = [`prefill ${o.prefill}`, ...Object.keys(r.decode).map((B) => `decode b${B}`)];
    const ours = [r.prefillMs.map((ms) => o.prefill / (ms / 1e3)), ...Object.values(r.decode).map((reps) => reps.map((d) => d.tokPerS))];
    const hf = [r.hf?.prefillS.length ? r.hf.prefillS.map((sec) => o.prefill / sec) : null,
      ...Object.keys(r.decode).map((B) => {
        const runs = r.hf?.decode[B];
        return runs?.length ? runs.map((h) => (Number(B) * h.stepS.length) / h.stepS.reduce((a, b) => a + b, 0)) : null;
      })];
    const side = (name: string, v: (number[] | null)[]): Series => ({
      name, values: v.map((xs) => (xs ? median(xs) : null)), lo: v.map((xs) => (xs ? Math.min(...xs) : null)), hi: v.map((xs) => (xs ? Math.max(...xs) : null)),
    });
    const series: Series[] = [side('expertd (bf16)', ours)];
    if (hf.some((v) => v !== null)) series.push(side(`HF transformers bf16${r.hf?.info ? ` (torch ${r.hf.info.torch})` : ''}`, hf));
    series.push({ name: 'bandwidth bound (measured, decode)', values: [null, ...Object.values(r.decode).map((reps) => median(reps.map((d) => d.boundTokPerS)))] });
    const out = results.length > 1 ? file.replace(/(\.png)?$/i, `-${r.model}.png`) : file;
    const w = await writePlot(out, seriesChart({
      title: `${r.model}: tokens/s per phase, expertd beside its peers`,
      note: `${o.reps} reps, bars: median, whiskers: min-max; ${o.threads || os.availableParallelism()} threads; read bandwidth ${fmt(r.bandwidthGBps)} GB/s`,
      kind: 'bar', x, xTitle: 'phase (prompt tokens / decode batch)', yTitle: 'throughput (tokens/s)', legendTitle: 'engine', series,
    }));
    console.error(`# wrote ${w.png}, ${w.svg} and ${w.spec}`);
  }
}

export async function runE2e(argv: string[]): Promise<void> {
  // `e2e --formats bf16,int8,...`: the quantized formats in one run (quant.ts), beside llama.cpp.
  const profiling = argv.includes('--profile');
  if (!profiling && argv.some((a) => a === '--formats' || a.startsWith('--formats='))) return runQuantBench(argv);
  const { values } = parseArgs({
    args: argv,
    options: {
      json: { type: 'string' }, plot: { type: 'string' }, reps: { type: 'string' }, warmup: { type: 'string' }, python: { type: 'string' },
      'no-peer': { type: 'boolean' }, profile: { type: 'boolean' }, models: { type: 'string' }, threads: { type: 'string' },
      prefill: { type: 'string' }, 'decode-prompt': { type: 'string' }, steps: { type: 'string' }, batches: { type: 'string' },
      formats: { type: 'string' },
    },
    strict: true,
  });
  const models = (values.models?.split(',') ?? BENCH_MODEL_NAMES) as BenchModelName[];
  for (const m of models)
    if (!BENCH_MODEL_NAMES.includes(m)) throw new RangeError(`--models has "${m}", expected some of ${BENCH_MODEL_NAMES.join(', ')}`);
  const o: Options = {
    reps: Math.max(1, parsePositiveInt('reps', values.reps, 3)),
    warmup: parsePositiveInt('warmup', values.warmup, 1),
    prefill: Math.max(1, parsePositiveInt('prefill', values.prefill, 512)),
    decodePrompt: Math.max(1, parsePositiveInt('decode-prompt', values['decode-prompt'], 128)),
    steps: Math.max(1, parsePositiveInt('steps', values.steps, 32)),
    batches: values.batches ? parseIntList('batches', values.batches) : [1, 8],
    threads: parsePositiveInt('threads', values.threads, 0),
    python: values['no-peer'] ? null : hfPython(values.python),
  };
  if (values.profile) {
    const formats = values.formats?.split(',') ?? ['bf16'];
    for (const f of formats) if (!(f in FORMATS)) throw new RangeError(`--formats has "${f}", expected some of ${Object.keys(FORMATS).join(', ')}`);
    for (const m of models) for (const f of formats) profileModel(m, o, f);
    return;
  }
  const info = runInfo();
  const results: ModelResult[] = [];
  for (const m of models) results.push(await measureModel(m, o));
  const { table, verdicts } = report(results, o);

  console.log(`## e2e: whole model, fast (bf16) mode, ${KV_NOTE}, ${os.cpus()[0]?.model ?? 'cpu'}, ` +
    `${o.threads || os.availableParallelism()} threads\n`);
  console.log(`Prefill: one prompt of ${o.prefill} tokens in one step (TTFT = forward + greedy pick). Decode: ` +
    `batch B of ${o.decodePrompt}-token prompts prefilled untimed, then ${o.steps} greedy steps (ITL = one step). ` +
    `${o.reps} reps after ${o.warmup} warm-up; tok/s median and min-max over reps.\n`);
  for (const r of results) {
    const hf = r.hf;
    console.log(`- ${r.model}: ${(r.params.total / 1e6).toFixed(0)}M params, ${(r.params.active / 1e6).toFixed(0)}M active ` +
      `(incl. embedding + LM head); read bandwidth ${fmt(r.bandwidthGBps)} GB/s (best of probes ` +
      `${r.bandwidthSamplesGBps.map((v) => fmt(v)).join(', ')} GB/s in the same run); ` +
      `1-min load avg ${fmt(Math.min(...r.loadAverages))}-${fmt(Math.max(...r.loadAverages))} over the reps` +
      (hf ? `; HF peer: ${hf.info ? `torch ${hf.info.torch}, transformers ${hf.info.transformers}, ${hf.info.threads} threads, ` +
        `experts ${hf.info.expertsImplementation ?? 'default'}, attention ${hf.info.attnImplementation ?? 'default'}, ` +
        'reps interleaved with ours' : `n/a (${hf.reason})`}` : '; HF peer: skipped (--no-peer)'));
    for (const [B, reps] of Object.entries(r.decode)) {
      const x = reps[0]!;
      console.log(`  - decode b${B}: ${fmt(x.bytesPerStep / 1e6)} MB read per step (${fmt(x.expertsPerStep)} distinct expert FFNs over all layers, median ITL ${fmt(median(x.stepMs))} ms)`);
    }
    const hfTok = hf?.decode['1']?.[0]?.tokens;
    const ours = r.decode['1']?.[0]?.tokens;
    if (hfTok && ours) {
      let same = 0;
      while (same < Math.min(hfTok.length, ours.length) && hfTok[same] === ours[same]) same++;
      console.log(`  - greedy decode b1 vs HF: first ${same} of ${ours.length} tokens identical`);
    }
  }
  console.log(`\n${table}\n`);
  console.log('Targets:\n');
  for (const v of verdicts) {
    const val = v.value === null ? 'n/a' : v.need < 1 ? pct(v.value) : `${fmt(v.value)}x`;
    console.log(`- ${v.model}: ${v.target}: ${val} -> ${v.pass === null ? 'NOT MEASURED' : v.pass ? 'PASS' : 'FAIL'}`);
  }
  if (values.json) {
    let capabilities: unknown = null;
    try { capabilities = loadNative().capabilities(); } catch { /* not built */ }
    writeJson(values.json, { bench: 'e2e', run: info, loadAverageEnd: os.loadavg(), capabilities, options: o, results, verdicts });
  }
  if (values.plot) await plot(values.plot, results, o);
}
