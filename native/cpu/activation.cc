// SiLU(gate) * up, in f32 as torch computes it: silu(g) = g / (1 + exp(-g)), then * up.
#include <cmath>

#include "expertd/cpu_features.h"
#include "expertd/ops.h"
#include "parallel_rows.h"
#include "simd_exp.h"

namespace expertd {

namespace {

void silu_mul_scalar(const float* g, const float* u, size_t n, float* out) {
  for (size_t i = 0; i < n; ++i) out[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

#if defined(__x86_64__)
__attribute__((target("avx512f,fma"))) void silu_mul_avx512(const float* g, const float* u,
                                                            size_t n, float* out) {
  const __m512 one = _mm512_set1_ps(1.0f);
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 gv = _mm512_loadu_ps(g + i);
    const __m512 e = exp512_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(one, e)),
                                            _mm512_loadu_ps(u + i)));
  }
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 gv = _mm512_maskz_loadu_ps(m, g + i);
    const __m512 e = exp512_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv));
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(one, e)),
                                                    _mm512_maskz_loadu_ps(m, u + i)));
  }
}

// CPUs without AVX-512: 8 lanes, the tail in a zero-padded copy (the same arithmetic per lane).
__attribute__((target("avx2,fma"))) void silu_mul_avx2(const float* g, const float* u, size_t n,
                                                       float* out) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, silu_mul256(_mm256_loadu_ps(g + i), _mm256_loadu_ps(u + i)));
  if (i < n) {
    alignas(32) float gt[8] = {}, ut[8] = {}, ot[8];
    for (size_t j = i; j < n; ++j) gt[j - i] = g[j], ut[j - i] = u[j];
    _mm256_store_ps(ot, silu_mul256(_mm256_load_ps(gt), _mm256_load_ps(ut)));
    for (size_t j = i; j < n; ++j) out[j] = ot[j - i];
  }
}
#endif

}  // namespace

void silu_mul(const float* gu, int tokens, int inter, float* out) {
  const size_t n = static_cast<size_t>(inter);
#if defined(__x86_64__)
  const bool simd = cpu_features().kernel_avx512;
  const bool avx2 = cpu_features().kernel_avx2;
#endif
  parallel_rows(static_cast<size_t>(tokens), n * 4, [&](size_t t0, size_t t1) {
    for (size_t t = t0; t < t1; ++t) {
      const float* g = gu + t * 2 * n;
#if defined(__x86_64__)
      if (simd) {
        silu_mul_avx512(g, g + n, n, out + t * n);
        continue;
      }
      if (avx2) {
        silu_mul_avx2(g, g + n, n, out + t * n);
        continue;
      }
#endif
      silu_mul_scalar(g, g + n, n, out + t * n);
    }
  });
}

}  // namespace expertd
