// Permute token rows to expert-contiguous order and back with the weighted combine.
#include <algorithm>
#include <cstring>

#include "expertd/cpu_features.h"
#include "expertd/errors.h"
#include "expertd/ops.h"
#include "parallel_rows.h"

#if defined(__x86_64__)
#include "x86_intrin.h"
#endif

namespace expertd {

void permute_rows(const float* x, int tokens, int h, const int32_t* ids, int top_k,
                  int num_experts, float* x_perm, int32_t* perm_index, int32_t* offsets) {
  const size_t n = static_cast<size_t>(tokens) * top_k;
  // offsets[e + 1] first holds the start of expert e and serves as its write cursor; after the
  // scatter it has advanced to the end of e, which is the start of e + 1 (no scratch needed).
  std::memset(offsets, 0, sizeof(int32_t) * (num_experts + 1));
  for (size_t i = 0; i < n; ++i) ++offsets[ids[i] + 1];
  int32_t run = 0;  // exclusive prefix sum: offsets[e + 1] = start of e
  for (int e = 0; e < num_experts; ++e) {
    int32_t c = offsets[e + 1];
    offsets[e + 1] = run;
    run += c;
  }
  for (size_t i = 0; i < n; ++i) perm_index[i] = offsets[ids[i] + 1]++;

  const size_t row_bytes = sizeof(float) * static_cast<size_t>(h);
  parallel_rows(static_cast<size_t>(tokens), static_cast<size_t>(top_k) * h, [&](size_t t0, size_t t1) {
    for (size_t t = t0; t < t1; ++t)
      for (int j = 0; j < top_k; ++j)
        std::memcpy(x_perm + static_cast<size_t>(perm_index[t * top_k + j]) * h,
                    x + t * h, row_bytes);
  });
}

namespace {

// An empty asm that claims to modify v: the product must exist rounded on its own, so the
// compiler cannot contract `a * b + c` into an FMA (GCC does under -ffp-contract=fast, even for
// intrinsics, whenever the target has FMA).
inline float keep_rounded(float v) {
#if defined(__x86_64__)
  __asm__("" : "+x"(v));
#elif defined(__aarch64__)
  __asm__("" : "+w"(v));
#endif
  return v;
}

// Both paths multiply then add (no FMA), in slot order, then add to out: the same roundings as
// HF's `expert_out * weight` summed and then added to the residual, and bitwise equal results
// between the two paths.
void combine_scalar(const float* y_perm, const int32_t* pidx, const float* w, int top_k,
                    size_t h0, size_t h1, size_t h, float* out, bool accumulate) {
  const float* y0 = y_perm + static_cast<size_t>(pidx[0]) * h;
  for (size_t c = h0; c < h1; ++c) {
    float s = w[0] * y0[c];
    for (int j = 1; j < top_k; ++j) s += keep_rounded(w[j] * y_perm[static_cast<size_t>(pidx[j]) * h + c]);
    out[c] = accumulate ? out[c] + s : s;
  }
}

#if defined(__x86_64__)
__attribute__((target("avx512f"))) void combine_avx512(const float* y_perm, const int32_t* pidx,
                                                       const float* w, int top_k, size_t h0,
                                                       size_t h1, size_t h, float* out,
                                                       bool accumulate) {
  size_t c = h0;
  for (; c + 16 <= h1; c += 16) {
    __m512 s = _mm512_mul_ps(_mm512_set1_ps(w[0]),
                             _mm512_loadu_ps(y_perm + static_cast<size_t>(pidx[0]) * h + c));
    for (int j = 1; j < top_k; ++j) {
      __m512 p = _mm512_mul_ps(_mm512_set1_ps(w[j]),
                               _mm512_loadu_ps(y_perm + static_cast<size_t>(pidx[j]) * h + c));
      __asm__("" : "+v"(p));  // see keep_rounded
      s = _mm512_add_ps(s, p);
    }
    if (accumulate) s = _mm512_add_ps(_mm512_loadu_ps(out + c), s);
    _mm512_storeu_ps(out + c, s);
  }
  if (c < h1) combine_scalar(y_perm, pidx, w, top_k, c, h1, h, out, accumulate);
}
#endif

}  // namespace

void unpermute_combine(const float* y_perm, const int32_t* perm_index, const float* weights,
                       int tokens, int top_k, int h, float* out, bool accumulate) {
  const size_t hs = static_cast<size_t>(h);
  const size_t k = static_cast<size_t>(top_k);
#if defined(__x86_64__)
  const bool simd = cpu_features().kernel_avx512;
#endif
  // Decode has one token with a wide row: split the row into column chunks as well.
  constexpr size_t kColChunk = 2048;
  const size_t col_chunks = (hs + kColChunk - 1) / kColChunk;
  const size_t units = static_cast<size_t>(tokens) * col_chunks;
  parallel_rows(units, std::min(hs, kColChunk) * k, [&](size_t u0, size_t u1) {
    for (size_t u = u0; u < u1; ++u) {
      const size_t t = u / col_chunks;
      const size_t c0 = (u % col_chunks) * kColChunk;
      const size_t c1 = std::min(hs, c0 + kColChunk);
      const int32_t* pidx = perm_index + t * k;
      const float* w = weights + t * k;
      float* o = out + t * hs;
#if defined(__x86_64__)
      if (simd) {
        combine_avx512(y_perm, pidx, w, top_k, c0, c1, hs, o, accumulate);
        continue;
      }
#endif
      combine_scalar(y_perm, pidx, w, top_k, c0, c1, hs, o, accumulate);
    }
  });
}

}  // namespace expertd
