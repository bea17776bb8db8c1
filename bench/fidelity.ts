// `npm run bench -- fidelity [--gpu]`: the device engine's numbers on every fixture, against HF
// transformers' float32 goldens and against the CPU engine in bf16 mode: mean and max logit error as
// a fraction of the logits' range, and how many routing choices agree. On the emulator of the cuda*
// ops by default (its orchestration, not the kernels); --gpu runs the real device. --kv: the CPU
// engine's error per KV cache dtype (f32, bf16, fp8) in both compute modes instead. --quant: teacher-
// forced top-1 agreement and mean KL against the f32 model per precision setting (--quantize formats,
// bf16 mode, KV dtypes) on the random fixtures, or with --trained on test/fixtures-trained/.
import { readdirSync, readFileSync, existsSync, mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';

import { loadCudaModel, loadModel } from '../src/model/load.js';
import { packageRoot } from '../src/native/index.js';
import { createCudaEmulator } from '../test/helpers/cuda-emu.js';
import { kvFidelity } from '../test/helpers/kv-fidelity.js';
import { PRECISIONS, agreement, argmax, fixtureSequences, medianMargin, teacherForced, topMargin } from '../test/helpers/quant-fidelity.js';
import { DirectRunner } from '../test/helpers/model-runner.js';
import type { KvDtype } from '../src/model/kv-dtype.js';

interface Golden { cases: { prompt_ids: number[]; logits: number[][] }[] }

export async function runFidelity(argv: string[]): Promise<void> {
  const { values } = parseArgs({ args: argv, options: {
    gpu: { type: 'boolean' }, kv: { type: 'boolean' }, quant: { type: 'boolean' }, trained: { type: 'boolean' },
    only: { type: 'string' },
  } });
  const fx = path.join(packageRoot(), 'test', 'fixtures');
  if (values.kv) return runKvFidelity(fx);
  if (values.quant || values.trained) {
    return runQuantFidelity(values.trained ? path.join(packageRoot(), 'test', 'fixtures-trained') : fx, !!values.trained,
      values.only?.split(','));
  }
  console.log(`## device engine fidelity (${values.gpu ? 'GPU' : 'emulator of the cuda* ops'})\n`);
  console.log('| fixture | vs HF f32: mean | max | vs CPU bf16: mean | routing = CPU bf16 |');
  console.log('|---|---|---|---|---|');
  for (const name of readdirSync(fx).filter((d) => existsSync(path.join(fx, d, 'golden.json'))).sort()) {
    const dir = path.join(fx, name);
    const g = JSON.parse(readFileSync(path.join(dir, 'golden.json'), 'utf8')) as Golden;
    const { model, spec } = loadCudaModel(dir, { device: 0, ...(values.gpu ? {} : { cuda: createCudaEmulator() }) });
    const cpu = loadModel(dir, { fast: true }).model;
    const V = spec.vocabSize;
    let sum = 0, n = 0, worst = 0, sumCpu = 0, same = 0, all = 0;
    for (const c of g.cases) {
      const r = new DirectRunner(model);
      const res = r.step([r.newSeq()], [c.prompt_ids], true);
      const rc = new DirectRunner(cpu);
      const ref = rc.step([rc.newSeq()], [c.prompt_ids], true);
      for (let p = 0; p < c.prompt_ids.length; p++) {
        const gl = c.logits[p]!;
        let lo = Infinity, hi = -Infinity, w = 0, wc = 0;
        for (let i = 0; i < V; i++) {
          lo = Math.min(lo, gl[i]!);
          hi = Math.max(hi, gl[i]!);
          w = Math.max(w, Math.abs(res.logits[p * V + i]! - gl[i]!));
          wc = Math.max(wc, Math.abs(res.logits[p * V + i]! - ref.logits[p * V + i]!));
        }
        sum += w / (hi - lo);
        sumCpu += wc / (hi - lo);
        worst = Math.max(worst, w / (hi - lo));
        n++;
      }
      res.routedIds.forEach((ids, m) => ids.forEach((id, i) => { all++; if (id === ref.routedIds[m]![i]) same++; }));
    }
    const pct = (v: number) => `${(100 * v).toFixed(2)}%`;
    console.log(`| ${name} | ${pct(sum / n)} | ${pct(worst)} | ${pct(sumCpu / n)} | ${same}/${all} |`);
    model.dispose();
    cpu.dispose();
  }
}

/** The CPU engine vs HF f32 goldens per compute mode and KV cache dtype (teacher-forced prompts). */
function runKvFidelity(fx: string): void {
  const combos: [boolean, KvDtype][] = [[false, 'f32'], [false, 'bf16'], [false, 'fp8'], [true, 'f32'], [true, 'bf16'], [true, 'fp8']];
  console.log('## KV cache dtype fidelity (CPU engine vs HF float32 goldens)\n');
  console.log('Logit error as a fraction of the logits\' range: mean over positions / max over positions whose');
  console.log('routing (and every earlier position\'s) equals HF\'s / max over all; routing-consistent positions;');
  console.log('positions whose argmax equals HF\'s.\n');
  console.log('| fixture | compute | KV | mean | max (routing =) | max (all) | routing = | top-1 = |');
  console.log('|---|---|---|---|---|---|---|---|');
  const pct = (v: number) => `${(100 * v).toFixed(2)}%`;
  for (const name of readdirSync(fx).filter((d) => existsSync(path.join(fx, d, 'golden.json'))).sort()) {
    for (const [fast, kv] of combos) {
      const r = kvFidelity(path.join(fx, name), fast, kv);
      console.log(`| ${name} | ${fast ? 'bf16' : 'f32'} | ${kv} | ${pct(r.mean)} | ${pct(r.maxConsistent)} | ${pct(r.maxAll)} | ` +
        `${r.consistent}/${r.positions} | ${r.top1}/${r.positions} |`);
    }
  }
}

/**
 * Teacher-forced agreement with the f32 model (f32 weights as stored, f32 activations and KV) per
 * precision setting, pooled over the fixtures and per fixture; writes bench/out/fidelity-quant[-trained].json.
 */
function runQuantFidelity(fx: string, trained: boolean, only?: string[]): void {
  const names = readdirSync(fx).filter((d) => existsSync(path.join(fx, d, 'golden.json')))
    .filter((d) => !only || only.includes(d)).sort();
  const pct = (a: number, n: number) => `${(100 * a / n).toFixed(1)}%`;
  console.log(`## --quantize fidelity against the f32 model (${trained ? 'trained fixtures, held-out text' : 'random fixtures: flat logits'})\n`);
  console.log('| fixture | positions | median top-1 margin (f32 logits) | held-out loss (HF) |');
  console.log('|---|---|---|---|');
  const refs = new Map<string, Float32Array[]>();
  const seqs = new Map<string, number[][]>();
  for (const name of names) {
    const dir = path.join(fx, name);
    seqs.set(name, fixtureSequences(dir));
    const ref = teacherForced(dir, undefined, seqs.get(name));
    refs.set(name, ref);
    const g = JSON.parse(readFileSync(path.join(dir, 'golden.json'), 'utf8')) as { heldout_loss?: number };
    console.log(`| ${name} | ${ref.length} | ${medianMargin(ref).toFixed(3)} | ${g.heldout_loss ?? '-'} |`);
  }
  const total = [...refs.values()].reduce((a, r) => a + r.length, 0);
  // Where the flips are: agreement over the positions whose f32 top-1 margin is at least 1 logit.
  const wide = new Map([...refs].map(([n, r]) => [n, r.map((row) => topMargin(row) >= 1)]));
  const wideTotal = [...wide.values()].reduce((a, w) => a + w.filter(Boolean).length, 0);
  console.log(`\n| setting | top-1 = f32 | mean KL (nats) | top-1 = f32 at margin >= 1 | ${names.join(' | ')} |`);
  console.log(`|---|---|---|---|${names.map(() => '---').join('|')}|`);
  const rows: unknown[] = [];
  for (const p of PRECISIONS) {
    let agree = 0, klSum = 0, wideAgree = 0;
    const per: Record<string, { agree: number; positions: number; meanKl: number }> = {};
    for (const name of names) {
      const got = teacherForced(path.join(fx, name), p, seqs.get(name));
      const r = agreement(refs.get(name)!, got);
      refs.get(name)!.forEach((row, i) => { if (wide.get(name)![i] && argmax(row) === argmax(got[i]!)) wideAgree++; });
      agree += r.agree;
      klSum += r.klSum;
      per[name] = { agree: r.agree, positions: r.positions, meanKl: r.klSum / r.positions };
    }
    console.log(`| ${p.name} | ${agree}/${total} = ${pct(agree, total)} | ${(klSum / total).toExponential(2)} | ` +
      `${wideAgree}/${wideTotal} = ${pct(wideAgree, wideTotal)} | ` +
      `${names.map((n) => pct(per[n]!.agree, per[n]!.positions)).join(' | ')} |`);
    rows.push({ setting: p.name, quantize: p.quantize, fast: p.fast, kvDtype: p.kvDtype, agree, positions: total, meanKl: klSum / total,
      wideAgree, widePositions: wideTotal, per });
  }
  const outDir = path.join(packageRoot(), 'bench', 'out');
  mkdirSync(outDir, { recursive: true });
  const file = path.join(outDir, `fidelity-quant${trained ? '-trained' : ''}.json`);
  writeFileSync(file, JSON.stringify({ fixtures: names, rows }, null, 1) + '\n');
  console.log(`\n# wrote ${path.relative(packageRoot(), file)}`);
}
