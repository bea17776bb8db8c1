// The hybrid families (qwen3_next, qwen3_5_moe) on the device engine, driven by the scheduler: the
// device state pools indexed by the engine's state slots give the CPU bf16 engine's greedy tokens
// (the device computes in bf16, like it), sequences batched equal each alone bit for bit, and chunked
// prefill, recycled slots and preemption keep the tokens. On the GPU when present, always on the
// emulator of the cuda* ops (also with the model's streams held back until ordered).
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { describe, test } from 'node:test';

import { loadCudaModel, loadModel } from '../src/model/load.js';
import { packageRoot, type CudaAddon } from '../src/native/index.js';
import { createCudaEmulator, withLazyStreams } from './helpers/cuda-emu.js';
import { emulatorSkip, needsCudaDevice } from './helpers/cuda-skip.js';
import { request, runAll } from './helpers/hybrid-engine.js';
import { DirectRunner } from './helpers/model-runner.js';

const backends: { label: string; cuda: () => CudaAddon | undefined; skip: string | false }[] = [
  { label: 'emulator', cuda: () => createCudaEmulator(), skip: emulatorSkip },
  { label: 'emulator, lazy streams', cuda: () => withLazyStreams(createCudaEmulator()), skip: emulatorSkip },
  { label: 'gpu', cuda: () => undefined, skip: needsCudaDevice },
];

interface Golden { cases: { prompt_ids: number[]; greedy: number[] }[] }


for (const b of backends) {
  for (const name of ['qwen3_next', 'qwen3_5_moe_text']) {
    const dir = path.join(packageRoot(), 'test', 'fixtures', name);
    const golden = JSON.parse(readFileSync(path.join(dir, 'golden.json'), 'utf8')) as Golden;
    const reqs = golden.cases.map((c, i) => request(`c${i}`, c.prompt_ids, c.greedy.length));
    describe(`device engine (${b.label}) on ${name}`, { skip: b.skip }, () => {
      // The CPU bf16 engine's greedy continuations: the same bf16 GEMM inputs as the device's. (HF's f32
      // greedy tokens are the CPU f32 engine's, models.test.ts; bf16 leaves them early on these
      // random checkpoints, on the CPU as here: within the family bounds of cuda-model.test.ts.)
      const cpuGreedy = (): number[][] => {
        const cpu = loadModel(dir, { fast: true }).model;
        try {
          return golden.cases.map((c) => new DirectRunner(cpu).greedy(c.prompt_ids, c.greedy.length));
        } finally {
          cpu.dispose();
        }
      };

      test('greedy tokens equal the CPU bf16 engine\'s; batched equals alone bit for bit (tokens and logprobs)', () => {
        const want = cpuGreedy();
        const cuda = b.cuda();
        const loaded = loadCudaModel(dir, { device: 0, ...(cuda ? { cuda } : {}) });
        try {
          assert.equal(loaded.model.stateBytesPerSlot, loadModel(dir, { fast: true }).model.stateBytesPerSlot);
          const alone = reqs.map((r) => runAll(loaded, {}, [r]).out.get(r.id)!);
          const { out: batched } = runAll(loaded, {}, reqs);
          reqs.forEach((r, i) => {
            assert.deepEqual(alone[i]!.tokens, want[i], `${r.id}: the CPU bf16 engine's greedy tokens`);
            assert.deepEqual(batched.get(r.id)!.tokens, alone[i]!.tokens, `${r.id} tokens`);
            assert.deepEqual(batched.get(r.id)!.logprobs, alone[i]!.logprobs, `${r.id} logprobs`);
          });
        } finally {
          loaded.model.dispose();
        }
      });

      test('chunked prefill, recycled state slots and preemption keep the greedy tokens', () => {
        const want = cpuGreedy();
        const cuda = b.cuda();
        const loaded = loadCudaModel(dir, { device: 0, ...(cuda ? { cuda } : {}) });
        try {
          // Chunks of at most 7 tokens (the 67-token prompt takes 10 steps) and 2 state slots for 4
          // requests: the last two reuse the slots of the first two, whose state must not leak in.
          const chunked = runAll(loaded, { maxNumBatchedTokens: 7, maxNumSeqs: 2 }, reqs);
          reqs.forEach((r, i) => assert.deepEqual(chunked.out.get(r.id)!.tokens, want[i], `${r.id} chunked, 2 slots`));
          // 26 blocks of 4 tokens cannot hold the four sequences (92 + 35 + 27 + 22 tokens at their ends) at once.
          const tight = runAll(loaded, { kvCacheBlocks: 26 }, reqs);
          assert.ok(tight.preemptions > 0, 'the tight KV cache should have preempted');
          reqs.forEach((r, i) => assert.deepEqual(tight.out.get(r.id)!.tokens, want[i], `${r.id} preempted`));
        } finally {
          loaded.model.dispose();
        }
      });
    });
  }
}

test('device engine (emulator): a hybrid model refuses a forward without its state pools or with a bad slot', { skip: emulatorSkip }, () => {
  const dir = path.join(packageRoot(), 'test', 'fixtures', 'qwen3_next');
  const { model } = loadCudaModel(dir, { device: 0, cuda: createCudaEmulator() });
  try {
    const cache = model.allocateKvCache(16, 4);
    const batch = {
      tokenIds: Int32Array.of(5, 6), positions: Int32Array.of(0, 1), numSeqs: 1, seqInfo: Int32Array.of(0, 2, 2),
      blockTables: Int32Array.of(0), maxBlocks: 1, slots: Int32Array.of(0, 1), logitRows: Int32Array.of(1),
    };
    assert.throws(() => model.forward({ ...batch, stateSlots: Int32Array.of(0) }, cache, 4),
      /qwen3_next keeps per-sequence state: call allocateStateCache\(slots\) before forward/);
    model.allocateStateCache(2);
    assert.throws(() => model.forward(batch, cache, 4), /batch.stateSlots has 0 entries, expected one per sequence \(1\)/);
    assert.throws(() => model.forward({ ...batch, stateSlots: Int32Array.of(2) }, cache, 4),
      /batch.stateSlots\[0\] is 2, expected 0..1/);
    assert.equal(model.forward({ ...batch, stateSlots: Int32Array.of(1) }, cache, 4).logits.length, model.spec.vocabSize);
  } finally {
    model.dispose();
  }
});
