// Gated DeltaNet on the device (f32): the causal depthwise conv with per-sequence state, the gated
// delta rule and the gated RMSNorm, over a batch of sequences with state slots (as native/cpu's
// *_batch ops). The delta rule runs the recurrence token by token for every T (one warp per
// (sequence, head, 32 value columns), the state slice in shared memory); the CPU's chunkwise
// algorithm agrees with it to f32 rounding.
//
// Roundings (test/helpers/cuda-emu.ts reproduces them bit for bit; no FMA contraction: every
// product and sum is an explicit _rn intrinsic):
//   conv:   acc = bias; acc += w_j * x_j (taps oldest first); SiLU(a) = a / (1 + f32(exp(-a) in double))
//   l2norm: sum of squares in double (lane-strided partials, then a butterfly over the warp);
//           inv = 1 / sqrt(f32(sum) + 1e-6); q = (q * inv) * Dk^-0.5, k = k * inv
//   step:   e = f32(exp(g) in double); kv = sum_d k_d S_d (in d order); delta = (v - e kv) beta;
//           S_d = e S_d + k_d delta; out = sum_d q_d S_d (in d order)
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
                                        DeltaRuleParams p, float qscale) {
  extern __shared__ float sh[];
  const int lane = threadIdx.x;
  const int b = blockIdx.x / p.hv, h = blockIdx.x % p.hv;
  const int e = blockIdx.y * 32 + lane;
  const int dk = p.dk, dv = p.dv;
  int t0, t1, slot;
  seq_bounds(slots, starts, b, p.tokens, pool_slots, &t0, &t1, &slot);
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
                            float* out, const DeltaRuleParams& p_in, Stream s) {
  ensure_alive();
  if (num_seqs <= 0) return;
  DeltaRuleParams p = p_in;
  if (p.q_stride == 0) p.q_stride = p.hk * p.dk;
  if (p.k_stride == 0) p.k_stride = p.hk * p.dk;
  if (p.v_stride == 0) p.v_stride = p.hv * p.dv;
  EXPERTD_CHECK(p.dk >= 1 && p.dk <= kDeltaMaxDk, ErrorCode::InvalidArg,
                "gated_delta_rule: Dk " + std::to_string(p.dk) + " outside 1.." + std::to_string(kDeltaMaxDk) +
                    " (the state slice lives in shared memory)");
  const size_t smem = static_cast<size_t>(p.dk) * 34 * sizeof(float);
  const float qscale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(p.dk)));
  const dim3 grid(static_cast<unsigned>(num_seqs) * static_cast<unsigned>(p.hv),
                  blocks_for(static_cast<size_t>(p.dv), 32));
  gated_delta_rule_kernel<<<grid, 32, smem, or_default(s)>>>(q, k, v, g, beta, state_pool,
                                                             pool_slots, slots, seq_starts, out, p,
                                                             qscale);
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
