// The machine's limits, measured by bench/probe/probe.cc in the same run as a benchmark:
// all-thread read bandwidth (the decode bound) and peak f32 FMA / bf16 dot rates (the prefill bound).
import os from 'node:os';

import { buildTool, runTool } from '../native-tool.js';

export interface MachineLimits {
  cpuModel: string;
  threads: number;
  hardwareThreads: number;
  l3Bytes: number;
  bandwidthBufferBytes: number;
  /** best of the repetitions, all threads */
  readBandwidthGBps: number;
  readBandwidthMedianGBps: number;
  readBandwidth1ThreadGBps: number;
  /**
   * Round trip of one cache line between the first two CPUs the process may use, ns (null with one
   * thread or CPU): ~50 ns where they share a CCD's L3, ~300 ns across two CCDs (a VM's vCPUs can move
   * between the two, and the read bandwidth moves with them: bench/RESULTS.md, session 25).
   */
  coreRoundTripNs: number | null;
  f32Isa: 'avx512' | 'avx2' | 'scalar';
  peakF32Gflops: number;
  peakF32MedianGflops: number;
  peakF32PerThreadGflops: number;
  bf16Dot: boolean;
  /** null without AVX512_BF16 */
  peakBf16Gflops: number | null;
  peakBf16MedianGflops: number | null;
}

export interface ProbeOptions {
  threads?: number;
  /** Small buffer and short loops (selftest). */
  quick?: boolean;
}

export function probeBinary(): string {
  return buildTool({
    source: 'bench/probe/probe.cc',
    flags: ['-O3', '-march=native', '-fopenmp', '-std=c++17'],
  });
}

export function runProbe(opts: ProbeOptions = {}): MachineLimits {
  const bin = probeBinary();
  const threads = opts.threads ?? os.availableParallelism();
  const args = ['--threads', String(threads), ...(opts.quick ? ['--quick'] : [])];
  const [json] = runTool(bin, { args });
  if (!json) throw new Error('expertd bench: the probe printed no result');
  return json as unknown as MachineLimits;
}

/**
 * The all-thread read bandwidth (best of `reps` passes over the probe's 1 GiB buffer, ~0.5 s) and the
 * core round trip alone: the machine's limit at one moment, for a bench that probes beside each
 * measurement (a VM's bandwidth can move by half between seconds, with where its vCPUs sit).
 */
export interface BesideProbe { gbps: number; roundTripNs: number | null }

export function probeBeside(opts: { threads?: number; reps?: number } = {}): BesideProbe {
  const threads = opts.threads ?? os.availableParallelism();
  const [json] = runTool(probeBinary(), { args: ['--bw-only', '--threads', String(threads), '--reps', String(opts.reps ?? 3)] });
  const j = json as { readBandwidthGBps?: unknown; coreRoundTripNs?: unknown } | undefined;
  if (typeof j?.readBandwidthGBps !== 'number') throw new Error('expertd bench: the probe printed no read bandwidth');
  return { gbps: j.readBandwidthGBps, roundTripNs: typeof j.coreRoundTripNs === 'number' ? j.coreRoundTripNs : null };
}

/** The best bf16 rate the machine has: vdpbf16ps where present, else the f32 FMA rate. */
export function peakBf16OrF32(l: MachineLimits): { gflops: number; label: string } {
  return l.peakBf16Gflops !== null
    ? { gflops: l.peakBf16Gflops, label: 'bf16 dot' }
    : { gflops: l.peakF32Gflops, label: `f32 ${l.f32Isa} FMA` };
}
