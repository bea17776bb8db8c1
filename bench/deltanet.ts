// `npm run bench -- deltanet`: the Gated DeltaNet ops of one qwen3_next-like linear-attention layer
// (Hk 16, Hv 32, Dk = Dv = 128, conv K 4): prefill of T tokens (conv, chunkwise delta rule, gated
// norm) and decode steps at batch 1/8, against HF transformers' own torch functions in the same
// run (optional: skipped without ~/ref's python) and, for decode, the machine's read bound of the
// state bytes (read once and written once per step). Ratios, medians and min-max spread.
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

import { loadNative } from '../src/native/index.js';
import { mulberry32 } from '../src/engine/rng.js';
import {
  CacheFlusher, fmt, markdownTable, measureWallCpu, parseIntList, parsePositiveInt, pct, runInfo, runSpecScript, stats,
  writeJson, type Stats,
} from './harness.js';
import { runProbe } from './probe/probe.js';

const SCRIPT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../bench/peers/deltanet_torch.py');
const OPS = ['conv', 'delta', 'norm'] as const;
type Op = typeof OPS[number];

/** Wall and CPU (this process, every thread: user + system) milliseconds of each rep. */
interface Times { wall: number[]; cpu: number[] }
interface PeerRun { ok: boolean; error?: string; torch?: string; threads?: number; results?: Record<string, Record<Op, Times>> }

function timed(fn: () => void, reps: number, warmup: number, before?: () => void): Times {
  const t = measureWallCpu(fn, { reps, warmup, ...(before ? { before } : {}) });
  return { wall: t.wallMs, cpu: t.cpuMs };
}

function runPeer(python: string, spec: Record<string, unknown>): PeerRun {
  return runSpecScript<PeerRun>(python, SCRIPT, spec, 900_000);
}

function defaultPython(): string {
  return process.env.EXPERTD_BENCH_PYTHON ?? path.join(os.homedir(), 'ref', 'bin', 'python');
}

function rand(n: number, r: () => number, amp = 1): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = (r() * 2 - 1) * amp;
  return a;
}

export async function runDeltanet(argv: string[]): Promise<void> {
  const { values: o } = parseArgs({
    args: argv,
    options: {
      json: { type: 'string' }, reps: { type: 'string' }, warmup: { type: 'string' },
      python: { type: 'string' }, 'no-peer': { type: 'boolean' }, threads: { type: 'string' },
      batches: { type: 'string' }, tokens: { type: 'string' }, decay: { type: 'string' },
    },
  });
  const native = loadNative();
  const reps = parsePositiveInt('reps', o.reps, 15);
  const warmup = parsePositiveInt('warmup', o.warmup, 3);
  const batches = o.batches ? parseIntList('batches', o.batches) : [1, 8];
  const T = parsePositiveInt('tokens', o.tokens, 512);
  // prefill log decays g = -U(0, decay) per token and head: 1.5 keeps a 64-token chunk's decays
  // e^(G_i - G_j) above the subnormal range; Qwen3-Next's decays (-exp(A_log) softplus(a + dt_bias),
  // A_log up to log 16) reach it, which --decay 6 reproduces.
  const decay = o.decay === undefined ? 1.5 : Number(o.decay);
  if (!(decay >= 0 && Number.isFinite(decay))) throw new RangeError(`--decay is ${o.decay}, expected a number >= 0 (the largest per-token log decay)`);
  if (o.threads) native.setNumThreads(parsePositiveInt('threads', o.threads, 0));
  const threads = native.capabilities().threads;
  const Hk = 16, Hv = 32, Dk = 128, Dv = 128, K = 4;
  const C = 2 * Hk * Dk + Hv * Dv;
  const qkW = Hk * Dk;
  const stateFloats = Hv * Dk * Dv;
  const limits = runProbe({ threads });
  const flusher = new CacheFlusher(Math.max(4 * limits.l3Bytes, 64 << 20));
  const r = mulberry32(7);
  const w = rand(C * K, r, 0.5);
  const opts = { Hk, Hv, Dk, Dv, l2normQk: true, chunk: 64, qStride: C, kStride: C, vStride: C };

  const native_: Record<string, Record<Op, Times>> = {};
  const stateBytes: Record<string, number> = {};
  const totalBytes: Record<string, number> = {};
  // ---- prefill: one sequence of T tokens from a zero state
  {
    const x = rand(T * C, r, 1);
    const mixed = new Float32Array(T * C);
    const convState = new Float32Array(C * (K - 1));
    const g = new Float32Array(T * Hv).map(() => -r() * decay);
    const beta = new Float32Array(T * Hv).map(() => r());
    const state = new Float32Array(stateFloats);
    const out = new Float32Array(T * Hv * Dv);
    const z = rand(T * Hv * Dv, r, 2);
    const normW = rand(Dv, r, 1);
    const normOut = new Float32Array(T * Hv * Dv);
    native_.prefill = {
      conv: timed(() => native.causalConv1d(x, T, C, w, null, K, convState, true, mixed), reps, warmup,
        () => convState.fill(0)),
      delta: timed(() => native.gatedDeltaRule(mixed, mixed.subarray(qkW), mixed.subarray(2 * qkW), g, beta,
        state, out, { ...opts, T }), reps, warmup, () => state.fill(0)),
      norm: timed(() => native.gatedRmsNorm(out, z, normW, 1e-6, T * Hv, Dv, normOut), reps, warmup),
    };
  }
  // ---- decode: B sequences, one token each, states cold (a model's 48 layers of state do not
  // stay in cache between steps)
  for (const B of batches) {
    const x = rand(B * C, r, 1);
    const mixed = new Float32Array(B * C);
    const convPool = rand(B * C * (K - 1), r, 1);
    const pool = rand(B * stateFloats, r, 0.1);
    const slots = Int32Array.from({ length: B }, (_, i) => i);
    const starts = Int32Array.from({ length: B + 1 }, (_, i) => i);
    const g = new Float32Array(B * Hv).map(() => -r());
    const beta = new Float32Array(B * Hv).map(() => r());
    const out = new Float32Array(B * Hv * Dv);
    const z = rand(B * Hv * Dv, r, 2);
    const normW = rand(Dv, r, 1);
    const normOut = new Float32Array(B * Hv * Dv);
    const before = () => flusher.flush();
    native_[`decode${B}`] = {
      conv: timed(() => native.causalConv1dBatch(x, B, C, w, null, K, convPool, slots, starts, true, mixed),
        reps, warmup, before),
      delta: timed(() => native.gatedDeltaRuleBatch(mixed, mixed.subarray(qkW), mixed.subarray(2 * qkW), g, beta,
        pool, slots, starts, out, { ...opts, T: B }), reps, warmup, before),
      norm: timed(() => native.gatedRmsNorm(out, z, normW, 1e-6, B * Hv, Dv, normOut), reps, warmup, before),
    };
    // bytes a step must move: the state read and written, the conv state read and written, the
    // conv weight read
    stateBytes[`decode${B}`] = 4 * 2 * B * stateFloats;
    totalBytes[`decode${B}`] = stateBytes[`decode${B}`]! + 4 * (2 * B * C * (K - 1) + C * K);
  }

  let peer: PeerRun = { ok: false, error: 'skipped (--no-peer)' };
  if (!o['no-peer']) {
    const python = o.python ?? defaultPython();
    peer = runPeer(python, { T, Hk, Hv, Dk, Dv, K, decay, batches, reps, warmup, threads, flushBytes: flusher.bytes });
    if (!peer.ok) console.log(`torch peer: ${peer.error}`);
  }

  const bw = limits.readBandwidthGBps;
  const rows: (string | number | null)[][] = [];
  const json: Record<string, unknown>[] = [];
  const sum = (t: Record<Op, Times>): Times => ({
    wall: t.conv.wall.map((_, i) => t.conv.wall[i]! + t.delta.wall[i]! + t.norm.wall[i]!),
    cpu: t.conv.cpu.map((_, i) => t.conv.cpu[i]! + t.delta.cpu[i]! + t.norm.cpu[i]!),
  });
  const span = (s: Stats) => `${fmt(s.medianMs)} (${fmt(s.minMs)}–${fmt(s.maxMs)})`;
  for (const [name, ops] of Object.entries(native_)) {
    const rowsOf: [string, Times, Times | null][] = OPS.map((op) => [op, ops[op], peer.results?.[name]?.[op] ?? null]);
    rowsOf.push(['conv+delta+norm', sum(ops), peer.results?.[name] ? sum(peer.results[name]!) : null]);
    for (const [op, mine, theirs] of rowsOf) {
      const s = stats(mine.wall), sc = stats(mine.cpu);
      const t: Stats | null = theirs ? stats(theirs.wall) : null;
      const tc: Stats | null = theirs ? stats(theirs.cpu) : null;
      const b = op === 'delta' ? stateBytes[name] : op === 'conv+delta+norm' ? totalBytes[name] : undefined;
      const boundMs = b !== undefined ? b / (bw * 1e6) : null;
      rows.push([name, op, span(s), fmt(sc.medianMs), t ? span(t) : null, tc ? fmt(tc.medianMs) : null,
        t ? `${fmt(t.medianMs / s.medianMs)}x` : null, tc ? `${fmt(tc.medianMs / sc.medianMs)}x` : null,
        boundMs !== null ? fmt(boundMs) : null, boundMs !== null ? pct(boundMs / s.medianMs) : null]);
      json.push({ case: name, op, expertd: s, expertdCpu: sc, torch: t, torchCpu: tc,
        torchOverExpertd: t ? t.medianMs / s.medianMs : null, torchOverExpertdCpu: tc ? tc.medianMs / sc.medianMs : null,
        readBoundMs: boundMs, ofBound: boundMs !== null ? boundMs / s.medianMs : null });
    }
  }
  console.log(`\nGated DeltaNet layer ops, Hk ${Hk} Hv ${Hv} Dk ${Dk} Dv ${Dv} conv ${C}x${K}, f32, ${threads} threads, ` +
    `${reps} reps; read bandwidth ${fmt(bw)} GB/s; load ${os.loadavg().map((v) => v.toFixed(2)).join(' ')}` +
    (peer.ok ? `; torch ${peer.torch} (${peer.threads} threads)` : ''));
  console.log(`prefill = ${T} tokens of one sequence, log decays -U(0, ${decay}) per token; decodeB = one token of B sequences, caches flushed (states cold).`);
  console.log('read bound: state bytes read + written once (delta), plus conv state and weight (total), at the measured read bandwidth.\n');
  console.log('wall: median (min–max) ms; cpu: median CPU ms of the process (all threads), which a busy machine inflates less.\n');
  console.log(markdownTable(['case', 'op', 'expertd wall ms', 'expertd cpu ms', 'torch wall ms', 'torch cpu ms',
    'torch / expertd (wall)', '(cpu)', 'read bound ms', 'of bound (wall)'], rows));
  if (o.json) writeJson(o.json, { info: runInfo(), limits, threads, shape: { T, Hk, Hv, Dk, Dv, K, C }, decay, peer: { ok: peer.ok, error: peer.error, torch: peer.torch }, results: json });
}
