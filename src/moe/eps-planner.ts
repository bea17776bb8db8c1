// EPS-MoE expert pipeline scheduling: per MoE layer and step, pick the expert kernel that fits the
// load (one GroupGemm over all experts, or a DenseGemm per expert) and the number of pipeline chunks
// PN that best overlaps the all2all of one chunk with the expert GEMMs of another. The expert cost
// table is calibrated once per machine and expert shape by a short microbenchmark, cached on disk; the
// per-chunk overhead is measured online per comm group (ChunkOverheadEstimator).
import { mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { mulberry32 } from '../engine/rng.js';
import { loadNative, type DType, type ExpertTable } from '../native/index.js';
import { perExpertFfn } from './expert-ffn.js';

export type ExpertKernel = 'group' | 'dense';

/** Time per active expert (ms) at a given number of rows per expert, for both kernels. */
export interface CostTable {
  key: string;
  rows: number[];          // ascending rows per expert at which both kernels were timed
  groupMs: number[];       // per active expert
  denseMs: number[];       // per active expert
}

export interface CommModel {
  /** All2all bandwidth (bytes per ms) and per-call latency (ms); absent = one rank, no comm. */
  bytesPerMs: number;
  latencyMs: number;
  /**
   * What each chunk beyond the first adds to the layer beyond its bytes and GEMMs (ms): the rank
   * handshakes, thread wake-ups and per-chunk bookkeeping that the link latency does not see.
   * Measured online (ChunkOverheadEstimator); absent = 0.
   */
  chunkOverheadMs?: number;
}

export interface EpsPlan {
  kernel: ExpertKernel;
  /** Pipeline chunks (1 = no pipelining). */
  chunks: number;
  /** Predicted expert time of each kernel for this load (ms). */
  groupMs: number;
  denseMs: number;
  /** Predicted time of the chosen schedule including communication (ms). */
  totalMs: number;
}

/** Piecewise-linear interpolation in log(rows), clamped at the ends (extrapolates linearly in rows). */
function interp(rows: number[], ms: number[], r: number): number {
  if (r <= rows[0]!) return ms[0]!;
  const last = rows.length - 1;
  if (r >= rows[last]!) return ms[last]! * (r / rows[last]!);
  let i = 1;
  while (rows[i]! < r) i++;
  const a = Math.log(rows[i - 1]!);
  const b = Math.log(rows[i]!);
  const t = (Math.log(r) - a) / (b - a);
  return ms[i - 1]! + t * (ms[i]! - ms[i - 1]!);
}

export class EpsPlanner {
  constructor(readonly table: CostTable, readonly comm: CommModel | null = null,
              readonly force: ExpertKernel | null = null, readonly maxChunks = 8) {}

  /** Expert time (ms) of one kernel for these per-expert row counts. */
  expertMs(kernel: ExpertKernel, counts: ArrayLike<number>, scale = 1): number {
    const ms = kernel === 'group' ? this.table.groupMs : this.table.denseMs;
    let t = 0;
    for (let e = 0; e < counts.length; e++) {
      const r = counts[e]! * scale;
      if (r > 0) t += interp(this.table.rows, ms, Math.max(1, r));
    }
    return t;
  }

  /**
   * counts [E]: rows per expert this step; rowBytes: bytes per dispatched row (hidden * 4).
   * time(PN) = dispatch(chunk 1) + sum_i max(experts(chunk i), comm(chunk i+1)) + combine(last).
   * With `ranks` (expert parallelism: each rank's expert slice, and which one is this rank) the
   * experts of a chunk take as long as the slowest rank's share, and only the rows that leave this
   * rank travel.
   */
  plan(counts: ArrayLike<number>, rowBytes: number, ranks?: { slices: [number, number][]; self: number }): EpsPlan {
    const groupMs = this.expertMs('group', counts);
    const denseMs = this.expertMs('dense', counts);
    const kernel = this.kernelOf(groupMs, denseMs);
    if (!this.comm) return { kernel, chunks: 1, groupMs, denseMs, totalMs: kernel === 'group' ? groupMs : denseMs };
    const { rows, parts } = loadShape(counts, ranks);
    const overheadMs = Math.max(0, this.comm.chunkOverheadMs ?? 0);
    let best: EpsPlan | null = null;
    for (let pn = 1; pn <= this.maxChunks; pn++) {
      const total = this.pipelineMs(kernel, rows, parts, rowBytes, pn) + (pn - 1) * overheadMs;
      // NOTE: strictly better only: ties keep fewer chunks (fewer collectives, same prediction).
      if (!best || total < best.totalMs * (1 - 1e-9)) best = { kernel, chunks: pn, groupMs, denseMs, totalMs: total };
    }
    return best!;
  }

  /** The forced kernel, else the cheaper one (ties: GroupGemm). */
  private kernelOf(groupMs: number, denseMs: number): ExpertKernel {
    return this.force ?? (denseMs < groupMs ? 'dense' : 'group');
  }

  /**
   * The model's time of this load at PN chunks without the per-chunk overhead (ms): what the
   * overhead estimator compares a measured layer against. Same arguments as plan().
   */
  scheduleMs(counts: ArrayLike<number>, rowBytes: number, pn: number,
             ranks?: { slices: [number, number][]; self: number }): number {
    const groupMs = this.expertMs('group', counts);
    const denseMs = this.expertMs('dense', counts);
    const kernel = this.kernelOf(groupMs, denseMs);
    if (!this.comm) return kernel === 'group' ? groupMs : denseMs;
    const { rows, parts } = loadShape(counts, ranks);
    return this.pipelineMs(kernel, rows, parts, rowBytes, pn);
  }

  /**
   * rows: rows that leave this rank; parts: each rank's per-expert counts. Dispatch of chunk 1,
   * then each chunk's experts overlapped with the next chunk's dispatch and the previous chunk's
   * combine, then the last combine.
   */
  private pipelineMs(kernel: ExpertKernel, rows: number, parts: number[][], rowBytes: number, pn: number): number {
    const comm = this.comm!.latencyMs + (rows / pn) * rowBytes / this.comm!.bytesPerMs;
    const experts = Math.max(...parts.map((p) => this.expertMs(kernel, p, 1 / pn)));
    return comm + (pn - 1) * Math.max(experts, 2 * comm) + experts + comm;
  }

  /**
   * Rows per expert from which DenseGemm is predicted to beat GroupGemm at every calibrated point
   * onwards (Infinity: never; a win at a few rows only is noise or a small-load effect, not a crossover).
   */
  crossoverRows(): number {
    const { rows, groupMs, denseMs } = this.table;
    let from = Infinity;
    for (let i = rows.length - 1; i >= 0 && denseMs[i]! < groupMs[i]!; i--) from = rows[i]!;
    return from;
  }
}

/**
 * The per-chunk overhead of one comm group, measured online. Each pipelined layer reports its wall
 * time minus the model's prediction at the PN it ran (its residual); the overhead is the least-squares
 * slope over PN of the residuals' per-PN lower quartiles, so that what every layer pays whatever its PN
 * (routing, the counts exchange, a peer's skew, a cost table off by the machine's load) is not
 * charged to chunks. Until a PN > 1 and PN 1 both have `samples` residuals, schedule() alternates
 * between them (the only steps that may run a PN the model would not pick).
 */
export class ChunkOverheadEstimator {
  /** PN -> its latest residuals (ms), at most `window`. */
  private readonly residuals = new Map<number, number[]>();

  private link = NaN;

  constructor(readonly samples = 5, readonly window = 15) {}

  /** A different link (a benchmark's simulated bandwidth) starts the measurement over. */
  useLink(bytesPerMs: number): this {
    if (bytesPerMs !== this.link) this.residuals.clear();
    this.link = bytesPerMs;
    return this;
  }

  /** Records a layer that ran `chunks` chunks in `measuredMs` where the model predicted `predictedMs` (no overhead). */
  record(chunks: number, measuredMs: number, predictedMs: number): void {
    const r = this.residuals.get(chunks) ?? [];
    r.push(measuredMs - predictedMs);
    if (r.length > this.window) r.shift();
    this.residuals.set(chunks, r);
  }

  /** Layers recorded at each PN (within the window). */
  recorded(): Map<number, number> {
    return new Map([...this.residuals].map(([pn, r]) => [pn, r.length]));
  }

  /** True once PN 1 and some PN > 1 have enough residuals for a slope. */
  calibrated(): boolean {
    if ((this.residuals.get(1)?.length ?? 0) < this.samples) return false;
    for (const [pn, r] of this.residuals) if (pn > 1 && r.length >= this.samples) return true;
    return false;
  }

  /** The PN to run, given the PN the model wants: `want` once calibrated, else PN 1 and `want` in turn. */
  schedule(want: number): number {
    if (want <= 1 || this.calibrated()) return want;
    const one = this.residuals.get(1)?.length ?? 0;
    return one <= (this.residuals.get(want)?.length ?? 0) ? 1 : want;
  }

  /**
   * Per-chunk overhead (ms, >= 0) over the PNs with `samples` residuals or more; 0 until calibrated
   * (NOTE: one slow layer, a first run at a new PN say, must not set it).
   */
  overheadMs(): number {
    if (!this.calibrated()) return 0;
    const pts = [...this.residuals].filter(([, r]) => r.length >= this.samples).map(([pn, r]) => [pn, lowQuartile(r)] as const);
    const mx = pts.reduce((a, [x]) => a + x, 0) / pts.length;
    const my = pts.reduce((a, [, y]) => a + y, 0) / pts.length;
    let sxy = 0, sxx = 0;
    for (const [x, y] of pts) { sxy += (x - mx) * (y - my); sxx += (x - mx) ** 2; }
    return Math.max(0, sxy / sxx);
  }
}

/**
 * The lower quartile: the machine's load only ever adds time (on a shared 2-vCPU VM, half of a PN's
 * layers can be slowed by tens of ms), so this is what a layer at that PN takes when undisturbed,
 * without resting on one lucky sample as a minimum would.
 */
function lowQuartile(v: number[]): number {
  const s = [...v].sort((a, b) => a - b);
  return s[Math.floor((s.length - 1) / 4)]!;
}

export interface ExpertShape { numExperts: number; hidden: number; inter: number; dtype: DType; fast: boolean }

export function costKey(shape: ExpertShape): string {
  const caps = loadNative().capabilities();
  const cpu = os.cpus()[0]?.model.trim() ?? 'cpu';
  return `${cpu}|${caps.simd}|t${caps.threads}|E${shape.numExperts}|H${shape.hidden}|I${shape.inter}|` +
    `${shape.dtype}|${shape.fast ? 'fast' : 'ref'}`;
}

/** Per-expert DenseGemm path: gate_up GEMM (gate | up columns), SiLU*up, down GEMM, for each expert. */
export function denseExpertsFfn(x: Float32Array, offsets: Int32Array, table: ExpertTable, hidden: number,
                                inter: number, y: Float32Array, fast: boolean, scratch?: Float32Array): void {
  const n = loadNative();
  perExpertFfn(x, offsets, table, hidden, inter, y, fast, { act: (gu, rows, h) => n.siluMul(gu, rows, inter, h) }, scratch);
}

/**
 * Times both kernels at several rows-per-expert on random weights of this shape. Bounded for large
 * experts: two active experts sharing one random source, and only the row counts whose call stays
 * under ~12 GFLOP (tens of ms here; the cost model extrapolates linearly in rows beyond the last point).
 */
export function calibrate(shape: ExpertShape, opts: { rows?: number[]; reps?: number; maxFlop?: number } = {}): CostTable {
  const n = loadNative();
  const { hidden: H, inter: I } = shape;
  const active = Math.max(1, Math.min(shape.numExperts, 2));
  const flopPerRow = 6 * H * I;
  const maxFlop = opts.maxFlop ?? 12e9;
  const candidates = opts.rows ?? [1, 4, 16, 64, 256];
  const rowsList = candidates.filter((r, i) => i === 0 || active * r * flopPerRow <= maxFlop);
  const reps = opts.reps ?? 3;
  const table = new n.ExpertTable(active, H, I);
  const rand = (len: number, seed: number) => {
    const a = new Float32Array(len);
    const next = mulberry32(seed);
    for (let i = 0; i < len; i++) a[i] = (next() - 0.5) * 0.1;
    return a;
  };
  const toDtype = (a: Float32Array): Float32Array | Uint16Array => {
    if (shape.dtype === 'f32') return a;
    const u = new Uint16Array(a.length);
    n.convert(a, 'f32', u, shape.dtype);
    return u;
  };
  const src = toDtype(rand(I * H, 1)); // [I, H] == [H, I] elements: one source serves every matrix
  for (let e = 0; e < active; e++) {
    const gu = n.packGateUp(src, src, shape.dtype, I, H);
    const dn = n.packWeight(src, shape.dtype, H, I);
    table.set(e, gu, dn);
    gu.dispose();
    dn.dispose();
  }
  const groupMs: number[] = [];
  const denseMs: number[] = [];
  try {
    for (const r of rowsList) {
      const offsets = Int32Array.from({ length: active + 1 }, (_, e) => e * r);
      const x = rand(active * r * H, 2 + r);
      const y = new Float32Array(active * r * H);
      const time = (fn: () => void): number => {
        fn();
        const t: number[] = [];
        for (let i = 0; i < reps; i++) {
          const t0 = performance.now();
          fn();
          t.push(performance.now() - t0);
        }
        t.sort((a, b) => a - b);
        return t[Math.floor(t.length / 2)]! / active;
      };
      groupMs.push(time(() => n.groupGemmFfn(x, offsets, table, y, shape.fast)));
      denseMs.push(time(() => denseExpertsFfn(x, offsets, table, H, I, y, shape.fast)));
    }
  } finally {
    table.dispose();
  }
  return { key: costKey(shape), rows: rowsList, groupMs, denseMs };
}

function cacheFile(): string {
  const dir = process.env.EXPERTD_CACHE_DIR ?? path.join(os.homedir(), '.cache', 'expertd');
  return path.join(dir, 'eps-cost.json');
}

/** The calibrated table for this shape from the on-disk cache, calibrating (and saving) if absent. */
export function loadOrCalibrate(shape: ExpertShape): CostTable {
  return cachedCostTable(costKey(shape), () => calibrate(shape));
}

/**
 * The cost table stored under `key` in the on-disk cache (~/.cache/expertd/eps-cost.json, or
 * $EXPERTD_CACHE_DIR), else `calibrate()`'s, saved for the next start (CPU and device tables alike).
 */
export function cachedCostTable(key: string, calibrate: () => CostTable): CostTable {
  const file = cacheFile();
  let all: Record<string, CostTable> = {};
  try {
    all = JSON.parse(readFileSync(file, 'utf8')) as Record<string, CostTable>;
  } catch {
    all = {};
  }
  const hit = all[key];
  if (hit && Array.isArray(hit.rows) && hit.rows.length === hit.groupMs.length) return hit;
  const table = { ...calibrate(), key };
  all[key] = table;
  try {
    mkdirSync(path.dirname(file), { recursive: true });
    const tmp = `${file}.${process.pid}.tmp`;
    writeFileSync(tmp, JSON.stringify(all, null, 1));
    renameSync(tmp, file);
  } catch {
    // A read-only cache folder only costs a recalibration next start.
  }
  return table;
}

/**
 * rows: the rows that leave this rank (all rows without ranks); parts: each rank's per-expert
 * counts (one part without ranks).
 */
function loadShape(counts: ArrayLike<number>, ranks?: { slices: [number, number][]; self: number }): { rows: number; parts: number[][] } {
  let rows = 0;
  for (let e = 0; e < counts.length; e++) rows += counts[e]!;
  const slices = ranks?.slices ?? [[0, counts.length] as [number, number]];
  if (ranks) {
    const [a, b] = slices[ranks.self]!;
    for (let e = a; e < b; e++) rows -= counts[e]!;
  }
  return { rows, parts: slices.map(([a, b]) => Array.prototype.slice.call(counts, a, b) as number[]) };
}
