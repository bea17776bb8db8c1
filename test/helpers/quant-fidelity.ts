// Teacher-forced fidelity of a precision setting (--quantize format, compute mode, KV cache dtype)
// against the f32 model: top-1 agreement and mean KL(f32 || other) over a fixture's sequences. Used
// by the quantize tests and `npm run bench -- fidelity --quant`.
import { readFileSync } from 'node:fs';
import path from 'node:path';

import type { KvDtype } from '../../src/model/kv-dtype.js';
import { loadModel } from '../../src/model/load.js';
import type { MoeModel } from '../../src/model/model.js';
import { quantizeSpec, type QuantizeSpec } from '../../src/model/quantize.js';
import { DirectRunner } from './model-runner.js';

/** One precision setting: weights (--quantize, null = as stored), compute mode, KV cache dtype. */
export interface Precision {
  name: string;
  quantize: QuantizeSpec | null;
  fast: boolean;
  kvDtype: KvDtype;
}

/** The settings the fidelity tables report, the f32 reference excepted. */
export const PRECISIONS: Precision[] = [
  { name: 'bf16 mode, f32 KV (exact weights)', quantize: null, fast: true, kvDtype: 'f32' },
  { name: 'bf16 mode, bf16 KV', quantize: null, fast: true, kvDtype: 'bf16' },
  { name: 'bf16 mode, fp8 KV', quantize: null, fast: true, kvDtype: 'fp8' },
  { name: 'int8', quantize: quantizeSpec('int8', 0), fast: false, kvDtype: 'f32' },
  { name: 'fp8', quantize: quantizeSpec('fp8', 0), fast: false, kvDtype: 'f32' },
  { name: 'int4 g32', quantize: quantizeSpec('int4', 32), fast: false, kvDtype: 'f32' },
  { name: 'int4 g128', quantize: quantizeSpec('int4', 128), fast: false, kvDtype: 'f32' },
  { name: 'int8 +dense', quantize: quantizeSpec('int8', 0, true), fast: false, kvDtype: 'f32' },
  { name: 'fp8 +dense', quantize: quantizeSpec('fp8', 0, true), fast: false, kvDtype: 'f32' },
  { name: 'int4 g32 +dense', quantize: quantizeSpec('int4', 32, true), fast: false, kvDtype: 'f32' },
  { name: 'int4 g128 +dense', quantize: quantizeSpec('int4', 128, true), fast: false, kvDtype: 'f32' },
  { name: 'int8 +dense +lm_head', quantize: quantizeSpec('int8', 0, true, true), fast: false, kvDtype: 'f32' },
  { name: 'fp8 +dense +lm_head', quantize: quantizeSpec('fp8', 0, true, true), fast: false, kvDtype: 'f32' },
  { name: 'int4 g32 +dense +lm_head', quantize: quantizeSpec('int4', 32, true, true), fast: false, kvDtype: 'f32' },
  { name: 'int8, bf16 mode + bf16 KV', quantize: quantizeSpec('int8', 0), fast: true, kvDtype: 'bf16' },
  { name: 'fp8, bf16 mode + bf16 KV', quantize: quantizeSpec('fp8', 0), fast: true, kvDtype: 'bf16' },
  { name: 'int4 g32, bf16 mode + bf16 KV', quantize: quantizeSpec('int4', 32), fast: true, kvDtype: 'bf16' },
  { name: 'int8 +dense, bf16 mode + bf16 KV', quantize: quantizeSpec('int8', 0, true), fast: true, kvDtype: 'bf16' },
  { name: 'int8 +dense +lm_head, bf16 mode + bf16 KV', quantize: quantizeSpec('int8', 0, true, true), fast: true, kvDtype: 'bf16' },
];

interface GoldenFile { cases: { prompt_ids: number[]; greedy: number[] }[]; heldout?: number[][] }

/**
 * The sequences a fixture is teacher-forced over: its held-out text windows where it has them (the
 * trained fixtures), else every golden case's prompt followed by HF's greedy continuation.
 */
export function fixtureSequences(dir: string): number[][] {
  const g = JSON.parse(readFileSync(path.join(dir, 'golden.json'), 'utf8')) as GoldenFile;
  return g.heldout ?? g.cases.map((c) => [...c.prompt_ids, ...c.greedy]);
}

/** Each sequence through a loaded model in one prefill, teacher-forced: logits [positions][V]. */
export function forcedLogits(model: MoeModel, seqs: number[][], kvDtype: KvDtype = 'f32'): Float32Array[] {
  const V = model.spec.vocabSize;
  const out: Float32Array[] = [];
  for (const ids of seqs) {
    const runner = new DirectRunner(model, 4, Math.ceil(ids.length / 4) + 1, kvDtype);
    const res = runner.step([runner.newSeq()], [ids], true);
    for (let p = 0; p < ids.length; p++) out.push(res.logits.slice(p * V, (p + 1) * V));
  }
  return out;
}

/** forcedLogits of the fixture in dir loaded alone with one precision setting (f32 when omitted). */
export function teacherForced(dir: string, p?: Omit<Precision, 'name'>, seqs = fixtureSequences(dir)): Float32Array[] {
  const { model } = loadModel(dir, { fast: p?.fast ?? false, quantize: p?.quantize ?? null });
  try {
    return forcedLogits(model, seqs, p?.kvDtype ?? 'f32');
  } finally {
    model.dispose();
  }
}

export function argmax(a: Float32Array): number {
  let b = 0;
  for (let i = 1; i < a.length; i++) if (a[i]! > a[b]!) b = i;
  return b;
}

function logSumExp(a: Float32Array): number {
  let m = -Infinity;
  for (const v of a) m = Math.max(m, v);
  let s = 0;
  for (const v of a) s += Math.exp(v - m);
  return m + Math.log(s);
}

/** KL(p || q) of the softmaxes of two logit rows, in nats (float64 sums). */
export function kl(p: Float32Array, q: Float32Array): number {
  const lp = logSumExp(p), lq = logSumExp(q);
  let d = 0;
  for (let i = 0; i < p.length; i++) {
    const a = p[i]! - lp;
    d += Math.exp(a) * (a - (q[i]! - lq));
  }
  return d;
}

/** Top-1 minus second-best logit of a row. */
export function topMargin(a: Float32Array): number {
  let b1 = -Infinity, b2 = -Infinity;
  for (const v of a) {
    if (v > b1) { b2 = b1; b1 = v; } else if (v > b2) b2 = v;
  }
  return b1 - b2;
}

export interface Agreement {
  positions: number;
  /** Positions whose argmax equals the reference's. */
  agree: number;
  /** Sum over positions of KL(ref || got), nats. */
  klSum: number;
}

export function agreement(ref: Float32Array[], got: Float32Array[]): Agreement {
  let agree = 0, klSum = 0;
  for (let i = 0; i < ref.length; i++) {
    if (argmax(ref[i]!) === argmax(got[i]!)) agree++;
    klSum += kl(ref[i]!, got[i]!);
  }
  return { positions: ref.length, agree, klSum };
}

/** Median top-1 margin of a set of logit rows. */
export function medianMargin(rows: Float32Array[]): number {
  const m = rows.map(topMargin).sort((a, b) => a - b);
  return m[m.length >> 1]!;
}
