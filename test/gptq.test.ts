// GPTQ checkpoints (AutoGPTQ / GPTQModel, quant_method "gptq"; test/fixtures-quant/qwen2_moe_gptq made by
// test/fixtures/make_quant_fixtures.py: symmetric int4 in groups of 64, fp16 scales, v1 zero points, g_idx)
// served natively: every quantized Linear stays int4 (held in groups of 32 with each GPTQ scale repeated),
// the logits match HF transformers run on the dequantised weights, and equal the checkpoint decoded here
// independently of the loader and served as f32; through the expert cache and over expert ranks they equal
// the all-resident model bit for bit; on the device engine's emulator the experts hold the stored codes.
// Zero points (sym false) are read (test/awq.test.ts serves such a checkpoint). Act-order (desc_act with a
// permuted g_idx) is read on both engines, the columns held in group order and x gathered, and so is
// compressed-tensors' actorder "group" (weight_g_idx); other bit widths and packings are refused by name.
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';

import { ConfigError, parseModelConfig } from '../src/model/config.js';
import { gptqIntWeight, parseGptq, type GptqConfig } from '../src/model/gptq.js';
import { f32ToBf16 } from '../src/model/kv-dtype.js';
import { describeCheckpointQuant, loadCudaModel, loadModel } from '../src/model/load.js';
import type { MoeModel } from '../src/model/model.js';
import { quantizeSpec } from '../src/model/quantize.js';
import { writeSafetensors, type TensorToWrite } from '../src/model/safetensors.js';
import { loadNative, packageRoot, type PackedWeight } from '../src/native/index.js';
import { argmax, goldenForcedLogits, heldFormats as held, maxAbsDiff, runAll, type Golden } from './helpers/model-runner.js';
import { assertDeviceCacheMatches, assertMatchesIntDequant, INT_DEVICE_BACKENDS } from './helpers/device-dequant.js';
import { createCudaEmulator } from './helpers/cuda-emu.js';
import { emulatorSkip } from './helpers/cuda-skip.js';
import { actOrderCopy, checkAgainstDecoded, checkCachedAndRanked, checkIntCheckpoint, checkSameModel, forcedLogitsOf } from './helpers/int-checkpoint.js';
import { i32, storedTensors, writeCheckpointCopy } from './helpers/checkpoint-copy.js';

const DIR = path.join(packageRoot(), 'test', 'fixtures-quant', 'qwen2_moe_gptq');

const golden = JSON.parse(readFileSync(path.join(DIR, 'golden.json'), 'utf8')) as Golden;

const forcedLogits = (model: MoeModel) => goldenForcedLogits(model, golden);

/**
 * AutoGPTQ's dequantisation written out here (not gptq.ts): w[n, k] = (q - (qzero + 1)) * scale[g_idx[k], n]
 * for a 4-bit v1 checkpoint, as f32 [out, in].
 */
function decodeGptq(qweight: TensorToWrite, qzeros: TensorToWrite, scales: TensorToWrite, gIdx: TensorToWrite): Float32Array {
  const [kw, N] = qweight.shape as [number, number];
  const K = kw * 8, q = i32(qweight), z = i32(qzeros), g = i32(gIdx);
  const s = new Float32Array(scales.shape[0]! * N);
  loadNative().convert(new Uint16Array(scales.data.buffer, scales.data.byteOffset, s.length), 'f16', s, 'f32');
  const out = new Float32Array(N * K);
  for (let k = 0; k < K; k++)
    for (let n = 0; n < N; n++) {
      const qv = (q[(k >> 3) * N + n]! >>> (4 * (k & 7))) & 15;
      const zv = ((z[g[k]! * (N / 8) + (n >> 3)]! >>> (4 * (n & 7))) & 15) + 1;
      out[n * K + k] = Math.fround((qv - zv) * s[g[k]! * N + n]!);
    }
  return out;
}

/**
 * A copy of the fixture with the GPTQ Linears whose name matches `decode` written as `X.weight` (decoded by
 * decodeGptq; f32, or rounded to bf16); `keepConfig` false drops quantization_config (then `decode` must
 * match them all).
 */
function decodedCopy(out: string, decode: RegExp, keepConfig: boolean, dtype: 'F32' | 'BF16' = 'F32', src = DIR): void {
  const tensors = storedTensors(src);
  const byName = new Map(tensors.map((t) => [t.name, t]));
  const kept: TensorToWrite[] = [];
  for (const t of tensors) {
    const m = /^(.*)\.(qweight|qzeros|scales|g_idx)$/.exec(t.name);
    if (!m || !decode.test(m[1]!)) {
      kept.push(t);
      continue;
    }
    if (m[2] !== 'qweight') continue;
    const get = (p: string) => byName.get(`${m[1]}.${p}`)!;
    const w = decodeGptq(t, get('qzeros'), get('scales'), get('g_idx'));
    const data = dtype === 'F32' ? new Uint8Array(w.buffer) : new Uint8Array(Uint16Array.from(w, f32ToBf16).buffer);
    kept.push({ name: `${m[1]}.weight`, dtype, shape: [t.shape[1]!, t.shape[0]! * 8], data });
  }
  writeCheckpointCopy(src, out, kept, keepConfig);
}

test('GPTQ int4: weights kept as codes, logits, routing and greedy tokens match transformers on the dequantised weights', (t) => {
  const { model, spec } = loadModel(DIR, { fast: false });
  try {
    assert.deepEqual(spec.quantization, { method: 'gptq', packing: 'gptq', bits: 4, groupSize: 64, checkpointFormat: 'gptq', schemes: { bits: [4], groupSizes: [64] } });
    assert.equal(describeCheckpointQuant(spec), ' GPTQ int4 g64 (gptq)');
    assert.deepEqual(held(model), ['expert int4/int4', 'shared int4/int4']);
    checkIntCheckpoint(t, model, golden, 0.35, 30_000);
  } finally {
    model.dispose();
  }
});

test('GPTQ int4 equals its weights decoded independently and served as f32 (reference mode); fast mode agrees on top-1', (t) => {
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'expertd-gptq-'));
  try {
    const ref = path.join(tmp, 'ref');
    decodedCopy(ref, /./, false);
    // Fast mode (int8 activations against the int4 codes): the compressed-tensors W4A16 floor.
    checkAgainstDecoded(t, DIR, ref, golden, 1e-5, 0.55);
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
});

test('GPTQ int4 experts through the expert cache (a quarter) and over 2 expert ranks equal them all-resident, bit for bit', async () => {
  await checkCachedAndRanked(DIR, golden, 'expert int4/int4');
});

// The compressed-tensors W8A8 fixture's codes and scales written in GPTQ's int8 layout (4 values + 128 per
// int32 along in, v1 zeros 127, f16 scales [1, out]: its bf16 scales are exact in f16): the same model.
test('GPTQ int8 per channel: the W8A8 fixture\'s codes in the GPTQ layout give the same logits, bit for bit', () => {
  const W8 = path.join(packageRoot(), 'test', 'fixtures-quant', 'qwen2_moe_w8a8');
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'expertd-gptq8-'));
  try {
    const tensors = storedTensors(W8);
    const byName = new Map(tensors.map((t) => [t.name, t]));
    const out: TensorToWrite[] = [];
    let converted = 0;
    for (const t of tensors) {
      if (t.name.endsWith('.weight_scale')) continue;
      const scale = byName.get(`${t.name}_scale`);
      if (t.dtype !== 'I8' || !scale) {
        out.push(t);
        continue;
      }
      const [rows, cols] = t.shape as [number, number];
      const codes = new Int8Array(t.data.buffer, t.data.byteOffset, rows * cols);
      const qweight = new Int32Array((cols / 4) * rows);
      for (let k = 0; k < cols; k++)
        for (let n = 0; n < rows; n++) qweight[(k >> 2) * rows + n]! |= ((codes[n * cols + k]! + 128) & 255) << (8 * (k & 3));
      const qzeros = new Int32Array(Math.ceil(rows / 4));
      for (let n = 0; n < rows; n++) qzeros[n >> 2]! |= 127 << (8 * (n & 3));
      const s32 = new Float32Array(rows);
      loadNative().convert(new Uint16Array(scale.data.buffer, scale.data.byteOffset, rows), 'bf16', s32, 'f32');
      const s16 = new Uint16Array(rows);
      loadNative().convert(s32, 'f32', s16, 'f16');
      const back = new Float32Array(rows);
      loadNative().convert(s16, 'f16', back, 'f32');
      assert.deepEqual(back, s32, `${t.name}: its scales are exact in f16`);
      const base = t.name.replace(/\.weight$/, '');
      out.push({ name: `${base}.qweight`, dtype: 'I32', shape: [cols / 4, rows], data: new Uint8Array(qweight.buffer) },
        { name: `${base}.qzeros`, dtype: 'I32', shape: [1, qzeros.length], data: new Uint8Array(qzeros.buffer) },
        { name: `${base}.scales`, dtype: 'F16', shape: [1, rows], data: new Uint8Array(s16.buffer) });
      converted++;
    }
    assert.equal(converted, 100);
    const dir = path.join(tmp, 'gptq8');
    writeCheckpointCopy(W8, dir, out, { quant_method: 'gptq', bits: 8, group_size: -1, sym: true, desc_act: false });
    assert.deepEqual(checkSameModel(dir, golden, forcedLogitsOf(W8, golden)).held, ['expert int8/int8', 'shared int8/int8']);
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
});

// GPTQModel's lm_head: true quantizes the LM head too: it is read as int4 codes like any other Linear (the
// CPU engine's int LM head) and equals its values served as f32.
test('a GPTQ-quantized lm_head (lm_head: true) is held as int4 and equals its values in f32', () => {
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'expertd-gptq-head-'));
  try {
    const tensors = storedTensors(DIR);
    const head = tensors.find((x) => x.name === 'lm_head.weight')!;
    const [rows, cols] = head.shape as [number, number];
    const w = new Float32Array(rows * cols);
    loadNative().convert(new Uint16Array(head.data.buffer, head.data.byteOffset, rows * cols), head.dtype === 'F16' ? 'f16' : 'bf16', w, 'f32');
    // Symmetric int4 per channel (group_size -1 in this test's config: one scale per row, f16), RTN.
    const s16 = new Uint16Array(rows), s = new Float32Array(rows);
    for (let r = 0; r < rows; r++) {
      let amax = 0;
      for (let c = 0; c < cols; c++) amax = Math.max(amax, Math.abs(w[r * cols + c]!));
      s[r] = (amax * 2) / 15 || 1;
    }
    loadNative().convert(s, 'f32', s16, 'f16');
    loadNative().convert(s16, 'f16', s, 'f32');
    const qweight = new Int32Array((cols / 8) * rows), deq = new Float32Array(rows * cols);
    for (let r = 0; r < rows; r++)
      for (let c = 0; c < cols; c++) {
        const code = Math.max(-8, Math.min(7, Math.round(w[r * cols + c]! / s[r]!)));
        qweight[(c >> 3) * rows + r]! |= (code + 8) << (4 * (c & 7));
        deq[r * cols + c] = Math.fround(code * s[r]!);
      }
    // Per channel: the other Linears keep their groups of 64 in the fixture, so the config says 64 and the
    // head is written with one group per 64 columns, each the row's scale.
    const groups = Math.ceil(cols / 64);
    const scales = new Uint16Array(groups * rows);
    for (let g = 0; g < groups; g++) scales.set(s16, g * rows);
    const qzeros = new Int32Array(groups * (rows / 8)).fill(0x77777777);
    const quantized: TensorToWrite[] = [...tensors.filter((x) => x !== head),
      { name: 'lm_head.qweight', dtype: 'I32', shape: [cols / 8, rows], data: new Uint8Array(qweight.buffer) },
      { name: 'lm_head.qzeros', dtype: 'I32', shape: [groups, rows / 8], data: new Uint8Array(qzeros.buffer) },
      { name: 'lm_head.scales', dtype: 'F16', shape: [groups, rows], data: new Uint8Array(scales.buffer) }];
    const values: TensorToWrite[] = [...tensors.filter((x) => x !== head),
      { name: 'lm_head.weight', dtype: 'F32', shape: [rows, cols], data: new Uint8Array(deq.buffer) }];
    const a = path.join(tmp, 'head-int4'), b = path.join(tmp, 'head-f32');
    const qc = (JSON.parse(readFileSync(path.join(DIR, 'config.json'), 'utf8')) as Record<string, any>).quantization_config;
    writeCheckpointCopy(DIR, a, quantized, { ...qc, lm_head: true });
    writeCheckpointCopy(DIR, b, values, true);
    const ma = loadModel(a, { fast: false }).model, mb = loadModel(b, { fast: false }).model;
    try {
      assert.equal((ma as unknown as { lmHead: PackedWeight }).lmHead.quant, 'int4', 'the LM head held as int4 codes');
      assert.equal((mb as unknown as { lmHead: PackedWeight }).lmHead.quant, null);
      const worst = maxAbsDiff(forcedLogits(ma), forcedLogits(mb));
      assert.ok(worst <= 1e-5, `logits max-abs difference ${worst}`);
    } finally {
      ma.dispose();
      mb.dispose();
    }
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
});

test('gptqIntWeight: int8 per channel, int4 per channel / g128 / g96, gptq_v2 zeros and act-order read exactly as (q - zero) * scale', () => {
  let seed = 11;
  const rnd = () => ((seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32);
  const fail = (m: string) => new Error(m);
  for (const [bits, gs, fmt, rows, cols] of [[8, -1, 'gptq', 8, 40], [4, -1, 'gptq', 16, 200], [4, 128, 'gptq', 8, 256],
    [4, 96, 'gptq_v2', 8, 200], [4, 32, 'gptq', 24, 72]] as const) {
    const cfg = parseGptq({ quant_method: 'gptq', bits, group_size: gs, sym: true, desc_act: false, checkpoint_format: fmt }, 'x', fail);
    const per = 32 / bits, half = 1 << (bits - 1), g = gs === -1 ? cols : gs, groups = Math.ceil(cols / g);
    const q = Array.from({ length: cols * rows }, () => Math.floor(rnd() * 2 * half)); // [in, out]
    const qweight = new Int32Array((cols / per) * rows);
    for (let k = 0; k < cols; k++)
      for (let n = 0; n < rows; n++) qweight[Math.floor(k / per) * rows + n]! |= q[k * rows + n]! << (bits * (k % per));
    const zw = Math.ceil(rows / per), stored = fmt === 'gptq' ? half - 1 : half;
    const qzeros = new Int32Array(groups * zw);
    for (let i = 0; i < groups; i++)
      for (let n = 0; n < rows; n++) qzeros[i * zw + Math.floor(n / per)]! |= stored << (bits * (n % per));
    const scales = Float32Array.from({ length: groups * rows }, () => Math.fround(0.001 + rnd() / 100));
    const w = gptqIntWeight('m.x.weight', {
      qweight: { dtype: 'I32', shape: [cols / per, rows], data: qweight },
      qzeros: { dtype: 'I32', shape: [groups, zw], data: qzeros },
      scales: { dtype: 'F16', shape: [groups, rows], data: scales },
      gIdx: { dtype: 'I32', shape: [cols], data: Int32Array.from({ length: cols }, (_, k) => Math.floor(k / g)) },
    }, cfg, fail);
    assert.deepEqual([w.bits, w.rows, w.cols, w.group], [bits, rows, cols, bits === 8 ? 0 : gs === 96 || gs === 32 ? 32 : 128], `${bits} ${gs}`);
    const hg = w.group || cols, perRow = Math.ceil(cols / hg);
    for (let n = 0; n < rows; n++)
      for (let k = 0; k < cols; k++) {
        const want = (q[k * rows + n]! - half) * scales[Math.floor(k / g) * rows + n]!;
        assert.equal(w.codes[n * cols + k]! * w.scales[n * perRow + Math.floor(k / hg)]!, want, `bits ${bits} g ${gs} (${n}, ${k})`);
      }
    assert.equal(w.zeros, undefined, 'symmetric zeros: no zero points held');
    const parts = (over: Partial<Parameters<typeof gptqIntWeight>[1]>) => ({
      qweight: { dtype: 'I32', shape: [cols / per, rows], data: qweight },
      qzeros: { dtype: 'I32', shape: [groups, zw], data: qzeros },
      scales: { dtype: 'F16', shape: [groups, rows], data: scales }, gIdx: null, ...over,
    });
    // Zero points other than the symmetric one (sym false): every (q - zero) * scale read exactly, the zeros
    // spread with the scales over the held groups.
    const zero = Array.from({ length: groups * rows }, () => Math.floor(rnd() * 2 * half)); // [group, out] as they are
    const asym = new Int32Array(groups * zw);
    for (let i = 0; i < groups; i++)
      for (let n = 0; n < rows; n++) asym[i * zw + Math.floor(n / per)]! |= ((zero[i * rows + n]! - (fmt === 'gptq' ? 1 : 0)) & ((1 << bits) - 1)) << (bits * (n % per));
    const z = gptqIntWeight('m.x.weight', parts({ qzeros: { dtype: 'I32', shape: [groups, zw], data: asym } }), cfg, fail);
    assert.ok(z.zeros, 'zero points held');
    for (let n = 0; n < rows; n++)
      for (let k = 0; k < cols; k++) {
        const i = Math.floor(k / g);
        // v1 stores zero - 1 in `bits` bits: a zero of 0 reads back as 2^bits, as AutoGPTQ computes it.
        const zv = fmt === 'gptq' && zero[i * rows + n] === 0 ? 1 << bits : zero[i * rows + n]!;
        const want = (q[k * rows + n]! - zv) * scales[i * rows + n]!;
        const at = n * perRow + Math.floor(k / hg);
        assert.equal((z.codes[n * cols + k]! - z.zeros[at]!) * z.scales[at]!, want, `asym bits ${bits} g ${gs} (${n}, ${k})`);
      }
    // Act-order: the groups in reverse input order. Held in group order (perm: stored column j is input
    // perm[j]), every value the same; a g_idx whose groups are not group_size wide is refused.
    const rev = Int32Array.from({ length: cols }, (_, k) => Math.floor((cols - 1 - k) / g));
    if (groups > 1) {
      const a = gptqIntWeight('m.x.weight', parts({ gIdx: { dtype: 'I32', shape: [cols], data: rev } }), cfg, fail);
      assert.ok(a.perm, 'an input order held');
      for (let n = 0; n < rows; n++)
        for (let j = 0; j < cols; j++) {
          const k: number = a.perm[j]!, at = n * perRow + Math.floor(j / hg);
          assert.equal(a.codes[n * cols + j]! * a.scales[at]!, (q[k * rows + n]! - half) * scales[rev[k]! * rows + n]!, `act-order (${n}, ${k})`);
        }
      assert.throws(() => gptqIntWeight('m.x.weight', parts({ gIdx: { dtype: 'I32', shape: [cols], data: new Int32Array(cols) } }), cfg, fail),
        /^Error: m\.x\.g_idx holds groups of other sizes than group_size \d+ \(group 1 would take input \d+, which it puts in group 0\)/);
    }
    // desc_act true: a g_idx in plain order is read; without one, groups are refused (one group per row is not).
    const act = { ...cfg, descAct: true as const };
    if (groups > 1)
      assert.throws(() => gptqIntWeight('m.x.weight', parts({}), act, fail), /^Error: m\.x\.g_idx is missing: a desc_act checkpoint in groups needs it/);
    else assert.deepEqual(gptqIntWeight('m.x.weight', parts({}), act, fail).codes, w.codes);
    assert.throws(() => gptqIntWeight('m.x.weight', parts({ qzeros: { dtype: 'I32', shape: [groups + 1, zw], data: new Int32Array((groups + 1) * zw) } }), cfg, fail),
      /^Error: m\.x\.qzeros has shape \[\d+, \d+\], expected/);
  }
});

test('unsupported GPTQ configs are refused naming the field and value', () => {
  const base = JSON.parse(readFileSync(path.join(DIR, 'config.json'), 'utf8')) as Record<string, any>;
  const cases: [Record<string, unknown>, RegExp][] = [
    [{ bits: 3 }, /\. bits 3: expertd holds 4-bit and 8-bit integer weights\./],
    [{ bits: 2 }, /\. bits 2:/],
    [{ group_size: 48 }, /\. group_size 48: int4 groups are held as groups of 32 or 128 columns, so a GPTQ group must be a multiple of 32\./],
    [{ group_size: 0 }, /\. group_size 0: expected -1/],
    [{ bits: 8, group_size: 128 }, /\. group_size 128 with bits 8: int8 weights are read with one scale per output channel/],
    [{ is_marlin_format: true }, /\. is_marlin_format true: Marlin-packed weights are not read/],
    [{ checkpoint_format: 'marlin' }, /\. checkpoint_format "marlin": expertd reads the "gptq" and "gptq_v2" packings/],
    [{ dynamic: { '-:.*mlp.*': {} } }, /\. dynamic \(per-module bits \/ group_size overrides\) is not read/],
  ];
  for (const [edit, re] of cases) {
    const c = { ...base, quantization_config: { ...base.quantization_config, ...edit } };
    assert.throws(() => parseModelConfig(c as never), (e: Error) => e instanceof ConfigError &&
      e.message.startsWith(`qwen2_moe config quantization_config ${JSON.stringify(c.quantization_config)} is not supported; supported for GPTQ:`) &&
      re.test(e.message), `${JSON.stringify(edit)}: ${re}`);
  }
  // Read: group_size -1 and multiples of 32 (held in 128 where it divides: gptqIntWeight's test), int8 per
  // channel, gptq_v2.
  const spec = (edit: Record<string, unknown>) => parseModelConfig({ ...base, quantization_config: { ...base.quantization_config, ...edit } } as never).quantization as GptqConfig;
  for (const gs of [128, 256, -1, 64, 96]) assert.deepEqual(spec({ group_size: gs }).schemes, { bits: [4], groupSizes: [gs] });
  assert.deepEqual(spec({ bits: 8, group_size: -1, checkpoint_format: 'gptq_v2', sym: false }), { method: 'gptq', packing: 'gptq', bits: 8, groupSize: -1, checkpointFormat: 'gptq_v2', schemes: { bits: [8], groupSizes: [] }, zeroPoints: true });
});

// desc_act true (act-order) with static_groups, or per channel, keeps each g_idx input // group_size: the
// fixture's config says desc_act true and its g_idx are the plain order, so it is the same model; a copy with
// one g_idx permuted is refused naming that tensor.
// desc_act true (act-order): with static_groups (or per channel) each g_idx keeps the plain order and the
// checkpoint is read as it is; otherwise the columns are held in group order and the GEMMs gather x by that
// order (a down projection's folded into its gate/up rows).
test('GPTQ desc_act true: static_groups is the same model; a permuted g_idx is held in group order, equal to its values served as f32', async (t) => {
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'expertd-gptq-act-'));
  try {
    const qc = (JSON.parse(readFileSync(path.join(DIR, 'config.json'), 'utf8')) as Record<string, any>).quantization_config;
    const plain = path.join(tmp, 'static');
    writeCheckpointCopy(DIR, plain, storedTensors(DIR), { ...qc, desc_act: true, static_groups: true });
    const { spec } = checkSameModel(plain, golden, forcedLogitsOf(DIR, golden));
    assert.equal((spec.quantization as GptqConfig).descAct, true);
    // Act-order groups: against the same values decoded by the test (decodeGptq reads g_idx) and served as
    // f32; through the expert cache and over 2 expert ranks bit for bit; fast mode near its own f32 values.
    const act = path.join(tmp, 'act'), ref = path.join(tmp, 'act-f32');
    actOrderCopy(act);
    decodedCopy(ref, /./, false, 'F32', act);
    const a = loadModel(act, { fast: false }).model;
    try {
      assert.deepEqual(held(a), ['expert int4/int4', 'shared int4/int4']);
    } finally {
      a.dispose();
    }
    // f32 rounding: the GEMMs sum each row in group order, the f32 weights in input order. Fast mode (int8
    // activations gathered into group order) against those f32 values: the top-1 the other int4 fixtures keep
    // in fast mode against their own values (60-68 of 74 positions).
    const [want32, ours, fast] = [forcedLogitsOf(ref, golden), forcedLogitsOf(act, golden), forcedLogitsOf(act, golden, true)];
    const worst = maxAbsDiff(ours, want32);
    t.diagnostic(`against the f32 values: ${worst}`);
    assert.ok(worst <= 5e-5, `logits max-abs difference ${worst}`);
    const agree = fast.filter((l, i) => argmax(l) === argmax(want32[i]!)).length;
    t.diagnostic(`fast: top-1 ${agree}/${fast.length} against the f32 values`);
    assert.ok(agree / fast.length >= 0.8, `fast: top-1 ${agree}/${fast.length}`);
    await checkCachedAndRanked(act, golden, 'expert int4/int4');
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
});

// On the emulator, and on a GPU where one is present (bench/gpu-run.sh's intckpt step).
for (const b of INT_DEVICE_BACKENDS) test(`act-order experts and attention on the device (${b.label}): their codes as stored, ` +
  'each row of x gathered into its expert\'s (or projection\'s) input order; logits as the CPU bf16 mode over the values it ' +
  'multiplies; through the device expert cache bit for bit', { skip: b.skip }, (t) => {
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'expertd-gptq-act-dev-'));
  try {
    const act = path.join(tmp, 'act');
    actOrderCopy(act);
    const prompts = golden.cases.map((c) => c.prompt_ids);
    const cuda = b.cuda();
    const { model } = loadCudaModel(act, { device: 0, ...(cuda ? { cuda } : {}) });
    try {
      assert.deepEqual(model.expertQuant, { format: 'int4', group: 32, blockRows: 0 });
      type Weight = { quant?: unknown; inputOrder?: unknown };
      const layers = (model as unknown as { layers: { subs: { attn: Record<'q' | 'k' | 'v' | 'o', Weight> }[];
        moe: { inputOrders: unknown } | null }[] }).layers;
      const moes = layers.flatMap((l) => (l.moe ? [l.moe] : []));
      assert.ok(moes.length > 0 && moes.every((m) => m.inputOrders !== null), 'every MoE layer gathers its rows');
      // The attention projections keep their codes too (cudaDenseGemmQuant), x gathered by each one's order.
      const projections = layers.flatMap((l) => (['q', 'k', 'v', 'o'] as const).map((p) => l.subs[0]!.attn[p]));
      assert.ok(projections.every((w) => w.quant && w.inputOrder), 'every attention projection is int4 and gathers x');
      t.diagnostic(assertMatchesIntDequant(model, act, prompts, 5e-4, 5e-3));
      // The device expert cache (half the experts; emulator): its slots hold the same codes, and the model
      // gathers by the orders its pinned store read.
      if (b.label === 'emulator') t.diagnostic(JSON.stringify(assertDeviceCacheMatches(model, act, 'int4 g32')));
      // The same codes without the gather are another model: the checks above can fail (the experts', then the
      // attention's).
      const orders = moes.map((m) => m.inputOrders);
      for (const m of moes) m.inputOrders = null;
      assert.throws(() => assertMatchesIntDequant(model, act, prompts, 5e-4, 5e-3), /routes every token|logits off the reference/);
      moes.forEach((m, i) => { m.inputOrders = orders[i]; });
      for (const w of projections) delete w.inputOrder;
      assert.throws(() => assertMatchesIntDequant(model, act, prompts, 5e-4, 5e-3), /routes every token|logits off the reference/);
    } finally {
      model.dispose();
    }
    const again = b.cuda();
    const { model: requantized } = loadCudaModel(act, { device: 0, ...(again ? { cuda: again } : {}), quantize: quantizeSpec('int4', 32) });
    try {
      assert.deepEqual(requantized.expertQuant, { format: 'int4', group: 32, blockRows: 0 });
    } finally {
      requantized.dispose();
    }
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
});

// compressed-tensors with actorder "group" (llm-compressor's GPTQ with activation-ordered groups): X.weight_g_idx
// beside X.weight_packed. The same codes, scales and orders as the GPTQ act-order copy, so the same model.
test('compressed-tensors actorder "group" (weight_g_idx) is the GPTQ act-order copy\'s model bit for bit, on the CPU engine, ' +
  'through the expert cache and expert ranks, and on the device emulator', async (t) => {
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'expertd-ct-act-'));
  try {
    const gptq = path.join(tmp, 'gptq'), ct = path.join(tmp, 'ct');
    actOrderCopy(gptq);
    actOrderCopy(ct, { format: 'compressed-tensors' });
    assert.equal(describeCheckpointQuant(parseModelConfig(gptq)), ' GPTQ int4 g32 (gptq, desc_act)');
    assert.equal(describeCheckpointQuant(parseModelConfig(ct)), ' compressed-tensors pack-quantized int4 g32 (actorder group)');
    const { held: h } = checkSameModel(ct, golden, forcedLogitsOf(gptq, golden));
    assert.deepEqual(h, ['expert int4/int4', 'shared int4/int4']);
    // The expert cache's slow tier reads weight_g_idx from the file too.
    await checkCachedAndRanked(ct, golden, 'expert int4/int4');
    if (!emulatorSkip) {
      const dev = (dir: string) => loadCudaModel(dir, { device: 0, cuda: createCudaEmulator() }).model;
      const [a, b] = [dev(gptq), dev(ct)];
      try {
        const [ra, rb] = [runAll(a, null), runAll(b, null)];
        assert.deepEqual(rb.tokens, ra.tokens);
        rb.logits.forEach((l, i) => assert.deepEqual(l, ra.logits[i], `device logits of step ${i}`));
      } finally {
        a.dispose();
        b.dispose();
      }
    } else t.diagnostic('device emulator part skipped (EXPERTD_SKIP_EMULATOR)');
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
});

// DeepSeek-V3's MLPs act-order (its dense layers, shared and routed experts; MLA stays bf16): the dense FFNs and
// shared experts are one-expert tables on the device (inter 96 and 32: int4 g32 fits), gathering x as well.
for (const b of INT_DEVICE_BACKENDS) test(`act-order dense FFNs and shared experts on the device (${b.label}, deepseek_v3): ` +
  'codes as stored, x gathered; logits as the CPU bf16 mode over the values it multiplies', { skip: b.skip }, (t) => {
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'expertd-gptq-act-ds-'));
  try {
    const act = path.join(tmp, 'act');
    actOrderCopy(act, { fixture: 'deepseek_v3', quantized: /^(.*\.mlp\..*_proj)\.weight$/ });
    const dsGolden = JSON.parse(readFileSync(path.join(packageRoot(), 'test', 'fixtures', 'deepseek_v3', 'golden.json'), 'utf8')) as Golden;
    const prompts = dsGolden.cases.map((c) => c.prompt_ids);
    const cuda = b.cuda();
    const { model } = loadCudaModel(act, { device: 0, ...(cuda ? { cuda } : {}) });
    try {
      type Ffn = { inputOrder: unknown } | null;
      const layers = (model as unknown as { layers: { subs: { dense: Ffn }[]; moe: { inputOrders: unknown; shared: Ffn } | null }[] }).layers;
      const dense = layers.flatMap((l) => l.subs.flatMap((s) => (s.dense ? [s.dense] : [])));
      const shared = layers.flatMap((l) => (l.moe?.shared ? [l.moe.shared] : []));
      assert.ok(dense.length === 2 && shared.length === 4, `${dense.length} dense FFNs, ${shared.length} shared experts`);
      assert.ok([...dense, ...shared].every((f) => f!.inputOrder !== null), 'every dense FFN and shared expert gathers x');
      // NOTE: looser than qwen2_moe's 5e-4 / 5e-3: the same checkpoint in the plain order (no gather at all)
      // measured 0.050% / 0.355% here, this one 0.070% / 0.247% (the device's int4 FFNs keep h in bf16).
      t.diagnostic(assertMatchesIntDequant(model, act, prompts, 2e-3, 1e-2));
      // Without the dense FFNs' gather the check fails (so does it without the shared experts').
      for (const f of dense) f!.inputOrder = null;
      assert.throws(() => assertMatchesIntDequant(model, act, prompts, 2e-3, 1e-2), /routes every token|logits off the reference/);
    } finally {
      model.dispose();
    }
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
});

test('a GPTQ checkpoint whose qweight disagrees with the config, or lacks its qzeros, is refused naming the tensor', () => {
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'expertd-gptq-'));
  try {
    const e0 = 'model.layers.0.mlp.experts.0.gate_proj';
    const write = (name: string, tensors: TensorToWrite[]) => {
      const out = path.join(tmp, name);
      mkdirSync(out);
      writeSafetensors(path.join(out, 'model.safetensors'), tensors);
      for (const f of ['config.json', 'generation_config.json', 'tokenizer.json', 'tokenizer_config.json'])
        copyFileSync(path.join(DIR, f), path.join(out, f));
      return out;
    };
    const all = storedTensors(DIR);
    const noZeros = write('nozeros', all.filter((t) => t.name !== `${e0}.qzeros`));
    assert.throws(() => loadModel(noZeros, { fast: false }), new RegExp(`missing tensor\\(s\\): ${e0.replace(/\./g, '\\.')}\\.qzeros`));
    const wide = write('wide', all.map((t) => t.name === `${e0}.qweight` ? { ...t, shape: [t.shape[0]! / 2, t.shape[1]! * 2] } : t));
    assert.throws(() => loadModel(wide, { fast: false }), new RegExp(`${e0.replace(/\./g, '\\.')}\\.qweight is I32 \\[\\d+, \\d+\\], the config implies I32`));
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
});

test('older AutoGPTQ checkpoints: quantize_config.json beside config.json is read; without either the load says it is GPTQ', () => {
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'expertd-gptq-'));
  try {
    const config = JSON.parse(readFileSync(path.join(DIR, 'config.json'), 'utf8')) as Record<string, any>;
    const { quant_method: _m, ...qc } = config.quantization_config as Record<string, unknown>;
    delete config.quantization_config;
    for (const [name, sidecar] of [['sidecar', true], ['bare', false]] as const) {
      const out = path.join(tmp, name);
      mkdirSync(out);
      for (const f of ['model.safetensors', 'generation_config.json', 'tokenizer.json', 'tokenizer_config.json'])
        copyFileSync(path.join(DIR, f), path.join(out, f));
      writeFileSync(path.join(out, 'config.json'), JSON.stringify(config));
      if (sidecar) writeFileSync(path.join(out, 'quantize_config.json'), JSON.stringify(qc));
      if (!sidecar) {
        assert.throws(() => loadModel(out, { fast: false }), /\.qweight is present: a GPTQ or AWQ checkpoint, but config\.json has no quantization_config with quant_method "gptq" or "awq"/);
        continue;
      }
      assert.equal(parseModelConfig(out).quantization?.method, 'gptq');
      checkSameModel(out, golden, forcedLogitsOf(DIR, golden));
    }
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
});

// On the emulator, and on a GPU where one is present (bench/gpu-run.sh's engine step).
for (const b of INT_DEVICE_BACKENDS) {
  test(`every quantized Linear stays int4 g32 on the device (${b.label}: experts, shared experts, attention); logits as the CPU ` +
    'bf16 mode over the values the device multiplies', { skip: b.skip }, (t) => {
    const tmp = mkdtempSync(path.join(os.tmpdir(), 'expertd-gptq-dev-'));
    try {
      // The checkpoint as it is, and a copy with only the routed experts quantized.
      const experts = path.join(tmp, 'experts');
      decodedCopy(experts, /^(?!.*\.mlp\.experts\.\d+\.)/, true, 'BF16');
      for (const full of [true, false]) {
        const dir = full ? DIR : experts;
        const cuda = b.cuda();
        const { model } = loadCudaModel(dir, { device: 0, ...(cuda ? { cuda } : {}) });
        const cpu = loadModel(dir, { fast: false }).model;
        try {
          assert.deepEqual(model.expertQuant, { format: 'int4', group: 32, blockRows: 0 });
          assert.deepEqual(held(cpu), ['expert int4/int4', `shared ${full ? 'int4/int4' : 'null/null'}`]);
          // The attention projections as stored codes (cudaDenseGemmQuant).
          const attn = (model as unknown as { layers: { subs: { attn: { k: { quant?: unknown }; o: { quant?: unknown } } }[] }[] })
            .layers[0]!.subs[0]!.attn;
          assert.deepEqual([attn.k.quant ?? null, attn.o.quant ?? null], full ? [model.expertQuant, model.expertQuant] : [null, null]);
          // The reference: the CPU engine's bf16 mode over the weights the device multiplies, bf16(code x scale)
          // (test/cuda-quant.test.ts's --quantize-dense bounds for qwen2_moe).
          const figures = assertMatchesIntDequant(model, dir, golden.cases.map((c) => c.prompt_ids), 5e-4, 5e-3);
          t.diagnostic(`${full ? 'whole' : 'experts only'}: ${figures}`);
          // The device expert cache (half the experts): its pinned slots hold the stored codes too, and the
          // outputs equal the all-resident model's bit for bit.
          if (full && b.label === 'emulator') assertDeviceCacheMatches(model, dir, 'int4 g32');
        } finally {
          model.dispose();
          cpu.dispose();
        }
      }
    } finally {
      rmSync(tmp, { recursive: true, force: true });
    }
  });
}
