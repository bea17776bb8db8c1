// --quantize on whole models: teacher-forced agreement with the f32 model on every fixture (top-1
// and mean KL per format, the issue's bounds), --quantize-dense against the model over its dense
// weights' quantize-dequantized copies, and the quantized model through expert parallelism and the
// offloader equal to the quantized model alone, bit for bit.
import assert from 'node:assert/strict';
import { existsSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';

import { quantizeOption } from '../src/cli/resolve.js';
import { startExpertRanks } from '../src/dist/expert-ranks.js';
import { rankIdentity } from '../src/dist/identity.js';
import type { EngineOptions } from '../src/engine/protocol.js';
import { parseModelConfig, validateCheckpoint } from '../src/model/config.js';
import { CheckpointSource, loadModel } from '../src/model/load.js';
import { MoeModel } from '../src/model/model.js';
import { openCheckpoint } from '../src/model/safetensors.js';
import type { HostTensor, TensorSource } from '../src/model/tensor-source.js';
import { quantizeSpec, type QuantizeSpec } from '../src/model/quantize.js';
import { packageRoot } from '../src/native/index.js';
import { attachOffloader, skipAllExperts } from '../src/offload/setup.js';
import { quantDequant } from './helpers/quant-dequant.js';
import { agreement, fixtureSequences, forcedLogits as forcedSeqLogits, teacherForced as teacherForcedAt } from './helpers/quant-fidelity.js';

const fixturesDir = path.join(packageRoot(), 'test', 'fixtures');
const fixtures = readdirSync(fixturesDir).filter((d) => existsSync(path.join(fixturesDir, d, 'golden.json'))).sort();

/** Every case's prompt + HF greedy continuation through a loaded model, teacher-forced: logits [positions][V]. */
function forcedLogits(model: MoeModel, dir: string): Float32Array[] {
  return forcedSeqLogits(model, fixtureSequences(dir));
}

/** forcedLogits of the fixture loaded alone, with the given --quantize and mode. */
function teacherForced(dir: string, quantize: QuantizeSpec | null, fast = false): Float32Array[] {
  return teacherForcedAt(dir, { quantize, fast, kvDtype: 'f32' });
}

/** model.residentWeightBytes of the fixture loaded with the given --quantize. */
function residentBytes(dir: string, quantize: QuantizeSpec | null): { dense: number; experts: number } {
  const { model } = loadModel(dir, { fast: false, quantize });
  try {
    return { ...model.residentWeightBytes };
  } finally {
    model.dispose();
  }
}

/**
 * The weights --quantize-dense must quantize, by name, in every family's checkpoint: the attention
 * projections (MLA's kv_b_proj excepted: decode absorbs it per head, unquantized), Gated DeltaNet's
 * in_proj q / k / v / z rows (Qwen3-Next's fused in_proj_qkvz, Qwen3.5's in_proj_qkv and in_proj_z) and
 * out_proj, and the dense FFN and shared expert projections; not the routed experts, routers, norms,
 * embeddings, lm_head, or the DeltaNet's b / a rows (in_proj_ba, in_proj_b, in_proj_a: they set the
 * delta rule's step and decay).
 */
function isDenseWeight(name: string, t: HostTensor): boolean {
  return t.shape.length === 2 && /(_proj|in_proj_qkvz|in_proj_qkv|in_proj_z)(_with_mqa)?\.weight$/.test(name) &&
    !name.includes('kv_b_proj') && !/\.experts\.\d+\./.test(name) && !name.startsWith('lm_head');
}

/** A checkpoint source whose dense weights (isDenseWeight) are their quantize-dequantized f32 copies. */
class DequantizedDense implements TensorSource {
  quantized = 0;
  constructor(private readonly src: TensorSource, private readonly qmax: number, private readonly group: number) {}
  has(name: string): boolean {
    return this.src.has(name);
  }
  get(name: string): HostTensor {
    const t = this.src.get(name);
    if (!isDenseWeight(name, t)) return t;
    this.quantized++;
    return quantDequant(t, this.qmax, this.group);
  }
}

// Bounds, pooled over every fixture's teacher-forced positions. The issue asks int8 and fp8 >= 99%
// top-1 and int4 >= 95%, but these random tiny fixtures have top-1 margins of ~0.01 logits at many
// positions: the bf16 mode that ships (bf16 activations, exact weights) agrees with f32 at only
// 96.0% of them (710/740 over the 10 fixtures). Measured here (transformers-5.18 fixtures): int8
// 97.2% (mean KL 1.0e-3), fp8 86.5% (1.3e-2), int4 g32 65.8% (7.1e-2): the noise of each format
// (fp8's 3 mantissa bits ~3x int8's per-row step, int4 ~18x) against those margins; gpt_oss, whose
// fixture drives its clamped SwiGLU to the limit, loses most (int4 24/74). The test holds int8 to
// the bf16 mode's agreement and the others to floors under their measured figures (a broken scale
// or code falls to chance, near 0), and prints the figures; bench/RESULTS.md has them per fixture.
// --quantize-dense adds the attention and dense FFN weights' noise to the experts' on hidden size 64
// (a scale per 64 weights, 8-16 heads' worth of rows): measured int8 88.0% (KL 1.0e-2), fp8 59.9%
// (8.1e-2), int4 g32 26.2% (0.32), g128 21.8% (0.36), int8 in the bf16 mode 88.0%; floors under them
// (chance is ~0 over a 32000 vocabulary). The dequantize test below holds the numbers exactly.
const FORMATS: [string, QuantizeSpec, number | 'bf16', boolean?][] = [
  ['int8', quantizeSpec('int8', 0)!, 'bf16'],
  ['fp8', quantizeSpec('fp8', 0)!, 0.8],
  ['int4 g32', quantizeSpec('int4', 32)!, 0.55],
  // NOTE: since int4 scales are bf16 (session 16) g128 measures 568/1054 (53.9%, KL 1.19e-1), against
  // 584 (55.4%, 1.16e-1) with f32 scales; g32 617 (58.5%, 1.05e-1) against 605 (57.4%, 1.06e-1): near
  // ties on random weights moving with a 2^-9 change of the scales, not a trend (trained fixtures:
  // quantize-trained.test.ts).
  ['int4 g128', quantizeSpec('int4', 128)!, 0.52],
  ['int8 +dense', quantizeSpec('int8', 0, true)!, 0.8],
  ['int8 +dense, bf16 mode', quantizeSpec('int8', 0, true)!, 0.75, true],
  ['fp8 +dense', quantizeSpec('fp8', 0, true)!, 0.5],
  ['int4 g32 +dense', quantizeSpec('int4', 32, true)!, 0.15],
  ['int4 g128 +dense', quantizeSpec('int4', 128, true)!, 0.12],
];

// Fast mode (the bench's and the server's default): int8 and int4 experts against activations
// quantized to int8 per 128 columns (32 against int4 g32), fp8 experts against bf16 activations,
// attention and dense weights in bf16 mode. Measured: int8 698/740 = 94.3% (mean KL 3.2e-3; with f32
// activations into the int8 experts, before the int8 kernels, 702/740 and 2.1e-3), fp8 85.5%, int4
// g32 65.9% (as with f32 activations: int4's own noise dominates); over today's 1054 positions int8
// 965 (91.6%) with blocks of 128, 959 with blocks of 32. Floors under the measured figures.
const FAST_FORMATS: [string, QuantizeSpec, number | 'bf16', true][] = [
  ['int8 fast (int8 activations)', quantizeSpec('int8', 0)!, 0.89, true],
  ['fp8 fast (bf16 activations)', quantizeSpec('fp8', 0)!, 0.8, true],
  ['int4 g32 fast (int8 activations)', quantizeSpec('int4', 32)!, 0.55, true],
];

test('--quantize: teacher-forced top-1 agreement with the f32 model on every fixture', (t) => {
  const refs = new Map(fixtures.map((f) => [f, teacherForced(path.join(fixturesDir, f), null)]));
  const total = [...refs.values()].reduce((a, r) => a + r.length, 0);
  let bf16Agree = 0;
  for (const f of fixtures) bf16Agree += agreement(refs.get(f)!, teacherForced(path.join(fixturesDir, f), null, true)).agree;
  t.diagnostic(`bf16 mode (baseline): top-1 ${bf16Agree}/${total} = ${(100 * bf16Agree / total).toFixed(2)}%`);
  for (const [name, q, floor, fast] of [...FORMATS.map(([n, q, f, fast]) => [n, q, f, fast ?? false] as const), ...FAST_FORMATS]) {
    let agree = 0, klSum = 0;
    const per: string[] = [];
    for (const f of fixtures) {
      const ref = refs.get(f)!;
      const r = agreement(ref, teacherForced(path.join(fixturesDir, f), q, fast));
      agree += r.agree;
      klSum += r.klSum;
      per.push(`${f} ${r.agree}/${ref.length}`);
    }
    t.diagnostic(`${name}: top-1 ${agree}/${total} = ${(100 * agree / total).toFixed(2)}%, mean KL ${(klSum / total).toExponential(2)} (${per.join(', ')})`);
    // 'bf16': as faithful as the bf16 mode, within 0.5% of the positions: on these random fixtures
    // near-ties flip either way with the kernels' sum order, so the bf16 mode's own count moves with
    // the CPU (995 on the portable kernels, 993 on AVX2's, against int8's 994, on one machine).
    const need = floor === 'bf16' ? (bf16Agree - Math.ceil(0.005 * total)) / total : floor;
    assert.ok(agree / total >= need, `${name}: top-1 agreement ${agree}/${total} below ${floor === 'bf16' ? `the bf16 mode's ${bf16Agree}/${total} (less 0.5%)` : floor}`);
  }
});

test('--quantize-dense: every fixture equals the model over its dense weights quantize-dequantized (int8, int4 g32), fewer bytes', (t) => {
  for (const [name, q, qmax] of [['int8', quantizeSpec('int8', 0, true)!, 127], ['int4 g32', quantizeSpec('int4', 32, true)!, 7]] as const) {
    const bytes: string[] = [];
    for (const f of fixtures) {
      const dir = path.join(fixturesDir, f);
      const want = (() => {
        // The reference: routed experts quantized the same way (--quantize without -dense), dense
        // weights handed over already quantize-dequantized in f32, everything else as stored.
        const spec = parseModelConfig(dir);
        const ckpt = openCheckpoint(dir, spec.quantization?.method === 'fp8' ? { fp8BlockSize: spec.quantization.blockSize } : {});
        validateCheckpoint(spec, ckpt);
        const src = new DequantizedDense(new CheckpointSource(ckpt), qmax, q.group);
        const model = new MoeModel(spec, src, { fast: false, quantize: { format: q.format, group: q.group } });
        try {
          assert.ok(src.quantized >= 2 * spec.numLayers, `${f}: only ${src.quantized} dense weights found`);
          return forcedLogits(model, dir);
        } finally {
          model.dispose();
        }
      })();
      const got = teacherForced(dir, q);
      let worst = 0, scale = 0;
      got.forEach((l, i) => {
        for (let j = 0; j < l.length; j++) {
          worst = Math.max(worst, Math.abs(l[j]! - want[i]![j]!));
          scale = Math.max(scale, Math.abs(want[i]![j]!));
        }
      });
      // Same weights and f32 arithmetic, dequantised in registers instead of stored: equal here (0 on
      // AVX-512 and the portable path); other SIMD levels may order the f32 sums apart. Dense weights
      // left unquantized differ by 0.1 to 1 of the logit scale (measured: MLA's kv_a alone, 0.1-0.6).
      assert.ok(worst <= 1e-4 * scale, `${name} ${f}: logits differ by ${worst} (scale ${scale})`);
      const plain = residentBytes(dir, { format: q.format, group: q.group });
      const dense = residentBytes(dir, q);
      assert.equal(dense.experts, plain.experts, `${f}: routed experts' bytes`);
      assert.ok(dense.dense < plain.dense, `${name} ${f}: dense weights ${dense.dense} bytes, not below ${plain.dense}`);
      bytes.push(`${f} ${(dense.dense / plain.dense).toFixed(2)}`);
    }
    t.diagnostic(`--quantize ${name} --quantize-dense: resident bytes of the non-expert weights (lm_head, routers included) vs without: ${bytes.join(', ')}`);
  }
});

test('--quantize int8 with 2 expert ranks equals the quantized model alone, bit for bit', async () => {
  const dir = path.join(fixturesDir, 'mixtral');
  const q = quantizeSpec('int8', 0);
  const want = teacherForced(dir, q);
  const ranks = startExpertRanks(dir, 2, false, 60_000, undefined, q);
  try {
    await ranks.ready;
    const loaded = loadModel(dir, { fast: false, quantize: q, comm: ranks.comm, loadExpert: (_l, e) => ranks.comm.ownsExpert(e) });
    try {
      forcedLogits(loaded.model, dir).forEach((l, i) => assert.deepEqual(l, want[i], `position ${i}`));
    } finally {
      loaded.model.dispose();
    }
  } finally {
    await ranks.stop();
  }
});

test('--quantize int4 through the offloader (25% of experts cached) equals it resident', async () => {
  const dir = path.join(fixturesDir, 'qwen3_moe');
  const q = quantizeSpec('int4', 32);
  const want = teacherForced(dir, q);
  const loaded = loadModel(dir, { fast: false, quantize: q, loadExpert: skipAllExperts });
  const off = attachOffloader(loaded, { policy: 'lru', fraction: 0.25, quantize: q, copyThread: true });
  try {
    // Slots hold quantized experts: a quarter or less of the bytes of the checkpoint's bf16.
    assert.ok(off.store.slotBytes < off.store.expertBytes * 0.4,
      `slot ${off.store.slotBytes} bytes vs expert ${off.store.expertBytes} bytes`);
    forcedLogits(loaded.model, dir).forEach((l, i) => assert.deepEqual(l, want[i], `position ${i}`));
  } finally {
    await off.close();
    off.dispose();
    loaded.model.dispose();
  }
});

// Every family with --quantize int8 (dense weights and LM head too) through the expert cache (a quarter
// of the experts) and over 2 expert ranks: the same logits as the quantized model alone, bit for bit.
// gpt_oss is left out of the cache, which refuses it (its transposed, interleaved gate_up_proj).
test('--quantize int8 --quantize-dense --quantize-lm-head on every fixture: the expert cache and 2 expert ranks equal the model alone', async () => {
  const q = quantizeSpec('int8', 0, true, true)!;
  const cached: string[] = [];
  for (const f of fixtures) {
    const dir = path.join(fixturesDir, f);
    const want = teacherForced(dir, q);
    const same = (got: Float32Array[], how: string) =>
      got.forEach((l, i) => assert.deepEqual(l, want[i], `${f} ${how}: position ${i}`));
    if (f !== 'gpt_oss') {
      const loaded = loadModel(dir, { fast: false, quantize: q, loadExpert: skipAllExperts });
      const off = attachOffloader(loaded, { policy: 'lru', fraction: 0.25, quantize: q, copyThread: true });
      try {
        assert.ok(off.stats().slots < off.stats().totalExperts, `${f}: ${off.stats().slots} slots`);
        same(forcedLogits(loaded.model, dir), 'expert cache');
        cached.push(f);
      } finally {
        await off.close();
        off.dispose();
        loaded.model.dispose();
      }
    }
    const ranks = startExpertRanks(dir, 2, false, 60_000, undefined, q);
    try {
      await ranks.ready;
      const loaded = loadModel(dir, { fast: false, quantize: q, comm: ranks.comm, loadExpert: (_l, e) => ranks.comm.ownsExpert(e) });
      try {
        same(forcedLogits(loaded.model, dir), '2 expert ranks');
      } finally {
        loaded.model.dispose();
      }
    } finally {
      await ranks.stop();
    }
  }
  assert.equal(cached.length, fixtures.length - 1);
});

test('--quantize flags: bad groups are refused with a reason; --quantize-dense is taken on the CPU and the device', () => {
  assert.equal(quantizeOption({ quantize: 'none' }, 'cpu'), null);
  assert.deepEqual(quantizeOption({ quantize: 'int4', 'quantize-group': 128 }, 'cpu'), { format: 'int4', group: 128 });
  assert.throws(() => quantizeOption({ quantize: 'int4', 'quantize-group': 64 }, 'cpu'), /int4 groups are 32 or 128/);
  // The device engine keeps quantized experts (test/cuda-quant.test.ts), in the expert cache's slots and
  // on expert ranks too (test/cuda-offload-quant.test.ts, test/ep.test.ts).
  assert.deepEqual(quantizeOption({ quantize: 'int8' }, 'cuda:0'), { format: 'int8', group: 0 });
  assert.deepEqual(quantizeOption({ quantize: 'fp8', 'expert-parallel': 2 }, 'cuda:0'), { format: 'fp8', group: 128 });
  // The device engine quantizes the dense weights too (test/cuda-quant.test.ts).
  assert.deepEqual(quantizeOption({ quantize: 'int8', 'quantize-dense': true }, 'cuda:0'), { format: 'int8', group: 0, dense: true });
  assert.deepEqual(quantizeOption({ quantize: 'int8', 'quantize-dense': true }, 'cpu'), { format: 'int8', group: 0, dense: true });
  assert.throws(() => quantizeOption({ quantize: 'none', 'quantize-dense': true }, 'cpu'),
    /^UsageError: --quantize-dense needs --quantize int8, int4 or fp8/);
  // Ranks must agree on it: it is part of the identity they compare at rendezvous.
  const dir = path.join(fixturesDir, 'mixtral');
  const id = (q: QuantizeSpec | null) => rankIdentity({ modelDir: dir, computeDtype: 'f32', blockSize: 16, quantize: q } as EngineOptions, 64, 0, 0, 'v').compat.quantize;
  assert.deepEqual([id(null), id(quantizeSpec('int8', 0)), id(quantizeSpec('int8', 0, true)), id(quantizeSpec('int4', 32, true))],
    ['none', 'int8/0', 'int8/0/dense', 'int4/32/dense']);
});
