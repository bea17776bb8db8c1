// Config parsing for the six MoE families in both transformers spellings: derived fields (MoE
// layer sets, routers, softmax scales), RoPE against transformers' own values (fixture) and a
// float64 YaRN written here, expected tensor lists, checkpoint validation and every refusal.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';

import {
  CheckpointMismatchError, ConfigError, expectedTensors, parseModelConfig, validateCheckpoint,
} from '../src/model/config.js';
import type { ModelSpec } from '../src/model/spec.js';

type Raw = Record<string, unknown>;

const fixture = JSON.parse(fs.readFileSync(
  path.join(import.meta.dirname, '..', '..', 'test', 'fixtures', 'rope-golden.json'), 'utf8')) as {
  transformers: string;
  cases: Record<string, { config: Raw; invFreqBits: number[]; attnScale: number; softmaxScale: number }>;
};

const f32Bits = (x: Float32Array): Uint32Array => new Uint32Array(x.buffer, x.byteOffset, x.length);

/** Moves rope_theta/rope_scaling (4.x) into rope_parameters (5.x). */
function toV5(c: Raw): Raw {
  if (c.rope_parameters) return c;
  const out: Raw = { ...c };
  const rp: Raw = { ...((c.rope_scaling as Raw | undefined) ?? {}) };
  if (rp.type !== undefined) { rp.rope_type = rp.type; delete rp.type; }
  rp.rope_type ??= 'default';
  if (c.rope_theta !== undefined) rp.rope_theta = c.rope_theta;
  delete out.rope_scaling;
  delete out.rope_theta;
  out.rope_parameters = rp;
  return out;
}

test(`RoPE and softmax scales match transformers (fixture from ${fixture.transformers})`, () => {
  let exact = 0;
  let total = 0;
  for (const [name, c] of Object.entries(fixture.cases)) {
    for (const cfg of [c.config, toV5(c.config)]) {
      const spec = parseModelConfig(cfg);
      const got = f32Bits(spec.attention.rope.invFreq);
      assert.equal(got.length, c.invFreqBits.length, name);
      for (let i = 0; i < got.length; i++) {
        // torch's vectorised powf may differ from a correctly rounded pow by one ulp.
        assert.ok(Math.abs(got[i]! - c.invFreqBits[i]!) <= 1, `${name}[${i}]: bits ${got[i]} vs ${c.invFreqBits[i]}`);
        if (got[i] === c.invFreqBits[i]) exact++;
        total++;
      }
      assert.equal(spec.attention.rope.attnScale, c.attnScale, `${name} attention factor`);
      assert.equal(spec.attention.softmaxScale, c.softmaxScale, `${name} softmax scale`);
    }
  }
  assert.ok(exact / total > 0.98, `${exact}/${total} bit-exact`);
});

/** YaRN in plain float64 (the paper's formulas as transformers writes them). */
function yarnF64(theta: number, dim: number, factor: number, ompe: number, betaFast = 32, betaSlow = 1,
                 truncate = true): number[] {
  const corr = (rot: number): number => (dim * Math.log(ompe / (rot * 2 * Math.PI))) / (2 * Math.log(theta));
  let low = corr(betaFast);
  let high = corr(betaSlow);
  if (truncate) { low = Math.floor(low); high = Math.ceil(high); }
  low = Math.max(low, 0);
  high = Math.min(high, dim - 1);
  if (low === high) high += 0.001;
  const out: number[] = [];
  for (let i = 0; i < dim / 2; i++) {
    const pos = theta ** ((2 * i) / dim);
    const ramp = Math.min(1, Math.max(0, (i - low) / (high - low)));
    const ext = 1 - ramp;
    out.push((1 / (factor * pos)) * (1 - ext) + (1 / pos) * ext);
  }
  return out;
}

test('YaRN inverse frequencies agree with a float64 reimplementation', () => {
  const cases = [
    { theta: 10000, dim: 64, factor: 40, ompe: 4096, bf: 32, bs: 1, trunc: true },
    { theta: 1e6, dim: 128, factor: 4, ompe: 32768, bf: 32, bs: 1, trunc: true },
    { theta: 500000, dim: 128, factor: 8, ompe: 8192, bf: 16, bs: 2, trunc: false },
  ];
  for (const k of cases) {
    const cfg = {
      ...deepseekV3(), qk_rope_head_dim: k.dim, rope_theta: k.theta, max_position_embeddings: k.ompe * k.factor,
      rope_scaling: {
        type: 'yarn', factor: k.factor, original_max_position_embeddings: k.ompe, beta_fast: k.bf,
        beta_slow: k.bs, truncate: k.trunc, mscale: 1, mscale_all_dim: 1,
      },
    };
    const got = parseModelConfig(cfg).attention.rope.invFreq;
    const want = yarnF64(k.theta, k.dim, k.factor, k.ompe, k.bf, k.bs, k.trunc);
    let maxRel = 0;
    for (let i = 0; i < want.length; i++) maxRel = Math.max(maxRel, Math.abs(got[i]! - want[i]!) / want[i]!);
    assert.ok(maxRel < 1e-6, `theta ${k.theta} dim ${k.dim}: max relative error ${maxRel}`);
    // The ramp really mixes: first entries extrapolate (unscaled), last interpolate (/ factor).
    assert.ok(Math.abs(got[0]! - 1) < 1e-7);
    assert.ok(Math.abs(got[want.length - 1]! * k.factor * k.theta ** ((k.dim - 2) / k.dim) - 1) < 1e-5);
  }
});

const common = {
  vocab_size: 1000, hidden_size: 64, num_hidden_layers: 6, num_attention_heads: 4, num_key_value_heads: 2,
  max_position_embeddings: 2048, rms_norm_eps: 1e-6, rope_theta: 10000, num_experts_per_tok: 2,
};

const mixtral = (): Raw => ({ ...common, model_type: 'mixtral', intermediate_size: 96, num_local_experts: 8,
  sliding_window: 4096, eos_token_id: 2, bos_token_id: 1 });
const qwen2 = (): Raw => ({ ...common, model_type: 'qwen2_moe', intermediate_size: 128, moe_intermediate_size: 32,
  num_experts: 8, shared_expert_intermediate_size: 80, decoder_sparse_step: 2, mlp_only_layers: [3],
  norm_topk_prob: false, eos_token_id: [5, 6] });
const qwen3 = (): Raw => ({ ...common, model_type: 'qwen3_moe', head_dim: 32, intermediate_size: 128,
  moe_intermediate_size: 32, num_experts: 8, decoder_sparse_step: 1, mlp_only_layers: [0, 5], norm_topk_prob: true,
  tie_word_embeddings: true });
const olmoe = (): Raw => ({ ...common, model_type: 'olmoe', intermediate_size: 32, num_experts: 8, clip_qkv: 8,
  norm_topk_prob: false });
function deepseekV2(): Raw {
  return { ...common, model_type: 'deepseek_v2', intermediate_size: 128, moe_intermediate_size: 32,
    n_routed_experts: 8, n_shared_experts: 2, first_k_dense_replace: 1, moe_layer_freq: 2, kv_lora_rank: 16,
    q_lora_rank: null, qk_nope_head_dim: 8, qk_rope_head_dim: 4, v_head_dim: 8, topk_method: 'group_limited_greedy',
    n_group: 4, topk_group: 2, routed_scaling_factor: 16, num_key_value_heads: 4 };
}
function deepseekV3(): Raw {
  return { ...common, model_type: 'deepseek_v3', intermediate_size: 128, moe_intermediate_size: 32,
    n_routed_experts: 8, n_shared_experts: 1, first_k_dense_replace: 2, kv_lora_rank: 16, q_lora_rank: 24,
    qk_nope_head_dim: 8, qk_rope_head_dim: 4, v_head_dim: 8, n_group: 4, topk_group: 2, norm_topk_prob: true,
    routed_scaling_factor: 2.5, topk_method: 'noaux_tc', scoring_func: 'sigmoid', num_key_value_heads: 4 };
}

const moeLayers = (s: ModelSpec): number[] =>
  s.layers.flatMap((l, i) => (l.ffn === 'moe' ? [i] : []));

/** Both spellings parse to the same spec (raw aside). */
function both(cfg: Raw): ModelSpec {
  const a = parseModelConfig(cfg);
  const b = parseModelConfig(toV5(cfg));
  const strip = (s: ModelSpec): unknown => ({ ...s, raw: null, attention: { ...s.attention, rope: {
    ...s.attention.rope, invFreq: Array.from(s.attention.rope.invFreq) } } });
  assert.deepEqual(strip(b), strip(a));
  return a;
}

test('mixtral: every layer MoE, renormalised softmax top-k, sliding window, eos', () => {
  const s = both(mixtral());
  assert.deepEqual(moeLayers(s), [0, 1, 2, 3, 4, 5]);
  assert.equal(s.attention.kind, 'gqa');
  assert.equal(s.attention.headDim, 16);
  assert.equal(s.attention.slidingWindow, 4096);
  assert.equal(s.attention.softmaxScale, 0.25);
  assert.deepEqual(s.moe.router, { scoring: 'softmax', topK: 2, renormalize: true, scale: 1, nGroup: 1,
    topkGroup: 1, groupScore: 'max', hasCorrectionBias: false });
  assert.equal(s.moe.sharedIntermediate, 0);
  assert.deepEqual(s.eosTokenIds, [2]);
  const withGen = parseModelConfig(mixtral(), { generationConfig: { eos_token_id: [7, 2] } });
  assert.deepEqual(withGen.eosTokenIds, [7, 2]);
  assert.equal(s.bosTokenId, 1);
});

test('qwen2_moe: decoder_sparse_step, mlp_only_layers, qkv bias, sigmoid-gated shared expert', () => {
  const s = both(qwen2());
  assert.deepEqual(moeLayers(s), [1, 5]);   // (i+1) % 2 == 0 and i != 3
  assert.equal(s.denseIntermediate, 128);
  assert.equal(s.moe.intermediate, 32);
  assert.equal(s.moe.sharedIntermediate, 80);
  assert.equal(s.moe.sharedGate, true);
  assert.equal(s.attention.qkvBias, true);
  assert.equal(s.attention.oBias, false);
  assert.equal(s.moe.router.renormalize, false);
  assert.deepEqual(s.eosTokenIds, [5, 6]);
  const names = expectedTensors(s).map((t) => t.name);
  assert.ok(names.includes('model.layers.1.mlp.shared_expert_gate.weight'));
  assert.ok(names.includes('model.layers.1.mlp.shared_expert.down_proj.weight'));
  assert.ok(names.includes('model.layers.0.mlp.gate_proj.weight'));
  assert.ok(names.includes('model.layers.5.self_attn.k_proj.bias'));
  assert.ok(!names.includes('model.layers.0.mlp.gate.weight'));
});

test('qwen3_moe: head_dim from config, per-head q/k norm, tied embeddings, norm_topk_prob', () => {
  const s = both(qwen3());
  assert.deepEqual(moeLayers(s), [1, 2, 3, 4]);
  assert.equal(s.attention.headDim, 32);
  assert.equal(s.attention.qkNorm, 'per_head');
  assert.equal(s.attention.rope.invFreq.length, 16);
  assert.ok(Math.abs(s.attention.softmaxScale - 1 / Math.sqrt(32)) < 1e-16);
  assert.equal(s.tieWordEmbeddings, true);
  assert.equal(s.moe.router.renormalize, true);
  const t = expectedTensors(s);
  assert.ok(!t.some((x) => x.name === 'lm_head.weight'));
  assert.deepEqual(t.find((x) => x.name === 'model.layers.1.self_attn.q_norm.weight')?.shape, [32]);
  assert.deepEqual(t.find((x) => x.name === 'model.layers.1.self_attn.q_proj.weight')?.shape, [128, 64]);
});

test('olmoe: full-projection q/k norm, clip_qkv, every layer MoE', () => {
  const s = both(olmoe());
  assert.deepEqual(moeLayers(s), [0, 1, 2, 3, 4, 5]);
  assert.equal(s.attention.qkNorm, 'full');
  assert.equal(s.attention.clipQkv, 8);
  const t = expectedTensors(s);
  assert.deepEqual(t.find((x) => x.name === 'model.layers.0.self_attn.q_norm.weight')?.shape, [64]);
  assert.deepEqual(t.find((x) => x.name === 'model.layers.0.self_attn.k_norm.weight')?.shape, [32]);
  assert.deepEqual(t.find((x) => x.name === 'model.layers.0.mlp.experts.7.down_proj.weight')?.shape, [64, 32]);
});

test('deepseek_v2: MLA without q_lora, group-limited greedy, first_k_dense_replace + moe_layer_freq', () => {
  const s = both(deepseekV2());
  assert.deepEqual(moeLayers(s), [2, 4]);   // i >= 1 and i % 2 == 0
  const a = s.attention;
  assert.equal(a.kind, 'mla');
  assert.equal(a.qLoraRank, null);
  assert.equal(a.rope.rotaryDim, 4);
  assert.equal(a.rope.interleaved, true);
  assert.ok(Math.abs(a.softmaxScale - 1 / Math.sqrt(12)) < 1e-16);
  assert.deepEqual(s.moe.router, { scoring: 'softmax', topK: 2, renormalize: false, scale: 16, nGroup: 4,
    topkGroup: 2, groupScore: 'max', hasCorrectionBias: false });
  assert.equal(s.moe.sharedIntermediate, 64);
  const t = new Map(expectedTensors(s).map((x) => [x.name, x.shape]));
  assert.deepEqual(t.get('model.layers.0.self_attn.q_proj.weight'), [4 * 12, 64]);
  assert.deepEqual(t.get('model.layers.0.self_attn.kv_a_proj_with_mqa.weight'), [16 + 4, 64]);
  assert.deepEqual(t.get('model.layers.0.self_attn.kv_b_proj.weight'), [4 * 16, 16]);
  assert.deepEqual(t.get('model.layers.0.self_attn.o_proj.weight'), [64, 4 * 8]);
  assert.deepEqual(t.get('model.layers.2.mlp.shared_experts.up_proj.weight'), [64, 64]);
  assert.deepEqual(t.get('model.layers.1.mlp.down_proj.weight'), [64, 128]);
  assert.ok(!t.has('model.layers.2.mlp.gate.e_score_correction_bias'));
});

test('deepseek_v3: sigmoid noaux_tc router with correction bias, q_lora, YaRN mscale softmax scale', () => {
  const cfg = { ...deepseekV3(), rope_scaling: { type: 'yarn', factor: 40, mscale: 1, mscale_all_dim: 1,
    original_max_position_embeddings: 4096, beta_fast: 32, beta_slow: 1 } };
  const s = both(cfg);
  assert.deepEqual(moeLayers(s), [2, 3, 4, 5]);
  assert.deepEqual(s.moe.router, { scoring: 'sigmoid', topK: 2, renormalize: true, scale: 2.5, nGroup: 4,
    topkGroup: 2, groupScore: 'top2sum', hasCorrectionBias: true });
  const mscale = 0.1 * 1 * Math.log(40) + 1;
  assert.ok(Math.abs(s.attention.softmaxScale - (1 / Math.sqrt(12)) * mscale * mscale) < 1e-15);
  assert.equal(s.attention.rope.attnScale, 1);
  assert.equal(s.attention.rope.interleaved, true);
  assert.equal(parseModelConfig({ ...cfg, rope_interleave: false }).attention.rope.interleaved, false);
  const t = new Map(expectedTensors(s).map((x) => [x.name, x.shape]));
  assert.deepEqual(t.get('model.layers.0.self_attn.q_a_proj.weight'), [24, 64]);
  assert.deepEqual(t.get('model.layers.0.self_attn.q_a_layernorm.weight'), [24]);
  assert.deepEqual(t.get('model.layers.0.self_attn.q_b_proj.weight'), [48, 24]);
  assert.deepEqual(t.get('model.layers.3.mlp.gate.e_score_correction_bias'), [8]);
  assert.deepEqual(t.get('model.layers.3.mlp.experts.7.gate_proj.weight'), [32, 64]);
  // transformers 5.x fused expert layout.
  const fused = new Map(expectedTensors(s, 'fused').map((x) => [x.name, x.shape]));
  assert.deepEqual(fused.get('model.layers.3.mlp.experts.gate_up_proj'), [8, 64, 64]);
  assert.deepEqual(fused.get('model.layers.3.mlp.experts.down_proj'), [8, 64, 32]);
  assert.ok(!fused.has('model.layers.3.mlp.experts.0.gate_proj.weight'));
});

// GLM-4.5 as on the hub (4.x spelling: top-level rope_theta and partial_rotary_factor, MTP layer count).
function glm4Moe(): Raw {
  return { ...common, model_type: 'glm4_moe', head_dim: 32, intermediate_size: 128, moe_intermediate_size: 32,
    n_routed_experts: 8, n_shared_experts: 1, first_k_dense_replace: 1, n_group: 4, topk_group: 2,
    norm_topk_prob: true, routed_scaling_factor: 2.5, use_qk_norm: true, attention_bias: true,
    partial_rotary_factor: 0.5, num_nextn_predict_layers: 1 };
}
// MiniMax-M2 as on the hub: rotary_dim (not partial_rotary_factor), qk norm type, routing-bias switches.
function minimaxM2(): Raw {
  return { ...common, model_type: 'minimax_m2', head_dim: 24, intermediate_size: 32, num_local_experts: 8,
    rotary_dim: 12, use_qk_norm: true, qk_norm_type: 'per_layer', scoring_func: 'sigmoid', use_routing_bias: true };
}

/** transformers 5.x: partial_rotary_factor inside rope_parameters, no rotary_dim. */
function partialV5(cfg: Raw, factor: number): Raw {
  const v5 = toV5(cfg);
  const out: Raw = { ...v5, rope_parameters: { ...(v5.rope_parameters as Raw), partial_rotary_factor: factor } };
  delete out.partial_rotary_factor;
  delete out.rotary_dim;
  return out;
}

test('glm4_moe: partial rotary, per-head q/k norm, qkv bias, DeepSeek-V3 router, shared expert, dense first', () => {
  const s = parseModelConfig(glm4Moe());
  const v5 = parseModelConfig(partialV5(glm4Moe(), 0.5));
  assert.deepEqual(Array.from(v5.attention.rope.invFreq), Array.from(s.attention.rope.invFreq));
  assert.deepEqual(moeLayers(s), [1, 2, 3, 4, 5]);
  assert.deepEqual(moeLayers(v5), [1, 2, 3, 4, 5]);
  assert.deepEqual(s.moe.router, { scoring: 'sigmoid', topK: 2, renormalize: true, scale: 2.5, nGroup: 4,
    topkGroup: 2, groupScore: 'top2sum', hasCorrectionBias: true });
  assert.equal(s.moe.sharedIntermediate, 32);
  assert.equal(s.denseIntermediate, 128);
  const a = s.attention;
  assert.deepEqual([a.kind, a.headDim, a.qkvBias, a.oBias, a.qkNorm], ['gqa', 32, true, false, 'per_head']);
  // Half of head_dim 32 rotates: 8 frequencies theta^(-2i/16).
  assert.equal(a.rope.rotaryDim, 16);
  assert.equal(a.rope.invFreq.length, 8);
  assert.ok(Math.abs(a.rope.invFreq[1]! - 10000 ** (-2 / 16)) < 1e-7);
  // GLM-4.5 defaults partial_rotary_factor to 0.5 when the config does not say.
  const noFactor = glm4Moe();
  delete noFactor.partial_rotary_factor;
  assert.equal(parseModelConfig(noFactor).attention.rope.rotaryDim, 16);
  assert.equal(parseModelConfig({ ...glm4Moe(), partial_rotary_factor: 1 }).attention.rope.rotaryDim, 32);
  assert.equal(parseModelConfig({ ...glm4Moe(), use_qk_norm: false }).attention.qkNorm, 'none');
  const t = new Map(expectedTensors(s).map((x) => [x.name, x.shape]));
  assert.deepEqual(t.get('model.layers.0.mlp.gate_proj.weight'), [128, 64]);
  assert.deepEqual(t.get('model.layers.1.mlp.gate.e_score_correction_bias'), [8]);
  assert.deepEqual(t.get('model.layers.1.mlp.shared_experts.up_proj.weight'), [32, 64]);
  assert.deepEqual(t.get('model.layers.1.self_attn.q_norm.weight'), [32]);
  assert.deepEqual(t.get('model.layers.1.self_attn.k_proj.bias'), [64]);
  assert.ok(!t.has('model.layers.1.self_attn.o_proj.bias'));
  // The MTP layer (model.layers.6.*) is loaded never: one warning, not an error.
  const all = expectedTensors(s);
  const mtp = [{ name: 'model.layers.6.eh_proj.weight', shape: [64, 128] },
    { name: 'model.layers.6.mlp.gate.weight', shape: [8, 64] }, { name: 'model.layers.6.enorm.weight', shape: [64] }];
  assert.deepEqual(validateCheckpoint(s, fakeCheckpoint([...all, ...mtp])).warnings,
    ['3 tensor(s) of layer(s) 6 beyond num_hidden_layers 6 (multi-token-prediction layers) are not used']);
});

test('minimax_m2: rotary_dim or partial_rotary_factor, full-projection q/k norm, sigmoid router with bias', () => {
  const s = parseModelConfig(minimaxM2());
  const v5 = parseModelConfig(partialV5(minimaxM2(), 0.5));
  assert.deepEqual(Array.from(v5.attention.rope.invFreq), Array.from(s.attention.rope.invFreq));
  assert.deepEqual(moeLayers(s), [0, 1, 2, 3, 4, 5]);
  assert.deepEqual(s.moe.router, { scoring: 'sigmoid', topK: 2, renormalize: true, scale: 1, nGroup: 1,
    topkGroup: 1, groupScore: 'max', hasCorrectionBias: true });
  assert.equal(s.moe.intermediate, 32);
  const a = s.attention;
  assert.deepEqual([a.headDim, a.qkvBias, a.oBias, a.qkNorm, a.rope.rotaryDim], [24, false, false, 'full', 12]);
  assert.ok(Math.abs(a.softmaxScale - 1 / Math.sqrt(24)) < 1e-15);
  // Hub layout (block_sparse_moe, w1/w3/w2, the bias on the block) and the 5.x fused one.
  const t = new Map(expectedTensors(s).map((x) => [x.name, x.shape]));
  assert.deepEqual(t.get('model.layers.2.block_sparse_moe.gate.weight'), [8, 64]);
  assert.deepEqual(t.get('model.layers.2.block_sparse_moe.e_score_correction_bias'), [8]);
  assert.deepEqual(t.get('model.layers.2.block_sparse_moe.experts.7.w2.weight'), [64, 32]);
  assert.deepEqual(t.get('model.layers.2.self_attn.q_norm.weight'), [96]);
  assert.deepEqual(t.get('model.layers.2.self_attn.k_norm.weight'), [48]);
  const fused = new Map(expectedTensors(s, 'fused').map((x) => [x.name, x.shape]));
  assert.deepEqual(fused.get('model.layers.2.mlp.e_score_correction_bias'), [8]);
  assert.deepEqual(fused.get('model.layers.2.mlp.experts.gate_up_proj'), [8, 64, 64]);
  const refused: Array<[Raw, RegExp]> = [
    [{ ...minimaxM2(), scoring_func: 'softmax' }, /minimax_m2 config scoring_func 'softmax' is not supported; supported: sigmoid/],
    [{ ...minimaxM2(), use_routing_bias: false }, /use_routing_bias=false is not supported/],
    [{ ...minimaxM2(), qk_norm_type: 'per_head' }, /qk_norm_type="per_head" is not supported/],
    [{ ...minimaxM2(), rotary_dim: 7 }, /gives 7 rotated dims; expected a positive even number/],
  ];
  for (const [cfg, re] of refused) assert.throws(() => parseModelConfig(cfg), (e: Error) => e instanceof ConfigError && re.test(e.message));
});

// gpt-oss-20b's config shape (4.x spelling: rope_scaling yarn with truncate, no layer_types).
function gptOss(): Raw {
  return { ...common, model_type: 'gpt_oss', head_dim: 16, intermediate_size: 32, num_local_experts: 8,
    sliding_window: 128, attention_bias: true, rope_theta: 150000, rope_scaling: { rope_type: 'yarn', factor: 32,
      beta_fast: 32, beta_slow: 1, truncate: false, original_max_position_embeddings: 4096 } };
}

test('gpt_oss: sinks, per-layer windows from layer_types, biases, router bias, clamped SwiGLU, YaRN truncate', () => {
  const s = both(gptOss());
  assert.deepEqual(moeLayers(s), [0, 1, 2, 3, 4, 5]);
  // transformers' default layer_types: sliding on even layers, full on odd.
  assert.deepEqual(s.layers.map((l) => l.slidingWindow), [128, null, 128, null, 128, null]);
  const types = ['full_attention', 'full_attention', 'sliding_attention', 'full_attention', 'sliding_attention', 'sliding_attention'];
  assert.deepEqual(parseModelConfig({ ...gptOss(), layer_types: types }).layers.map((l) => l.slidingWindow),
    [null, null, 128, null, 128, 128]);
  const a = s.attention;
  assert.deepEqual([a.sinks, a.qkvBias, a.oBias, a.slidingWindow, a.rope.rotaryDim, a.rope.interleaved],
    [true, true, true, null, 16, false]);
  assert.deepEqual(s.moe.router, { scoring: 'softmax', topK: 2, renormalize: true, scale: 1, nGroup: 1, topkGroup: 1,
    groupScore: 'max', hasCorrectionBias: false });
  assert.deepEqual([s.moe.routerBias, s.moe.clampedSwiglu], [true, { alpha: 1.702, limit: 7 }]);
  // YaRN attention factor 0.1 ln(32) + 1 on cos/sin; truncate false keeps the fractional ramp bounds
  // (so the spec differs from truncate true).
  assert.ok(Math.abs(a.rope.attnScale - (0.1 * Math.log(32) + 1)) < 1e-12);
  const truncated = parseModelConfig({ ...gptOss(), rope_scaling: { ...(gptOss().rope_scaling as Raw), truncate: true } });
  assert.notDeepEqual(Array.from(truncated.attention.rope.invFreq), Array.from(a.rope.invFreq));
  const t = new Map(expectedTensors(s).map((x) => [x.name, x.shape]));
  assert.deepEqual(t.get('model.layers.1.self_attn.sinks'), [4]);
  assert.deepEqual(t.get('model.layers.1.self_attn.o_proj.bias'), [64]);
  assert.deepEqual(t.get('model.layers.1.mlp.router.bias'), [8]);
  assert.deepEqual(t.get('model.layers.1.mlp.experts.gate_up_proj'), [8, 64, 64]);
  assert.deepEqual(t.get('model.layers.1.mlp.experts.gate_up_proj_bias'), [8, 64]);
  assert.deepEqual(t.get('model.layers.1.mlp.experts.down_proj'), [8, 32, 64]);
  assert.deepEqual(t.get('model.layers.1.mlp.experts.down_proj_bias'), [8, 64]);
  assert.throws(() => parseModelConfig({ ...gptOss(), layer_types: ['sliding_attention'] }),
    (e: Error) => e instanceof ConfigError && /layer_types is \["sliding_attention"\], expected 6 of/.test(e.message));
  assert.deepEqual(parseModelConfig({ ...gptOss(), quantization_config: { quant_method: 'mxfp4' } }).quantization,
    { method: 'mxfp4', modulesToNotConvert: [] });
  assert.throws(() => parseModelConfig({ ...gptOss(), quantization_config: { quant_method: 'mxfp4', block_size: 16 } }),
    (e: Error) => e instanceof ConfigError && /quantization_config .*"mxfp4".* is not supported.*\(unknown: block_size\)/.test(e.message));
});

test('fp8 block quantisation is accepted and recorded; other quantisation is refused', () => {
  const q = { quant_method: 'fp8', fmt: 'e4m3', activation_scheme: 'dynamic', weight_block_size: [128, 128] };
  assert.deepEqual(parseModelConfig({ ...deepseekV3(), quantization_config: q }).quantization,
    { method: 'fp8', blockSize: [128, 128] });
  assert.throws(() => parseModelConfig({ ...deepseekV3(), quantization_config: { quant_method: 'awq', bits: 4, version: 'gemv' } }),
    (e: Error) => e instanceof ConfigError && /quantization_config .*"awq".* is not supported; supported for AWQ: .*version "gemv": only the GEMM packing/.test(e.message));
  // Non-128 blocks with an even width are read (ragged edges exact; test/fp8-checkpoint.test.ts).
  assert.deepEqual(parseModelConfig({ ...deepseekV3(), quantization_config: { ...q, weight_block_size: [24, 24] } }).quantization,
    { method: 'fp8', blockSize: [24, 24] });
  assert.deepEqual(parseModelConfig({ ...deepseekV3(), quantization_config: { quant_method: 'fp8' } }).quantization,
    { method: 'fp8', blockSize: [128, 128] }, "HF's fine-grained FP8 default");
  // The shipped configs of DeepSeek-V3.1 / V3.2 (scale_fmt ue8m0: power-of-two scales stored as floats) and
  // MiniMax-M2 (fmt float8_e4m3fn, modules_to_not_convert) are read as the same block FP8.
  assert.deepEqual(parseModelConfig({ ...deepseekV3(), quantization_config: { ...q, scale_fmt: 'ue8m0' } }).quantization,
    { method: 'fp8', blockSize: [128, 128] });
  assert.deepEqual(parseModelConfig({ ...deepseekV3(), quantization_config: { activation_scheme: 'dynamic', fmt: 'float8_e4m3fn',
    quant_method: 'fp8', weight_block_size: [128, 128], modules_to_not_convert: ['gate', 'e_score_correction_bias', 'lm_head'] } }).quantization,
    { method: 'fp8', blockSize: [128, 128] });
});

test('each refused quantization_config says which field and value, and what to do', () => {
  const fp8 = { quant_method: 'fp8', fmt: 'e4m3', activation_scheme: 'dynamic', weight_block_size: [128, 128] };
  const cases: Array<[unknown, RegExp]> = [
    [{ quant_method: 'bitsandbytes', load_in_4bit: true }, /\. quant_method "bitsandbytes" \(bitsandbytes: LLM\.int8 \/ NF4 \/ FP4/],
    [{ quant_method: 'hqq' }, /\. quant_method "hqq" is not a method expertd knows: serve the bf16 original/],
    [{ bits: 4 }, /\. It names no quant_method\.$/],
    [[1, 2], /\. quantization_config must be an object\.$/],
    [{ ...fp8, fmt: 'e5m2' }, /\. fmt "e5m2": FP8 weights are read as e4m3/],
    [{ ...fp8, scale_fmt: 'ue4m3' }, /\. scale_fmt "ue4m3": block scales are read as float/],
    [{ ...fp8, fmt: 'float8_e5m2' }, /\. fmt "float8_e5m2": FP8 weights are read as e4m3/],
    [{ ...fp8, activation_scheme: 'calibrated' }, /\. activation_scheme "calibrated": expected "dynamic" or "static" \(whose input_scale tensors are not used\)\./],
    [{ ...fp8, weight_block_size: null }, /\. weight_block_size null \(one scale per tensor\): expertd reads block-scaled FP8/],
    [{ ...fp8, weight_block_size: [128] }, /\. weight_block_size \[128\]: expected \[rows, cols\], two positive integers\.$/],
    [{ ...fp8, weight_block_size: [128, 0] }, /\. weight_block_size \[128,0\]: expected \[rows, cols\]/],
    [{ ...fp8, weight_block_size: [128, 127] }, /\. weight_block_size \[128,127\]: the block width \(cols\) must be even/],
  ];
  for (const [qc, re] of cases) {
    assert.throws(() => parseModelConfig({ ...deepseekV3(), quantization_config: qc as Raw }), (e: Error) =>
      e instanceof ConfigError && e.message.startsWith(`deepseek_v3 config quantization_config ${JSON.stringify(qc)} is not supported; supported: quant_method "fp8"`) &&
      re.test(e.message), `${JSON.stringify(qc)}`);
  }
  // A method expertd does not read (or none) gets every method it does read; an FP8 one the FP8 forms.
  for (const qc of [{ quant_method: 'bitsandbytes' }, { quant_method: 'hqq' }, { bits: 4 }, [1, 2]]) {
    assert.throws(() => parseModelConfig({ ...deepseekV3(), quantization_config: qc as Raw }), (e: Error) =>
      ['"mxfp4"', '"compressed-tensors"', '"gptq"', '"awq"'].every((m) => e.message.includes(m)), `${JSON.stringify(qc)}`);
  }
  assert.throws(() => parseModelConfig({ ...deepseekV3(), quantization_config: { ...fp8, fmt: 'e5m2' } }), (e: Error) =>
    e.message.includes('weight_block_size [rows, cols]') && !e.message.includes('"gptq"'));
});

test('unsupported values are ConfigErrors naming the value and what is supported', () => {
  const cases: Array<[Raw, RegExp]> = [
    [{ ...mixtral(), model_type: 'llama' }, /model_type "llama" is not supported; supported: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3/],
    [{ ...mixtral(), hidden_act: 'gelu' }, /hidden_act is 'gelu'; only 'silu'/],
    [{ ...mixtral(), rope_scaling: { rope_type: 'longrope', short_factor: [], long_factor: [] } },
      /rope_type 'longrope' is not supported; supported: default, linear, dynamic, yarn, llama3/],
    [{ ...qwen2(), use_sliding_window: true }, /use_sliding_window=true .* is not supported/],
    [{ ...deepseekV3(), topk_method: 'greedy' }, /deepseek_v3 config topk_method 'greedy' is not supported; supported: noaux_tc/],
    [{ ...deepseekV2(), topk_method: 'noaux_tc' }, /topk_method 'noaux_tc' is not supported; supported: greedy, group_limited_greedy/],
    [{ ...deepseekV2(), scoring_func: 'sigmoid' }, /scoring_func 'sigmoid' is not supported; supported: softmax/],
    [{ ...mixtral(), hidden_size: undefined }, /mixtral config is missing hidden_size/],
    [{ ...mixtral(), num_key_value_heads: 3 }, /num_attention_heads 4 is not a multiple of num_key_value_heads 3/],
    [{ ...mixtral(), partial_rotary_factor: 0.5 }, /partial_rotary_factor is 0.5; only 1.0 is supported/],
    [{ ...deepseekV3(), n_group: 3 }, /8 experts do not split into n_group=3 groups/],
    [{ ...mixtral(), num_experts_per_tok: 9 }, /num_experts_per_tok 9 exceeds the 8 experts/],
    [{ ...mixtral(), rope_scaling: { rope_type: 'linear' } }, /rope_type 'linear' needs a numeric 'factor'/],
  ];
  for (const [cfg, re] of cases) {
    assert.throws(() => parseModelConfig(cfg), (e: Error) => {
      assert.ok(e instanceof ConfigError, `expected ConfigError, got ${e}`);
      assert.match(e.message, re);
      return true;
    });
  }
});

test('parses a folder with config.json and generation_config.json', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'expertd-cfg-'));
  try {
    fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify(qwen3()));
    fs.writeFileSync(path.join(dir, 'generation_config.json'), JSON.stringify({ eos_token_id: [151645, 151643] }));
    assert.deepEqual(parseModelConfig(dir).eosTokenIds, [151645, 151643]);
    fs.writeFileSync(path.join(dir, 'config.json'), '{ not json');
    assert.throws(() => parseModelConfig(dir), (e: Error) => e instanceof ConfigError && /is not valid JSON/.test(e.message));
    assert.throws(() => parseModelConfig(path.join(dir, 'nope')), (e: Error) => e instanceof ConfigError && /no config.json/.test(e.message));
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

/** A checkpoint-like map; fp8 = true stores 2-D weights as F8_E4M3 (scales as F32), the rest BF16. */
function fakeCheckpoint(list: Array<{ name: string; shape: number[] }>, fp8 = false) {
  const dtype = (t: { name: string; shape: number[] }): string =>
    t.name.endsWith('_scale_inv') ? 'F32' : fp8 && t.shape.length === 2 ? 'F8_E4M3' : 'BF16';
  return { tensors: new Map(list.map((t) => [t.name, { shape: t.shape, dtype: dtype(t) }])) };
}

test('validateCheckpoint: missing tensors by name, shape disagreements with both shapes, warnings', () => {
  const s = parseModelConfig(qwen2());
  const all = expectedTensors(s);
  assert.deepEqual(validateCheckpoint(s, fakeCheckpoint(all)), { layout: 'per_expert', warnings: [] });

  const extra = [...all, { name: 'model.layers.0.self_attn.rotary_emb.inv_freq', shape: [8] }];
  assert.deepEqual(validateCheckpoint(s, fakeCheckpoint(extra)).warnings,
    ['unexpected tensor model.layers.0.self_attn.rotary_emb.inv_freq (not used by qwen2_moe)']);

  const missing = all.filter((t) => t.name !== 'model.layers.1.mlp.experts.3.up_proj.weight' && t.name !== 'model.norm.weight');
  assert.throws(() => validateCheckpoint(s, fakeCheckpoint(missing)), (e: Error) => {
    assert.ok(e instanceof CheckpointMismatchError);
    assert.deepEqual(e.missing, ['model.layers.1.mlp.experts.3.up_proj.weight', 'model.norm.weight']);
    assert.match(e.message, /2 missing tensor\(s\): model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight, model\.norm\.weight/);
    return true;
  });

  const bad = all.map((t) => (t.name === 'model.layers.0.self_attn.q_proj.weight' ? { ...t, shape: [64, 32] } : t));
  assert.throws(() => validateCheckpoint(s, fakeCheckpoint(bad)), (e: Error) =>
    e instanceof CheckpointMismatchError &&
    e.message.includes('model.layers.0.self_attn.q_proj.weight has shape [64, 32], the config implies [64, 64]'));

  // A fused (transformers 5.x) checkpoint is recognised as such.
  const fused = expectedTensors(s, 'fused');
  assert.equal(validateCheckpoint(s, fakeCheckpoint(fused)).layout, 'fused');
});

test('validateCheckpoint on an FP8 checkpoint expects the _scale_inv companions', () => {
  const s = parseModelConfig({ ...deepseekV3(), quantization_config: { quant_method: 'fp8', weight_block_size: [128, 128] } });
  const all = expectedTensors(s);
  const withScales = [...all, ...all.filter((t) => t.shape.length === 2).map((t) => ({ name: `${t.name}_scale_inv`, shape: [1, 1] }))];
  assert.deepEqual(validateCheckpoint(s, fakeCheckpoint(withScales, true)).warnings, []);
  assert.throws(() => validateCheckpoint(s, fakeCheckpoint(all, true)), (e: Error) =>
    e instanceof CheckpointMismatchError && /model\.layers\.0\.self_attn\.q_a_proj\.weight_scale_inv/.test(e.message));
});

// Qwen3-Next-80B-A3B's hub config shape (4.x spelling: full_attention_interval, top-level
// partial_rotary_factor and rope_theta, no layer_types), scaled down.
function qwen3Next(): Raw {
  return { ...common, model_type: 'qwen3_next', num_hidden_layers: 8, head_dim: 32, intermediate_size: 96,
    moe_intermediate_size: 16, shared_expert_intermediate_size: 32, num_experts: 16, num_experts_per_tok: 4,
    norm_topk_prob: true, decoder_sparse_step: 1, mlp_only_layers: [1], full_attention_interval: 4,
    partial_rotary_factor: 0.25, linear_num_key_heads: 2, linear_num_value_heads: 4, linear_key_head_dim: 16,
    linear_value_head_dim: 8, linear_conv_kernel_dim: 4 };
}

test('qwen3_next: hybrid layers from full_attention_interval or layer_types, linear dims, gated attention, shared expert', () => {
  const s = both(qwen3Next());
  assert.deepEqual(s.layers.map((l) => l.mixer), ['linear_attention', 'linear_attention', 'linear_attention', 'attention',
    'linear_attention', 'linear_attention', 'linear_attention', 'attention']);
  assert.deepEqual(moeLayers(s), [0, 2, 3, 4, 5, 6, 7]);
  assert.deepEqual(s.linearAttention, { keyHeads: 2, valueHeads: 4, keyHeadDim: 16, valueHeadDim: 8, convKernel: 4 });
  assert.deepEqual([s.recurrentState, s.zeroCentredNorms, s.attention.outputGate, s.attention.qkNorm, s.attention.rope.rotaryDim],
    [true, true, true, 'per_head', 8]);
  assert.deepEqual([s.moe.sharedIntermediate, s.moe.sharedGate, s.moe.router.renormalize], [32, true, true]);
  // 5.x: layer_types wins over the interval; rope_parameters carries the partial factor.
  const types = ['full_attention', 'linear_attention', 'linear_attention', 'full_attention', 'linear_attention',
    'full_attention', 'linear_attention', 'linear_attention'];
  const v5 = parseModelConfig({ ...qwen3Next(), layer_types: types, partial_rotary_factor: undefined, rope_theta: undefined,
    rope_parameters: { rope_type: 'default', rope_theta: 10000, partial_rotary_factor: 0.5 } });
  assert.deepEqual(v5.layers.map((l) => l.mixer === 'linear_attention'), types.map((t) => t === 'linear_attention'));
  assert.equal(v5.attention.rope.rotaryDim, 16);
  // Absent partial_rotary_factor: transformers' 0.25.
  assert.equal(parseModelConfig({ ...qwen3Next(), partial_rotary_factor: undefined }).attention.rope.rotaryDim, 8);
  const t = new Map(expectedTensors(s).map((x) => [x.name, x.shape]));
  assert.deepEqual(t.get('model.layers.0.linear_attn.in_proj_qkvz.weight'), [2 * 32 + 2 * 32, 64]);
  assert.deepEqual(t.get('model.layers.0.linear_attn.in_proj_ba.weight'), [8, 64]);
  assert.deepEqual(t.get('model.layers.0.linear_attn.conv1d.weight'), [96, 1, 4]);
  assert.deepEqual(t.get('model.layers.0.linear_attn.norm.weight'), [8]);
  assert.deepEqual(t.get('model.layers.3.self_attn.q_proj.weight'), [2 * 4 * 32, 64]);
  assert.deepEqual(t.get('model.layers.3.self_attn.o_proj.weight'), [64, 128]);
  assert.deepEqual(t.get('model.layers.3.mlp.shared_expert_gate.weight'), [1, 64]);
  assert.deepEqual(t.get('model.layers.1.mlp.gate_proj.weight'), [96, 64]);
  assert.equal(t.has('model.layers.0.self_attn.q_proj.weight'), false);
  for (const [cfg, re] of [
    [{ ...qwen3Next(), layer_types: ['linear_attention'] }, /qwen3_next config layer_types is \["linear_attention"\], expected 8 of/],
    [{ ...qwen3Next(), linear_num_value_heads: 3 }, /linear_num_value_heads 3 is not a multiple of linear_num_key_heads 2/],
  ] as [Raw, RegExp][]) assert.throws(() => parseModelConfig(cfg), (e: Error) => e instanceof ConfigError && re.test(e.message));
});

test('qwen3_5_moe: the text model from text_config (model.language_model.*), split linear projections, every layer MoE', () => {
  const { mlp_only_layers: _a, decoder_sparse_step: _b, intermediate_size: _c, norm_topk_prob: _d, ...text } = qwen3Next();
  const nested = parseModelConfig({ model_type: 'qwen3_5_moe', tie_word_embeddings: false, eos_token_id: 2,
    text_config: { ...text, model_type: 'qwen3_5_moe_text', rope_parameters: { rope_type: 'default', rope_theta: 10000,
      partial_rotary_factor: 0.25, mrope_section: [11, 11, 10], mrope_interleaved: true } },
    vision_config: { depth: 2 } });
  assert.equal(nested.modelType, 'qwen3_5_moe');
  assert.equal(nested.weightPrefix, 'model.language_model.');
  assert.deepEqual(nested.eosTokenIds, [2]);
  assert.deepEqual(moeLayers(nested), [0, 1, 2, 3, 4, 5, 6, 7]);
  assert.equal(nested.moe.router.renormalize, true);
  const t = new Map(expectedTensors(nested).map((x) => [x.name, x.shape]));
  assert.deepEqual(t.get('model.language_model.layers.0.linear_attn.in_proj_qkv.weight'), [2 * 32 + 32, 64]);
  assert.deepEqual(t.get('model.language_model.layers.0.linear_attn.in_proj_z.weight'), [32, 64]);
  assert.deepEqual(t.get('model.language_model.layers.0.linear_attn.in_proj_b.weight'), [4, 64]);
  assert.deepEqual(t.get('model.language_model.embed_tokens.weight'), [1000, 64]);
  assert.deepEqual(t.get('lm_head.weight'), [1000, 64]);
  const flat = parseModelConfig({ ...text, model_type: 'qwen3_5_moe_text' });
  assert.equal(flat.weightPrefix, undefined);
  assert.throws(() => parseModelConfig({ model_type: 'qwen3_5_moe' }), /qwen3_5_moe config has no text_config object/);
});
