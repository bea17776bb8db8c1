// The MoE layer as one pipeline:
//   [Router] -> [trace hook] -> [ensure experts resident] -> [Dispatch] -> [Experts] -> [Combine]
// plus the shared expert (Qwen2-MoE with its sigmoid gate, DeepSeek) added to the routed output.
import { loadNative, type ExpertTable, type PackedWeight, type RouteOptions } from '../native/index.js';
import type { Scratch } from '../model/forward-batch.js';
import type { MoeSpec } from '../model/spec.js';
import type { ExpertComm } from './comm.js';
import { denseExpertsFfn, type EpsPlan, type EpsPlanner } from './eps-planner.js';

/** T: the expert table type (ExpertTable on the CPU, CudaExpertTable on a GPU). */
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
}

/** A routed, dispatched batch whose experts and combine have not run yet (see begin/finish). */
export interface MoePending {
  x: Float32Array;
  tokens: number;
  local: { x: Float32Array; offsets: Int32Array };
  permIndex: Int32Array;
  weights: Float32Array;
  offsets: Int32Array;
}

export class MoeLayer {
  private readonly routeOpts: RouteOptions;
  /** Real experts E; identity ("zero-computation") experts are ids E..E+Z-1. */
  readonly numExperts: number;
  readonly zeroExperts: number;
  /** EPS-MoE kernel choice; absent = always GroupGemm. */
  planner: EpsPlanner | null = null;
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
    this.finish(this.begin(x, T, scratch, hooks, idsOut), out, scratch, fast);
  }

  /**
   * Router -> trace -> residency -> Dispatch. A shortcut-connected (ScMoE) layer calls this early
   * and runs attention and dense FFNs before finish(), which is where the all2all hides.
   */
  begin(x: Float32Array, T: number, scratch: Scratch, hooks: MoeHooks, idsOut: Int32Array): MoePending {
    const n = loadNative();
    const H = this.hidden;
    const E = this.numExperts;
    const ET = E + this.zeroExperts;
    const k = this.spec.router.topK;
    // Router: always in reference precision, so fast mode never changes which experts run.
    const logits = scratch.f32('moe.logits', T * ET);
    n.denseGemm(x, T, this.weights.gate, logits, this.weights.gateBias, false, false);
    const weights = scratch.f32('moe.weights', T * k);
    const counts = scratch.i32('moe.counts', ET);
    n.route(logits, T, ET, k, this.routeOpts, idsOut, weights, counts);
    hooks.onRouted?.(this.moeIndex, idsOut, counts, T);
    hooks.ensureResident?.(this.moeIndex, counts.subarray(0, E), this.weights.experts);
    const xPerm = scratch.f32('moe.xperm', T * k * H);
    const permIndex = scratch.i32('moe.perm', T * k);
    const offsets = scratch.i32('moe.offsets', ET + 1);
    n.permute(x, T, H, idsOut, k, ET, xPerm, permIndex, offsets);
    const local = this.comm.dispatch(xPerm, offsets, H);
    return { x, tokens: T, local, permIndex, weights, offsets };
  }

  /** Experts (one grouped GEMM over every expert with rows) -> Combine (+ shared expert). */
  finish(p: MoePending, out: Float32Array, scratch: Scratch, fast: boolean): void {
    const n = loadNative();
    const H = this.hidden;
    const E = this.numExperts;
    const k = this.spec.router.topK;
    const T = p.tokens;
    const yLocal = scratch.f32('moe.ylocal', p.local.x.length);
    // Expert-contiguous order puts identity experts' rows last: [offsets[E], offsets[E+Z]).
    const offsets = p.local.offsets.subarray(0, E + 1);
    let kernel: 'group' | 'dense' = 'group';
    if (this.planner) {
      const counts = scratch.i32('moe.localcounts', E);
      for (let e = 0; e < E; e++) counts[e] = offsets[e + 1]! - offsets[e]!;
      this.lastPlan = this.planner.plan(counts, H * 4);
      kernel = this.lastPlan.kernel;
    }
    if (kernel === 'dense') {
      denseExpertsFfn(p.local.x, offsets, this.weights.experts, H, this.spec.intermediate, yLocal, fast,
        scratch.f32('moe.dense', 3 * this.spec.intermediate * Math.max(1, T * k)));
    } else {
      n.groupGemmFfn(p.local.x, offsets, this.weights.experts, yLocal, fast);
    }
    if (this.zeroExperts > 0) {
      const end = p.local.offsets[E + this.zeroExperts]!;
      yLocal.set(p.local.x.subarray(p.local.offsets[E]! * H, end * H), p.local.offsets[E]! * H);
    }
    const yPerm = scratch.f32('moe.yperm', T * k * H);
    this.comm.combine(yLocal, yPerm, H);
    n.unpermuteCombine(yPerm, p.permIndex, p.weights, T, k, H, out, false);
    if (this.weights.shared) this.addShared(p.x, T, out, scratch, fast);
  }
  /**
   * An expert rank's part of this layer (expert parallelism): no tokens of its own, it computes the
   * rows other ranks route to its experts and sends the results back.
   */
  serveRemote(scratch: Scratch, fast: boolean): void {
    const n = loadNative();
    const E = this.numExperts;
    const empty = new Float32Array(0);
    const local = this.comm.dispatch(empty, new Int32Array(E + this.zeroExperts + 1), this.hidden);
    const yLocal = scratch.f32('moe.ylocal', local.x.length);
    n.groupGemmFfn(local.x, local.offsets.subarray(0, E + 1), this.weights.experts, yLocal, fast);
    this.comm.combine(yLocal, empty, this.hidden);
  }

  private addShared(x: Float32Array, T: number, out: Float32Array, scratch: Scratch, fast: boolean): void {
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
        for (let i = t * H; i < (t + 1) * H; i++) out[i] = out[i]! + s * y[i]!;
      }
    } else {
      for (let i = 0; i < T * H; i++) out[i] = out[i]! + y[i]!;
    }
  }

  dispose(): void {
    this.weights.gate.dispose();
    this.weights.experts.dispose();
    this.weights.shared?.dispose();
    this.weights.sharedGate?.dispose();
  }
}
