// `npm run bench -- decode-step`: CPU time of one decode step of a bench model by batch and KV cache
// dtype (an in-process EngineCore, native sampler, greedy): what a step of 16 / 32 / 64 streams costs
// and what the KV dtype changes in it. CPU time (this process, all threads), so the figures survive a
// shared machine better than the serve bench's wall-time throughput. `--profile` adds, per batch and
// dtype, the step's time shares by op family (ops wrapped with timers, after the measured steps).
import os from 'node:os';
import { parseArgs } from 'node:util';

import { EngineCore } from '../src/engine/engine-core.js';
import type { KvDtype } from '../src/model/kv-dtype.js';
import { loadModel } from '../src/model/load.js';
import { loadNative } from '../src/native/index.js';
import type { ForwardBatch } from '../src/model/forward-batch.js';
import { BENCH_MODEL_NAMES, type BenchModelName, benchRequest, ensureBenchModel } from './bench-models.js';
import { fmt, markdownTable, measureWallCpu, median, parseIntList, parsePositiveInt, pct, runInfo, writeJson, type Cell } from './harness.js';
import { OpProfiler } from './op-profile.js';
import { FORMATS } from './quant.js';

export async function runDecodeStep(argv: string[]): Promise<void> {
  const { values } = parseArgs({ args: argv, options: {
    json: { type: 'string' }, model: { type: 'string' }, batches: { type: 'string' }, 'kv-cache-dtype': { type: 'string' },
    'prompt-len': { type: 'string' }, steps: { type: 'string' }, threads: { type: 'string' }, profile: { type: 'boolean' },
    format: { type: 'string' },
  }, strict: true });
  const name = (values.model ?? 'mixtral-like') as BenchModelName;
  if (!BENCH_MODEL_NAMES.includes(name)) throw new RangeError(`--model is "${name}", expected one of ${BENCH_MODEL_NAMES.join(', ')}`);
  const batches = values.batches ? parseIntList('batches', values.batches) : [16, 32, 64];
  const dtypes = (values['kv-cache-dtype'] ?? 'f32,bf16').split(',') as KvDtype[];
  for (const d of dtypes) if (!['f32', 'bf16', 'fp8'].includes(d)) throw new RangeError(`--kv-cache-dtype lists '${d}', expected f32, bf16 or fp8`);
  const promptLen = parsePositiveInt('prompt-len', values['prompt-len'], 128);
  const steps = parsePositiveInt('steps', values.steps, 5);
  const threads = loadNative().setNumThreads(parsePositiveInt('threads', values.threads, 0));
  const format = values.format ?? 'bf16';
  if (!(format in FORMATS)) throw new RangeError(`--format is "${format}", expected one of ${Object.keys(FORMATS).join(', ')}`);
  const quantize = FORMATS[format];
  const loaded = loadModel(ensureBenchModel(name, (s) => console.error(s)), quantize ? { fast: true, quantize } : { fast: true });
  const rows: Cell[][] = [];
  const json: unknown[] = [];
  const profiles: string[] = [];
  // --profile runs as many steps again after the measured ones.
  const runSteps = values.profile ? 2 * steps : steps;
  for (const B of batches) for (const dt of dtypes) {
    // Blocks for every stream's whole context: no preemption, so the step is B streams wide.
    const core = new EngineCore(loaded, {
      kvCacheBlocks: B * Math.ceil((promptLen + runSteps + 8) / 16) + 8, kvCacheGb: 0, kvCacheDtype: dt, blockSize: 16,
      maxNumSeqs: B, maxNumBatchedTokens: 4096, servedModelName: name, sampler: 'native',
    });
    for (let i = 0; i < B; i++) {
      core.add(benchRequest(i, promptLen, runSteps + 4));
    }
    // Prefill until a step decodes every stream (that step is the warm-up).
    for (;;) {
      const r = core.step();
      if (r && r.metrics.decodeTokens === B) break;
    }
    let s = 0;
    const { cpuMs, wallMs } = measureWallCpu(() => {
      const r = core.step();
      if (!r || r.metrics.decodeTokens !== B) throw new Error(`step ${s} decoded ${r?.metrics.decodeTokens} rows, expected ${B}`);
      s++;
    }, { reps: steps, warmup: 0 });
    const m = median(cpuMs);
    rows.push([B, dt, m, `${fmt(Math.min(...cpuMs))}-${fmt(Math.max(...cpuMs))}`, B / m * 1000, median(wallMs)]);
    json.push({ batch: B, kvDtype: dt, format, cpuMs, wallMs });
    console.error(`# batch ${B} ${dt}: ${fmt(m)} cpu ms per step, load average ${os.loadavg().map((x) => x.toFixed(1)).join(' ')}`);
    if (values.profile) profiles.push(`#### batch ${B}, ${dt} KV\n\n${profileSteps(core, loaded.spec, B, steps)}\n`);
  }
  console.log(`\n### decode step by batch and KV dtype: ${name} (${format === 'bf16' ? 'bf16' : `--quantize ${format}`}), ${promptLen}-token prompts, ${threads} threads, median of ${steps} steps; ` +
    `load average ${os.loadavg().map((x) => x.toFixed(1)).join(' ')}\n`);
  console.log(markdownTable(['batch', 'KV', 'cpu ms per step', 'cpu min-max', 'decode tokens per CPU-second', 'wall ms per step'], rows));
  if (profiles.length) {
    console.log(`\n### decode step shares by op family (wall ms per step; ops timed one by one after the measured steps; ` +
      `load average ${os.loadavg().map((x) => x.toFixed(1)).join(' ')})\n`);
    console.log(profiles.join('\n'));
  }
  if (values.json) writeJson(values.json, { bench: 'decode-step', run: runInfo(), model: name, promptLen, steps, threads, rows: json });
}

/** Op family of a profiler key (op name, with the GEMM's [N, K] for denseGemm). */
function family(key: string, vocab: number, experts: number): string {
  if (key.startsWith('groupGemmFfn')) return 'GEMM: experts';
  const m = /^denseGemm \[(\d+), (\d+)\]$/.exec(key);
  if (m) {
    const N = Number(m[1]);
    return N === vocab ? 'GEMM: LM head' : N === experts ? 'GEMM: router' : 'GEMM: attention projections';
  }
  if (key === 'pagedAttention') return 'decode attention';
  if (key === 'kvCacheWrite') return 'KV cache write';
  if (key === 'route' || key === 'permute' || key === 'unpermuteCombine') return 'routing / permute / combine';
  if (key === 'rmsNorm' || key === 'rope') return 'norms / rope';
  if (key === 'sampleBatch') return 'sampler (native)';
  return key;
}

/**
 * `steps` more decode steps of `core` with every hot op timed: wall ms per step by op family, the
 * forward's JS between ops, and the engine's own JS (scheduler, batch building, sampler setup,
 * events) outside the forward.
 */
function profileSteps(core: EngineCore, spec: { vocabSize: number; hidden: number; moe: { numExperts: number; intermediate: number } },
                      B: number, steps: number): string {
  const n = loadNative();
  const model = core.loaded.model;
  const prof = new OpProfiler(n, (E) => (E === spec.moe.numExperts ? 3 * spec.hidden * spec.moe.intermediate * 2 : NaN));
  prof.install();
  const forward = model.forward;
  let forwardMs = 0;
  model.forward = function (this: unknown, batch: ForwardBatch, cache: unknown, blockSize: number) {
    const t0 = performance.now();
    try {
      return forward.call(model, batch, cache, blockSize);
    } finally {
      forwardMs += performance.now() - t0;
    }
  };
  let stepMs = 0;
  try {
    prof.enabled = true;
    const t0 = performance.now();
    for (let s = 0; s < steps; s++) {
      const r = core.step();
      if (!r || r.metrics.decodeTokens !== B) throw new Error(`profiled step ${s} decoded ${r?.metrics.decodeTokens} rows, expected ${B}`);
    }
    stepMs = performance.now() - t0;
    prof.enabled = false;
  } finally {
    prof.uninstall();
    model.forward = forward;
  }
  const fam = new Map<string, { calls: number; ms: number }>();
  let opMs = 0, samplerMs = 0;
  for (const [key, e] of prof.snapshot()) {
    const f = family(key, spec.vocabSize, spec.moe.numExperts);
    const a = fam.get(f) ?? { calls: 0, ms: 0 };
    a.calls += e.calls;
    a.ms += e.ms;
    fam.set(f, a);
    if (key === 'sampleBatch') samplerMs += e.ms; else opMs += e.ms;
  }
  fam.set('JS in the forward (between ops)', { calls: 0, ms: forwardMs - opMs });
  fam.set('engine JS outside the forward', { calls: 0, ms: stepMs - forwardMs - samplerMs });
  const rows: Cell[][] = [...fam.entries()].sort((a, b) => b[1].ms - a[1].ms)
    .map(([f, a]) => [f, a.calls ? a.calls / steps : '-', a.ms / steps, pct(a.ms / stepMs)]);
  return markdownTable(['part', 'calls/step', 'ms/step', 'share'], rows, ['left', 'right', 'right', 'right']) +
    `\n\nstep: ${fmt(stepMs / steps)} ms wall (median-free: the mean of ${steps} profiled steps)`;
}
