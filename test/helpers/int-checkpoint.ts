// Checks shared by the int-code checkpoint tests (compressed-tensors, GPTQ, AWQ; each a qwen2_moe fixture
// in test/fixtures-quant with HF goldens on its dequantised weights).
import assert from 'node:assert/strict';
import path from 'node:path';
import type { TestContext } from 'node:test';

import { startExpertRanks } from '../../src/dist/expert-ranks.js';
import { loadModel } from '../../src/model/load.js';
import type { MoeModel } from '../../src/model/model.js';
import type { ModelSpec } from '../../src/model/spec.js';
import { loadNative, packageRoot } from '../../src/native/index.js';
import type { TensorToWrite } from '../../src/model/safetensors.js';
import { storedTensors, writeCheckpointCopy } from './checkpoint-copy.js';
import { attachOffloader, skipAllExperts } from '../../src/offload/setup.js';
import { argmax, checkGolden, DirectRunner, goldenForcedLogits, heldFormats, maxAbsDiff, type Golden } from './model-runner.js';

/**
 * The loaded checkpoint against the bf16 qwen2_moe fixture and its goldens: its experts hold at most
 * `expertRatio` of bf16's bytes and its dense weights `denseSaved` bytes fewer (attention held as codes);
 * routing and greedy tokens equal HF's and the logits are within 1e-4 (f32 rounding: golden.json's
 * f64_logits_max_abs_diff is ~2e-5).
 */
export function checkIntCheckpoint(t: TestContext, model: MoeModel, golden: Golden, expertRatio: number, denseSaved: number): void {
  const bf16 = loadModel(path.join(packageRoot(), 'test', 'fixtures', 'qwen2_moe'), { fast: false });
  try {
    const ours = model.residentWeightBytes, theirs = bf16.model.residentWeightBytes;
    t.diagnostic(`resident bytes: experts ${ours.experts} vs bf16 ${theirs.experts}, dense ${ours.dense} vs ${theirs.dense}`);
    assert.ok(ours.experts <= expertRatio * theirs.experts, `experts ${ours.experts} B vs bf16 ${theirs.experts} B`);
    // Dense bytes include the bf16 lm_head and the routers, which stay.
    assert.ok(ours.dense < theirs.dense - denseSaved, `dense ${ours.dense} B vs bf16 ${theirs.dense} B`);
  } finally {
    bf16.model.dispose();
  }
  const worst = checkGolden(model, golden);
  t.diagnostic(`logits max-abs difference from transformers: ${worst}`);
  assert.ok(worst <= 1e-4, `logits max-abs difference ${worst}`);
}

/** `golden`'s cases (prompt + greedy tokens) teacher-forced through the checkpoint at `dir`: logits per position. */
export function forcedLogitsOf(dir: string, golden: Golden, fast = false): Float32Array[] {
  const { model } = loadModel(dir, { fast });
  try {
    return goldenForcedLogits(model, golden);
  } finally {
    model.dispose();
  }
}

/**
 * The checkpoint at `dir` in the reference mode gives `want`'s teacher-forced logits bit for bit (`label`
 * prefixes the position in a failure); returns its spec and held formats for the caller's own checks.
 */
export function checkSameModel(dir: string, golden: Golden, want: Float32Array[], label = ''): { spec: ModelSpec; held: string[] } {
  const { model, spec } = loadModel(dir, { fast: false });
  try {
    goldenForcedLogits(model, golden).forEach((l, i) => assert.deepEqual(l, want[i], `${label}position ${i}`));
    return { spec, held: heldFormats(model) };
  } finally {
    model.dispose();
  }
}

/**
 * The checkpoint at `dir` equals `ref` (its quantized weights decoded by the test and written as f32) in the
 * reference mode, teacher-forced logits within `tol`; fast mode's top-1 agrees with the goldens at `floor`.
 */
export function checkAgainstDecoded(t: TestContext, dir: string, ref: string, golden: Golden, tol: number, floor: number): void {
  const a = loadModel(dir, { fast: false }).model, b = loadModel(ref, { fast: false }).model;
  try {
    assert.deepEqual(heldFormats(b), ['expert null/null', 'shared null/null']);
    const worst = maxAbsDiff(goldenForcedLogits(a, golden), goldenForcedLogits(b, golden));
    t.diagnostic(`against the f32 values: ${worst}`);
    assert.ok(worst <= tol, `logits max-abs difference ${worst}`);
  } finally {
    a.dispose();
    b.dispose();
  }
  checkFastTop1(t, dir, golden, floor);
}

/** Fast mode's teacher-forced top-1 agreement with the goldens over each case's prompt, at least `floor`. */
export function checkFastTop1(t: TestContext, dir: string, golden: Golden, floor: number): void {
  const { model } = loadModel(dir, { fast: true });
  try {
    const V = model.spec.vocabSize;
    let agree = 0, n = 0;
    for (const c of golden.cases) {
      const runner = new DirectRunner(model);
      const res = runner.step([runner.newSeq()], [c.prompt_ids], true);
      for (let p = 0; p < c.prompt_ids.length; p++, n++)
        if (argmax(res.logits.subarray(p * V, (p + 1) * V)) === argmax(Float32Array.from(c.logits[p]!))) agree++;
    }
    t.diagnostic(`fast: top-1 ${agree}/${n}`);
    assert.ok(agree / n >= floor, `fast: top-1 ${agree}/${n}`);
  } finally {
    model.dispose();
  }
}

/**
 * The checkpoint's experts through the expert cache (a quarter of them, fewer slots than half the experts;
 * each slot under `slotRatio` of a bf16 expert's bytes, held as `heldExpert`) and, unless `ranks` is false,
 * over 2 expert ranks: the teacher-forced logits equal the all-resident model's bit for bit.
 */
export async function checkCachedAndRanked(dir: string, golden: Golden, heldExpert: string,
                                           { ranks = true, slotRatio = 0.4 } = {}): Promise<void> {
  const want = forcedLogitsOf(dir, golden);
  const loaded = loadModel(dir, { fast: false, loadExpert: skipAllExperts });
  const off = attachOffloader(loaded, { policy: 'lru', fraction: 0.25 });
  try {
    const bf16Bytes = 3 * loaded.spec.hidden * loaded.spec.moe.intermediate * 2;
    assert.ok(off.store.slotBytes < bf16Bytes * slotRatio, `slot ${off.store.slotBytes} bytes vs bf16 ${bf16Bytes}`);
    assert.ok(off.stats().slots < off.stats().totalExperts / 2, `${off.stats().slots} slots`);
    goldenForcedLogits(loaded.model, golden).forEach((l, i) => assert.deepEqual(l, want[i], `cached, position ${i}`));
    assert.ok((off.store as unknown as { loads: number }).loads > 0, 'the cache loaded experts');
    assert.ok(heldFormats(loaded.model).every((h) => !h.startsWith('expert') || h === heldExpert), 'cached experts held as codes');
  } finally {
    await off.close();
    off.dispose();
    loaded.model.dispose();
  }
  if (!ranks) return;
  const group = startExpertRanks(dir, 2, false, 60_000);
  try {
    await group.ready;
    const ep = loadModel(dir, { fast: false, comm: group.comm, loadExpert: (_l, e) => group.comm.ownsExpert(e) });
    try {
      goldenForcedLogits(ep.model, golden).forEach((l, i) => assert.deepEqual(l, want[i], `2 ranks, position ${i}`));
    } finally {
      ep.model.dispose();
    }
  } finally {
    await group.stop();
  }
}

/**
 * An act-order GPTQ checkpoint (desc_act true, no static_groups) made here from a bf16 fixture (qwen2_moe's
 * by default): every Linear `quantized` names (its capture: the module; by default every decoder Linear)
 * int4 in groups of 32 (so that hidden-64 inputs have two), each group the inputs a random order puts in it
 * (g_idx), symmetric RTN with f16 scales, v1 zeros. Linears that read one input (q/k/v; gate/up) share an
 * order, as GPTQ's shared inputs make theirs. `format` 'compressed-tensors': the same codes, scales and
 * orders as pack-quantized weights with actorder "group" (X.weight_g_idx).
 */
export function actOrderCopy(out: string, { fixture = 'qwen2_moe', quantized = /^(.*\.(?:self_attn|mlp)\..*_proj)\.weight$/,
  format = 'gptq' }: { fixture?: string; quantized?: RegExp; format?: 'gptq' | 'compressed-tensors' } = {}): void {
  const src = path.join(packageRoot(), 'test', 'fixtures', fixture), G = 32;
  let seed = 99;
  const rnd = () => ((seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32);
  const orders = new Map<string, Int32Array>();
  const tensors: TensorToWrite[] = [];
  for (const t of storedTensors(src)) {
    const m = quantized.exec(t.name);
    if (!m) {
      tensors.push(t);
      continue;
    }
    const base = m[1]!, [rows, cols] = t.shape as [number, number];
    const key = base.replace(/[qkv]_proj$/, 'qkv').replace(/(gate|up)_proj$/, 'gu');
    let order = orders.get(key);
    if (!order) {
      order = Int32Array.from({ length: cols }, (_, k) => k);
      for (let i = cols - 1; i > 0; i--) {
        const j = Math.floor(rnd() * (i + 1));
        [order[i], order[j]] = [order[j]!, order[i]!];
      }
      orders.set(key, order);
    }
    const gIdx = new Int32Array(cols);
    order.forEach((k, j) => { gIdx[k] = Math.floor(j / G); });
    const w = new Float32Array(rows * cols);
    loadNative().convert(new Uint16Array(t.data.buffer, t.data.byteOffset, rows * cols), 'bf16', w, 'f32');
    const groups = Math.ceil(cols / G), s = new Float32Array(groups * rows);
    for (let r = 0; r < rows; r++)
      for (let k = 0; k < cols; k++) s[gIdx[k]! * rows + r] = Math.max(s[gIdx[k]! * rows + r]!, Math.abs(w[r * cols + k]!) * 2 / 15);
    const s16 = new Uint16Array(s.length);
    loadNative().convert(s.map((v) => v || 1), 'f32', s16, 'f16');
    loadNative().convert(s16, 'f16', s, 'f32');
    // The stored 4-bit values (code + 8), packed along the input: GPTQ's qweight [in / 8, out], compressed-
    // tensors' weight_packed [out, in / 8] (the lowest bits first in both).
    const qweight = new Int32Array((cols / 8) * rows), packed = new Int32Array(rows * cols / 8);
    for (let r = 0; r < rows; r++)
      for (let k = 0; k < cols; k++) {
        const q = Math.max(-8, Math.min(7, Math.round(w[r * cols + k]! / s[gIdx[k]! * rows + r]!))) + 8;
        qweight[(k >> 3) * rows + r]! |= q << (4 * (k & 7));
        packed[r * cols / 8 + (k >> 3)]! |= q << (4 * (k & 7));
      }
    const g: TensorToWrite = { name: `${base}.${format === 'gptq' ? 'g_idx' : 'weight_g_idx'}`, dtype: 'I32', shape: [cols], data: new Uint8Array(gIdx.buffer) };
    if (format === 'gptq') {
      tensors.push({ name: `${base}.qweight`, dtype: 'I32', shape: [cols / 8, rows], data: new Uint8Array(qweight.buffer) },
        { name: `${base}.qzeros`, dtype: 'I32', shape: [groups, rows / 8], data: new Uint8Array(new Int32Array(groups * rows / 8).fill(0x77777777).buffer) },
        { name: `${base}.scales`, dtype: 'F16', shape: [groups, rows], data: new Uint8Array(s16.buffer) }, g);
      continue;
    }
    const scale = new Uint16Array(rows * groups);
    for (let r = 0; r < rows; r++) for (let j = 0; j < groups; j++) scale[r * groups + j] = s16[j * rows + r]!;
    tensors.push({ name: `${base}.weight_packed`, dtype: 'I32', shape: [rows, cols / 8], data: new Uint8Array(packed.buffer) },
      { name: `${base}.weight_scale`, dtype: 'F16', shape: [rows, groups], data: new Uint8Array(scale.buffer) },
      { name: `${base}.weight_shape`, dtype: 'I32', shape: [2], data: new Uint8Array(Int32Array.of(rows, cols).buffer) }, g);
  }
  writeCheckpointCopy(src, out, tensors, format === 'gptq'
    ? { quant_method: 'gptq', bits: 4, group_size: G, sym: true, desc_act: true, checkpoint_format: 'gptq' }
    : {
      quant_method: 'compressed-tensors', format: 'pack-quantized', quantization_status: 'compressed',
      ignore: ['lm_head', 're:.*mlp.gate$', 're:.*shared_expert_gate$'],
      config_groups: { group_0: { targets: ['Linear'], weights: { num_bits: 4, type: 'int', symmetric: true, strategy: 'group', group_size: G, actorder: 'group' } } },
    });
}
