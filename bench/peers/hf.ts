// Launches bench/peers/hf_peer.py (HF transformers, bf16, CPU) with a Python that has torch and
// transformers: --python, else EXPERTD_BENCH_PYTHON, else `python3`. A missing Python or package
// is reported as the peer's unavailability, never as a crash of the bench.
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export interface HfDecodeCase {
  batch: number;
  /** [batch][promptLen] token ids (equal lengths: no padding) */
  prompts: number[][];
  steps: number;
}

export interface HfJob {
  model: string;
  threads: number;
  reps: number;
  warmup: number;
  prefillPrompt: number[];
  decode: HfDecodeCase[];
}

export interface HfDecodeRun {
  stepS: number[];
  /** row 0's greedy tokens: the one chosen after the prefill, then one per step */
  tokens: number[];
}

export interface HfResult {
  available: boolean;
  reason?: string;
  python?: string;
  torch?: string;
  transformers?: string;
  threads?: number;
  loadS?: number;
  expertsImplementation?: string | null;
  attnImplementation?: string | null;
  prefillS?: number[];
  decode?: Record<string, HfDecodeRun[]>;
}

export function hfPython(flag?: string): string {
  return flag ?? process.env.EXPERTD_BENCH_PYTHON ?? 'python3';
}

const SCRIPT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../bench/peers/hf_peer.py');

export function runHfPeer(job: HfJob, python: string, timeoutMs = 30 * 60_000): HfResult {
  const input = JSON.stringify({
    model: job.model, threads: job.threads, reps: job.reps, warmup: job.warmup,
    prefill_prompt: job.prefillPrompt, decode: job.decode,
  });
  const r = spawnSync(python, [SCRIPT], {
    input, encoding: 'utf8', timeout: timeoutMs, maxBuffer: 64 << 20,
    stdio: ['pipe', 'pipe', 'inherit'],
    env: { ...process.env, OMP_NUM_THREADS: String(job.threads), TOKENIZERS_PARALLELISM: 'false' },
  });
  if (r.error) return { available: false, python, reason: `cannot run ${python}: ${r.error.message}` };
  if (r.status !== 0)
    return { available: false, python, reason: `${python} hf_peer.py exited with ${r.status ?? r.signal} ` +
      '(needs torch and transformers; pass --python or set EXPERTD_BENCH_PYTHON)' };
  const line = r.stdout.trim().split('\n').pop() ?? '';
  const j = JSON.parse(line) as Record<string, unknown>;
  const decode: Record<string, HfDecodeRun[]> = {};
  for (const [k, runs] of Object.entries(j.decode as Record<string, { step_s: number[]; tokens: number[] }[]>))
    decode[k] = runs.map((x) => ({ stepS: x.step_s, tokens: x.tokens }));
  return {
    available: true, python, torch: j.torch as string, transformers: j.transformers as string,
    threads: j.threads as number, loadS: j.load_s as number,
    expertsImplementation: j.experts_implementation as string | null,
    attnImplementation: j.attn_implementation as string | null,
    prefillS: j.prefill_s as number[], decode,
  };
}
