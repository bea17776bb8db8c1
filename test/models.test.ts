// Fidelity: every architecture's tiny checkpoint against HF transformers' own float32 outputs
// (test/fixtures/*/golden.json, made by make_fixtures.py): router choices, teacher-forced logits,
// greedy continuations; batched equals unbatched; fast (bf16) mode within its measured tolerance.
import assert from 'node:assert/strict';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { describe, test } from 'node:test';

import { loadModel } from '../src/model/load.js';
import { ModelTokenizer } from '../src/model/tokenizer.js';
import { packageRoot } from '../src/native/index.js';
import { kvFidelity } from './helpers/kv-fidelity.js';
import { DirectRunner, aloneAndBatched } from './helpers/model-runner.js';

interface GoldenCase { prompt_ids: number[]; logits: number[][]; greedy: number[]; router: number[][][] }
interface Golden {
  model_type: string; moe_layers: number[]; cases: GoldenCase[]; vocab_size: number;
  /** Families that ship chat_template.jinja: transformers' rendering (add_generation_prompt) of messages. */
  chat?: { messages: { role: string; content: string }[]; rendered: string };
}

const fixturesDir = path.join(packageRoot(), 'test', 'fixtures');
const fixtures = existsSync(fixturesDir)
  ? readdirSync(fixturesDir).filter((d) => existsSync(path.join(fixturesDir, d, 'golden.json'))).sort()
  : [];

// f32 mode computes what HF computes in float32, up to summation order: 1e-3 is the bound.
const F32_LOGIT_TOL = 1e-3;
// bf16 mode rounds every GEMM input (activations, expert intermediates) to bf16: 8 mantissa bits,
// up to 2^-9 relative error per element. Measured over the six fixtures (transformers 5.18 goldens):
// where bf16 routing picks the same experts as HF, max |diff| stays under 4% of the logits' range
// (mean 0.4-1.1%); where a near-tie flips an expert, a position can move by up to ~15%, which is the
// cost of bf16 activations, not a bug. So: routing-consistent positions <= 5%, mean <= 2%.
const BF16_REL_TOL = 0.05;
const BF16_MEAN_REL_TOL = 0.02;
// fp8 e4m3 KV cache (3 mantissa bits: up to 2^-4 relative error per stored K/V element, 16x bf16's),
// with the fast mode. Measured over the seven fixtures (kvFidelity, `npm run bench -- fidelity --kv`):
// mean 3.6-9.7% of the logits' range, routing-consistent positions up to 10.3%; on these random tiny
// checkpoints one K/V rounding flips routing near-ties in most positions. So: mean <= 12%, routing-
// consistent positions <= 13%. The bound is fp8's, recorded in bench/RESULTS.md.
const FP8_MEAN_REL_TOL = 0.12;
const FP8_REL_TOL = 0.13;
// gpt_oss (sinks and a sliding window of 4 over an fp8 cache; its larger expert weights drive the
// clamped SwiGLU): measured 16.80% at a routing-consistent position.
const FP8_REL_TOL_BY_FAMILY: Record<string, number> = { gpt_oss: 0.18 };
// gpt_oss (its fixture's expert gate_up weights are larger, so that the clamped SwiGLU's limit is
// reached): measured 5.07% at one routing-consistent position (case 0, position 2), mean 1.04%.
// qwen3_next: 7 MoE layers of 16 experts top-4 over 8 layers, a 67-token prompt, and a recurrent state
// that carries an early rounding to every later position: bf16 flips routing from position 1-5 on.
// Measured: routing-consistent positions up to 4.81% (bf16 KV 5.28%), mean 4.85%. HF transformers'
// own bf16 run of the same checkpoint is further from its f32 goldens: mean 5.5-7.4% per case, max
// 10.9-35% (qwen3_moe for comparison: mean 0.65-1.24%), so the bound is the family's, not a bug.
// qwen3_5_moe_text: measured 7.20% at a routing-consistent position of the 67-token case (bf16 KV 7.12%)
// with vdpbf16ps GEMMs, 8.05% (bf16 KV 8.03%) with AMX tiles (tdpbf16ps rounds its sums differently;
// each GEMM stays within f32 accumulation error of float64, test/gemm-amx.test.ts); HF's own bf16
// run: mean 1.8-14.9% per case, max 3.4-58%.
const BF16_REL_TOL_BY_FAMILY: Record<string, number> = { gpt_oss: 0.06, qwen3_next: 0.06, qwen3_5_moe_text: 0.09 };
// qwen3_5_moe_text: mean measured 2.87% (HF's own bf16: 1.8-14.9% per case).
const BF16_MEAN_REL_TOL_BY_FAMILY: Record<string, number> = { qwen3_next: 0.06, qwen3_5_moe_text: 0.04 };

function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}

function range(a: ArrayLike<number>): number {
  let lo = Infinity;
  let hi = -Infinity;
  for (let i = 0; i < a.length; i++) { lo = Math.min(lo, a[i]!); hi = Math.max(hi, a[i]!); }
  return hi - lo;
}

test('fixtures exist for every supported architecture', () => {
  for (const arch of ['mixtral', 'qwen2_moe', 'qwen3_moe', 'olmoe', 'deepseek_v2', 'deepseek_v3', 'longcat_flash',
    'glm4_moe', 'minimax_m2', 'gpt_oss', 'qwen3_next', 'qwen3_5_moe_text'])
    assert.ok(fixtures.includes(arch), `missing fixture ${arch}`);
});

for (const name of fixtures) {
  const dir = path.join(fixturesDir, name);
  const golden = JSON.parse(readFileSync(path.join(dir, 'golden.json'), 'utf8')) as Golden;
  describe(`fixture ${name}`, () => {
    if (golden.chat) {
      const chat = golden.chat;
      test('chat_template.jinja renders the messages as transformers does', () => {
        assert.ok(existsSync(path.join(dir, 'chat_template.jinja')));
        assert.equal(ModelTokenizer.load(dir).applyChatTemplate(chat.messages, { addGenerationPrompt: true }), chat.rendered);
      });
    }

    test('f32 mode: router ids, logits and greedy tokens match transformers', () => {
      const { model, spec } = loadModel(dir, { fast: false });
      try {
        assert.equal(model.moeLayers.length, golden.moe_layers.length);
        const V = spec.vocabSize;
        const k = spec.moe.router.topK;
        for (const [ci, c] of golden.cases.entries()) {
          const runner = new DirectRunner(model);
          const res = runner.step([runner.newSeq()], [c.prompt_ids], true);
          for (let m = 0; m < golden.moe_layers.length; m++) {
            for (let p = 0; p < c.prompt_ids.length; p++) {
              const ours = Array.from(res.routedIds[m]!.subarray(p * k, (p + 1) * k));
              assert.deepEqual(ours, c.router[m]![p], `case ${ci} moe layer ${m} position ${p}`);
            }
          }
          let worst = 0;
          for (let p = 0; p < c.prompt_ids.length; p++)
            worst = Math.max(worst, maxAbsDiff(res.logits.subarray(p * V, (p + 1) * V), c.logits[p]!));
          assert.ok(worst <= F32_LOGIT_TOL, `case ${ci}: logits max-abs error ${worst} > ${F32_LOGIT_TOL}`);
          const greedy = new DirectRunner(model).greedy(c.prompt_ids, c.greedy.length);
          assert.deepEqual(greedy, c.greedy, `case ${ci} greedy continuation`);
        }
      } finally {
        model.dispose();
      }
    });

    test('batched sequences of different lengths equal each one alone, bit for bit', () => {
      const { model } = loadModel(dir, { fast: false });
      try {
        // The second step holds only decodes: all sequences decode together.
        const { alone, batched } = aloneAndBatched(model, golden.cases.map((c) => c.prompt_ids));
        batched.forEach(([prefill, decode], i) => {
          assert.deepEqual(prefill, alone[i]![0], `prefill logits of sequence ${i}`);
          assert.deepEqual(decode, alone[i]![1], `decode logits of sequence ${i}`);
        });
      } finally {
        model.dispose();
      }
    });

    test('bf16 KV cache (the fast mode\'s auto) stays within the bf16 mode\'s tolerance of the f32 goldens', () => {
      const r = kvFidelity(dir, true, 'bf16');
      assert.ok(r.maxConsistent <= (BF16_REL_TOL_BY_FAMILY[name] ?? BF16_REL_TOL), `bf16 KV: routing-consistent logits off by ${(r.maxConsistent * 100).toFixed(2)}%`);
      assert.ok(r.mean <= (BF16_MEAN_REL_TOL_BY_FAMILY[name] ?? BF16_MEAN_REL_TOL), `bf16 KV: logits off by ${(r.mean * 100).toFixed(2)}% of their range on average`);
    });

    test('fp8 KV cache stays within its measured tolerance of the f32 goldens', () => {
      const r = kvFidelity(dir, true, 'fp8');
      assert.ok(r.maxConsistent <= (FP8_REL_TOL_BY_FAMILY[name] ?? FP8_REL_TOL), `fp8 KV: routing-consistent logits off by ${(r.maxConsistent * 100).toFixed(2)}%`);
      assert.ok(r.mean <= FP8_MEAN_REL_TOL, `fp8 KV: logits off by ${(r.mean * 100).toFixed(2)}% of their range on average`);
    });

    test('bf16 and fp8 KV caches: batched sequences equal each one alone, bit for bit', () => {
      const { model } = loadModel(dir, { fast: true });
      try {
        for (const kv of ['bf16', 'fp8'] as const) {
          const { alone, batched } = aloneAndBatched(model, golden.cases.map((c) => c.prompt_ids), kv);
          batched.forEach(([prefill, decode], i) => {
            assert.deepEqual(prefill, alone[i]![0], `${kv}: prefill logits of sequence ${i}`);
            assert.deepEqual(decode, alone[i]![1], `${kv}: decode logits of sequence ${i}`);
          });
        }
      } finally {
        model.dispose();
      }
    });

    test('bf16 (fast) mode stays within its measured tolerance of the f32 goldens', () => {
      const { model, spec } = loadModel(dir, { fast: true });
      try {
        const V = spec.vocabSize;
        const k = spec.moe.router.topK;
        let sumRel = 0;
        let positions = 0;
        for (const [ci, c] of golden.cases.entries()) {
          const runner = new DirectRunner(model);
          const res = runner.step([runner.newSeq()], [c.prompt_ids], true);
          for (let p = 0; p < c.prompt_ids.length; p++) {
            const ours = res.logits.subarray(p * V, (p + 1) * V);
            const rel = maxAbsDiff(ours, c.logits[p]!) / range(c.logits[p]!);
            sumRel += rel;
            positions++;
            // Routing of this position and every earlier one (attention mixes them in) agrees with HF.
            const sameRouting = golden.moe_layers.every((_, m) => {
              for (let q = 0; q <= p; q++) {
                const ids = Array.from(res.routedIds[m]!.subarray(q * k, (q + 1) * k)).sort((a, b) => a - b);
                const want = [...c.router[m]![q]!].sort((a, b) => a - b);
                if (ids.some((v, j) => v !== want[j])) return false;
              }
              return true;
            });
            if (sameRouting)
              assert.ok(rel <= (BF16_REL_TOL_BY_FAMILY[name] ?? BF16_REL_TOL), `case ${ci} position ${p}: bf16 logits off by ${(rel * 100).toFixed(2)}% of their range`);
          }
        }
        const mean = sumRel / positions;
        assert.ok(mean <= (BF16_MEAN_REL_TOL_BY_FAMILY[name] ?? BF16_MEAN_REL_TOL), `bf16 logits off by ${(mean * 100).toFixed(2)}% of their range on average`);
      } finally {
        model.dispose();
      }
    });
  });
}
