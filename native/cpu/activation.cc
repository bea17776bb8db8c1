// SiLU(gate) * up, in f32 as torch computes it: silu(g) = g / (1 + exp(-g)), then * up.
#include <cmath>

#include "expertd/cpu_features.h"
#include "expertd/ops.h"
#include "gemm_kernels.h"
#include "parallel_rows.h"

namespace expertd {

namespace {

void silu_mul_scalar(const float* g, const float* u, size_t n, float* out) {
  for (size_t i = 0; i < n; ++i) out[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

#if EXPERTD_GEMM_X86
// NOTE: the same arithmetic per element as GroupGemm's fused SiLU(gate)*up epilogue
// (gemm::silu_mul512), so EPS-MoE's per-expert DenseGemm path (gate_up GEMM, this, down GEMM) gives
// the GroupGemm's bits and the planner's kernel choice never changes an output.
EXPERTD_AVX512 void silu_mul_avx512(const float* g, const float* u, size_t n, float* out) {
  size_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(out + i, gemm::silu_mul512(_mm512_loadu_ps(g + i), _mm512_loadu_ps(u + i)));
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(out + i, m, gemm::silu_mul512(_mm512_maskz_loadu_ps(m, g + i),
                                                        _mm512_maskz_loadu_ps(m, u + i)));
  }
}
#endif

}  // namespace

void silu_mul(const float* gu, int tokens, int inter, float* out) {
  const size_t n = static_cast<size_t>(inter);
#if EXPERTD_GEMM_X86
  const bool simd = cpu_features().kernel_avx512;
#endif
  parallel_rows(static_cast<size_t>(tokens), n * 4, [&](size_t t0, size_t t1) {
    for (size_t t = t0; t < t1; ++t) {
      const float* g = gu + t * 2 * n;
#if EXPERTD_GEMM_X86
      if (simd) {
        silu_mul_avx512(g, g + n, n, out + t * n);
        continue;
      }
#endif
      silu_mul_scalar(g, g + n, n, out + t * n);
    }
  });
}

}  // namespace expertd
