// AWQ checkpoints (AutoAWQ's GEMM packing, quant_method "awq"; test/fixtures-quant/qwen2_moe_awq made by
// test/fixtures/make_quant_fixtures.py: int4 with zero points in groups of 32, fp16 scales) served natively:
// every quantized Linear stays int4 codes with its scales and zero points (value = (code - zero) * scale,
// the GEMMs' epilogue subtracting the zero points' term), the logits match HF transformers run on the
// dequantised weights, and equal the checkpoint decoded here independently of the loader and served as
// f32; through the expert cache and over expert ranks they equal the all-resident model bit for bit. The
// same codes written as GPTQ with sym false (v1 and v2 zeros) and as compressed-tensors with
// weight_zero_point are the same model. The device engine keeps them as int4 codes with zero points too.
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';

import { ConfigError, parseModelConfig } from '../src/model/config.js';
import { awqIntWeight, parseAwq, type GptqConfig } from '../src/model/gptq.js';
import { describeCheckpointQuant, loadCudaModel, loadModel } from '../src/model/load.js';
import type { MoeModel } from '../src/model/model.js';
import { quantizeSpec } from '../src/model/quantize.js';
import type { TensorToWrite } from '../src/model/safetensors.js';
import { loadNative, packageRoot } from '../src/native/index.js';
import { i32, storedTensors, writeCheckpointCopy } from './helpers/checkpoint-copy.js';
import { intMatrix } from '../src/model/cuda-quant.js';
import { createCudaEmulator } from './helpers/cuda-emu.js';
import { assertDeviceCacheMatches, assertMatchesIntDequant, INT_DEVICE_BACKENDS } from './helpers/device-dequant.js';
import { emulatorSkip } from './helpers/cuda-skip.js';
import { checkAgainstDecoded, checkCachedAndRanked, checkIntCheckpoint, checkSameModel, forcedLogitsOf } from './helpers/int-checkpoint.js';
import { argmax, goldenForcedLogits, heldFormats as held, type Golden } from './helpers/model-runner.js';

const DIR = path.join(packageRoot(), 'test', 'fixtures-quant', 'qwen2_moe_awq');
const golden = JSON.parse(readFileSync(path.join(DIR, 'golden.json'), 'utf8')) as Golden;
const forcedLogits = (model: MoeModel) => goldenForcedLogits(model, golden);
const GROUP = 32;

/** Column of nibble i of an AWQ word, written out here (AutoAWQ's WQLinear_GEMM order_map). */
const ORDER = [0, 2, 4, 6, 1, 3, 5, 7];

/** An AWQ-packed I32 [rows, cols / 8] as unsigned values [rows, cols]. */
function unpackAwq(t: TensorToWrite): Uint8Array {
  const [rows, words] = t.shape as [number, number];
  const w = i32(t), out = new Uint8Array(rows * words * 8);
  for (let r = 0; r < rows; r++)
    for (let j = 0; j < words; j++)
      for (let i = 0; i < 8; i++) out[r * words * 8 + 8 * j + ORDER[i]!] = (w[r * words + j]! >>> (4 * i)) & 15;
  return out;
}

/** The f16 scales of a stored tensor as f32. */
function f16Scales(t: TensorToWrite): Float32Array {
  const s = new Float32Array(t.data.byteLength / 2);
  loadNative().convert(new Uint16Array(t.data.buffer, t.data.byteOffset, s.length), 'f16', s, 'f32');
  return s;
}

/** Every AWQ Linear of the fixture: its base name and its parts as stored. */
function awqLinears(tensors: TensorToWrite[]): { base: string; qweight: TensorToWrite; qzeros: TensorToWrite; scales: TensorToWrite }[] {
  const byName = new Map(tensors.map((t) => [t.name, t]));
  return tensors.filter((t) => t.name.endsWith('.qweight')).map((t) => {
    const base = t.name.slice(0, -'.qweight'.length);
    return { base, qweight: t, qzeros: byName.get(`${base}.qzeros`)!, scales: byName.get(`${base}.scales`)! };
  });
}

/** A copy of the fixture with every AWQ Linear written as X.weight f32, (q - zero) * scale decoded here. */
function decodedCopy(out: string): void {
  const tensors = storedTensors(DIR);
  const kept = tensors.filter((t) => !/\.(qweight|qzeros|scales)$/.test(t.name));
  for (const l of awqLinears(tensors)) {
    const [K, words] = l.qweight.shape as [number, number];
    const N = words * 8, q = unpackAwq(l.qweight), z = unpackAwq(l.qzeros), s = f16Scales(l.scales);
    const w = new Float32Array(N * K);
    for (let k = 0; k < K; k++)
      for (let n = 0; n < N; n++) {
        const g = Math.floor(k / GROUP);
        w[n * K + k] = Math.fround((q[k * N + n]! - z[g * N + n]!) * s[g * N + n]!);
      }
    kept.push({ name: `${l.base}.weight`, dtype: 'F32', shape: [N, K], data: new Uint8Array(w.buffer) });
  }
  writeCheckpointCopy(DIR, out, kept, false);
}

/**
 * A copy with the same values in GPTQ's layout, sym false: qweight [in / 8, out] packed along in, qzeros
 * packed along out in order (v1: each zero stored minus one), the same f16 scales, g_idx input // 32.
 */
function gptqCopy(out: string, format: 'gptq' | 'gptq_v2'): void {
  const tensors = storedTensors(DIR);
  const kept = tensors.filter((t) => !/\.(qweight|qzeros|scales)$/.test(t.name));
  let lowest = 16;
  for (const l of awqLinears(tensors)) {
    const [K, words] = l.qweight.shape as [number, number];
    const N = words * 8, groups = l.qzeros.shape[0]!, q = unpackAwq(l.qweight), z = unpackAwq(l.qzeros);
    const qweight = new Int32Array(Math.ceil(K / 8) * N), qzeros = new Int32Array(groups * words);
    for (let k = 0; k < K; k++)
      for (let n = 0; n < N; n++) qweight[(k >> 3) * N + n]! |= q[k * N + n]! << (4 * (k & 7));
    for (let g = 0; g < groups; g++)
      for (let n = 0; n < N; n++) {
        const zv = z[g * N + n]!;
        lowest = Math.min(lowest, zv);
        qzeros[g * words + (n >> 3)]! |= ((format === 'gptq' ? zv - 1 : zv) & 15) << (4 * (n & 7));
      }
    kept.push({ name: `${l.base}.qweight`, dtype: 'I32', shape: [Math.ceil(K / 8), N], data: new Uint8Array(qweight.buffer) },
      { name: `${l.base}.qzeros`, dtype: 'I32', shape: [groups, words], data: new Uint8Array(qzeros.buffer) },
      { name: `${l.base}.scales`, dtype: 'F16', shape: l.scales.shape, data: l.scales.data },
      { name: `${l.base}.g_idx`, dtype: 'I32', shape: [K], data: new Uint8Array(Int32Array.from({ length: K }, (_, k) => Math.floor(k / GROUP)).buffer) });
  }
  // A v1 zero of 0 would be stored as 15 and read back as 16 (AutoGPTQ's own off-by-one): not the same model.
  assert.ok(format === 'gptq_v2' || lowest >= 1, `a zero point of ${lowest} has no v1 encoding`);
  writeCheckpointCopy(DIR, out, kept, { quant_method: 'gptq', bits: 4, group_size: GROUP, sym: false, desc_act: false, checkpoint_format: format });
}

test('AWQ int4: weights kept as codes with zero points; logits, routing and greedy tokens match transformers on the dequantised weights', (t) => {
  const { model, spec } = loadModel(DIR, { fast: false });
  try {
    assert.deepEqual(spec.quantization, { method: 'gptq', packing: 'awq', bits: 4, groupSize: 32, checkpointFormat: 'gptq_v2', schemes: { bits: [4], groupSizes: [32] }, zeroPoints: true });
    assert.equal(describeCheckpointQuant(spec), ' AWQ int4 g32 (GEMM packing)');
    assert.deepEqual(held(model), ['expert int4/int4', 'shared int4/int4']);
    // int4 + an f16 scale and a zero point per 32 weights: 0.59 bytes per weight against bf16's 2.
    checkIntCheckpoint(t, model, golden, 0.35, 30_000);
  } finally {
    model.dispose();
  }
});

test('AWQ int4 equals its weights decoded independently and served as f32 (reference mode); fast mode agrees on top-1', (t) => {
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'expertd-awq-'));
  try {
    const ref = path.join(tmp, 'ref');
    decodedCopy(ref);
    // f32 rounding of two sums (the codes', then the zero points' term) where the f32 weights take one; fast
    // mode: int8 activations against the int4 codes, the zero points' term from their block sums.
    checkAgainstDecoded(t, DIR, ref, golden, 5e-5, 0.55);
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
});

test('AWQ int4 experts through the expert cache (a quarter) and over 2 expert ranks equal them all-resident, bit for bit', async () => {
  await checkCachedAndRanked(DIR, golden, 'expert int4/int4');
});

test('GPTQ with sym false: the same codes and zero points in GPTQ\'s layout (v1 and v2 zeros) are the same model, bit for bit', () => {
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'expertd-awq-gptq-'));
  try {
    const want = forcedLogitsOf(DIR, golden);
    for (const format of ['gptq', 'gptq_v2'] as const) {
      const dir = path.join(tmp, format);
      gptqCopy(dir, format);
      const { spec, held } = checkSameModel(dir, golden, want, `${format}, `);
      assert.equal((spec.quantization as GptqConfig).packing, 'gptq');
      assert.deepEqual(held, ['expert int4/int4', 'shared int4/int4']);
    }
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
});

/**
 * A copy with the same values as a compressed-tensors pack-quantized checkpoint with zero points (symmetric
 * false, groups of 32): weight_packed [out, in / 8] of code + 8 along in, weight_zero_point I32 [out / 8,
 * groups] of zero + 8 packed along the rows, the f16 scales as weight_scale [out, groups], weight_shape.
 */
function compressedCopy(out: string): void {
  const tensors = storedTensors(DIR);
  const kept = tensors.filter((t) => !/\.(qweight|qzeros|scales)$/.test(t.name));
  for (const l of awqLinears(tensors)) {
    const [K, words] = l.qweight.shape as [number, number];
    const N = words * 8, groups = l.qzeros.shape[0]!, q = unpackAwq(l.qweight), z = unpackAwq(l.qzeros);
    const kw = Math.ceil(K / 8), packed = new Int32Array(N * kw), zp = new Int32Array(words * groups);
    for (let n = 0; n < N; n++)
      for (let k = 0; k < K; k++) packed[n * kw + (k >> 3)]! |= q[k * N + n]! << (4 * (k & 7));
    for (let n = 0; n < N; n++)
      for (let g = 0; g < groups; g++) zp[(n >> 3) * groups + g]! |= z[g * N + n]! << (4 * (n & 7));
    const s = new Uint16Array(N * groups), st = new Uint16Array(l.scales.data.buffer, l.scales.data.byteOffset, N * groups);
    for (let g = 0; g < groups; g++) for (let n = 0; n < N; n++) s[n * groups + g] = st[g * N + n]!;
    const w = `${l.base}.weight`;
    kept.push({ name: `${w}_packed`, dtype: 'I32', shape: [N, kw], data: new Uint8Array(packed.buffer) },
      { name: `${w}_zero_point`, dtype: 'I32', shape: [words, groups], data: new Uint8Array(zp.buffer) },
      { name: `${w}_scale`, dtype: 'F16', shape: [N, groups], data: new Uint8Array(s.buffer) },
      { name: `${w}_shape`, dtype: 'I32', shape: [2], data: new Uint8Array(Int32Array.of(N, K).buffer) });
  }
  const w4 = JSON.parse(readFileSync(path.join(packageRoot(), 'test', 'fixtures-quant', 'qwen2_moe_w4a16', 'config.json'), 'utf8')) as Record<string, any>;
  const qc = structuredClone(w4.quantization_config);
  Object.assign(qc.config_groups.group_0.weights, { symmetric: false, group_size: GROUP, strategy: 'group' });
  writeCheckpointCopy(DIR, out, kept, qc);
}

test('compressed-tensors with symmetric false (weight_zero_point): the same codes and zero points are the same model, bit for bit', async () => {
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'expertd-awq-ct-'));
  try {
    const dir = path.join(tmp, 'ct');
    compressedCopy(dir);
    const { spec, held } = checkSameModel(dir, golden, forcedLogitsOf(DIR, golden));
    assert.equal(spec.quantization?.method, 'compressed-tensors');
    assert.deepEqual(held, ['expert int4/int4', 'shared int4/int4']);
    // Through the expert cache too (its slow tier reads each expert's weight_zero_point with its codes).
    await checkCachedAndRanked(dir, golden, 'expert int4/int4', { ranks: false });
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
});

test('AWQ configs: the older quant_config.json names are read; unsupported ones are refused naming the field', () => {
  const base = JSON.parse(readFileSync(path.join(DIR, 'config.json'), 'utf8')) as Record<string, any>;
  const cases: [Record<string, unknown>, RegExp][] = [
    [{ bits: 8 }, /\. bits 8: AWQ checkpoints expertd reads are 4-bit\./],
    [{ group_size: 48 }, /\. group_size 48: int4 groups are held as groups of 32 or 128 columns, so an AWQ group must be -1 or a multiple of 32\./],
    [{ version: 'gemv' }, /\. version "gemv": only the GEMM packing \(qweight \[in, out \/ 8\]\) is read; GEMV checkpoints pack along the input\./],
    [{ version: 'marlin' }, /\. version "marlin": only the GEMM packing .* that packing is its own kernel's\./],
    [{ backend: 'llm-awq' }, /\. backend "llm-awq": only AutoAWQ's packing is read\./],
  ];
  for (const [edit, re] of cases) {
    const c = { ...base, quantization_config: { ...base.quantization_config, ...edit } };
    assert.throws(() => parseModelConfig(c as never), (e: Error) => e instanceof ConfigError &&
      e.message.startsWith(`qwen2_moe config quantization_config ${JSON.stringify(c.quantization_config)} is not supported; supported for AWQ:`) &&
      re.test(e.message), `${JSON.stringify(edit)}: ${re}`);
  }
  const fail = (m: string) => new Error(m);
  // Read: GEMM under its other kernel names, and AutoAWQ's own field names (w_bit, q_group_size).
  for (const q of [{ version: 'GEMM' }, { version: 'exllama' }, { version: 'ipex' }, { w_bit: 4, q_group_size: 128, zero_point: true }])
    assert.equal(parseAwq({ quant_method: 'awq', bits: 4, ...q }, 'x', fail).packing, 'awq', JSON.stringify(q));
  assert.equal(parseAwq({ w_bit: 4, q_group_size: 128 }, 'x', fail).groupSize, 128);
  // AutoAWQ's save_quantized writes quant_config.json beside a config.json without quantization_config.
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'expertd-awq-cfg-'));
  try {
    const { quantization_config: _q, ...bare } = base;
    writeFileSync(path.join(tmp, 'config.json'), JSON.stringify(bare));
    writeFileSync(path.join(tmp, 'quant_config.json'), JSON.stringify({ zero_point: true, q_group_size: 32, w_bit: 4, version: 'GEMM' }));
    assert.deepEqual(parseModelConfig(tmp).quantization, { method: 'gptq', packing: 'awq', bits: 4, groupSize: 32, checkpointFormat: 'gptq_v2', schemes: { bits: [4], groupSizes: [32] }, zeroPoints: true });
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
});

test('awqIntWeight: (q - zero) * scale exactly, AutoAWQ\'s column order, per channel and in groups of 128 / 64; bad shapes refused', () => {
  let seed = 5;
  const rnd = () => ((seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32);
  const fail = (m: string) => new Error(m);
  for (const [gs, rows, cols] of [[128, 16, 256], [64, 8, 200], [-1, 24, 72]] as const) {
    const cfg = parseAwq({ quant_method: 'awq', bits: 4, group_size: gs, version: 'gemm', zero_point: true }, 'x', fail);
    const g = gs === -1 ? cols : gs, groups = Math.ceil(cols / g), words = rows / 8;
    const q = Array.from({ length: cols * rows }, () => Math.floor(rnd() * 16)); // [in, out]
    const z = Array.from({ length: groups * rows }, () => Math.floor(rnd() * 16)); // [group, out]
    const pack = (v: number[], n: number) => {
      const out = new Int32Array(n * words);
      for (let i = 0; i < n; i++)
        for (let j = 0; j < words; j++)
          for (let b = 0; b < 8; b++) out[i * words + j]! |= v[i * rows + 8 * j + ORDER[b]!]! << (4 * b);
      return out;
    };
    const scales = Float32Array.from({ length: groups * rows }, () => Math.fround(0.001 + rnd() / 100));
    const parts = {
      qweight: { dtype: 'I32', shape: [cols, words], data: pack(q, cols) },
      qzeros: { dtype: 'I32', shape: [groups, words], data: pack(z, groups) },
      scales: { dtype: 'F16', shape: [groups, rows], data: scales }, gIdx: null,
    };
    const w = awqIntWeight('m.x.weight', parts, cfg, fail);
    assert.deepEqual([w.bits, w.rows, w.cols, w.group], [4, rows, cols, gs === 64 ? 32 : 128], `g ${gs}`);
    const hg = w.group, perRow = Math.ceil(cols / hg);
    for (let n = 0; n < rows; n++)
      for (let k = 0; k < cols; k++) {
        const want = (q[k * rows + n]! - z[Math.floor(k / g) * rows + n]!) * scales[Math.floor(k / g) * rows + n]!;
        const at = n * perRow + Math.floor(k / hg);
        assert.equal((w.codes[n * cols + k]! - (w.zeros?.[at] ?? 0)) * w.scales[at]!, want, `g ${gs} (${n}, ${k})`);
      }
    assert.throws(() => awqIntWeight('m.x.weight', { ...parts, qzeros: { ...parts.qzeros, shape: [groups + 1, words] } }, cfg, fail),
      /^Error: m\.x\.qzeros has shape \[\d+, \d+\], expected/);
    assert.throws(() => awqIntWeight('m.x.weight', { ...parts, scales: { ...parts.scales, shape: [groups, rows + 8] } }, cfg, fail),
      /^Error: m\.x\.scales has shape/);
    assert.throws(() => awqIntWeight('m.x.weight', { ...parts, gIdx: { dtype: 'I32', shape: [cols], data: new Int32Array(cols) } }, cfg, fail),
      /^Error: m\.x\.g_idx is present: AWQ checkpoints have no g_idx/);
  }
});

// On the emulator, and on a GPU where one is present (bench/gpu-run.sh's intckpt step).
for (const b of INT_DEVICE_BACKENDS) {
  test(`every AWQ Linear stays int4 g32 with its zero points on the device (${b.label}: experts, shared experts, attention); ` +
    'logits as the CPU bf16 mode over the values the device multiplies', { skip: b.skip }, (t) => {
    const cuda = b.cuda();
    const { model } = loadCudaModel(DIR, { device: 0, ...(cuda ? { cuda } : {}) });
    try {
      assert.deepEqual(model.expertQuant, { format: 'int4', group: 32, blockRows: 0, zeros: true });
      // The attention projections as stored codes and zero points (cudaDenseGemmQuant).
      const attn = (model as unknown as { layers: { subs: { attn: { k: { quant?: unknown }; o: { quant?: unknown } } }[] }[] })
        .layers[0]!.subs[0]!.attn;
      assert.deepEqual([attn.k.quant, attn.o.quant], [model.expertQuant, model.expertQuant]);
      // The reference: the CPU engine's bf16 mode over bf16((code - zero) x scale), what the device multiplies.
      const figures = assertMatchesIntDequant(model, DIR, golden.cases.map((c) => c.prompt_ids), 5e-4, 5e-3);
      t.diagnostic(figures);
      // The device expert cache (half the experts): its pinned slots hold the codes and zero points too.
      if (b.label === 'emulator') assertDeviceCacheMatches(model, DIR, 'int4 g32 +zeros');
    } finally {
      model.dispose();
    }
  });
}

test('a layout without zero points refuses a weight that has them; --quantize int4 on the device re-quantizes AWQ values', { skip: emulatorSkip }, () => {
  const w = { bits: 4 as const, codes: new Int8Array(64), scales: new Float32Array(2).fill(1), rows: 1, cols: 64, group: 32, zeros: Int8Array.of(1, 0) };
  assert.throws(() => intMatrix({ format: 'int4', group: 32, blockRows: 0 }, w, null),
    /an int4 weight with zero points does not fit the table's int4 layout without them/);
  const q = quantizeSpec('int4', 32);
  const { model } = loadCudaModel(DIR, { device: 0, cuda: createCudaEmulator(), quantize: q });
  const cpu = loadModel(DIR, { fast: false, quantize: q }).model;
  try {
    assert.deepEqual(model.expertQuant, { format: 'int4', group: 32, blockRows: 0 });
    // The checkpoint's values re-quantized to symmetric int4 as the CPU engine does it (its f32 mode; the
    // device computes in bf16, test/cuda-quant.test.ts bounds that): the same picks nearly everywhere on
    // this fixture's flat logits.
    const got = goldenForcedLogits(model, golden), want = forcedLogits(cpu);
    const agree = got.filter((l, i) => argmax(l) === argmax(want[i]!)).length;
    assert.ok(agree / got.length >= 0.85, `top-1 ${agree}/${got.length} against the CPU engine with --quantize int4`);
  } finally {
    model.dispose();
    cpu.dispose();
  }
});
