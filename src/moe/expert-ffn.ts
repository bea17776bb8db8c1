// Expert FFNs one expert at a time (DenseGemm per expert): the EPS-MoE dense path (SiLU * up) and
// gpt-oss's experts on the CPU (biases and the clamped SwiGLU, which the fused GroupGemm has not).
import { loadNative, type ExpertTable } from '../native/index.js';

/** What differs between per-expert FFNs: the activation between the GEMMs, and optional biases. */
export interface PerExpertFfnOps {
  /** gu [rows, gate (I) | up (I)] -> h [rows, I]. */
  act(gu: Float32Array, rows: number, h: Float32Array): void;
  gateUpBias?(expert: number): Float32Array;
  downBias?(expert: number): Float32Array;
}

/**
 * y rows [offsets[e], offsets[e + 1]) = down_e(act(gateUp_e(x) (+ bias))) (+ bias) for every expert
 * with rows; scratch (grown when short) holds [maxRows, 3I].
 */
export function perExpertFfn(x: Float32Array, offsets: Int32Array, table: ExpertTable, hidden: number, inter: number,
                             y: Float32Array, fast: boolean, ops: PerExpertFfnOps, scratch?: Float32Array): void {
  const n = loadNative();
  const E = offsets.length - 1;
  let maxRows = 0;
  for (let e = 0; e < E; e++) maxRows = Math.max(maxRows, offsets[e + 1]! - offsets[e]!);
  const buf = scratch && scratch.length >= maxRows * 3 * inter ? scratch : new Float32Array(maxRows * 3 * inter);
  for (let e = 0; e < E; e++) {
    const r0 = offsets[e]!;
    const rows = offsets[e + 1]! - r0;
    if (rows === 0) continue;
    const w = table.get(e);
    if (!w) throw new RangeError(`expert ${e} has ${rows} rows but no weights`);
    try {
      const gu = buf.subarray(0, rows * 2 * inter);           // [rows, gate (I) | up (I)]
      const h = buf.subarray(rows * 2 * inter, rows * 3 * inter);
      n.denseGemm(x.subarray(r0 * hidden, (r0 + rows) * hidden), rows, w.gateUp, gu, ops.gateUpBias?.(e) ?? null, false, fast);
      ops.act(gu, rows, h);
      n.denseGemm(h, rows, w.down, y.subarray(r0 * hidden, (r0 + rows) * hidden), ops.downBias?.(e) ?? null, false, fast);
    } finally {
      w.gateUp.dispose();
      w.down.dispose();
    }
  }
}

/**
 * gpt-oss: act(gate, up) = (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate,
 * limit) (transformers GptOssExperts._apply_gate), with both GEMMs' biases.
 */
export function clampedSwigluExpertsFfn(x: Float32Array, offsets: Int32Array, table: ExpertTable,
                                        bias: { gateUp: Float32Array; down: Float32Array }, hidden: number,
                                        inter: number, act: { alpha: number; limit: number }, y: Float32Array,
                                        fast: boolean, scratch?: Float32Array): void {
  const { alpha, limit } = act;
  perExpertFfn(x, offsets, table, hidden, inter, y, fast, {
    gateUpBias: (e) => bias.gateUp.subarray(e * 2 * inter, (e + 1) * 2 * inter),
    downBias: (e) => bias.down.subarray(e * hidden, (e + 1) * hidden),
    act(gu, rows, h) {
      for (let r = 0; r < rows; r++) {
        const g0 = r * 2 * inter;
        for (let i = 0; i < inter; i++) {
          const g = Math.min(gu[g0 + i]!, limit);
          const u = Math.min(Math.max(gu[g0 + inter + i]!, -limit), limit);
          h[r * inter + i] = (u + 1) * (g / (1 + Math.exp(-alpha * g)));
        }
      }
    },
  }, scratch);
}
