// `npm run bench -- serve`: the real daemon (a child process on 127.0.0.1, Mixtral-like bench model,
// bf16) under a bounded closed-loop load of streaming completions at rising concurrency: output
// tokens/s, TTFT and inter-token latency percentiles, against the same daemon's single stream.
// --kv-cache-dtype f32,bf16,fp8 runs one daemon per KV cache dtype (KV blocks from its load line);
// --baseline-bin adds another checkout's daemon under the same load (issue 17's "today's"). Aggregate
// decode tokens/s comes from the streamed arrival times (decode-rate.ts).
// `serve --shared-prefix` runs the prefix-caching workload instead (serve-prefix.ts).
import { spawn, type ChildProcess } from 'node:child_process';
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import http, { type IncomingMessage } from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';

import { packageRoot } from '../src/native/index.js';
import { cpuMsWithin, decodeRate } from './decode-rate.js';
import { BENCH_MODEL_NAMES, ensureBenchModel, type BenchModelName } from './bench-models.js';
import { seriesChart } from '../src/plot/charts.js';
import { writePlot } from '../src/plot/render.js';
import { printStructured, runStructuredCompare } from './serve-structured.js';
import { fmt, markdownTable, parseIntList, parsePositiveInt, percentile, runInfo, writeJson, type Cell } from './harness.js';
import { runSharedPrefix } from './serve-prefix.js';

export interface Daemon {
  proc: ChildProcess; base: string; exit: Promise<number | null>; logTail: string[];
  /** From the load summary ("KV cache N blocks x B tokens DTYPE"); null until it is logged. */
  kvBlocks: () => number | null;
}

/** node arguments that run expertd from `bin`: a checkout's folder, its bin/expertd.js, or its
 * dist/src/cli/main.js (which exports main() and does not run it). */
export function expertdCommand(bin: string): string[] {
  const p = path.resolve(bin);
  if (!existsSync(p)) throw new RangeError(`--baseline-bin is ${bin}, which does not exist; give an expertd checkout's bin/expertd.js or dist/src/cli/main.js`);
  if (statSync(p).isDirectory()) return expertdCommand(path.join(p, 'bin', 'expertd.js'));
  if (path.basename(p) === 'main.js') {
    // NOTE: a script file, not `node -e`: the engine's worker thread inherits execArgv, and an -e
    // there would run instead of the worker.
    const wrapper = path.join(os.tmpdir(), `expertd-main-${process.pid}.mjs`);
    writeFileSync(wrapper, `const { main } = await import(${JSON.stringify(pathToFileURL(p).href)});\n` +
      'process.exitCode = await main(process.argv.slice(2));\n');
    return [wrapper];
  }
  return [p];
}

export async function startDaemon(modelDir: string, extra: string[], bin?: string): Promise<Daemon> {
  const cmd = expertdCommand(bin ?? path.join(packageRoot(), 'bin', 'expertd.js'));
  const args = [...cmd, 'serve', '--model', modelDir, '--host', '127.0.0.1', '--port', '0', '--log-level', 'info', ...extra];
  const proc = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  const logTail: string[] = [];
  const keep = (d: Buffer) => {
    logTail.push(d.toString());
    if (logTail.length > 50) logTail.shift();
  };
  const exit = new Promise<number | null>((resolve) => proc.on('exit', (code) => resolve(code)));
  let kvBlocks: number | null = null;
  const base = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`daemon did not start in 10 min:\n${logTail.join('')}`)), 600_000);
    let found = false;
    // NOTE: 'listening on' is an info line; later per-request lines are read and dropped (the
    // pipe must keep draining or the daemon would block on a full stdout).
    proc.stdout!.on('data', (d: Buffer) => {
      if (kvBlocks === null) {
        const kv = /KV cache (\d+) blocks/.exec(d.toString());
        if (kv) kvBlocks = Number(kv[1]);
      }
      if (found) return;
      keep(d);
      const m = /listening on (http:\/\/[0-9.:]+)/.exec(d.toString());
      if (m) { found = true; clearTimeout(timer); resolve(m[1]!); }
    });
    proc.stderr!.on('data', keep);
    proc.on('exit', (code) => { clearTimeout(timer); reject(new Error(`daemon exited (${code}):\n${logTail.join('')}`)); });
  });
  return { proc, base, exit, logTail, kvBlocks: () => kvBlocks };
}

/** `/health` answers 200 once the model is loaded (503 while loading). */
export async function waitHealthy(base: string, timeoutMs = 600_000): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    const r = await fetch(`${base}/health`).catch(() => null);
    if (r?.status === 200) return;
    if (performance.now() > deadline) throw new Error(`the daemon was not healthy after ${timeoutMs / 1000} s`);
    await new Promise((res) => setTimeout(res, 500));
  }
}

export interface RequestResult {
  ok: boolean;
  error?: string;
  startMs: number;
  ttftMs: number;
  endMs: number;
  tokens: number;
  /** Gaps between token arrivals; a chunk of n tokens after a gap g counts n gaps of g/n. */
  itlMs: number[];
  /** usage.prompt_tokens_details.cached_tokens of the streamed usage (NaN: absent). */
  cachedTokens: number;
  /** Arrival time of every token (performance.now() ms; a chunk of n tokens gives n equal times). */
  arrivalsMs: number[];
}

/** Sampling of the bench's requests: temperature 0 is greedy (top_p then unused). */
export interface BenchSampling { temperature: number; topP: number }
export const GREEDY: BenchSampling = { temperature: 0, topP: 1 };
export const samplingLabel = (s: BenchSampling): string => s.temperature === 0 ? 'greedy' : `T ${s.temperature}, top_p ${s.topP}`;

/**
 * POST a JSON body over node:http. NOTE: not fetch: undici fails a response body that stays silent
 * for 300 s, which a request queued behind a full KV cache on a loaded machine can be before its
 * first token; node:http has no such timeout (the daemon's own stall timeout still applies).
 */
function postJson(url: string, body: unknown): Promise<IncomingMessage> {
  const u = new URL(url);
  const data = JSON.stringify(body);
  return new Promise((resolve, reject) => {
    const req = http.request({ hostname: u.hostname, port: u.port, path: u.pathname, method: 'POST',
      headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(data) } }, resolve);
    req.on('error', reject);
    req.end(data);
  });
}

/** One streaming completion over node:http + SSE parsing; times token arrivals. */
export async function streamOne(base: string, model: string, prompt: number[], maxTokens: number,
                                sampling: BenchSampling = GREEDY, seed?: number): Promise<RequestResult> {
  const start = performance.now();
  const res: RequestResult = { ok: false, startMs: start, ttftMs: NaN, endMs: NaN, tokens: 0, itlMs: [], cachedTokens: NaN, arrivalsMs: [] };
  try {
    const r = await postJson(`${base}/v1/completions`, {
      model, prompt, max_tokens: maxTokens, temperature: sampling.temperature, ignore_eos: true, stream: true,
      ...(sampling.temperature > 0 ? { top_p: sampling.topP } : {}), ...(seed !== undefined ? { seed } : {}),
      return_token_ids: true, stream_options: { include_usage: true },
    });
    if (r.statusCode !== 200) {
      let text = '';
      for await (const part of r) text += String(part);
      res.error = `HTTP ${r.statusCode}: ${text.slice(0, 200)}`;
      return res;
    }
    const decoder = new TextDecoder();
    let buf = '';
    let last = NaN;
    let usageTokens = -1;
    for await (const part of r as AsyncIterable<Buffer>) {
      const now = performance.now();
      buf += decoder.decode(part, { stream: true });
      let sep: number;
      while ((sep = buf.indexOf('\n\n')) >= 0) {
        const event = buf.slice(0, sep);
        buf = buf.slice(sep + 2);
        if (!event.startsWith('data: ')) continue;
        const data = event.slice(6);
        if (data === '[DONE]') continue;
        const j = JSON.parse(data) as { choices: { token_ids?: number[] }[];
          usage?: { completion_tokens: number; prompt_tokens_details?: { cached_tokens: number } } | null };
        if (j.usage) usageTokens = j.usage.completion_tokens;
        if (j.usage?.prompt_tokens_details) res.cachedTokens = j.usage.prompt_tokens_details.cached_tokens;
        const n = j.choices[0]?.token_ids?.length ?? 0;
        if (n === 0) continue;
        if (res.tokens === 0) res.ttftMs = now - start;
        else for (let i = 0; i < n; i++) res.itlMs.push((now - last) / n);
        res.tokens += n;
        for (let i = 0; i < n; i++) res.arrivalsMs.push(now);
        last = now;
      }
    }
    res.endMs = performance.now();
    if (usageTokens >= 0 && usageTokens !== res.tokens) res.error = `usage says ${usageTokens} tokens, stream had ${res.tokens}`;
    else if (res.tokens !== maxTokens) res.error = `got ${res.tokens} tokens, expected ${maxTokens} (ignore_eos)`;
    else res.ok = true;
  } catch (e) {
    res.error = (e as Error).message;
  }
  return res;
}

export function promptIds(seed: number, n: number): number[] {
  let a = (seed * 2654435761) >>> 0 || 1;
  return Array.from({ length: n }, () => {
    a ^= a << 13; a ^= a >>> 17; a ^= a << 5; a >>>= 0;
    return 100 + (a % 30000);
  });
}

interface Level {
  /** 'current' (this checkout) or 'baseline' (--baseline-bin). */
  daemon: string;
  sampling: string;
  /** Rank processes behind the front (--nproc-per-node; 1 = the engine in the daemon's process). */
  ranks: number;
  /** --kv-cache-dtype of the daemon ('auto' when not given) and the KV blocks it allocated. */
  kvDtype?: string;
  kvBlocks?: number | null;
  concurrency: number;
  requests: number;
  failed: number;
  errors: string[];
  wallS: number;
  outputTokens: number;
  outputTokPerS: number;
  ttftP50Ms: number;
  ttftP99Ms: number;
  itlP50Ms: number;
  itlP99Ms: number;
  /** Aggregate decode (decode-rate.ts): tokens after each first token over the time some stream
   * decoded, and over the window in which every stream decoded (NaN: there was none). */
  decodeTokens: number;
  decodeBusyS: number;
  decodeTokPerS: number;
  steadyS: number;
  steadyTokPerS: number;
  /** The same counts per CPU-second of the daemon process (all its threads; /proc, Linux, one rank):
   * what a shared machine's load changes far less than the wall rates. NaN where not measured. */
  decodeTokPerCpuS: number;
  steadyTokPerCpuS: number;
  loadAverage: number[];
}

/** Closed loop: `c` clients, each sends `rounds` requests one after another. */
let clockTicksPerS = 0;
/** Cumulative user + system CPU ms of a process (all threads), or NaN where /proc cannot tell. */
function processCpuMs(pid: number): number {
  try {
    if (!clockTicksPerS) clockTicksPerS = Number(execFileSync('getconf', ['CLK_TCK']).toString().trim()) || 100;
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');  // f[0] is field 3 (state)
    return (Number(f[11]) + Number(f[12])) * 1000 / clockTicksPerS;  // fields 14 utime, 15 stime
  } catch {
    return NaN;
  }
}

async function runLevel(base: string, model: string, ranks: number, c: number, rounds: number, promptLen: number,
                        maxTokens: number, sampling: BenchSampling, pid?: number): Promise<Level> {
  // The daemon's CPU time every 200 ms (one rank only: rank processes are other pids).
  const cpuSamples: [number, number][] = [];
  const sampleCpu = () => {
    const cpu = pid !== undefined && ranks === 1 ? processCpuMs(pid) : NaN;
    if (!Number.isNaN(cpu)) cpuSamples.push([performance.now(), cpu]);
  };
  sampleCpu();
  const timer = setInterval(sampleCpu, 200);
  const t0 = performance.now();
  const all: RequestResult[] = [];
  const arrivals: { client: number; round: number; arrivalsMs: number[] }[] = [];
  await Promise.all(Array.from({ length: c }, async (_, client) => {
    for (let r = 0; r < rounds; r++) {
      const seed = 1000 * c + 10 * client + r;
      const res = await streamOne(base, model, promptIds(seed, promptLen), maxTokens, sampling, seed);
      all.push(res);
      arrivals.push({ client, round: r, arrivalsMs: res.arrivalsMs });
    }
  }));
  clearInterval(timer);
  sampleCpu();
  const rate = decodeRate(arrivals);
  const busyCpuMs = cpuMsWithin(cpuSamples, rate.busyIntervalsMs);
  const steadyCpuMs = Number.isNaN(rate.steadyFromMs) ? NaN : cpuMsWithin(cpuSamples, [[rate.steadyFromMs, rate.steadyToMs]]);
  const wallS = (performance.now() - t0) / 1e3;
  const ok = all.filter((r) => r.ok);
  const outputTokens = all.reduce((a, r) => a + r.tokens, 0);
  const ttft = ok.map((r) => r.ttftMs);
  const itl = ok.flatMap((r) => r.itlMs);
  return {
    daemon: 'current', sampling: samplingLabel(sampling), ranks, concurrency: c, requests: all.length, failed: all.length - ok.length,
    errors: [...new Set(all.filter((r) => !r.ok).map((r) => r.error ?? '?'))].slice(0, 5),
    wallS, outputTokens, outputTokPerS: outputTokens / wallS,
    ttftP50Ms: percentile(ttft, 0.5), ttftP99Ms: percentile(ttft, 0.99),
    itlP50Ms: percentile(itl, 0.5), itlP99Ms: percentile(itl, 0.99),
    decodeTokens: rate.decodeTokens, decodeBusyS: rate.decodeBusyS, decodeTokPerS: rate.decodeTokPerS,
    steadyS: (rate.steadyToMs - rate.steadyFromMs) / 1e3, steadyTokPerS: rate.steadyTokPerS,
    decodeTokPerCpuS: busyCpuMs > 0 ? rate.decodeTokens / (busyCpuMs / 1e3) : NaN,
    steadyTokPerCpuS: steadyCpuMs > 0 ? rate.steadyTokens / (steadyCpuMs / 1e3) : NaN,
    loadAverage: os.loadavg(),
  };
}

export async function runServe(argv: string[]): Promise<void> {
  if (argv.includes('--shared-prefix')) return runSharedPrefix(argv.filter((a) => a !== '--shared-prefix'));
  const { values } = parseArgs({
    args: argv,
    options: {
      json: { type: 'string' }, plot: { type: 'string' }, model: { type: 'string' },
      concurrency: { type: 'string' }, 'prompt-len': { type: 'string' }, 'max-tokens': { type: 'string' },
      rounds: { type: 'string' }, threads: { type: 'string' }, 'max-num-batched-tokens': { type: 'string' },
      'nproc-per-node': { type: 'string' }, 'dist-moe': { type: 'string' },
      'kv-cache-dtype': { type: 'string' }, 'kv-cache-gb': { type: 'string' },
      structured: { type: 'boolean' }, pairs: { type: 'string' }, items: { type: 'string' },
      temperature: { type: 'string' }, 'top-p': { type: 'string' }, 'baseline-bin': { type: 'string' },
    },
    strict: true,
  });
  const levels = values.concurrency ? parseIntList('concurrency', values.concurrency) : [1, 2, 4, 8, 16, 32];
  const promptLen = Math.max(1, parsePositiveInt('prompt-len', values['prompt-len'], 128));
  const maxTokens = Math.max(2, parsePositiveInt('max-tokens', values['max-tokens'], 64));
  const rounds = Math.max(1, parsePositiveInt('rounds', values.rounds, 2));
  const threads = parsePositiveInt('threads', values.threads, 0);
  const maxNumSeqs = Math.max(...levels, 32);
  const batched = parsePositiveInt('max-num-batched-tokens', values['max-num-batched-tokens'], 512);
  const name = (values.model ?? 'mixtral-like') as BenchModelName;
  if (!BENCH_MODEL_NAMES.includes(name)) throw new RangeError(`--model is "${name}", expected one of ${BENCH_MODEL_NAMES.join(', ')}`);
  const dir = ensureBenchModel(name, (s) => console.error(s));
  const flags = ['--compute-dtype', 'bf16', '--max-num-seqs', String(maxNumSeqs), '--threads', String(threads),
    '--max-num-batched-tokens', String(batched), ...(values['dist-moe'] ? ['--dist-moe', values['dist-moe']] : [])];
  if (values['kv-cache-gb']) flags.push('--kv-cache-gb', values['kv-cache-gb']);
  // Rank processes: every count gets its own daemon and the same load (1 = the plain daemon); so does
  // every KV cache dtype ('' = the daemon's auto).
  const rankCounts = values['nproc-per-node'] ? parseIntList('nproc-per-node', values['nproc-per-node']) : [1];
  const kvDtypes = values['kv-cache-dtype'] ? values['kv-cache-dtype'].split(',') : [''];
  for (const k of kvDtypes) {
    if (!['', 'auto', 'f32', 'bf16', 'fp8'].includes(k)) throw new RangeError(`--kv-cache-dtype lists '${k}', expected auto, f32, bf16 or fp8`);
  }
  const samplings = parseSamplings(values.temperature, values['top-p']);
  const baselineBin = values['baseline-bin'];
  if (baselineBin) expertdCommand(baselineBin);  // fails now, not after the first daemons ran
  const info = runInfo();
  if (values.structured) {
    // The cost of structured output (serve-structured.ts) instead of the concurrency sweep.
    const pairs = Math.max(2, parsePositiveInt('pairs', values.pairs, 12));
    const items = Math.max(4, parsePositiveInt('items', values.items, 48));
    console.error(`# starting expertd serve --model ${dir} ${flags.join(' ')}`);
    const d = await startDaemon(dir, flags);
    try {
      await waitHealthy(d.base);
      const model = ((await (await fetch(`${d.base}/v1/models`)).json()) as { data: { id: string }[] }).data[0]!.id;
      const r = await runStructuredCompare(d.base, model, (i) => promptIds(500 + i, promptLen), pairs, items);
      printStructured(r, name);
      if (values.json) writeJson(values.json, { bench: 'serve-structured', run: info, loadAverageEnd: os.loadavg(), model: name, flags, promptLen, ...r });
    } finally {
      d.proc.kill('SIGTERM');
      await d.exit;
    }
    return;
  }
  const results: Level[] = [];
  // The baseline daemon first (one rank, its own KV default: f32 where it predates --kv-cache-dtype).
  const daemons: { daemon: string; ranks: number; kv: string; bin?: string }[] = [
    ...(baselineBin ? [{ daemon: 'baseline', ranks: 1, kv: 'f32', bin: baselineBin }] : []),
    ...rankCounts.flatMap((ranks) => kvDtypes.map((kv) => ({ daemon: 'current', ranks, kv }))),
  ];
  for (const { daemon, ranks, kv, bin } of daemons) {
    const rankFlags = [...(ranks > 1 ? [...flags, '--nproc-per-node', String(ranks)] : flags),
      ...(kv && daemon === 'current' ? ['--kv-cache-dtype', kv] : [])];
    console.error(`# starting ${daemon} expertd serve --model ${dir} ${rankFlags.join(' ')}${bin ? ` (${bin})` : ''}`);
    const t0 = performance.now();
    const d = await startDaemon(dir, rankFlags, bin);
    try {
      await waitHealthy(d.base);
      console.error(`# ready in ${((performance.now() - t0) / 1e3).toFixed(1)} s; warm-up request...`);
      const model = ((await (await fetch(`${d.base}/v1/models`)).json()) as { data: { id: string }[] }).data[0]!.id;
      const warm = await streamOne(d.base, model, promptIds(7, promptLen), 8);
      if (!warm.ok) throw new Error(`warm-up request failed: ${warm.error}`);
      for (const sampling of samplings) for (const c of levels) {
        const lv = await runLevel(d.base, model, ranks, c, rounds, promptLen, maxTokens, sampling, d.proc.pid);
        lv.daemon = daemon;
        lv.kvDtype = kv || 'auto';
        lv.kvBlocks = d.kvBlocks();
        console.error(`# ${daemon}, ${ranks} rank(s), KV ${lv.kvDtype}, ${lv.sampling}, concurrency ${c}: ${fmt(lv.outputTokPerS)} tok/s, ` +
          `decode ${fmt(lv.decodeTokPerS)} tok/s (steady ${fmt(lv.steadyTokPerS)}), per CPU-s ${fmt(lv.decodeTokPerCpuS)} ` +
          `(steady ${fmt(lv.steadyTokPerCpuS)}), TTFT p50 ${fmt(lv.ttftP50Ms)} ms, ` +
          `ITL p50/p99 ${fmt(lv.itlP50Ms)}/${fmt(lv.itlP99Ms)} ms, ${lv.failed} failed, load avg ${lv.loadAverage.map((v) => v.toFixed(1)).join(' ')}`);
        results.push(lv);
      }
    } finally {
      d.proc.kill('SIGTERM');
      const timer = setTimeout(() => d.proc.kill('SIGKILL'), 15_000);
      await d.exit;
      clearTimeout(timer);
    }
  }

  // Ratios: against the same daemon's single stream, against one rank at the same concurrency, and
  // against the first KV dtype and the baseline daemon at the same concurrency and sampling.
  const kv0 = kvDtypes[0] || 'auto';
  const s0 = samplingLabel(samplings[0]!);
  const cur = results.filter((r) => r.daemon === 'current');
  const same = (r: Level, q: Level) => q.concurrency === r.concurrency && q.sampling === r.sampling;
  const single = cur.find((r) => r.concurrency === 1 && r.ranks === rankCounts[0] && r.kvDtype === kv0 && r.sampling === s0);
  const singleOf = (r: Level) => results.find((q) => q.daemon === r.daemon && q.concurrency === 1 && q.ranks === r.ranks && q.kvDtype === r.kvDtype && q.sampling === r.sampling);
  const oneRank = (r: Level) => cur.find((q) => same(r, q) && q.ranks === 1 && q.kvDtype === r.kvDtype);
  const firstKv = (r: Level) => cur.find((q) => same(r, q) && q.ranks === r.ranks && q.kvDtype === kv0);
  const baseOf = (r: Level) => results.find((q) => same(r, q) && q.daemon === 'baseline');
  const ratio = (x: number, y: number | undefined) => (y === undefined || !(y > 0) || Number.isNaN(x) ? '-' : `${fmt(x / y)}x`);
  const rows: Cell[][] = results.map((r) => {
    const s1 = singleOf(r), r1 = r.daemon === 'current' ? oneRank(r) : undefined, k1 = r.daemon === 'current' ? firstKv(r) : undefined;
    const b1 = baseOf(r);
    return [
      r.daemon, r.ranks, r.kvDtype!, r.kvBlocks ?? '-', r.sampling, r.concurrency, r.requests, r.failed, r.outputTokPerS,
      r.decodeTokPerS, Number.isNaN(r.steadyTokPerS) ? '-' : r.steadyTokPerS,
      ratio(r.decodeTokPerS, b1?.decodeTokPerS), ratio(r.decodeTokPerS, k1?.decodeTokPerS),
      Number.isNaN(r.decodeTokPerCpuS) ? '-' : r.decodeTokPerCpuS, Number.isNaN(r.steadyTokPerCpuS) ? '-' : r.steadyTokPerCpuS,
      ratio(r.decodeTokPerCpuS, b1?.decodeTokPerCpuS),
      ratio(r.outputTokPerS, s1?.outputTokPerS), ratio(r.outputTokPerS, r1?.outputTokPerS),
      r.ttftP50Ms, r.ttftP99Ms, r.itlP50Ms, r.itlP99Ms, ratio(r.itlP99Ms, s1?.itlP99Ms),
      r.loadAverage[0]!.toFixed(1),
    ];
  });
  console.log(`## serve: expertd daemon, ${name} (bf16), ${os.cpus()[0]?.model ?? 'cpu'}\n`);
  console.log(`Streaming /v1/completions, ${promptLen}-token prompts, max_tokens ${maxTokens}, ignore_eos, sampling ` +
    `${samplings.map(samplingLabel).join(' / ')} (seeded); closed loop: c clients x ${rounds} requests each; daemon flags: ` +
    `${flags.join(' ')}${baselineBin ? `; baseline: ${baselineBin} with the same flags` : ''}. Load average at start ` +
    `${info.loadAverage instanceof Array ? (info.loadAverage as number[]).map((v) => v.toFixed(1)).join(' ') : ''}.\n`);
  console.log('output tok/s: all tokens over the wall time of the level. decode tok/s: the tokens after each request\'s first ' +
    'token over the time at least one stream was decoding (the union of [first token, last token] over requests; ' +
    'prefill steps of other requests inside it count). steady: the same count over the window in which every client\'s ' +
    'stream had its first token and none had finished ("-": all streams never decoded at once, e.g. the KV cache held ' +
    'fewer). per CPU-s: the same token counts over the daemon process\'s CPU time (all threads) in the same spans, ' +
    'which a shared machine\'s load moves far less than wall time. Ratios at the same concurrency and sampling.\n');
  console.log(markdownTable(
    ['daemon', 'ranks', 'KV', 'KV blocks', 'sampling', 'concurrency', 'requests', 'failed', 'output tok/s', 'decode tok/s',
      'steady decode tok/s', 'decode vs baseline', `decode vs KV ${kv0}`, 'decode tok per CPU-s', 'steady per CPU-s',
      'per CPU-s vs baseline', 'output vs c=1', 'output vs 1 rank',
      'TTFT p50 ms', 'TTFT p99 ms', 'ITL p50 ms', 'ITL p99 ms', 'ITL p99 vs c=1', 'load 1m'],
    rows));
  for (const r of results) if (r.errors.length) console.log(`\n${r.daemon}, ${r.ranks} rank(s), KV ${r.kvDtype}, ${r.sampling}, concurrency ${r.concurrency} errors: ${r.errors.join('; ')}`);
  if (kvDtypes.length > 1) {
    console.log(`\nKV cache dtype (vs ${kv0}, same concurrency and sampling):\n`);
    for (const r of cur) {
      const k1 = firstKv(r);
      if (!k1 || r.kvDtype === kv0 || r.concurrency < 16) continue;
      const cap = r.kvBlocks && k1.kvBlocks ? `${fmt(r.kvBlocks / k1.kvBlocks)}x KV blocks` : 'KV blocks not logged';
      console.log(`- ${r.kvDtype}, ${r.sampling}, ${r.concurrency} streams: ${ratio(r.decodeTokPerS, k1.decodeTokPerS)} aggregate decode, ` +
        `${ratio(r.outputTokPerS, k1.outputTokPerS)} output tok/s, ${cap}`);
    }
  }
  const c16 = cur.find((r) => r.concurrency === 16 && r.ranks === rankCounts[0] && r.kvDtype === kv0 && r.sampling === s0);
  console.log('\nTargets:\n');
  if (single && c16) {
    const tp = c16.outputTokPerS / single.outputTokPerS;
    console.log(`- 16 streams >= 5x single-stream throughput: ${fmt(tp)}x -> ${tp >= 5 ? 'PASS' : 'FAIL'}`);
    const itl = c16.itlP99Ms / single.itlP99Ms;
    console.log(`- p99 ITL at 16 streams within 3x of single-stream: ${fmt(itl)}x -> ${itl <= 3 ? 'PASS' : 'FAIL'}`);
  } else {
    console.log('- 16 vs 1 stream: NOT MEASURED (needs concurrency 1 and 16)');
  }
  const at64 = cur.filter((r) => r.concurrency === 64 && baseOf(r));
  if (at64.length === 0) console.log('- aggregate decode at 64 streams >= 1.2x the baseline: NOT MEASURED (needs --baseline-bin and concurrency 64)');
  for (const r of at64) {
    const b = baseOf(r)!;
    const x = r.decodeTokPerS / b.decodeTokPerS, y = r.decodeTokPerCpuS / b.decodeTokPerCpuS;
    console.log(`- aggregate decode at 64 streams >= 1.2x the baseline, KV ${r.kvDtype}, ${r.sampling}: ${fmt(x)}x (wall) ` +
      `-> ${x >= 1.2 ? 'PASS' : 'FAIL'}; per CPU-second ${fmt(y)}x`);
  }
  if (values.json) writeJson(values.json, { bench: 'serve', run: info, loadAverageEnd: os.loadavg(), model: name, dir, flags,
    promptLen, maxTokens, rounds, rankCounts, samplings, baselineBin: baselineBin ?? null, levels: results });
  if (values.plot) {
    const at = (ranks: number) => levels.map((c) => cur.find((r) => r.ranks === ranks && r.concurrency === c && r.kvDtype === kv0 && r.sampling === s0));
    const note = `${promptLen}-token prompts, max_tokens ${maxTokens}, ${rounds} requests per client`;
    const tput = await writePlot(values.plot, seriesChart({
      title: `expertd serve ${name}: output tokens/s vs concurrency`, note,
      x: levels, xTitle: 'concurrent streams', yTitle: 'output throughput (tokens/s)', legendTitle: 'ranks',
      series: [...rankCounts.map((ranks) => ({ name: `${ranks} rank(s)`, values: at(ranks).map((r) => r?.outputTokPerS ?? null) })),
        ...(single ? [{ name: 'linear from c=1', dashed: true, values: levels.map((c) => single.outputTokPerS * c) }] : [])],
    }));
    const lat = await writePlot(`${values.plot.replace(/\.png$/i, '')}-latency.png`, seriesChart({
      title: `expertd serve ${name}: latency percentiles vs concurrency`, note,
      x: levels, xTitle: 'concurrent streams', yTitle: 'latency (ms)', legendTitle: 'percentile',
      series: rankCounts.flatMap((ranks) => {
        const lv = at(ranks);
        const tag = rankCounts.length > 1 ? `, ${ranks} rank(s)` : '';
        return [
          { name: `TTFT p50${tag}`, values: lv.map((r) => r?.ttftP50Ms ?? null) },
          { name: `TTFT p99${tag}`, values: lv.map((r) => r?.ttftP99Ms ?? null), dashed: true },
          { name: `ITL p50${tag}`, values: lv.map((r) => r?.itlP50Ms ?? null) },
          { name: `ITL p99${tag}`, values: lv.map((r) => r?.itlP99Ms ?? null), dashed: true },
        ];
      }),
    }));
    console.error(`# wrote ${tput.png} and ${lat.png} (with .svg and .vl.json beside them)`);
  }
}

/** --temperature / --top-p: comma lists, one sampling mode per pair (a single value pairs with all). */
export function parseSamplings(temperature: string | undefined, topP: string | undefined): BenchSampling[] {
  const num = (flag: string, v: string, lo: number, hi: number) => {
    const x = Number(v);
    if (v.trim() === '' || !Number.isFinite(x) || x < lo || x > hi) throw new RangeError(`--${flag} lists '${v}', expected a number in [${lo}, ${hi}]`);
    return x;
  };
  const ts = (temperature ?? '0').split(',').map((v) => num('temperature', v, 0, 2));
  const ps = (topP ?? '1').split(',').map((v) => num('top-p', v, 1e-6, 1));
  if (ts.length > 1 && ps.length > 1 && ts.length !== ps.length)
    throw new RangeError(`--temperature lists ${ts.length} values and --top-p ${ps.length}; give one value or as many as the other`);
  return Array.from({ length: Math.max(ts.length, ps.length) }, (_, i) => ({ temperature: ts[ts.length > 1 ? i : 0]!, topP: ps[ps.length > 1 ? i : 0]! }));
}
