// `npm run bench -- serve --structured`: the cost of structured output. On one daemon, streaming
// completions alternate between unconstrained (ignore_eos) and a JSON schema (xgrammar's bitmask
// every step), and each request's decode rate (tokens after the first / time after the first) is
// compared: median and spread of each, and the ratio of medians (target >= 0.90).
import { performance } from 'node:perf_hooks';

import { fmt, markdownTable, percentile, type Cell } from './harness.js';

/** Long, bounded output: a fixed-length array of small integers (any model, random weights too). */
export function benchSchema(items: number): Record<string, unknown> {
  return {
    type: 'object',
    properties: { values: { type: 'array', items: { type: 'integer', minimum: 0, maximum: 999 }, minItems: items, maxItems: items } },
    required: ['values'], additionalProperties: false,
  };
}

interface Run { ok: boolean; error?: string; tokens: number; ttftMs: number; decodeTokPerS: number; text: string }

async function streamDecode(base: string, model: string, prompt: number[], maxTokens: number, extra: Record<string, unknown>): Promise<Run> {
  const start = performance.now();
  const run: Run = { ok: false, tokens: 0, ttftMs: NaN, decodeTokPerS: NaN, text: '' };
  const r = await fetch(`${base}/v1/completions`, {
    method: 'POST', headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model, prompt, max_tokens: maxTokens, temperature: 0, stream: true, return_token_ids: true, ...extra }),
  });
  if (r.status !== 200 || !r.body) {
    run.error = `HTTP ${r.status}: ${(await r.text()).slice(0, 200)}`;
    return run;
  }
  const decoder = new TextDecoder();
  let buf = '';
  let first = NaN;
  let last = NaN;
  for await (const part of r.body as unknown as AsyncIterable<Uint8Array>) {
    const now = performance.now();
    buf += decoder.decode(part, { stream: true });
    let sep: number;
    while ((sep = buf.indexOf('\n\n')) >= 0) {
      const event = buf.slice(0, sep);
      buf = buf.slice(sep + 2);
      if (!event.startsWith('data: ') || event === 'data: [DONE]') continue;
      const j = JSON.parse(event.slice(6)) as { choices: { token_ids?: number[]; text?: string }[] };
      const n = j.choices[0]?.token_ids?.length ?? 0;
      run.text += j.choices[0]?.text ?? '';
      if (n === 0) continue;
      if (run.tokens === 0) { first = now; run.ttftMs = now - start; }
      run.tokens += n;
      last = now;
    }
  }
  if (run.tokens < 8) run.error = `only ${run.tokens} tokens`;
  else { run.decodeTokPerS = (run.tokens - 1) / ((last - first) / 1e3); run.ok = true; }
  return run;
}

export interface StructuredResult {
  pairs: number; items: number; maxTokens: number;
  free: { tokens: number; medianTokPerS: number; p10: number; p90: number };
  schema: { tokens: number; medianTokPerS: number; p10: number; p90: number; valid: number };
  ratio: number; ratioPairsMedian: number; errors: string[];
}

export async function runStructuredCompare(base: string, model: string, promptOf: (i: number) => number[], pairs: number, items: number): Promise<StructuredResult> {
  const schema = benchSchema(items);
  const maxTokens = items * 5 + 16;
  const response_format = { type: 'json_schema', json_schema: { name: 'values', schema, strict: true } };
  // Warm-up: compiles (and caches) the grammar, warms both paths; the unconstrained requests then
  // decode as many tokens as the schema's output takes.
  const warm = await streamDecode(base, model, promptOf(0), maxTokens, { response_format });
  if (!warm.ok) throw new Error(`the JSON-schema warm-up failed: ${warm.error}`);
  const target = warm.tokens;
  await streamDecode(base, model, promptOf(0), target, { ignore_eos: true });
  const free: Run[] = [];
  const constrained: Run[] = [];
  const errors: string[] = [];
  let valid = 0;
  for (let i = 1; i <= pairs; i++) {
    // Alternating order, so that drift in the machine's load hits both alike.
    const one = () => streamDecode(base, model, promptOf(i), maxTokens, { response_format });
    const other = () => streamDecode(base, model, promptOf(i), target, { ignore_eos: true });
    let s: Run;
    let f: Run;
    if (i % 2) { s = await one(); f = await other(); } else { f = await other(); s = await one(); }
    for (const [run, list] of [[s, constrained], [f, free]] as const) {
      if (run.ok) list.push(run); else errors.push(run.error ?? '?');
    }
    try {
      const v = JSON.parse(s.text) as { values?: unknown[] };
      if (Array.isArray(v.values) && v.values.length === items && v.values.every((x) => Number.isInteger(x))) valid++;
    } catch { /* counted as not valid */ }
  }
  const summary = (runs: Run[]) => {
    const rates = runs.map((r) => r.decodeTokPerS);
    return { tokens: runs.reduce((a, r) => a + r.tokens, 0), medianTokPerS: percentile(rates, 0.5), p10: percentile(rates, 0.1), p90: percentile(rates, 0.9) };
  };
  const fs = summary(free);
  const ss = summary(constrained);
  const perPair = constrained.map((c, i) => c.decodeTokPerS / (free[i]?.decodeTokPerS ?? NaN)).filter(Number.isFinite);
  return {
    pairs, items, maxTokens, free: fs, schema: { ...ss, valid }, ratio: ss.medianTokPerS / fs.medianTokPerS,
    ratioPairsMedian: percentile(perPair, 0.5), errors: [...new Set(errors)].slice(0, 5),
  };
}

export function printStructured(r: StructuredResult, name: string): void {
  console.log(`## serve --structured: JSON-schema decoding vs unconstrained, ${name} (bf16)\n`);
  console.log(`Streaming /v1/completions, temperature 0, one stream at a time, ${r.pairs} pairs (A/B alternating). ` +
    `Schema: {"values": [${r.items} integers 0..999]} (response_format json_schema); unconstrained: the same number of ` +
    `tokens with ignore_eos. Decode rate per request = (tokens - 1) / (last token - first token).\n`);
  const rows: Cell[][] = [
    ['unconstrained', r.pairs, r.free.tokens, r.free.medianTokPerS, `${fmt(r.free.p10)}..${fmt(r.free.p90)}`, '1.00x', '-'],
    ['json_schema', r.pairs, r.schema.tokens, r.schema.medianTokPerS, `${fmt(r.schema.p10)}..${fmt(r.schema.p90)}`, `${fmt(r.ratio)}x`, `${r.schema.valid}/${r.pairs}`],
  ];
  console.log(markdownTable(['output', 'requests', 'tokens', 'decode tok/s (median)', 'p10..p90', 'vs unconstrained', 'valid JSON'], rows));
  console.log(`\nMedian of the per-pair ratios: ${fmt(r.ratioPairsMedian)}x.`);
  if (r.errors.length) console.log(`\nErrors: ${r.errors.join('; ')}`);
  console.log(`\nTarget: decode tok/s with a JSON schema >= 90% of unconstrained: ${fmt(r.ratio)}x -> ${r.ratio >= 0.9 ? 'PASS' : 'FAIL'}`);
}
