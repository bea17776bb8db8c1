// ModelSpec: everything the engine needs to know about an architecture, normalised from an HF
// config.json (transformers 4.x and 5.x spellings). The forward pass reads only this, never the
// raw config.
import type { CompressedTensorsConfig } from './compressed-tensors.js';
import type { GptqConfig } from './gptq.js';

export type ModelType =
  | 'mixtral' | 'qwen2_moe' | 'qwen3_moe' | 'olmoe' | 'deepseek_v2' | 'deepseek_v3' | 'longcat_flash'
  | 'glm4_moe' | 'minimax_m2' | 'gpt_oss' | 'qwen3_next' | 'qwen3_5_moe';

export interface RopeSpec {
  /** [rotaryDim / 2] inverse frequencies (already scaled for YaRN, linear, llama3, ...). */
  invFreq: Float32Array;
  /** Multiplier applied to cos/sin (YaRN attention factor); 1 otherwise. */
  attnScale: number;
  /** Rotated dims per head (<= head dim); partial rotary when smaller. */
  rotaryDim: number;
  /** Pairs (2i, 2i+1) instead of (i, i + d/2). */
  interleaved: boolean;
}

export interface AttentionSpec {
  kind: 'gqa' | 'mla';
  heads: number;
  kvHeads: number;          // gqa; 1 for mla (the latent)
  headDim: number;          // gqa: q/k/v head dim
  qkvBias: boolean;         // qwen2_moe
  oBias: boolean;
  /** Per-head RMSNorm of q and k over headDim (qwen3_moe, glm4_moe use_qk_norm). */
  qkNorm: 'none' | 'per_head' | 'full';   // 'full': over the whole projection (olmoe, minimax_m2)
  clipQkv: number | null;   // olmoe
  slidingWindow: number | null;
  softmaxScale: number;
  // MLA (deepseek): dims
  qLoraRank: number | null;
  kvLoraRank: number;
  qkNopeHeadDim: number;
  qkRopeHeadDim: number;
  vHeadDim: number;
  /** gpt-oss: a learned logit per query head (self_attn.sinks) in the softmax denominator. */
  sinks?: boolean;
  /**
   * Qwen3-Next: q_proj yields, per head, headDim query values then headDim gate values; the
   * attention output is multiplied by sigmoid(gate) before o_proj.
   */
  outputGate?: boolean;
  /** LongCat-Flash MLA: q (after q_b_proj) and the normalised latent are scaled by these. */
  qScale?: number;
  kvScale?: number;
  rope: RopeSpec;
}

export interface RouterSpec {
  scoring: 'softmax' | 'sigmoid';
  topK: number;
  renormalize: boolean;
  scale: number;                 // routed_scaling_factor (1 when absent)
  nGroup: number;                // 1 = no group limit
  topkGroup: number;
  groupScore: 'max' | 'top2sum';
  /** e_score_correction_bias present (deepseek_v3, glm4_moe, minimax_m2). */
  hasCorrectionBias: boolean;
}

export interface MoeSpec {
  numExperts: number;
  intermediate: number;          // per routed expert
  router: RouterSpec;
  /** Shared experts fused into one FFN of this intermediate size (0 = none). */
  sharedIntermediate: number;
  /** qwen2_moe: sigmoid(shared_expert_gate(x)) scales the shared expert output. */
  sharedGate: boolean;
  /**
   * Zero-computation (identity) experts after the numExperts real ones (LongCat-Flash): the router
   * scores numExperts + zeroExperts; choosing one adds weight * x.
   */
  zeroExperts?: number;
  /** The router Linear has a bias (LongCat-Flash router_bias, gpt-oss). */
  routerBias?: boolean;
  /**
   * gpt-oss experts: gate_up and down projections with biases, and the clamped SwiGLU
   * h = (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g) with g = min(gate, limit).
   * Absent: SiLU(gate) * up without biases.
   */
  clampedSwiglu?: { alpha: number; limit: number };
}

/**
 * Gated DeltaNet linear attention (Qwen3-Next, Qwen3.5): q/k/v from one projection through a
 * causal depthwise conv (kernel convKernel, SiLU), the gated delta rule over a per-sequence state
 * [valueHeads, keyHeadDim, valueHeadDim], a gated RMSNorm (weight, not 1 + weight) and out_proj.
 */
export interface LinearAttentionSpec {
  keyHeads: number;
  valueHeads: number;
  keyHeadDim: number;
  valueHeadDim: number;
  convKernel: number;
}

export interface LayerSpec {
  /**
   * The token mixer: 'linear_attention' (Gated DeltaNet, per-sequence state) or full attention
   * (absent = 'attention').
   */
  mixer?: 'attention' | 'linear_attention';
  /** 'moe' layers use the MoE block, 'dense' a plain gated FFN of denseIntermediate. */
  ffn: 'moe' | 'dense';
  /**
   * Shortcut-connected (ScMoE / LongCat-Flash) layer: two attention + dense-FFN sub-blocks, and one
   * MoE that reads the first sub-block's normalised output and is added at the end of the layer.
   */
  shortcut?: boolean;
  /**
   * This layer's attention window when it differs from attention.slidingWindow (gpt-oss
   * layer_types: 'sliding_attention' layers get sliding_window, 'full_attention' layers null).
   */
  slidingWindow?: number | null;
}

/**
 * An FP8 e4m3 checkpoint's scales: each weight's `<name><scaleSuffix>` (quant_method "fp8":
 * weight_scale_inv, DeepSeek's name; compressed-tensors: weight_scale; both multiply the codes) on a
 * grid of blockSize [rows, cols] blocks. Per-channel and per-tensor scales are held on a [1, 128] grid
 * (compressed-tensors.ts FP8_ROW_GRID).
 */
export interface Fp8Quantization {
  method: 'fp8';
  blockSize: [number, number];
  /** Absent: '_scale_inv'. */
  scaleSuffix?: '_scale_inv' | '_scale';
  /**
   * activation_scheme "static" (input_activations dynamic false): the checkpoint's calibrated `X.input_scale`
   * tensors are not used (expertd computes with unquantized activations); absent: dynamic.
   */
  staticInputScales?: true;
}

/** What follows an FP8 weight's name in its scale tensor's: '_scale_inv' (the default) or '_scale'. */
export function fp8ScaleSuffix(q: Fp8Quantization): '_scale_inv' | '_scale' {
  return q.scaleSuffix ?? '_scale_inv';
}

/** The scale tensor of an FP8 weight `name` (X.weight -> X.weight_scale_inv or X.weight_scale). */
export function fp8ScaleName(q: Fp8Quantization, name: string): string {
  return `${name}${fp8ScaleSuffix(q)}`;
}

export interface ModelSpec {
  modelType: ModelType;
  hidden: number;
  vocabSize: number;
  numLayers: number;
  rmsNormEps: number;
  maxContext: number;
  tieWordEmbeddings: boolean;
  denseIntermediate: number;
  attention: AttentionSpec;
  moe: MoeSpec;
  layers: LayerSpec[];
  /** Hybrid models (Qwen3-Next): the linear-attention layers' dims (layers[i].mixer says which). */
  linearAttention?: LinearAttentionSpec;
  /**
   * RMSNorm weights are zero-centred (Qwen3-Next: x * (1 + w)); the model adds 1 at load. The gated
   * norm of the linear-attention layers is not (x * w).
   */
  zeroCentredNorms?: boolean;
  /**
   * Where the decoder's tensors live: 'model.' (default) or 'model.language_model.' (Qwen3.5's
   * multimodal checkpoints, whose text model is what expertd serves).
   */
  weightPrefix?: string;
  /** Checkpoint tensor-name prefix conventions, e.g. 'model.layers.{i}.' */
  bosTokenId: number | null;
  eosTokenIds: number[];
  /**
   * FP8 checkpoint (DeepSeek-V3's block scales, or compressed-tensors float-quantized per channel, per
   * tensor or in blocks): on the CPU engine every FP8 Linear kept in FP8 (MLA's absorbed kv_b_proj
   * dequantised); on the device the routed experts FP8, the rest dequantised to bf16 at load. MXFP4 (gpt-oss): experts kept in MXFP4 (CPU engine).
   * compressed-tensors int8 / int4: every quantized Linear kept as int8 / int4 codes and scales.
   */
  quantization: Fp8Quantization | { method: 'mxfp4'; modulesToNotConvert: string[] } | CompressedTensorsConfig | GptqConfig | null;
  /**
   * Some layers keep per-sequence recurrent state instead of KV blocks (hybrid linear attention):
   * the engine turns prefix caching off for such a model (with a log line), since cached KV blocks
   * cannot restore that state. Absent = false.
   */
  recurrentState?: boolean;
  /** Original config for logging. */
  raw: Record<string, unknown>;
}

/** A checkpoint that stores Linear weights as int8 / int4 codes and scales. */
export type IntCodeQuantization = CompressedTensorsConfig | GptqConfig;

/** The checkpoint's int-code scheme (compressed-tensors int8 / int4, GPTQ), or null for any other. */
export function intCodeQuant(q: ModelSpec['quantization']): IntCodeQuantization | null {
  return q?.method === 'compressed-tensors' || q?.method === 'gptq' ? q : null;
}

/** How messages name an int-code checkpoint's method. */
export function intCodeMethodName(q: IntCodeQuantization): string {
  return q.method === 'gptq' ? (q.packing === 'awq' ? 'AWQ' : 'GPTQ') : 'compressed-tensors';
}
