// The real daemon as a child process: `expertd serve` on a free port, the openai client on it.
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';

import OpenAI from 'openai';

import { packageRoot } from '../../src/native/index.js';

export interface Daemon { proc: ChildProcess; base: string; client: OpenAI; exit: Promise<number | null>; logs: string[] }

export async function stopDaemon(d: Daemon): Promise<number | null> {
  d.proc.kill('SIGTERM');
  return d.exit;
}

/**
 * Starts `expertd serve` on a free port (f32 unless `extra` says otherwise: later flags win) and
 * resolves once it logs that it is ready.
 */
export async function startDaemon(extra: string[] = [], env: NodeJS.ProcessEnv = {}): Promise<Daemon> {
  const bin = path.join(packageRoot(), 'bin', 'expertd.js');
  const proc = spawn(process.execPath, [bin, 'serve', '--port', '0', '--compute-dtype', 'f32',
    '--max-num-seqs', '8', '--log-level', 'info', ...extra], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
  const logs: string[] = [];
  const exit = new Promise<number | null>((resolve) => proc.on('exit', (code) => resolve(code)));
  const base = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`daemon did not start:\n${logs.join('')}`)), 60_000);
    const onData = (d: Buffer) => {
      logs.push(d.toString());
      const m = /expertd ready on (http:\/\/[0-9.:]+)/.exec(d.toString());
      if (m) { clearTimeout(timer); resolve(m[1]!); }
    };
    proc.stdout!.on('data', onData);
    proc.stderr!.on('data', (d: Buffer) => logs.push(d.toString()));
    proc.on('exit', (code) => { clearTimeout(timer); reject(new Error(`daemon exited (${code}):\n${logs.join('')}`)); });
  });
  const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: 'unused', maxRetries: 0, timeout: 60_000 });
  return { proc, base, client, exit, logs };
}

