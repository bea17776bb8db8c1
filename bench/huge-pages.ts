// `npm run bench -- huge-pages`: what 2 MiB pages (native/include/expertd/weight_memory.h) do to a
// decode step. Two copies of a bench model live in one process, one loaded with
// EXPERTD_HUGE_PAGES=0 (weights and KV cache on the C heap's 4 KiB pages), one on 2 MiB pages, each
// with its own in-process engine and one greedy stream; decode steps alternate between them every
// other step, so that a shared machine's drift hits both arms alike. ms per decode step, median and
// quartiles, per format.
import os from 'node:os';
import { parseArgs } from 'node:util';

import { EngineCore } from '../src/engine/engine-core.js';
import { loadModel } from '../src/model/load.js';
import { loadNative } from '../src/native/index.js';
import { BENCH_MODEL_NAMES, type BenchModelName, benchRequest, ensureBenchModel } from './bench-models.js';
import { fmt, markdownTable, parsePositiveInt, percentile, runInfo, writeJson, type Cell } from './harness.js';
import { FORMATS } from './quant.js';

export async function runHugePages(argv: string[]): Promise<void> {
  const { values } = parseArgs({ args: argv, options: {
    json: { type: 'string' }, model: { type: 'string' }, formats: { type: 'string' }, steps: { type: 'string' },
    'prompt-len': { type: 'string' }, threads: { type: 'string' },
  }, strict: true });
  const name = (values.model ?? 'qwen3moe-like') as BenchModelName;
  if (!BENCH_MODEL_NAMES.includes(name)) throw new RangeError(`--model is "${name}", expected one of ${BENCH_MODEL_NAMES.join(', ')}`);
  const formats = (values.formats ?? 'bf16,int8-full,fp8-full,int4-full').split(',');
  for (const f of formats) if (!(f in FORMATS)) throw new RangeError(`--formats lists "${f}", expected ${Object.keys(FORMATS).join(', ')}`);
  const steps = parsePositiveInt('steps', values.steps, 400);
  const promptLen = parsePositiveInt('prompt-len', values['prompt-len'], 64);
  const threads = loadNative().setNumThreads(parsePositiveInt('threads', values.threads, 0));
  const dir = ensureBenchModel(name, (s) => console.error(s));
  const previous = process.env.EXPERTD_HUGE_PAGES;
  const rows: Cell[][] = [];
  const json: unknown[] = [];
  for (const format of formats) {
    const quantize = FORMATS[format];
    const arms = [false, true].map((huge) => {
      // Read per allocation: the weights at load and the KV cache when the engine allocates it.
      process.env.EXPERTD_HUGE_PAGES = huge ? '1' : '0';
      const loaded = loadModel(dir, quantize ? { fast: true, quantize } : { fast: true });
      const core = new EngineCore(loaded, {
        kvCacheBlocks: Math.ceil((promptLen + 64) / 16) + 2, kvCacheGb: 0, kvCacheDtype: 'bf16', blockSize: 16,
        maxNumSeqs: 1, maxNumBatchedTokens: Math.max(4096, promptLen), servedModelName: name, sampler: 'native',
      });
      let id = 0;
      const add = (): void => void core.add(benchRequest(id++, promptLen, 64));
      add();
      return { core, add, loaded, ms: [] as number[] };
    });
    if (previous === undefined) delete process.env.EXPERTD_HUGE_PAGES;
    else process.env.EXPERTD_HUGE_PAGES = previous;
    for (let i = 0; i < 2 * steps; i++) {
      const arm = arms[(i >> 1) & 1]!;
      const t0 = performance.now();
      const r = arm.core.step();
      if (r && r.metrics.decodeTokens === 1 && r.metrics.prefillTokens === 0) arm.ms.push(performance.now() - t0);
      if (!arm.core.hasWork()) arm.add();
    }
    const [small, huge] = arms.map((a) => a.ms) as [number[], number[]];
    const m0 = percentile(small, 0.5), m1 = percentile(huge, 0.5);
    console.error(`# ${name} ${format}: 4 KiB ${fmt(m0)} ms, 2 MiB ${fmt(m1)} ms per decode step`);
    rows.push([format, `${fmt(m0)} (${fmt(percentile(small, 0.25))}-${fmt(percentile(small, 0.75))})`,
      `${fmt(m1)} (${fmt(percentile(huge, 0.25))}-${fmt(percentile(huge, 0.75))})`, `${(100 * (m1 / m0 - 1)).toFixed(1)}%`, small.length]);
    json.push({ format, steps4k: small, steps2m: huge });
    for (const a of arms) a.loaded.model.dispose();
  }
  const mem = loadNative().weightMemory();
  console.log(`## huge-pages: ${name}, decode b1 (${promptLen}-token prompts, 64 new tokens per stream), two copies in one process alternating every other step, ${os.cpus()[0]?.model ?? 'cpu'}, ${threads} threads; madvise(MADV_HUGEPAGE) accepted: ${mem.hugePages}\n`);
  console.log(markdownTable(['format', '4 KiB pages ms (p25-p75)', '2 MiB pages ms (p25-p75)', 'change', 'steps per arm'], rows));
  if (values.json) writeJson(values.json, { bench: 'huge-pages', run: runInfo(), model: name, promptLen, results: json });
}
