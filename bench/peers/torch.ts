// Runs bench/peers/torch_moe.py (the PyTorch GPU peer of `kernels --device cuda`) once with a JSON
// spec and returns its one JSON answer: torch._grouped_mm and matmul-loop times, the machine's
// limits through torch, and the correctness case's files and errors. Progress goes to stderr.
import { spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export interface TorchCaseSpec {
  id: string;
  /** rows per expert, expert-contiguous */
  counts: number[];
}

export interface TorchShapeSpec {
  name: string;
  h: number;
  inter: number;
  experts: number;
  /** the correctness case: its own experts (counts.length of them) at the same H and I */
  check: { counts: number[] } | null;
  cases: TorchCaseSpec[];
}

export interface TorchSpec {
  device: string;
  reps: number;
  warmup: number;
  /** bytes written before each timed rep to evict L2 (0: none) */
  flushBytes: number;
  seed: number;
  limits: { matmulN: number; copyBytes: number; reps: number };
  /** where the check cases' inputs and float32 references are written; null: no check */
  checkDir: string | null;
  shapes: TorchShapeSpec[];
}

export type TorchVariant = 'grouped_mm' | 'loop';

export interface TorchTimes {
  timesMs?: number[];
  error?: string;
}

export interface TorchCheck {
  dir?: string;
  files?: { x: string; gateUp: string; down: string; ref: string };
  h?: number;
  inter?: number;
  counts?: number[];
  /** relative L2 error against the float32 reference, per torch variant */
  relL2: Partial<Record<TorchVariant, number>>;
  errors: Partial<Record<TorchVariant, string>>;
  error?: string;
}

export interface TorchRun {
  ok: boolean;
  error?: string;
  dryRun?: boolean;
  /** the interpreter that ran (the --python value), and its version */
  pythonPath: string;
  python?: string;
  torch?: string;
  torchCuda?: string | null;
  groupedMm?: { fn: string | null; reason: string | null };
  driver?: string | null;
  cudaDriver?: string | null;
  device?: { type: string; index?: number; name?: string; capability?: string; sms?: number; totalBytes?: number };
  limits?: {
    matmul?: { n: number; dtype: string; timesMs: number[]; tflops: number };
    copy?: { bytes: number; timesMs: number[]; gbps: number };
    error?: string;
  };
  checks?: Record<string, TorchCheck>;
  results?: Record<string, Partial<Record<TorchVariant, TorchTimes>>>;
}

export function torchPython(flag?: string): string {
  return flag ?? process.env.EXPERTD_BENCH_PYTHON ?? 'python3';
}

const SCRIPT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../bench/peers/torch_moe.py');

/** Writes the spec to workDir/spec.json, runs the peer, parses its last stdout line. */
export function runTorchPeer(python: string, spec: TorchSpec, workDir: string,
                             opts: { dryRun: boolean; timeoutMs: number }): TorchRun {
  const specFile = path.join(workDir, 'spec.json');
  writeFileSync(specFile, JSON.stringify(spec));
  const r = spawnSync(python, [SCRIPT, '--spec', specFile, ...(opts.dryRun ? ['--dry-run'] : [])], {
    stdio: ['ignore', 'pipe', 'inherit'], encoding: 'utf8', maxBuffer: 256 << 20, timeout: opts.timeoutMs,
    env: { ...process.env, PYTHONUNBUFFERED: '1' },
  });
  if (r.error) {
    const why = (r.error as NodeJS.ErrnoException).code === 'ETIMEDOUT'
      ? `timed out after ${opts.timeoutMs / 1e3} s` : r.error.message;
    return { ok: false, pythonPath: python, error: `cannot run ${python}: ${why}` };
  }
  const last = (r.stdout ?? '').trim().split('\n').pop() ?? '';
  try {
    return { ...(JSON.parse(last) as Omit<TorchRun, 'pythonPath'>), pythonPath: python };
  } catch {
    return { ok: false, pythonPath: python,
      error: `${python} torch_moe.py exited with ${r.status ?? r.signal} and no JSON answer` };
  }
}
