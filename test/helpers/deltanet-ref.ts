// Float64 references for the Gated DeltaNet ops, written straight from the definitions (the
// token-by-token recurrence, never the chunk algorithm), shared by the CPU and CUDA tests.

export interface DeltaShape { T: number; Hk: number; Hv: number; Dk: number; Dv: number }

/** Depthwise causal conv of x [T, C] continuing from state [C, K-1]; returns out and the new state. */
export function refConv(x: ArrayLike<number>, T: number, C: number, w: ArrayLike<number>,
  bias: ArrayLike<number> | null, K: number, state: ArrayLike<number>, silu: boolean):
  { out: Float64Array; state: Float64Array } {
  const out = new Float64Array(T * C);
  const ks = K - 1;
  const newState = new Float64Array(C * ks);
  for (let c = 0; c < C; c++) {
    // the channel's inputs: state (oldest first) then x
    const seq: number[] = [];
    for (let j = 0; j < ks; j++) seq.push(state[c * ks + j]!);
    for (let t = 0; t < T; t++) seq.push(x[t * C + c]!);
    for (let t = 0; t < T; t++) {
      let acc = bias ? bias[c]! : 0;
      for (let j = 0; j < K; j++) acc += w[c * K + j]! * seq[t + j]!;
      out[t * C + c] = silu ? acc / (1 + Math.exp(-acc)) : acc;
    }
    for (let j = 0; j < ks; j++) newState[c * ks + j] = seq[seq.length - ks + j]!;
  }
  return { out, state: newState };
}

/**
 * The gated delta rule token by token in float64: for each token and v head h (q/k head
 * h / (Hv/Hk)): S *= e^g; S += k (beta (v - k^T S))^T; out = q^T S, with q, k l2-normalised
 * (eps 1e-6) when l2 and q scaled by Dk^-0.5. state [Hv, Dk, Dv] is updated in place.
 */
export function refDelta(q: ArrayLike<number>, k: ArrayLike<number>, v: ArrayLike<number>,
  g: ArrayLike<number>, beta: ArrayLike<number>, state: Float64Array, s: DeltaShape, l2: boolean):
  Float64Array {
  const { T, Hk, Hv, Dk, Dv } = s;
  const out = new Float64Array(T * Hv * Dv);
  const rep = Hv / Hk;
  const qn = new Float64Array(Dk);
  const kn = new Float64Array(Dk);
  const kv = new Float64Array(Dv);
  for (let t = 0; t < T; t++) {
    for (let h = 0; h < Hv; h++) {
      const kh = Math.floor(h / rep);
      let qs = 0;
      let ksum = 0;
      for (let d = 0; d < Dk; d++) {
        qs += q[(t * Hk + kh) * Dk + d]! ** 2;
        ksum += k[(t * Hk + kh) * Dk + d]! ** 2;
      }
      const qi = l2 ? 1 / Math.sqrt(qs + 1e-6) : 1;
      const ki = l2 ? 1 / Math.sqrt(ksum + 1e-6) : 1;
      for (let d = 0; d < Dk; d++) {
        qn[d] = q[(t * Hk + kh) * Dk + d]! * qi / Math.sqrt(Dk);
        kn[d] = k[(t * Hk + kh) * Dk + d]! * ki;
      }
      const S = state.subarray(h * Dk * Dv, (h + 1) * Dk * Dv);
      const eg = Math.exp(g[t * Hv + h]!);
      const b = beta[t * Hv + h]!;
      kv.fill(0);
      for (let d = 0; d < Dk; d++) {
        for (let e = 0; e < Dv; e++) {
          S[d * Dv + e]! *= eg;
          kv[e] += kn[d]! * S[d * Dv + e]!;
        }
      }
      for (let e = 0; e < Dv; e++) kv[e] = (v[(t * Hv + h) * Dv + e]! - kv[e]!) * b;
      for (let d = 0; d < Dk; d++) {
        for (let e = 0; e < Dv; e++) {
          S[d * Dv + e] += kn[d]! * kv[e]!;
          out[(t * Hv + h) * Dv + e] += qn[d]! * S[d * Dv + e]!;
        }
      }
    }
  }
  return out;
}

/** Qwen3NextRMSNormGated in float64: (w * x / rms(x)) * SiLU(z) per row. */
export function refGatedRmsNorm(x: ArrayLike<number>, z: ArrayLike<number>, w: ArrayLike<number>,
  eps: number, rows: number, D: number): Float64Array {
  const out = new Float64Array(rows * D);
  for (let r = 0; r < rows; r++) {
    let ss = 0;
    for (let i = 0; i < D; i++) ss += x[r * D + i]! ** 2;
    const inv = 1 / Math.sqrt(ss / D + eps);
    for (let i = 0; i < D; i++) {
      const zv = z[r * D + i]!;
      out[r * D + i] = w[i]! * x[r * D + i]! * inv * (zv / (1 + Math.exp(-zv)));
    }
  }
  return out;
}
