// The MoE layer as one pipeline:
//   [Router] -> [trace hook] -> [ensure experts resident] -> [Dispatch] -> [Experts] -> [Combine]
// plus the shared expert (Qwen2-MoE with its sigmoid gate, DeepSeek) added to the routed output.
// EPS-MoE: the tokens split into PN chunks; chunk i+1's dispatch and chunk i-1's combine travel on
// the comm thread while chunk i's expert GEMMs run here, and the shared expert overlaps the first
// dispatch. Every row's arithmetic is the same for every PN, so outputs do not depend on it.
import { loadNative, type ExpertTable, type PackedWeight, type RouteOptions } from '../native/index.js';
import type { Scratch } from '../model/forward-batch.js';
import type { MoeSpec } from '../model/spec.js';
import { SingleRankComm, type ChunkRoutes, type ExpertComm, type Inflight } from './comm.js';
import { contiguousPlacement } from './ep-comm.js';
import { ChunkOverheadEstimator, denseExpertsFfn, EpsPlanner, type EpsPlan, type ExpertKernel } from './eps-planner.js';
import { clampedSwigluExpertsFfn } from './expert-ffn.js';

/** Pipeline chunks per MoE layer: the planner's choice per layer and step, or a fixed count. */
export type PipelineChunks = 'auto' | number;

/** Most chunks the planner considers. */
export const MAX_AUTO_CHUNKS = 8;

/** Per comm group (shared by its layers): the planner's measured per-chunk overhead. */
const chunkOverheads = new WeakMap<ExpertComm, ChunkOverheadEstimator>();

export function chunkOverheadOf(comm: ExpertComm): ChunkOverheadEstimator {
  let est = chunkOverheads.get(comm);
  if (!est) chunkOverheads.set(comm, est = new ChunkOverheadEstimator());
  return est;
}

export interface MoeHooks<T = ExpertTable> {
  /** Called after routing with this layer's choices ([T, k] ids) and counts ([E]). */
  onRouted?(moeLayer: number, ids: Int32Array, counts: Int32Array, tokens: number): void;
  /** Makes every expert with counts[e] > 0 resident in `table` before the experts run. */
  ensureResident?(moeLayer: number, counts: Int32Array, table: T): void;
}

export interface MoeWeights {
  gate: PackedWeight;                 // router [E + Z, H]
  gateBias: Float32Array | null;      // [E + Z] router Linear bias (LongCat-Flash router_bias)
  correctionBias: Float32Array | null; // [E + Z] f32, choice only (DeepSeek-V3, LongCat-Flash)
  experts: ExpertTable;               // routed experts (or cache slots bound by the offloader)
  shared: ExpertTable | null;         // shared experts fused as one FFN
  sharedGate: PackedWeight | null;    // [1, H] (Qwen2-MoE)
  /** gpt-oss: per-expert biases, gateUp [E, 2I] as [gate | up], down [E, H] f32; else null/absent. */
  expertBias?: { gateUp: Float32Array; down: Float32Array } | null;
}

/** A routed batch whose pipeline has started (see begin/compute/finish). */
export interface MoePending {
  x: Float32Array;
  tokens: number;
  /** Token bounds of the chunks: chunk c is tokens [bounds[c], bounds[c + 1]). */
  bounds: number[];
  routes: ChunkRoutes;
  permIndex: Int32Array;
  weights: Float32Array;
  /** [T * k, H]: chunk c's rows at [k * bounds[c], k * bounds[c + 1]). */
  xPerm: Float32Array;
  yPerm: Float32Array;
  /** Per chunk, the rows this rank computes [local[c] rows, H] and their outputs. */
  xLocal: Float32Array[];
  yLocal: Float32Array[];
  dispatches: Inflight<void>[];
  combines: Inflight<void>[];
  /** The shared expert's output (computed while the first dispatch travels), gated. */
  shared: Float32Array | null;
  computed: boolean;
  /** finish() has written the output (a second call does nothing). */
  finished: boolean;
  /** The planner chose PN: when the layer began (ms) and the model's time at the agreed PN, for the overhead estimator. */
  timing?: { startedAt: number; predictedMs: number };
}

export class MoeLayer {
  private readonly routeOpts: RouteOptions;
  /** Real experts E; identity ("zero-computation") experts are ids E..E+Z-1. */
  readonly numExperts: number;
  readonly zeroExperts: number;
  /** EPS-MoE kernel choice; absent = always GroupGemm. */
  planner: EpsPlanner | null = null;
  /** EPS-MoE chunking: 'auto' = the planner's PN (1 without a planner or a link to hide). */
  pipelineChunks: PipelineChunks = 'auto';
  /** The plan of the last step (kernel choice, chunks) for metrics. */
  lastPlan: EpsPlan | null = null;

  constructor(readonly moeIndex: number, private readonly spec: MoeSpec, readonly weights: MoeWeights,
              private readonly hidden: number, private readonly comm: ExpertComm) {
    const r = spec.router;
    this.numExperts = spec.numExperts;
    this.zeroExperts = spec.zeroExperts ?? 0;
    this.routeOpts = {
      scoring: r.scoring, bias: weights.correctionBias, nGroup: r.nGroup, topkGroup: r.topkGroup,
      groupScore: r.groupScore, renormalize: r.renormalize, scale: r.scale,
    };
  }

  /** x [T, H] normalised hidden -> out [T, H] (overwritten); idsOut [T, k] gets the chosen ids. */
  forward(x: Float32Array, T: number, out: Float32Array, scratch: Scratch, fast: boolean,
          hooks: MoeHooks, idsOut: Int32Array): void {
    if (this.comm instanceof SingleRankComm && (this.pipelineChunks === 'auto' || this.pipelineChunks === 1)) {
      this.forwardLocal(x, T, out, scratch, fast, hooks, idsOut);
      return;
    }
    const p = this.begin(x, T, scratch, hooks, idsOut);
    if (this.weights.shared) p.shared = this.sharedFfn(x, T, scratch, fast);
    this.compute(p, scratch, fast);
    this.finish(p, out, scratch, fast);
  }

  /**
   * One rank, one chunk (what every single-process step runs): the pipeline's arithmetic without
   * its chunk bookkeeping. Routing, permutation, the experts where the permutation put their rows
   * and the combine run on scratch buffers; the same calls on the same rows as begin / compute /
   * finish with PN = 1, so the same bits.
   * NOTE: the general path's per-layer objects (chunk bounds, offsets per chunk, views per chunk,
   * the pending record) cost ~10 us of JS per layer and step, 2-3% of a qwen3moe-like int4 decode.
   */
  private forwardLocal(x: Float32Array, T: number, out: Float32Array, scratch: Scratch, fast: boolean,
                       hooks: MoeHooks, idsOut: Int32Array): void {
    const n = loadNative();
    const H = this.hidden, E = this.numExperts, ET = E + this.zeroExperts, k = this.spec.router.topK;
    const { weights, counts } = this.routeTokens(x, T, scratch, hooks, idsOut);
    const rows = T * k;
    const xPerm = scratch.f32('moe.xperm', rows * H), yPerm = scratch.f32('moe.yperm', rows * H);
    const permIndex = scratch.i32('moe.perm', rows), offsets = scratch.i32('moe.offsets', ET + 1);
    if (T > 0) n.permute(x.subarray(0, T * H), T, H, idsOut, k, ET, xPerm, permIndex, offsets);
    else offsets.fill(0);
    const shared = this.weights.shared ? this.sharedFfn(x, T, scratch, fast) : null;
    const kernel = this.planKernel(counts.subarray(0, E), 1);
    this.runExperts(kernel, xPerm, offsets, yPerm, scratch, fast);
    if (T > 0) n.unpermuteCombine(yPerm, permIndex, weights, T, k, H, out.subarray(0, T * H), false);
    if (shared) for (let i = 0; i < T * H; i++) out[i] = out[i]! + shared[i]!;
  }

  /** Router -> routing -> trace hook -> residency: the ids in idsOut, their weights and per-expert counts. */
  private routeTokens(x: Float32Array, T: number, scratch: Scratch, hooks: MoeHooks, idsOut: Int32Array):
      { weights: Float32Array; counts: Int32Array } {
    const n = loadNative();
    const E = this.numExperts, ET = E + this.zeroExperts, k = this.spec.router.topK;
    // Router: always in reference precision, so fast mode never changes which experts run.
    const logits = scratch.f32('moe.logits', T * ET);
    n.denseGemm(x, T, this.weights.gate, logits, this.weights.gateBias, false, false);
    const weights = scratch.f32('moe.weights', T * k);
    const counts = scratch.i32('moe.counts', ET);
    n.route(logits, T, ET, k, this.routeOpts, idsOut, weights, counts);
    hooks.onRouted?.(this.moeIndex, idsOut, counts, T);
    hooks.ensureResident?.(this.moeIndex, counts.subarray(0, E), this.weights.experts);
    return { weights, counts };
  }

  /** The expert kernel for this step's local load (counts [E] summed over chunks); records lastPlan. */
  private planKernel(counts: Int32Array, chunks: number): ExpertKernel {
    if (this.planner) {
      this.lastPlan = { ...this.planner.plan(counts, this.hidden * 4), chunks };
      return this.lastPlan.kernel;
    }
    this.lastPlan = { kernel: 'group', chunks, groupMs: 0, denseMs: 0, totalMs: 0 };
    return 'group';
  }

  /**
   * The experts on one chunk's rows: x [local[E + Z], H] in expert order (local [E + Z + 1] its
   * offsets) -> y. Expert-contiguous order puts identity experts' rows last, [local[E], local[E+Z]):
   * they are copied through.
   */
  private runExperts(kernel: ExpertKernel, x: Float32Array, local: Int32Array, y: Float32Array,
                     scratch: Scratch, fast: boolean): void {
    const H = this.hidden, E = this.numExperts, ET = E + this.zeroExperts;
    const offsets = local.subarray(0, E + 1);
    if (this.spec.clampedSwiglu || kernel === 'dense') {
      let maxRows = 1;
      for (let e = 0; e < E; e++) maxRows = Math.max(maxRows, local[e + 1]! - local[e]!);
      const buf = scratch.f32('moe.dense', 3 * this.spec.intermediate * maxRows);
      if (this.spec.clampedSwiglu) {
        clampedSwigluExpertsFfn(x, offsets, this.weights.experts, this.weights.expertBias!, H, this.spec.intermediate,
          this.spec.clampedSwiglu, y, fast, buf);
      } else {
        denseExpertsFfn(x, offsets, this.weights.experts, H, this.spec.intermediate, y, fast, buf);
      }
    } else {
      loadNative().groupGemmFfn(x, offsets, this.weights.experts, y, fast);
    }
    if (ET > E) y.set(x.subarray(local[E]! * H, local[ET]! * H), local[E]! * H);
  }

  /**
   * Router -> trace -> residency -> chunking -> counts exchange -> first chunk's dispatch queued. A
   * shortcut-connected (ScMoE) layer calls this early and runs attention and dense FFNs before
   * compute() and finish(), which is where the all2all hides.
   */
  begin(x: Float32Array, T: number, scratch: Scratch, hooks: MoeHooks, idsOut: Int32Array): MoePending {
    const n = loadNative();
    const H = this.hidden;
    const E = this.numExperts;
    const ET = E + this.zeroExperts;
    const k = this.spec.router.topK;
    const { weights, counts } = this.routeTokens(x, T, scratch, hooks, idsOut);
    const startedAt = performance.now();
    const choice = this.chooseChunks(counts.subarray(0, E), T);
    const PN = Math.max(1, this.comm.agreeChunks(choice.chunks));
    const bounds = Array.from({ length: PN + 1 }, (_, c) => Math.floor((c * T) / PN));
    const xPerm = scratch.f32('moe.xperm', T * k * H);
    const permIndex = scratch.i32('moe.perm', T * k);
    const offsets = bounds.slice(0, PN).map((a, c) => {
      const b = bounds[c + 1]!;
      const off = new Int32Array(ET + 1);
      if (b > a) {
        n.permute(x.subarray(a * H, b * H), b - a, H, idsOut.subarray(a * k, b * k), k, ET,
          xPerm.subarray(a * k * H, b * k * H), permIndex.subarray(a * k, b * k), off);
      }
      return off;
    });
    const p = this.start(x, T, bounds, offsets, xPerm, permIndex, weights, scratch);
    if (choice.planner && choice.counts) {
      p.timing = { startedAt, predictedMs: choice.planner.scheduleMs(choice.counts, H * 4, PN, choice.ranks) };
    }
    return p;
  }

  /** The counts exchange, buffers, and the first chunk's dispatch. */
  private start(x: Float32Array, T: number, bounds: number[], offsets: Int32Array[], xPerm: Float32Array,
                permIndex: Int32Array, weights: Float32Array, scratch: Scratch): MoePending {
    const H = this.hidden, k = this.spec.router.topK;
    const routes = this.comm.routeChunks(offsets);
    const rows = routes.local.map((l) => l.at(-1)!);
    const total = rows.reduce((a, v) => a + v, 0);
    const yPerm = scratch.f32('moe.yperm', T * k * H);
    const xLocal: Float32Array[] = [], yLocal: Float32Array[] = [];
    if (this.comm instanceof SingleRankComm) {
      // One rank computes every row where the permutation put it: the experts read xPerm and write
      // yPerm in place (the comm's dispatch and combine see the same memory and copy nothing).
      for (let c = 0; c + 1 < bounds.length; c++) {
        xLocal.push(xPerm.subarray(k * bounds[c]! * H, k * bounds[c + 1]! * H));
        yLocal.push(yPerm.subarray(k * bounds[c]! * H, k * bounds[c + 1]! * H));
      }
    } else {
      const xAll = scratch.f32('moe.xlocal', total * H), yAll = scratch.f32('moe.ylocal', total * H);
      let at = 0;
      for (const r of rows) {
        xLocal.push(xAll.subarray(at * H, (at + r) * H));
        yLocal.push(yAll.subarray(at * H, (at + r) * H));
        at += r;
      }
    }
    const p: MoePending = {
      x, tokens: T, bounds, routes, permIndex, weights, xPerm, yPerm,
      xLocal, yLocal, dispatches: [], combines: [], shared: null, computed: false, finished: false,
    };
    p.dispatches.push(this.comm.dispatchChunk(routes, 0, this.chunkRows(p, p.xPerm, 0), xLocal[0]!, H));
    return p;
  }

  /** Chunk c's rows of a [T * k, H] buffer. */
  private chunkRows(p: MoePending, buf: Float32Array, c: number): Float32Array {
    const H = this.hidden, k = this.spec.router.topK;
    return buf.subarray(k * p.bounds[c]! * H, k * p.bounds[c + 1]! * H);
  }

  /**
   * This rank's wish for PN: forced, else the planner's on this step's routed counts, the link and
   * the measured per-chunk overhead (while that is being measured, PN 1 and the wish in turn).
   */
  private chooseChunks(counts: Int32Array, T: number): {
    chunks: number; planner?: EpsPlanner; ranks?: { slices: [number, number][]; self: number }; counts?: ArrayLike<number>;
  } {
    if (this.pipelineChunks !== 'auto') return { chunks: this.pipelineChunks };
    const model = this.comm.commModel?.();
    if (!this.planner || !model || this.comm.worldSize === 1 || T === 0) return { chunks: 1 };
    const W = this.comm.worldSize;
    // The planner takes each rank's experts as a contiguous slice: hand it the counts grouped by
    // owner (the counts themselves for contiguous slices).
    const P = this.comm.placement ?? contiguousPlacement(this.numExperts, W);
    const grouped = P.contiguous ? counts : new Int32Array(this.numExperts);
    const slices: [number, number][] = [];
    let at = 0;
    for (const list of P.experts) {
      const from = at;
      for (const e of list) { if (grouped !== counts) grouped[at] = counts[e]!; at++; }
      slices.push([from, at]);
    }
    const ranks = { slices, self: this.comm.rank };
    const est = chunkOverheadOf(this.comm).useLink(model.bytesPerMs);
    const planner = new EpsPlanner(this.planner.table, { ...model, chunkOverheadMs: est.overheadMs() },
      this.planner.force, MAX_AUTO_CHUNKS);
    const want = Math.min(T, planner.plan(grouped, this.hidden * 4, ranks).chunks);
    return { chunks: est.schedule(want), planner, ranks, counts: grouped };
  }

  /**
   * The pipeline proper: for each chunk, queue the next chunk's dispatch, wait for this one's rows,
   * run their expert GEMMs, queue their combine. One kernel for every chunk (chosen on the whole
   * step's local load), so that the kernel does not depend on PN either.
   */
  compute(p: MoePending, scratch: Scratch, fast: boolean): void {
    if (p.computed) return;
    p.computed = true;
    const H = this.hidden, E = this.numExperts;
    const { routes } = p;
    const PN = routes.chunks;
    const counts = scratch.i32('moe.localcounts', E);
    counts.fill(0);
    for (const l of routes.local) for (let e = 0; e < E; e++) counts[e] = counts[e]! + l[e + 1]! - l[e]!;
    const kernel = this.planKernel(counts, PN);
    for (let c = 0; c < PN; c++) {
      if (c + 1 < PN) p.dispatches.push(this.comm.dispatchChunk(routes, c + 1, this.chunkRows(p, p.xPerm, c + 1), p.xLocal[c + 1]!, H));
      p.dispatches[c]!.wait();
      const y = p.yLocal[c]!;
      this.runExperts(kernel, p.xLocal[c]!, routes.local[c]!, y, scratch, fast);
      p.combines.push(this.comm.combineChunk(routes, c, y, this.chunkRows(p, p.yPerm, c), H));
    }
  }

  /** Waits for each chunk's combine and sums its tokens' k outputs (+ the shared expert). */
  finish(p: MoePending, out: Float32Array, scratch: Scratch, fast: boolean): void {
    const n = loadNative();
    const H = this.hidden, k = this.spec.router.topK;
    if (p.finished) return;
    p.finished = true;
    this.compute(p, scratch, fast);
    for (let c = 0; c < p.routes.chunks; c++) {
      p.combines[c]!.wait();
      const a = p.bounds[c]!, b = p.bounds[c + 1]!;
      if (b > a) {
        n.unpermuteCombine(this.chunkRows(p, p.yPerm, c), p.permIndex.subarray(a * k, b * k),
          p.weights.subarray(a * k, b * k), b - a, k, H, out.subarray(a * H, b * H), false);
      }
    }
    if (p.timing) chunkOverheadOf(this.comm).record(p.routes.chunks, performance.now() - p.timing.startedAt, p.timing.predictedMs);
    if (this.weights.shared) {
      const y = p.shared ?? this.sharedFfn(p.x, p.tokens, scratch, fast);
      for (let i = 0; i < p.tokens * H; i++) out[i] = out[i]! + y[i]!;
    }
  }

  /**
   * An expert rank's part of this layer (expert parallelism): no tokens of its own, it computes the
   * rows other ranks route to its experts, chunk by chunk, and sends the results back.
   */
  serveRemote(scratch: Scratch, fast: boolean): void {
    const ET = this.numExperts + this.zeroExperts;
    const PN = Math.max(1, this.comm.agreeChunks(0));
    const empty = new Float32Array(0);
    const p = this.start(empty, 0, new Array<number>(PN + 1).fill(0),
      Array.from({ length: PN }, () => new Int32Array(ET + 1)), empty, new Int32Array(0), empty, scratch);
    this.compute(p, scratch, fast);
    for (const c of p.combines) c.wait();
  }

  /** The shared expert on all T tokens, times its sigmoid gate (Qwen2-MoE): [T, H]. */
  private sharedFfn(x: Float32Array, T: number, scratch: Scratch, fast: boolean): Float32Array {
    const n = loadNative();
    const H = this.hidden;
    const offsets = scratch.i32('moe.shared.offsets', 2);
    offsets[0] = 0;
    offsets[1] = T;
    const y = scratch.f32('moe.shared.y', T * H);
    n.groupGemmFfn(x, offsets, this.weights.shared!, y, fast);
    if (this.weights.sharedGate) {
      const g = scratch.f32('moe.shared.gate', T);
      n.denseGemm(x, T, this.weights.sharedGate, g, null, false, false);
      for (let t = 0; t < T; t++) {
        const s = 1 / (1 + Math.exp(-g[t]!));
        for (let i = t * H; i < (t + 1) * H; i++) y[i] = s * y[i]!;
      }
    }
    return y;
  }

  dispose(): void {
    this.weights.gate.dispose();
    this.weights.experts.dispose();
    this.weights.shared?.dispose();
    this.weights.sharedGate?.dispose();
  }
}
