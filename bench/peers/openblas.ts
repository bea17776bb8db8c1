// The OpenBLAS peer for expert FFN benchmarks: runs bench/peers/openblas_moe.cc (a per-expert
// loop of cblas_sgemm / cblas_sbgemm calls) in its own process with OpenBLAS's environment cleaned.
import os from 'node:os';

import { buildTool, runTool } from '../native-tool.js';

export const OPENBLAS_MISSING = 'n/a (apt-get install libopenblas-dev)';

export interface PeerInfo {
  available: boolean;
  /** Why the peer is unavailable (short, for table cells). */
  reason?: string;
  error?: string;
  library?: string;
  /** The kernel family OpenBLAS picked (openblas_get_corename), e.g. Cooperlake, Zen, Haswell. */
  corename?: string;
  config?: string;
  threads?: number;
  sbgemm?: boolean;
  /** OPENBLAS_* variables of the bench's environment that were removed for the peer's process. */
  unsetEnv: Record<string, string>;
}

export interface PeerCase {
  id: string;
  dtype: 'f32' | 'bf16';
  h: number;
  inter: number;
  /** rows per expert [E] */
  counts: Int32Array | number[];
  reps: number;
  warmup: number;
  flushBytes: number;
}

export interface PeerResult {
  id: string;
  dtype: 'f32' | 'bf16';
  timesMs?: number[];
  /** max relative error of two checked rows against a float64 evaluation */
  checkRelErr?: number;
  error?: string;
}

export interface PeerRun {
  info: PeerInfo;
  results: Map<string, PeerResult>;
}

// NOTE: OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE set for another library on this machine can force a
// slower kernel family; the peer must run with OpenBLAS's own choice, so they are removed here
// (only for the peer's process) and the choice is recorded from openblas_get_corename.
const UNSET = ['OPENBLAS_CORETYPE', 'OPENBLAS_L2_SIZE', 'OPENBLAS_VERBOSE'];

function peerEnv(threads: number): { env: NodeJS.ProcessEnv; unset: Record<string, string> } {
  const env: NodeJS.ProcessEnv = { ...process.env };
  const unset: Record<string, string> = {};
  for (const k of UNSET) {
    if (env[k] !== undefined) unset[k] = env[k]!;
    delete env[k];
  }
  env.OPENBLAS_NUM_THREADS = String(threads);
  env.OMP_NUM_THREADS = String(threads);
  return { env, unset };
}

export function peerBinary(): string {
  return buildTool({
    source: 'bench/peers/openblas_moe.cc',
    flags: ['-O3', '-march=native', '-std=c++17'],
    libs: ['-ldl'],
  });
}

/** Runs all cases in one peer process (weights are made once per geometry). */
export function runOpenBlasPeer(cases: PeerCase[], threads = os.availableParallelism()): PeerRun {
  const { env, unset } = peerEnv(threads);
  const input = cases.map((c) =>
    ['case', c.id, c.dtype, c.h, c.inter, c.counts.length, c.reps, c.warmup, c.flushBytes, ...c.counts].join(' '),
  ).join('\n');
  const lines = runTool(peerBinary(), { args: ['--threads', String(threads)], input: `${input}\n`, env });
  const head = (lines[0] ?? { available: false, error: 'no output' }) as Omit<PeerInfo, 'unsetEnv'>;
  const info: PeerInfo = { ...head, unsetEnv: unset };
  if (!info.available) info.reason = OPENBLAS_MISSING;
  const results = new Map<string, PeerResult>();
  for (const l of lines.slice(1)) {
    const r = l as unknown as PeerResult;
    results.set(r.id, r);
  }
  return { info, results };
}
