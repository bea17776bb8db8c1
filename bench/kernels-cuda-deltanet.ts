// `npm run bench -- kernels-deltanet`: the device's gated delta rule (cudaGatedDeltaRule, f32) at a
// qwen3_next-like layer (Hk 16, Hv 32, Dk = Dv = 128): the chunked prefill of T tokens (default
// 4096, chunk 64), the same prefill by the recurrence (chunk 1), and decode steps at batch 1 and 64,
// against HF transformers' torch functions on the same GPU (torch_chunk_gated_delta_rule,
// torch_recurrent_gated_delta_rule) and fla's Triton kernels when installed. Device milliseconds by
// CUDA events, median (p10-p90). --standin runs the CPU emulator instead (plumbing only, labelled).
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

import type { CudaAddon, CudaBuffer, DeltaRuleOptions } from '../src/native/types.js';
import { loadNative } from '../src/native/index.js';
import { mulberry32 } from '../src/engine/rng.js';
import { fmt, markdownTable, parseIntList, parsePositiveInt, percentile, runInfo, runSpecScript, writeJson } from './harness.js';

const SCRIPT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../bench/peers/deltanet_torch_cuda.py');

interface PeerRun {
  ok: boolean; error?: string; torch?: string; device?: string; fla?: string | null; flaError?: string | null;
  errors?: Record<string, string>; results?: Record<string, { hf?: number[]; fla?: number[] }>;
}

function runPeer(python: string, spec: Record<string, unknown>): PeerRun {
  return runSpecScript<PeerRun>(python, SCRIPT, spec, 300_000);
}

interface Row { case: string; variant: string; ms: number[]; tokens: number }

export async function runKernelsDeltanet(argv: string[]): Promise<void> {
  const { values: o } = parseArgs({
    args: argv,
    options: {
      device: { type: 'string', default: 'cuda:0' }, json: { type: 'string' }, reps: { type: 'string' },
      warmup: { type: 'string' }, tokens: { type: 'string' }, batches: { type: 'string' },
      shape: { type: 'string', default: '16:32:128:128' }, python: { type: 'string' },
      'no-peer': { type: 'boolean', default: false }, standin: { type: 'boolean', default: false },
    },
    strict: true,
  });
  const dims = /^(\d+):(\d+):(\d+):(\d+)$/.exec(o.shape!);
  if (!dims) throw new RangeError(`--shape is "${o.shape}", expected Hk:Hv:Dk:Dv (e.g. 16:32:128:128)`);
  const [Hk, Hv, Dk, Dv] = dims.slice(1).map(Number) as [number, number, number, number];
  const dm = /^cuda(?::(\d+))?$/.exec(o.device!);
  if (!dm) throw new RangeError(`--device is "${o.device}", expected "cuda" or "cuda:N"`);
  const reps = parsePositiveInt('reps', o.reps, 10);
  const warmup = parsePositiveInt('warmup', o.warmup, 3);
  const T = parsePositiveInt('tokens', o.tokens, 4096);
  const batches = o.batches ? parseIntList('batches', o.batches) : [1, 64];
  let cu: CudaAddon;
  if (o.standin) {
    // The CPU emulator: the plumbing timed, not a GPU (labelled so in every output).
    const { createCudaEmulator } = await import('../test/helpers/cuda-emu.js');
    cu = createCudaEmulator();
  } else {
    const native = loadNative();
    const caps = native.capabilities();
    if (!(caps.cudaDevices > 0)) throw new Error(`kernels-deltanet: no CUDA device (${caps.cudaError ?? 'portable build'})`);
    cu = native as unknown as CudaAddon;
    cu.cudaSetDevice(Number(dm[1] ?? 0));
  }
  const info = cu.cudaDeviceInfo(Number(dm[1] ?? 0));
  const r = mulberry32(11);
  const rand = (n: number, amp: number) => Float32Array.from({ length: n }, () => (r() * 2 - 1) * amp);
  const owned: CudaBuffer[] = [];
  const upload = (a: Float32Array | Int32Array): CudaBuffer => {
    const b = cu.cudaBuffer(Math.max(16, a.byteLength));
    cu.cudaCopyToDevice(b, 0, a);
    owned.push(b);
    return b;
  };
  const st = new cu.CudaStream();
  const e0 = new cu.CudaEvent(true), e1 = new cu.CudaEvent(true);
  const time = (call: () => void): number[] => {
    for (let i = 0; i < warmup; i++) call();
    const ms: number[] = [];
    for (let i = 0; i < reps; i++) {
      e0.record(st);
      call();
      e1.record(st);
      e1.synchronize();
      ms.push(e1.elapsedMs(e0));
    }
    return ms;
  };
  /** B sequences of n tokens each, states in slots 0..B-1; returns the timed call. */
  const caseOf = (B: number, n: number, chunk: number) => {
    const t = B * n;
    const q = upload(rand(t * Hk * Dk, 1)), k = upload(rand(t * Hk * Dk, 1)), v = upload(rand(t * Hv * Dv, 1));
    const g = upload(Float32Array.from({ length: t * Hv }, () => -r() * 1.5));
    const beta = upload(Float32Array.from({ length: t * Hv }, () => r()));
    const pool = upload(rand(B * Hv * Dk * Dv, 0.1));
    const slots = upload(Int32Array.from({ length: B }, (_, i) => i));
    const starts = upload(Int32Array.from({ length: B + 1 }, (_, i) => i * n));
    const out = cu.cudaBuffer(t * Hv * Dv * 4);
    owned.push(out);
    const opts: DeltaRuleOptions = { T: t, Hk, Hv, Dk, Dv, l2normQk: true, chunk };
    const lens = new Int32Array(B).fill(n);
    return () => cu.cudaGatedDeltaRule(q, k, v, g, beta, pool, slots, starts, B, out, opts, st, lens);
  };
  const rows: Row[] = [];
  console.error(`# kernels-deltanet on ${info.name}${o.standin ? ' [STANDIN: CPU emulator]' : ''}: Hk ${Hk} Hv ${Hv} ` +
    `Dk ${Dk} Dv ${Dv}, prefill ${T}, decode batches ${batches.join(',')}`);
  rows.push({ case: 'prefill', variant: 'expertd chunk 64', ms: time(caseOf(1, T, 64)), tokens: T });
  rows.push({ case: 'prefill', variant: 'expertd recurrence (chunk 1)', ms: time(caseOf(1, T, 1)), tokens: T });
  for (const B of batches) rows.push({ case: `decode${B}`, variant: 'expertd', ms: time(caseOf(B, 1, 64)), tokens: B });
  cu.cudaSynchronize();
  for (const b of owned) b.dispose();
  e0.dispose();
  e1.dispose();
  st.dispose();

  let peer: PeerRun = { ok: false, error: o.standin ? 'skipped (--standin)' : 'skipped (--no-peer)' };
  if (!o['no-peer'] && !o.standin) {
    const python = o.python ?? process.env.EXPERTD_BENCH_PYTHON ?? 'python3';
    peer = runPeer(python, { device: o.device, T, Hk, Hv, Dk, Dv, batches, reps, warmup });
    if (!peer.ok) console.error(`torch peer: ${peer.error}`);
    for (const [what, err] of Object.entries(peer.errors ?? {})) console.error(`torch peer ${what}: ${err}`);
  }
  for (const [name, res] of Object.entries(peer.results ?? {})) {
    const tokens = name === 'prefill' ? T : Number(name.slice('decode'.length));
    if (res.hf) rows.push({ case: name, variant: `HF torch ${name === 'prefill' ? 'chunk' : 'recurrent'}`, ms: res.hf, tokens });
    if (res.fla) rows.push({ case: name, variant: `fla ${name === 'prefill' ? 'chunk' : 'fused recurrent'}`, ms: res.fla, tokens });
  }
  const ours = (c: string) => rows.find((x) => x.case === c && x.variant.startsWith('expertd'))!;
  const med = (ms: number[]) => percentile(ms, 0.5);
  const table = rows.map((x) => {
    const m = med(x.ms);
    return [x.case, x.variant, `${fmt(m)} (${fmt(percentile(x.ms, 0.1))}-${fmt(percentile(x.ms, 0.9))})`,
      fmt(x.tokens / m / 1e3), x.variant.startsWith('expertd') ? null : `${fmt(m / med(ours(x.case).ms), 2)}x`];
  });
  console.log(`\n${o.standin ? 'STANDIN (CPU emulator, not a GPU): ' : ''}${info.name}, gated delta rule f32, Hk ${Hk} Hv ${Hv} ` +
    `Dk ${Dk} Dv ${Dv}; ${reps} reps after ${warmup} warm-up; load ${os.loadavg().map((v) => v.toFixed(2)).join(' ')}` +
    (peer.ok ? `; torch ${peer.torch}${peer.fla ? `, fla ${peer.fla}` : ` (${peer.flaError ?? 'no fla'})`}` : ''));
  console.log('prefill = one sequence of T tokens; decodeB = one token of each of B sequences; ms = device time (CUDA events).\n');
  console.log(markdownTable(['case', 'variant', 'median ms (p10-p90)', 'Mtok/s', 'peer / expertd (time; > 1: expertd faster)'], table));
  if (o.json) {
    writeJson(o.json, {
      bench: 'kernels-deltanet', run: runInfo(), device: info, standin: o.standin, shape: { Hk, Hv, Dk, Dv, T, batches },
      reps, warmup, peer: { ok: peer.ok, error: peer.error, torch: peer.torch, fla: peer.fla, flaError: peer.flaError, errors: peer.errors },
      results: rows.map((x) => ({ case: x.case, variant: x.variant, medianMs: med(x.ms), ms: x.ms })),
    });
  }
}
