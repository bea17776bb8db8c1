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
#include "simd_exp.h"
#include "x86_intrin.h"
#define EXPERTD_DELTANET_AVX512 1
#else
#define EXPERTD_DELTANET_AVX512 0
#endif

namespace expertd {

namespace {

// Per-thread scratch of the delta-rule kernels: grown once to the largest chunk seen, then reused
// (decode steps do not allocate).
struct DeltaScratch {
  enum Slot { Q = 0, K, W, U, A, P, KT, KN, TI, DEC, G, kSlots };
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

// The kernels twice: portable, and AVX-512 (a target pragma over the whole included body, so its
// helpers inline into one another; the caller picks by cpu_features() at run time).
// A third time for CPUs with AVX2 + FMA but no AVX-512: the portable algorithm compiled for
// AVX2 (its loops vectorize; dot products run in 8-lane chains).
namespace portable {
#define DN_AVX512 0
#define DN_AVX2 0
#include "deltanet_kernels.h"
#undef DN_AVX2
#undef DN_AVX512
}  // namespace portable

#if EXPERTD_DELTANET_AVX512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
namespace avx512 {
#define DN_AVX512 1
#define DN_AVX2 0
#include "deltanet_kernels.h"
#undef DN_AVX2
#undef DN_AVX512
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#define DN_AVX512 0
#define DN_AVX2 1
#include "deltanet_kernels.h"
#undef DN_AVX2
#undef DN_AVX512
}  // namespace avx2
#pragma GCC pop_options
#endif

// The kernels' namespace for this CPU: call(ns) runs ns::<kernel>(...).
#if EXPERTD_DELTANET_AVX512
#define DN_DISPATCH(isa, call)     \
  do {                             \
    if ((isa) == 2) {              \
      avx512::call;                \
    } else if ((isa) == 1) {       \
      avx2::call;                  \
    } else {                       \
      portable::call;              \
    }                              \
  } while (0)
#else
#define DN_DISPATCH(isa, call) portable::call
#endif

// Subnormal floats flushed to zero (FTZ: results, DAZ: inputs) while a delta-rule task runs, the
// caller's mode restored after. The decays e^(G_i - G_j) of a chunk fall through the subnormal range
// (e^-87 .. e^-103) whenever a head decays by more than ~1.4 per token over 64 tokens, which
// Qwen3-Next's decays do, and every FMA that meets one then takes a microcode assist: the op ran
// 10-15x slower. A term below 1.2e-38 of O(1) sums changes nothing the float64 bounds can see;
// every task sets the same mode, so the bits still do not depend on the batch or the threads.
class FlushSubnormals {
 public:
#if defined(__x86_64__)
  FlushSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFtz | kDaz); }
  ~FlushSubnormals() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned kFtz = 1u << 15;
  static constexpr unsigned kDaz = 1u << 6;
  unsigned saved_;
#else
  FlushSubnormals() = default;  // elsewhere the default mode (no x86 assists to avoid)
#endif
  FlushSubnormals(const FlushSubnormals&) = delete;
  FlushSubnormals& operator=(const FlushSubnormals&) = delete;
};

// 2: AVX-512, 1: AVX2 + FMA, 0: portable.
int kernel_isa() {
  const CpuFeatures& f = cpu_features();
  return f.kernel_avx512 ? 2 : f.kernel_avx2 ? 1 : 0;
}

}  // namespace

void causal_conv1d_batch(const float* x, int tokens, int channels, const float* weight,
                         const float* bias, int kernel, float* state_pool, const int32_t* slots,
                         const int32_t* seq_starts, int num_seqs, bool silu_act, float* out) {
  const size_t cs = static_cast<size_t>(channels);
  const size_t state_len = static_cast<size_t>(kernel - 1);
  const size_t blocks = (cs + 15) / 16;  // tasks: (sequence, block of 16 channels)
  const size_t rows = static_cast<size_t>(num_seqs) * blocks;
  const size_t work = static_cast<size_t>(std::max(1, tokens / std::max(1, num_seqs))) * kernel * 16;
  const int isa = kernel_isa();
  (void)isa;  // unused where only the portable kernels exist
  parallel_rows(rows, work, [&](size_t r0, size_t r1) {
    for (size_t r = r0; r < r1; ++r) {
      const size_t b = r / blocks;
      const int c0 = static_cast<int>((r % blocks) * 16);
      const int nc = std::min(16, channels - c0);
      const int t0 = seq_starts[b];
      const int n = seq_starts[b + 1] - t0;
      if (n == 0) continue;
      float* st = state_pool + static_cast<size_t>(slots[b]) * cs * state_len;
      const float* xs = x + static_cast<size_t>(t0) * cs;
      float* os = out + static_cast<size_t>(t0) * cs;
      DN_DISPATCH(isa, conv_block(xs, n, channels, c0, nc, weight, bias, kernel, st, silu_act, os));
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
  const int isa = kernel_isa();
  (void)isa;  // unused where only the portable kernels exist
  parallel_rows(tasks, work, [&](size_t r0, size_t r1) {
    const FlushSubnormals ftz;
    DeltaScratch& ws = scratch();
    for (size_t r = r0; r < r1; ++r) {
      const size_t b = r / p.hv;
      const int h = static_cast<int>(r % p.hv);
      const size_t t0 = static_cast<size_t>(seq_starts[b]);
      const int n = seq_starts[b + 1] - seq_starts[b];
      if (n == 0) continue;
      float* S = state_pool + static_cast<size_t>(slots[b]) * seq_state + h * head_state;
      const float* qs = q + t0 * p.q_stride;
      const float* ks = k + t0 * p.k_stride;
      const float* vs = v + t0 * p.v_stride;
      float* os = out + t0 * p.hv * p.dv;
      DN_DISPATCH(isa, head_run(qs, ks, vs, g + t0 * p.hv, beta + t0 * p.hv, n, h, p, S, os, ws));
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
  const int isa = kernel_isa();
  (void)isa;  // unused where only the portable kernels exist
  parallel_rows(static_cast<size_t>(rows), d * 4, [&](size_t r0, size_t r1) {
    for (size_t r = r0; r < r1; ++r) DN_DISPATCH(isa, gated_norm_row(x + r * d, z + r * d, w, eps, dim, out + r * d));
  });
}

}  // namespace expertd
