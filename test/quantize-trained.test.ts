// Quantization fidelity on trained tiny checkpoints (test/fixtures-trained/, made by
// test/fixtures/make_trained_fixtures.py): logits with real margins, so that top-1 agreement with the
// f32 model measures each format's noise instead of the random fixtures' near-ties. The engine first
// reproduces HF's own f32 goldens on them; then each precision setting holds a floor a bit under its
// measured agreement over the held-out text (bench/RESULTS.md, `npm run bench -- fidelity --trained`).
import assert from 'node:assert/strict';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';

import { loadModel } from '../src/model/load.js';
import { packageRoot } from '../src/native/index.js';
import { DirectRunner } from './helpers/model-runner.js';
import { PRECISIONS, agreement, fixtureSequences, medianMargin, teacherForced } from './helpers/quant-fidelity.js';

interface GoldenCase { prompt_ids: number[]; logits: number[][]; greedy: number[]; router: number[][][] }
interface Golden { moe_layers: number[]; cases: GoldenCase[]; heldout: number[][]; median_top1_margin: number }

const trainedDir = path.join(packageRoot(), 'test', 'fixtures-trained');
const fixtures = readdirSync(trainedDir).filter((d) => existsSync(path.join(trainedDir, d, 'golden.json'))).sort();

test('trained fixtures exist for the families the issue names', () => {
  for (const f of ['mixtral', 'qwen3_moe', 'deepseek_v3', 'gpt_oss', 'qwen3_next'])
    assert.ok(fixtures.includes(f), `missing trained fixture ${f}`);
});

test('f32 mode on the trained fixtures: router ids, logits and greedy tokens match transformers', () => {
  for (const f of fixtures) {
    const dir = path.join(trainedDir, f);
    const golden = JSON.parse(readFileSync(path.join(dir, 'golden.json'), 'utf8')) as Golden;
    const { model, spec } = loadModel(dir, { fast: false });
    try {
      const V = spec.vocabSize;
      const k = spec.moe.router.topK;
      for (const [ci, c] of golden.cases.entries()) {
        const runner = new DirectRunner(model);
        const res = runner.step([runner.newSeq()], [c.prompt_ids], true);
        for (let m = 0; m < golden.moe_layers.length; m++)
          for (let p = 0; p < c.prompt_ids.length; p++)
            assert.deepEqual(Array.from(res.routedIds[m]!.subarray(p * k, (p + 1) * k)), c.router[m]![p], `${f} case ${ci} moe layer ${m} position ${p}`);
        let worst = 0;
        for (let p = 0; p < c.prompt_ids.length; p++)
          for (let i = 0; i < V; i++) worst = Math.max(worst, Math.abs(res.logits[p * V + i]! - c.logits[p]![i]!));
        // Trained logits reach ~20 in magnitude; f32 summation order and the goldens' 6 digits stay far below 1e-3.
        assert.ok(worst <= 1e-3, `${f} case ${ci}: logits max-abs error ${worst}`);
        assert.deepEqual(new DirectRunner(model).greedy(c.prompt_ids, c.greedy.length), c.greedy, `${f} case ${ci} greedy`);
      }
    } finally {
      model.dispose();
    }
  }
});

// Pooled over the 5 trained fixtures' held-out windows (1920 positions), per setting: a floor a bit
// under the measured top-1 agreement with the f32 model and a ceiling about twice the measured mean
// KL(f32 || setting), so that a worse scale, rounding or kernel fails here (bench/RESULTS.md, issue 19
// section; measured on AVX-512, transformers-5.18 fixtures). The targets on well-scaled
// logits: int8 and fp8 >= 99% (fp8 measured 98.4%: e4m3's 3 mantissa bits, the same figure as
// torch's float8_e4m3fn cast with DeepSeek's 128x128 absmax/448 scales), int4 >= 95%.
const BOUNDS: Record<string, { top1: number; kl: number }> = {
  'bf16 mode, f32 KV (exact weights)': { top1: 0.98, kl: 7e-4 },  // measured 99.6%, 3.5e-4
  'bf16 mode, bf16 KV': { top1: 0.98, kl: 1.5e-3 },  // 99.6%, 7.3e-4
  'bf16 mode, fp8 KV': { top1: 0.94, kl: 1.1e-2 },  // 96.6%, 5.4e-3
  'int8': { top1: 0.99, kl: 7e-4 },  // 99.8%, 3.3e-4
  'fp8': { top1: 0.97, kl: 2.7e-3 },  // 98.4%, 1.3e-3
  'int4 g32': { top1: 0.94, kl: 1.2e-2 },  // 95.6%, 6.0e-3
  'int4 g128': { top1: 0.93, kl: 1.2e-2 },  // 95.0%, 6.1e-3
  'int8 +dense': { top1: 0.98, kl: 2e-3 },  // 99.2%, 1.0e-3
  'fp8 +dense': { top1: 0.95, kl: 1.1e-2 },  // 96.3%, 5.3e-3
  'int4 g32 +dense': { top1: 0.87, kl: 5e-2 },  // 89.4%, 2.4e-2
  'int4 g128 +dense': { top1: 0.85, kl: 6e-2 },  // 87.6%, 3.1e-2
  // --quantize-lm-head beside --quantize-dense (measured on the 5 fixtures incl. qwen3_next, whose in_proj
  // -dense quantizes since: int8 +dense 99.1% 1.05e-3, fp8 95.7% 5.7e-3, int4 g32 88.8% 3.0e-2).
  'int8 +dense +lm_head': { top1: 0.98, kl: 2.2e-3 },  // 99.1%, 1.07e-3
  'fp8 +dense +lm_head': { top1: 0.93, kl: 1.3e-2 },  // 94.5%, 6.2e-3
  'int4 g32 +dense +lm_head': { top1: 0.83, kl: 6.6e-2 },  // 85.3%, 3.3e-2
  'int8, bf16 mode + bf16 KV': { top1: 0.98, kl: 2.1e-3 },  // 99.3%, 1.1e-3 (int8 activations)
  'fp8, bf16 mode + bf16 KV': { top1: 0.97, kl: 3.6e-3 },  // 98.4%, 1.8e-3
  'int4 g32, bf16 mode + bf16 KV': { top1: 0.94, kl: 1.2e-2 },  // 95.5%, 6.0e-3
  'int8 +dense, bf16 mode + bf16 KV': { top1: 0.96, kl: 4.3e-3 },  // 98.0%, 2.1e-3
  'int8 +dense +lm_head, bf16 mode + bf16 KV': { top1: 0.96, kl: 4.5e-3 },  // 98.1%, 2.2e-3
};

test('--quantize on the trained fixtures: teacher-forced top-1 agreement and mean KL against the f32 model within bounds', (t) => {
  const refs = new Map(fixtures.map((f) => [f, teacherForced(path.join(trainedDir, f))]));
  const total = [...refs.values()].reduce((a, r) => a + r.length, 0);
  for (const f of fixtures) {
    // The logits are well scaled: the engine's median top-1 margin is HF's (the script measured it).
    const g = JSON.parse(readFileSync(path.join(trainedDir, f, 'golden.json'), 'utf8')) as Golden;
    const m = medianMargin(refs.get(f)!);
    assert.ok(Math.abs(m - g.median_top1_margin) <= 1e-3 * Math.max(1, m), `${f}: median margin ${m} vs HF ${g.median_top1_margin}`);
    assert.equal(refs.get(f)!.length, fixtureSequences(path.join(trainedDir, f)).flat().length);
  }
  for (const p of PRECISIONS) {
    let agree = 0, klSum = 0;
    const per: string[] = [];
    for (const f of fixtures) {
      const r = agreement(refs.get(f)!, teacherForced(path.join(trainedDir, f), p));
      agree += r.agree;
      klSum += r.klSum;
      per.push(`${f} ${r.agree}/${r.positions}`);
    }
    t.diagnostic(`${p.name}: top-1 ${agree}/${total} = ${(100 * agree / total).toFixed(2)}%, mean KL ${(klSum / total).toExponential(2)} (${per.join(', ')})`);
    const b = BOUNDS[p.name];
    assert.ok(b !== undefined, `no bounds for ${p.name}`);
    assert.ok(agree / total >= b.top1, `${p.name}: top-1 agreement ${agree}/${total} below ${b.top1}`);
    assert.ok(klSum / total <= b.kl, `${p.name}: mean KL ${(klSum / total).toExponential(2)} above ${b.kl}`);
  }
});
