// `npm run bench -- fidelity [--gpu]`: the device engine's numbers on every fixture, against HF
// transformers' float32 goldens and against the CPU engine in bf16 mode: mean and max logit error as
// a fraction of the logits' range, and how many routing choices agree. On the emulator of the cuda*
// ops by default (its orchestration, not the kernels); --gpu runs the real device. --kv: the CPU
// engine's error per KV cache dtype (f32, bf16, fp8) in both compute modes instead.
import { readdirSync, readFileSync, existsSync } from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';

import { loadCudaModel, loadModel } from '../src/model/load.js';
import { packageRoot } from '../src/native/index.js';
import { createCudaEmulator } from '../test/helpers/cuda-emu.js';
import { kvFidelity } from '../test/helpers/kv-fidelity.js';
import { DirectRunner } from '../test/helpers/model-runner.js';
import type { KvDtype } from '../src/model/kv-dtype.js';

interface Golden { cases: { prompt_ids: number[]; logits: number[][] }[] }

export async function runFidelity(argv: string[]): Promise<void> {
  const { values } = parseArgs({ args: argv, options: { gpu: { type: 'boolean' }, kv: { type: 'boolean' } } });
  const fx = path.join(packageRoot(), 'test', 'fixtures');
  if (values.kv) return runKvFidelity(fx);
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
