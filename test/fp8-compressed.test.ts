// compressed-tensors FP8 checkpoints (llm-compressor's format "float-quantized", its FP8_DYNAMIC and
// FP8_BLOCK schemes, as the "-FP8-Dynamic" MoE checkpoints ship): every Linear of the decoder in e4m3
// with `X.weight_scale` per output channel ([out, 1]), per tensor ([1]) or in blocks (strategy
// "block"), the routers, embeddings and lm_head left in bf16 (`ignore`). Served natively on the CPU
// engine: every quantized Linear stays FP8 in memory (per-channel and per-tensor scales spread over
// 1 x 128 blocks; fused q/k/v stacked as codes); the logits equal the same checkpoint written with
// those weights as their exact dequantised f32 values (the plain path, itself checked against HF
// transformers on the fixture), within f32 rounding. Through the expert cache the FP8 model equals
// itself all-resident, bit for bit.
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, test } from 'node:test';

import { ConfigError, parseModelConfig } from '../src/model/config.js';
import { bf16ToF32, f32ToBf16 } from '../src/model/kv-dtype.js';
import { quantElement, quantMatrixBytes } from '../src/model/cuda-quant.js';
import { describeCheckpointQuant, loadCudaModel, loadModel } from '../src/model/load.js';
import type { MoeModel } from '../src/model/model.js';
import { writeSafetensors, type TensorToWrite } from '../src/model/safetensors.js';
import { storedTensors } from './helpers/checkpoint-copy.js';
import { packageRoot, type CudaBuffer, type PackedWeight } from '../src/native/index.js';
import { attachDeviceOffloader, attachOffloader, skipAllExperts } from '../src/offload/setup.js';
import { createCudaEmulator, withLazyStreams } from './helpers/cuda-emu.js';
import { emulatorSkip } from './helpers/cuda-skip.js';
import { e4m3, toE4m3 } from './helpers/fp8-checkpoint.js';
import { runAll } from './helpers/model-runner.js';
import { fixtureSequences, forcedLogits as forcedSeqLogits, teacherForced } from './helpers/quant-fidelity.js';

const fixtures = path.join(packageRoot(), 'test', 'fixtures');
const QUANTIZED = new RegExp('^model\\.layers\\.\\d+\\.(self_attn(\\.\\d)?\\.(q|k|v|o|q_a|q_b|kv_a|kv_b)_proj(_with_mqa)?|' +
  'mlps?(\\.\\d)?\\.(experts\\.\\d+\\.|shared_experts?\\.)?(gate|up|down)_proj|block_sparse_moe\\.experts\\.\\d+\\.w[123]|' +
  'linear_attn\\.(in_proj_\\w+|out_proj))\\.weight$');
/**
 * Weights the engine widens from their dequantised bf16 values: MLA's kv_b_proj (absorbed into the
 * query and output sides in f32) and the Gated DeltaNet's fused in_proj (one float weight).
 */
const ABSORBED = /\.(kv_b_proj|linear_attn\.in_proj_\w+)\.weight$/;

type Strategy = 'channel' | 'tensor' | 'block';
interface Variant {
  fixture: string; strategy: Strategy; scaleDtype: 'BF16' | 'F32'; block?: [number, number];
  /** quant_method "fp8" (DeepSeek's weight_scale_inv blocks) instead of compressed-tensors. */
  deepseek?: boolean;
  /** quant_method "fp8" fields as shipped: fmt (MiniMax-M2 writes float8_e4m3fn); scale_fmt ue8m0
   * (DeepSeek-V3.1 / V3.2: every scale a power of two, stored as f32). */
  fmt?: string;
  ue8m0?: boolean;
  /** AutoFP8's layout: quant_method "fp8" without weight_block_size, a scalar `X.weight_scale` per tensor. */
  autoFp8?: boolean;
  /** Static activation scales (activation_scheme "static" / input_activations dynamic false): a scalar
   * `X.input_scale` beside every FP8 weight, which expertd does not use. */
  static?: boolean;
}

/** llm-compressor's config for one scheme over every Linear but `ignore`. */
function floatConfig(v: Variant, ignore: string[]): Record<string, unknown> {
  return {
    quant_method: 'compressed-tensors', format: 'float-quantized', quantization_status: 'compressed',
    global_compression_ratio: null, kv_cache_scheme: null, sparsity_config: {}, transform_config: {}, version: '0.11.0',
    ignore,
    config_groups: {
      group_0: {
        targets: ['Linear'], output_activations: null,
        weights: {
          type: 'float', num_bits: 8, symmetric: true, dynamic: false, strategy: v.strategy, observer: 'minmax',
          block_structure: v.strategy === 'block' ? v.block : null, group_size: null, actorder: null, observer_kwargs: {},
        },
        input_activations: v.static ? { type: 'float', num_bits: 8, symmetric: true, dynamic: false, strategy: 'tensor' }
          : v.strategy === 'block'
          ? { type: 'float', num_bits: 8, symmetric: true, dynamic: true, strategy: 'group', group_size: 128 }
          : { type: 'float', num_bits: 8, symmetric: true, dynamic: true, strategy: 'token' },
      },
    },
  };
}

const roundScale = (v: number, dtype: 'BF16' | 'F32') => dtype === 'BF16' ? bf16ToF32(f32ToBf16(v)) : Math.fround(v);

/** Writes the FP8 checkpoint and its reference (every quantized weight as f32 code * scale, exact). */
function makeCheckpoints(v: Variant): { fp8Dir: string; refDir: string; root: string } {
  const src = path.join(fixtures, v.fixture);
  const root = mkdtempSync(path.join(os.tmpdir(), 'expertd-ct-fp8-'));
  const fp8Dir = path.join(root, 'fp8'), refDir = path.join(root, 'ref');
  const fp8: TensorToWrite[] = [], ref: TensorToWrite[] = [];
  const ignore = new Set<string>();
  for (const t of storedTensors(src)) {
    const data = t.data;
    if (!QUANTIZED.test(t.name) || t.dtype !== 'BF16') {
      fp8.push({ name: t.name, dtype: t.dtype, shape: t.shape, data });
      ref.push({ name: t.name, dtype: t.dtype, shape: t.shape, data });
      if (t.name.endsWith('.weight') && t.shape.length === 2 && t.name !== 'model.embed_tokens.weight') ignore.add(t.name.slice(0, -'.weight'.length));
      continue;
    }
    const [rows, cols] = t.shape as [number, number];
    const w = Float32Array.from(new Uint16Array(data.buffer, 0, rows * cols), bf16ToF32);
    const [br, bc] = v.strategy === 'block' ? v.block! : v.strategy === 'channel' ? [1, cols] : [rows, cols];
    const nbr = Math.ceil(rows / br), nbc = Math.ceil(cols / bc);
    const amax = new Float32Array(nbr * nbc);
    for (let r = 0; r < rows; r++)
      for (let c = 0; c < cols; c++) {
        const i = Math.floor(r / br) * nbc + Math.floor(c / bc);
        amax[i] = Math.max(amax[i]!, Math.abs(w[r * cols + c]!));
      }
    const scale = amax.map((a) => v.ue8m0 ? (a > 0 ? 2 ** Math.ceil(Math.log2(a / 448)) : 0) : roundScale(a / 448, v.scaleDtype));
    const codes = new Uint8Array(rows * cols), deq = new Float32Array(rows * cols);
    for (let r = 0; r < rows; r++)
      for (let c = 0; c < cols; c++) {
        const s = scale[Math.floor(r / br) * nbc + Math.floor(c / bc)]!;
        const code = s > 0 ? toE4m3(w[r * cols + c]! / s) : 0;
        codes[r * cols + c] = code;
        const x = Math.fround(e4m3(code) * s);
        deq[r * cols + c] = ABSORBED.test(t.name) ? bf16ToF32(f32ToBf16(x)) : x;
      }
    const scaleShape = v.strategy === 'block' ? [nbr, nbc] : v.strategy === 'channel' ? [rows, 1] : v.autoFp8 ? [] : [1];
    const scaleData = v.scaleDtype === 'BF16' ? new Uint8Array(Uint16Array.from(scale, f32ToBf16).buffer) : new Uint8Array(scale.buffer);
    fp8.push({ name: t.name, dtype: 'F8_E4M3', shape: t.shape, data: codes });
    // A calibrated scale that would be wrong if used (the logits below would not match): 1000.
    if (v.static) fp8.push({ name: t.name.replace(/\.weight$/, '.input_scale'), dtype: 'F32', shape: v.autoFp8 ? [] : [1], data: new Uint8Array(Float32Array.of(1000).buffer) });
    fp8.push({ name: `${t.name}${v.deepseek && !v.autoFp8 ? '_scale_inv' : '_scale'}`, dtype: v.scaleDtype, shape: scaleShape, data: scaleData });
    ref.push({ name: t.name, dtype: 'F32', shape: t.shape, data: deq });
  }
  const config = JSON.parse(readFileSync(path.join(src, 'config.json'), 'utf8')) as Record<string, unknown>;
  for (const [dir, tensors, quant] of [[fp8Dir, fp8, true], [refDir, ref, false]] as const) {
    mkdirSync(dir);
    writeSafetensors(path.join(dir, 'model.safetensors'), tensors);
    const qc = v.autoFp8 ? { quant_method: 'fp8', activation_scheme: v.static ? 'static' : 'dynamic' } : v.deepseek ? {
      quant_method: 'fp8', fmt: v.fmt ?? 'e4m3', activation_scheme: 'dynamic', weight_block_size: v.block,
      ...(v.ue8m0 ? { scale_fmt: 'ue8m0' } : {}), ...(v.fmt ? { modules_to_not_convert: ['gate', 'e_score_correction_bias', 'lm_head'] } : {}),
    }
      : floatConfig(v, ['lm_head', ...[...ignore].filter((n) => n !== 'lm_head')]);
    const c = quant ? { ...config, quantization_config: qc } : config;
    writeFileSync(path.join(dir, 'config.json'), JSON.stringify(c));
    for (const f of ['tokenizer.json', 'tokenizer_config.json', 'golden.json'])
      copyFileSync(path.join(src, f), path.join(dir, f));
  }
  return { fp8Dir, refDir, root };
}

/** Every golden case's prompt + greedy tokens, teacher-forced: logits per position. */
const forcedLogits = (model: MoeModel, dir: string) => forcedSeqLogits(model, fixtureSequences(dir));

/** The routed experts' formats over every MoE layer (disposing the table's references). */
function expertFormats(model: MoeModel): Set<string> {
  const seen = new Set<string>();
  for (const layer of model.moeLayers)
    for (let x = 0; x < model.spec.moe.numExperts; x++) {
      const w = layer.weights.experts.get(x);
      if (!w) continue;
      seen.add(`${w.gateUp.quant}/${w.down.quant}`);
      w.gateUp.dispose();
      w.down.dispose();
    }
  return seen;
}

const VARIANTS: Variant[] = [
  { fixture: 'glm4_moe', strategy: 'channel', scaleDtype: 'BF16' },
  { fixture: 'qwen2_moe', strategy: 'tensor', scaleDtype: 'F32' },
  { fixture: 'qwen3_moe', strategy: 'block', scaleDtype: 'BF16', block: [24, 40] },
  // DeepSeek's own FP8 with the MLA projections FP8 too, as DeepSeek-V3.1 ships them (ue8m0 scales).
  { fixture: 'deepseek_v3', strategy: 'block', scaleDtype: 'F32', block: [24, 24], deepseek: true, ue8m0: true },
  // MiniMax-M2's config as shipped (fmt float8_e4m3fn, modules_to_not_convert; experts w1 / w2 / w3).
  { fixture: 'minimax_m2', strategy: 'block', scaleDtype: 'F32', block: [24, 24], deepseek: true, fmt: 'float8_e4m3fn' },
  // Qwen3-Next's FP8 (Gated DeltaNet layers: out_proj FP8, the fused in_proj widened) and LongCat-Flash's
  // (two MLA attentions and dense MLPs per layer).
  { fixture: 'qwen3_next', strategy: 'block', scaleDtype: 'BF16', block: [24, 24], deepseek: true },
  { fixture: 'longcat_flash', strategy: 'block', scaleDtype: 'F32', block: [24, 24], deepseek: true },
  // AutoFP8 / vLLM's per-tensor FP8 (quant_method fp8, a scalar weight_scale per tensor).
  { fixture: 'mixtral', strategy: 'tensor', scaleDtype: 'F32', deepseek: true, autoFp8: true },
  // AutoFP8 with static activation scales (as the -FP8 Mixtral checkpoints ship), and llm-compressor's FP8
  // with static per-tensor activations: their input_scale tensors read, unused.
  { fixture: 'mixtral', strategy: 'tensor', scaleDtype: 'F32', deepseek: true, autoFp8: true, static: true },
  { fixture: 'qwen3_moe', strategy: 'channel', scaleDtype: 'BF16', static: true },
];

for (const v of VARIANTS) {
  const label = `${v.autoFp8 ? 'AutoFP8' : v.deepseek ? 'quant_method fp8' : 'compressed-tensors FP8'}, ${v.fixture}, ${v.strategy} scales ` +
    `(${v.scaleDtype}${v.block ? `, ${v.block.join(' x ')} blocks` : ''}${v.ue8m0 ? ', scale_fmt ue8m0' : ''}${v.fmt ? `, fmt ${v.fmt}` : ''}` +
    `${v.static ? ', static input scales' : ''})`;
  test(`${label}: every quantized Linear kept FP8, logits equal the dequantised weights'`, () => {
    const { fp8Dir, refDir, root } = makeCheckpoints(v);
    try {
      const spec = parseModelConfig(fp8Dir);
      const st = v.static ? { staticInputScales: true } : {};
      assert.deepEqual(spec.quantization, v.autoFp8 ? { method: 'fp8', blockSize: [128, 128], ...st } : v.deepseek ? { method: 'fp8', blockSize: v.block }
        : { method: 'fp8', blockSize: v.block ?? [1, 128], scaleSuffix: '_scale', ...st });
      const got = loadModel(fp8Dir, { fast: false });
      // AutoFP8's scales are weight_scale, found in the checkpoint.
      if (v.autoFp8) assert.deepEqual(got.spec.quantization, { method: 'fp8', blockSize: [128, 128], scaleSuffix: '_scale', ...st });
      // Static scales: one warning counts them (and none is an unexpected tensor, below).
      const inputWarn = got.report.warnings.filter((w) => /^\d+ input_scale tensor\(s\) \(calibrated activation scales\) are not used/.test(w));
      assert.equal(inputWarn.length, v.static ? 1 : 0, got.report.warnings.join('; '));
      // The load line says what it found.
      assert.equal(describeCheckpointQuant(got.spec), ` FP8 e4m3 (${(v.autoFp8 ? [128, 128] : v.block ?? [1, 128]).join('x')} blocks, ` +
        `${v.deepseek && !v.autoFp8 ? 'weight_scale_inv' : 'weight_scale'})`);
      const want = loadModel(refDir, { fast: false });
      try {
        // Every scale tensor is read, but those of weights the model never reads (longcat_flash's extra
        // expert slots; glm4_moe's MTP layer counts its scales among its unused tensors, so that
        // warning differs in its count).
        const unexpected = (r: typeof got.report) => r.warnings.filter((w) => w.startsWith('unexpected tensor '));
        const unused = new Set(unexpected(want.report).map((w) => w.split(' ')[2]));
        for (const w of unexpected(got.report)) {
          const name = w.split(' ')[2]!;
          assert.ok(unused.has(name.replace(/_scale(_inv)?$/, '')), `${w}: not unused in the reference`);
        }
        const a = forcedLogits(got.model, fp8Dir), b = forcedLogits(want.model, refDir);
        let worst = 0;
        for (let i = 0; i < b.length; i++)
          for (let x = 0; x < b[i]!.length; x++) worst = Math.max(worst, Math.abs(a[i]![x]! - b[i]![x]!));
        assert.ok(worst <= 1e-5, `logits max-abs difference ${worst}`);
        assert.deepEqual([...expertFormats(got.model)], ['fp8/fp8'], 'experts held as fp8 codes');
        assert.deepEqual([...expertFormats(want.model)], ['null/null']);
        // The attention projections (q/k/v fused) and the dense FFNs are held as FP8 too.
        const held = (m: MoeModel) => {
          const out = new Set<string>();
          for (const layer of m.layers)
            for (const sub of layer.subs) {
              // Every projection the attention block packs (GQA's qkv and o; MLA's qA, qB, kvA, o), or
              // the Gated DeltaNet's out_proj.
              const ws = sub.attn ? Object.values(sub.attn).filter((x): x is PackedWeight => !!x && typeof x === 'object' && 'quant' in x)
                : [(sub.linear as unknown as { outProj: PackedWeight }).outProj];
              assert.ok(ws.length >= 1, 'the mixer\'s weights are found');
              out.add(`${sub.attn ? 'attn' : 'linear'} ${[...new Set(ws.map((w) => String(w.quant)))].join('/')}`);
              const d = sub.dense?.get(0);
              if (d) {
                out.add(`dense ${d.gateUp.quant}/${d.down.quant}`);
                d.gateUp.dispose();
                d.down.dispose();
              }
            }
          return [...out].sort();
        };
        const ref = held(want.model);
        assert.deepEqual(ref.filter((h) => !h.includes('null')), [], 'the reference holds f32 weights');
        assert.deepEqual(held(got.model), ref.map((h) => h.replace(/null/g, 'fp8')));
      } finally {
        got.model.dispose();
        want.model.dispose();
      }
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });
}

for (const [v, copyThread] of [[VARIANTS[0]!, true], [VARIANTS[1]!, true], [VARIANTS[0]!, false]] as const) {
  test(`compressed-tensors FP8, ${v.fixture} ${v.strategy} scales through the expert cache (a quarter, ${copyThread ? 'copy thread' : 'engine thread'}) equals it all-resident, bit for bit`, async () => {
    const { fp8Dir, root } = makeCheckpoints(v);
    try {
      const want = teacherForced(fp8Dir);
      const loaded = loadModel(fp8Dir, { fast: false, loadExpert: skipAllExperts });
      const off = attachOffloader(loaded, { policy: 'lru', fraction: 0.25, copyThread });
      try {
        // Per-channel / per-tensor bf16 or f32 scales: spread onto the grid as they load, on the copy thread too.
        assert.equal(off.store.overlapsCompute, copyThread);
        assert.equal(off.store.slotFormat, 'fp8');
        forcedLogits(loaded.model, fp8Dir).forEach((l, i) => assert.deepEqual(l, want[i], `position ${i}`));
        assert.ok(off.stats().misses > 0, JSON.stringify(off.stats()));
        assert.deepEqual([...expertFormats(loaded.model)], ['fp8/fp8'], 'cached experts held as fp8');
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

describe('compressed-tensors FP8 on the device engine (emulator)', { skip: emulatorSkip }, () => {
  test('qwen2_moe per-tensor scales: the experts hold the stored codes on 1 x 128 blocks; the expert cache equals resident', () => {
    const v = VARIANTS[1]!;
    const { fp8Dir, root } = makeCheckpoints(v);
    try {
      const cuda = createCudaEmulator();
      const { model, checkpoint } = loadCudaModel(fp8Dir, { device: 0, cuda });
      try {
        assert.deepEqual(model.expertQuant, { format: 'fp8', group: 128, blockRows: 1 });
        const q = model.expertQuant!;
        const layer = (model as unknown as { layers: { moe: { expertWeights: { down: CudaBuffer }[] } | null }[] }).layers.find((l) => l.moe)!;
        const li = (model as unknown as { layers: { moe: unknown }[] }).layers.indexOf(layer);
        for (let x = 0; x < model.spec.moe.numExperts; x++) {
          const name = `model.layers.${li}.mlp.experts.${x}.down_proj.weight`;
          const codes = checkpoint.getTensor(name).data() as Uint8Array;
          const scale = (checkpoint.getTensor(`${name}_scale`).data() as Float32Array)[0]!;
          const [rows, cols] = checkpoint.getTensor(name).shape as [number, number];
          const bytes = quantMatrixBytes(q, rows, cols, false);
          const blob = new Uint8Array(bytes.totalBytes);
          cuda.cudaCopyToHost(blob, layer.moe!.expertWeights[x]!.down, 0, null);
          for (let r = 0; r < rows; r++)
            for (let c = 0; c < cols; c++)
              assert.deepEqual(quantElement(q, blob, bytes, rows, cols, false, r, c), { code: e4m3(codes[r * cols + c]!), scale },
                `expert ${x} (${r}, ${c})`);
        }
        const want = runAll(model, null);
        const lazy = withLazyStreams(createCudaEmulator());
        const loaded = loadCudaModel(fp8Dir, { device: 0, cuda: lazy, loadExperts: false });
        const off = attachDeviceOffloader(loaded, { policy: 'lru', fraction: 0.5 }, lazy);
        try {
          assert.equal(off.store.slotFormat, 'fp8');
          const got = runAll(loaded.model, off);
          assert.deepEqual(got.tokens, want.tokens, 'greedy tokens through the cache');
          got.logits.forEach((l, i) => assert.deepEqual(l, want.logits[i], `logits of step ${i} through the cache`));
          assert.ok(off.stats().misses > 0, JSON.stringify(off.stats()));
        } finally {
          off.dispose();
          loaded.model.dispose();
        }
      } finally {
        model.dispose();
      }
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });
});

test('compressed-tensors FP8 configs outside what is read are refused naming the field', () => {
  const base = () => JSON.parse(readFileSync(path.join(fixtures, 'qwen3_moe', 'config.json'), 'utf8')) as Record<string, unknown>;
  const cfg = (mutate: (q: Record<string, any>) => void) => {
    const q = floatConfig({ fixture: '', strategy: 'channel', scaleDtype: 'BF16' }, ['lm_head']) as Record<string, any>;
    mutate(q);
    return { ...base(), quantization_config: q };
  };
  const g = (q: Record<string, any>) => q.config_groups.group_0;
  const cases: [(q: Record<string, any>) => void, RegExp][] = [
    [(q) => { g(q).weights.num_bits = 4; }, /config_groups\.group_0\.weights type "float" num_bits 4: float-quantized weights are read as FP8/],
    [(q) => { g(q).weights.strategy = 'group'; g(q).weights.group_size = 128; }, /weights\.strategy "group": FP8 weights are read per output channel/],
    [(q) => { g(q).weights.strategy = 'block'; g(q).weights.block_structure = [128]; }, /weights\.block_structure \[128\]: expected \[rows, cols\]/],
    [(q) => { g(q).input_activations.num_bits = 4; },
      /input_activations .*FP8 activations, dynamic or static \(whose input_scale tensors are not used\), are read as that/],
    [(q) => { g(q).format = 'pack-quantized'; }, /group_0\.format "pack-quantized": a float-quantized checkpoint's groups are all float-quantized/],
    [(q) => { q.config_groups.group_1 = { ...g(q), weights: { ...g(q).weights, strategy: 'block', block_structure: [128, 128] } }; },
      /FP8 weights on 1x128 and 128x128 block grids; one grid per checkpoint is read/],
    [(q) => { g(q).weights.symmetric = false; }, /weights\.symmetric false: FP8 weights with zero points are not read/],
  ];
  for (const [mutate, re] of cases) {
    const c = cfg(mutate);
    assert.throws(() => parseModelConfig(c), (e: unknown) => e instanceof ConfigError &&
      e.message.startsWith('qwen3_moe config quantization_config') && re.test(e.message), `${re}`);
  }
  // The three strategies and no input quantization at all are read.
  for (const [mutate, block] of [
    [() => {}, [1, 128]],
    [(q: Record<string, any>) => { g(q).weights.strategy = 'tensor'; g(q).input_activations = null; }, [1, 128]],
    [(q: Record<string, any>) => { g(q).weights.strategy = 'block'; g(q).weights.block_structure = [128, 128]; }, [128, 128]],
  ] as const)
    assert.deepEqual(parseModelConfig(cfg(mutate)).quantization, { method: 'fp8', blockSize: block, scaleSuffix: '_scale' });
});
