// RMSNorm with fused residual add, rounded like HF LlamaRMSNorm in f32:
// out = w * (x * rsqrt(mean(x^2) + eps)); the sum of squares is accumulated in double.
#include <cmath>

#include "expertd/cpu_features.h"
#include "expertd/ops.h"
#include "parallel_rows.h"

#if defined(__x86_64__)
#include "x86_intrin.h"
#endif

namespace expertd {

namespace {

inline float inv_rms(double sumsq, int dim, float eps) {
  const float var = static_cast<float>(sumsq / dim);
  return 1.0f / std::sqrt(var + eps);
}

// One row. src is the row to normalise (x, or residual after the add).
void norm_row_scalar(const float* x, int dim, const float* w, float eps, float* out,
                     float* residual) {
  const float* src = x;
  double ss = 0.0;
  if (residual) {
    for (int i = 0; i < dim; ++i) {
      const float r = residual[i] + x[i];
      residual[i] = r;
      ss += static_cast<double>(r) * r;
    }
    src = residual;
  } else {
    for (int i = 0; i < dim; ++i) ss += static_cast<double>(x[i]) * x[i];
  }
  const float r = inv_rms(ss, dim, eps);
  for (int i = 0; i < dim; ++i) out[i] = w[i] * (src[i] * r);
}

#if defined(__x86_64__)
__attribute__((target("avx512f,fma"))) inline void acc_sq(__m512 v, __m512d& a0, __m512d& a1) {
  const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
  const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  a0 = _mm512_fmadd_pd(lo, lo, a0);
  a1 = _mm512_fmadd_pd(hi, hi, a1);
}

__attribute__((target("avx512f,fma"))) void norm_row_avx512(const float* x, int dim, const float* w,
                                                            float eps, float* out, float* residual) {
  __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd();
  const float* src = x;
  int i = 0;
  if (residual) {
    for (; i + 16 <= dim; i += 16) {
      const __m512 r = _mm512_add_ps(_mm512_loadu_ps(residual + i), _mm512_loadu_ps(x + i));
      _mm512_storeu_ps(residual + i, r);
      acc_sq(r, a0, a1);
    }
    if (i < dim) {
      const __mmask16 m = static_cast<__mmask16>((1u << (dim - i)) - 1);
      const __m512 r = _mm512_add_ps(_mm512_maskz_loadu_ps(m, residual + i), _mm512_maskz_loadu_ps(m, x + i));
      _mm512_mask_storeu_ps(residual + i, m, r);
      acc_sq(r, a0, a1);
    }
    src = residual;
  } else {
    for (; i + 16 <= dim; i += 16) acc_sq(_mm512_loadu_ps(x + i), a0, a1);
    if (i < dim) {
      const __mmask16 m = static_cast<__mmask16>((1u << (dim - i)) - 1);
      acc_sq(_mm512_maskz_loadu_ps(m, x + i), a0, a1);
    }
  }
  const float r = inv_rms(_mm512_reduce_add_pd(_mm512_add_pd(a0, a1)), dim, eps);
  const __m512 rv = _mm512_set1_ps(r);
  i = 0;
  for (; i + 16 <= dim; i += 16)
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_loadu_ps(w + i),
                                            _mm512_mul_ps(_mm512_loadu_ps(src + i), rv)));
  if (i < dim) {
    const __mmask16 m = static_cast<__mmask16>((1u << (dim - i)) - 1);
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, w + i),
                                                    _mm512_mul_ps(_mm512_maskz_loadu_ps(m, src + i), rv)));
  }
}
#endif

}  // namespace

void rms_norm(const float* x, int rows, int dim, const float* w, float eps, float* out,
              float* residual) {
  const size_t d = static_cast<size_t>(dim);
#if defined(__x86_64__)
  const bool simd = cpu_features().kernel_avx512;
#endif
  parallel_rows(static_cast<size_t>(rows), d, [&](size_t r0, size_t r1) {
    for (size_t r = r0; r < r1; ++r) {
      float* res = residual ? residual + r * d : nullptr;
#if defined(__x86_64__)
      if (simd) {
        norm_row_avx512(x + r * d, dim, w, eps, out + r * d, res);
        continue;
      }
#endif
      norm_row_scalar(x + r * d, dim, w, eps, out + r * d, res);
    }
  });
}

}  // namespace expertd
