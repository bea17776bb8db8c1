// `npm run bench -- serve --shared-prefix`: the prefix-caching workload on the real daemon. One long
// system prompt (1,000 tokens) shared by many short questions, with prefix caching on (the default)
// and with --no-prefix-caching: the TTFT of a warm request against a cold one (target <= 0.2x), and
// closed-loop throughput with and without the cache.
import os from 'node:os';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';

import { BENCH_MODEL_NAMES, ensureBenchModel, type BenchModelName } from './bench-models.js';
import { fmt, markdownTable, parsePositiveInt, percentile, runInfo, writeJson, type Cell } from './harness.js';
import { promptIds, startDaemon, streamOne, waitHealthy, type RequestResult } from './serve.js';

interface TtftPhase {
  /** One per system prompt: its first request (nothing of it cached yet). */
  coldMs: number[];
  /** The later questions on the same system prompt, one at a time. */
  warmMs: number[];
  warmCachedTokens: number[];
  failed: number;
}

interface LoadPhase {
  requests: number;
  failed: number;
  wallS: number;
  outputTokens: number;
  outputTokPerS: number;
  requestsPerS: number;
  ttftP50Ms: number;
  ttftP99Ms: number;
  cachedTokensMean: number;
}

interface DaemonRun {
  prefixCaching: boolean;
  ttft: TtftPhase;
  load: LoadPhase;
  /** expertd_prefix_cache_queries_total / _hits_total at the end. */
  queriesTotal: number;
  hitsTotal: number;
  loadAverage: number[];
}

const metricValue = (text: string, name: string): number => {
  const m = new RegExp(`^${name} (\\S+)$`, 'm').exec(text);
  return m ? Number(m[1]) : NaN;
};

const question = (seed: number, n: number) => promptIds(seed, n);

function summary(xs: number[]): string {
  if (xs.length === 0) return '-';
  return `${fmt(percentile(xs, 0.5))} [${fmt(Math.min(...xs))}-${fmt(Math.max(...xs))}]`;
}

export async function runSharedPrefix(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      json: { type: 'string' }, model: { type: 'string' }, 'system-len': { type: 'string' }, 'question-len': { type: 'string' },
      'max-tokens': { type: 'string' }, reps: { type: 'string' }, warm: { type: 'string' }, concurrency: { type: 'string' },
      rounds: { type: 'string' }, threads: { type: 'string' }, 'max-num-batched-tokens': { type: 'string' },
    },
    strict: true,
  });
  const systemLen = Math.max(1, parsePositiveInt('system-len', values['system-len'], 1000));
  const questionLen = Math.max(1, parsePositiveInt('question-len', values['question-len'], 16));
  const maxTokens = Math.max(1, parsePositiveInt('max-tokens', values['max-tokens'], 16));
  const reps = Math.max(1, parsePositiveInt('reps', values.reps, 3));
  const warmPerRep = Math.max(1, parsePositiveInt('warm', values.warm, 3));
  const concurrency = Math.max(1, parsePositiveInt('concurrency', values.concurrency, 4));
  const rounds = Math.max(1, parsePositiveInt('rounds', values.rounds, 4));
  const threads = parsePositiveInt('threads', values.threads, 0);
  const batched = parsePositiveInt('max-num-batched-tokens', values['max-num-batched-tokens'], 512);
  const name = (values.model ?? 'mixtral-like') as BenchModelName;
  if (!BENCH_MODEL_NAMES.includes(name)) throw new RangeError(`--model is "${name}", expected one of ${BENCH_MODEL_NAMES.join(', ')}`);
  const dir = ensureBenchModel(name, (s) => console.error(s));
  const flags = ['--compute-dtype', 'bf16', '--max-num-seqs', String(Math.max(concurrency, 16)), '--threads', String(threads),
    '--max-num-batched-tokens', String(batched)];
  const info = runInfo();
  const runs: DaemonRun[] = [];

  for (const prefixCaching of [true, false]) {
    const daemonFlags = prefixCaching ? flags : [...flags, '--no-prefix-caching'];
    console.error(`# starting expertd serve --model ${dir} ${daemonFlags.join(' ')}`);
    const d = await startDaemon(dir, daemonFlags);
    try {
      await waitHealthy(d.base);
      const model = ((await (await fetch(`${d.base}/v1/models`)).json()) as { data: { id: string }[] }).data[0]!.id;
      // Warm-up on a prompt of its own (kernels, thread pool, allocator), shared with nothing below.
      const w = await streamOne(d.base, model, promptIds(9, systemLen + questionLen), 4);
      if (!w.ok) throw new Error(`warm-up request failed: ${w.error}`);

      // (1) TTFT, one request at a time: per system prompt, a cold question then warm ones.
      const ttft: TtftPhase = { coldMs: [], warmMs: [], warmCachedTokens: [], failed: 0 };
      for (let r = 0; r < reps; r++) {
        const system = promptIds(50_000 + r, systemLen);
        for (let q = 0; q <= warmPerRep; q++) {
          const res = await streamOne(d.base, model, [...system, ...question(60_000 + 100 * r + q, questionLen)], maxTokens);
          if (!res.ok) { ttft.failed++; console.error(`# failed: ${res.error}`); continue; }
          if (q === 0) ttft.coldMs.push(res.ttftMs);
          else { ttft.warmMs.push(res.ttftMs); ttft.warmCachedTokens.push(res.cachedTokens); }
        }
        console.error(`# prefix caching ${prefixCaching ? 'on' : 'off'}, system prompt ${r}: cold TTFT ${fmt(ttft.coldMs.at(-1))} ms, ` +
          `warm ${ttft.warmMs.slice(-warmPerRep).map((x) => fmt(x)).join(', ')} ms`);
      }

      // (2) Closed loop: c clients, each asks `rounds` questions on one new shared system prompt.
      const system = promptIds(70_000, systemLen);
      const all: RequestResult[] = [];
      const t0 = performance.now();
      await Promise.all(Array.from({ length: concurrency }, async (_, client) => {
        for (let j = 0; j < rounds; j++)
          all.push(await streamOne(d.base, model, [...system, ...question(80_000 + 100 * client + j, questionLen)], maxTokens));
      }));
      const wallS = (performance.now() - t0) / 1e3;
      const ok = all.filter((x) => x.ok);
      const outputTokens = ok.reduce((a, x) => a + x.tokens, 0);
      const load: LoadPhase = {
        requests: all.length, failed: all.length - ok.length, wallS, outputTokens,
        outputTokPerS: outputTokens / wallS, requestsPerS: ok.length / wallS,
        ttftP50Ms: percentile(ok.map((x) => x.ttftMs), 0.5), ttftP99Ms: percentile(ok.map((x) => x.ttftMs), 0.99),
        cachedTokensMean: ok.reduce((a, x) => a + x.cachedTokens, 0) / Math.max(1, ok.length),
      };
      console.error(`# prefix caching ${prefixCaching ? 'on' : 'off'}, ${concurrency} clients: ${fmt(load.outputTokPerS)} tok/s, ` +
        `${fmt(load.requestsPerS)} req/s, TTFT p50 ${fmt(load.ttftP50Ms)} ms, ${load.failed} failed`);
      const text = await (await fetch(`${d.base}/metrics`)).text();
      runs.push({
        prefixCaching, ttft, load, queriesTotal: metricValue(text, 'expertd_prefix_cache_queries_total'),
        hitsTotal: metricValue(text, 'expertd_prefix_cache_hits_total'), loadAverage: os.loadavg(),
      });
    } finally {
      d.proc.kill('SIGTERM');
      const timer = setTimeout(() => d.proc.kill('SIGKILL'), 15_000);
      await d.exit;
      clearTimeout(timer);
    }
  }

  const on = runs.find((r) => r.prefixCaching)!;
  const off = runs.find((r) => !r.prefixCaching)!;
  const med = (xs: number[]) => percentile(xs, 0.5);
  console.log(`## serve --shared-prefix: expertd daemon, ${name} (bf16), ${os.cpus()[0]?.model ?? 'cpu'}\n`);
  console.log(`Streaming /v1/completions: a ${systemLen}-token system prompt + a ${questionLen}-token question, max_tokens ` +
    `${maxTokens}, ignore_eos, temperature 0; daemon flags: ${flags.join(' ')} (and --no-prefix-caching). Load average at ` +
    `start ${(info.loadAverage as number[]).map((v) => v.toFixed(1)).join(' ')}.\n`);
  console.log(`TTFT, one request at a time: ${reps} system prompts, each asked 1 cold + ${warmPerRep} warm questions ` +
    '(ms, median [min-max]):\n');
  const ttftRows: Cell[][] = runs.map((r) => [
    r.prefixCaching ? 'on' : 'off', summary(r.ttft.coldMs), summary(r.ttft.warmMs),
    `${fmt(med(r.ttft.warmMs) / med(r.ttft.coldMs))}x`, r.prefixCaching ? fmt(med(r.ttft.warmCachedTokens)) : '0', r.ttft.failed,
  ]);
  console.log(markdownTable(['prefix caching', 'cold TTFT ms', 'warm TTFT ms', 'warm / cold', 'warm cached tokens', 'failed'], ttftRows));
  console.log(`\nClosed loop: ${concurrency} clients x ${rounds} questions on one new shared system prompt:\n`);
  const loadRows: Cell[][] = runs.map((r) => [
    r.prefixCaching ? 'on' : 'off', r.load.requests, r.load.failed, r.load.wallS, r.load.outputTokPerS, r.load.requestsPerS,
    `${fmt(r.load.outputTokPerS / off.load.outputTokPerS)}x`, r.load.ttftP50Ms, r.load.ttftP99Ms, r.load.cachedTokensMean,
    Number.isFinite(r.hitsTotal / r.queriesTotal) ? `${((100 * r.hitsTotal) / r.queriesTotal).toFixed(0)}%` : '-',
    r.loadAverage[0]!.toFixed(1),
  ]);
  console.log(markdownTable(['prefix caching', 'requests', 'failed', 'wall s', 'output tok/s', 'requests/s', 'vs off', 'TTFT p50 ms',
    'TTFT p99 ms', 'cached tokens / request', 'hit rate (all)', 'load 1m'], loadRows));
  const ratio = med(on.ttft.warmMs) / med(on.ttft.coldMs);
  console.log('\nTargets:\n');
  console.log(`- warm TTFT <= 0.2x cold (medians, prefix caching on): ${fmt(ratio)}x -> ${ratio <= 0.2 ? 'PASS' : 'FAIL'}` +
    ` (without the cache the same warm questions take ${fmt(med(off.ttft.warmMs) / med(off.ttft.coldMs))}x)`);
  console.log(`- throughput with / without prefix caching: ${fmt(on.load.outputTokPerS / off.load.outputTokPerS)}x output tok/s`);
  if (values.json) writeJson(values.json, { bench: 'serve-shared-prefix', run: info, loadAverageEnd: os.loadavg(), model: name, dir, flags,
    systemLen, questionLen, maxTokens, reps, warmPerRep, concurrency, rounds, runs });
}
