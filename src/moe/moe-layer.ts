// The MoE layer as one pipeline:
//   [Router] -> [trace hook] -> [ensure experts resident] -> [Dispatch] -> [Experts] -> [Combine]
// plus the shared expert (Qwen2-MoE with its sigmoid gate, DeepSeek) added to the routed output.
import { loadNative, type ExpertTable, type PackedWeight, type RouteOptions } from '../native/index.js';
import type { Scratch } from '../model/forward-batch.js';
import type { MoeSpec } from '../model/spec.js';
import type { ExpertComm } from './comm.js';

export interface MoeHooks {
  /** Called after routing with this layer's choices ([T, k] ids) and counts ([E]). */
  onRouted?(moeLayer: number, ids: Int32Array, counts: Int32Array, tokens: number): void;
  /** Makes every expert with counts[e] > 0 resident in `table` before the experts run. */
  ensureResident?(moeLayer: number, counts: Int32Array, table: ExpertTable): void;
}

export interface MoeWeights {
  gate: PackedWeight;                 // router [E, H]
  correctionBias: Float32Array | null; // [E] f32 (DeepSeek-V3)
  experts: ExpertTable;               // routed experts (or cache slots bound by the offloader)
  shared: ExpertTable | null;         // shared experts fused as one FFN
  sharedGate: PackedWeight | null;    // [1, H] (Qwen2-MoE)
}

export class MoeLayer {
  private readonly routeOpts: RouteOptions;

  constructor(readonly moeIndex: number, private readonly spec: MoeSpec, readonly weights: MoeWeights,
              private readonly hidden: number, private readonly comm: ExpertComm) {
    const r = spec.router;
    this.routeOpts = {
      scoring: r.scoring, bias: weights.correctionBias, nGroup: r.nGroup, topkGroup: r.topkGroup,
      groupScore: r.groupScore, renormalize: r.renormalize, scale: r.scale,
    };
  }

  /** x [T, H] normalised hidden -> out [T, H] (overwritten). Returns the chosen ids [T, k]. */
  forward(x: Float32Array, T: number, out: Float32Array, scratch: Scratch, fast: boolean,
          hooks: MoeHooks, idsOut: Int32Array): void {
    const n = loadNative();
    const H = this.hidden;
    const E = this.spec.numExperts;
    const k = this.spec.router.topK;
    // Router: always in reference precision, so fast mode never changes which experts run.
    const logits = scratch.f32('moe.logits', T * E);
    n.denseGemm(x, T, this.weights.gate, logits, null, false, false);
    const weights = scratch.f32('moe.weights', T * k);
    const counts = scratch.i32('moe.counts', E);
    n.route(logits, T, E, k, this.routeOpts, idsOut, weights, counts);
    hooks.onRouted?.(this.moeIndex, idsOut, counts, T);
    hooks.ensureResident?.(this.moeIndex, counts, this.weights.experts);
    // Dispatch.
    const xPerm = scratch.f32('moe.xperm', T * k * H);
    const permIndex = scratch.i32('moe.perm', T * k);
    const offsets = scratch.i32('moe.offsets', E + 1);
    n.permute(x, T, H, idsOut, k, E, xPerm, permIndex, offsets);
    const local = this.comm.dispatch(xPerm, offsets, H);
    // Experts: one grouped GEMM over every expert that got rows.
    const yLocal = scratch.f32('moe.ylocal', local.x.length);
    n.groupGemmFfn(local.x, local.offsets, this.weights.experts, yLocal, fast);
    const yPerm = scratch.f32('moe.yperm', T * k * H);
    this.comm.combine(yLocal, yPerm, H);
    // Combine: weighted sum of each token's k outputs.
    n.unpermuteCombine(yPerm, permIndex, weights, T, k, H, out, false);
    if (this.weights.shared) this.addShared(x, T, out, scratch, fast);
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
