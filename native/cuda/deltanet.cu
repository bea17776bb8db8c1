// Gated DeltaNet on the device (f32): the causal depthwise conv with per-sequence state, the gated
// delta rule and the gated RMSNorm, over a batch of sequences with state slots (as native/cpu's
// *_batch ops). The delta rule runs each sequence of n >= chunk tokens chunkwise (the UT transform,
// one block per (sequence, v head, 32 value columns), floor(n / chunk) whole chunks) and then the
// recurrence for its tail; decode steps and shorter sequences run the recurrence alone (one warp per
// (sequence, head, 32 value columns), the state slice in shared memory).
//
// Roundings (test/helpers/cuda-emu.ts reproduces them bit for bit; no FMA contraction: every
// product and sum is an explicit _rn intrinsic; "dot" is acc = 0, acc += a_d b_d for d = 0..Dk-1):
//   conv:   acc = bias; acc += w_j * x_j (taps oldest first); SiLU(a) = a / (1 + f32(exp(-a) in double))
//   l2norm: sum of squares in double (lane-strided partials, then a butterfly over the warp);
//           inv = 1 / sqrt(f32(sum) + 1e-6); q = (q * inv) * Dk^-0.5, k = k * inv
//   step:   e = f32(exp(g) in double); kv = sum_d k_d S_d (in d order); delta = (v - e kv) beta;
//           S_d = e S_d + k_d delta; out = sum_d q_d S_d (in d order)
//   chunk:  (C tokens, i, j < C; exp in double, rounded to f32)
//           G_i = ((g_0 + g_1) + ...) + g_i; eG_i = exp(G_i); dec_ij = exp(G_i - G_j); decN_i = exp(G_C-1 - G_i)
//           A_ij = (beta_i dot(k_i, k_j)) dec_ij (j < i); P_ij = dot(q_i, k_j) dec_ij (j <= i)
//           per value column: X_i = beta_i (v_i - eG_i dot(k_i, S)); QS_i = dot(q_i, S) (the chunk's
//           initial S); then for i = 0..C-1: s = 0, s += A_ij X_j (j = 0..i-1), X_i = X_i - s
//           (V' = (I + A)^-1 X); out_i = eG_i QS_i, out_i += P_ij X_j (j = 0..i);
//           S_d = eG_C-1 S_d, S_d += (decN_i k_i,d) X_i (i = 0..C-1)
//   norm:   sum of squares as l2norm; r = 1 / sqrt(f32(sum / D) + eps); out = (w (x r)) SiLU(z)
// Slots and sequence starts live on the device: a slot outside the pool or a sequence outside
// [0, T) traps (a loud device fault, never a write out of bounds).
#include <algorithm>

#include "cuda_common.h"

namespace expertd::cuda {
namespace {

__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float silu_f32(float a) {
  const float e = static_cast<float>(exp(-static_cast<double>(a)));
  return __fdiv_rn(a, __fadd_rn(1.0f, e));
}

// Sequence b's token rows [*t0, *t1) and state slot, trapping on values that would reach outside.
__device__ __forceinline__ void seq_bounds(const int32_t* slots, const int32_t* starts, int b,
                                           int tokens, long long pool_slots, int* t0, int* t1,
                                           int* slot) {
  *t0 = starts[b];
  *t1 = starts[b + 1];
  *slot = slots[b];
  if (*t0 < 0 || *t1 < *t0 || *t1 > tokens || *slot < 0 || *slot >= pool_slots) __trap();
}

// Thread per (sequence, channel).
__global__ void causal_conv1d_kernel(const float* __restrict__ x, int tokens, int channels,
                                     const float* __restrict__ w, const float* __restrict__ bias,
                                     int kernel, float* __restrict__ pool, long long pool_slots,
                                     const int32_t* __restrict__ slots,
                                     const int32_t* __restrict__ starts, int act,
                                     float* __restrict__ out) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const int b = blockIdx.y;
  if (c >= channels) return;
  int t0, t1, slot;
  seq_bounds(slots, starts, b, tokens, pool_slots, &t0, &t1, &slot);
  const int ks = kernel - 1;
  float* st = pool + (static_cast<size_t>(slot) * channels + c) * ks;
  const float* wc = w + static_cast<size_t>(c) * kernel;
  float hist[64];
  for (int j = 0; j < ks; ++j) hist[j] = st[j];
  const float bc = bias ? bias[c] : 0.0f;
  for (int t = t0; t < t1; ++t) {
    const size_t at = static_cast<size_t>(t) * channels + c;
    const float xv = x[at];  // read before out[at] is written: out may alias x
    float acc = bc;
    for (int j = 0; j < ks; ++j) acc = __fadd_rn(acc, __fmul_rn(wc[j], hist[j]));
    acc = __fadd_rn(acc, __fmul_rn(wc[ks], xv));
    for (int j = 0; j + 1 < ks; ++j) hist[j] = hist[j + 1];
    if (ks > 0) hist[ks - 1] = xv;
    out[at] = act ? silu_f32(acc) : acc;
  }
  for (int j = 0; j < ks; ++j) st[j] = hist[j];
}

// One warp per (sequence b, v head h, columns [32 y, 32 y + 32)); lane = column. Shared memory:
// the state slice [dk][32], then q and k of the current token [dk] each.
__global__ void gated_delta_rule_kernel(const float* __restrict__ q, const float* __restrict__ k,
                                        const float* __restrict__ v, const float* __restrict__ g,
                                        const float* __restrict__ beta, float* __restrict__ pool,
                                        long long pool_slots, const int32_t* __restrict__ slots,
                                        const int32_t* __restrict__ starts, float* __restrict__ out,
                                        DeltaRuleParams p, float qscale, int chunked) {
  extern __shared__ float sh[];
  const int lane = threadIdx.x;
  const int b = blockIdx.x / p.hv, h = blockIdx.x % p.hv;
  const int e = blockIdx.y * 32 + lane;
  const int dk = p.dk, dv = p.dv;
  int t0, t1, slot;
  seq_bounds(slots, starts, b, p.tokens, pool_slots, &t0, &t1, &slot);
  // whole chunks went to gated_delta_chunk_kernel (launched before this one, same stream)
  if (chunked && t1 - t0 >= p.chunk) t0 += (t1 - t0) / p.chunk * p.chunk;
  if (t1 == t0) return;
  const int kh = h / (p.hv / p.hk);
  float* S = sh;              // [dk][32]
  float* qs = sh + dk * 32;   // [dk]
  float* ksh = qs + dk;       // [dk]
  float* state = pool + (static_cast<size_t>(slot) * p.hv + h) * dk * dv;
  if (e < dv)
    for (int d = 0; d < dk; ++d) S[d * 32 + lane] = state[static_cast<size_t>(d) * dv + e];
  for (int t = t0; t < t1; ++t) {
    const float* qr = q + static_cast<size_t>(t) * p.q_stride + static_cast<size_t>(kh) * dk;
    const float* kr = k + static_cast<size_t>(t) * p.k_stride + static_cast<size_t>(kh) * dk;
    double sq = 0.0, sk = 0.0;
    for (int d = lane; d < dk; d += 32) {
      const float qv = qr[d], kv = kr[d];
      sq += static_cast<double>(qv) * qv;
      sk += static_cast<double>(kv) * kv;
      qs[d] = qv;
      ksh[d] = kv;
    }
    float iq = 1.0f, ik = 1.0f;
    if (p.l2norm_qk) {
      sq = warp_sum_f64(sq);
      sk = warp_sum_f64(sk);
      iq = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(static_cast<float>(sq), 1e-6f)));
      ik = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(static_cast<float>(sk), 1e-6f)));
    }
    __syncwarp();
    for (int d = lane; d < dk; d += 32) {
      const float qn = p.l2norm_qk ? __fmul_rn(qs[d], iq) : qs[d];
      qs[d] = __fmul_rn(qn, qscale);
      if (p.l2norm_qk) ksh[d] = __fmul_rn(ksh[d], ik);
    }
    __syncwarp();
    const float eg = static_cast<float>(exp(static_cast<double>(g[static_cast<size_t>(t) * p.hv + h])));
    const float bt = beta[static_cast<size_t>(t) * p.hv + h];
    if (e < dv) {
      float kvm = 0.0f;
      for (int d = 0; d < dk; ++d) kvm = __fadd_rn(kvm, __fmul_rn(ksh[d], S[d * 32 + lane]));
      const float vv = v[static_cast<size_t>(t) * p.v_stride + static_cast<size_t>(h) * dv + e];
      const float delta = __fmul_rn(__fsub_rn(vv, __fmul_rn(eg, kvm)), bt);
      float o = 0.0f;
      for (int d = 0; d < dk; ++d) {
        const float s = __fadd_rn(__fmul_rn(eg, S[d * 32 + lane]), __fmul_rn(ksh[d], delta));
        S[d * 32 + lane] = s;
        o = __fadd_rn(o, __fmul_rn(qs[d], s));
      }
      out[(static_cast<size_t>(t) * p.hv + h) * dv + e] = o;
    }
    __syncwarp();  // q/k of this token are read by every lane before the next token overwrites them
  }
  if (e < dv)
    for (int d = 0; d < dk; ++d) state[static_cast<size_t>(d) * dv + e] = S[d * 32 + lane];
}

// Row src [dk] into dst (shared), l2-normalised when l2 and times scale when scaled: one warp, the
// same roundings as the recurrent kernel's q and k.
__device__ __forceinline__ void load_norm_row(const float* __restrict__ src, int dk, bool l2,
                                              bool scaled, float scale, float* dst, int lane) {
  double ss = 0.0;
  for (int d = lane; d < dk; d += 32) {
    const float x = src[d];
    ss += static_cast<double>(x) * x;
    dst[d] = x;
  }
  float inv = 1.0f;
  if (l2) inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(static_cast<float>(warp_sum_f64(ss)), 1e-6f)));
  for (int d = lane; d < dk; d += 32) {  // each lane rereads only what it wrote
    float x = dst[d];
    if (l2) x = __fmul_rn(x, inv);
    dst[d] = scaled ? __fmul_rn(x, scale) : x;
  }
}

__device__ __forceinline__ float dot_rn(const float* a, const float* b, int n) {
  float acc = 0.0f;
  for (int d = 0; d < n; ++d) acc = __fadd_rn(acc, __fmul_rn(a[d], b[d]));
  return acc;
}

constexpr int kChunkThreads = 256;  // 8 warps
constexpr int kChunkWarps = kChunkThreads / 32;
constexpr int kChunkQRows = 16;     // q rows per pass (the Q block)

// One block per (sequence b, v head h, value columns [32 y, 32 y + 32)); runs the whole chunks of a
// sequence with n >= C tokens (others return at once) and leaves the tail to the recurrent kernel.
// Value columns are independent in the delta rule, so blocks of one head share nothing but q, k, g
// and beta, whose per-chunk products (A, P, the decays) each block recomputes. Shared memory (floats;
// ld = dk + 1 keeps rows j of K on distinct banks): K [C][ld], Q block [min(C,16)][ld], M [C][C+1]
// (A_ij below the diagonal, P_ij at [j][i] on and above it: the decay dec_ij until the Q pass),
// S [dk][32], X [C][32] (then V'), QS [C][32], Sp [8][32], g, G, beta, eG, decN [C].
__global__ void __launch_bounds__(kChunkThreads)
gated_delta_chunk_kernel(const float* __restrict__ q, const float* __restrict__ k,
                         const float* __restrict__ v, const float* __restrict__ g,
                         const float* __restrict__ beta, float* __restrict__ pool,
                         long long pool_slots, const int32_t* __restrict__ slots,
                         const int32_t* __restrict__ starts, float* __restrict__ out,
                         DeltaRuleParams p, float qscale) {
  extern __shared__ float sh[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int b = blockIdx.x / p.hv, h = blockIdx.x % p.hv;
  const int e0 = blockIdx.y * 32;
  const int C = p.chunk, dk = p.dk, dv = p.dv, ld = dk + 1, mld = C + 1;
  int t0, t1, slot;
  seq_bounds(slots, starts, b, p.tokens, pool_slots, &t0, &t1, &slot);
  if (t1 - t0 < C) return;
  const int chunks = (t1 - t0) / C;
  const int kh = h / (p.hv / p.hk);
  const int qr = min(C, kChunkQRows);
  float* Kn = sh;
  float* Qb = Kn + C * ld;
  float* M = Qb + qr * ld;
  float* S = M + C * mld;
  float* X = S + dk * 32;
  float* QS = X + C * 32;
  float* Sp = QS + C * 32;
  float* gr = Sp + kChunkWarps * 32;
  float* G = gr + C;
  float* Bt = G + C;
  float* eG = Bt + C;
  float* decN = eG + C;
  float* state = pool + (static_cast<size_t>(slot) * p.hv + h) * dk * dv;
  for (int idx = tid; idx < dk * 32; idx += kChunkThreads) {
    const int d = idx >> 5, c = e0 + (idx & 31);
    S[idx] = c < dv ? state[static_cast<size_t>(d) * dv + c] : 0.0f;
  }
  for (int ch = 0; ch < chunks; ++ch) {
    const int tc = t0 + ch * C;
    // normalised k rows (a warp per row), g and beta
    for (int i = warp; i < C; i += kChunkWarps)
      load_norm_row(k + static_cast<size_t>(tc + i) * p.k_stride + static_cast<size_t>(kh) * dk, dk,
                    p.l2norm_qk, false, 1.0f, Kn + i * ld, lane);
    for (int i = tid; i < C; i += kChunkThreads) {
      gr[i] = g[static_cast<size_t>(tc + i) * p.hv + h];
      Bt[i] = beta[static_cast<size_t>(tc + i) * p.hv + h];
    }
    __syncthreads();
    // G: each thread its own prefix, left to right (the bits of a sequential cumsum)
    for (int i = tid; i < C; i += kChunkThreads) {
      float s = gr[0];
      for (int j = 1; j <= i; ++j) s = __fadd_rn(s, gr[j]);
      G[i] = s;
      eG[i] = static_cast<float>(exp(static_cast<double>(s)));
    }
    __syncthreads();
    // A (strictly lower), the decays where P goes (on and above the diagonal), the end decays, and
    // X = beta (v - eG (K S)) from the chunk's initial state
    for (int idx = tid; idx < C * C; idx += kChunkThreads) {
      const int i = idx / C, j = idx % C;
      if (j > i) continue;
      const float dec = static_cast<float>(exp(static_cast<double>(__fsub_rn(G[i], G[j]))));
      M[j * mld + i] = dec;
      if (j < i) M[i * mld + j] = __fmul_rn(__fmul_rn(Bt[i], dot_rn(Kn + i * ld, Kn + j * ld, dk)), dec);
    }
    for (int i = tid; i < C; i += kChunkThreads)
      decN[i] = static_cast<float>(exp(static_cast<double>(__fsub_rn(G[C - 1], G[i]))));
    for (int idx = tid; idx < C * 32; idx += kChunkThreads) {
      const int j = idx >> 5, c = idx & 31;
      float ks = 0.0f;
      for (int d = 0; d < dk; ++d) ks = __fadd_rn(ks, __fmul_rn(Kn[j * ld + d], S[d * 32 + c]));
      const float vv = e0 + c < dv
          ? v[static_cast<size_t>(tc + j) * p.v_stride + static_cast<size_t>(h) * dv + e0 + c] : 0.0f;
      X[idx] = __fmul_rn(Bt[j], __fsub_rn(vv, __fmul_rn(eG[j], ks)));
    }
    // q rows a block at a time: P (in place of its decay) and QS = Q S
    for (int i0 = 0; i0 < C; i0 += qr) {
      const int rows = min(qr, C - i0);
      __syncthreads();  // the previous Q block is read by everyone (and, first time, Kn/S/M settled)
      for (int r = warp; r < rows; r += kChunkWarps)
        load_norm_row(q + static_cast<size_t>(tc + i0 + r) * p.q_stride + static_cast<size_t>(kh) * dk,
                      dk, p.l2norm_qk, true, qscale, Qb + r * ld, lane);
      __syncthreads();
      for (int idx = tid; idx < rows * C; idx += kChunkThreads) {
        const int r = idx / C, j = idx % C, i = i0 + r;
        if (j > i) continue;
        M[j * mld + i] = __fmul_rn(dot_rn(Qb + r * ld, Kn + j * ld, dk), M[j * mld + i]);
      }
      for (int idx = tid; idx < rows * 32; idx += kChunkThreads) {
        const int r = idx >> 5, c = idx & 31;
        float a = 0.0f;
        for (int d = 0; d < dk; ++d) a = __fadd_rn(a, __fmul_rn(Qb[r * ld + d], S[d * 32 + c]));
        QS[(i0 + r) * 32 + c] = a;
      }
    }
    // V' = (I + A)^-1 X by forward substitution, 8 rows at a time: warp w sums row i0 + w over the
    // rows already final (j < i0), then warp 0 continues each of those sums over j = i0..i-1 in
    // order, so every row's sum runs j = 0..i-1 left to right as the rounding note says.
    for (int i0 = 0; i0 < C; i0 += kChunkWarps) {
      __syncthreads();
      const int i = i0 + warp;
      if (i < C) {
        const float* Ai = M + i * mld;
        float s = 0.0f;
        for (int j = 0; j < i0; ++j) s = __fadd_rn(s, __fmul_rn(Ai[j], X[j * 32 + lane]));
        Sp[warp * 32 + lane] = s;
      }
      __syncthreads();
      if (warp == 0) {
        const int rows = min(kChunkWarps, C - i0);
        for (int w = 0; w < rows; ++w) {
          const int r = i0 + w;
          const float* Ar = M + r * mld;
          float s = Sp[w * 32 + lane];
          for (int j = i0; j < r; ++j) s = __fadd_rn(s, __fmul_rn(Ar[j], X[j * 32 + lane]));
          X[r * 32 + lane] = __fsub_rn(X[r * 32 + lane], s);
        }
      }
    }
    __syncthreads();
    // out_i = eG_i QS_i + sum_(j<=i) P_ij V'_j, and S = eG_C-1 S + sum_i (decN_i k_i) V'_i
    for (int idx = tid; idx < C * 32; idx += kChunkThreads) {
      const int i = idx >> 5, c = idx & 31;
      float o = __fmul_rn(eG[i], QS[idx]);
      for (int j = 0; j <= i; ++j) o = __fadd_rn(o, __fmul_rn(M[j * mld + i], X[j * 32 + c]));
      if (e0 + c < dv) out[(static_cast<size_t>(tc + i) * p.hv + h) * dv + e0 + c] = o;
    }
    const float eg_last = eG[C - 1];
    for (int idx = tid; idx < dk * 32; idx += kChunkThreads) {
      const int d = idx >> 5, c = idx & 31;
      float s = __fmul_rn(eg_last, S[idx]);
      for (int i = 0; i < C; ++i) s = __fadd_rn(s, __fmul_rn(__fmul_rn(decN[i], Kn[i * ld + d]), X[i * 32 + c]));
      S[idx] = s;
    }
    __syncthreads();  // K, S and X settled before the next chunk reloads K
  }
  for (int idx = tid; idx < dk * 32; idx += kChunkThreads) {
    const int d = idx >> 5, c = e0 + (idx & 31);
    if (c < dv) state[static_cast<size_t>(d) * dv + c] = S[idx];
  }
}

// One warp per row.
__global__ void gated_rms_norm_kernel(const float* __restrict__ x, const float* __restrict__ z,
                                      const float* __restrict__ w, float eps, int rows, int dim,
                                      float* out) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;
  const float* xr = x + static_cast<size_t>(row) * dim;
  const float* zr = z + static_cast<size_t>(row) * dim;
  float* o = out + static_cast<size_t>(row) * dim;
  double ss = 0.0;
  for (int i = lane; i < dim; i += 32) ss += static_cast<double>(xr[i]) * xr[i];
  ss = warp_sum_f64(ss);
  const float r = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(static_cast<float>(ss / dim), eps)));
  __syncwarp();  // every lane has read its x before any writes out (out may alias x)
  for (int i = lane; i < dim; i += 32)
    o[i] = __fmul_rn(__fmul_rn(w[i], __fmul_rn(xr[i], r)), silu_f32(zr[i]));
}

}  // namespace

void causal_conv1d_batch(const float* x, int tokens, int channels, const float* weight,
                         const float* bias, int kernel, float* state_pool, long long pool_slots,
                         const int32_t* slots, const int32_t* seq_starts, int num_seqs, bool silu,
                         float* out, Stream s) {
  ensure_alive();
  if (num_seqs <= 0 || channels <= 0) return;
  EXPERTD_CHECK(kernel >= 1 && kernel <= 64, ErrorCode::InvalidArg,
                "causal_conv1d: kernel " + std::to_string(kernel) + " outside 1..64");
  const dim3 grid(blocks_for(static_cast<size_t>(channels), 128), static_cast<unsigned>(num_seqs));
  causal_conv1d_kernel<<<grid, 128, 0, or_default(s)>>>(x, tokens, channels, weight, bias, kernel,
                                                        state_pool, pool_slots, slots, seq_starts,
                                                        silu ? 1 : 0, out);
  EXPERTD_CUDA_LAUNCH_CHECK();
}

void gated_delta_rule_batch(const float* q, const float* k, const float* v, const float* g,
                            const float* beta, float* state_pool, long long pool_slots,
                            const int32_t* slots, const int32_t* seq_starts, int num_seqs,
                            float* out, const DeltaRuleParams& p_in, int longest, Stream s) {
  ensure_alive();
  if (num_seqs <= 0) return;
  DeltaRuleParams p = p_in;
  if (p.q_stride == 0) p.q_stride = p.hk * p.dk;
  if (p.k_stride == 0) p.k_stride = p.hk * p.dk;
  if (p.v_stride == 0) p.v_stride = p.hv * p.dv;
  EXPERTD_CHECK(p.dk >= 1 && p.dk <= kDeltaMaxDk, ErrorCode::InvalidArg,
                "gated_delta_rule: Dk " + std::to_string(p.dk) + " outside 1.." + std::to_string(kDeltaMaxDk) +
                    " (the state slice lives in shared memory)");
  const float qscale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(p.dk)));
  const dim3 grid(static_cast<unsigned>(num_seqs) * static_cast<unsigned>(p.hv),
                  blocks_for(static_cast<size_t>(p.dv), 32));
  // NOTE: the recurrent kernel skips the whole chunks only when the chunked one ran before it on
  // this stream; both decide per sequence from the same device seq_starts.
  const bool chunked = delta_chunked(p.chunk, p.dk) && std::min(longest, p.tokens) >= p.chunk;
  if (chunked) {
    const size_t smem = delta_chunk_smem_bytes(p.chunk, p.dk);
    if (smem > 48 * 1024)
      EXPERTD_CUDA_CHECK(cudaFuncSetAttribute(gated_delta_chunk_kernel,
                                              cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(smem)));
    gated_delta_chunk_kernel<<<grid, kChunkThreads, smem, or_default(s)>>>(
        q, k, v, g, beta, state_pool, pool_slots, slots, seq_starts, out, p, qscale);
    EXPERTD_CUDA_LAUNCH_CHECK();
  }
  const size_t smem = static_cast<size_t>(p.dk) * 34 * sizeof(float);
  gated_delta_rule_kernel<<<grid, 32, smem, or_default(s)>>>(q, k, v, g, beta, state_pool,
                                                             pool_slots, slots, seq_starts, out, p,
                                                             qscale, chunked ? 1 : 0);
  EXPERTD_CUDA_LAUNCH_CHECK();
}

void gated_rms_norm(const float* x, const float* z, const float* w, float eps, int rows, int dim,
                    float* out, Stream s) {
  ensure_alive();
  if (rows <= 0 || dim <= 0) return;
  gated_rms_norm_kernel<<<blocks_for(static_cast<size_t>(rows), 4), 128, 0, or_default(s)>>>(
      x, z, w, eps, rows, dim, out);
  EXPERTD_CUDA_LAUNCH_CHECK();
}

}  // namespace expertd::cuda
