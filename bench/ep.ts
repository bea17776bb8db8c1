// `npm run bench -- ep`: EPS-MoE's pipeline and ScMoE's overlap over real in-process expert ranks
// (rank 0 here, ranks 1..N-1 worker threads, the loopback group with its comm thread).
//  1. A Mixtral-shaped model: prefill tokens/s and MoE layer time at PN = 1, at every forced PN
//     (the best), and at the planner's PN ('auto'); the share of all2all time the engine did not
//     wait for. Over the real loopback transport, and SIMULATED: every all2all takes
//     max(bytes out, bytes in) / bandwidth on the comm thread (PCIe 25, 400 GbE 50, NVLink 150 GB/s),
//     at the nominal bandwidth and, with --link-scale auto, slowed by the factor this CPU's expert
//     GEMMs are slower than an H800's bf16 peak (so that all2all vs compute is an H800 node's).
//  2. A LongCat-Flash-shaped model (ScMoE): step time with the shortcut MoE overlapped with the
//     dense sub-blocks vs the same model running it where it is routed (plain MoE), and the hidden
//     share of its dispatch and combine.
// Both models are random bf16 checkpoints made once under ~/.cache/expertd/bench-models/. Settings
// are interleaved rep by rep (the machine's load drifts over all of them alike).
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';

import { toBf16 } from '../src/model/demo.js';
import { loadModel } from '../src/model/load.js';
import type { MoeModel } from '../src/model/model.js';
import { writeSafetensors, type TensorToWrite } from '../src/model/safetensors.js';
import { mulberry32 } from '../src/engine/rng.js';
import { calibrate } from '../src/moe/eps-planner.js';
import { startExpertRanks, type ExpertRanks } from '../src/dist/expert-ranks.js';
import { chunkOverheadOf, MoeLayer } from '../src/moe/moe-layer.js';
import { packageRoot } from '../src/native/index.js';
import { DirectRunner } from '../test/helpers/model-runner.js';
import { seriesChart, timelineChart, type Span } from '../src/plot/charts.js';
import { writePlot } from '../src/plot/render.js';
import { PIPELINE_COLORS, PIPELINE_PHASES, recordPipeline } from './ep-timeline.js';
import { fmt, markdownTable, median, parseIntList, parsePositiveInt, runInfo, writeJson, type Cell } from './harness.js';

const VERSION = 1;
/** H800 dense bf16 peak (FLOP/s): the reference for --link-scale auto. */
const H800_BF16_FLOPS = 989e12;
const LINKS: { name: string; GBps: number }[] = [
  { name: 'PCIe', GBps: 25 }, { name: '400GbE', GBps: 50 }, { name: 'NVLink', GBps: 150 },
];

interface Dims { H: number; I: number; E: number; k: number; L: number }
const MIXTRAL: Dims = { H: 512, I: 1024, E: 8, k: 2, L: 4 };
const LONGCAT: Dims & { Z: number; F: number } = { H: 512, I: 1024, E: 8, k: 2, L: 2, Z: 2, F: 1024 };

function bf16(name: string, shape: number[], rand: () => number, scale: number): TensorToWrite {
  const n = shape.reduce((a, b) => a * b, 1);
  const data = new Uint16Array(n);
  for (let i = 0; i < n; i++) data[i] = toBf16((rand() * 2 - 1) * scale);
  return { name, dtype: 'BF16', shape, data };
}

function ones(name: string, n: number): TensorToWrite {
  return { name, dtype: 'BF16', shape: [n], data: new Uint16Array(n).fill(toBf16(1)) };
}

/** A random checkpoint of the fixture's architecture at bench dimensions (made once). */
function ensureModel(kind: 'mixtral' | 'longcat_flash'): string {
  const dir = path.join(process.env.EXPERTD_CACHE_DIR ?? path.join(os.homedir(), '.cache', 'expertd'), 'bench-models', `ep-${kind}-v${VERSION}`);
  if (fs.existsSync(path.join(dir, 'model.safetensors'))) return dir;
  const fixture = path.join(packageRoot(), 'test', 'fixtures', kind);
  const cfg = JSON.parse(fs.readFileSync(path.join(fixture, 'config.json'), 'utf8')) as Record<string, unknown>;
  const rand = mulberry32(7);
  const w = (name: string, shape: number[]) => bf16(name, shape, rand, Math.sqrt(3 / shape[shape.length - 1]!));
  const t: TensorToWrite[] = [];
  const V = Number(cfg.vocab_size);
  if (kind === 'mixtral') {
    const { H, I, E, k, L } = MIXTRAL;
    const heads = 8, kv = 2, hd = 64;
    Object.assign(cfg, { hidden_size: H, intermediate_size: I, num_local_experts: E, num_experts_per_tok: k, num_hidden_layers: L,
      num_attention_heads: heads, num_key_value_heads: kv, head_dim: hd });
    for (let l = 0; l < L; l++) {
      const p = `model.layers.${l}.`;
      t.push(ones(`${p}input_layernorm.weight`, H), ones(`${p}post_attention_layernorm.weight`, H));
      t.push(w(`${p}self_attn.q_proj.weight`, [heads * hd, H]), w(`${p}self_attn.k_proj.weight`, [kv * hd, H]),
        w(`${p}self_attn.v_proj.weight`, [kv * hd, H]), w(`${p}self_attn.o_proj.weight`, [H, heads * hd]));
      t.push(w(`${p}block_sparse_moe.gate.weight`, [E, H]));
      for (let e = 0; e < E; e++) {
        const q = `${p}block_sparse_moe.experts.${e}.`;
        t.push(w(`${q}w1.weight`, [I, H]), w(`${q}w2.weight`, [H, I]), w(`${q}w3.weight`, [I, H]));
      }
    }
    t.push(ones('model.norm.weight', H), w('model.embed_tokens.weight', [V, H]), w('lm_head.weight', [V, H]));
  } else {
    const { H, I, E, k, L, Z, F } = LONGCAT;
    const heads = 4, qLora = 128, kvLora = 96, nope = 32, rope = 16, vHead = 32;
    Object.assign(cfg, { hidden_size: H, expert_ffn_hidden_size: I, ffn_hidden_size: F, n_routed_experts: E, zero_expert_num: Z,
      moe_topk: k, num_layers: L, num_attention_heads: heads, num_key_value_heads: heads, q_lora_rank: qLora, kv_lora_rank: kvLora,
      qk_nope_head_dim: nope, qk_rope_head_dim: rope, qk_head_dim: nope + rope, v_head_dim: vHead, head_dim: rope });
    for (let l = 0; l < L; l++) {
      const p = `model.layers.${l}.`;
      for (const j of [0, 1]) {
        const a = `${p}self_attn.${j}.`;
        t.push(ones(`${p}input_layernorm.${j}.weight`, H), ones(`${p}post_attention_layernorm.${j}.weight`, H));
        t.push(ones(`${a}kv_a_layernorm.weight`, kvLora), ones(`${a}q_a_layernorm.weight`, qLora));
        t.push(w(`${a}kv_a_proj_with_mqa.weight`, [kvLora + rope, H]), w(`${a}kv_b_proj.weight`, [heads * (nope + vHead), kvLora]),
          w(`${a}o_proj.weight`, [H, heads * vHead]), w(`${a}q_a_proj.weight`, [qLora, H]), w(`${a}q_b_proj.weight`, [heads * (nope + rope), qLora]));
        t.push(w(`${p}mlps.${j}.gate_proj.weight`, [F, H]), w(`${p}mlps.${j}.up_proj.weight`, [F, H]), w(`${p}mlps.${j}.down_proj.weight`, [H, F]));
      }
      t.push(w(`${p}mlp.router.classifier.weight`, [E + Z, H]));
      t.push({ name: `${p}mlp.router.e_score_correction_bias`, dtype: 'F32', shape: [E + Z], data: new Float32Array(E + Z) });
      for (let e = 0; e < E; e++) {
        const q = `${p}mlp.experts.${e}.`;
        t.push(w(`${q}gate_proj.weight`, [I, H]), w(`${q}up_proj.weight`, [I, H]), w(`${q}down_proj.weight`, [H, I]));
      }
    }
    t.push(ones('model.norm.weight', H), w('model.embed_tokens.weight', [V, H]), w('lm_head.weight', [V, H]));
  }
  const tmp = `${dir}.tmp-${process.pid}`;
  fs.mkdirSync(tmp, { recursive: true });
  fs.writeFileSync(path.join(tmp, 'config.json'), `${JSON.stringify(cfg, null, 2)}\n`);
  for (const f of ['generation_config.json', 'tokenizer.json', 'tokenizer_config.json'])
    if (fs.existsSync(path.join(fixture, f))) fs.copyFileSync(path.join(fixture, f), path.join(tmp, f));
  writeSafetensors(path.join(tmp, 'model.safetensors'), t, { format: 'pt' });
  fs.rmSync(dir, { recursive: true, force: true });
  fs.renameSync(tmp, dir);
  return dir;
}

interface Run { label: string; stepMs: number[]; moeMs: number[]; all2allS: number; hidden: number | null; chunks: number[] }

/**
 * Times prefills of T tokens (each a fresh sequence) under each setting, interleaved: every rep runs
 * every setting once, so that the machine's load drifts over all of them alike.
 */
function timePrefill(model: MoeModel, ranks: ExpertRanks, T: number, reps: number, warmup: number,
                     settings: { label: string; apply: () => void }[]): Run[] {
  const V = model.spec.vocabSize;
  const prompt = Array.from({ length: T }, (_, i) => 3 + ((i * 7919) % (V - 3)));
  const runners = settings.map(() => new DirectRunner(model, 16, Math.ceil(((reps + warmup) * T) / 16) + 4));
  let moeMs = 0;
  const orig = MoeLayer.prototype.forward;
  MoeLayer.prototype.forward = function (...args: Parameters<MoeLayer['forward']>) {
    const t0 = performance.now();
    try { orig.apply(this, args); } finally { moeMs += performance.now() - t0; }
  };
  const runs: Run[] = settings.map((s) => ({ label: s.label, stepMs: [], moeMs: [], all2allS: 0, hidden: null, chunks: [] }));
  const hiddenS = settings.map(() => 0);
  try {
    for (let r = 0; r < warmup + reps; r++) {
      settings.forEach((s, i) => {
        s.apply();
        const run = runs[i]!, runner = runners[i]!;
        ranks.comm.takeDelta();
        moeMs = 0;
        const t0 = performance.now();
        runner.step([runner.newSeq()], [prompt], false);
        const dt = performance.now() - t0;
        const d = ranks.comm.takeDelta();
        if (r < warmup) return;
        run.stepMs.push(dt);
        run.moeMs.push(moeMs / Math.max(1, model.moeLayers.length));
        run.all2allS += d.seconds;
        hiddenS[i] = hiddenS[i]! + (d.hidden ?? 0) * d.seconds;
        run.chunks.push(...model.layerPlans().map((p) => p.chunks));
      });
    }
  } finally {
    MoeLayer.prototype.forward = orig;
  }
  runs.forEach((run, i) => { run.hidden = run.all2allS > 0 ? hiddenS[i]! / run.all2allS : null; });
  return runs;
}

const spread = (xs: number[]) => `${fmt(median(xs))} (${fmt(Math.min(...xs))}-${fmt(Math.max(...xs))})`;

export async function runEp(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv, options: {
      json: { type: 'string' }, plot: { type: 'string' }, reps: { type: 'string' }, warmup: { type: 'string' },
      tokens: { type: 'string' }, ranks: { type: 'string' }, chunks: { type: 'string' }, 'link-scale': { type: 'string' },
      'no-real': { type: 'boolean' }, 'no-scmoe': { type: 'boolean' },
    },
  });
  const reps = parsePositiveInt('reps', values.reps, 5);
  // 3 warm-ups: 'auto' measures its per-chunk overhead in its first 10 pipelined layers (PN 1 and
  // its wish in turn), 2.5 steps of this 4-layer model; the reps then time the planner's steady state.
  const warmup = parsePositiveInt('warmup', values.warmup, 3);
  const T = parsePositiveInt('tokens', values.tokens, 128);
  const W = parsePositiveInt('ranks', values.ranks, 2);
  const PNS = values.chunks ? parseIntList('chunks', values.chunks) : [1, 2, 3, 4, 6, 8];
  if (!PNS.includes(1)) PNS.unshift(1);
  const scales = (values['link-scale'] ?? '1,auto').split(',');
  const info = runInfo();
  console.log(`# ep: ${W} in-process ranks, prefill ${T} tokens, median (min-max) of ${reps} after ${warmup} warm-up; ${os.cpus().length} CPUs (${os.cpus()[0]?.model.trim()})`);

  // --- 1. EPS-MoE pipeline (Mixtral-shaped)
  const dir = ensureModel('mixtral');
  const { H, I, E } = MIXTRAL;
  const table = calibrate({ numExperts: E, hidden: H, inter: I, dtype: 'bf16', fast: false }, { rows: [8, 32, 128], reps: 3 });
  const gemmFlops = Math.max(...table.rows.map((r, i) => (6 * H * I * r) / (table.groupMs[i]! / 1000)));
  const autoScale = H800_BF16_FLOPS / gemmFlops;
  console.log(`# GroupGemm here: ${fmt(gemmFlops / 1e9)} GFLOP/s; --link-scale auto = ${fmt(autoScale)} (H800 bf16 peak 989 TFLOP/s / that)`);
  const modes: { label: string; GBps: number; scale: number }[] = [];
  if (!values['no-real']) modes.push({ label: 'real loopback', GBps: 0, scale: 1 });
  for (const s of scales) {
    const scale = s === 'auto' ? autoScale : Number(s);
    if (!(scale > 0)) throw new Error(`--link-scale: '${s}' is not auto or a positive number`);
    for (const l of LINKS) modes.push({ label: `SIMULATED ${l.name} ${l.GBps} GB/s${scale !== 1 ? ` / ${fmt(scale)}` : ''}`, GBps: l.GBps / scale, scale });
  }
  const ranks = startExpertRanks(dir, W, false, 600_000);
  const eps: { mode: string; GBps: number; runs: Run[]; chunkOverheadMs: number }[] = [];
  const timelines: { mode: string; speedup: number; spans: Span[] }[] = [];
  try {
    await ranks.ready;
        const { model } = loadModel(dir, { fast: false, comm: ranks.comm, loadExpert: (_l, e) => ranks.comm.ownsExpert(e) });
    try {
      model.setExpertKernel('auto');
      for (const mode of modes) {
        ranks.comm.setSimulatedLink(mode.GBps);
        const runs = timePrefill(model, ranks, T, reps, warmup, [
          ...PNS.map((pn) => ({ label: `PN ${pn}`, apply: () => model.setPipelineChunks(pn) })),
          { label: 'auto', apply: () => model.setPipelineChunks('auto') },
        ]);
        const chunkOverheadMs = chunkOverheadOf(ranks.comm).overheadMs();
        eps.push({ mode: mode.label, GBps: mode.GBps, runs, chunkOverheadMs });
        if (values.plot) {
          // One more step each at PN 1 and at this link's best forced PN, recorded span by span.
          const forced = runs.slice(0, -1);
          const best = forced.reduce((a, r) => (median(r.stepMs) < median(a.stepMs) ? r : a));
          const pns = [...new Set([1, Number(best.label.replace('PN ', ''))])];
          timelines.push({ mode: mode.label, speedup: median(forced[0]!.stepMs) / median(best.stepMs), spans: pns.flatMap((pn) => {
            model.setPipelineChunks(pn);
            const runner = new DirectRunner(model, 16, Math.ceil(T / 16) + 4);
            const prompt = Array.from({ length: T }, (_, i) => 3 + ((i * 7919) % (model.spec.vocabSize - 3)));
            return recordPipeline(model, ranks.comm, () => { runner.step([runner.newSeq()], [prompt], false); })
              .map((sp) => ({ ...sp, column: `PN ${pn}${pn === 1 ? ' (no pipeline)' : ' (best forced)'}` }));
          }) });
        }
        const one = median(runs[0]!.stepMs);
        console.error(`# ${mode.label}: PN 1 ${fmt(one)} ms, auto ${fmt(median(runs.at(-1)!.stepMs))} ms, measured overhead ${fmt(chunkOverheadMs)} ms/chunk`);
      }
    } finally {
      ranks.comm.setSimulatedLink(0);
      model.dispose();
    }
  } finally {
    await ranks.stop();
  }
  console.log(`\n### EPS-MoE pipeline: Mixtral-shaped (H ${H}, I ${I}, E ${E}, top-${MIXTRAL.k}, ${MIXTRAL.L} MoE layers), ${W} ranks, prefill ${T} tokens\n`);
  const body: Cell[][] = [];
  const summary = eps.map(({ mode, runs, chunkOverheadMs }) => {
    const forced = runs.slice(0, -1);
    const one = forced[0]!, auto = runs.at(-1)!;
    const best = forced.reduce((a, r) => (median(r.stepMs) < median(a.stepMs) ? r : a));
    const tps = (r: Run) => T / (median(r.stepMs) / 1000);
    const pnAuto = [...new Set(auto.chunks)].sort((a, b) => a - b).join(',');
    // The planner's choice judged on the forced rows (no noise of its own): the forced run at the PN it
    // picked most often, against the best forced run.
    const counts = new Map<number, number>();
    for (const c of auto.chunks) counts.set(c, (counts.get(c) ?? 0) + 1);
    const modal = [...counts].reduce((a, b) => (b[1] > a[1] ? b : a), [1, 0])[0];
    const atModal = forced.find((r) => r.label === `PN ${modal}`);
    const pickOfBest = atModal ? median(best.stepMs) / median(atModal.stepMs) : null;
    body.push([mode, fmt(tps(one)), spread(one.moeMs), `${pnAuto}`, fmt(tps(auto)), spread(auto.moeMs), best.label.replace('PN ', ''), fmt(tps(best)),
      `${fmt(tps(auto) / tps(one))}x`, `${fmt(tps(best) / tps(one))}x`, `${fmt(100 * median(best.stepMs) / median(auto.stepMs))}%`,
      pickOfBest === null ? '-' : `${fmt(100 * pickOfBest)}% (PN ${modal})`, fmt(chunkOverheadMs),
      auto.hidden === null ? '-' : `${fmt(100 * auto.hidden)}%`, one.hidden === null ? '-' : `${fmt(100 * one.hidden)}%`]);
    return { mode, pn1: one, auto, best, speedupAuto: tps(auto) / tps(one), speedupBest: tps(best) / tps(one), autoOfBest: median(best.stepMs) / median(auto.stepMs), pickOfBest, chunkOverheadMs };
  });
  console.log(markdownTable(['link', 'PN 1 tok/s', 'PN 1 MoE layer ms', 'auto PN', 'auto tok/s', 'auto MoE layer ms', 'best PN', 'best tok/s',
    'auto / PN 1', 'best / PN 1', 'best / auto time', "best / forced at auto's PN", 'overhead ms/chunk', 'hidden (auto)', 'hidden (PN 1)'], body));

  // --- 2. ScMoE (LongCat-Flash-shaped)
  const sc: { mode: string; overlapped: Run; plain: Run }[] = [];
  if (!values['no-scmoe']) {
    const ldir = ensureModel('longcat_flash');
    const lranks = startExpertRanks(ldir, W, false, 600_000);
    try {
      await lranks.ready;
            const { model } = loadModel(ldir, { fast: false, comm: lranks.comm, loadExpert: (_l, e) => lranks.comm.ownsExpert(e) });
      try {
        model.setExpertKernel('group');
        model.setPipelineChunks(1);
        for (const mode of modes) {
          lranks.comm.setSimulatedLink(mode.GBps);
          const [plain, overlapped] = timePrefill(model, lranks, T, reps, warmup, [
            { label: 'plain', apply: () => { model.shortcutOverlap = false; } },
            { label: 'ScMoE', apply: () => { model.shortcutOverlap = true; } },
          ]) as [Run, Run];
          sc.push({ mode: mode.label, overlapped, plain });
        }
      } finally {
        lranks.comm.setSimulatedLink(0);
        model.dispose();
      }
    } finally {
      await lranks.stop();
    }
    console.log(`\n### ScMoE: LongCat-Flash-shaped (H ${LONGCAT.H}, expert I ${LONGCAT.I}, dense FFN ${LONGCAT.F}, E ${LONGCAT.E} + ${LONGCAT.Z} identity, ${LONGCAT.L} layers), ${W} ranks, prefill ${T} tokens, PN 1\n`);
    console.log(markdownTable(['link', 'plain MoE step ms', 'ScMoE step ms', 'plain / ScMoE', 'all2all hidden (ScMoE)', 'all2all hidden (plain)'],
      sc.map((s) => [s.mode, spread(s.plain.stepMs), spread(s.overlapped.stepMs), `${fmt(median(s.plain.stepMs) / median(s.overlapped.stepMs))}x`,
        s.overlapped.hidden === null ? '-' : `${fmt(100 * s.overlapped.hidden)}%`, s.plain.hidden === null ? '-' : `${fmt(100 * s.plain.hidden)}%`])));
  }
  if (values.json) writeJson(values.json, { bench: 'ep', info, T, ranks: W, reps, warmup, gemmFlops, autoScale, eps, summary, scmoe: sc });
  if (values.plot) {
    const stepPlot = await writePlot(values.plot, seriesChart({
      title: `EPS-MoE prefill step time vs pipeline chunks (Mixtral-shaped, ${W} ranks, ${T} tokens)`,
      note: `median over ${reps} reps, whiskers: min-max; SIMULATED links are modelled on the comm thread, not measured`,
      x: PNS, xTitle: 'pipeline chunks PN', yTitle: 'prefill step time (ms)', legendTitle: 'link',
      series: eps.map((e) => {
        const forced = e.runs.slice(0, -1);
        return { name: e.mode, values: forced.map((r) => median(r.stepMs)), lo: forced.map((r) => Math.min(...r.stepMs)), hi: forced.map((r) => Math.max(...r.stepMs)) };
      }),
    }));
    console.error(`# wrote ${stepPlot.png}, ${stepPlot.svg} and ${stepPlot.spec}`);
    // The link where pipelining paid most shows the overlap best.
    const shown = timelines.reduce<(typeof timelines)[number] | null>((a, t) => (a && a.speedup >= t.speedup ? a : t), null);
    if (shown) {
      const tl = await writePlot(`${values.plot.replace(/\.png$/i, '')}-timeline.png`, timelineChart({
        title: `EPS-MoE pipeline, one prefill step of ${T} tokens: ${shown.mode}`,
        note: `rank 0 of ${W}; comm-thread spans placed in queue order from each all2all's measured comm-thread time; best PN ${fmt(shown.speedup)}x faster than PN 1 (median step)`,
        spans: shown.spans, phases: PIPELINE_PHASES, colors: PIPELINE_COLORS, xTitle: 'time from the MoE layer start (ms)', laneTitle: 'thread',
      }));
      console.error(`# wrote ${tl.png}, ${tl.svg} and ${tl.spec}`);
    }
  }
}
