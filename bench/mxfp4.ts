// `npm run bench -- mxfp4`: an MXFP4 checkpoint against the same model in bf16. A gpt-oss-like bench
// checkpoint (MXFP4 is a gpt-oss format: expertd reads it for gpt_oss only) is written twice from one
// set of random experts: MXFP4 (the official layout) and bf16 holding the exact dequantised values.
// Reported: each load's resident memory (a child process per load: RssAnon is the model's own copy,
// RssFile the mapped checkpoint pages), the experts' held bytes, and decode batch 1 tokens/s against
// each format's weights-read bound, round-robin over the two in one process.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';

import { loadModel } from '../src/model/load.js';
import { writeSafetensors, type TensorToWrite } from '../src/model/safetensors.js';
import { loadNative } from '../src/native/index.js';
import { benchModelsRoot } from './bench-models.js';
import { expertBytes, measureLoadMemory, type LoadMemory } from './load-memory.js';
import { DecodeBytes, KV_NOTE, Runner, argmaxRows, promptIds } from './e2e.js';
import { fmt, markdownTable, median, parsePositiveInt, pct, runInfo, writeJson, type Cell } from './harness.js';
import { runProbe } from './probe/probe.js';

const VERSION = 1;
const H = 1024, I = 2816, E = 8, K = 2, L = 4, V = 32000, HEADS = 16, KV = 4, HD = 64;
const STD = 0.02;

function config(mxfp4: boolean): Record<string, unknown> {
  return {
    architectures: ['GptOssForCausalLM'], model_type: 'gpt_oss', attention_bias: true, head_dim: HD, hidden_act: 'silu',
    hidden_size: H, intermediate_size: I, layer_types: Array.from({ length: L }, (_, i) => (i % 2 ? 'full_attention' : 'sliding_attention')),
    max_position_embeddings: 4096, num_attention_heads: HEADS, num_experts_per_tok: K, num_hidden_layers: L,
    num_key_value_heads: KV, num_local_experts: E, rms_norm_eps: 1e-5, sliding_window: 128, tie_word_embeddings: false,
    vocab_size: V, bos_token_id: 1, eos_token_id: 2,
    rope_parameters: { rope_type: 'yarn', rope_theta: 150000, factor: 32, beta_fast: 32, beta_slow: 1, original_max_position_embeddings: 4096, truncate: false },
    ...(mxfp4 ? { quantization_config: { quant_method: 'mxfp4', modules_to_not_convert: ['model.layers.*.self_attn', 'model.layers.*.mlp.router', 'model.embed_tokens', 'lm_head'] } } : {}),
  };
}

/** xorshift32 uniforms in [-1, 1). */
class Rng {
  private s: number;
  constructor(seed: number) { this.s = seed >>> 0 || 1; }
  next(): number {
    let a = this.s;
    a ^= a << 13; a ^= a >>> 17; a ^= a << 5;
    this.s = a >>> 0;
    return this.s / 2 ** 31 - 1;
  }
}

const f32 = new Float32Array(1), u32 = new Uint32Array(f32.buffer);
function bf16(v: number): number {
  f32[0] = v;
  const u = u32[0]!;
  return ((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) & 0xffff;
}

function randomBf16(rng: Rng, name: string, shape: number[], scale: number, offset = 0): TensorToWrite {
  const n = shape.reduce((a, b) => a * b, 1);
  const d = new Uint16Array(n);
  for (let i = 0; i < n; i++) d[i] = bf16(offset + scale * rng.next());
  return { name, dtype: 'BF16', shape, data: d };
}

const E2M1 = [0, 0.5, 1, 1.5, 2, 3, 4, 6];

/**
 * Random rows [rows, k] quantized to MXFP4 per 32 values (scale: the smallest power of two putting
 * max|x| at or under 6; nearest e2m1): blocks and scales, and the dequantised value of (row, col) via
 * put(row, col, value) for the bf16 copy.
 */
function mxfp4Rows(rng: Rng, rows: number, k: number, put: (r: number, c: number, v: number) => void) {
  const blocks = new Uint8Array(rows * k / 2), scales = new Uint8Array(rows * k / 32);
  const x = new Float32Array(32);
  for (let r = 0; r < rows; r++) {
    for (let g = 0; g < k / 32; g++) {
      let amax = 0;
      for (let j = 0; j < 32; j++) { x[j] = STD * Math.sqrt(3) * rng.next(); amax = Math.max(amax, Math.abs(x[j]!)); }
      const e = amax > 0 ? Math.max(-127, Math.ceil(Math.log2(amax / 6))) : -127;
      const s = 2 ** e;
      scales[r * (k / 32) + g] = e + 127;
      for (let j = 0; j < 32; j++) {
        const q = Math.abs(x[j]!) / s;
        let best = 0;
        for (let c = 1; c < 8; c++) if (Math.abs(E2M1[c]! - q) < Math.abs(E2M1[best]! - q)) best = c;
        const code = best | (x[j]! < 0 ? 8 : 0);
        const bi = (r * (k / 32) + g) * 16 + (j >> 1);
        blocks[bi] = j & 1 ? blocks[bi]! | (code << 4) : code;
        put(r, g * 32 + j, (x[j]! < 0 ? -1 : 1) * E2M1[best]! * s);
      }
    }
  }
  return { blocks, scales };
}

export function benchDirs(): { bf16: string; mxfp4: string } {
  const root = path.join(benchModelsRoot(), `gptoss-like-v${VERSION}`);
  return { bf16: path.join(root, 'bf16'), mxfp4: path.join(root, 'mxfp4') };
}

/** Writes both checkpoints on first use (one layer in memory at a time). */
function ensureCheckpoints(log: (s: string) => void): { bf16: string; mxfp4: string } {
  const dirs = benchDirs();
  if (fs.existsSync(path.join(dirs.mxfp4, 'model.safetensors.index.json')) && fs.existsSync(path.join(dirs.bf16, 'model.safetensors.index.json')))
    return dirs;
  const root = path.dirname(dirs.bf16);
  const tmp = `${root}.tmp-${process.pid}`;
  fs.rmSync(tmp, { recursive: true, force: true });
  const out = { bf16: path.join(tmp, 'bf16'), mxfp4: path.join(tmp, 'mxfp4') };
  const maps = { bf16: {} as Record<string, string>, mxfp4: {} as Record<string, string> };
  for (const k of ['bf16', 'mxfp4'] as const) {
    fs.mkdirSync(out[k], { recursive: true });
    fs.writeFileSync(path.join(out[k], 'config.json'), JSON.stringify(config(k === 'mxfp4'), null, 2));
  }
  const rng = new Rng(20261202);
  const write = (file: string, common: TensorToWrite[], b: TensorToWrite[], m: TensorToWrite[]) => {
    for (const [k, ts] of [['bf16', [...common, ...b]], ['mxfp4', [...common, ...m]]] as ['bf16' | 'mxfp4', TensorToWrite[]][]) {
      writeSafetensors(path.join(out[k], file), ts);
      for (const t of ts) maps[k][t.name] = file;
    }
  };
  for (let l = 0; l < L; l++) {
    log(`# gptoss-like: writing layer ${l + 1}/${L}`);
    const p = `model.layers.${l}.`;
    const common: TensorToWrite[] = [
      randomBf16(rng, `${p}input_layernorm.weight`, [H], 0.1, 1), randomBf16(rng, `${p}post_attention_layernorm.weight`, [H], 0.1, 1),
      randomBf16(rng, `${p}self_attn.q_proj.weight`, [HEADS * HD, H], STD), randomBf16(rng, `${p}self_attn.q_proj.bias`, [HEADS * HD], STD),
      randomBf16(rng, `${p}self_attn.k_proj.weight`, [KV * HD, H], STD), randomBf16(rng, `${p}self_attn.k_proj.bias`, [KV * HD], STD),
      randomBf16(rng, `${p}self_attn.v_proj.weight`, [KV * HD, H], STD), randomBf16(rng, `${p}self_attn.v_proj.bias`, [KV * HD], STD),
      randomBf16(rng, `${p}self_attn.o_proj.weight`, [H, HEADS * HD], STD), randomBf16(rng, `${p}self_attn.o_proj.bias`, [H], STD),
      randomBf16(rng, `${p}self_attn.sinks`, [HEADS], 1),
      randomBf16(rng, `${p}mlp.router.weight`, [E, H], STD), randomBf16(rng, `${p}mlp.router.bias`, [E], STD),
      randomBf16(rng, `${p}mlp.experts.gate_up_proj_bias`, [E, 2 * I], STD), randomBf16(rng, `${p}mlp.experts.down_proj_bias`, [E, H], STD),
    ];
    const gu = new Uint16Array(E * H * 2 * I), dn = new Uint16Array(E * I * H);
    // gate_up rows r of expert e (output side) are columns of [E, H, 2I]; down rows h are columns of [E, I, H].
    const g = mxfp4Rows(rng, E * 2 * I, H, (row, c, v) => { const e = Math.floor(row / (2 * I)); gu[(e * H + c) * 2 * I + (row % (2 * I))] = bf16(v); });
    const d = mxfp4Rows(rng, E * H, I, (row, c, v) => { const e = Math.floor(row / H); dn[(e * I + c) * H + (row % H)] = bf16(v); });
    write(`layer-${l}.safetensors`, common,
      [{ name: `${p}mlp.experts.gate_up_proj`, dtype: 'BF16', shape: [E, H, 2 * I], data: gu },
        { name: `${p}mlp.experts.down_proj`, dtype: 'BF16', shape: [E, I, H], data: dn }],
      [{ name: `${p}mlp.experts.gate_up_proj_blocks`, dtype: 'U8', shape: [E, 2 * I, H / 32, 16], data: g.blocks },
        { name: `${p}mlp.experts.gate_up_proj_scales`, dtype: 'U8', shape: [E, 2 * I, H / 32], data: g.scales },
        { name: `${p}mlp.experts.down_proj_blocks`, dtype: 'U8', shape: [E, H, I / 32, 16], data: d.blocks },
        { name: `${p}mlp.experts.down_proj_scales`, dtype: 'U8', shape: [E, H, I / 32], data: d.scales }]);
  }
  write('rest.safetensors', [randomBf16(rng, 'model.embed_tokens.weight', [V, H], STD), randomBf16(rng, 'model.norm.weight', [H], 0.1, 1),
    randomBf16(rng, 'lm_head.weight', [V, H], STD)], [], []);
  for (const k of ['bf16', 'mxfp4'] as const)
    fs.writeFileSync(path.join(out[k], 'model.safetensors.index.json'), JSON.stringify({ metadata: {}, weight_map: maps[k] }));
  fs.rmSync(root, { recursive: true, force: true });
  fs.renameSync(tmp, root);
  return dirs;
}

interface Side { name: string; dir: string; rss: LoadMemory[]; tokPerS: number[]; bytesPerStep: number[]; tokens: number[] }

export async function runMxfp4Bench(argv: string[]): Promise<void> {
  const { values } = parseArgs({ args: argv, options: { json: { type: 'string' }, reps: { type: 'string' }, steps: { type: 'string' }, threads: { type: 'string' } }, strict: true });
  const reps = Math.max(1, parsePositiveInt('reps', values.reps, 3));
  const steps = Math.max(1, parsePositiveInt('steps', values.steps, 16));
  const threads = parsePositiveInt('threads', values.threads, 0);
  loadNative().setNumThreads(threads);
  const dirs = ensureCheckpoints((s) => console.error(s));
  const sides: Side[] = (['bf16', 'mxfp4'] as const).map((name) => ({ name, dir: dirs[name], rss: [], tokPerS: [], bytesPerStep: [], tokens: [] }));
  for (let r = 0; r < reps; r++) for (const s of sides) s.rss.push(measureLoadMemory(s.dir, null));
  const loadAvg: number[] = [];
  const models = sides.map((s) => loadModel(s.dir, { fast: true }));
  try {
    const runners = models.map((m) => new Runner(m.model, 64));
    const bytes = models.map((m, i) => { const b = new DecodeBytes(m.spec, runners[i]!.kvDtype); b.expertBytes = expertBytes(m.model).one; return b; });
    const bw: number[] = [runProbe({ threads: threads || undefined }).readBandwidthGBps];
    for (let r = 0; r < reps + 1; r++) {
      loadAvg.push(os.loadavg()[0]!);
      sides.forEach((s, i) => {
        const runner = runners[i]!;
        runner.reset();
        const seq = runner.newSeq();
        let next = argmaxRows(runner.step([seq], [promptIds(7, 64)]).logits, 1, V);
        let ms = 0, b = 0;
        const toks: number[] = [];
        for (let k = 0; k < steps; k++) {
          const t0 = performance.now();
          const res = runner.step([seq], [next]);
          next = argmaxRows(res.logits, 1, V);
          ms += performance.now() - t0;
          toks.push(next[0]!);
          b += bytes[i]!.step(res.routedIds, [seq.len], 1).bytes;
        }
        console.error(`# ${s.name}: decode b1 ${fmt(steps / (ms / 1e3))} tok/s${r === 0 ? ' (warm-up)' : ''}`);
        if (r === 0) return;
        s.tokPerS.push(steps / (ms / 1e3));
        s.bytesPerStep.push(b / steps);
        s.tokens = toks;
      });
      bw.push(runProbe({ threads: threads || undefined }).readBandwidthGBps);
    }
    const bandwidth = Math.max(...bw);
    const rows: Cell[][] = [];
    const base = sides[0]!;
    for (const s of sides) {
      const anon = s.rss.map((x) => (x.after.RssAnon! - x.before.RssAnon!) / 1024);
      const file = s.rss.map((x) => (x.after.RssFile! - x.before.RssFile!) / 1024);
      const tps = median(s.tokPerS), bound = 1 / (median(s.bytesPerStep) / (bandwidth * 1e9));
      rows.push([s.name, fmt(s.rss[0]!.expertsHeldBytes / 2 ** 20), fmt(median(anon)), fmt(median(file)), tps,
        `${fmt(Math.min(...s.tokPerS))}-${fmt(Math.max(...s.tokPerS))}`, bound, pct(tps / bound),
        s === base ? '-' : `${fmt(tps / median(base.tokPerS))}x`]);
    }
    console.log(`## mxfp4: gpt-oss-like (H ${H}, I ${I}, E ${E} top-${K}, L ${L}, V ${V}), fast mode, ${KV_NOTE}, ${os.cpus()[0]?.model ?? 'cpu'}, ${threads || os.availableParallelism()} threads\n`);
    console.log(`Load memory: a child process per load, ${reps} each, median (RssAnon = the model's own memory; RssFile = mapped checkpoint pages). ` +
      `Decode: batch 1, a 64-token prompt then ${steps} greedy steps, ${reps} reps after a warm-up, round-robin; the bound is the bytes each step ` +
      `reads in that format over the best read-bandwidth probe (${fmt(bandwidth)} GB/s). 1-min load average ${fmt(Math.min(...loadAvg))}-${fmt(Math.max(...loadAvg))}. ` +
      `Greedy tokens ${JSON.stringify(sides[0]!.tokens) === JSON.stringify(sides[1]!.tokens) ? 'agree' : 'differ'} between the two.\n`);
    console.log(markdownTable(['experts', 'held MiB', 'RssAnon MiB', 'RssFile MiB', 'decode b1 tok/s', 'min-max', 'bound tok/s', 'of bound', 'vs bf16'],
      rows, ['left', 'right', 'right', 'right', 'right', 'right', 'right', 'right', 'right']));
    if (values.json) writeJson(values.json, { bench: 'mxfp4', run: runInfo(), loadAverage: loadAvg, bandwidthGBps: bandwidth, sides });
  } finally {
    for (const m of models) m.model.dispose();
  }
}

