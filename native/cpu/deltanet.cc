// Gated DeltaNet ops (Qwen3-Next / Qwen3.5 linear attention): the causal depthwise conv with its
// carried state, the gated delta rule (recurrent step for decode, chunkwise UT transform for
// prefill) and the gated RMSNorm, in f32, threaded over (sequence, head) / channel blocks.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "expertd/cpu_features.h"
#include "expertd/ops.h"
#include "parallel_rows.h"

#if defined(__x86_64__)
#include "x86_intrin.h"
#endif

namespace expertd {

namespace {

// Per-thread scratch of the delta-rule kernels: grown once to the largest chunk seen, then reused
// (decode steps do not allocate).
struct DeltaScratch {
  enum Slot { Q = 0, K, W, U, A, P, G, kSlots };
  std::vector<float> buf[kSlots];
  float* get(Slot s, size_t n) {
    if (buf[s].size() < n) buf[s].resize(n);
    return buf[s].data();
  }
};

DeltaScratch& scratch() {
  static thread_local DeltaScratch ws;
  return ws;
}

namespace portable {
#define DN_AVX512 0
#include "deltanet_kernels.h"
#undef DN_AVX512
}  // namespace portable

inline float silu(float x) { return x / (1.0f + std::exp(-x)); }

// One channel c of a causal conv over T tokens; state [K-1] in/out. The output sum runs from the
// oldest tap to the newest, bias first.
inline void conv_channel(const float* x, int tokens, int channels, int c, const float* w,
                         float b, int kernel, float* state, bool act, float* out) {
  float hist[64];
  const int ks = kernel - 1;
  for (int j = 0; j < ks; ++j) hist[j] = state[j];
  for (int t = 0; t < tokens; ++t) {
    const size_t at = static_cast<size_t>(t) * channels + c;
    const float xv = x[at];  // read before out[at] is written: out may alias x
    float acc = b;
    for (int j = 0; j < ks; ++j) acc += w[j] * hist[j];
    acc += w[ks] * xv;
    for (int j = 0; j + 1 < ks; ++j) hist[j] = hist[j + 1];
    if (ks > 0) hist[ks - 1] = xv;
    out[at] = act ? silu(acc) : acc;
  }
  for (int j = 0; j < ks; ++j) state[j] = hist[j];
}

}  // namespace

void causal_conv1d_batch(const float* x, int tokens, int channels, const float* weight,
                         const float* bias, int kernel, float* state_pool, const int32_t* slots,
                         const int32_t* seq_starts, int num_seqs, bool silu_act, float* out) {
  const size_t cs = static_cast<size_t>(channels);
  const size_t state_len = static_cast<size_t>(kernel - 1);
  const size_t rows = static_cast<size_t>(num_seqs) * cs;
  const size_t work = static_cast<size_t>(std::max(1, tokens / std::max(1, num_seqs))) * kernel;
  parallel_rows(rows, work, [&](size_t r0, size_t r1) {
    for (size_t r = r0; r < r1; ++r) {
      const size_t b = r / cs;
      const int c = static_cast<int>(r % cs);
      const int t0 = seq_starts[b];
      const int n = seq_starts[b + 1] - t0;
      if (n == 0) continue;
      float* st = state_pool + static_cast<size_t>(slots[b]) * cs * state_len + c * state_len;
      conv_channel(x + static_cast<size_t>(t0) * cs, n, channels, c,
                   weight + static_cast<size_t>(c) * kernel, bias ? bias[c] : 0.0f, kernel, st,
                   silu_act, out + static_cast<size_t>(t0) * cs);
    }
  });
}

void causal_conv1d(const float* x, int tokens, int channels, const float* weight,
                   const float* bias, int kernel, float* conv_state, bool silu_act, float* out) {
  const int32_t slot = 0;
  const int32_t starts[2] = {0, tokens};
  causal_conv1d_batch(x, tokens, channels, weight, bias, kernel, conv_state, &slot, starts, 1,
                      silu_act, out);
}

void gated_delta_rule_batch(const float* q, const float* k, const float* v, const float* g,
                            const float* beta, float* state_pool, const int32_t* slots,
                            const int32_t* seq_starts, int num_seqs, float* out,
                            const DeltaRuleParams& p_in) {
  DeltaRuleParams p = p_in;
  if (p.q_stride == 0) p.q_stride = p.hk * p.dk;
  if (p.k_stride == 0) p.k_stride = p.hk * p.dk;
  if (p.v_stride == 0) p.v_stride = p.hv * p.dv;
  const size_t head_state = static_cast<size_t>(p.dk) * p.dv;
  const size_t seq_state = head_state * p.hv;
  const size_t tasks = static_cast<size_t>(num_seqs) * p.hv;
  const size_t work = static_cast<size_t>(std::max(1, p.tokens / std::max(1, num_seqs))) * head_state * 4;
  parallel_rows(tasks, work, [&](size_t r0, size_t r1) {
    DeltaScratch& ws = scratch();
    for (size_t r = r0; r < r1; ++r) {
      const size_t b = r / p.hv;
      const int h = static_cast<int>(r % p.hv);
      const size_t t0 = static_cast<size_t>(seq_starts[b]);
      const int n = seq_starts[b + 1] - seq_starts[b];
      if (n == 0) continue;
      float* S = state_pool + static_cast<size_t>(slots[b]) * seq_state + h * head_state;
      portable::head_run(q + t0 * p.q_stride, k + t0 * p.k_stride, v + t0 * p.v_stride,
                         g + t0 * p.hv, beta + t0 * p.hv, n, h, p, S,
                         out + t0 * p.hv * p.dv, ws);
    }
  });
}

void gated_delta_rule(const float* q, const float* k, const float* v, const float* g,
                      const float* beta, float* state, float* out, const DeltaRuleParams& p) {
  const int32_t slot = 0;
  const int32_t starts[2] = {0, p.tokens};
  gated_delta_rule_batch(q, k, v, g, beta, state, &slot, starts, 1, out, p);
}

void gated_rms_norm(const float* x, const float* z, const float* w, float eps, int rows, int dim,
                    float* out) {
  const size_t d = static_cast<size_t>(dim);
  parallel_rows(static_cast<size_t>(rows), d * 4, [&](size_t r0, size_t r1) {
    for (size_t r = r0; r < r1; ++r) {
      const float* xr = x + r * d;
      const float* zr = z + r * d;
      float* o = out + r * d;
      double ss = 0.0;
      for (size_t i = 0; i < d; ++i) ss += static_cast<double>(xr[i]) * xr[i];
      const float inv = 1.0f / std::sqrt(static_cast<float>(ss / dim) + eps);
      for (size_t i = 0; i < d; ++i) o[i] = (w[i] * (xr[i] * inv)) * silu(zr[i]);
    }
  });
}

}  // namespace expertd
