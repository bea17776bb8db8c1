// gpt-oss experts on the CPU: per expert, gate/up GEMM with its bias, the clamped SwiGLU, and the
// down GEMM with its bias (the fused GroupGemm has neither biases nor this activation).
import { loadNative, type ExpertTable } from '../native/index.js';

/**
 * y rows [offsets[e], offsets[e + 1]) = down_e(act(gateUp_e(x) + bGateUp_e)) + bDown_e for every
 * expert with rows, where act(gate, up) = (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g),
 * g = min(gate, limit) (transformers GptOssExperts._apply_gate).
 */
export function clampedSwigluExpertsFfn(x: Float32Array, offsets: Int32Array, table: ExpertTable,
                                        bias: { gateUp: Float32Array; down: Float32Array }, hidden: number,
                                        inter: number, act: { alpha: number; limit: number }, y: Float32Array,
                                        fast: boolean, scratch?: Float32Array): void {
  const n = loadNative();
  const E = offsets.length - 1;
  const { alpha, limit } = act;
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
      n.denseGemm(x.subarray(r0 * hidden, (r0 + rows) * hidden), rows, w.gateUp, gu,
        bias.gateUp.subarray(e * 2 * inter, (e + 1) * 2 * inter), false, fast);
      for (let r = 0; r < rows; r++) {
        const g0 = r * 2 * inter;
        for (let i = 0; i < inter; i++) {
          const g = Math.min(gu[g0 + i]!, limit);
          const u = Math.min(Math.max(gu[g0 + inter + i]!, -limit), limit);
          h[r * inter + i] = (u + 1) * (g / (1 + Math.exp(-alpha * g)));
        }
      }
      n.denseGemm(h, rows, w.down, y.subarray(r0 * hidden, (r0 + rows) * hidden),
        bias.down.subarray(e * hidden, (e + 1) * hidden), false, fast);
    } finally {
      w.gateUp.dispose();
      w.down.dispose();
    }
  }
}
