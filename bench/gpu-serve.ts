// `npm run bench -- gpu-serve`: `expertd serve --device cuda` against the same daemon on the CPU
// engine, through the HTTP API on a bench checkpoint (bf16): prefill tokens/s (one long prompt),
// decode tokens/s at batch 1 and batch 8 (concurrent streams), and whether their greedy texts agree.
import { readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';

import { BENCH_MODEL_NAMES, ensureBenchModel, type BenchModelName } from './bench-models.js';
import { fmt, markdownTable, parsePositiveInt, runInfo, writeJson, type Cell } from './harness.js';
import { promptIds as benchPromptIds, startDaemon, streamOne, waitHealthy, type RequestResult } from './serve.js';

interface DeviceResult {
  device: string;
  readyS: number;
  prefillTokPerS: number[];
  decodeB1TokPerS: number[];
  decodeB8TokPerS: number[];
  greedyText: string | null;
  errors: string[];
}

const median = (xs: number[]) => {
  const s = xs.filter(Number.isFinite).sort((a, b) => a - b);
  return s.length ? s[(s.length - 1) >> 1]! : NaN;
};
const spread = (xs: number[]) => {
  const s = xs.filter(Number.isFinite);
  return s.length ? `${fmt(Math.min(...s))}..${fmt(Math.max(...s))}` : '-';
};

/** Decode tokens/s of streams run together: tokens after each one's first, over the span they decode in. */
function decodeRate(rs: RequestResult[]): number {
  if (rs.some((r) => !r.ok)) return NaN;
  const firstAt = Math.min(...rs.map((r) => r.startMs + r.ttftMs));
  const endAt = Math.max(...rs.map((r) => r.endMs));
  return rs.reduce((a, r) => a + r.tokens - 1, 0) / ((endAt - firstAt) / 1e3);
}

async function benchDevice(dir: string, device: string, flags: string[], promptLen: number, maxTokens: number,
                           reps: number, vocab: number): Promise<DeviceResult> {
  const promptIds = (seed: number, n: number) => benchPromptIds(seed, n).map((id) => id % vocab);
  const out: DeviceResult = { device, readyS: NaN, prefillTokPerS: [], decodeB1TokPerS: [], decodeB8TokPerS: [], greedyText: null, errors: [] };
  const t0 = performance.now();
  console.error(`# gpu-serve: starting expertd serve --device ${device} ${flags.join(' ')}`);
  const d = await startDaemon(dir, ['--device', device, ...flags]);
  try {
    await waitHealthy(d.base);
    out.readyS = (performance.now() - t0) / 1e3;
    const model = ((await (await fetch(`${d.base}/v1/models`)).json()) as { data: { id: string }[] }).data[0]!.id;
    const note = (r: RequestResult) => { if (!r.ok) out.errors.push(r.error ?? '?'); return r; };
    // Warm-up at every timed shape: a short decode, a full-length prefill (its first call runs the
    // sm_90a self-check, builds cuBLASLt plans and grows the caching allocator: on the H200 the
    // first timed prefill spread 30k-57k tok/s without it) and a batch of 8.
    note(await streamOne(d.base, model, promptIds(1, 16), 4));
    note(await streamOne(d.base, model, promptIds(2, promptLen), 2));
    (await Promise.all(Array.from({ length: 8 }, (_, i) => streamOne(d.base, model, promptIds(3 + i, 16), 4)))).forEach(note);
    for (let rep = 0; rep < reps; rep++) {
      const p = note(await streamOne(d.base, model, promptIds(100 + rep, promptLen), 1));
      out.prefillTokPerS.push(p.ok ? promptLen / (p.ttftMs / 1e3) : NaN);
      out.decodeB1TokPerS.push(decodeRate([note(await streamOne(d.base, model, promptIds(200 + rep, 16), maxTokens))]));
      const eight = await Promise.all(Array.from({ length: 8 }, (_, i) => streamOne(d.base, model, promptIds(300 + 10 * rep + i, 16), maxTokens)));
      eight.forEach(note);
      out.decodeB8TokPerS.push(decodeRate(eight));
    }
    const g = await fetch(`${d.base}/v1/completions`, {
      method: 'POST', headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model, prompt: 'The quick brown fox', max_tokens: 16, temperature: 0 }),
    });
    if (g.status === 200) out.greedyText = ((await g.json()) as { choices: { text: string }[] }).choices[0]!.text;
    else out.errors.push(`greedy completion: HTTP ${g.status} ${(await g.text()).slice(0, 200)}`);
  } catch (e) {
    out.errors.push((e as Error).message);
  } finally {
    d.proc.kill('SIGTERM');
    const timer = setTimeout(() => d.proc.kill('SIGKILL'), 15_000);
    await d.exit;
    clearTimeout(timer);
  }
  return out;
}

export async function runGpuServe(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      json: { type: 'string' }, model: { type: 'string' }, 'prompt-len': { type: 'string' },
      'max-tokens': { type: 'string' }, reps: { type: 'string' }, devices: { type: 'string' },
      'model-dir': { type: 'string' },
    },
    strict: true,
  });
  const name = (values.model ?? 'mixtral-like') as BenchModelName;
  if (!BENCH_MODEL_NAMES.includes(name)) throw new RangeError(`--model is "${name}", expected one of ${BENCH_MODEL_NAMES.join(', ')}`);
  const promptLen = parsePositiveInt('prompt-len', values['prompt-len'], 512);
  const maxTokens = Math.max(2, parsePositiveInt('max-tokens', values['max-tokens'], 32));
  const reps = parsePositiveInt('reps', values.reps, 3);
  const devices = (values.devices ?? 'cuda,cpu').split(',');
  for (const dv of devices)
    if (!/^(cpu|cuda(:\d+)?)$/.test(dv)) throw new RangeError(`--devices: '${dv}' is not cpu, cuda or cuda:N`);
  // --model-dir: any checkpoint folder instead (the runbook's CPU stand-in uses a tiny fixture).
  const dir = values['model-dir'] ?? ensureBenchModel(name, (s) => console.error(s));
  // bf16 on both engines: the device engine's weights are bf16, and the CPU's fast mode is the peer.
  const flags = ['--compute-dtype', 'bf16', '--max-num-seqs', '8', '--max-num-batched-tokens', String(Math.max(512, promptLen))];
  const results: DeviceResult[] = [];
  const vocab = (JSON.parse(readFileSync(path.join(dir, 'config.json'), 'utf8')) as { vocab_size: number }).vocab_size;
  for (const dv of devices) results.push(await benchDevice(dir, dv, flags, promptLen, maxTokens, reps, vocab));

  const cpu = results.find((r) => r.device === 'cpu');
  const vs = (r: DeviceResult, key: 'prefillTokPerS' | 'decodeB1TokPerS' | 'decodeB8TokPerS'): Cell =>
    cpu && r !== cpu ? `${fmt(median(r[key]) / median(cpu[key]))}x` : '-';
  console.log(`## gpu-serve: expertd serve, ${values['model-dir'] ?? name} (bf16), prompt ${promptLen}, ${maxTokens} new tokens, median of ${reps}` +
    `${process.env.EXPERTD_CUDA_STANDIN ? ' (cuda is the CPU STAND-IN: plumbing timed, not a GPU)' : ''}\n`);
  console.log(markdownTable(
    ['device', 'ready s', 'prefill tok/s', 'spread', 'vs cpu', 'decode b1 tok/s', 'spread', 'vs cpu', 'decode b8 tok/s', 'spread', 'vs cpu', 'errors'],
    results.map((r) => [r.device, fmt(r.readyS), fmt(median(r.prefillTokPerS)), spread(r.prefillTokPerS), vs(r, 'prefillTokPerS'),
      fmt(median(r.decodeB1TokPerS)), spread(r.decodeB1TokPerS), vs(r, 'decodeB1TokPerS'),
      fmt(median(r.decodeB8TokPerS)), spread(r.decodeB8TokPerS), vs(r, 'decodeB8TokPerS'), r.errors.length ? `${r.errors.length}: ${r.errors[0]!.slice(0, 100)}` : '-']),
  ));
  const texts = results.map((r) => r.greedyText);
  const agree = texts.every((t) => t !== null && t === texts[0]);
  console.log(`\ngreedy 16 tokens of "The quick brown fox": ${agree ? 'identical on every device' : 'DIFFER (the bench checkpoints\' random weights leave top-2 gaps of ~0.5% of the logits\' range, bf16 rounding ~0.3%: `bench device-logits` says whether a difference is such a near-tie)'}${agree ? '' : `\n${results.map((r) => `- ${r.device}: ${JSON.stringify(r.greedyText)}`).join('\n')}`}`);
  if (values.json) writeJson(values.json, { bench: 'gpu-serve', run: runInfo(), loadAverageEnd: os.loadavg(), model: values['model-dir'] ?? name, promptLen, maxTokens, reps, flags, standIn: Boolean(process.env.EXPERTD_CUDA_STANDIN), greedyAgree: agree, results });
  if (results.some((r) => r.errors.length > 0)) process.exitCode = 1;
}
