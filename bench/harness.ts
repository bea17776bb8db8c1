// Shared benchmark plumbing: timed repetitions with warm-up, robust statistics (median, min-max,
// percentiles), a markdown table printer and a JSON writer. Charts live in chart.ts.
import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';

export interface Stats {
  samples: number;
  medianMs: number;
  minMs: number;
  maxMs: number;
  p50Ms: number;
  p99Ms: number;
  meanMs: number;
}

/** q-quantile (0..1) of values by linear interpolation between closest ranks. */
export function percentile(values: readonly number[], q: number): number {
  if (values.length === 0) return NaN;
  if (q < 0 || q > 1) throw new RangeError(`q is ${q}, expected a value in [0, 1]`);
  const s = [...values].sort((a, b) => a - b);
  const pos = q * (s.length - 1);
  const lo = Math.floor(pos);
  const hi = Math.ceil(pos);
  return s[lo]! + (s[hi]! - s[lo]!) * (pos - lo);
}

export const median = (values: readonly number[]): number => percentile(values, 0.5);

export function stats(timesMs: readonly number[]): Stats {
  if (timesMs.length === 0) throw new RangeError('stats of no samples');
  return {
    samples: timesMs.length,
    medianMs: median(timesMs),
    minMs: Math.min(...timesMs),
    maxMs: Math.max(...timesMs),
    p50Ms: percentile(timesMs, 0.5),
    p99Ms: percentile(timesMs, 0.99),
    meanMs: timesMs.reduce((a, b) => a + b, 0) / timesMs.length,
  };
}

export interface MeasureOptions {
  warmup: number;
  reps: number;
  /** Untimed work before every run (cache flush, input reset). */
  before?: () => void;
}

/** Runs fn warmup + reps times, timing each run of reps alone; returns the times in ms. */
export function measure(fn: () => void, opts: MeasureOptions): number[] {
  const times: number[] = [];
  for (let r = 0; r < opts.warmup + opts.reps; r++) {
    opts.before?.();
    const t0 = performance.now();
    fn();
    const dt = performance.now() - t0;
    if (r >= opts.warmup) times.push(dt);
  }
  return times;
}

/**
 * measure() with each run's CPU time (user + system of the process, every thread) beside its wall
 * time: on a shared machine a run waits for the CPU in wall time, not in CPU time (pool threads that
 * spin while waiting still count, so CPU time is not the less honest figure).
 */
export function measureWallCpu(fn: () => void, opts: MeasureOptions): { wallMs: number[]; cpuMs: number[] } {
  const wallMs: number[] = [], cpuMs: number[] = [];
  for (let r = 0; r < opts.warmup + opts.reps; r++) {
    opts.before?.();
    const c0 = process.cpuUsage();
    const t0 = performance.now();
    fn();
    const dt = performance.now() - t0;
    const c = process.cpuUsage(c0);
    if (r >= opts.warmup) {
      wallMs.push(dt);
      cpuMs.push((c.user + c.system) / 1000);
    }
  }
  return { wallMs, cpuMs };
}

/**
 * Evicts the last-level cache by reading a buffer of `bytes` (2-4x the L3): weights of a real
 * model are read once per step, so a benchmark that re-reads cache-hot weights lies.
 */
export class CacheFlusher {
  private readonly buf: Float64Array;
  sink = 0;
  constructor(readonly bytes: number) {
    this.buf = new Float64Array(Math.max(1, Math.floor(bytes / 8))).fill(1);
  }
  flush(): void {
    const b = this.buf;
    let s = 0;
    for (let i = 0; i < b.length; i += 8) s += b[i]!; // one read per 64-byte line
    this.sink += s;
  }
}

// ---------------------------------------------------------------------------------------------
// Tables

export type Cell = string | number | null | undefined;
export type Align = 'left' | 'right';

/** Formats a number with about 3 significant digits (no exponent for common ranges). */
export function fmt(x: number | null | undefined, digits = 3): string {
  if (x === null || x === undefined || !Number.isFinite(x)) return '-';
  if (x === 0) return '0';
  const a = Math.abs(x);
  if (Number.isInteger(x) && a < 1e9) return String(x);
  if (a >= 10 ** digits) return x.toFixed(0);
  if (a < 1e-3) return x.toExponential(1);
  const dec = Math.max(0, digits - 1 - Math.floor(Math.log10(a)));
  return x.toFixed(dec);
}

export const pct = (ratio: number | null | undefined): string =>
  ratio === null || ratio === undefined || !Number.isFinite(ratio) ? '-' : `${(ratio * 100).toFixed(0)}%`;

/** A markdown table with padded columns; numbers are right-aligned. */
export function markdownTable(headers: string[], rows: Cell[][], align?: Align[]): string {
  const text = rows.map((r) => headers.map((_, i) => cellText(r[i])));
  const al: Align[] = headers.map((_, i) =>
    align?.[i] ?? (rows.some((r) => typeof r[i] === 'number') ? 'right' : 'left'));
  const width = headers.map((h, i) => Math.max(3, h.length, ...text.map((r) => r[i]!.length)));
  const pad = (s: string, i: number) => (al[i] === 'right' ? s.padStart(width[i]!) : s.padEnd(width[i]!));
  const line = (cells: string[]) => `| ${cells.map(pad).join(' | ')} |`;
  const rule = `|${width.map((w, i) => (al[i] === 'right' ? `${'-'.repeat(w + 1)}:` : `:${'-'.repeat(w + 1)}`)).join('|')}|`;
  return [line(headers), rule, ...text.map(line)].join('\n');
}

function cellText(c: Cell): string {
  if (c === null || c === undefined) return '-';
  if (typeof c === 'number') return fmt(c);
  return c.replace(/\|/g, '\\|');
}

// ---------------------------------------------------------------------------------------------
// Output files

export function writeJson(file: string, data: unknown): void {
  mkdirSync(path.dirname(path.resolve(file)), { recursive: true });
  writeFileSync(file, `${JSON.stringify(data, null, 2)}\n`);
}

/** What every JSON report starts with: when, where, and with what. */
export function runInfo(): Record<string, unknown> {
  const cpus = os.cpus();
  return {
    date: new Date().toISOString(),
    host: os.hostname(),
    platform: `${os.platform()} ${os.release()} ${os.arch()}`,
    cpuModel: cpus[0]?.model ?? 'unknown',
    logicalCpus: cpus.length,
    memoryBytes: os.totalmem(),
    node: process.version,
    /** 1/5/15-minute load averages at start: a busy machine explains a noisy table */
    loadAverage: os.loadavg(),
  };
}

/** Parses "1,8,64" into numbers, with a clear message naming the flag. */
export function parseIntList(flag: string, value: string): number[] {
  const out = value.split(',').map((s) => Number(s.trim()));
  for (const v of out)
    if (!Number.isInteger(v) || v <= 0)
      throw new RangeError(`--${flag} is "${value}", expected comma-separated positive integers`);
  return out;
}

export function parsePositiveInt(flag: string, value: string | undefined, fallback: number): number {
  if (value === undefined) return fallback;
  const v = Number(value);
  if (!Number.isInteger(v) || v < 0) throw new RangeError(`--${flag} is "${value}", expected a non-negative integer`);
  return v;
}

/**
 * Runs a Python peer script as `python SCRIPT --spec FILE` (the spec written as JSON to a temporary
 * file, removed afterwards) and parses the last line of its stdout as its JSON answer; stderr passes
 * through. A script that cannot start, or ends without a JSON line, answers { ok: false, error }.
 */
export function runSpecScript<T extends { ok: boolean; error?: string }>(python: string, script: string,
  spec: Record<string, unknown>, timeoutMs: number): T {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'expertd-peer-'));
  try {
    const file = path.join(dir, 'spec.json');
    writeFileSync(file, JSON.stringify(spec));
    const r = spawnSync(python, [script, '--spec', file], {
      stdio: ['ignore', 'pipe', 'inherit'], encoding: 'utf8', timeout: timeoutMs, maxBuffer: 64 << 20,
    });
    if (r.error) return { ok: false, error: `cannot run ${python}: ${r.error.message}` } as T;
    try {
      return JSON.parse((r.stdout ?? '').trim().split('\n').pop() ?? '') as T;
    } catch {
      return { ok: false, error: `${python} ${path.basename(script)} exited with ${r.status ?? r.signal} and no JSON answer` } as T;
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
