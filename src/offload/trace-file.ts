// The routing trace on disk (the --trace-dir folder): trace-meta.json (model shape) and
// trace.jsonl, one line per engine step with each request's per-layer expert counts and the
// requests that finished after it. Replay, summaries and heatmaps read it back.
import fs from 'node:fs';
import path from 'node:path';

export const TRACE_FILE = 'trace.jsonl';
export const TRACE_META_FILE = 'trace-meta.json';

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

/** Appends steps to dir/trace.jsonl, buffered (flushed every `flushEvery` steps and on flush()). */
export class TraceWriter {
  private readonly file: string;
  private buffered: string[] = [];

  constructor(readonly dir: string, meta: TraceMeta, private readonly flushEvery = 64) {
    fs.mkdirSync(dir, { recursive: true });
    this.file = path.join(dir, TRACE_FILE);
    const metaFile = path.join(dir, TRACE_META_FILE);
    if (fs.existsSync(metaFile)) {
      const old = JSON.parse(fs.readFileSync(metaFile, 'utf8')) as TraceMeta;
      if (old.numLayers !== meta.numLayers || old.numExperts !== meta.numExperts || old.model !== meta.model) {
        // Another model's trace: keep it aside rather than mixing shapes in one file.
        const stamp = Date.now();
        if (fs.existsSync(this.file)) fs.renameSync(this.file, `${this.file}.${stamp}.old`);
        fs.renameSync(metaFile, `${metaFile}.${stamp}.old`);
      }
    }
    const tmp = `${metaFile}.tmp-${process.pid}`;
    fs.writeFileSync(tmp, JSON.stringify(meta, null, 2));
    fs.renameSync(tmp, metaFile);
  }

  append(step: TraceStep): void {
    this.buffered.push(JSON.stringify(step));
    if (this.buffered.length >= this.flushEvery) this.flush();
  }

  flush(): void {
    if (this.buffered.length === 0) return;
    fs.appendFileSync(this.file, `${this.buffered.join('\n')}\n`);
    this.buffered = [];
  }
}

/** Reads a trace folder; throws a sentence naming the folder when it holds no trace. */
export function readTrace(dir: string): Trace {
  const metaFile = path.join(dir, TRACE_META_FILE);
  const file = path.join(dir, TRACE_FILE);
  if (!fs.existsSync(metaFile) || !fs.existsSync(file))
    throw new Error(`${dir} holds no routing trace (${TRACE_META_FILE} and ${TRACE_FILE}); run the server with --trace-dir ${dir} first`);
  const meta = JSON.parse(fs.readFileSync(metaFile, 'utf8')) as TraceMeta;
  const steps: TraceStep[] = [];
  const lines = fs.readFileSync(file, 'utf8').split('\n');
  lines.forEach((line, i) => {
    if (!line.trim()) return;
    try {
      steps.push(JSON.parse(line) as TraceStep);
    } catch (e) {
      // A torn last line (crash mid-append) is dropped; a bad line elsewhere is an error.
      if (i < lines.length - 2) throw new Error(`${file}:${i + 1}: ${(e as Error).message}`);
    }
  });
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
