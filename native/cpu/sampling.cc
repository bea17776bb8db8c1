// The batched token sampler on the CPU: logit bias, grammar bitmask, penalties, greedy or
// temperature + top-k + top-p + min-p, seeded draws and top-n logprobs for every row of a step,
// threaded over rows. A line-for-line port of src/engine/sampler.ts and rng.ts in f64 so that
// seeded draws pick the same tokens: same exp polynomial, same summation order, same selections.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
// NOTE: the roundings must be the JS sampler's: an FMA-contracted polynomial or sum would move
// u * sum across a boundary now and then and change a seeded token.
#pragma GCC optimize("fp-contract=off")
#endif

#include "expertd/sampling.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "parallel_rows.h"
#include "x86_intrin.h"
#include "expertd/cpu_features.h"

namespace expertd {

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kTopPRelTolerance = 1e-6;  // TOP_P_REL_TOLERANCE
constexpr int kHeapSelectMaxK = 1024;       // HEAP_SELECT_MAX_K

// ---- rng.ts: xoshiro128** (the state comes from Rng.getState and goes back with setState)

struct Xoshiro {
  uint32_t* s;
  uint32_t next_u32() {
    const uint32_t s1 = s[1];
    const uint32_t m = s1 * 5u;
    const uint32_t result = ((m << 7) | (m >> 25)) * 9u;
    const uint32_t t = s1 << 9;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = (s[3] << 11) | (s[3] >> 21);
    return result;
  }
  // Uniform in [0, 1) with 53 random bits (nextFloat).
  double next_float() {
    const double a = static_cast<double>(next_u32() >> 5);
    const double b = static_cast<double>(next_u32() >> 6);
    return (a * 67108864.0 + b) / 9007199254740992.0;
  }
};

// ---- sampler.ts: fastExp

constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

// [2100] 2^(k - 1075): every double exponent including subnormals (POW2).
struct Pow2Table {
  double v[2100];
  Pow2Table() {
    for (int k = 0; k < 2100; ++k) v[k] = std::ldexp(1.0, k - 1075);
  }
};
const Pow2Table kPow2;

inline double fast_exp(double x) {
  const double t = x * kLog2e;
  if (!(t > -1074)) return t == t ? 0.0 : std::numeric_limits<double>::quiet_NaN();
  if (t > 1023) return kInf;
  const double k = std::floor(t + 0.5);
  const double r = (t - k) * kLn2;
  const double poly =
      1 + r * (1 + r * (1.0 / 2 + r * (1.0 / 6 + r * (1.0 / 24 + r * (1.0 / 120 + r * (1.0 / 720 +
      r * (1.0 / 5040 + r * (1.0 / 40320))))))));
  return poly * kPow2.v[static_cast<int>(k) + 1075];
}

// Lanes threshold_pass_avx512 may write past the candidates it returns (Scratch holds them).
constexpr size_t kCandidateSlack = 8;

#if defined(__x86_64__)
// fast_exp on 4 lanes: the same multiplies and adds in the same order (no FMA: target avx2 alone
// does not enable it), the same table, the same out-of-range answers, so every lane equals the
// scalar result bit for bit.
__attribute__((target("avx2"))) inline __m256d fast_exp4(__m256d x) {
  const __m256d t = _mm256_mul_pd(x, _mm256_set1_pd(kLog2e));
  const __m256d k = _mm256_floor_pd(_mm256_add_pd(t, _mm256_set1_pd(0.5)));
  const __m256d r = _mm256_mul_pd(_mm256_sub_pd(t, k), _mm256_set1_pd(kLn2));
  __m256d p = _mm256_set1_pd(1.0 / 40320);
  p = _mm256_add_pd(_mm256_set1_pd(1.0 / 5040), _mm256_mul_pd(r, p));
  p = _mm256_add_pd(_mm256_set1_pd(1.0 / 720), _mm256_mul_pd(r, p));
  p = _mm256_add_pd(_mm256_set1_pd(1.0 / 120), _mm256_mul_pd(r, p));
  p = _mm256_add_pd(_mm256_set1_pd(1.0 / 24), _mm256_mul_pd(r, p));
  p = _mm256_add_pd(_mm256_set1_pd(1.0 / 6), _mm256_mul_pd(r, p));
  p = _mm256_add_pd(_mm256_set1_pd(1.0 / 2), _mm256_mul_pd(r, p));
  p = _mm256_add_pd(_mm256_set1_pd(1.0), _mm256_mul_pd(r, p));
  p = _mm256_add_pd(_mm256_set1_pd(1.0), _mm256_mul_pd(r, p));
  // max_pd(k, c) answers c for a NaN k: every lane indexes inside the table.
  const __m256d kc = _mm256_min_pd(_mm256_max_pd(k, _mm256_set1_pd(-1075.0)), _mm256_set1_pd(1024.0));
  const __m128i idx = _mm_add_epi32(_mm256_cvtpd_epi32(kc), _mm_set1_epi32(1075));
  __m256d y = _mm256_mul_pd(p, _mm256_i32gather_pd(kPow2.v, idx, 8));
  const __m256d low = _mm256_cmp_pd(t, _mm256_set1_pd(-1074.0), _CMP_NGT_UQ);  // !(t > -1074)
  const __m256d ordered = _mm256_cmp_pd(t, t, _CMP_ORD_Q);
  const __m256d low_value = _mm256_blendv_pd(_mm256_set1_pd(std::numeric_limits<double>::quiet_NaN()),
                                             _mm256_setzero_pd(), ordered);
  y = _mm256_blendv_pd(y, low_value, low);
  return _mm256_blendv_pd(y, _mm256_set1_pd(kInf), _mm256_cmp_pd(t, _mm256_set1_pd(1023.0), _CMP_GT_OQ));
}

// Largest value; NaNs ignored (max_ps answers its second operand when either is NaN).
__attribute__((target("avx2"))) float max_value_avx2(const float* x, int n) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int i = 0;
  for (; i + 8 <= n; i += 8) m = _mm256_max_ps(_mm256_loadu_ps(x + i), m);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float best = -std::numeric_limits<float>::infinity();
  for (float v : lanes)
    if (v > best) best = v;
  for (; i < n; ++i)
    if (x[i] > best) best = x[i];
  return best;
}

__attribute__((target("avx2"))) int first_equal_avx2(const float* x, int n, float v) {
  const __m256 vv = _mm256_set1_ps(v);
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    const int bits = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), vv, _CMP_EQ_OQ));
    if (bits) return i + __builtin_ctz(static_cast<unsigned>(bits));
  }
  for (; i < n; ++i)
    if (x[i] == v) return i;
  return 0;
}

// Sum of fast_exp(x - max) in four lanes: logprobs only need f32 rounding, not the JS order.
__attribute__((target("avx2"))) double sum_exp_avx2(const float* x, int n, double max) {
  __m256d acc = _mm256_setzero_pd();
  const __m256d m = _mm256_set1_pd(max);
  int i = 0;
  for (; i + 4 <= n; i += 4)
    acc = _mm256_add_pd(acc, fast_exp4(_mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + i)), m)));
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, acc);
  double sum = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  for (; i < n; ++i) sum += fast_exp(static_cast<double>(x[i]) - max);
  return sum;
}

// The candidate pass of sample_random with the exps four at a time; the appends and the running
// sum stay in index order (the sum is what a seeded draw scales).
__attribute__((target("avx2"))) int candidates_avx2(const float* w, int V, double kth, double max,
                                                    double inv_t, int32_t* ids, double* weights,
                                                    double* sum_out) {
  int n = 0;
  double sum = 0;
  const __m256d vk = _mm256_set1_pd(kth), vm = _mm256_set1_pd(max), vt = _mm256_set1_pd(inv_t);
  alignas(32) double e[4];
  int i = 0;
  for (; i + 4 <= V; i += 4) {
    const __m256d x = _mm256_cvtps_pd(_mm_loadu_ps(w + i));
    const int keep = _mm256_movemask_pd(_mm256_cmp_pd(x, vk, _CMP_GE_OQ));
    if (!keep) continue;
    _mm256_store_pd(e, fast_exp4(_mm256_mul_pd(_mm256_sub_pd(x, vm), vt)));
    for (int j = 0; j < 4; ++j) {
      if (((keep >> j) & 1) && e[j] > 0) {
        ids[n] = i + j;
        weights[n] = e[j];
        sum += e[j];
        ++n;
      }
    }
  }
  for (; i < V; ++i) {
    const double x = w[i];
    if (x >= kth) {
      const double v = fast_exp((x - max) * inv_t);
      if (v > 0) {
        ids[n] = i;
        weights[n] = v;
        sum += v;
        ++n;
      }
    }
  }
  *sum_out = sum;
  return n;
}

// ---- AVX-512: the same exps eight at a time, and the threshold pass of the partial selection

#define EXPERTD_SAMPLE_AVX512 __attribute__((target("avx512f,avx512vl")))

// fast_exp on 8 lanes, bit for bit: the same multiplies and adds in the same order (the file's
// fp-contract=off keeps them unfused), and poly * 2^k as one scalef, which rounds the exact
// product once, as the multiply by the table's exact power of two does.
EXPERTD_SAMPLE_AVX512 inline __m512d fast_exp8(__m512d x) {
  const __m512d t = _mm512_mul_pd(x, _mm512_set1_pd(kLog2e));
  const __m512d k = _mm512_roundscale_pd(_mm512_add_pd(t, _mm512_set1_pd(0.5)), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512d r = _mm512_mul_pd(_mm512_sub_pd(t, k), _mm512_set1_pd(kLn2));
  __m512d p = _mm512_set1_pd(1.0 / 40320);
  p = _mm512_add_pd(_mm512_set1_pd(1.0 / 5040), _mm512_mul_pd(r, p));
  p = _mm512_add_pd(_mm512_set1_pd(1.0 / 720), _mm512_mul_pd(r, p));
  p = _mm512_add_pd(_mm512_set1_pd(1.0 / 120), _mm512_mul_pd(r, p));
  p = _mm512_add_pd(_mm512_set1_pd(1.0 / 24), _mm512_mul_pd(r, p));
  p = _mm512_add_pd(_mm512_set1_pd(1.0 / 6), _mm512_mul_pd(r, p));
  p = _mm512_add_pd(_mm512_set1_pd(1.0 / 2), _mm512_mul_pd(r, p));
  p = _mm512_add_pd(_mm512_set1_pd(1.0), _mm512_mul_pd(r, p));
  p = _mm512_add_pd(_mm512_set1_pd(1.0), _mm512_mul_pd(r, p));
  __m512d y = _mm512_scalef_pd(p, k);
  const __mmask8 low = _mm512_cmp_pd_mask(t, _mm512_set1_pd(-1074.0), _CMP_NGT_UQ);  // !(t > -1074)
  const __mmask8 ordered = _mm512_cmp_pd_mask(t, t, _CMP_ORD_Q);
  y = _mm512_mask_mov_pd(y, low & ordered, _mm512_setzero_pd());
  y = _mm512_mask_mov_pd(y, low & ~ordered, _mm512_set1_pd(std::numeric_limits<double>::quiet_NaN()));
  return _mm512_mask_mov_pd(y, _mm512_cmp_pd_mask(t, _mm512_set1_pd(1023.0), _CMP_GT_OQ), _mm512_set1_pd(kInf));
}

EXPERTD_SAMPLE_AVX512 inline __mmask8 tail_mask8(int n) {
  return n >= 8 ? static_cast<__mmask8>(0xFF) : static_cast<__mmask8>((1u << n) - 1u);
}

// Sum of fast_exp(x - max) in eight lanes (logprobs: f32 rounding, any order).
EXPERTD_SAMPLE_AVX512 double sum_exp_avx512(const float* x, int n, double max) {
  __m512d acc = _mm512_setzero_pd();
  const __m512d m = _mm512_set1_pd(max);
  for (int i = 0; i < n; i += 8) {
    const __mmask8 tm = tail_mask8(n - i);
    const __m512d xd = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(tm, x + i));
    acc = _mm512_mask_add_pd(acc, tm, acc, fast_exp8(_mm512_sub_pd(xd, m)));
  }
  return _mm512_reduce_add_pd(acc);
}

// The threshold pass of sample_random: the weights w = fast_exp((x - max) / T) of every x >= kth,
// their total in eight lanes (*sum_out, not the JS order: callers bound its error), and the
// candidates with w >= theta (ids and weights, in index order, compress-stored).
EXPERTD_SAMPLE_AVX512 int threshold_pass_avx512(const float* w, int V, double kth, double max,
                                                double inv_t, double theta, int32_t* ids,
                                                double* weights, double* sum_out) {
  __m512d acc = _mm512_setzero_pd();
  const __m512d vk = _mm512_set1_pd(kth), vm = _mm512_set1_pd(max), vt = _mm512_set1_pd(inv_t),
                vth = _mm512_set1_pd(theta);
  const __m256i step = _mm256_set1_epi32(8);
  __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int n = 0;
  for (int i = 0; i < V; i += 8, idx = _mm256_add_epi32(idx, step)) {
    const __mmask8 tm = tail_mask8(V - i);
    const __m512d x = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(tm, w + i));
    const __mmask8 keep = _mm512_mask_cmp_pd_mask(tm, x, vk, _CMP_GE_OQ);
    if (!keep) continue;
    const __m512d e = fast_exp8(_mm512_mul_pd(_mm512_sub_pd(x, vm), vt));
    acc = _mm512_mask_add_pd(acc, keep, acc, e);
    const __mmask8 cand = _mm512_mask_cmp_pd_mask(keep, e, vth, _CMP_GE_OQ);
    if (!cand) continue;
    // NOTE (AMD Zen 4): compress into a register and store all 8 lanes (the buffers hold
    // kCandidateSlack more): vcompresspd / vpcompressd with a memory destination are microcoded
    // there, and made this pass 3x slower on the flat rows that keep most of the vocabulary.
    _mm512_storeu_pd(weights + n, _mm512_maskz_compress_pd(cand, e));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(ids + n), _mm256_maskz_compress_epi32(cand, idx));
    n += __builtin_popcount(cand);
  }
  *sum_out = _mm512_reduce_add_pd(acc);
  return n;
}

// Masks of the 16 values of x[i..i+16) greater than v (NaN never is): lets the k-heap and the
// top-n logprobs skip the blocks that cannot enter (nearly all of a row once they are full).
EXPERTD_SAMPLE_AVX512 inline unsigned greater_mask16(const float* x, int n, float v) {
  const __mmask16 tm = n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
  return _mm512_mask_cmp_ps_mask(tm, _mm512_maskz_loadu_ps(tm, x), _mm512_set1_ps(v), _CMP_GT_OQ);
}
// compact()'s selection: the entries with weight >= cutoff, in order, in place (each store of 8
// lanes ends before the next unread entry; up to 7 lanes past the count need kCandidateSlack).
// Branch-free: on a flat row about half the entries stay, and the scalar loop mispredicted.
EXPERTD_SAMPLE_AVX512 int compact_avx512(int32_t* ids, double* weights, int n, double cutoff) {
  const __m512d vc = _mm512_set1_pd(cutoff);
  int m = 0;
  for (int j = 0; j < n; j += 8) {
    const __mmask8 tm = tail_mask8(n - j);
    const __m512d w = _mm512_maskz_loadu_pd(tm, weights + j);
    const __m256i id = _mm256_maskz_loadu_epi32(tm, ids + j);
    const __mmask8 keep = _mm512_mask_cmp_pd_mask(tm, w, vc, _CMP_GE_OQ);
    _mm512_storeu_pd(weights + m, _mm512_maskz_compress_pd(keep, w));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(ids + m), _mm256_maskz_compress_epi32(keep, id));
    m += __builtin_popcount(keep);
  }
  return m;
}

// The smallest and largest bit patterns of n positive doubles (bucket_cutoff's range).
EXPERTD_SAMPLE_AVX512 void bits_range_avx512(const double* w, int n, uint64_t* lo, uint64_t* hi) {
  __m512i vlo = _mm512_set1_epi64(-1), vhi = _mm512_setzero_si512();
  int j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m512i b = _mm512_castpd_si512(_mm512_loadu_pd(w + j));
    vlo = _mm512_min_epu64(vlo, b);
    vhi = _mm512_max_epu64(vhi, b);
  }
  uint64_t l = _mm512_reduce_min_epu64(vlo), h = _mm512_reduce_max_epu64(vhi);
  for (; j < n; ++j) {
    uint64_t b;
    std::memcpy(&b, &w[j], 8);
    l = std::min(l, b);
    h = std::max(h, b);
  }
  *lo = l;
  *hi = h;
}

// The weights whose bucket is k, in order, into sel; returns their count (sel needs
// kCandidateSlack more than that).
EXPERTD_SAMPLE_AVX512 int gather_bucket_avx512(const double* w, const uint16_t* bucket_of, int n,
                                               int k, double* sel) {
  const __m512i vk = _mm512_set1_epi64(k);
  int m = 0, j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m512i b = _mm512_cvtepu16_epi64(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bucket_of + j)));
    const __mmask8 eq = _mm512_cmpeq_epi64_mask(b, vk);
    if (!eq) continue;
    _mm512_storeu_pd(sel + m, _mm512_maskz_compress_pd(eq, _mm512_loadu_pd(w + j)));
    m += __builtin_popcount(eq);
  }
  for (; j < n; ++j)
    if (bucket_of[j] == k) sel[m++] = w[j];
  return m;
}
#undef EXPERTD_SAMPLE_AVX512
#endif

// Set per call: AVX2 where the CPU has it and the tests have not forced the portable code.
thread_local bool tls_avx2 = false;
// Set per call: AVX-512 (f, vl) likewise; selects the partial selection of sample_random.
thread_local bool tls_avx512 = false;

// Index of the largest value, the lowest index among equals; NaNs never win.
int argmax(const float* x, int n) {
#if defined(__x86_64__)
  if (tls_avx2) {
    const float m = max_value_avx2(x, n);
    return m == -std::numeric_limits<float>::infinity() ? 0 : first_equal_avx2(x, n, m);
  }
#endif
  int best = 0;
  float best_value = -std::numeric_limits<float>::infinity();
  for (int i = 0; i < n; ++i) {
    if (x[i] > best_value) {
      best_value = x[i];
      best = i;
    }
  }
  return best;
}

float max_value(const float* x, int n) {
#if defined(__x86_64__)
  if (tls_avx2) return max_value_avx2(x, n);
#endif
  float m = -std::numeric_limits<float>::infinity();
  for (int i = 0; i < n; ++i)
    if (x[i] > m) m = x[i];
  return m;
}

// log(sum(exp(x))) accumulated in f64 (logSumExp).
double log_sum_exp(const float* x, int n) {
  const double max = max_value(x, n);
  if (max == -kInf) return -kInf;
  double sum = 0;
#if defined(__x86_64__)
  if (tls_avx512) return max + std::log(sum_exp_avx512(x, n, max));
  if (tls_avx2) return max + std::log(sum_exp_avx2(x, n, max));
#endif
  for (int i = 0; i < n; ++i) sum += fast_exp(static_cast<double>(x[i]) - max);
  return max + std::log(sum);
}

// ---- selections (kthLargest, nucleusCutoff and their partitions)

struct Partition {
  double pivot;
  int lt, gt;
  double greater, equal;
};

// One three-way partition of a[lo..hi] in descending order around a median-of-three pivot.
Partition partition_descending(double* a, int lo, int hi) {
  const int mid = static_cast<int>((static_cast<unsigned>(lo) + static_cast<unsigned>(hi)) >> 1);
  const double x = a[lo], y = a[mid], z = a[hi];
  const double pivot = x < y ? (y < z ? y : x < z ? z : x) : (x < z ? x : y < z ? z : y);
  int lt = lo, i = lo, gt = hi;
  double greater = 0, equal = 0;
  while (i <= gt) {
    const double v = a[i];
    if (v > pivot) {
      a[i] = a[lt];
      a[lt] = v;
      ++lt;
      ++i;
      greater += v;
    } else if (v < pivot) {
      a[i] = a[gt];
      a[gt] = v;
      --gt;
    } else {
      equal += v;
      ++i;
    }
  }
  return {pivot, lt, gt, greater, equal};
}

double quickselect_largest(double* a, int n, int k) {
  int lo = 0, hi = n - 1;
  const int target = k - 1;
  while (lo < hi) {
    const Partition p = partition_descending(a, lo, hi);
    if (target < p.lt) hi = p.lt - 1;
    else if (target > p.gt) lo = p.gt + 1;
    else return p.pivot;
  }
  return a[lo];
}

void sift_down_root(double* h, int size, double x) {
  int i = 0;
  for (;;) {
    int c = 2 * i + 1;
    if (c >= size) break;
    if (c + 1 < size && h[c + 1] < h[c]) ++c;
    if (h[c] >= x) break;
    h[i] = h[c];
    i = c;
  }
  h[i] = x;
}

// The k-th largest of values (NaNs ignored; -inf when fewer than k are numbers).
double kth_largest(const float* values, int n_values, int k, double* s) {
  if (k <= kHeapSelectMaxK) {
    int size = 0;
    for (int i = 0; i < n_values; ++i) {
#if defined(__x86_64__)
      // A full heap takes only values above its root: skip the blocks of 16 that hold none (the
      // root is an f32 value, so the f32 compare is the f64 one). Same inserts, same order.
      if (tls_avx512 && size == k && (i & 15) == 0) {
        unsigned bits = greater_mask16(values + i, n_values - i, static_cast<float>(s[0]));
        for (; bits; bits &= bits - 1) {
          const double x = values[i + __builtin_ctz(bits)];
          if (x > s[0]) sift_down_root(s, size, x);
        }
        i += 15;
        continue;
      }
#endif
      const double x = values[i];
      if (size < k) {
        if (x != x) continue;
        int c = size++;
        while (c > 0) {
          const int parent = (c - 1) >> 1;
          if (s[parent] <= x) break;
          s[c] = s[parent];
          c = parent;
        }
        s[c] = x;
      } else if (x > s[0]) {
        sift_down_root(s, size, x);
      }
    }
    return size < k ? -kInf : s[0];
  }
  int n = 0;
  for (int i = 0; i < n_values; ++i)
    if (values[i] == values[i]) s[n++] = values[i];
  return n < k ? -kInf : quickselect_largest(s, n, k);
}

double weighted_select(double* a, int m, double target) {
  int lo = 0, hi = m - 1;
  double need = target;
  while (lo <= hi) {
    const Partition p = partition_descending(a, lo, hi);
    if (p.greater >= need) {
      hi = p.lt - 1;
    } else if (p.greater + p.equal >= need) {
      return p.pivot;
    } else {
      need -= p.greater + p.equal;
      lo = p.gt + 1;
    }
  }
  return 0;
}

double nucleus_cutoff(const double* weights, int n, double sum, double top_p, double* scratch) {
  const double target = top_p * sum * (1 - kTopPRelTolerance);
  const double threshold = sum * 1e-3;
  int m = 0;
  double mass = 0;
  for (int j = 0; j < n; ++j) {
    const double x = weights[j];
    if (x >= threshold) {
      scratch[m++] = x;
      mass += x;
    }
  }
  if (mass < target) {
    m = n;
    std::memcpy(scratch, weights, sizeof(double) * static_cast<size_t>(n));
  }
  return weighted_select(scratch, m, target);
}

// Keeps entries with weight >= cutoff, in order; returns the new count, total in *sum.
int compact(int32_t* ids, double* weights, int n, double cutoff, double* sum) {
#if defined(__x86_64__)
  if (tls_avx512) {
    const int m = compact_avx512(ids, weights, n, cutoff);
    double s = 0;
    for (int j = 0; j < m; ++j) s += weights[j];  // the JS order
    *sum = s;
    return m;
  }
#endif
  int m = 0;
  double s = 0;
  for (int j = 0; j < n; ++j) {
    const double x = weights[j];
    if (x >= cutoff) {
      ids[m] = ids[j];
      weights[m] = x;
      s += x;
      ++m;
    }
  }
  *sum = s;
  return m;
}

// The top-p cutoff by buckets of the weights' bit patterns (positive doubles order as their bits):
// one pass fills per-bucket masses, the bucket where the mass from the top reaches target is
// gathered and sorted, and its distinct values are walked. c is the largest weight with
// mass(w >= c) >= target; *above = mass(w > c), *at_or_above = mass(w >= c), summed in an order
// of their own (callers bound the error). False where the rounded walk does not reach target.
// O(n) with no data-dependent partition branches: the flat rows where the nucleus is most of the
// vocabulary cost a few passes, not a quickselect's.
constexpr int kCutoffBuckets = 4096;
bool bucket_cutoff(const double* w, int n, double target, double* sel, uint16_t* bucket_of,
                   double* mass, double* c_out, double* above_out, double* at_or_above_out) {
  uint64_t lo = ~uint64_t{0}, hi = 0;
#if defined(__x86_64__)
  if (tls_avx512)
    bits_range_avx512(w, n, &lo, &hi);
  else
#endif
    for (int j = 0; j < n; ++j) {
      uint64_t b;
      std::memcpy(&b, &w[j], 8);
      lo = std::min(lo, b);
      hi = std::max(hi, b);
    }
  int shift = 0;
  while (((hi - lo) >> shift) >= static_cast<uint64_t>(kCutoffBuckets)) ++shift;
  const int nb = static_cast<int>((hi - lo) >> shift) + 1;
  std::fill(mass, mass + nb, 0.0);
  for (int j = 0; j < n; ++j) {
    uint64_t b;
    std::memcpy(&b, &w[j], 8);
    const int k = static_cast<int>((b - lo) >> shift);
    bucket_of[j] = static_cast<uint16_t>(k);
    mass[k] += w[j];
  }
  double acc = 0;
  int k = nb - 1;
  for (; k >= 0; --k) {
    if (acc + mass[k] >= target) break;
    acc += mass[k];
  }
  if (k < 0) return false;
  int m = 0;
#if defined(__x86_64__)
  if (tls_avx512)
    m = gather_bucket_avx512(w, bucket_of, n, k, sel);
  else
#endif
    for (int j = 0; j < n; ++j)
      if (bucket_of[j] == k) sel[m++] = w[j];
  std::sort(sel, sel + m, [](double a, double b) { return a > b; });
  for (int j = 0; j < m;) {
    const double v = sel[j];
    double eq = 0;
    while (j < m && sel[j] == v) eq += sel[j++];
    if (acc + eq >= target) {
      *c_out = v;
      *above_out = acc;
      *at_or_above_out = acc + eq;
      return true;
    }
    acc += eq;
  }
  return false;
}

// ---- one row

// Per-thread scratch, kept between calls (a fresh 3.6 MB per row at V = 152K would be page
// faults on every step).
struct Scratch {
  std::vector<float> work;        // [V] the row after mask, bias and penalties
  std::vector<int32_t> cand_ids;  // [V]
  std::vector<double> cand_w;     // [V]
  std::vector<double> sel;        // [V] selection scratch
  std::vector<uint16_t> bucket_of;  // [V] bucket_cutoff's bucket per candidate
  std::vector<double> bucket_mass;  // [kCutoffBuckets]
  void ensure(size_t v) {
    if (work.size() < v) {
      work.resize(v);
      cand_ids.resize(v + kCandidateSlack);  // threshold_pass_avx512 stores whole vectors
      cand_w.resize(v + kCandidateSlack);
      sel.resize(v + kCandidateSlack);
      bucket_of.resize(v);
    }
    if (bucket_mass.empty()) bucket_mass.resize(kCutoffBuckets);
  }
};

thread_local Scratch tls_scratch;

// The draw: u = next_float * sum over the kept candidates, the first whose running sum passes it.
int draw(const int32_t* ids, const double* weights, int n, double sum, Xoshiro& rng) {
  const double u = rng.next_float() * sum;
  double acc = 0;
  for (int j = 0; j < n; ++j) {
    acc += weights[j];
    if (u < acc) return ids[j];
  }
  return ids[n - 1];
}

#if defined(__x86_64__)
// The partial selection (AVX-512): one vector pass computes every weight, the total to a bounded
// error and the candidates w >= theta, then top-p and min-p work on the candidates alone. Returns
// -1 (rng untouched) where it cannot prove the JS sampler's kept set; the caller then runs the
// full path. Why it is the same kept set, and so the same tokens:
//  - the weights are the JS ones bit for bit (fast_exp8); only their total S is summed in another
//    order, within 16 V 2^-53 S of the JS total (and the JS partitions' sums likewise);
//  - the JS cutoff c (its weighted quickselect, on its sum/1000 filter or on all weights) is the
//    largest weight with mass(w >= c) >= target = top_p S (1 - tol); c is found here among the
//    candidates and accepted only when mass(w > c) < target - margin and mass(w >= c) >=
//    target + margin, with a margin above every rounding of both computations: then every
//    rounded comparison the JS selection makes falls on the same side, and it returns this c.
//    Non-candidates (w < theta <= c) are below c, so they change neither mass;
//  - the kept set {w >= c} and then {w >= min_p} is compacted in index order with the JS sequential
//    sums, so the draw scales and walks the same numbers.
// A peaked row (a trained model's) keeps a handful of candidates; a flat one keeps the vocabulary
// and costs what the full path does.
constexpr int kSmallNucleus = 256;  // up to this many candidates: a quickselect, then a check

int sample_random_partial(const float* w, int V, const SampleParams& p, double kth, double max,
                          Xoshiro& rng, Scratch& sc) {
  if (!(std::isfinite(max))) return -1;
  int32_t* ids = sc.cand_ids.data();
  double* weights = sc.cand_w.data();
  const double inv_t = 1 / p.temperature;
  const bool nucleus = p.top_p < 1;
  // The JS nucleus filter's own bound (sum / 1000, and sum >= 1: the max's weight is exactly 1),
  // raised to min_p, which drops everything below it anyway; without top-p and min-p every
  // positive weight is a candidate.
  const double theta = nucleus ? std::max(1e-3, p.min_p)
                               : p.min_p > 0 ? p.min_p : std::numeric_limits<double>::denorm_min();
  double total = 0;
  int n = threshold_pass_avx512(w, V, kth, max, inv_t, theta, ids, weights, &total);
  if (n == 0) return -1;
  double sum = 0;
  if (nucleus) {  // NOTE: even for one candidate: the JS nucleus may hold non-candidates
    const double target = p.top_p * total * (1 - kTopPRelTolerance);
    const double margin = std::max(1e-9, 16.0 * V * 0x1p-53) * total;
    double c = 0, above = 0, at_or_above = 0;
    if (n > kSmallNucleus) {
      // The candidates do not reach top_p (false): the full path.
      if (!bucket_cutoff(weights, n, target, sc.sel.data(), sc.bucket_of.data(),
                         sc.bucket_mass.data(), &c, &above, &at_or_above))
        return -1;
    } else {
      double* a = sc.sel.data();
      std::memcpy(a, weights, sizeof(double) * static_cast<size_t>(n));
      c = weighted_select(a, n, target);
      if (!(c > 0)) return -1;
      for (int j = 0; j < n; ++j) {
        if (weights[j] > c) above += weights[j];
        if (weights[j] >= c) at_or_above += weights[j];
      }
    }
    if (!(above < target - margin && at_or_above >= target + margin)) return -1;
    n = compact(ids, weights, n, c, &sum);
  } else {
    n = compact(ids, weights, n, 0, &sum);  // the JS sequential sum of the candidates
  }
  if (p.min_p > 0 && n > 1) n = compact(ids, weights, n, p.min_p, &sum);
  return draw(ids, weights, n, sum, rng);
}
#endif

int sample_random(const float* w, int V, const SampleParams& p, Xoshiro& rng, Scratch& sc) {
  int32_t* ids = sc.cand_ids.data();
  double* weights = sc.cand_w.data();
  const double inv_t = 1 / p.temperature;

  const int k = p.top_k > 0 && p.top_k < V ? p.top_k : 0;
  const double kth = k > 0 ? kth_largest(w, V, k, sc.sel.data()) : -kInf;
  const double max = max_value(w, V);

#if defined(__x86_64__)
  if (tls_avx512) {
    const int token = sample_random_partial(w, V, p, kth, max, rng, sc);
    if (token >= 0) return token;
  }
#endif

  int n = 0;
  double sum = 0;
#if defined(__x86_64__)
  if (tls_avx2) {
    n = candidates_avx2(w, V, kth, max, inv_t, ids, weights, &sum);
  } else
#endif
  {
    for (int i = 0; i < V; ++i) {
      const double x = w[i];
      if (x >= kth) {
        const double e = fast_exp((x - max) * inv_t);
        if (e > 0) {
          ids[n] = i;
          weights[n] = e;
          sum += e;
          ++n;
        }
      }
    }
  }
  if (n == 0) return argmax(w, V);

  if (p.top_p < 1 && n > 1) {
    const double cutoff = nucleus_cutoff(weights, n, sum, p.top_p, sc.sel.data());
    n = compact(ids, weights, n, cutoff, &sum);
  }
  if (p.min_p > 0 && n > 1) n = compact(ids, weights, n, p.min_p, &sum);
  return draw(ids, weights, n, sum, rng);
}

void top_logprobs(const float* w, int V, int count, double lse, int32_t* out_ids,
                  double* out_lp, int32_t* out_count) {
  double vals[kSampleMaxTopLogprobs];
  int32_t ids[kSampleMaxTopLogprobs];
  const int n = std::min(count, V);
  int size = 0;
  for (int i = 0; i < V; ++i) {
#if defined(__x86_64__)
    // Once full, only values above the n-th can enter: skip the blocks of 16 that hold none.
    if (tls_avx512 && size == n && (i & 15) == 0 &&
        !greater_mask16(w + i, V - i, static_cast<float>(vals[n - 1]))) {
      i += 15;
      continue;
    }
#endif
    const double x = w[i];
    if (size == n && !(x > vals[n - 1])) continue;
    if (x != x) continue;
    int j = size < n ? size++ : n - 1;
    while (j > 0 && vals[j - 1] < x) {
      vals[j] = vals[j - 1];
      ids[j] = ids[j - 1];
      --j;
    }
    vals[j] = x;
    ids[j] = i;
  }
  for (int j = 0; j < size; ++j) {
    out_ids[j] = ids[j];
    out_lp[j] = vals[j] - lse;
  }
  *out_count = size;
}

void sample_row(const float* logits, int V, const SampleSeq& q, const SampleOut& out, int r) {
  const SampleParams& p = q.p;
  const bool penalize_seen = p.repetition_penalty != 1 && q.n_seen > 0;
  const bool penalize_counts = (p.presence_penalty != 0 || p.frequency_penalty != 0) && q.n_counts > 0;
  const bool modified = q.bitmask || q.n_bias > 0 || penalize_seen || penalize_counts;
  Scratch& sc = tls_scratch;
  sc.ensure(static_cast<size_t>(V));
  const float* w = logits;
  if (modified) {
    float* m = sc.work.data();
    std::memcpy(m, logits, sizeof(float) * static_cast<size_t>(V));
    if (q.bitmask) {
      const int words = (V + 31) / 32;
      for (int i = 0; i < words; ++i) {
        const uint32_t bits = static_cast<uint32_t>(q.bitmask[i]);
        if (bits == 0xffffffffu) continue;
        const int j1 = std::min(32, V - 32 * i);
        for (int j = 0; j < j1; ++j)
          if (!((bits >> j) & 1u)) m[32 * i + j] = -std::numeric_limits<float>::infinity();
      }
    }
    // vLLM order: bias, then repetition penalty, then presence/frequency penalties. The JS
    // sampler computes each in f64 and stores f32: the casts below are its roundings.
    for (int i = 0; i < q.n_bias; ++i) {
      float& x = m[q.bias_ids[i]];
      x = static_cast<float>(static_cast<double>(x) + static_cast<double>(q.bias_values[i]));
    }
    if (penalize_seen) {
      const double rp = p.repetition_penalty;
      for (int i = 0; i < q.n_seen; ++i) {
        float& x = m[q.seen_ids[i]];
        const double v = x;
        x = static_cast<float>(v > 0 ? v / rp : v * rp);
      }
    }
    if (penalize_counts) {
      for (int i = 0; i < q.n_counts; ++i) {
        float& x = m[q.count_ids[i]];
        x = static_cast<float>(static_cast<double>(x) -
                               (p.presence_penalty + p.frequency_penalty * q.count_values[i]));
      }
    }
    w = m;
  }

  int token;
  if (p.temperature < kSampleGreedyTemperature) {
    token = argmax(w, V);
  } else {
    Xoshiro rng{q.rng};
    token = sample_random(w, V, p, rng, sc);
  }
  out.token_ids[r] = token;
  out.top_counts[r] = 0;
  if (p.num_top_logprobs >= 0) {
    // Logprobs of the distribution after bias and penalties, before temperature and truncation.
    const double lse = log_sum_exp(w, V);
    out.logprobs[r] = static_cast<double>(w[token]) - lse;
    if (p.num_top_logprobs > 0)
      top_logprobs(w, V, std::min(p.num_top_logprobs, kSampleMaxTopLogprobs), lse,
                   out.top_ids + static_cast<size_t>(r) * kSampleMaxTopLogprobs,
                   out.top_logprobs + static_cast<size_t>(r) * kSampleMaxTopLogprobs,
                   out.top_counts + r);
  } else {
    out.logprobs[r] = std::numeric_limits<double>::quiet_NaN();
  }
}

}  // namespace

void sample_batch(const float* logits, int rows, int vocab, const SampleSeq* seqs,
                  const SampleOut& out) {
  const bool avx2 = cpu_features().avx2;  // false when the tests force the portable code
  const bool avx512 = cpu_features().kernel_avx512;
  // One row is a few O(V) passes: worth a thread each.
  parallel_rows(static_cast<size_t>(rows), static_cast<size_t>(vocab) * 8, [&](size_t r0, size_t r1) {
    tls_avx2 = avx2;
    tls_avx512 = avx512;
    for (size_t r = r0; r < r1; ++r)
      sample_row(logits + r * static_cast<size_t>(vocab), vocab, seqs[r], out, static_cast<int>(r));
  });
}

}  // namespace expertd
