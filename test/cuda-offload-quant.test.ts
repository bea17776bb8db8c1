// The device expert cache with quantized experts (--quantize int8 / int4 / fp8, and an FP8 checkpoint's
// experts as shipped or re-quantized): its slots hold the experts in the layout the resident tables
// hold (fewer bytes per slot, so more slots for the same --expert-cache-gb), and the outputs equal
// the all-resident quantized device model's bit for bit. On the emulator with its side streams held
// back until ordered (withLazyStreams), where a missing wait on a copy shows.
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import path from 'node:path';
import { after, test } from 'node:test';

import { loadCudaModel } from '../src/model/load.js';
import { quantizeSpec, type QuantizeSpec } from '../src/model/quantize.js';
import { packageRoot } from '../src/native/index.js';
import { attachDeviceOffloader, type OffloadConfig } from '../src/offload/setup.js';
import { createCudaEmulator, withLazyStreams } from './helpers/cuda-emu.js';
import { emulatorSkip } from './helpers/cuda-skip.js';
import { makeFp8Checkpoint } from './helpers/fp8-checkpoint.js';
import { runAll } from './helpers/model-runner.js';

const fixture = (name: string) => path.join(packageRoot(), 'test', 'fixtures', name);
let fp8Root: string | null = null;
/** The deepseek_v3 fixture with FP8 experts in 24 x 48 blocks (made once, removed after the file). */
const fp8Checkpoint = () => (fp8Root ??= makeFp8Checkpoint(24, 48));
after(() => { if (fp8Root) rmSync(fp8Root, { recursive: true, force: true }); });

/**
 * Bytes of one expert in the device layout, from cuda_quant.h's definition (codes, then f32 scales
 * 16-byte aligned, per matrix; the fixtures' sizes need no padding): gate_up [2I, H], down [H, I].
 */
function slotBytesOf(format: string, group: number, H: number, I: number, fp8Block: [number, number] = [128, 128]): number {
  const up = (n: number) => Math.ceil(n / 16) * 16;
  const matrix = (n: number, k: number, halves: number) => {
    if (format === 'bf16') return n * k * 2;
    if (format === 'int8') return up(n * k) + up(n * 4);
    if (format === 'int4') return up(n * k / 2) + up(n * Math.ceil(k / group) * 4);
    // fp8: one scale per block of each half (gate, up) of the matrix.
    const [br, bc] = fp8Block;
    return up(n * k) + up(halves * Math.ceil(n / halves / br) * Math.ceil(k / bc) * 4);
  };
  return matrix(2 * I, H, 2) + matrix(H, I, 1);
}

const cases: { label: string; dir: () => string; quantize: QuantizeSpec | null; format: string; group: number; fp8Block?: [number, number] }[] = [
  { label: 'mixtral --quantize int4 g128', dir: () => fixture('mixtral'), quantize: quantizeSpec('int4', 128), format: 'int4', group: 128 },
  { label: 'qwen3_moe --quantize int8', dir: () => fixture('qwen3_moe'), quantize: quantizeSpec('int8', 0), format: 'int8', group: 0 },
  { label: 'deepseek_v3 --quantize fp8', dir: () => fixture('deepseek_v3'), quantize: quantizeSpec('fp8', 0), format: 'fp8', group: 128 },
  // ScMoE: the MoE runs on the side stream, and identity experts sit beside the quantized ones.
  { label: 'longcat_flash --quantize int4 g32', dir: () => fixture('longcat_flash'), quantize: quantizeSpec('int4', 32), format: 'int4', group: 32 },
  // An FP8 checkpoint: its experts as shipped (codes and 24 x 48 block scales) in the slots, and
  // with --quantize re-quantized from the dequantised weights, as the resident tables hold them.
  { label: 'an FP8 checkpoint (24 x 48 blocks)', dir: fp8Checkpoint, quantize: null, format: 'fp8', group: 48, fp8Block: [24, 48] },
  { label: 'an FP8 checkpoint with --quantize int8', dir: fp8Checkpoint, quantize: quantizeSpec('int8', 0), format: 'int8', group: 0 },
  // gpt-oss: biased, clamped-SwiGLU experts (cudaGroupGemmBiasedFfn over the quantized slots; the
  // biases stay resident).
  { label: 'gpt_oss --quantize int8', dir: () => fixture('gpt_oss'), quantize: quantizeSpec('int8', 0), format: 'int8', group: 0 },
  { label: 'gpt_oss --quantize int4 g32', dir: () => fixture('gpt_oss'), quantize: quantizeSpec('int4', 32), format: 'int4', group: 32 },
  { label: 'gpt_oss --quantize fp8', dir: () => fixture('gpt_oss'), quantize: quantizeSpec('fp8', 0), format: 'fp8', group: 128 },
  // --quantize-dense: the attention and shared expert weights quantized beside the cached experts.
  { label: 'qwen2_moe --quantize int8 --quantize-dense', dir: () => fixture('qwen2_moe'), quantize: quantizeSpec('int8', 0, true), format: 'int8', group: 0 },
];

for (const c of cases) {
  test(`device expert cache with quantized experts (emulator, lazy streams): ${c.label}, eam 25% and lru 50% equal resident, bit for bit`,
    { skip: emulatorSkip }, () => {
      const dir = c.dir();
      const q = c.quantize ? { quantize: c.quantize } : {};
      const resident = loadCudaModel(dir, { device: 0, cuda: createCudaEmulator(), ...q });
      assert.equal(resident.model.expertQuant?.format, c.format, 'the resident tables hold quantized experts');
      const want = runAll(resident.model, null);
      resident.model.dispose();
      const configs: { label: string; cfg: OffloadConfig }[] = [
        { label: 'eam 25%', cfg: { policy: 'eam', fraction: 0.25, prefetchMinProbability: 0 } },
        { label: 'lru 50%', cfg: { policy: 'lru', fraction: 0.5 } },
      ];
      for (const { label, cfg } of configs) {
        const cuda = withLazyStreams(createCudaEmulator());
        const loaded = loadCudaModel(dir, { device: 0, loadExperts: false, cuda, ...q });
        const off = attachDeviceOffloader(loaded, cfg, cuda);
        try {
          const { hidden: H, moe: { intermediate: I } } = loaded.spec;
          assert.equal(off.store.slotBytes, slotBytesOf(c.format, c.group, H, I, c.fp8Block), `${label}: bytes per slot`);
          assert.ok(off.store.slotBytes < slotBytesOf('bf16', 0, H, I), `${label}: a quantized slot is smaller than a bf16 one`);
          assert.equal(off.store.expertBytes, off.store.slotBytes, 'a load copies the slot\'s bytes');
          assert.equal(off.store.slotFormat, c.format === 'int4' ? `int4 g${c.group}` : c.format);
          const got = runAll(loaded.model, off);
          assert.deepEqual(got.tokens, want.tokens, `${c.label} ${label}: greedy tokens`);
          got.logits.forEach((l, i) => assert.deepEqual(l, want.logits[i], `${c.label} ${label}: logits of step ${i}`));
          const st = off.stats();
          assert.ok(st.slots < st.totalExperts, `${label}: the cache must be smaller than the model (${st.slots}/${st.totalExperts})`);
          assert.ok(st.misses > 0 && st.hits > 0 && off.cache.evictions > 0, `${label}: ${JSON.stringify(st)}`);
          assert.equal(st.bytesLoaded % off.store.slotBytes, 0, `${label}: loads move whole quantized experts`);
          assert.ok(st.bytesLoaded >= st.misses * off.store.slotBytes, `${label}: bytes loaded`);
          if (cfg.policy === 'eam') assert.ok(st.prefetchLoads > 0, `${label}: the prefetch path must run: ${JSON.stringify(st)}`);
        } finally {
          off.dispose();
          loaded.model.dispose();
        }
      }
    });
}

test('device expert cache: the same --expert-cache-gb holds more quantized experts (int8: 18 slots for 10 bf16 ones, int4 g32: all 32)', { skip: emulatorSkip }, () => {
  const dir = fixture('mixtral');
  const slots = (quantize: QuantizeSpec | null, budgetBytes: number) => {
    const cuda = createCudaEmulator();
    const loaded = loadCudaModel(dir, { device: 0, loadExperts: false, cuda, ...(quantize ? { quantize } : {}) });
    const off = attachDeviceOffloader(loaded, { policy: 'lru', budgetBytes }, cuda);
    try {
      return { slots: off.stats().slots, total: off.stats().totalExperts, slotBytes: off.store.slotBytes };
    } finally {
      off.dispose();
      loaded.model.dispose();
    }
  };
  const H = 64, I = 32;
  const bf16Slot = slotBytesOf('bf16', 0, H, I);
  const budget = 10 * bf16Slot;  // mixtral fixture: 4 MoE layers x 8 experts
  const bf16 = slots(null, budget), int8 = slots(quantizeSpec('int8', 0), budget), int4 = slots(quantizeSpec('int4', 32), budget);
  assert.deepEqual([bf16.slots, bf16.slotBytes], [10, bf16Slot]);
  assert.equal(int8.slotBytes, slotBytesOf('int8', 0, H, I));
  assert.equal(int8.slots, Math.floor(budget / int8.slotBytes));
  assert.ok(int8.slots > bf16.slots && int8.slots < int8.total, `int8: ${int8.slots} slots`);
  assert.equal(int4.slots, int4.total, 'int4 g32: every expert fits in the budget of 10 bf16 ones');
});
