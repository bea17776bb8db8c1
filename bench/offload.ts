// `npm run bench -- offload`: the expert cache (MoE-Infinity) measured three ways.
//  1. Replay of synthetic traces with known structure (prompt families sharing expert sets) at
//     10/25/50/75% capacity under eam, eam+prefetch, lru, lfu and Belady's offline optimum.
//  2. Replay of traces recorded from real generation (the demo model and the mixtral fixture).
//  3. Live decode tok/s with the real I/O tier (pread of the checkpoint) at 25/50/100% capacity
//     against the fully resident model, and, labelled SIMULATED, behind a host-to-GPU link model;
//     loads on the native copy thread (prefetch overlaps compute) and on the engine thread.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';

import { ensureDemoModel } from '../src/model/demo.js';
import { loadModel, type LoadedModel } from '../src/model/load.js';
import { writeSafetensors, type TensorToWrite } from '../src/model/safetensors.js';
import { loadNative } from '../src/native/index.js';
import { replay, type ReplayPolicy, type ReplayResult } from '../src/offload/replay.js';
import { attachOffloader, skipAllExperts, type OffloadConfig } from '../src/offload/setup.js';
import type { Offloader } from '../src/offload/offloader.js';
import { syntheticTrace, DEFAULT_SYNTHETIC } from '../src/offload/synthetic-trace.js';
import { readTrace, type Trace } from '../src/offload/trace-file.js';
import { packageRoot } from '../src/native/index.js';
import { DirectRunner, argmax } from '../test/helpers/model-runner.js';
import { seriesChart } from '../src/plot/charts.js';
import { writePlot } from '../src/plot/render.js';
import { fmt, markdownTable, median, runInfo, writeJson, type Cell } from './harness.js';

const CAPACITIES = [0.1, 0.25, 0.5, 0.75];
const POLICIES: Array<{ label: string; policy: ReplayPolicy; prefetch: boolean }> = [
  { label: 'belady', policy: 'belady', prefetch: false },
  { label: 'eam', policy: 'eam', prefetch: false },
  { label: 'eam+prefetch', policy: 'eam', prefetch: true },
  { label: 'lru', policy: 'lru', prefetch: false },
  { label: 'lfu', policy: 'lfu', prefetch: false },
];

interface ReplayRow { trace: string; capacity: number; label: string; result: ReplayResult }

function replayAll(name: string, trace: Trace): ReplayRow[] {
  const rows: ReplayRow[] = [];
  for (const capacity of CAPACITIES)
    for (const p of POLICIES) rows.push({ trace: name, capacity, label: p.label, result: replay(trace, { policy: p.policy, capacity, prefetch: p.prefetch }) });
  return rows;
}

function printReplay(name: string, rows: ReplayRow[]): void {
  const mine = rows.filter((r) => r.trace === name);
  const r0 = mine[0]!.result;
  console.log(`\n### replay: ${name} (${r0.totalExperts} experts, ${r0.accesses} expert accesses)\n`);
  const body: Cell[][] = [];
  for (const c of CAPACITIES) {
    const at = (l: string) => mine.find((r) => r.capacity === c && r.label === l)!.result;
    const b = at('belady').hitRate;
    const eam = at('eam').hitRate;
    const lru = at('lru').hitRate;
    body.push([`${c * 100}% (${at('eam').slots} slots)`, ...POLICIES.map((p) => `${(at(p.label).hitRate * 100).toFixed(1)}%`),
      b > 0 ? `${(100 * eam / b).toFixed(0)}%` : '-', `${((eam - lru) * 100).toFixed(1)}`,
      `${at('eam+prefetch').loads} / ${at('eam').loads}`]);
  }
  console.log(markdownTable(['capacity', ...POLICIES.map((p) => `${p.label} hit`), 'eam / belady', 'eam - lru (points)', 'loads eam+pf / eam'], body));
}

// ---------------------------------------------------------------------------------------------
// Traces from real generation

/** Requests drawn from prompt families: each family's prompts use tokens from its own range. */
function familyPrompts(vocab: number, families: number, perFamily: number, len: number, seed: number): { family: number; ids: number[] }[] {
  let s = seed;
  const rnd = () => ((s = (s * 1103515245 + 12345) >>> 0) / 4294967296);
  const span = Math.floor((vocab - 3) / families);
  const out: { family: number; ids: number[] }[] = [];
  for (let i = 0; i < families * perFamily; i++) {
    const f = i % families;
    // A family: a small pool of tokens (a "topic"), prompts sample from it.
    const pool = Array.from({ length: 24 }, (_, j) => 3 + f * span + ((j * 977) % span));
    out.push({ family: f, ids: Array.from({ length: len }, () => pool[Math.floor(rnd() * pool.length)]!) });
  }
  return out;
}

async function recordTrace(dir: string, decodeTokens: number): Promise<{ trace: Trace; model: string }> {
  const traceDir = fs.mkdtempSync(path.join(os.tmpdir(), 'expertd-bench-trace-'));
  const loaded = loadModel(dir, { fast: false, loadExpert: skipAllExperts });
  const off = attachOffloader(loaded, { policy: 'lru', fraction: 1, traceDir });
  const runner = new DirectRunner(loaded.model, 16, 1024);
  const V = loaded.spec.vocabSize;
  familyPrompts(V, 3, 6, 12, 42).forEach((p, i) => {
    const id = `req-${i}-f${p.family}`;
    const seq = runner.newSeq();
    off.beginStep([{ id, rows: p.ids.length }]);
    let res = runner.step([seq], [p.ids], false);
    off.endStep();
    for (let t = 0; t < decodeTokens; t++) {
      off.beginStep([{ id, rows: 1 }]);
      res = runner.step([seq], [[argmax(res.logits.subarray(0, V))]], false);
      off.endStep();
    }
    off.finishRequest(id);
  });
  await off.save();
  const trace = await readTrace(traceDir);
  off.dispose();
  loaded.model.dispose();
  fs.rmSync(traceDir, { recursive: true, force: true });
  return { trace, model: `${loaded.spec.modelType} ${path.basename(dir)}` };
}

// ---------------------------------------------------------------------------------------------
// Live decode

const LIVE = { hidden: 256, inter: 512, layers: 8, experts: 16, topK: 2, vocab: 4096 };

/** A random Mixtral-shaped checkpoint big enough that expert loads cost something (~100 MB). */
function liveModelDir(): string {
  const root = process.env.EXPERTD_BENCH_CACHE ?? path.join(os.homedir(), '.cache', 'expertd', 'bench');
  const dir = path.join(root, `offload-live-v1-${LIVE.hidden}-${LIVE.inter}-${LIVE.layers}-${LIVE.experts}`);
  if (fs.existsSync(path.join(dir, 'model.safetensors'))) return dir;
  fs.mkdirSync(dir, { recursive: true });
  let s = 99;
  const bf = (n: number, scale: number): Uint16Array => {
    const a = new Uint16Array(n);
    const f = new Float32Array(1);
    const u = new Uint32Array(f.buffer);
    for (let i = 0; i < n; i++) { s = (s * 1664525 + 1013904223) >>> 0; f[0] = (s / 2 ** 32 * 2 - 1) * scale; a[i] = u[0]! >>> 16; }
    return a;
  };
  const { hidden: H, inter: I, layers: L, experts: E, vocab: V } = LIVE;
  const t: TensorToWrite[] = [];
  const w = (name: string, shape: number[], scale: number) => t.push({ name, dtype: 'BF16', shape, data: bf(shape.reduce((a, b) => a * b, 1), scale) });
  const ones = (name: string) => t.push({ name, dtype: 'BF16', shape: [H], data: new Uint16Array(H).fill(0x3f80) });
  w('model.embed_tokens.weight', [V, H], 1);
  for (let l = 0; l < L; l++) {
    const p = `model.layers.${l}.`;
    ones(`${p}input_layernorm.weight`);
    ones(`${p}post_attention_layernorm.weight`);
    w(`${p}self_attn.q_proj.weight`, [H, H], 1 / Math.sqrt(H));
    w(`${p}self_attn.k_proj.weight`, [H / 2, H], 1 / Math.sqrt(H));
    w(`${p}self_attn.v_proj.weight`, [H / 2, H], 1 / Math.sqrt(H));
    w(`${p}self_attn.o_proj.weight`, [H, H], 1 / Math.sqrt(H));
    w(`${p}block_sparse_moe.gate.weight`, [E, H], 1 / Math.sqrt(H));
    for (let e = 0; e < E; e++) {
      w(`${p}block_sparse_moe.experts.${e}.w1.weight`, [I, H], 1 / Math.sqrt(H));
      w(`${p}block_sparse_moe.experts.${e}.w3.weight`, [I, H], 1 / Math.sqrt(H));
      w(`${p}block_sparse_moe.experts.${e}.w2.weight`, [H, I], 1 / Math.sqrt(I));
    }
  }
  ones('model.norm.weight');
  w('lm_head.weight', [V, H], 1 / Math.sqrt(H));
  const cfg = {
    architectures: ['MixtralForCausalLM'], model_type: 'mixtral', vocab_size: V, hidden_size: H, intermediate_size: I,
    num_hidden_layers: L, num_attention_heads: 8, num_key_value_heads: 4, head_dim: H / 8, hidden_act: 'silu',
    max_position_embeddings: 4096, rms_norm_eps: 1e-5, rope_theta: 1e6, num_local_experts: E, num_experts_per_tok: LIVE.topK,
    tie_word_embeddings: false, bos_token_id: 1, eos_token_id: 2, torch_dtype: 'bfloat16',
  };
  fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify(cfg, null, 2));
  writeSafetensors(path.join(dir, 'model.safetensors'), t);
  return dir;
}

interface LiveRow {
  mode: string; capacity: number; simulated: boolean; tokPerS: number; tokPerSAll: number[]; vsResident: number;
  hitRate: number | null; stallS: number | null; loadedMB: number | null;
  /** Per rep: prefetches submitted, of them used / wasted / found still in flight when needed. */
  prefetches: number | null; prefetchUsed: number | null; prefetchWasted: number | null; prefetchLate: number | null;
}

function decodeRun(loaded: LoadedModel, off: Offloader | null, prompts: number[][], tokens: number): { seconds: number; generated: number } {
  const runner = new DirectRunner(loaded.model, 16, 512);
  const V = loaded.spec.vocabSize;
  let seconds = 0;
  let generated = 0;
  prompts.forEach((p, i) => {
    const id = `live-${i}`;
    const seq = runner.newSeq();
    off?.beginStep([{ id, rows: p.length }]);
    let res = runner.step([seq], [p], false);
    off?.endStep();
    const t0 = performance.now();
    for (let t = 0; t < tokens; t++) {
      off?.beginStep([{ id, rows: 1 }]);
      res = runner.step([seq], [[argmax(res.logits.subarray(0, V))]], false);
      off?.endStep();
      generated++;
    }
    seconds += (performance.now() - t0) / 1000;
    off?.finishRequest(id);
  });
  return { seconds, generated };
}

interface LiveConfig { mode: string; capacity: number; simulated: boolean; cfg: OffloadConfig | null }

/**
 * Each configuration is loaded once and warmed up (a pass over the prompts: the page cache, the
 * EAM collection and the expert cache fill), then the timed reps run round-robin across the
 * configurations so that a noisy neighbour hurts them all alike.
 */
function liveDecode(reps: number, tokens: number, link: { gbps: number; latencyUs: number }): { rows: LiveRow[]; fast: boolean } {
  const dir = liveModelDir();
  const fast = loadNative().capabilities().bf16Dot;
  const prompts = familyPrompts(LIVE.vocab, 2, 2, 8, 7).map((p) => p.ids);
  const sim = `SIMULATED link ${link.gbps} GB/s + ${link.latencyUs} us`;
  const configs: LiveConfig[] = [{ mode: 'resident', capacity: 1, simulated: false, cfg: null }];
  const copy = 'copy thread';
  const here = 'engine thread';
  for (const c of [1, 0.5, 0.25]) configs.push({ mode: `eam+prefetch, pread, ${copy}`, capacity: c, simulated: false, cfg: { policy: 'eam', fraction: c } });
  for (const c of [0.5, 0.25]) configs.push({ mode: `eam, pread, ${here}`, capacity: c, simulated: false, cfg: { policy: 'eam', fraction: c, copyThread: false } });
  for (const c of [0.5, 0.25]) configs.push({ mode: `lru, pread, ${copy}`, capacity: c, simulated: false, cfg: { policy: 'lru', fraction: c } });
  for (const c of [0.5, 0.25]) configs.push({ mode: `eam+prefetch, ${sim}, ${copy}`, capacity: c, simulated: true, cfg: { policy: 'eam', fraction: c, simulatedLink: link } });
  for (const c of [0.5, 0.25]) configs.push({ mode: `eam, ${sim}, ${here}`, capacity: c, simulated: true, cfg: { policy: 'eam', fraction: c, simulatedLink: link, copyThread: false } });
  for (const c of [0.5, 0.25]) configs.push({ mode: `lru, ${sim}, ${copy}`, capacity: c, simulated: true, cfg: { policy: 'lru', fraction: c, simulatedLink: link } });
  const live = configs.map((c) => {
    const loaded = loadModel(dir, c.cfg ? { fast, loadExpert: skipAllExperts } : { fast });
    const off = c.cfg ? attachOffloader(loaded, c.cfg) : null;
    decodeRun(loaded, off, prompts, tokens); // warm-up
    return { c, loaded, off, all: [] as number[], base: off ? { ...off.stats() } : null };
  });
  for (let r = 0; r < reps; r++)
    for (const l of live) {
      const { seconds, generated } = decodeRun(l.loaded, l.off, prompts, tokens);
      l.all.push(generated / seconds);
    }
  const rows: LiveRow[] = live.map((l) => {
    let hitRate: number | null = null, stallS: number | null = null, loadedMB: number | null = null;
    let prefetches: number | null = null, prefetchUsed: number | null = null, prefetchWasted: number | null = null, prefetchLate: number | null = null;
    if (l.off && l.base) {
      const s = l.off.stats();
      const b = l.base;
      const h = s.hits - b.hits, m = s.misses - b.misses;
      hitRate = h + m > 0 ? h / (h + m) : null;
      stallS = (s.loadStallSeconds - b.loadStallSeconds) / reps;
      loadedMB = (s.bytesLoaded - b.bytesLoaded) / 2 ** 20 / reps;
      prefetches = (s.prefetchLoads - b.prefetchLoads) / reps;
      prefetchUsed = (s.prefetchUsed - b.prefetchUsed) / reps;
      prefetchWasted = (s.prefetchWasted - b.prefetchWasted) / reps;
      prefetchLate = (s.prefetchLate - b.prefetchLate) / reps;
      l.off.dispose();
    }
    l.loaded.model.dispose();
    return { mode: l.c.mode, capacity: l.c.capacity, simulated: l.c.simulated, tokPerS: median(l.all), tokPerSAll: l.all,
      vsResident: NaN, hitRate, stallS, loadedMB, prefetches, prefetchUsed, prefetchWasted, prefetchLate };
  });
  const ref = rows[0]!.tokPerS;
  for (const r of rows) r.vsResident = r.tokPerS / ref;
  return { rows, fast };
}

// ---------------------------------------------------------------------------------------------

export async function runOffloadBench(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      json: { type: 'string' }, plot: { type: 'string' }, reps: { type: 'string', default: '3' },
      tokens: { type: 'string', default: '24' }, 'link-gbps': { type: 'string', default: '25' },
      'link-latency-us': { type: 'string', default: '10' }, 'no-live': { type: 'boolean', default: false },
      'no-replay': { type: 'boolean', default: false }, requests: { type: 'string', default: '60' },
    },
  });
  const reps = Math.max(1, Number(values.reps));
  const tokens = Math.max(1, Number(values.tokens));
  const link = { gbps: Number(values['link-gbps']), latencyUs: Number(values['link-latency-us']) };
  if (!(link.gbps > 0) || !(link.latencyUs >= 0)) throw new RangeError('--link-gbps must be > 0 and --link-latency-us >= 0');
  const requests = Math.max(4, Number(values.requests));

  console.log(`## offload (expert cache, MoE-Infinity)\n`);
  console.log(`Load average at start ${os.loadavg().map((v) => v.toFixed(1)).join(' ')}. Hit rate = demand accesses found resident; ` +
    'loads = experts moved into the cache (misses + prefetches). Belady = offline optimum for demand fetching; ' +
    'eam+prefetch can exceed it in hit rate by moving more experts. Capacities are clamped up to one layer of experts.');

  const synth = [
    { name: `synthetic families (uniform within family), ${requests} requests`, trace: syntheticTrace({ ...DEFAULT_SYNTHETIC, requests }) },
    { name: `synthetic families (Zipf 1.2 within family), ${requests} requests`, trace: syntheticTrace({ ...DEFAULT_SYNTHETIC, requests, familySkew: 1.2 }) },
  ];
  const replayRows: ReplayRow[] = [];
  if (values['no-replay']) synth.length = 0;
  for (const s of synth) {
    console.error(`# replaying ${s.name}...`);
    replayRows.push(...replayAll(s.name, s.trace));
    printReplay(s.name, replayRows);
  }
  const real: string[] = [];
  const realDirs = values['no-replay'] ? [] : [ensureDemoModel(), path.join(packageRoot(), 'test', 'fixtures', 'mixtral')].filter((d) => fs.existsSync(path.join(d, 'config.json')));
  for (const d of realDirs) {
    console.error(`# recording a generation trace with ${d}...`);
    const { trace, model } = await recordTrace(d, 16);
    const name = `generation trace: ${model} (18 requests of 3 prompt families, random weights)`;
    real.push(name);
    replayRows.push(...replayAll(name, trace));
    printReplay(name, replayRows);
  }

  let live: LiveRow[] = [];
  if (!values['no-live']) {
    console.error('# live decode...');
    const res = liveDecode(reps, tokens, link);
    live = res.rows;
    const H = LIVE.hidden, I = LIVE.inter;
    console.log(`\n### live decode: random Mixtral-shaped model H ${H}, I ${I}, ${LIVE.layers} layers x ${LIVE.experts} experts top-${LIVE.topK} ` +
      `(expert ${(3 * H * I * 2 / 2 ** 20).toFixed(2)} MiB bf16), ${res.fast ? 'bf16' : 'f32'} compute, batch 1, ${tokens} tokens x 4 prompts per rep, ` +
      `median of ${reps} reps after a warm-up pass (configurations interleaved)\n`);
    console.log('The pread tier reads the checkpoint with pread (the file is in the page cache: memory-speed I/O plus syscalls) and ' +
      'repacks into the cache slot, either on the native copy thread (demand misses at top priority and waited for; eam prefetches the ' +
      'coming layers while the following layers compute) or on the engine thread (no prefetch: it would be one more stall). ' +
      'SIMULATED rows add latency + bytes / bandwidth per expert load (a sleep on the copy thread, a busy-wait on the engine thread): ' +
      'a model of a host-to-GPU link, not a measurement of one. Prefetch columns are per rep: submitted, used, wasted (evicted unused), ' +
      'late (needed while still in flight: the engine waited for the rest).\n');
    const n = (v: number | null) => (v === null ? '-' : fmt(v));
    console.log(markdownTable(['mode', 'capacity', 'tok/s (median)', 'min-max', 'vs resident', 'time / token vs resident', 'hit rate', 'stall s / rep (incl. prefill)', 'MiB loaded / rep', 'prefetch / used / wasted / late'],
      live.map((r) => [r.mode, `${r.capacity * 100}%`, fmt(r.tokPerS), `${fmt(Math.min(...r.tokPerSAll))}-${fmt(Math.max(...r.tokPerSAll))}`, `${(r.vsResident * 100).toFixed(0)}%`,
        `${(1 / r.vsResident).toFixed(2)}x`, r.hitRate === null ? '-' : `${(r.hitRate * 100).toFixed(1)}%`, n(r.stallS), n(r.loadedMB),
        r.prefetches === null ? '-' : `${n(r.prefetches)} / ${n(r.prefetchUsed)} / ${n(r.prefetchWasted)} / ${n(r.prefetchLate)}`])));
  }

  if (values.json) {
    writeJson(values.json, {
      bench: 'offload', run: runInfo(), options: { reps, tokens, link, requests, capacities: CAPACITIES },
      replay: replayRows.map((r) => ({ trace: r.trace, capacity: r.capacity, ...r.result, label: r.label })),
      live: live.map((r) => ({ ...r, label: r.simulated ? 'SIMULATED link' : 'measured' })),
    });
    console.error(`# wrote ${values.json}`);
  }
  if (values.plot) {
    const names = [...synth.map((s) => s.name), ...real];
    const short = names.map((n) => n.replace(/^synthetic families \((\w+).*$/, 'synthetic, $1 in family').replace(/^generation trace: (\S+ \S+).*$/, 'generation, $1'));
    for (const [i, name] of names.entries()) {
      const file = i === 0 ? values.plot : values.plot.replace(/(\.png)?$/, `-${i}.png`);
      const w = await writePlot(file, seriesChart({
        title: `Expert cache hit rate vs capacity: ${short[i]}`, note: 'replayed trace; Belady = the offline optimum, the ceiling of any policy',
        x: CAPACITIES.map((c) => `${c * 100}%`), xTitle: 'cache capacity (% of all routed experts)', yTitle: 'hit rate (%)', legendTitle: 'policy',
        logY: false, yDomain: [0, 100],
        series: POLICIES.map((p) => ({
          name: p.policy === 'belady' ? 'Belady (ceiling)' : p.label, dashed: p.policy === 'belady',
          values: CAPACITIES.map((c) => 100 * replayRows.find((r) => r.trace === name && r.capacity === c && r.label === p.label)!.result.hitRate),
        })),
      }));
      console.error(`# wrote ${w.png}, ${w.svg} and ${w.spec}`);
    }
  }
}
