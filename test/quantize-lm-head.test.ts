// --quantize-lm-head: the LM head packed in the --quantize format, on an untied (mixtral) and a tied
// (qwen3_moe: the LM head a quantized copy of the embedding table) fixture. The logits equal a
// float64 product of the model's own final hidden states with the LM head quantize-dequantized from
// the format's definition; the resident bytes drop by exactly the head's bf16 minus packed bytes; the
// flag's errors.
import assert from 'node:assert/strict';
import path from 'node:path';
import { test } from 'node:test';

import { modelFlags } from '../src/cli/engine-flags.js';
import { parseFlags } from '../src/cli/options.js';
import { quantizeOption } from '../src/cli/resolve.js';
import { rankIdentity } from '../src/dist/identity.js';
import type { EngineOptions } from '../src/engine/protocol.js';
import { parseModelConfig, validateCheckpoint } from '../src/model/config.js';
import { CheckpointSource, loadModel } from '../src/model/load.js';
import { MoeModel } from '../src/model/model.js';
import { quantizeSpec, quantizedBytes, type QuantizeSpec } from '../src/model/quantize.js';
import { openCheckpoint } from '../src/model/safetensors.js';
import type { HostTensor, TensorSource } from '../src/model/tensor-source.js';
import { packageRoot } from '../src/native/index.js';
import { quantDequantF64 } from './helpers/quant-dequant.js';
import { fixtureSequences, forcedLogits } from './helpers/quant-fidelity.js';

const fixturesDir = path.join(packageRoot(), 'test', 'fixtures');

/**
 * The checkpoint with its LM head replaced by [I_H; 0] in f32: the logits' first H columns are then
 * the final normed hidden states themselves (x * 1 + 0s is exact in f32).
 */
class IdentityHead implements TensorSource {
  constructor(private readonly src: TensorSource, private readonly V: number, private readonly H: number) {}
  has(name: string): boolean {
    return name === 'lm_head.weight' || this.src.has(name);
  }
  get(name: string): HostTensor {
    if (name !== 'lm_head.weight') return this.src.get(name);
    const w = new Float32Array(this.V * this.H);
    for (let j = 0; j < this.H; j++) w[j * this.H + j] = 1;
    return { dtype: 'f32', shape: [this.V, this.H], data: w };
  }
}

/** The fixture's final normed hidden states [positions][H], the rest of the model quantized as `q` says. */
function finalHidden(dir: string, q: QuantizeSpec | null): Float64Array[] {
  const spec = parseModelConfig(dir);
  const ckpt = openCheckpoint(dir);
  validateCheckpoint(spec, ckpt);
  const model = new MoeModel(spec, new IdentityHead(new CheckpointSource(ckpt), spec.vocabSize, spec.hidden), { fast: false, quantize: q });
  try {
    return forcedLogits(model, fixtureSequences(dir)).map((l) => Float64Array.from(l.subarray(0, spec.hidden)));
  } finally {
    model.dispose();
  }
}

function loaded(dir: string, q: QuantizeSpec | null): { logits: Float32Array[]; denseBytes: number } {
  const { model } = loadModel(dir, { fast: false, quantize: q });
  try {
    return { logits: forcedLogits(model, fixtureSequences(dir)), denseBytes: model.residentWeightBytes.dense };
  } finally {
    model.dispose();
  }
}

/** max |got - want| over every position and vocabulary entry, and the largest |want|. */
function maxErr(got: Float32Array[], want: Float64Array[]): { err: number; scale: number } {
  let err = 0, scale = 0;
  got.forEach((row, p) => {
    for (let v = 0; v < row.length; v++) {
      err = Math.max(err, Math.abs(row[v]! - want[p]![v]!));
      scale = Math.max(scale, Math.abs(want[p]![v]!));
    }
  });
  return { err, scale };
}

// Untied and tied, each format, the experts (and with -dense the attention) quantized the same way in
// the reference's hidden states: only the LM head differs between the two models.
const CASES: [string, QuantizeSpec][] = [
  ['int8', quantizeSpec('int8', 0, false, true)!],
  ['int4 g32', quantizeSpec('int4', 32, false, true)!],
  ['int4 g128 +dense', quantizeSpec('int4', 128, true, true)!],
  ['fp8 +dense', quantizeSpec('fp8', 0, true, true)!],
];

for (const fixture of ['mixtral', 'qwen3_moe']) {
  test(`--quantize-lm-head on ${fixture}: logits = float64 hidden x the LM head quantize-dequantized; bytes`, (t) => {
    const dir = path.join(fixturesDir, fixture);
    const spec = parseModelConfig(dir);
    const V = spec.vocabSize, H = spec.hidden;
    const ckpt = openCheckpoint(dir);
    const tied = spec.tieWordEmbeddings && !ckpt.tensors.has('lm_head.weight');
    assert.equal(tied, fixture === 'qwen3_moe', `${fixture}: tied embeddings`);
    const head = new CheckpointSource(ckpt).get(tied ? 'model.embed_tokens.weight' : 'lm_head.weight');
    assert.equal(head.dtype, 'bf16');
    for (const [name, q] of CASES) {
      const rest: QuantizeSpec = { format: q.format, group: q.group, ...(q.dense ? { dense: true } : {}) };
      const hidden = finalHidden(dir, rest);
      const w = quantDequantF64(head, q);  // [V, H]
      const want = hidden.map((h) => {
        const out = new Float64Array(V);
        for (let v = 0; v < V; v++) {
          let s = 0;
          for (let j = 0; j < H; j++) s += h[j]! * w[v * H + j]!;
          out[v] = s;
        }
        return out;
      });
      const got = loaded(dir, q);
      const plain = loaded(dir, rest);
      const e = maxErr(got.logits, want);
      const ePlain = maxErr(plain.logits, want);
      t.diagnostic(`${fixture} ${name}: max error ${e.err.toExponential(2)} of scale ${e.scale.toFixed(3)}; ` +
        `the bf16 head's ${ePlain.err.toExponential(2)}; dense bytes ${got.denseBytes} vs ${plain.denseBytes}`);
      // f32 sums over H = 64 against float64; a head left in bf16 misses by the format's step (~100x more).
      assert.ok(e.err <= 2e-6 * e.scale, `${fixture} ${name}: logits differ from the reference by ${e.err} (scale ${e.scale})`);
      assert.ok(ePlain.err > 20 * e.err, `${fixture} ${name}: the reference cannot tell the bf16 head (${ePlain.err}) from the quantized one`);
      // The packed head replaces the bf16 one (tied: the embedding table is not counted either way).
      assert.equal(got.denseBytes, plain.denseBytes - V * H * 2 + quantizedBytes(q, V, H, false), `${fixture} ${name}: resident dense bytes`);
    }
  });
}

test('--quantize-lm-head flag: needs --quantize, CPU engine only, part of the rank identity', () => {
  const flags = (argv: string[]) => parseFlags(modelFlags, argv, {}).flags;
  assert.equal(flags([])['quantize-lm-head'], false, 'off by default');
  assert.deepEqual(quantizeOption(flags(['--quantize', 'int8', '--quantize-lm-head']), 'cpu'), { format: 'int8', group: 0, lmHead: true });
  assert.deepEqual(quantizeOption(flags(['--quantize', 'int4', '--quantize-group', '128', '--quantize-dense', '--quantize-lm-head']), 'cpu'),
    { format: 'int4', group: 128, dense: true, lmHead: true });
  assert.throws(() => quantizeOption(flags(['--quantize-lm-head']), 'cpu'),
    /^UsageError: --quantize-lm-head needs --quantize int8, int4 or fp8 \(it quantizes the LM head in that format\)$/);
  assert.throws(() => quantizeOption(flags(['--quantize', 'fp8', '--quantize-lm-head']), 'cuda:0'),
    /^UsageError: --quantize-lm-head runs on the CPU engine only for now .*; drop --quantize-lm-head or use --device cpu$/);
  // Ranks must agree on it: it is part of the identity they compare at rendezvous.
  const dir = path.join(fixturesDir, 'mixtral');
  const id = (q: QuantizeSpec | null) => rankIdentity({ modelDir: dir, computeDtype: 'f32', blockSize: 16, quantize: q } as EngineOptions, 64, 0, 0, 'v').compat.quantize;
  assert.deepEqual([id(quantizeSpec('int8', 0)), id(quantizeSpec('int8', 0, false, true)), id(quantizeSpec('fp8', 0, true, true))],
    ['int8/0', 'int8/0/lm_head', 'fp8/128/dense/lm_head']);
});
