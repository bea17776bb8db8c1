// Launches bench/peers/hf_peer.py (HF transformers, bf16, CPU) as a long-lived child with a Python
// that has torch and transformers (--python, else EXPERTD_BENCH_PYTHON, else `python3`), and sends
// it one workload at a time, so the bench can interleave the peer's repetitions with its own.
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { createInterface, type Interface } from 'node:readline';
import { fileURLToPath } from 'node:url';

export interface HfInfo {
  python: string;
  torch: string;
  transformers: string;
  threads: number;
  loadS: number;
  expertsImplementation: string | null;
  attnImplementation: string | null;
}

export interface HfDecodeRun {
  stepS: number[];
  /** row 0's greedy tokens: the one chosen after the prefill, then one per step */
  tokens: number[];
}

export function hfPython(flag?: string): string {
  return flag ?? process.env.EXPERTD_BENCH_PYTHON ?? 'python3';
}

const SCRIPT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../bench/peers/hf_peer.py');

export class HfPeer {
  private readonly lines: AsyncIterator<string>;
  private readonly rl: Interface;
  private readonly exited: Promise<number | null>;
  info: HfInfo | null = null;

  private constructor(private readonly proc: ChildProcess, readonly python: string) {
    this.rl = createInterface({ input: proc.stdout! });
    this.lines = this.rl[Symbol.asyncIterator]();
    this.exited = new Promise((resolve) => proc.on('exit', (code) => resolve(code)));
  }

  /** Starts the peer and waits until the model is loaded; throws with a reason if it cannot. */
  static async start(python: string, modelDir: string, threads: number): Promise<HfPeer> {
    const proc = spawn(python, [SCRIPT, modelDir, String(threads)], {
      stdio: ['pipe', 'pipe', 'inherit'],
      env: { ...process.env, OMP_NUM_THREADS: String(threads), TOKENIZERS_PARALLELISM: 'false' },
    });
    const failed = new Promise<never>((_, reject) => proc.on('error', (e) => reject(new Error(`cannot run ${python}: ${e.message}`))));
    const peer = new HfPeer(proc, python);
    const j = await Promise.race([peer.next(), failed]);
    peer.info = {
      python, torch: j.torch as string, transformers: j.transformers as string, threads: j.threads as number,
      loadS: j.load_s as number, expertsImplementation: j.experts_implementation as string | null,
      attnImplementation: j.attn_implementation as string | null,
    };
    return peer;
  }

  private async next(): Promise<Record<string, unknown>> {
    const r = await this.lines.next();
    if (r.done) {
      const code = await this.exited;
      throw new Error(`${this.python} hf_peer.py exited with ${code} (needs torch and transformers; ` +
        'pass --python or set EXPERTD_BENCH_PYTHON)');
    }
    const j = JSON.parse(r.value) as Record<string, unknown>;
    if (j.error) throw new Error(`hf peer: ${String(j.error)}`);
    return j;
  }

  private async call(cmd: Record<string, unknown>): Promise<Record<string, unknown>> {
    this.proc.stdin!.write(`${JSON.stringify(cmd)}\n`);
    return this.next();
  }

  /** Seconds of one prefill forward (greedy pick included). */
  async prefill(prompt: number[]): Promise<number> {
    return (await this.call({ cmd: 'prefill', prompt })).s as number;
  }

  async decode(prompts: number[][], steps: number): Promise<HfDecodeRun> {
    const j = await this.call({ cmd: 'decode', prompts, steps });
    return { stepS: j.step_s as number[], tokens: j.tokens as number[] };
  }

  async close(): Promise<void> {
    if (this.proc.exitCode === null) {
      this.proc.stdin!.end(`${JSON.stringify({ cmd: 'quit' })}\n`);
      const timer = setTimeout(() => this.proc.kill('SIGKILL'), 10_000);
      await this.exited;
      clearTimeout(timer);
    }
    this.rl.close();
  }
}
