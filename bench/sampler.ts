// `npm run bench -- sampler`: the sampler's time per engine step, the JS sampler row by row (the
// old path, the reference) against one native batched call, at batch 1/16/64 and vocab 32K/152K,
// greedy / temperature + top_p / greedy + 5 logprobs; and the sampler's share of a batch-64 decode
// step on the bench models (issue 17's target: <= 5%).
import os from 'node:os';
import { parseArgs } from 'node:util';

import { BatchSampler } from '../src/engine/batch-sampler.js';
import { EngineCore } from '../src/engine/engine-core.js';
import { mulberry32 } from '../src/engine/rng.js';
import { Sampler, SamplingState } from '../src/engine/sampler.js';
import type { SamplingParams } from '../src/engine/types.js';
import { loadModel } from '../src/model/load.js';
import { loadNative } from '../src/native/index.js';
import { BENCH_MODEL_NAMES, type BenchModelName, benchRequest, ensureBenchModel } from './bench-models.js';
import { fmt, markdownTable, measureWallCpu, median, parseIntList, parsePositiveInt, runInfo, writeJson } from './harness.js';

const MODES: Record<string, Partial<SamplingParams>> = {
  greedy: { temperature: 0 },
  top_p: { temperature: 0.8, topP: 0.9 },
  logprobs5: { temperature: 0, logprobs: 5 },
  top_k: { temperature: 0.8, topK: 50 },
  min_p: { temperature: 0.8, minP: 0.05 },
};
const DEFAULT_MODES = ['greedy', 'top_p', 'logprobs5'];

function params(over: Partial<SamplingParams>, seed: number): SamplingParams {
  return {
    temperature: 1, topP: 1, topK: 0, minP: 0, repetitionPenalty: 1, presencePenalty: 0,
    frequencyPenalty: 0, logprobs: null, seed, ...over,
  };
}

/**
 * Rows shaped like a language model's: roughly normal logits (sd 2, the sum of four uniforms) with
 * a handful of boosted tokens, so that top_p keeps a realistic few-hundred-token nucleus.
 */
function makeLogits(rows: number, V: number, seed: number, flat = false): Float32Array {
  const rand = mulberry32(seed);
  const x = new Float32Array(rows * V);
  if (flat) {
    // --rows flat: a random-weight model's rows (the bench models'): top_p keeps most of the vocabulary.
    for (let i = 0; i < x.length; i++) x[i] = (rand() - 0.5) * 0.5;
    return x;
  }
  for (let i = 0; i < x.length; i++) x[i] = (rand() + rand() + rand() + rand() - 2) * 3.5;
  for (let r = 0; r < rows; r++) for (let j = 0; j < 8; j++) x[r * V + Math.floor(rand() * V)] = 9 + j;
  return x;
}

interface Row { mode: string; vocab: number; batch: number; jsMs: number[]; nativeMs: number[]; jsCpuMs: number[]; nativeCpuMs: number[] }

const timed = (fn: () => void, reps: number, warmup: number) => measureWallCpu(fn, { reps, warmup });

function microBench(batches: number[], vocabs: number[], reps: number, warmup: number, modes: string[],
  flat: boolean, withJs: boolean): Row[] {
  const rows: Row[] = [];
  for (const V of vocabs) {
    const js = new Sampler(V);
    const native = new BatchSampler(V);
    for (const B of batches) {
      const logits = makeLogits(B, V, 7 + B, flat);
      for (const mode of modes) {
        const over = MODES[mode]!;
        const states = Array.from({ length: B }, (_, i) => new SamplingState(params(over, 100 + i), [], V));
        // The JS path is the old engine loop: one Sampler.sample per row.
        const j = withJs ? timed(() => {
          for (let r = 0; r < B; r++) js.sample(logits.subarray(r * V, (r + 1) * V), states[r]!);
        }, reps, warmup) : { wallMs: [NaN], cpuMs: [NaN] };
        const n = timed(() => { native.sample(logits, states); }, reps, warmup);
        rows.push({ mode, vocab: V, batch: B, jsMs: j.wallMs, nativeMs: n.wallMs, jsCpuMs: j.cpuMs, nativeCpuMs: n.cpuMs });
      }
    }
  }
  return rows;
}

interface ShareRow { model: string; mode: string; sampler: string; stepMs: number[]; sampleMs: number[] }

/**
 * Batch-64 decode on a bench model: 64 seeded streams of one mode, step time from the engine's metrics,
 * sampler time from a timer around the sampler's call (the same engine, JS or native sampler).
 */
function stepShare(name: BenchModelName, mode: string, batch: number, steps: number, log: (s: string) => void): ShareRow[] {
  const dir = ensureBenchModel(name, log);
  const out: ShareRow[] = [];
  for (const kind of ['js', 'native'] as const) {
    const loaded = loadModel(dir, { fast: true });
    const core = new EngineCore(loaded, {
      kvCacheBlocks: batch * 8, kvCacheGb: 0, blockSize: 16, maxNumSeqs: batch, maxNumBatchedTokens: batch * 16,
      servedModelName: name, sampler: kind,
    });
    const sampler = (core as unknown as { sampler: { sample: (...a: unknown[]) => unknown } }).sampler;
    const inner = sampler.sample.bind(sampler);
    let sampleMs = 0;
    sampler.sample = (...a: unknown[]) => {
      const t0 = performance.now();
      const r = inner(...a);
      sampleMs += performance.now() - t0;
      return r;
    };
    for (let i = 0; i < batch; i++) {
      core.add(benchRequest(i, 8, steps + 4, params(MODES[mode]!, i)));
    }
    core.step();   // every prompt in one prefill step (batch * 8 tokens)
    core.step();   // warm-up decode
    const row: ShareRow = { model: name, mode, sampler: kind, stepMs: [], sampleMs: [] };
    for (let s = 0; s < steps; s++) {
      sampleMs = 0;
      const r = core.step();
      if (!r || r.metrics.decodeTokens !== batch) throw new Error(`step ${s} decoded ${r?.metrics.decodeTokens} rows, expected ${batch}`);
      row.stepMs.push(r.metrics.durationMs);
      row.sampleMs.push(sampleMs);
    }
    out.push(row);
  }
  return out;
}

const spread = (v: number[]): string => `${fmt(Math.min(...v))}-${fmt(Math.max(...v))}`;

export async function runSamplerBench(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv, options: {
      json: { type: 'string' }, reps: { type: 'string' }, warmup: { type: 'string' }, batches: { type: 'string' },
      vocabs: { type: 'string' }, models: { type: 'string' }, steps: { type: 'string' }, threads: { type: 'string' },
      'no-share': { type: 'boolean' }, 'share-modes': { type: 'string' }, modes: { type: 'string' },
      rows: { type: 'string' }, 'no-js': { type: 'boolean' },
    },
  });
  const reps = parsePositiveInt('reps', values.reps, 7);
  const warmup = parsePositiveInt('warmup', values.warmup, 2);
  const batches = values.batches ? parseIntList('batches', values.batches) : [1, 16, 64];
  const vocabs = values.vocabs ? parseIntList('vocabs', values.vocabs) : [32_000, 152_064];
  const steps = parsePositiveInt('steps', values.steps, 8);
  const threads = loadNative().setNumThreads(parsePositiveInt('threads', values.threads, 0));
  const shareModes = values['share-modes'] ? values['share-modes'].split(',') : ['top_p', 'greedy'];
  for (const m of shareModes) if (!(m in MODES)) throw new RangeError(`--share-modes has "${m}", expected ${Object.keys(MODES).join(', ')}`);
  const models = (values.models ? values.models.split(',') : BENCH_MODEL_NAMES) as BenchModelName[];
  for (const m of models) if (!BENCH_MODEL_NAMES.includes(m)) throw new RangeError(`--models has "${m}", expected ${BENCH_MODEL_NAMES.join(', ')}`);

  const modes = values.modes ? values.modes.split(',') : DEFAULT_MODES;
  for (const m of modes) if (!(m in MODES)) throw new RangeError(`--modes has "${m}", expected ${Object.keys(MODES).join(', ')}`);
  const rowKind = values.rows ?? 'lm';
  if (rowKind !== 'lm' && rowKind !== 'flat') throw new RangeError(`--rows is "${rowKind}", expected lm or flat`);
  const rows = microBench(batches, vocabs, reps, warmup, modes, rowKind === 'flat', !values['no-js']);
  console.log(`\n### sampler time per step (${rowKind} rows): JS row by row vs one native batched call (${threads} threads), ` +
    `median [min-max] of ${reps} reps; ${os.cpus()[0]?.model}, load average ${os.loadavg().map((x) => x.toFixed(1)).join(' ')}\n`);
  console.log(markdownTable(['mode', 'vocab', 'batch', 'JS ms', 'JS min-max', 'native ms', 'native min-max', 'JS / native',
    'JS cpu ms', 'native cpu ms', 'JS / native (cpu)'],
    rows.map((r) => [r.mode, r.vocab, r.batch, median(r.jsMs), spread(r.jsMs), median(r.nativeMs), spread(r.nativeMs),
      median(r.jsMs) / median(r.nativeMs), median(r.jsCpuMs), median(r.nativeCpuMs), median(r.jsCpuMs) / median(r.nativeCpuMs)])));

  const shares: ShareRow[] = [];
  if (!values['no-share']) {
    for (const m of models) for (const mode of shareModes) shares.push(...stepShare(m, mode, 64, steps, (s) => console.error(s)));
    console.log(`\n### sampler share of a batch-64 decode step (top_p: temperature 0.8 + top_p 0.9; vocab 32000), ` +
      `median [min-max] of ${steps} steps\n`);
    console.log(markdownTable(['model', 'mode', 'sampler', 'step ms', 'min-max', 'sampler ms', 'min-max', 'share'],
      shares.map((s) => [s.model, s.mode, s.sampler, median(s.stepMs), spread(s.stepMs), median(s.sampleMs), spread(s.sampleMs),
        `${(100 * median(s.sampleMs) / median(s.stepMs)).toFixed(1)}%`])));
  }
  if (values.json) writeJson(values.json, { info: runInfo(), threads, reps, warmup, rowKind, rows, shares });
}
