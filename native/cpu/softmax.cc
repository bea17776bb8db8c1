// Softmax, log-softmax and top-n over vocabulary rows (f32, max-subtracted, sums in double).
// A decode step has a few rows of ~150K columns, so one row is also split across threads.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "expertd/cpu_features.h"
#include "expertd/ops.h"
#include "parallel_rows.h"
#include "rank_order.h"
#include "simd_exp.h"

namespace expertd {

namespace {

// ---- the three passes over a column range [0, n), portable and AVX-512.
float max_scalar(const float* x, size_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (size_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// sum of exp(x - mx); writes the exps to out unless out is null (log-softmax keeps x intact).
double expsum_scalar(const float* x, size_t n, float mx, float* out) {
  double s = 0.0;
  for (size_t i = 0; i < n; ++i) {
    const float e = std::exp(x[i] - mx);
    if (out) out[i] = e;
    s += e;
  }
  return s;
}

// softmax: out *= inv; log-softmax: out = (x - mx) - lse.
void finish_scalar(const float* x, size_t n, float mx, float inv, float lse, float* out, bool log) {
  if (log) {
    for (size_t i = 0; i < n; ++i) out[i] = (x[i] - mx) - lse;
  } else {
    for (size_t i = 0; i < n; ++i) out[i] *= inv;
  }
}

#if defined(__x86_64__)
__attribute__((target("avx512f,fma"))) float max_avx512(const float* x, size_t n) {
  __m512 m0 = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), m1 = m0;
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    m0 = _mm512_max_ps(m0, _mm512_loadu_ps(x + i));
    m1 = _mm512_max_ps(m1, _mm512_loadu_ps(x + i + 16));
  }
  float m = _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
  for (; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

__attribute__((target("avx512f,fma"))) double expsum_avx512(const float* x, size_t n, float mx,
                                                            float* out) {
  const __m512 mv = _mm512_set1_ps(mx);
  __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
  size_t i = 0;
  for (; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? 0xffff : static_cast<__mmask16>((1u << (n - i)) - 1);
    // masked-off lanes load -inf so that exp gives 0 and the sum is untouched
    const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), m, x + i);
    const __m512 e = exp512_ps(_mm512_sub_ps(v, mv));
    if (out) _mm512_mask_storeu_ps(out + i, m, e);
    s0 = _mm512_add_pd(s0, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
    s1 = _mm512_add_pd(s1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1))));
  }
  return _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
}

__attribute__((target("avx512f,fma"))) void finish_avx512(const float* x, size_t n, float mx,
                                                          float inv, float lse, float* out,
                                                          bool log) {
  size_t i = 0;
  if (log) {
    const __m512 mv = _mm512_set1_ps(mx), lv = _mm512_set1_ps(lse);
    for (; i + 16 <= n; i += 16)
      _mm512_storeu_ps(out + i, _mm512_sub_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), mv), lv));
  } else {
    const __m512 iv = _mm512_set1_ps(inv);
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_loadu_ps(out + i), iv));
  }
  finish_scalar(x + i, n - i, mx, inv, lse, out + i, log);
}
#endif

struct Kernels {
  float (*max)(const float*, size_t);
  double (*expsum)(const float*, size_t, float, float*);
  void (*finish)(const float*, size_t, float, float, float, float*, bool);
};

Kernels pick_kernels() {
#if defined(__x86_64__)
  if (cpu_features().kernel_avx512) return {max_avx512, expsum_avx512, finish_avx512};
#endif
  return {max_scalar, expsum_scalar, finish_scalar};
}

void softmax_row(const Kernels& k, const float* x, size_t n, float* out, bool log) {
  const float mx = k.max(x, n);
  const double sum = k.expsum(x, n, mx, log ? nullptr : out);
  k.finish(x, n, mx, static_cast<float>(1.0 / sum), static_cast<float>(std::log(sum)), out, log);
}

// One long row split into column chunks over the pool: three passes with a reduction between.
void softmax_row_split(const Kernels& k, const float* x, size_t n, float* out, bool log,
                       size_t chunk) {
  const size_t nc = (n + chunk - 1) / chunk;
  thread_local std::vector<double> part;  // [nc] partial max (as double) then partial sums
  if (part.size() < nc) part.resize(nc);
  double* p = part.data();
  ThreadPool& pool = ThreadPool::instance();
  struct Ctx {
    const Kernels* k;
    const float* x;
    float* out;
    size_t n, chunk;
    double* p;
    float mx, inv, lse;
    bool log;
  } ctx{&k, x, out, n, chunk, p, 0.0f, 0.0f, 0.0f, log};
  Ctx* c = &ctx;
  pool.parallel_for(nc, [c](size_t i, size_t) {
    const size_t c0 = i * c->chunk;
    c->p[i] = c->k->max(c->x + c0, std::min(c->chunk, c->n - c0));
  });
  float mx = -std::numeric_limits<float>::infinity();
  for (size_t i = 0; i < nc; ++i) mx = static_cast<float>(p[i]) > mx ? static_cast<float>(p[i]) : mx;
  ctx.mx = mx;
  pool.parallel_for(nc, [c](size_t i, size_t) {
    const size_t c0 = i * c->chunk;
    c->p[i] = c->k->expsum(c->x + c0, std::min(c->chunk, c->n - c0), c->mx,
                           c->log ? nullptr : c->out + c0);
  });
  double sum = 0.0;
  for (size_t i = 0; i < nc; ++i) sum += p[i];
  ctx.inv = static_cast<float>(1.0 / sum);
  ctx.lse = static_cast<float>(std::log(sum));
  pool.parallel_for(nc, [c](size_t i, size_t) {
    const size_t c0 = i * c->chunk;
    c->k->finish(c->x + c0, std::min(c->chunk, c->n - c0), c->mx, c->inv, c->lse, c->out + c0,
                 c->log);
  });
}

// ---- top-n: a sorted buffer of the n best so far; later equal values never displace (the
// scan is in index order), so only values strictly above the current n-th are inserted.
void insert_sorted(float v, int32_t i, float* bv, int32_t* bi, size_t n) {
  size_t pos = n - 1;
  while (pos > 0 && rank_before(v, i, bv[pos - 1], bi[pos - 1])) {
    bv[pos] = bv[pos - 1];
    bi[pos] = bi[pos - 1];
    --pos;
  }
  bv[pos] = v;
  bi[pos] = i;
}

void top_n_small_scalar(const float* x, size_t cols, size_t n, float* bv, int32_t* bi, size_t start) {
  for (size_t c = start; c < cols; ++c)
    if (rank_before(x[c], static_cast<int32_t>(c), bv[n - 1], bi[n - 1]))
      insert_sorted(x[c], static_cast<int32_t>(c), bv, bi, n);
}

#if defined(__x86_64__)
__attribute__((target("avx512f"))) void top_n_small_avx512(const float* x, size_t cols, size_t n,
                                                           float* bv, int32_t* bi, size_t start) {
  size_t c = start;
  for (; c + 16 <= cols; c += 16) {
    const float thr = bv[n - 1];
    if (thr != thr) {  // a NaN in the buffer: anything non-NaN beats it, take the exact path
      top_n_small_scalar(x, c + 16, n, bv, bi, c);
      continue;
    }
    __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + c), _mm512_set1_ps(thr), _CMP_GT_OQ);
    while (m) {
      const int lane = __builtin_ctz(m);
      m &= m - 1;
      const size_t i = c + lane;
      if (rank_before(x[i], static_cast<int32_t>(i), bv[n - 1], bi[n - 1]))
        insert_sorted(x[i], static_cast<int32_t>(i), bv, bi, n);
    }
  }
  top_n_small_scalar(x, cols, n, bv, bi, c);
}
#endif

// Above this n, an insertion buffer degrades (O(cols * n)); sort an index scratch instead.
constexpr size_t kTopNInsertMax = 64;

void top_n_row(const float* x, size_t cols, size_t n, int32_t* ids, float* vals, bool simd) {
  if (n <= kTopNInsertMax) {
    // seed with the first n columns, sorted
    for (size_t c = 0; c < n; ++c) {
      vals[c] = x[c];
      ids[c] = static_cast<int32_t>(c);
      size_t pos = c;
      while (pos > 0 && rank_before(vals[pos], ids[pos], vals[pos - 1], ids[pos - 1])) {
        std::swap(vals[pos], vals[pos - 1]);
        std::swap(ids[pos], ids[pos - 1]);
        --pos;
      }
    }
#if defined(__x86_64__)
    if (simd) return top_n_small_avx512(x, cols, n, vals, ids, n);
#endif
    (void)simd;
    return top_n_small_scalar(x, cols, n, vals, ids, n);
  }
  thread_local std::vector<int32_t> idx;  // [cols] grow-only
  if (idx.size() < cols) idx.resize(cols);
  for (size_t c = 0; c < cols; ++c) idx[c] = static_cast<int32_t>(c);
  std::partial_sort(idx.begin(), idx.begin() + n, idx.begin() + cols,
                    [x](int32_t a, int32_t b) { return rank_before(x[a], a, x[b], b); });
  for (size_t j = 0; j < n; ++j) {
    ids[j] = idx[j];
    vals[j] = x[idx[j]];
  }
}

}  // namespace

void softmax_rows(const float* x, int rows, int cols, float* out, bool log) {
  const Kernels k = pick_kernels();
  const size_t n = static_cast<size_t>(cols);
  const size_t threads = ThreadPool::instance().num_threads();
  constexpr size_t kSplitChunk = size_t{1} << 14;
  if (threads > 1 && static_cast<size_t>(rows) < threads && n >= 4 * kSplitChunk) {
    for (size_t r = 0; r < static_cast<size_t>(rows); ++r)
      softmax_row_split(k, x + r * n, n, out + r * n, log, kSplitChunk);
    return;
  }
  parallel_rows(static_cast<size_t>(rows), n * 3, [&](size_t r0, size_t r1) {
    for (size_t r = r0; r < r1; ++r) softmax_row(k, x + r * n, n, out + r * n, log);
  });
}

void top_n(const float* x, int rows, int cols, int n, int32_t* ids, float* vals) {
  const size_t cs = static_cast<size_t>(cols);
  const size_t ns = static_cast<size_t>(n);
  const bool simd = cpu_features().kernel_avx512;
  parallel_rows(static_cast<size_t>(rows), cs, [&](size_t r0, size_t r1) {
    for (size_t r = r0; r < r1; ++r) top_n_row(x + r * cs, cs, ns, ids + r * ns, vals + r * ns, simd);
  });
}

}  // namespace expertd
