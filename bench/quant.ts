// `npm run bench -- quant`: the quantized-expert formats on the bench checkpoints, in one run:
// prefill, decode batch 1 and 8 tokens/s for bf16 (the checkpoint's experts) and --quantize int8,
// fp8 and int4 (-dense: with --quantize-dense; -full: with --quantize-dense --quantize-lm-head), each
// against its own weights-read bound (the bytes each decode step really reads in that format, over
// the run's best read rate: probe or decode; and over the read-bandwidth probes taken just before and
// after each decode rep, since a VM's bandwidth can move by half between seconds), and the bytes the
// experts hold.
//
// Beside them, llama.cpp (node-llama-cpp's prebuilt CPU build) on the same checkpoint as GGUF Q8_0 and
// Q4_K_M made by llama.cpp's own quantizer (bench/peers/llama.ts); `--no-peer` leaves it out.
//
// Every format's model is loaded at once and the repetitions go round-robin over the formats, so
// on a shared machine every format samples the same load and the ratios between them hold.
import os from 'node:os';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';

import { loadModel, type LoadedModel } from '../src/model/load.js';
import { describeQuantize, quantizeSpec, quantizedBytes, type QuantizeSpec } from '../src/model/quantize.js';
import type { ModelSpec } from '../src/model/spec.js';
import { loadNative } from '../src/native/index.js';
import { BENCH_MODEL_NAMES, ensureBenchModel, type BenchModelName } from './bench-models.js';
import { DecodeBytes, KV_NOTE, Runner, argmaxRows, promptIds } from './e2e.js';
import { fmt, markdownTable, median, parseIntList, parsePositiveInt, pct, runInfo, writeJson, type Cell } from './harness.js';
import { expertBytes, loadAnonMiB, measureLoadMemory, type LoadMemory } from './load-memory.js';
import { hfPython } from './peers/hf.js';
import { LLAMA_TYPES, LlamaPeer } from './peers/llama.js';
import { type BesideProbe, probeBeside, runProbe } from './probe/probe.js';

export const FORMATS: Record<string, QuantizeSpec | null> = {
  bf16: null,
  int8: quantizeSpec('int8', 0),
  fp8: quantizeSpec('fp8', 0),
  int4: quantizeSpec('int4', 32),
  'int4-g128': quantizeSpec('int4', 128),
  // --quantize-dense: the attention projections, shared experts and dense FFNs in the format too.
  'int8-dense': quantizeSpec('int8', 0, true),
  'fp8-dense': quantizeSpec('fp8', 0, true),
  'int4-dense': quantizeSpec('int4', 32, true),
  // --quantize-dense --quantize-lm-head: the LM head in the format too.
  'int8-full': quantizeSpec('int8', 0, true, true),
  'fp8-full': quantizeSpec('fp8', 0, true, true),
  'int4-full': quantizeSpec('int4', 32, true, true),
  'int4-g128-full': quantizeSpec('int4', 128, true, true),
};

/**
 * Bytes --quantize-dense takes off a decode step's dense reads: each attention layer's q/k/v (one
 * fused weight) and o, the shared experts and dense FFNs, packed in q instead of bf16 (the packer's
 * own sizes). Gated DeltaNet layers are not counted (refused: the bench's models have none).
 */
function denseQuantSaving(spec: ModelSpec, q: QuantizeSpec): number {
  const H = spec.hidden, a = spec.attention;
  if (a.kind !== 'gqa' || spec.linearAttention) throw new RangeError('quant: the --quantize-dense bound is written for GQA models');
  const qRows = (a.outputGate ? 2 : 1) * a.heads * a.headDim, kvRows = 2 * a.kvHeads * a.headDim, oCols = a.heads * a.headDim;
  const attn = (qRows + kvRows) * H * 2 + H * oCols * 2
    - quantizedBytes(q, qRows + kvRows, H, false) - quantizedBytes(q, H, oCols, false);
  const ffn = (inter: number) => inter ? 3 * H * inter * 2 - quantizedBytes(q, 2 * inter, H, true) - quantizedBytes(q, H, inter, false) : 0;
  let saved = 0;
  for (const l of spec.layers) saved += attn + (l.ffn === 'moe' ? ffn(spec.moe.sharedIntermediate) : ffn(spec.denseIntermediate));
  return saved;
}

/** Bytes --quantize-lm-head takes off a decode step's dense reads: the LM head [V, H] packed in q instead of bf16. */
function lmHeadQuantSaving(spec: ModelSpec, q: QuantizeSpec): number {
  return spec.vocabSize * spec.hidden * 2 - quantizedBytes(q, spec.vocabSize, spec.hidden, false);
}

export interface FormatRun {
  format: string;
  loaded: LoadedModel;
  runner: Runner;
  bytes: DecodeBytes;
  /** Bytes of the routed experts as held (codes and scales, or bf16). */
  expertsHeldBytes: number;
  /** The load's resident memory, in a child process of its own. */
  loadMemory: LoadMemory;
  prefillMs: number[];
  /** besideRoundTripNs: the core round trip of the probe whose bandwidth is besideGBps (null: not measured). */
  decode: Record<string, { tokPerS: number[]; bytesPerStep: number[]; besideGBps: number[]; besideRoundTripNs?: (number | null)[] }>;
}

type DecodeReps = FormatRun['decode'][string];

/** Issue 19's decode b1 ratio to bf16: int4 (-dense / -full rows too) 2.8x, the others 1.8x. */
const ratioTarget = (format: string) => (format.startsWith('int4') ? 2.8 : 1.8);

/** Rep i's read rate, GB/s: its bytes per step x steps / time. */
const repReadGBps = (d: DecodeReps, B: string, i: number) => (d.tokPerS[i]! / Number(B)) * d.bytesPerStep[i]! / 1e9;

/** Rep i's read rate over the probes beside it. */
const besideShare = (d: DecodeReps, B: string, i: number) => repReadGBps(d, B, i) / d.besideGBps[i]!;

/**
 * The decode reps grouped by the read bandwidth beside them: split at the midpoint of the lowest and highest
 * probe when they are >= 1.25x apart (this VM's two levels, ~35 and ~55 GB/s), so that a format is put
 * against bf16 on reps the machine read at about the same rate. Rows and the b1 verdicts per state.
 */
export function byBandwidthState(name: string, runs: FormatRun[], rows: Cell[][], notes: string[], verdicts: string[]): void {
  const all = runs.flatMap((fr) => Object.values(fr.decode).flatMap((d) => d.besideGBps));
  if (!all.length) return;
  const lo = Math.min(...all), hi = Math.max(...all);
  if (hi < 1.25 * lo) return;
  const cut = (lo + hi) / 2;
  // The core round trips beside each state's reps, where the probe measured them: what the two
  // bandwidth levels are (one CCD or two, on the VM of bench/RESULTS.md session 25).
  const trips = (slow: boolean) => runs.flatMap((fr) => Object.values(fr.decode).flatMap((d) =>
    (d.besideRoundTripNs ?? []).filter((t, i): t is number => t !== null && (d.besideGBps[i]! < cut) === slow)));
  const slowTrips = trips(true), fastTrips = trips(false);
  const tripNote = slowTrips.length && fastTrips.length
    ? `, core round trip beside them ${fmt(median(slowTrips))} ns (slow) and ${fmt(median(fastTrips))} ns (fast)` : '';
  notes.push(`${name}: probes ${fmt(lo)}-${fmt(hi)} GB/s, split at ${fmt(cut)}${tripNote}`);
  const base = runs.find((x) => x.format === 'bf16');
  for (const [state, inState] of [[`slow (< ${fmt(cut)} GB/s)`, (g: number) => g < cut], [`fast (>= ${fmt(cut)} GB/s)`, (g: number) => g >= cut]] as const) {
    const pick = (fr: FormatRun, B: string) => {
      const d = fr.decode[B];
      const idx = d ? d.besideGBps.map((g, i) => (inState(g) ? i : -1)).filter((i) => i >= 0) : [];
      if (!d || !idx.length) return null;
      return { n: idx.length, tps: median(idx.map((i) => d.tokPerS[i]!)),
        of: median(idx.map((i) => besideShare(d, B, i))) };
    };
    for (const fr of runs)
      for (const B of Object.keys(fr.decode)) {
        const m = pick(fr, B);
        if (!m) continue;
        const b = base && base !== fr ? pick(base, B) : null;
        const vs = b ? m.tps / b.tps : null;
        rows.push([name, state, fr.format, `decode b${B}`, m.n, m.tps, pct(m.of), vs === null ? '-' : `${fmt(vs)}x`]);
        if (B !== '1' || fr === base) continue;
        const need = ratioTarget(fr.format);
        verdicts.push(`${name}, ${state} reps (${m.n}${b ? ` vs bf16's ${b.n}` : ''}): decode b1 ${fr.format} ` +
          (vs === null ? '' : `>= ${need}x bf16: ${fmt(vs)}x -> ${vs >= need ? 'PASS' : 'FAIL'}; `) +
          `>= 75% of the probes beside: ${pct(m.of)} -> ${m.of >= 0.75 ? 'PASS' : 'FAIL'}`);
      }
  }
}

function decodeRun(fr: FormatRun, B: number, decodePrompt: number, steps: number): { tokPerS: number; bytesPerStep: number } {
  const V = fr.loaded.spec.vocabSize;
  fr.runner.reset();
  const prompts = Array.from({ length: B }, (_, i) => promptIds(100 + i, decodePrompt));
  const seqs = prompts.map(() => fr.runner.newSeq());
  let next = argmaxRows(fr.runner.step(seqs, prompts).logits, B, V);
  let ms = 0, bytes = 0;
  for (let s = 0; s < steps; s++) {
    const t0 = performance.now();
    const out = fr.runner.step(seqs, next.map((t) => [t]));
    next = argmaxRows(out.logits, B, V);
    ms += performance.now() - t0;
    bytes += fr.bytes.step(out.routedIds, seqs.map((q) => q.len), B).bytes;
  }
  return { tokPerS: (B * steps) / (ms / 1e3), bytesPerStep: bytes / steps };
}

export async function runQuantBench(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      json: { type: 'string' }, reps: { type: 'string' }, warmup: { type: 'string' }, models: { type: 'string' },
      formats: { type: 'string' }, prefill: { type: 'string' }, 'decode-prompt': { type: 'string' },
      steps: { type: 'string' }, batches: { type: 'string' }, threads: { type: 'string' },
      'no-peer': { type: 'boolean' }, python: { type: 'string' },
    },
    strict: true,
  });
  const models = (values.models?.split(',') ?? ['mixtral-like']) as BenchModelName[];
  for (const m of models)
    if (!BENCH_MODEL_NAMES.includes(m)) throw new RangeError(`--models has "${m}", expected some of ${BENCH_MODEL_NAMES.join(', ')}`);
  const formats = values.formats?.split(',') ?? ['bf16', 'int8', 'fp8', 'int4'];
  for (const f of formats) if (!(f in FORMATS)) throw new RangeError(`--formats has "${f}", expected some of ${Object.keys(FORMATS).join(', ')}`);
  const reps = Math.max(1, parsePositiveInt('reps', values.reps, 3));
  const warmup = parsePositiveInt('warmup', values.warmup, 1);
  const prefill = Math.max(1, parsePositiveInt('prefill', values.prefill, 512));
  const decodePrompt = Math.max(1, parsePositiveInt('decode-prompt', values['decode-prompt'], 64));
  const steps = Math.max(1, parsePositiveInt('steps', values.steps, 16));
  const batches = values.batches ? parseIntList('batches', values.batches) : [1, 8];
  const threads = parsePositiveInt('threads', values.threads, 0);
  loadNative().setNumThreads(threads);
  const info = runInfo();
  const rows: Cell[][] = [];
  const verdicts: string[] = [];
  const json: unknown[] = [];
  const loadAvg: number[] = [];
  const boundNotes: string[] = [];
  const stateRows: Cell[][] = [];
  const stateNotes: string[] = [];
  for (const name of models) {
    const dir = ensureBenchModel(name, (s) => console.error(s));
    const runs: FormatRun[] = [];
    for (const format of formats) {
      console.error(`# ${name}: loading (${format})...`);
      const q = FORMATS[format]!;
      const loadMemory = measureLoadMemory(dir, q);
      const loaded = loadModel(dir, { fast: true, quantize: q });
      const perSeq = Math.ceil((decodePrompt + steps + 2) / 16);
      const runner = new Runner(loaded.model, Math.max(Math.ceil((prefill + 1) / 16), Math.max(...batches) * perSeq));
      const bytes = new DecodeBytes(loaded.spec, runner.kvDtype);
      const held = expertBytes(loaded.model);
      bytes.expertBytes = held.one;  // what one expert's FFN reads in this format
      if (q?.dense) bytes.denseBytes -= denseQuantSaving(loaded.spec, q);
      if (q?.lmHead) bytes.denseBytes -= lmHeadQuantSaving(loaded.spec, q);
      runs.push({ format, loaded, runner, bytes, expertsHeldBytes: held.total, loadMemory, prefillMs: [], decode: {} });
    }
    let peer: LlamaPeer | null = null;
    let peerWhy = values['no-peer'] ? '--no-peer' : '';
    const peerRuns: Record<string, { prefillMs: number[]; decode: Record<string, number[]> }> = {};
    if (!values['no-peer']) {
      try {
        peer = await LlamaPeer.start({ hfDir: dir, python: hfPython(values.python), types: LLAMA_TYPES, threads,
          sequences: Math.max(...batches), contextSize: Math.max(prefill, decodePrompt + steps + 2) + 8, log: (s) => console.error(s) });
        for (const t of LLAMA_TYPES) peerRuns[t] = { prefillMs: [], decode: {} };
      } catch (e) {
        peerWhy = (e as Error).message.split('\n')[0]!;
        console.error(`# ${name}: llama.cpp peer unavailable: ${peerWhy}`);
      }
    }
    const bw: number[] = [runProbe({ threads: threads || undefined }).readBandwidthGBps];
    // The probe beside each measured decode rep: the one just before it (the previous rep's after-probe
    // when nothing but a prefill ran since) and the one just after; the higher of the two is its bound.
    const none: BesideProbe = { gbps: NaN, roundTripNs: null };
    let lastProbe = none;
    const probeNow = () => (lastProbe = probeBeside({ threads: threads || undefined }));
    try {
      for (let r = 0; r < warmup + reps; r++) {
        loadAvg.push(os.loadavg()[0]!);
        lastProbe = none;  // the peer and the run's probe ran since
        for (const fr of runs) {
          fr.runner.reset();
          const t0 = performance.now();
          argmaxRows(fr.runner.step([fr.runner.newSeq()], [promptIds(1, prefill)]).logits, 1, fr.loaded.spec.vocabSize);
          const ms = performance.now() - t0;
          if (r >= warmup) fr.prefillMs.push(ms);
          for (const B of batches) {
            const before = r < warmup ? none : Number.isNaN(lastProbe.gbps) ? probeNow() : lastProbe;
            const d = decodeRun(fr, B, decodePrompt, steps);
            const after = r < warmup ? none : probeNow();
            console.error(`# ${name} ${fr.format}: prefill ${ms.toFixed(0)} ms; decode b${B} ${fmt(d.tokPerS)} tok/s${r < warmup ? ' (warm-up)' : ''}`);
            if (r < warmup) continue;
            const slot = (fr.decode[String(B)] ??= { tokPerS: [], bytesPerStep: [], besideGBps: [], besideRoundTripNs: [] });
            slot.tokPerS.push(d.tokPerS);
            slot.bytesPerStep.push(d.bytesPerStep);
            const higher = after.gbps > before.gbps ? after : before;
            slot.besideGBps.push(higher.gbps);
            slot.besideRoundTripNs?.push(higher.roundTripNs);
          }
        }
        if (peer) for (const t of LLAMA_TYPES) {
          const ms = (await peer.prefill(t, promptIds(1, prefill))) * 1e3;
          if (r >= warmup) peerRuns[t]!.prefillMs.push(ms);
          for (const B of batches) {
            const tps = await peer.decode(t, Array.from({ length: B }, (_, i) => promptIds(100 + i, decodePrompt)), steps);
            console.error(`# ${name} llama.cpp ${t}: prefill ${ms.toFixed(0)} ms; decode b${B} ${fmt(tps)} tok/s${r < warmup ? ' (warm-up)' : ''}`);
            if (r >= warmup) (peerRuns[t]!.decode[String(B)] ??= []).push(tps);
          }
        }
        bw.push(runProbe({ threads: threads || undefined }).readBandwidthGBps);
      }
      // A format's bound bandwidth: the best probe, or the fastest any *other* format's decode read its own
      // bytes in this run, whichever is higher. The kernels' prefetching can outrun the probe's plain
      // stream (a session 20 run decoded bf16 at 116% of a probe-only bound), and a bound under a measured
      // rate is no bound; a format's own reps are left out so that its figure never measures itself.
      const readRate = new Map<FormatRun, number>();
      for (const fr of runs) {
        let r = 0;
        for (const [B, d] of Object.entries(fr.decode))
          d.tokPerS.forEach((_, i) => { r = Math.max(r, repReadGBps(d, B, i)); });
        readRate.set(fr, r);
      }
      const bandwidthFor = (fr: FormatRun) => Math.max(...bw, ...runs.filter((o) => o !== fr).map((o) => readRate.get(o)!));
      boundNotes.push(`${name}: best probe ${fmt(Math.max(...bw))} GB/s, fastest decode reads ` +
        runs.map((fr) => `${fr.format} ${fmt(readRate.get(fr)!)}`).join(', '));
      const base = runs.find((x) => x.format === 'bf16');
      for (const fr of runs) {
        const pre = fr.prefillMs.map((ms) => prefill / (ms / 1e3));
        const preVs = base && base !== fr ? median(pre) / median(base.prefillMs.map((ms) => prefill / (ms / 1e3))) : null;
        rows.push([name, fr.format, `prefill ${prefill}`, median(pre), `${fmt(Math.min(...pre))}-${fmt(Math.max(...pre))}`, '-', '-', '-',
          preVs === null ? '-' : `${fmt(preVs)}x`, fmt(fr.expertsHeldBytes / 2 ** 20), fmt(loadAnonMiB(fr.loadMemory))]);
        if (fr.format.startsWith('int8') && preVs !== null) verdicts.push(`${name}: prefill int8 >= 1.3x bf16: ${fmt(preVs)}x -> ${preVs >= 1.3 ? 'PASS' : 'FAIL'}`);
        for (const [B, d] of Object.entries(fr.decode)) {
          const tps = median(d.tokPerS);
          const bound = Number(B) / (median(d.bytesPerStep) / (bandwidthFor(fr) * 1e9));
          // Each rep's read rate over the probes beside it.
          const beside = d.tokPerS.map((_, i) => besideShare(d, B, i));
          const besideMed = median(beside);
          const baseTps = base?.decode[B] ? median(base.decode[B]!.tokPerS) : null;
          const vs = baseTps && base !== fr ? tps / baseTps : null;
          rows.push([name, fr.format, `decode b${B}`, tps, `${fmt(Math.min(...d.tokPerS))}-${fmt(Math.max(...d.tokPerS))}`, bound,
            pct(tps / bound), `${pct(besideMed)} (${pct(Math.min(...beside))}-${pct(Math.max(...beside))})`,
            vs === null ? '-' : `${fmt(vs)}x`, fmt(fr.expertsHeldBytes / 2 ** 20), fmt(loadAnonMiB(fr.loadMemory))]);
          if (B === '1' && vs !== null) {
            const need = ratioTarget(fr.format);
            verdicts.push(`${name}: decode b1 ${fr.format} >= ${need}x bf16: ${fmt(vs)}x -> ${vs >= need ? 'PASS' : 'FAIL'}`);
          }
          if (B === '1' && fr.format !== 'bf16') {
            verdicts.push(`${name}: decode b1 ${fr.format} >= 75% of its read bound (the run's best read rate): ${pct(tps / bound)} -> ${tps / bound >= 0.75 ? 'PASS' : 'FAIL'}`);
            verdicts.push(`${name}: decode b1 ${fr.format} >= 75% of its read bound (the probes beside each rep, median): ${pct(besideMed)} -> ${besideMed >= 0.75 ? 'PASS' : 'FAIL'}`);
          }
        }
        if (fr.format.startsWith('int8') && base) {
          verdicts.push(`${name}: experts held ${fr.format} <= 0.6x bf16: ${fmt(fr.expertsHeldBytes / base.expertsHeldBytes)}x -> ${fr.expertsHeldBytes / base.expertsHeldBytes <= 0.6 ? 'PASS' : 'FAIL'}`);
          const rss = loadAnonMiB(fr.loadMemory) / loadAnonMiB(base.loadMemory);
          verdicts.push(`${name}: load RSS (RssAnon) ${fr.format} <= 0.6x bf16: ${fmt(rss)}x -> ${rss <= 0.6 ? 'PASS' : 'FAIL'}`);
        }
        json.push({ model: name, format: fr.format, quantize: FORMATS[fr.format] ? describeQuantize(FORMATS[fr.format]!) : 'bf16',
          prefillMs: fr.prefillMs, decode: fr.decode, expertsHeldBytes: fr.expertsHeldBytes, loadMemory: fr.loadMemory, bandwidthGBps: bandwidthFor(fr),
          probeGBps: Math.max(...bw), decodeReadGBps: readRate.get(fr) });
      }
      byBandwidthState(name, runs, stateRows, stateNotes, verdicts);
      const prefillTps = (ms: number[]) => median(ms.map((v) => prefill / (v / 1e3)));
      for (const [t, pr] of Object.entries(peerRuns)) {
        const pre = pr.prefillMs.map((ms) => prefill / (ms / 1e3));
        const baseVs = base ? `${fmt(median(pre) / prefillTps(base.prefillMs))}x` : '-';
        const mib = fmt(peer!.info.fileBytes[t]! / 2 ** 20);
        rows.push([name, `llama.cpp ${t}`, `prefill ${prefill}`, median(pre), `${fmt(Math.min(...pre))}-${fmt(Math.max(...pre))}`, '-', '-', '-', baseVs, `(file ${mib})`, '-']);
        for (const [B, tps] of Object.entries(pr.decode)) {
          const vs = base?.decode[B] ? `${fmt(median(tps) / median(base.decode[B]!.tokPerS))}x` : '-';
          rows.push([name, `llama.cpp ${t}`, `decode b${B}`, median(tps), `${fmt(Math.min(...tps))}-${fmt(Math.max(...tps))}`, '-', '-', '-', vs, `(file ${mib})`, '-']);
        }
        // Ours against llama.cpp's format of about the same bits. Its GGUF quantizes every linear
        // (attention and LM head too), as the -full formats do: those when the run has them.
        const near = t === 'Q8_0' ? 'int8' : 'int4';
        const ours = runs.find((x) => x.format === `${near}-full`) ?? runs.find((x) => x.format === near);
        if (!ours) continue;
        const pv = prefillTps(ours.prefillMs) / median(pre);
        verdicts.push(`${name}: ${ours.format} vs llama.cpp ${t}: prefill ${fmt(pv)}x` + Object.entries(pr.decode)
          .map(([B, tps]) => `, decode b${B} ${fmt(median(ours.decode[B]!.tokPerS) / median(tps))}x`).join(''));
        json.push({ model: name, peer: `llama.cpp ${t}`, nodeLlamaCpp: peer!.info.version, prefillMs: pr.prefillMs, decode: pr.decode,
          fileBytes: peer!.info.fileBytes[t] });
      }
      if (peerWhy) verdicts.push(`${name}: llama.cpp peer not run: ${peerWhy}`);
      console.error(`# ${name}: read bandwidth probes ${bw.map((v) => fmt(v)).join(', ')} GB/s`);
    } finally {
      for (const fr of runs) fr.loaded.model.dispose();
      await peer?.close();
    }
  }
  console.log(`## quant: quantized experts, fast mode, ${KV_NOTE}, ${os.cpus()[0]?.model ?? 'cpu'}, ${threads || os.availableParallelism()} threads\n`);
  console.log(`Prefill: one ${prefill}-token prompt in one step. Decode: batch B of ${decodePrompt}-token prompts, ${steps} greedy ` +
    `steps. ${reps} reps after ${warmup} warm-up, round-robin over the formats; tok/s median and min-max. The bound: the ` +
    `bytes each step reads in that format (dense weights bf16, or in the format for the -dense rows: --quantize-dense; the ` +
    `routed experts in the format; LM head bf16, or in the format for the -full rows: --quantize-dense ` +
    `--quantize-lm-head; the KV cache in bf16) over the run's best read rate: the best read-bandwidth probe, or the ` +
    `fastest any other format's decode read its own bytes, whichever is higher (${boundNotes.join('; ')}). "Of probes beside": ` +
    `each rep's read rate (its bytes per step x steps / time) over the higher of the read-bandwidth probes taken just before and ` +
    `just after it (the best of 3 passes over 1 GiB, all threads), median and min-max over the reps. llama.cpp rows: node-llama-cpp's prebuilt CPU build, same threads, ` +
    `GGUF made by llama.cpp's quantizer from the same checkpoint; its prefill runs in batches of up to 512 tokens, its decode batch B ` +
    `is B sequences in one context; the experts column is its GGUF file size. Load RSS: the RssAnon a load of the format adds, ` +
    `in a child process of its own (the model's own memory: weights, caches are not allocated). 1-min load average ${fmt(Math.min(...loadAvg))}-${fmt(Math.max(...loadAvg))}.\n`);
  console.log(markdownTable(['model', 'format', 'workload', 'tok/s', 'min-max', 'bound tok/s', 'of bound', 'of probes beside (min-max)',
    'vs bf16', 'experts MiB', 'load RSS MiB'], rows, ['left', 'left', 'left', 'right', 'right', 'right', 'right', 'right', 'right', 'right', 'right']));
  if (stateRows.length) {
    console.log(`\nBy the machine's read-bandwidth state: the decode reps split by the probes beside them (${stateNotes.join('; ')}), ` +
      'when the highest is >= 1.25x the lowest (a VM whose bandwidth moves between two levels); each format against bf16 on ' +
      'the reps of the same state only. tok/s and "of probes beside": medians over those reps.\n');
    console.log(markdownTable(['model', 'state', 'format', 'workload', 'reps', 'tok/s', 'of probes beside', 'vs bf16'], stateRows,
      ['left', 'left', 'left', 'left', 'right', 'right', 'right', 'right']));
  }
  console.log('\nTargets:\n');
  for (const v of verdicts) console.log(`- ${v}`);
  if (values.json) writeJson(values.json, { bench: 'quant', run: info, loadAverage: loadAvg, results: json, verdicts });
}
