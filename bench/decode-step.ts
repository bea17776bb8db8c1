// `npm run bench -- decode-step`: CPU time of one decode step of a bench model by batch and KV cache
// dtype (an in-process EngineCore, native sampler, greedy): what a step of 16 / 32 / 64 streams costs
// and what the KV dtype changes in it. CPU time (this process, all threads), so the figures survive a
// shared machine better than the serve bench's wall-time throughput.
import os from 'node:os';
import { parseArgs } from 'node:util';

import { EngineCore } from '../src/engine/engine-core.js';
import type { KvDtype } from '../src/model/kv-dtype.js';
import { loadModel } from '../src/model/load.js';
import { loadNative } from '../src/native/index.js';
import { BENCH_MODEL_NAMES, type BenchModelName, ensureBenchModel } from './bench-models.js';
import { fmt, markdownTable, measureWallCpu, median, parseIntList, parsePositiveInt, runInfo, writeJson, type Cell } from './harness.js';

export async function runDecodeStep(argv: string[]): Promise<void> {
  const { values } = parseArgs({ args: argv, options: {
    json: { type: 'string' }, model: { type: 'string' }, batches: { type: 'string' }, 'kv-cache-dtype': { type: 'string' },
    'prompt-len': { type: 'string' }, steps: { type: 'string' }, threads: { type: 'string' },
  }, strict: true });
  const name = (values.model ?? 'mixtral-like') as BenchModelName;
  if (!BENCH_MODEL_NAMES.includes(name)) throw new RangeError(`--model is "${name}", expected one of ${BENCH_MODEL_NAMES.join(', ')}`);
  const batches = values.batches ? parseIntList('batches', values.batches) : [16, 32, 64];
  const dtypes = (values['kv-cache-dtype'] ?? 'f32,bf16').split(',') as KvDtype[];
  for (const d of dtypes) if (!['f32', 'bf16', 'fp8'].includes(d)) throw new RangeError(`--kv-cache-dtype lists '${d}', expected f32, bf16 or fp8`);
  const promptLen = parsePositiveInt('prompt-len', values['prompt-len'], 128);
  const steps = parsePositiveInt('steps', values.steps, 5);
  const threads = loadNative().setNumThreads(parsePositiveInt('threads', values.threads, 0));
  const loaded = loadModel(ensureBenchModel(name, (s) => console.error(s)), { fast: true });
  const rows: Cell[][] = [];
  const json: unknown[] = [];
  for (const B of batches) for (const dt of dtypes) {
    // Blocks for every stream's whole context: no preemption, so the step is B streams wide.
    const core = new EngineCore(loaded, {
      kvCacheBlocks: B * Math.ceil((promptLen + steps + 8) / 16) + 8, kvCacheGb: 0, kvCacheDtype: dt, blockSize: 16,
      maxNumSeqs: B, maxNumBatchedTokens: 4096, servedModelName: name, sampler: 'native',
    });
    for (let i = 0; i < B; i++) {
      core.add({
        id: `s${i}`, promptTokenIds: Array.from({ length: promptLen }, (_, j) => 100 + ((i * 131 + j * 17) % 30000)),
        maxTokens: steps + 4, stopTokenIds: [], ignoreEos: true, minTokens: 0, returnRoutedExperts: false,
        sampling: { temperature: 0, topP: 1, topK: 0, minP: 0, repetitionPenalty: 1, presencePenalty: 0, frequencyPenalty: 0, logprobs: null, seed: i },
      });
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
    json.push({ batch: B, kvDtype: dt, cpuMs, wallMs });
    console.error(`# batch ${B} ${dt}: ${fmt(m)} cpu ms per step, load average ${os.loadavg().map((x) => x.toFixed(1)).join(' ')}`);
  }
  console.log(`\n### decode step by batch and KV dtype: ${name} (bf16), ${promptLen}-token prompts, ${threads} threads, median of ${steps} steps; ` +
    `load average ${os.loadavg().map((x) => x.toFixed(1)).join(' ')}\n`);
  console.log(markdownTable(['batch', 'KV', 'cpu ms per step', 'cpu min-max', 'decode tokens per CPU-second', 'wall ms per step'], rows));
  if (values.json) writeJson(values.json, { bench: 'decode-step', run: runInfo(), model: name, promptLen, steps, threads, rows: json });
}
