// The routing trace on disk (the --trace-dir folder): trace-meta.json (model shape) and a rotated
// set of trace-NNNNNN.jsonl files, one line per engine step with each request's per-layer expert
// counts and the requests that finished after it. Readers stream the set, oldest file first.
import fs from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';

/** The single file of traces written before rotation; read as the oldest file of the set. */
export const TRACE_FILE = 'trace.jsonl';
export const TRACE_META_FILE = 'trace-meta.json';
const TRACE_FILE_RE = /^trace-(\d{6,})\.jsonl$/;

export interface TraceMeta {
  numLayers: number;  // MoE layers
  numExperts: number;
  topK: number;
  model: string;
}

export interface TraceRequestStep {
  id: string;
  /** Per MoE layer: flat [expert, count, expert, count, ...] of this request's tokens. */
  layers: number[][];
}

export interface TraceStep {
  step: number;
  requests: TraceRequestStep[];
  /** Requests that finished after this step. */
  finished?: string[];
}

export interface Trace {
  meta: TraceMeta;
  steps: TraceStep[];
}

/** Name of the index-th file of a rotated set (indices only grow, so names sort oldest first). */
export function traceFileName(index: number): string {
  return `trace-${String(index).padStart(6, '0')}.jsonl`;
}

/** Index of a rotated file's name (-1: not a file of the set). */
export function traceFileIndex(name: string): number {
  const m = TRACE_FILE_RE.exec(name);
  return m ? Number(m[1]) : -1;
}

/** The trace files of a folder, oldest first (the pre-rotation trace.jsonl before every rotated one). */
export function traceFiles(dir: string): string[] {
  let names: string[];
  try {
    names = fs.readdirSync(dir);
  } catch {
    return [];
  }
  const rotated = names.filter((n) => traceFileIndex(n) >= 0).sort((a, b) => traceFileIndex(a) - traceFileIndex(b));
  return [...(names.includes(TRACE_FILE) ? [TRACE_FILE] : []), ...rotated].map((n) => path.join(dir, n));
}

function noTrace(dir: string): Error {
  return new Error(`${dir} holds no routing trace (${TRACE_META_FILE} and trace-*.jsonl); run the server with --trace-dir ${dir} first`);
}

/** The folder's trace-meta.json; throws a sentence naming the folder when it holds no trace. */
export function readTraceMeta(dir: string): TraceMeta {
  const metaFile = path.join(dir, TRACE_META_FILE);
  if (!fs.existsSync(metaFile) || traceFiles(dir).length === 0) throw noTrace(dir);
  return JSON.parse(fs.readFileSync(metaFile, 'utf8')) as TraceMeta;
}

export interface TraceReadOptions {
  /** Told about each torn last line skipped (default: a process warning). */
  warn?: (msg: string) => void;
  /** Opens a file for reading (tests count the bytes read through it). */
  createReadStream?: (file: string) => NodeJS.ReadableStream;
}

/**
 * Streams the steps of a folder's trace, file by file, oldest first, line by line: memory holds a
 * few stream chunks, never a whole file. A file's last line that does not parse (a crash
 * mid-write) is skipped with a warning; a bad line anywhere else is an error naming file and line.
 */
export async function* traceSteps(dir: string, opts: TraceReadOptions = {}): AsyncGenerator<TraceStep> {
  const files = traceFiles(dir);
  if (files.length === 0 || !fs.existsSync(path.join(dir, TRACE_META_FILE))) throw noTrace(dir);
  const warn = opts.warn ?? ((m: string) => process.emitWarning(m, { code: 'EXPERTD_TRACE' }));
  const open = opts.createReadStream ?? ((f: string) => fs.createReadStream(f));
  for (const file of files) {
    const input = open(file);
    const lines = readline.createInterface({ input, crlfDelay: Infinity });
    // A line that fails to parse is an error only once another non-empty line follows it.
    let bad: { line: number; message: string } | null = null;
    let n = 0;
    try {
      for await (const line of lines) {
        n++;
        if (!line.trim()) continue;
        if (bad) throw new Error(`${file}:${bad.line}: ${bad.message}`);
        let st: TraceStep;
        try {
          st = JSON.parse(line) as TraceStep;
        } catch (e) {
          bad = { line: n, message: (e as Error).message };
          continue;
        }
        yield st;
      }
    } finally {
      lines.close();
      (input as Partial<fs.ReadStream>).destroy?.();
    }
    if (bad) warn(`${file}:${bad.line}: skipped a torn last line (the writer stopped mid-line: ${bad.message})`);
  }
}

/** Reads a whole trace into memory (small traces and tests; the CLI streams with traceSteps). */
export async function readTrace(dir: string, opts: TraceReadOptions = {}): Promise<Trace> {
  const meta = readTraceMeta(dir);
  const steps: TraceStep[] = [];
  for await (const st of traceSteps(dir, opts)) steps.push(st);
  return { meta, steps };
}

/** Per-layer counts of one request's step ([L][E]) into the flat [e, c, ...] trace form. */
export function sparseCounts(counts: Float32Array, L: number, E: number): number[][] {
  const out: number[][] = [];
  for (let l = 0; l < L; l++) {
    const row: number[] = [];
    for (let e = 0; e < E; e++) {
      const c = counts[l * E + e]!;
      if (c > 0) row.push(e, c);
    }
    out.push(row);
  }
  return out;
}
