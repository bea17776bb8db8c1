// The e2e bench's weights-read bound (bench/e2e.ts DecodeBytes) against an independent count: the bf16
// bytes of every checkpoint tensor a decode step reads (all but the routed experts and the embedding
// table), on a plain and a hybrid (Gated DeltaNet) fixture; the linear-attention state it counts
// against the engine's own state slot size; its Runner driving a hybrid model; and the parameter
// counts it prints (countParams) against the checkpoints' matrices.
import assert from 'node:assert/strict';
import path from 'node:path';
import { test } from 'node:test';

import { DecodeBytes, Runner, argmaxRows } from '../bench/e2e.js';
import { countParams, loadModel } from '../src/model/load.js';
import { packageRoot } from '../src/native/index.js';

const fixturesDir = path.join(packageRoot(), 'test', 'fixtures');

for (const f of ['mixtral', 'qwen3_next']) {
  test(`DecodeBytes (${f}): dense bytes = the bf16 bytes of the tensors a decode step reads; state = read + write of a slot`, () => {
    const { spec, model, checkpoint } = loadModel(path.join(fixturesDir, f), { fast: true });
    try {
      const b = new DecodeBytes(spec, 'bf16');
      let want = 0;
      let expert = 0;
      for (const t of checkpoint.tensors.values()) {
        const n = t.shape.reduce((a, c) => a * c, 1);
        if (/\.experts\.0\./.test(t.name)) expert += 2 * n;  // expert 0 of every MoE layer
        if (/\.experts\./.test(t.name) || t.name === 'model.embed_tokens.weight') continue;
        // matrices in bf16; vectors (norms, A_log, dt_bias) and the depthwise conv [C, 1, K] in f32
        want += (t.shape.length === 2 ? 2 : 4) * n;
      }
      // The bound leaves out A_log and dt_bias (2 x Hv floats per linear layer): well under 0.1%.
      const tiny = spec.linearAttention ? 2 * 4 * spec.linearAttention.valueHeads * model.numLinearLayers : 0;
      assert.equal(b.denseBytes, want - tiny, `${f}: dense bytes`);
      assert.equal(b.expertBytes, expert / model.numMoeLayers, `${f}: one expert's bytes`);
      assert.equal(b.stateBytesPerSeq, 2 * model.stateBytesPerSlot, `${f}: state bytes per sequence`);
      if (f === 'qwen3_next') assert.ok(b.stateBytesPerSeq > 0);
      // The KV cache read: K and V of every cached token in every attention layer, in the cache's dtype.
      const a = spec.attention;
      if (a.kind !== 'gqa') throw new Error('GQA fixtures');
      const attnLayers = spec.layers.filter((l) => l.mixer !== 'linear_attention').length;
      const f32 = new DecodeBytes(spec, 'f32');
      assert.equal(f32.step([], [10], 1).bytes - b.step([], [10], 1).bytes, 10 * attnLayers * 2 * a.kvHeads * a.headDim * 2, `${f}: KV bytes`);
      assert.equal(new Runner(model, 4, 1).kvDtype, 'bf16', 'the fast mode\'s default KV cache (--kv-cache-dtype auto)');
    } finally {
      model.dispose();
    }
  });
}

test('Runner: a hybrid model batched gives each sequence the tokens it gets alone (a state slot per sequence)', () => {
  const { spec, model } = loadModel(path.join(fixturesDir, 'qwen3_next'), { fast: false });
  try {
    const V = spec.vocabSize;
    const prompts = [[5, 17, 99, 3, 42], [7, 8, 9], [100, 200, 300, 400]];
    const greedy = (runner: Runner, ps: number[][], steps: number): number[][] => {
      runner.reset();
      const seqs = ps.map(() => runner.newSeq());
      let next = argmaxRows(runner.step(seqs, ps).logits, ps.length, V);
      const out = next.map((t) => [t]);
      for (let s = 0; s < steps; s++) {
        next = argmaxRows(runner.step(seqs, next.map((t) => [t])).logits, ps.length, V);
        next.forEach((t, i) => out[i]!.push(t));
      }
      return out;
    };
    const runner = new Runner(model, 64, 8);
    assert.equal(runner.kvDtype, 'f32', 'the reference mode\'s default KV cache');
    const batched = greedy(runner, prompts, 6);
    const alone = prompts.map((p) => greedy(runner, [p], 6)[0]!);
    assert.deepEqual(batched, alone);
  } finally {
    model.dispose();
  }
});

for (const f of ['mixtral', 'qwen3_next', 'qwen3_5_moe_text']) {
  test(`countParams (${f}): total = the elements of the checkpoint's matrices (norms and per-head vectors aside)`, () => {
    const { spec, model, checkpoint } = loadModel(path.join(fixturesDir, f), { fast: true });
    try {
      let want = spec.tieWordEmbeddings && !checkpoint.has('lm_head.weight') ? spec.vocabSize * spec.hidden : 0;
      for (const t of checkpoint.tensors.values()) if (t.shape.length >= 2) want += t.shape.reduce((a, c) => a * c, 1);
      assert.equal(countParams(spec).total, want);
    } finally {
      model.dispose();
    }
  });
}
