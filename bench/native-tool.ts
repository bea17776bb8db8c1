// Builds the bench's small C++ helpers (probe, peers) at run time with the host compiler and
// -march=native, cached by a hash of source, flags and CPU, and runs them (JSON lines on stdout).
import { execFileSync, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { packageRoot } from '../src/native/index.js';

/** ~/.cache/expertd/bench, or bench/.cache when the home cache is not writable. */
export function cacheDir(): string {
  const override = process.env.EXPERTD_BENCH_CACHE;
  const candidates = override ? [override] : [
    path.join(process.env.XDG_CACHE_HOME ?? path.join(os.homedir(), '.cache'), 'expertd', 'bench'),
    path.join(packageRoot(), 'bench', '.cache'),
  ];
  for (const dir of candidates) {
    try {
      mkdirSync(dir, { recursive: true });
      return dir;
    } catch {
      // try the next one
    }
  }
  throw new Error(`expertd bench: cannot create a cache directory (tried ${candidates.join(', ')})`);
}

function cpuKey(): string {
  try {
    const info = readFileSync('/proc/cpuinfo', 'utf8');
    return info.split('\n').filter((l) => /^(model name|flags)\s*:/.test(l)).slice(0, 2).join('\n');
  } catch {
    return os.cpus()[0]?.model ?? 'unknown';
  }
}

export interface ToolSpec {
  /** Source path relative to the package root, e.g. bench/probe/probe.cc */
  source: string;
  flags: string[];
  libs?: string[];
}

/** Compiles the tool if no cached binary matches; returns the binary's path. */
export function buildTool(spec: ToolSpec): string {
  const src = path.join(packageRoot(), spec.source);
  const cxx = process.env.CXX ?? 'g++';
  const args = [...spec.flags, src, ...(spec.libs ?? [])];
  const hash = createHash('sha256')
    .update(readFileSync(src)).update(cxx).update(args.join(' ')).update(cpuKey())
    .digest('hex').slice(0, 16);
  const out = path.join(cacheDir(), `${path.basename(spec.source, '.cc')}-${hash}`);
  if (existsSync(out)) return out;
  try {
    execFileSync(cxx, [...spec.flags, '-o', out, src, ...(spec.libs ?? [])], { stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (err) {
    const e = err as { stderr?: Buffer; message: string };
    throw new Error(`expertd bench: compiling ${spec.source} with ${cxx} failed: ` +
      `${e.stderr?.toString().trim() || e.message}. A C++17 compiler with OpenMP (g++) is needed.`);
  }
  return out;
}

export interface RunOptions {
  args?: string[];
  input?: string;
  env?: NodeJS.ProcessEnv;
  timeoutMs?: number;
}

/** Runs a built tool and parses every stdout line that is a JSON object. */
export function runTool(binary: string, opts: RunOptions = {}): Record<string, unknown>[] {
  const r = spawnSync(binary, opts.args ?? [], {
    input: opts.input ?? '',
    env: opts.env ?? process.env,
    timeout: opts.timeoutMs ?? 600_000,
    maxBuffer: 64 << 20,
    encoding: 'utf8',
  });
  if (r.error) throw new Error(`expertd bench: ${path.basename(binary)} failed to run: ${r.error.message}`);
  if (r.status !== 0)
    throw new Error(`expertd bench: ${path.basename(binary)} exited with ${r.status ?? r.signal}: ${r.stderr.trim()}`);
  return r.stdout.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as Record<string, unknown>);
}
