// HF config.json (+ generation_config.json) -> ModelSpec for the supported MoE families, in
// both transformers 4.x (rope_scaling, top-level rope_theta) and 5.x (rope_parameters) spellings.
// Anything not implemented is a ConfigError naming the value and what is supported: never a
// silently different model.
import fs from 'node:fs';
import path from 'node:path';

import {
  computeRope, invSqrt, RopeConfigError, SUPPORTED_ROPE_TYPES, yarnGetMscale,
} from './rope.js';
import type {
  AttentionSpec, LayerSpec, LinearAttentionSpec, ModelSpec, ModelType, MoeSpec, RopeSpec, RouterSpec,
} from './spec.js';
import { fp8ScaleSuffix } from './spec.js';
import { singleSharedExpert } from './moe-tensors.js';
import { parseCompressedTensors } from './compressed-tensors.js';
import { gptqLayoutNote, gptqShape, parseAwq, parseGptq } from './gptq.js';

export class ConfigError extends Error {
  readonly code = 'E_CONFIG';
  constructor(message: string) {
    super(message);
    this.name = 'ConfigError';
  }
}

export const SUPPORTED_MODEL_TYPES: readonly ModelType[] =
  ['mixtral', 'qwen2_moe', 'qwen3_moe', 'olmoe', 'deepseek_v2', 'deepseek_v3', 'longcat_flash', 'glm4_moe',
    'minimax_m2', 'gpt_oss', 'qwen3_next', 'qwen3_5_moe'];

type Raw = Record<string, unknown>;

function readJson(file: string): Raw {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    throw new ConfigError(`cannot read ${file}: ${(e as Error).message}`);
  }
  try {
    const j = JSON.parse(text) as unknown;
    if (!j || typeof j !== 'object' || Array.isArray(j)) throw new Error('not a JSON object');
    return j as Raw;
  } catch (e) {
    throw new ConfigError(`${file} is not valid JSON: ${(e as Error).message}`);
  }
}

/** Typed accessors that name the key and the model type in every error. */
class Fields {
  constructor(readonly raw: Raw, readonly modelType: string) {}

  has(key: string): boolean {
    return this.raw[key] !== undefined && this.raw[key] !== null;
  }

  int(key: string, def?: number, min = 0): number {
    const v = this.raw[key];
    if (v === undefined || v === null) {
      if (def !== undefined) return def;
      throw new ConfigError(`${this.modelType} config is missing ${key} (an integer)`);
    }
    if (typeof v !== 'number' || !Number.isInteger(v) || v < min)
      throw new ConfigError(`${this.modelType} config ${key} is ${JSON.stringify(v)}, expected an integer >= ${min}`);
    return v;
  }

  /** The first of several spellings present (transformers renamed keys between versions). */
  intAny(keys: string[], def?: number, min = 0): number {
    const key = keys.find((k) => this.raw[k] !== undefined && this.raw[k] !== null);
    if (key === undefined && def === undefined)
      throw new ConfigError(`${this.modelType} config is missing ${keys.join(' / ')} (an integer)`);
    return this.int(key ?? keys[0]!, def, min);
  }

  intOrNull(key: string): number | null {
    return this.has(key) ? this.int(key) : null;
  }

  num(key: string, def?: number): number {
    const v = this.raw[key];
    if (v === undefined || v === null) {
      if (def !== undefined) return def;
      throw new ConfigError(`${this.modelType} config is missing ${key} (a number)`);
    }
    if (typeof v !== 'number' || !Number.isFinite(v))
      throw new ConfigError(`${this.modelType} config ${key} is ${JSON.stringify(v)}, expected a number`);
    return v;
  }

  bool(key: string, def: boolean): boolean {
    const v = this.raw[key];
    if (v === undefined || v === null) return def;
    if (typeof v !== 'boolean')
      throw new ConfigError(`${this.modelType} config ${key} is ${JSON.stringify(v)}, expected true or false`);
    return v;
  }

  str(key: string, def: string): string {
    const v = this.raw[key];
    if (v === undefined || v === null) return def;
    if (typeof v !== 'string')
      throw new ConfigError(`${this.modelType} config ${key} is ${JSON.stringify(v)}, expected a string`);
    return v;
  }

  intList(key: string): number[] {
    const v = this.raw[key];
    if (v === undefined || v === null) return [];
    if (!Array.isArray(v) || !v.every((x) => Number.isInteger(x)))
      throw new ConfigError(`${this.modelType} config ${key} is ${JSON.stringify(v)}, expected a list of integers`);
    return v as number[];
  }
}

function idList(v: unknown): number[] {
  if (v === undefined || v === null) return [];
  if (typeof v === 'number' && Number.isInteger(v)) return [v];
  if (Array.isArray(v) && v.every((x) => Number.isInteger(x))) return v as number[];
  throw new ConfigError(`eos_token_id is ${JSON.stringify(v)}, expected an integer or a list of integers`);
}

export interface ParseOptions {
  /** Contents of generation_config.json (read from the folder when parsing a folder). */
  generationConfig?: Raw | null;
}

/**
 * Parses a model folder (config.json + optional generation_config.json), a config.json path, or
 * an already parsed config object into a ModelSpec.
 */
export function parseModelConfig(source: string | Raw, options: ParseOptions = {}): ModelSpec {
  let raw: Raw;
  let gen: Raw | null = options.generationConfig ?? null;
  if (typeof source === 'string') {
    const isDir = fs.existsSync(source) && fs.statSync(source).isDirectory();
    const file = isDir ? path.join(source, 'config.json') : source;
    if (!fs.existsSync(file)) throw new ConfigError(`no config.json at ${file}`);
    raw = readJson(file);
    // Older AutoGPTQ checkpoints keep their quantization config beside config.json (quantize_config.json,
    // without quant_method); transformers-era ones copy it into config.json's quantization_config.
    const gptqFile = path.join(path.dirname(file), 'quantize_config.json');
    if (raw.quantization_config == null && fs.existsSync(gptqFile))
      raw = { ...raw, quantization_config: { quant_method: 'gptq', ...readJson(gptqFile) } };
    // AutoAWQ's own save_quantized writes quant_config.json (w_bit, q_group_size, zero_point, version).
    const awqFile = path.join(path.dirname(file), 'quant_config.json');
    if (raw.quantization_config == null && fs.existsSync(awqFile))
      raw = { ...raw, quantization_config: { quant_method: 'awq', ...readJson(awqFile) } };
    const genFile = path.join(path.dirname(file), 'generation_config.json');
    if (gen === null && fs.existsSync(genFile)) gen = readJson(genFile);
  } else {
    raw = source;
  }
  return buildSpec(raw, gen);
}

/**
 * Qwen3.5-MoE: the hub config (model_type qwen3_5_moe, Qwen3_5MoeForConditionalGeneration) nests the
 * text model under text_config, whose tensors are model.language_model.*; a text-only config
 * (qwen3_5_moe_text, Qwen3_5MoeForCausalLM) is flat with model.*. expertd serves the text model.
 */
function flattenTextConfig(raw: Raw): { raw: Raw; weightPrefix: string | null } {
  if (raw.model_type === 'qwen3_5_moe_text') return { raw: { ...raw, model_type: 'qwen3_5_moe' }, weightPrefix: null };
  if (raw.model_type !== 'qwen3_5_moe') return { raw, weightPrefix: null };
  const text = raw.text_config;
  if (!text || typeof text !== 'object' || Array.isArray(text))
    throw new ConfigError('qwen3_5_moe config has no text_config object (the text model expertd serves)');
  // Outer keys (eos/bos ids, tie_word_embeddings) apply where the text config does not set them.
  const outer: Raw = {};
  for (const key of ['bos_token_id', 'eos_token_id', 'tie_word_embeddings'])
    if (raw[key] !== undefined) outer[key] = raw[key];
  return { raw: { ...outer, ...(text as Raw), model_type: 'qwen3_5_moe' }, weightPrefix: 'model.language_model.' };
}

function buildSpec(rawIn: Raw, gen: Raw | null): ModelSpec {
  const { raw, weightPrefix } = flattenTextConfig(rawIn);
  const modelType = raw.model_type;
  if (typeof modelType !== 'string' || !(SUPPORTED_MODEL_TYPES as readonly string[]).includes(modelType))
    throw new ConfigError(`model_type ${JSON.stringify(modelType)} is not supported; supported: ` +
      SUPPORTED_MODEL_TYPES.join(', '));
  const mt = modelType as ModelType;
  const c = new Fields(raw, mt);

  const act = c.str('hidden_act', 'silu');
  // gpt-oss configs say 'silu' but its experts use their own clamped SwiGLU (MoeSpec.clampedSwiglu).
  if (act !== 'silu')
    throw new ConfigError(`${mt} config hidden_act is '${act}'; only 'silu' (SwiGLU experts) is supported`);
  const quantization = parseQuantization(raw, mt);

  const hidden = c.int('hidden_size', undefined, 1);
  // LongCat-Flash counts logical layers (two sub-blocks each) in num_layers.
  const numLayers = mt === 'longcat_flash' ? c.intAny(['num_layers', 'num_hidden_layers'], undefined, 1)
    : c.int('num_hidden_layers', undefined, 1);
  const vocabSize = c.int('vocab_size', undefined, 1);
  const heads = c.int('num_attention_heads', undefined, 1);
  const maxContext = c.int('max_position_embeddings', undefined, 1);
  const rmsNormEps = c.num('rms_norm_eps', mt === 'mixtral' || mt === 'olmoe' ? 1e-5 : 1e-6);
  const tieWordEmbeddings = c.bool('tie_word_embeddings', false);

  const isDeepseek = mt === 'deepseek_v2' || mt === 'deepseek_v3' || mt === 'longcat_flash';
  const attention = isDeepseek ? mlaAttention(c, hidden, heads, maxContext)
    : gqaAttention(c, mt, hidden, heads, maxContext);
  const { moe, layers, denseIntermediate } = moeAndLayers(c, mt, numLayers);
  const hybrid = mt === 'qwen3_next' || mt === 'qwen3_5_moe';
  const linearAttention = hybrid ? hybridLayers(c, layers) : undefined;

  const eosTokenIds: number[] = [];
  for (const id of [...idList(gen?.eos_token_id), ...idList(raw.eos_token_id)])
    if (!eosTokenIds.includes(id)) eosTokenIds.push(id);
  const bos = (gen?.bos_token_id ?? raw.bos_token_id) as unknown;
  const bosTokenId = typeof bos === 'number' && Number.isInteger(bos) ? bos : null;

  return {
    modelType: mt, hidden, vocabSize, numLayers, rmsNormEps, maxContext, tieWordEmbeddings,
    denseIntermediate, attention, moe, layers, bosTokenId, eosTokenIds, quantization, raw,
    ...(linearAttention ? { linearAttention, recurrentState: true, zeroCentredNorms: true } : {}),
    ...(weightPrefix ? { weightPrefix } : {}),
  };
}

// Quantization methods expertd does not read, and what to do instead (the refusal says it).
const OTHER_QUANT_METHODS: Record<string, string> = {
  bitsandbytes: 'bitsandbytes: LLM.int8 / NF4 / FP4 quantized at load by its own kernels',
};

/**
 * Qwen3-Next / Qwen3.5: layer_types (or, in older configs, full_attention_interval: every n-th layer
 * full attention, default 4) marks each layer linear or full attention; the linear_* dims.
 */
function hybridLayers(c: Fields, layers: LayerSpec[]): LinearAttentionSpec {
  const L = layers.length;
  let types = c.raw.layer_types as unknown;
  if (types === undefined || types === null) {
    const interval = c.int('full_attention_interval', 4, 1);
    types = layers.map((_, i) => ((i + 1) % interval ? 'linear_attention' : 'full_attention'));
  }
  if (!Array.isArray(types) || types.length !== L ||
      !types.every((t) => t === 'linear_attention' || t === 'full_attention'))
    throw new ConfigError(`${c.modelType} config layer_types is ${JSON.stringify(types)}, expected ${L} of ` +
      "'linear_attention' / 'full_attention'");
  types.forEach((t, i) => { layers[i]!.mixer = t === 'linear_attention' ? 'linear_attention' : 'attention'; });
  const la: LinearAttentionSpec = {
    keyHeads: c.int('linear_num_key_heads', 16, 1),
    valueHeads: c.int('linear_num_value_heads', 32, 1),
    keyHeadDim: c.int('linear_key_head_dim', 128, 1),
    valueHeadDim: c.int('linear_value_head_dim', 128, 1),
    convKernel: c.int('linear_conv_kernel_dim', 4, 1),
  };
  if (la.valueHeads % la.keyHeads !== 0)
    throw new ConfigError(`${c.modelType} config linear_num_value_heads ${la.valueHeads} is not a multiple of ` +
      `linear_num_key_heads ${la.keyHeads}`);
  return la;
}

function parseQuantization(raw: Raw, mt: string): ModelSpec['quantization'] {
  const q = raw.quantization_config as Raw | undefined | null;
  if (!q) return null;
  // NOTE: tests match the first sentence; the second names the field at fault and what to do. A
  // config that names no method expertd reads lists every method; an FP8 one the FP8 forms.
  const refuseAs = (supported: string) => (why: string) => new ConfigError(
    `${mt} config quantization_config ${JSON.stringify(q)} is not supported; supported: ${supported}. ${why}`);
  const refuseMethod = refuseAs('quant_method "fp8" (e4m3 with block scales: DeepSeek-V3, Qwen3 FP8, GLM-4.5 FP8, ' +
    'MiniMax-M2), "mxfp4" (gpt-oss), "compressed-tensors" (int8, int4 and fp8, as llm-compressor writes them), ' +
    '"gptq" (4 and 8 bits) and "awq" (4 bits), each with the fields its own refusal names');
  const refuse = refuseAs('quant_method "fp8", fmt "e4m3" / "float8_e4m3fn", float block scales (weight_block_size [rows, cols], ' +
    'scale_fmt float or ue8m0), activation_scheme "dynamic" (FP8 weights stay FP8 on the CPU engine; on the device the ' +
    'routed experts do and the rest is dequantised to bf16 at load)');
  if (typeof q !== 'object' || Array.isArray(q)) throw refuseMethod('quantization_config must be an object.');
  const method = q.quant_method;
  if (method === 'mxfp4') return parseMxfp4(q, mt);
  if (method === 'compressed-tensors') return parseCompressedTensors(q, mt, (msg) => new ConfigError(msg));
  if (method === 'gptq') return parseGptq(q, mt, (msg) => new ConfigError(msg));
  if (method === 'awq') return parseAwq(q, mt, (msg) => new ConfigError(msg));
  if (method === undefined) throw refuseMethod('It names no quant_method.');
  if (method !== 'fp8') {
    const known = typeof method === 'string' ? OTHER_QUANT_METHODS[method] : undefined;
    throw refuseMethod(`quant_method ${JSON.stringify(method)} ${known ? `(${known})` : 'is not a method expertd knows'}: ` +
      'serve the bf16 original, with --quantize int8|int4|fp8 to quantize it at load.');
  }
  // DeepSeek writes "e4m3", MiniMax-M2 "float8_e4m3fn": the same e4m3fn codes.
  const fmt = q.fmt ?? 'e4m3';
  if (!['e4m3', 'e4m3fn', 'float8_e4m3fn'].includes(fmt as string))
    throw refuse(`fmt ${JSON.stringify(fmt)}: FP8 weights are read as e4m3 (e4m3fn codes).`);
  // DeepSeek-V3.1 / V3.2's "ue8m0": the scales are powers of two (what DeepGEMM's activation scales are
  // rounded to), stored as floats like any others; expertd does not quantize activations.
  const scaleFmt = q.scale_fmt ?? 'float';
  if (scaleFmt !== 'float' && scaleFmt !== 'ue8m0')
    throw refuse(`scale_fmt ${JSON.stringify(scaleFmt)}: block scales are read as float (weight_scale_inv in f32, bf16 or f16; ` +
      '"ue8m0" powers of two stored so too).');
  // "static" (AutoFP8's calibrated X.input_scale per Linear): read, the scales unused (a load warning says so),
  // since expertd computes with bf16 / f32 activations: the checkpoint's weights with finer activations.
  const act = q.activation_scheme ?? 'dynamic';
  if (act !== 'dynamic' && act !== 'static')
    throw refuse(`activation_scheme ${JSON.stringify(act)}: expected "dynamic" or "static" (whose input_scale tensors are not used).`);
  // HF's fine-grained FP8 (quant_method "fp8") defaults to 128 x 128 blocks; null means per-tensor scales.
  const block = 'weight_block_size' in q ? q.weight_block_size : [128, 128];
  if (block === null)
    throw refuse('weight_block_size null (one scale per tensor): expertd reads block-scaled FP8 (weight_block_size [rows, cols]).');
  const okBlock = Array.isArray(block) && block.length === 2 &&
    block.every((x) => Number.isInteger(x) && (x as number) > 0);
  if (!okBlock) throw refuse(`weight_block_size ${JSON.stringify(block)}: expected [rows, cols], two positive integers.`);
  if ((block as number[])[1]! % 2 !== 0)
    throw refuse(`weight_block_size ${JSON.stringify(block)}: the block width (cols) must be even for the FP8 kernels.`);
  return { method: 'fp8', blockSize: block as [number, number], ...(act === 'static' ? { staticInputScales: true as const } : {}) };
}

/**
 * gpt-oss's MXFP4 (transformers Mxfp4Config): the experts' gate_up_proj / down_proj stored as
 * `*_blocks` (two e2m1 per byte) and `*_scales` (e8m0 per 32 values); everything else as stored.
 * `modules_to_not_convert` only says what was left unquantized, which the tensors show anyway.
 */
function parseMxfp4(q: Raw, mt: string): ModelSpec['quantization'] {
  const known = ['quant_method', 'modules_to_not_convert', 'dequantize'];
  const unknown = Object.keys(q).filter((k) => !known.includes(k));
  const skip = q.modules_to_not_convert ?? [];
  if (mt !== 'gpt_oss' || unknown.length || !Array.isArray(skip) || skip.some((m) => typeof m !== 'string'))
    throw new ConfigError(`${mt} config quantization_config ${JSON.stringify(q)} is not supported; ` +
      'supported for mxfp4: gpt_oss checkpoints (experts as *_blocks / *_scales) with the fields ' +
      `${known.join(', ')}` + (mt !== 'gpt_oss' ? ` (model_type ${mt} has no MXFP4 checkpoint layout)` : '') +
      (unknown.length ? ` (unknown: ${unknown.join(', ')})` : ''));
  return { method: 'mxfp4', modulesToNotConvert: skip as string[] };
}

/** rope_parameters (5.x) or rope_scaling + rope_theta (4.x) -> type, theta and the dict. */
function ropeDict(c: Fields): { ropeType: string; theta: number; params: Raw } {
  const raw = c.raw;
  const src = (raw.rope_scaling ?? raw.rope_parameters ?? {}) as Raw;
  if (typeof src !== 'object' || Array.isArray(src))
    throw new ConfigError(`${c.modelType} config rope_parameters is ${JSON.stringify(src)}, expected an object`);
  const params: Raw = { ...src };
  const ropeType = String(params.rope_type ?? params.type ?? 'default');
  const theta = (params.rope_theta ?? raw.rope_theta ?? 10000) as number;
  if (typeof theta !== 'number' || !(theta > 0))
    throw new ConfigError(`${c.modelType} config rope_theta is ${JSON.stringify(theta)}, expected a positive number`);
  if (['llama3', 'yarn', 'longrope'].includes(ropeType)) {
    // transformers: a top-level original_max_position_embeddings wins, else max_position_embeddings.
    if (raw.original_max_position_embeddings !== undefined)
      params.original_max_position_embeddings = raw.original_max_position_embeddings;
    else if (params.original_max_position_embeddings === undefined)
      params.original_max_position_embeddings = raw.max_position_embeddings;
  }
  if (!(SUPPORTED_ROPE_TYPES as readonly string[]).includes(ropeType))
    throw new ConfigError(`${c.modelType} config rope_type '${ropeType}' is not supported; supported: ` +
      SUPPORTED_ROPE_TYPES.join(', '));
  return { ropeType, theta, params };
}

/**
 * Rotated dims per head: head_dim * partial_rotary_factor (rope_parameters in 5.x, top level in 4.x;
 * GLM-4.5 defaults to 0.5; MiniMax-M2 hub configs say rotary_dim instead). Families without partial
 * rotary in transformers refuse a factor other than 1.
 */
function rotaryDim(c: Fields, headDim: number): number {
  const raw = c.raw;
  const params = (raw.rope_parameters ?? raw.rope_scaling ?? {}) as Raw;
  let prf = (params.partial_rotary_factor ?? raw.partial_rotary_factor) as unknown;
  if (c.modelType === 'minimax_m2' && (prf === undefined || prf === null) && c.has('rotary_dim'))
    prf = c.int('rotary_dim', undefined, 2) / headDim;
  if (c.modelType === 'glm4_moe' && (prf === undefined || prf === null)) prf = 0.5;
  const qwenHybrid = c.modelType === 'qwen3_next' || c.modelType === 'qwen3_5_moe';
  // Qwen3-Next / Qwen3.5 default to 0.25 (transformers' config sets it when absent).
  if (qwenHybrid && (prf === undefined || prf === null)) prf = 0.25;
  if (prf === undefined || prf === null) return headDim;
  const partial = c.modelType === 'glm4_moe' || c.modelType === 'minimax_m2' || qwenHybrid;
  if (typeof prf !== 'number' || !(prf > 0 && prf <= 1) || (!partial && prf !== 1))
    throw new ConfigError(`${c.modelType} config partial_rotary_factor is ${JSON.stringify(prf)}; ` +
      (partial ? 'expected a number in (0, 1]' : `only 1.0 is supported for ${c.modelType}`));
  // transformers: int(head_dim * partial_rotary_factor)
  const dim = Math.floor(headDim * prf);
  if (dim < 2 || dim % 2 !== 0)
    throw new ConfigError(`${c.modelType} config: head_dim ${headDim} x partial_rotary_factor ${prf} gives ` +
      `${dim} rotated dims; expected a positive even number`);
  return dim;
}

function rope(c: Fields, dim: number, maxContext: number, interleaved: boolean): RopeSpec {
  const { ropeType, theta, params } = ropeDict(c);
  try {
    const r = computeRope({ ropeType, theta, dim, maxPositionEmbeddings: maxContext, params });
    return { invFreq: r.invFreq, attnScale: r.attnScale, rotaryDim: dim, interleaved };
  } catch (e) {
    if (e instanceof RopeConfigError) throw new ConfigError(`${c.modelType} config: ${e.message}`);
    throw e;
  }
}

function gqaAttention(c: Fields, mt: ModelType, hidden: number, heads: number,
                      maxContext: number): AttentionSpec {
  const kvHeads = c.int('num_key_value_heads', heads, 1);
  if (heads % kvHeads !== 0)
    throw new ConfigError(`${mt} config num_attention_heads ${heads} is not a multiple of num_key_value_heads ${kvHeads}`);
  let headDim: number;
  if (c.has('head_dim')) headDim = c.int('head_dim', undefined, 1);
  else {
    if (hidden % heads !== 0)
      throw new ConfigError(`${mt} config hidden_size ${hidden} is not divisible by num_attention_heads ${heads} ` +
        'and head_dim is not given');
    headDim = hidden / heads;
  }
  let slidingWindow: number | null = null;
  if (mt === 'mixtral') {
    slidingWindow = c.intOrNull('sliding_window');
  } else if ((mt === 'qwen2_moe' || mt === 'qwen3_moe') && c.bool('use_sliding_window', false)) {
    throw new ConfigError(`${mt} config use_sliding_window=true (a window on some layers only) is not supported; ` +
      'supported: use_sliding_window=false');
  }
  let qkvBias = false;
  let oBias = false;
  let qkNorm: AttentionSpec['qkNorm'] = mt === 'qwen3_moe' ? 'per_head' : mt === 'olmoe' ? 'full' : 'none';
  if (mt === 'glm4_moe') {
    // GLM-4.5: q/k/v bias (attention_bias), none on o_proj; use_qk_norm: per-head RMSNorm before RoPE.
    qkvBias = c.bool('attention_bias', false);
    if (c.bool('use_qk_norm', false)) qkNorm = 'per_head';
  }
  if (mt === 'minimax_m2') {
    // MiniMax-M2: RMSNorm over the whole q and k projections (hub configs: use_qk_norm true,
    // qk_norm_type 'per_layer'), no attention biases.
    const type = c.str('qk_norm_type', 'per_layer');
    if (!c.bool('use_qk_norm', true) || type !== 'per_layer')
      throw new ConfigError(`minimax_m2 config use_qk_norm=${JSON.stringify(c.raw.use_qk_norm)} qk_norm_type=` +
        `${JSON.stringify(type)} is not supported; supported: use_qk_norm true with qk_norm_type 'per_layer' ` +
        '(what transformers implements)');
    qkNorm = 'full';
  }
  if (mt === 'qwen2_moe') qkvBias = c.bool('qkv_bias', true);
  let sinks = false;
  if (mt === 'gpt_oss') {
    // gpt-oss: biases on q/k/v and o (attention_bias, default true), sinks, per-layer windows
    // (layer_types; the spec's window is null and each LayerSpec says its own).
    qkvBias = oBias = c.bool('attention_bias', true);
    sinks = true;
  }
  if (mt === 'qwen3_moe' || mt === 'olmoe') qkvBias = oBias = c.bool('attention_bias', false);
  let outputGate = false;
  if (mt === 'qwen3_next' || mt === 'qwen3_5_moe') {
    // Qwen3-Next full attention: per-head q/k RMSNorm (zero-centred), the output gate, biases on all
    // four projections when attention_bias.
    qkvBias = oBias = c.bool('attention_bias', false);
    qkNorm = 'per_head';
    outputGate = true;
  }
  if (mt === 'mixtral' && c.bool('attention_bias', false))
    throw new ConfigError('mixtral config attention_bias=true is not supported (Mixtral has no attention bias)');
  const clip = mt === 'olmoe' && c.has('clip_qkv') ? c.num('clip_qkv') : null;
  return {
    kind: 'gqa', heads, kvHeads, headDim, qkvBias, oBias,
    qkNorm, clipQkv: clip, slidingWindow, ...(sinks ? { sinks } : {}), ...(outputGate ? { outputGate } : {}),
    softmaxScale: invSqrt(headDim),
    qLoraRank: null, kvLoraRank: 0, qkNopeHeadDim: 0, qkRopeHeadDim: 0, vHeadDim: headDim,
    rope: rope(c, rotaryDim(c, headDim), maxContext, false),
  };
}

function mlaAttention(c: Fields, hidden: number, heads: number, maxContext: number): AttentionSpec {
  const mt = c.modelType;
  if (c.bool('attention_bias', false))
    throw new ConfigError(`${mt} config attention_bias=true is not supported; supported: false`);
  if (c.bool('mlp_bias', false))
    throw new ConfigError(`${mt} config mlp_bias=true is not supported; supported: false`);
  const qLoraRank = c.intOrNull('q_lora_rank');
  const kvLoraRank = c.int('kv_lora_rank', 512, 1);
  const qkNopeHeadDim = c.int('qk_nope_head_dim', 128, 0);
  const qkRopeHeadDim = c.int('qk_rope_head_dim', 64, 2);
  const vHeadDim = c.int('v_head_dim', 128, 1);
  const qkHeadDim = qkNopeHeadDim + qkRopeHeadDim;
  // transformers: DeepSeek-V2 rotates complex pairs (2i, 2i+1); V3 does the same when
  // rope_interleave (default true) and rotate_half otherwise.
  const interleaved = mt === 'deepseek_v3' ? c.bool('rope_interleave', true) : true;
  const r = rope(c, qkRopeHeadDim, maxContext, interleaved);
  // Softmax scale: qk_head_dim^-0.5 * mscale^2 with mscale = yarn_get_mscale(factor, mscale_all_dim)
  // (transformers yarn_apply_mscale: only for a non-default rope_type with mscale_all_dim set).
  let softmaxScale = invSqrt(qkHeadDim);
  const { ropeType, params } = ropeDict(c);
  if (ropeType !== 'default') {
    const mAll = params.mscale_all_dim as number | undefined;
    if (mAll) {
      const factor = params.factor;
      if (typeof factor !== 'number')
        throw new ConfigError(`${mt} config rope_parameters.factor is ${JSON.stringify(factor)}, expected a number`);
      const m = yarnGetMscale(factor, mAll);
      softmaxScale = softmaxScale * m * m;
    }
  }
  // LongCat-Flash scales q by sqrt(hidden / q_lora_rank) and the latent by sqrt(hidden / kv_lora_rank)
  // (transformers applies both unconditionally; the original config has mla_scale_* switches).
  let qScale = 1;
  let kvScale = 1;
  if (mt === 'longcat_flash') {
    if (qLoraRank === null) throw new ConfigError('longcat_flash config q_lora_rank is missing (an integer)');
    if (c.bool('mla_scale_q_lora', true)) qScale = Math.sqrt(hidden / qLoraRank);
    if (c.bool('mla_scale_kv_lora', true)) kvScale = Math.sqrt(hidden / kvLoraRank);
  }
  return {
    kind: 'mla', heads, kvHeads: 1, headDim: qkHeadDim, qkvBias: false, oBias: false,
    qkNorm: 'none', clipQkv: null, slidingWindow: null, softmaxScale,
    qLoraRank, kvLoraRank, qkNopeHeadDim, qkRopeHeadDim, vHeadDim, qScale, kvScale, rope: r,
  };
}

function moeAndLayers(c: Fields, mt: ModelType, numLayers: number):
    { moe: MoeSpec; layers: LayerSpec[]; denseIntermediate: number } {
  if (mt === 'longcat_flash') return longcatMoe(c, numLayers);
  const topK = c.int('num_experts_per_tok', undefined, 1);
  let numExperts: number;
  let intermediate: number;
  let denseIntermediate = 0;
  let sharedIntermediate = 0;
  let sharedGate = false;
  let isMoe: (i: number) => boolean;
  const router: RouterSpec = {
    scoring: 'softmax', topK, renormalize: false, scale: 1, nGroup: 1, topkGroup: 1,
    groupScore: 'max', hasCorrectionBias: false,
  };
  switch (mt) {
    case 'mixtral':
      numExperts = c.int('num_local_experts', undefined, 1);
      intermediate = c.int('intermediate_size', undefined, 1);
      router.renormalize = true;  // Mixtral always renormalises its top-k softmax weights
      isMoe = () => true;
      break;
    case 'olmoe':
      numExperts = c.intAny(['num_experts', 'num_local_experts'], undefined, 1);
      intermediate = c.int('intermediate_size', undefined, 1);
      router.renormalize = c.bool('norm_topk_prob', false);
      isMoe = () => true;
      break;
    case 'qwen2_moe':
    case 'qwen3_moe': {
      numExperts = c.intAny(['num_experts', 'num_local_experts'], undefined, 0);
      intermediate = c.int('moe_intermediate_size', undefined, 1);
      denseIntermediate = c.int('intermediate_size', undefined, 1);
      router.renormalize = c.bool('norm_topk_prob', false);
      const step = c.int('decoder_sparse_step', 1, 1);
      const mlpOnly = new Set(c.intList('mlp_only_layers'));
      isMoe = (i) => !mlpOnly.has(i) && numExperts > 0 && (i + 1) % step === 0;
      if (mt === 'qwen2_moe') {
        sharedIntermediate = c.int('shared_expert_intermediate_size', 0, 0);
        sharedGate = sharedIntermediate > 0;
      }
      break;
    }
    case 'qwen3_next':
    case 'qwen3_5_moe': {
      // Many small experts (softmax top-k, renormalised: norm_topk_prob, always in Qwen3.5) plus one
      // shared expert scaled by sigmoid(shared_expert_gate(x)). Qwen3.5 has no dense layers.
      numExperts = c.intAny(['num_experts', 'num_local_experts'], undefined, 1);
      intermediate = c.int('moe_intermediate_size', undefined, 1);
      sharedIntermediate = c.int('shared_expert_intermediate_size', 0, 0);
      sharedGate = sharedIntermediate > 0;
      if (mt === 'qwen3_5_moe') {
        router.renormalize = true;
        isMoe = () => true;
        break;
      }
      denseIntermediate = c.int('intermediate_size', 0, 0);
      router.renormalize = c.bool('norm_topk_prob', true);
      const step = c.int('decoder_sparse_step', 1, 1);
      const mlpOnly = new Set(c.intList('mlp_only_layers'));
      isMoe = (i) => !mlpOnly.has(i) && (i + 1) % step === 0;
      break;
    }
    case 'glm4_moe': {
      // DeepSeek-V3's router (sigmoid, e_score_correction_bias, group-limited top-k of the top-2
      // sums), shared experts, dense layers below first_k_dense_replace. The MTP layers
      // (num_nextn_predict_layers, stored as model.layers.{L}...) are not part of the decoder.
      numExperts = c.intAny(['n_routed_experts', 'num_local_experts'], undefined, 1);
      intermediate = c.int('moe_intermediate_size', undefined, 1);
      denseIntermediate = c.int('intermediate_size', undefined, 1);
      sharedIntermediate = intermediate * c.int('n_shared_experts', 1, 0);
      router.scale = c.num('routed_scaling_factor', 1);
      router.renormalize = c.bool('norm_topk_prob', true);
      router.scoring = 'sigmoid';
      router.hasCorrectionBias = true;
      router.nGroup = c.int('n_group', 1, 1);
      router.topkGroup = c.int('topk_group', 1, 1);
      router.groupScore = 'top2sum';
      const firstDense = c.int('first_k_dense_replace', 1, 0);
      isMoe = (i) => i >= firstDense;
      break;
    }
    case 'minimax_m2': {
      // Sigmoid scores, top-k of score + e_score_correction_bias, weights = the chosen scores
      // renormalised to sum 1 (always, in transformers), no scaling, no groups.
      numExperts = c.intAny(['num_local_experts', 'num_experts'], undefined, 1);
      intermediate = c.int('intermediate_size', undefined, 1);
      const scoring = c.str('scoring_func', 'sigmoid');
      if (scoring !== 'sigmoid')
        throw new ConfigError(`minimax_m2 config scoring_func '${scoring}' is not supported; supported: sigmoid`);
      if (!c.bool('use_routing_bias', true))
        throw new ConfigError('minimax_m2 config use_routing_bias=false is not supported; supported: true ' +
          '(transformers always adds e_score_correction_bias)');
      router.scoring = 'sigmoid';
      router.hasCorrectionBias = true;
      router.renormalize = true;
      isMoe = () => true;
      break;
    }
    case 'gpt_oss': {
      // Router Linear with bias; top-k of its logits, then softmax over the chosen k (equal to the
      // renormalised softmax top-k); experts with biases and the clamped SwiGLU (alpha, limit are
      // constants in transformers).
      numExperts = c.intAny(['num_local_experts', 'num_experts'], undefined, 1);
      intermediate = c.int('intermediate_size', undefined, 1);
      router.renormalize = true;
      isMoe = () => true;
      break;
    }
    case 'deepseek_v2':
    case 'deepseek_v3': {
      numExperts = c.intAny(['n_routed_experts', 'num_local_experts'], undefined, 1);
      intermediate = c.int('moe_intermediate_size', undefined, 1);
      denseIntermediate = c.int('intermediate_size', undefined, 1);
      sharedIntermediate = intermediate * c.int('n_shared_experts', 0, 0);
      router.scale = c.num('routed_scaling_factor', 1);
      const firstDense = c.int('first_k_dense_replace', 0, 0);
      const freq = c.int('moe_layer_freq', 1, 1);
      isMoe = (i) => i >= firstDense && i % freq === 0;
      const topkMethod = c.str('topk_method', mt === 'deepseek_v2' ? 'greedy' : 'noaux_tc');
      const scoring = c.str('scoring_func', mt === 'deepseek_v2' ? 'softmax' : 'sigmoid');
      if (mt === 'deepseek_v2') {
        router.renormalize = c.bool('norm_topk_prob', false);
        if (scoring !== 'softmax')
          throw new ConfigError(`deepseek_v2 config scoring_func '${scoring}' is not supported; supported: softmax`);
        if (topkMethod === 'group_limited_greedy') {
          router.nGroup = c.int('n_group', undefined, 1);
          router.topkGroup = c.int('topk_group', undefined, 1);
          router.groupScore = 'max';
        } else if (topkMethod !== 'greedy') {
          throw new ConfigError(`deepseek_v2 config topk_method '${topkMethod}' is not supported; ` +
            'supported: greedy, group_limited_greedy');
        }
      } else {
        router.renormalize = c.bool('norm_topk_prob', true);
        if (scoring !== 'sigmoid')
          throw new ConfigError(`deepseek_v3 config scoring_func '${scoring}' is not supported; supported: sigmoid`);
        if (topkMethod !== 'noaux_tc')
          throw new ConfigError(`deepseek_v3 config topk_method '${topkMethod}' is not supported; supported: noaux_tc`);
        router.scoring = 'sigmoid';
        router.hasCorrectionBias = true;
        router.nGroup = c.int('n_group', 1, 1);
        router.topkGroup = c.int('topk_group', router.nGroup, 1);
        router.groupScore = 'top2sum';
      }
      break;
    }
  }
  if (router.nGroup > 1) {
    if (numExperts % router.nGroup !== 0)
      throw new ConfigError(`${mt} config: ${numExperts} experts do not split into n_group=${router.nGroup} groups`);
    if (router.topkGroup > router.nGroup)
      throw new ConfigError(`${mt} config topk_group ${router.topkGroup} exceeds n_group ${router.nGroup}`);
    if (topK > router.topkGroup * (numExperts / router.nGroup))
      throw new ConfigError(`${mt} config num_experts_per_tok ${topK} exceeds the experts in topk_group groups`);
  }
  if (numExperts > 0 && topK > numExperts)
    throw new ConfigError(`${mt} config num_experts_per_tok ${topK} exceeds the ${numExperts} experts`);
  const layers: LayerSpec[] = [];
  for (let i = 0; i < numLayers; i++) layers.push({ ffn: isMoe(i) ? 'moe' : 'dense' });
  if (mt === 'gpt_oss') {
    const window = c.intOrNull('sliding_window');
    const types = c.raw.layer_types ?? layers.map((_, i) => ((i + 1) % 2 ? 'sliding_attention' : 'full_attention'));
    if (!Array.isArray(types) || types.length !== numLayers ||
        !types.every((t) => t === 'sliding_attention' || t === 'full_attention'))
      throw new ConfigError(`gpt_oss config layer_types is ${JSON.stringify(types)}, expected ${numLayers} of ` +
        "'sliding_attention' / 'full_attention'");
    types.forEach((t, i) => { layers[i]!.slidingWindow = t === 'sliding_attention' ? window : null; });
    return {
      moe: { numExperts, intermediate, router, sharedIntermediate, sharedGate, routerBias: true,
        clampedSwiglu: { alpha: 1.702, limit: 7 } },
      layers, denseIntermediate,
    };
  }
  return {
    moe: { numExperts, intermediate, router, sharedIntermediate, sharedGate },
    layers, denseIntermediate,
  };
}

/**
 * LongCat-Flash: every logical layer is shortcut-connected (ScMoE): two MLA + dense-MLP sub-blocks
 * and one MoE over n_routed_experts real and zero_expert_num identity experts, softmax routing with
 * a choice-only correction bias, no renormalisation, routed_scaling_factor.
 */
function longcatMoe(c: Fields, numLayers: number): { moe: MoeSpec; layers: LayerSpec[]; denseIntermediate: number } {
  const numExperts = c.int('n_routed_experts', undefined, 1);
  const zeroExperts = c.int('zero_expert_num', 0, 0);
  const topK = c.intAny(['moe_topk', 'num_experts_per_tok'], undefined, 1);
  if (topK > numExperts + zeroExperts)
    throw new ConfigError(`longcat_flash config moe_topk ${topK} exceeds the ${numExperts + zeroExperts} experts`);
  const router: RouterSpec = {
    scoring: 'softmax', topK, renormalize: false, scale: c.num('routed_scaling_factor', 1), nGroup: 1, topkGroup: 1,
    groupScore: 'max', hasCorrectionBias: true,
  };
  const layers: LayerSpec[] = [];
  for (let i = 0; i < numLayers; i++) layers.push({ ffn: 'moe', shortcut: true });
  return {
    moe: {
      numExperts, intermediate: c.intAny(['expert_ffn_hidden_size', 'moe_intermediate_size'], undefined, 1), router,
      sharedIntermediate: 0, sharedGate: false, zeroExperts, routerBias: c.bool('router_bias', false),
    },
    layers,
    denseIntermediate: c.intAny(['ffn_hidden_size', 'intermediate_size'], undefined, 1),
  };
}

// ---------------------------------------------------------------------------------------------
// Expected checkpoint tensors

export interface ExpectedTensor {
  name: string;
  shape: number[];
  /** The safetensors dtype when only one will do (MXFP4 blocks and scales: U8). */
  dtype?: string;
}

export type ExpertLayout = 'per_expert' | 'fused';

/**
 * Every tensor an HF checkpoint of this spec holds (HF names). `fused`: the transformers 5.x
 * layout, mlp.experts.gate_up_proj [E, 2I, H] (gate rows first) and mlp.experts.down_proj [E, H, I].
 */
export function expectedTensors(spec: ModelSpec, layout: ExpertLayout = 'per_expert'): ExpectedTensor[] {
  const H = spec.hidden;
  const V = spec.vocabSize;
  const out: ExpectedTensor[] = [{ name: 'model.embed_tokens.weight', shape: [V, H] }];
  const add = (name: string, shape: number[]): void => { out.push({ name, shape }); };
  const a = spec.attention;
  const m = spec.moe;
  if (spec.modelType === 'longcat_flash') {
    longcatTensors(spec, layout, add);
    add('model.norm.weight', [H]);
    if (!spec.tieWordEmbeddings) add('lm_head.weight', [V, H]);
    return out;
  }
  for (let i = 0; i < spec.numLayers; i++) {
    const p = `model.layers.${i}.`;
    add(`${p}input_layernorm.weight`, [H]);
    add(`${p}post_attention_layernorm.weight`, [H]);
    const s = `${p}self_attn.`;
    if (spec.layers[i]!.mixer === 'linear_attention') {
      linearAttentionTensors(spec, `${p}linear_attn.`, layout, add);
    } else if (a.kind === 'gqa') {
      const q = a.heads * a.headDim;
      // Qwen3-Next's q_proj also yields the output gate: [heads * 2 headDim, H].
      const qRows = a.outputGate ? 2 * q : q;
      const kv = a.kvHeads * a.headDim;
      add(`${s}q_proj.weight`, [qRows, H]);
      add(`${s}k_proj.weight`, [kv, H]);
      add(`${s}v_proj.weight`, [kv, H]);
      add(`${s}o_proj.weight`, [H, q]);
      if (a.qkvBias) {
        add(`${s}q_proj.bias`, [qRows]);
        add(`${s}k_proj.bias`, [kv]);
        add(`${s}v_proj.bias`, [kv]);
      }
      if (a.oBias) add(`${s}o_proj.bias`, [H]);
      if (a.sinks) add(`${s}sinks`, [a.heads]);
      if (a.qkNorm === 'per_head') {
        add(`${s}q_norm.weight`, [a.headDim]);
        add(`${s}k_norm.weight`, [a.headDim]);
      } else if (a.qkNorm === 'full') {
        add(`${s}q_norm.weight`, [q]);
        add(`${s}k_norm.weight`, [kv]);
      }
    } else {
      mlaTensors(spec, s, add);
    }
    const ffn = (prefix: string, inter: number, names: [string, string, string]): void => {
      add(`${prefix}${names[0]}.weight`, [inter, H]);
      add(`${prefix}${names[1]}.weight`, [inter, H]);
      add(`${prefix}${names[2]}.weight`, [H, inter]);
    };
    const swiglu: [string, string, string] = ['gate_proj', 'up_proj', 'down_proj'];
    if (spec.layers[i]!.ffn === 'dense') {
      ffn(`${p}mlp.`, spec.denseIntermediate, swiglu);
      continue;
    }
    const E = m.numExperts;
    const I = m.intermediate;
    if (spec.modelType === 'gpt_oss') {
      // One layout (hub and transformers 5.x): [E, H, 2I] with gate and up interleaved by column.
      add(`${p}mlp.router.weight`, [E, H]);
      add(`${p}mlp.router.bias`, [E]);
      add(`${p}mlp.experts.gate_up_proj`, [E, H, 2 * I]);
      add(`${p}mlp.experts.gate_up_proj_bias`, [E, 2 * I]);
      add(`${p}mlp.experts.down_proj`, [E, I, H]);
      add(`${p}mlp.experts.down_proj_bias`, [E, H]);
      continue;
    }
    // Mixtral and MiniMax-M2 hub checkpoints: block_sparse_moe.experts.{e}.w1/w3/w2.
    const mixtralOld = (spec.modelType === 'mixtral' || spec.modelType === 'minimax_m2') && layout === 'per_expert';
    const moe = mixtralOld ? `${p}block_sparse_moe.` : `${p}mlp.`;
    add(`${moe}gate.weight`, [E, H]);
    // MiniMax-M2 keeps the correction bias on the block, the others on the router.
    if (m.router.hasCorrectionBias)
      add(spec.modelType === 'minimax_m2' ? `${moe}e_score_correction_bias` : `${moe}gate.e_score_correction_bias`, [E]);
    if (layout === 'fused') {
      add(`${moe}experts.gate_up_proj`, [E, 2 * I, H]);
      add(`${moe}experts.down_proj`, [E, H, I]);
    } else {
      for (let e = 0; e < E; e++)
        ffn(`${moe}experts.${e}.`, I, mixtralOld ? ['w1', 'w3', 'w2'] : swiglu);
    }
    if (m.sharedIntermediate > 0) {
      const shared = singleSharedExpert(spec) ? 'shared_expert' : 'shared_experts';
      ffn(`${moe}${shared}.`, m.sharedIntermediate, swiglu);
    }
    if (m.sharedGate) add(`${moe}shared_expert_gate.weight`, [1, H]);
  }
  add('model.norm.weight', [H]);
  if (!spec.tieWordEmbeddings) add('lm_head.weight', [V, H]);
  // Qwen3.5's multimodal checkpoints keep the text model under model.language_model.
  const wp = spec.weightPrefix;
  if (wp) for (const t of out) if (t.name.startsWith('model.')) t.name = wp + t.name.slice('model.'.length);
  return out;
}

/**
 * A Gated DeltaNet layer's tensors: Qwen3-Next's fused in_proj_qkvz [2 Kd + 2 Vd, H] (grouped per key
 * head) and in_proj_ba [2 Hv, H], or Qwen3.5's in_proj_qkv / in_proj_z / in_proj_b / in_proj_a; whichever
 * the checkpoint has (`layout` 'fused' is the transformers-5 expert layout and says nothing here, so the
 * model family decides: qwen3_next fused, qwen3_5_moe split).
 */
function linearAttentionTensors(spec: ModelSpec, p: string, _layout: ExpertLayout,
                                add: (name: string, shape: number[]) => void): void {
  const la = spec.linearAttention!;
  const H = spec.hidden;
  const Kd = la.keyHeads * la.keyHeadDim;
  const Vd = la.valueHeads * la.valueHeadDim;
  if (spec.modelType === 'qwen3_next') {
    add(`${p}in_proj_qkvz.weight`, [2 * Kd + 2 * Vd, H]);
    add(`${p}in_proj_ba.weight`, [2 * la.valueHeads, H]);
  } else {
    add(`${p}in_proj_qkv.weight`, [2 * Kd + Vd, H]);
    add(`${p}in_proj_z.weight`, [Vd, H]);
    add(`${p}in_proj_b.weight`, [la.valueHeads, H]);
    add(`${p}in_proj_a.weight`, [la.valueHeads, H]);
  }
  add(`${p}conv1d.weight`, [2 * Kd + Vd, 1, la.convKernel]);
  add(`${p}dt_bias`, [la.valueHeads]);
  add(`${p}A_log`, [la.valueHeads]);
  add(`${p}norm.weight`, [la.valueHeadDim]);
  add(`${p}out_proj.weight`, [H, Vd]);
}

/** What validateCheckpoint needs of a checkpoint (Checkpoint from safetensors.ts fits). */
function mlaTensors(spec: ModelSpec, s: string, add: (name: string, shape: number[]) => void): void {
  const H = spec.hidden;
  const a = spec.attention;
  const qk = a.qkNopeHeadDim + a.qkRopeHeadDim;
  if (a.qLoraRank !== null) {
    add(`${s}q_a_proj.weight`, [a.qLoraRank, H]);
    add(`${s}q_a_layernorm.weight`, [a.qLoraRank]);
    add(`${s}q_b_proj.weight`, [a.heads * qk, a.qLoraRank]);
  } else {
    add(`${s}q_proj.weight`, [a.heads * qk, H]);
  }
  add(`${s}kv_a_proj_with_mqa.weight`, [a.kvLoraRank + a.qkRopeHeadDim, H]);
  add(`${s}kv_a_layernorm.weight`, [a.kvLoraRank]);
  add(`${s}kv_b_proj.weight`, [a.heads * (a.qkNopeHeadDim + a.vHeadDim), a.kvLoraRank]);
  add(`${s}o_proj.weight`, [H, a.heads * a.vHeadDim]);
}

function longcatTensors(spec: ModelSpec, layout: ExpertLayout, add: (name: string, shape: number[]) => void): void {
  const H = spec.hidden;
  const m = spec.moe;
  const E = m.numExperts;
  const Z = m.zeroExperts ?? 0;
  const I = m.intermediate;
  const F = spec.denseIntermediate;
  for (let i = 0; i < spec.numLayers; i++) {
    const p = `model.layers.${i}.`;
    for (const j of [0, 1]) {
      add(`${p}input_layernorm.${j}.weight`, [H]);
      add(`${p}post_attention_layernorm.${j}.weight`, [H]);
      mlaTensors(spec, `${p}self_attn.${j}.`, add);
      add(`${p}mlps.${j}.gate_proj.weight`, [F, H]);
      add(`${p}mlps.${j}.up_proj.weight`, [F, H]);
      add(`${p}mlps.${j}.down_proj.weight`, [H, F]);
    }
    add(`${p}mlp.router.classifier.weight`, [E + Z, H]);
    if (m.routerBias) add(`${p}mlp.router.classifier.bias`, [E + Z]);
    add(`${p}mlp.router.e_score_correction_bias`, [E + Z]);
    if (layout === 'fused') {
      add(`${p}mlp.experts.gate_up_proj`, [E + Z, 2 * I, H]);
      add(`${p}mlp.experts.down_proj`, [E, H, I]);
    } else {
      for (let e = 0; e < E; e++) {
        add(`${p}mlp.experts.${e}.gate_proj.weight`, [I, H]);
        add(`${p}mlp.experts.${e}.up_proj.weight`, [I, H]);
        add(`${p}mlp.experts.${e}.down_proj.weight`, [H, I]);
      }
    }
  }
}

/**
 * MXFP4 (gpt-oss): the experts' gate_up_proj [E, H, 2I] and down_proj [E, I, H] are stored as
 * `*_blocks` [E, rows, k/32, 16] U8 (rows = the output side: 2I interleaved gate/up rows, or H) and
 * `*_scales` [E, rows, k/32] U8 (e8m0). A layer without blocks keeps its bf16 experts
 * (modules_to_not_convert). MXFP4 anywhere else, or without the config's quantization_config, is refused.
 */
function mxfp4Expected(spec: ModelSpec, ckpt: TensorShapes, expected: ExpectedTensor[]): ExpectedTensor[] {
  const mx = spec.quantization?.method === 'mxfp4';
  const stray: string[] = [];
  for (const name of ckpt.tensors.keys()) {
    if (!name.endsWith('_blocks') && !(name.endsWith('_scales') && ckpt.tensors.has(`${name.slice(0, -7)}_blocks`)))
      continue;
    if (!mx) {
      throw new CheckpointMismatchError(`this ${spec.modelType} checkpoint stores ${name} (MXFP4 blocks / scales) ` +
        'but config.json has no quantization_config with quant_method "mxfp4"; add it, or use a bf16 copy of the checkpoint', [], []);
    }
    if (!/\.mlp\.experts\.(gate_up|down)_proj_(blocks|scales)$/.test(name)) stray.push(name);
  }
  if (stray.length) {
    throw new CheckpointMismatchError(`this ${spec.modelType} checkpoint has MXFP4 tensors outside the experts ` +
      `(${stray.slice(0, 5).join(', ')}${stray.length > 5 ? ', ...' : ''}); expertd reads MXFP4 only for ` +
      'mlp.experts.gate_up_proj and down_proj (gpt-oss\'s layout)', [], []);
  }
  if (!mx) return expected;
  const E = spec.moe.numExperts;
  const out: ExpectedTensor[] = [];
  for (const t of expected) {
    if (!/\.experts\.(gate_up|down)_proj$/.test(t.name) || !ckpt.tensors.has(`${t.name}_blocks`)) {
      out.push(t);
      continue;
    }
    // HF shape [E, k, rows] (x @ W); the blocks are stored by output row.
    const [, k, rows] = t.shape as [number, number, number];
    const blocks = ckpt.tensors.get(`${t.name}_blocks`)!.shape;
    if (blocks.length === 4 && blocks[3] !== 16) {
      throw new CheckpointMismatchError(`${t.name}_blocks has shape [${blocks.join(', ')}]: blocks of ` +
        `${2 * blocks[3]!} values; expertd reads MXFP4 blocks of 32 values (16 bytes, the OCP MX format gpt-oss uses)`,
      [], [`${t.name}_blocks`]);
    }
    if (k % 32) {
      throw new CheckpointMismatchError(`${t.name} is MXFP4 with k ${k}, which is not a multiple of 32 (the MXFP4 block); ` +
        'expertd cannot read it', [], [`${t.name}_blocks`]);
    }
    out.push({ name: `${t.name}_blocks`, shape: [E, rows, k / 32, 16], dtype: 'U8' });
    out.push({ name: `${t.name}_scales`, shape: [E, rows, k / 32], dtype: 'U8' });
  }
  return out;
}

export interface TensorShapes {
  tensors: Map<string, { shape: number[]; dtype: string }>;
}

export interface CheckpointReport {
  layout: ExpertLayout;
  /** Tensors the architecture does not use (e.g. MTP layers, rotary caches): loaded never. */
  warnings: string[];
}

export class CheckpointMismatchError extends Error {
  readonly code = 'E_CHECKPOINT';
  constructor(message: string, readonly missing: string[], readonly shapeErrors: string[]) {
    super(message);
    this.name = 'CheckpointMismatchError';
  }
}

/**
 * Checks a checkpoint against the spec: throws naming every missing tensor and every shape that
 * disagrees with the config (both shapes); returns warnings for tensors it does not expect.
 */
export function validateCheckpoint(spec: ModelSpec, ckpt: TensorShapes): CheckpointReport {
  let fused = false;
  for (const name of ckpt.tensors.keys()) if (name.endsWith('.experts.gate_up_proj')) fused = true;
  const layout: ExpertLayout = fused ? 'fused' : 'per_expert';
  const expected = mxfp4Expected(spec, ckpt, expectedTensors(spec, layout));
  const expectedNames = new Set(expected.map((t) => t.name));
  const missing: string[] = [];
  const shapeErrors: string[] = [];
  const ct = spec.quantization?.method === 'compressed-tensors';
  const gptq = spec.quantization?.method === 'gptq' ? spec.quantization : null;
  // An F8_E4M3 weight's scales: X.weight + this.
  const scaleSuffix = spec.quantization?.method === 'fp8' ? fp8ScaleSuffix(spec.quantization) : '_scale_inv';
  for (const t of expected) {
    const got = ckpt.tensors.get(t.name);
    // compressed-tensors pack-quantized: X.weight_packed [rows, words] with X.weight_shape and X.weight_scale.
    if (!got && ct && ckpt.tensors.has(`${t.name}_packed`)) {
      const packed = ckpt.tensors.get(`${t.name}_packed`)!;
      if (packed.dtype !== 'I32' || packed.shape.length !== 2 || packed.shape[0] !== t.shape[0])
        shapeErrors.push(`${t.name}_packed is ${packed.dtype} [${packed.shape.join(', ')}], the config implies I32 [${t.shape[0]}, words]`);
      for (const part of ['_scale', '_shape']) if (!ckpt.tensors.has(`${t.name}${part}`)) missing.push(`${t.name}${part}`);
      continue;
    }
    // GPTQ: X.qweight [in / per-word, out] I32 with X.qzeros and X.scales (X.g_idx optional); AWQ: X.qweight
    // [in, out / 8], the same companions.
    const base = t.name.replace(/\.weight$/, '');
    if (!got && gptq && ckpt.tensors.has(`${base}.qweight`)) {
      const qw = ckpt.tensors.get(`${base}.qweight`)!;
      const [rows, cols] = gptqShape(gptq, qw.shape);
      if (qw.dtype !== 'I32' || qw.shape.length !== 2 || rows !== t.shape[0] || cols !== t.shape[1])
        shapeErrors.push(`${base}.qweight is ${qw.dtype} [${qw.shape.join(', ')}], the config implies ` +
          gptqLayoutNote(gptq, t.shape[0] ?? 0, t.shape[1] ?? 0));
      for (const part of ['qzeros', 'scales']) if (!ckpt.tensors.has(`${base}.${part}`)) missing.push(`${base}.${part}`);
      continue;
    }
    if (!got) {
      missing.push(t.name);
      continue;
    }
    if (ct && got.dtype === 'I8' && !ckpt.tensors.has(`${t.name}_scale`)) missing.push(`${t.name}_scale`);
    if (got.shape.length !== t.shape.length || got.shape.some((d, k) => d !== t.shape[k]))
      shapeErrors.push(`${t.name} has shape [${got.shape.join(', ')}], the config implies [${t.shape.join(', ')}]`);
    if (spec.quantization && got.dtype === 'F8_E4M3' && !ckpt.tensors.has(t.name + scaleSuffix)) missing.push(t.name + scaleSuffix);
    if (t.dtype && got.dtype !== t.dtype)
      shapeErrors.push(`${t.name} has dtype ${got.dtype}, MXFP4 ${t.name.endsWith('_blocks') ? 'blocks' : 'scales'} are ${t.dtype}`);
  }
  const warnings: string[] = [];
  // Multi-token-prediction layers (GLM-4.5 and DeepSeek-V3 num_nextn_predict_layers) are stored as
  // model.layers.{L + i}.*: not part of the decoder, loaded never, one warning for all of them.
  const mtp = new Set<number>();
  let mtpTensors = 0;
  // Qwen3-Next / Qwen3.5 keep their MTP head as mtp.* and Qwen3.5 its vision tower as model.visual.*:
  // not part of the text decoder (transformers ignores them too), one warning per group.
  const ignoredGroups = new Map<string, number>();
  let inputScales = 0;
  for (const name of ckpt.tensors.keys()) {
    if (expectedNames.has(name)) continue;
    const group = /^(mtp\.|model\.visual\.)/.exec(name);
    if (group && (spec.modelType === 'qwen3_next' || spec.modelType === 'qwen3_5_moe')) {
      ignoredGroups.set(group[1]!, (ignoredGroups.get(group[1]!) ?? 0) + 1);
      continue;
    }
    const layer = /^model\.layers\.(\d+)\./.exec(name);
    if (layer && Number(layer[1]) >= spec.numLayers && spec.modelType !== 'longcat_flash') {
      mtp.add(Number(layer[1]));
      mtpTensors++;
      continue;
    }
    if (spec.quantization && name.endsWith(scaleSuffix) && expectedNames.has(name.slice(0, -scaleSuffix.length)))
      continue;
    const ctPart = /_(packed|scale|shape|zero_point|g_idx)$/.exec(name);
    if (ct && ctPart && expectedNames.has(name.slice(0, -ctPart[0].length))) continue;
    const gptqPart = /\.(qweight|qzeros|scales|g_idx)$/.exec(name);
    if (gptq && gptqPart && expectedNames.has(`${name.slice(0, -gptqPart[0].length)}.weight`)) continue;
    // Calibrated activation scales (activation_scheme static; X.input_scale beside X.weight): not used.
    const input = /\.input_(scale|zero_point)$/.exec(name);
    if (spec.quantization && input && expectedNames.has(`${name.slice(0, -input[0].length)}.weight`)) {
      inputScales++;
      continue;
    }
    warnings.push(`unexpected tensor ${name} (not used by ${spec.modelType})`);
  }
  if (inputScales)
    warnings.push(`${inputScales} input_scale tensor(s) (calibrated activation scales) are not used: activations stay ` +
      'bf16 / f32 (the int8 fast mode quantizes them itself, dynamically)');
  for (const [group, n] of ignoredGroups)
    warnings.push(`${n} tensor(s) under ${group}* (${group === 'mtp.' ? 'multi-token prediction' : 'the vision tower'}) ` +
      'are not used');
  if (mtp.size) {
    warnings.push(`${mtpTensors} tensor(s) of layer(s) ${[...mtp].sort((a, b) => a - b).join(', ')} beyond ` +
      `num_hidden_layers ${spec.numLayers} (multi-token-prediction layers) are not used`);
  }
  if (missing.length || shapeErrors.length) {
    const parts: string[] = [];
    if (missing.length) {
      const shown = missing.slice(0, 20).join(', ');
      parts.push(`${missing.length} missing tensor(s): ${shown}${missing.length > 20 ? ', ...' : ''}`);
    }
    if (shapeErrors.length) parts.push(`shape mismatch: ${shapeErrors.slice(0, 20).join('; ')}`);
    // Quantized tensors the config does not declare: say which quantization they look like.
    const hint = missing.find((n) => ckpt.tensors.has(n.replace(/\.weight$/, '.qweight')));
    if (hint && !gptq)
      parts.push(`${hint.replace(/\.weight$/, '.qweight')} is present: a GPTQ or AWQ checkpoint, but config.json has no quantization_config ` +
        'with quant_method "gptq" or "awq" (nor is there a quantize_config.json beside it)');
    const packed = missing.find((n) => ckpt.tensors.has(`${n}_packed`));
    if (packed && !ct)
      parts.push(`${packed}_packed is present: a compressed-tensors checkpoint, but config.json has no quantization_config ` +
        'with quant_method "compressed-tensors"');
    throw new CheckpointMismatchError(`checkpoint does not match the ${spec.modelType} config: ${parts.join('. ')}`,
      missing, shapeErrors);
  }
  return { layout, warnings };
}
