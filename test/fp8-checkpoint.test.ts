// An FP8 checkpoint (DeepSeek-V3 style: e4m3 weights with weight_scale_inv block scales) served
// natively: its routed experts stay FP8 in memory, and the model's logits equal those of the same
// checkpoint with the experts written out as the exact dequantised f32 values (the plain f32 path,
// itself checked against HF transformers on the fixture), within f32 rounding. Ragged edge blocks.
// Through the expert cache (slots hold FP8 codes and block scales; with --quantize, the dequantised
// experts re-quantized) and over expert ranks, the FP8 model equals itself all-resident, bit for bit.
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';

import { startExpertRanks } from '../src/dist/expert-ranks.js';
import { bf16ToF32 as bf16Value } from '../src/model/kv-dtype.js';
import { loadModel } from '../src/model/load.js';
import type { MoeModel } from '../src/model/model.js';
import { attachOffloader, skipAllExperts } from '../src/offload/setup.js';
import { writeSafetensors, type TensorToWrite } from '../src/model/safetensors.js';
import { storedTensors } from './helpers/checkpoint-copy.js';
import { packageRoot } from '../src/native/index.js';
import { e4m3, toE4m3 } from './helpers/fp8-checkpoint.js';
import { fixtureSequences, forcedLogits as forcedSeqLogits } from './helpers/quant-fidelity.js';

const src = path.join(packageRoot(), 'test', 'fixtures', 'deepseek_v3');
// Blocks of 24 x 24 over [32, 64] and [64, 32] experts: partial blocks on both edges.
const BR = 24, BC = 24;

const bf16ToF32 = (u: Uint16Array) => Float32Array.from(u, bf16Value);

/** Writes two checkpoints: experts in FP8 (+ scales), and experts as their dequantised f32. */
function makeCheckpoints(): { fp8Dir: string; refDir: string; root: string } {
  const root = mkdtempSync(path.join(os.tmpdir(), 'expertd-fp8-'));
  const fp8Dir = path.join(root, 'fp8'), refDir = path.join(root, 'ref');
  const fp8: TensorToWrite[] = [], ref: TensorToWrite[] = [];
  for (const t of storedTensors(src)) {
    const data = t.data;
    if (!/\.experts\.\d+\.(gate|up|down)_proj\.weight$/.test(t.name) || t.dtype !== 'BF16') {
      fp8.push({ name: t.name, dtype: t.dtype, shape: t.shape, data });
      ref.push({ name: t.name, dtype: t.dtype, shape: t.shape, data });
      continue;
    }
    const [rows, cols] = t.shape as [number, number];
    const w = bf16ToF32(new Uint16Array(data.buffer, 0, rows * cols));
    const nbr = Math.ceil(rows / BR), nbc = Math.ceil(cols / BC);
    const scale = new Float32Array(nbr * nbc);
    for (let r = 0; r < rows; r++)
      for (let c = 0; c < cols; c++) {
        const i = Math.floor(r / BR) * nbc + Math.floor(c / BC);
        scale[i] = Math.max(scale[i]!, Math.abs(w[r * cols + c]!));
      }
    for (let i = 0; i < scale.length; i++) scale[i] = Math.fround(scale[i]! / 448);
    const codes = new Uint8Array(rows * cols), deq = new Float32Array(rows * cols);
    for (let r = 0; r < rows; r++)
      for (let c = 0; c < cols; c++) {
        const s = scale[Math.floor(r / BR) * nbc + Math.floor(c / BC)]!;
        const code = toE4m3(w[r * cols + c]! / s);
        codes[r * cols + c] = code;
        deq[r * cols + c] = Math.fround(e4m3(code) * s);  // what the checkpoint means, in f32
      }
    fp8.push({ name: t.name, dtype: 'F8_E4M3', shape: t.shape, data: codes });
    fp8.push({ name: `${t.name}_scale_inv`, dtype: 'F32', shape: [nbr, nbc], data: scale });
    ref.push({ name: t.name, dtype: 'F32', shape: t.shape, data: deq });
  }
  const config = JSON.parse(readFileSync(path.join(src, 'config.json'), 'utf8')) as Record<string, unknown>;
  for (const [dir, tensors, quant] of [[fp8Dir, fp8, true], [refDir, ref, false]] as const) {
    mkdirSync(dir);
    writeSafetensors(path.join(dir, 'model.safetensors'), tensors);
    const c = quant ? { ...config, quantization_config: { quant_method: 'fp8', fmt: 'e4m3', activation_scheme: 'dynamic', weight_block_size: [BR, BC] } } : config;
    writeFileSync(path.join(dir, 'config.json'), JSON.stringify(c));
    for (const f of ['generation_config.json', 'tokenizer.json', 'tokenizer_config.json', 'golden.json'])
      copyFileSync(path.join(src, f), path.join(dir, f));
  }
  return { fp8Dir, refDir, root };
}

/** Every golden case's prompt + greedy tokens through the model, teacher-forced: logits per position. */
const forcedLogits = (model: MoeModel, dir: string) => forcedSeqLogits(model, fixtureSequences(dir));

function teacherForced(dir: string): { logits: Float32Array[]; expertsQuant: (string | null)[] } {
  const { model } = loadModel(dir, { fast: false });
  try {
    const logits = forcedLogits(model, dir);
    const e = model.moeLayers[0]!.weights.experts.get(0)!;
    const quant = [e.gateUp.quant, e.down.quant];
    e.gateUp.dispose();
    e.down.dispose();
    return { logits, expertsQuant: quant };
  } finally {
    model.dispose();
  }
}

test('an FP8 checkpoint keeps its experts in FP8 and equals the dequantised f32 experts', () => {
  const { fp8Dir, refDir, root } = makeCheckpoints();
  try {
    const got = teacherForced(fp8Dir);
    const want = teacherForced(refDir);
    assert.deepEqual(got.expertsQuant, ['fp8', 'fp8'], 'experts held as fp8 codes');
    assert.deepEqual(want.expertsQuant, [null, null]);
    let worst = 0;
    for (let i = 0; i < want.logits.length; i++)
      for (let v = 0; v < want.logits[i]!.length; v++)
        worst = Math.max(worst, Math.abs(got.logits[i]![v]! - want.logits[i]![v]!));
    assert.ok(worst <= 1e-5, `logits max-abs difference ${worst}`);
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
});

for (const copyThread of [true, false]) {
  test(`an FP8 checkpoint through the expert cache (a quarter of the experts, ${copyThread ? 'copy thread' : 'engine thread'}) equals it all-resident`, async () => {
    const { fp8Dir, root } = makeCheckpoints();
    try {
      const want = teacherForced(fp8Dir).logits;
      const loaded = loadModel(fp8Dir, { fast: false, loadExpert: skipAllExperts });
      const off = attachOffloader(loaded, { policy: 'lru', fraction: 0.25, copyThread });
      try {
        // Slots hold FP8 codes (1 byte per weight) and block scales, not a bf16 copy.
        const bf16Bytes = 3 * loaded.spec.hidden * loaded.spec.moe.intermediate * 2;
        assert.ok(off.store.slotBytes < bf16Bytes * 0.75, `slot ${off.store.slotBytes} bytes vs bf16 ${bf16Bytes}`);
        assert.ok(off.stats().slots < off.stats().totalExperts / 2, `${off.stats().slots} slots`);
        forcedLogits(loaded.model, fp8Dir).forEach((l, i) => assert.deepEqual(l, want[i], `position ${i}`));
        const e = loaded.model.moeLayers[0]!.weights.experts;
        for (let x = 0; x < loaded.spec.moe.numExperts; x++) {
          const w = e.get(x);
          if (!w) continue;
          assert.deepEqual([w.gateUp.quant, w.down.quant], ['fp8', 'fp8'], `cached expert ${x} held as fp8`);
          w.gateUp.dispose();
          w.down.dispose();
        }
      } finally {
        await off.close();
        off.dispose();
        loaded.model.dispose();
      }
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });
}

test('an FP8 checkpoint over 2 expert ranks equals it on one, bit for bit', async () => {
  const { fp8Dir, root } = makeCheckpoints();
  try {
    const want = teacherForced(fp8Dir).logits;
    const ranks = startExpertRanks(fp8Dir, 2, false, 60_000);
    try {
      await ranks.ready;
      const loaded = loadModel(fp8Dir, { fast: false, comm: ranks.comm, loadExpert: (_l, e) => ranks.comm.ownsExpert(e) });
      try {
        forcedLogits(loaded.model, fp8Dir).forEach((l, i) => assert.deepEqual(l, want[i], `position ${i}`));
      } finally {
        loaded.model.dispose();
      }
    } finally {
      await ranks.stop();
    }
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
});

for (const q of [{ format: 'int8', group: 0 }, { format: 'int4', group: 32 }] as const) {
  test(`--quantize ${q.format} with an FP8 checkpoint through the expert cache (a quarter of the experts) equals it all-resident, bit for bit`, () => {
    const { fp8Dir, root } = makeCheckpoints();
    try {
      // Resident: the experts dequantised to bf16 at load, then quantized.
      const resident = loadModel(fp8Dir, { fast: false, quantize: q }).model;
      let want: Float32Array[];
      try {
        want = forcedLogits(resident, fp8Dir);
        const e = resident.moeLayers[0]!.weights.experts.get(0)!;
        assert.deepEqual([e.gateUp.quant, e.down.quant], [q.format, q.format], 'resident experts re-quantized');
      } finally {
        resident.dispose();
      }
      const loaded = loadModel(fp8Dir, { fast: false, quantize: q, loadExpert: skipAllExperts });
      // copyThread asked for: the store loads on the engine thread (the copy thread keeps FP8 as stored).
      const off = attachOffloader(loaded, { policy: 'lru', fraction: 0.25, quantize: q, copyThread: true });
      try {
        assert.equal(off.store.overlapsCompute, false, 'FP8 re-quantized loads run on the engine thread');
        assert.equal(off.store.slotFormat, q.format);
        const bf16Bytes = 3 * loaded.spec.hidden * loaded.spec.moe.intermediate * 2;
        assert.ok(off.store.slotBytes < bf16Bytes * (q.format === 'int4' ? 0.4 : 0.75), `slot ${off.store.slotBytes} bytes vs bf16 ${bf16Bytes}`);
        forcedLogits(loaded.model, fp8Dir).forEach((l, i) => assert.deepEqual(l, want[i], `position ${i}`));
        const st = off.stats();
        assert.ok(st.misses > 0 && off.cache.evictions > 0, JSON.stringify(st));
        let seen = 0;
        for (const layer of loaded.model.moeLayers) {
          for (let x = 0; x < loaded.spec.moe.numExperts; x++) {
            const w = layer.weights.experts.get(x);
            if (!w) continue;
            seen++;
            assert.deepEqual([w.gateUp.quant, w.down.quant], [q.format, q.format], `cached expert ${x} held as ${q.format}`);
            w.gateUp.dispose();
            w.down.dispose();
          }
        }
        assert.ok(seen > 0, 'some expert is cached');
      } finally {
        off.dispose();
        loaded.model.dispose();
      }
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });
}
