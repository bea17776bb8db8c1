// The batched token sampler on the device: one block per row over the logits the LM head left on
// the device; only the sampled ids, the requested logprobs and the advanced RNG states come back.
// The arithmetic is native/cpu/sampling.cc's (itself src/engine/sampler.ts's): f64 with explicit
// _rn intrinsics (never fused), the same exp polynomial, candidates summed in index order, the same
// selections; the parts whose rounding depends on order run on thread 0 of the row's block.
#include <cmath>
#include <cstring>
#include <vector>

#include "cuda_common.h"
#include "expertd/sampling.h"

namespace expertd::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kHeapSelectMaxK = 1024;
constexpr double kTopPRelTolerance = 1e-6;
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

// Device views of one call's arrays (all in one allocation).
struct Args {
  const double* params;  // [R, 8]
  uint32_t* rng;         // [R, 4]
  const int32_t *bias_off, *bias_ids;
  const float* bias_vals;
  const int32_t *seen_off, *seen_ids;
  const int32_t *count_off, *count_ids, *count_vals;
  const int32_t* mask_rows;  // [R], -1 = none
  const int32_t* masks;      // [M, words]
  int32_t* token;            // [R]
  int32_t* top_counts;       // [R]
  double* logprob;           // [R]
  double* top_lp;            // [R, 20]
  int32_t* top_ids;          // [R, 20]
  float* work;               // [R, V]
  int32_t* cand_ids;         // [R, V]
  double* cand_w;            // [R, V]
  double* sel;               // [R, V]
};

// fastExp of sampler.ts: 2^k comes from scalbn (exact, 0 below the subnormals) where the JS reads
// its table of the same powers.
__device__ double fast_exp(double x) {
  const double t = __dmul_rn(x, kLog2e);
  if (!(t > -1074.0)) return t == t ? 0.0 : __longlong_as_double(0x7ff8000000000000LL);
  if (t > 1023.0) return __longlong_as_double(0x7ff0000000000000LL);
  const double k = floor(__dadd_rn(t, 0.5));
  const double r = __dmul_rn(__dsub_rn(t, k), kLn2);
  double p = 1.0 / 40320;
  p = __dadd_rn(1.0 / 5040, __dmul_rn(r, p));
  p = __dadd_rn(1.0 / 720, __dmul_rn(r, p));
  p = __dadd_rn(1.0 / 120, __dmul_rn(r, p));
  p = __dadd_rn(1.0 / 24, __dmul_rn(r, p));
  p = __dadd_rn(1.0 / 6, __dmul_rn(r, p));
  p = __dadd_rn(1.0 / 2, __dmul_rn(r, p));
  p = __dadd_rn(1.0, __dmul_rn(r, p));
  p = __dadd_rn(1.0, __dmul_rn(r, p));
  return __dmul_rn(p, scalbn(1.0, static_cast<int>(k)));
}

__device__ double next_float(uint32_t* s) {
  auto next = [s]() {
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
  };
  const double a = static_cast<double>(next() >> 5);
  const double b = static_cast<double>(next() >> 6);
  return __ddiv_rn(__dadd_rn(__dmul_rn(a, 67108864.0), b), 9007199254740992.0);
}

struct Part {
  double pivot;
  int lt, gt;
  double greater, equal;
};

__device__ Part partition_descending(double* a, int lo, int hi) {
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
      greater = __dadd_rn(greater, v);
    } else if (v < pivot) {
      a[i] = a[gt];
      a[gt] = v;
      --gt;
    } else {
      equal = __dadd_rn(equal, v);
      ++i;
    }
  }
  return {pivot, lt, gt, greater, equal};
}

__device__ double kth_largest(const float* values, int n_values, int k, double* s) {
  if (k <= kHeapSelectMaxK) {
    int size = 0;
    for (int i = 0; i < n_values; ++i) {
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
        int i2 = 0;
        for (;;) {
          int c = 2 * i2 + 1;
          if (c >= size) break;
          if (c + 1 < size && s[c + 1] < s[c]) ++c;
          if (s[c] >= x) break;
          s[i2] = s[c];
          i2 = c;
        }
        s[i2] = x;
      }
    }
    return size < k ? -INFINITY : s[0];
  }
  int n = 0;
  for (int i = 0; i < n_values; ++i)
    if (values[i] == values[i]) s[n++] = values[i];
  if (n < k) return -INFINITY;
  int lo = 0, hi = n - 1;
  const int target = k - 1;
  while (lo < hi) {
    const Part p = partition_descending(s, lo, hi);
    if (target < p.lt) hi = p.lt - 1;
    else if (target > p.gt) lo = p.gt + 1;
    else return p.pivot;
  }
  return s[lo];
}

__device__ double nucleus_cutoff(const double* weights, int n, double sum, double top_p, double* a) {
  const double target = __dmul_rn(__dmul_rn(top_p, sum), 1 - kTopPRelTolerance);
  const double threshold = __dmul_rn(sum, 1e-3);
  int m = 0;
  double mass = 0;
  for (int j = 0; j < n; ++j) {
    const double x = weights[j];
    if (x >= threshold) {
      a[m++] = x;
      mass = __dadd_rn(mass, x);
    }
  }
  if (mass < target) {
    m = n;
    for (int j = 0; j < n; ++j) a[j] = weights[j];
  }
  int lo = 0, hi = m - 1;
  double need = target;
  while (lo <= hi) {
    const Part p = partition_descending(a, lo, hi);
    if (p.greater >= need) {
      hi = p.lt - 1;
    } else if (__dadd_rn(p.greater, p.equal) >= need) {
      return p.pivot;
    } else {
      need = __dsub_rn(need, __dadd_rn(p.greater, p.equal));
      lo = p.gt + 1;
    }
  }
  return 0;
}

__device__ int compact(int32_t* ids, double* weights, int n, double cutoff, double* sum) {
  int m = 0;
  double s = 0;
  for (int j = 0; j < n; ++j) {
    const double x = weights[j];
    if (x >= cutoff) {
      ids[m] = ids[j];
      weights[m] = x;
      s = __dadd_rn(s, x);
      ++m;
    }
  }
  *sum = s;
  return m;
}

// (value, index) of the row's maximum, the lowest index among equals, NaNs never; index -1 when
// nothing beats -inf. Every thread gets the result.
__device__ void block_argmax(const float* w, int V, float* out_v, int* out_i) {
  __shared__ float sv[32];
  __shared__ int si[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  float bv = -INFINITY;
  int bi = -1;
  for (int i = threadIdx.x; i < V; i += blockDim.x)
    if (w[i] > bv) bv = w[i], bi = i;
  auto better = [](float v, int i, float bv2, int bi2) {
    return i >= 0 && (bi2 < 0 || v > bv2 || (v == bv2 && i < bi2));
  };
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (better(ov, oi, bv, bi)) bv = ov, bi = oi;
  }
  __syncthreads();
  if (lane == 0) sv[warp] = bv, si[warp] = bi;
  __syncthreads();
  bv = -INFINITY;
  bi = -1;
  for (int k = 0; k < warps; ++k)
    if (better(sv[k], si[k], bv, bi)) bv = sv[k], bi = si[k];
  *out_v = bv;
  *out_i = bi;
}

__device__ double block_sum(double v) {
  __shared__ double sh[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = __dadd_rn(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  double r = 0.0;
  for (int k = 0; k < warps; ++k) r = __dadd_rn(r, sh[k]);
  return r;
}

__global__ void __launch_bounds__(kThreads) sample_rows_kernel(const float* logits, int V, int words, Args a) {
  __shared__ double sh_kth;
  __shared__ int sh_token;
  const int r = blockIdx.x;
  const size_t base = static_cast<size_t>(r) * V;
  const float* row = logits + base;
  float* w = a.work + base;
  const double* pr = a.params + r * kSampleParamCols;
  const double temperature = pr[0], top_p = pr[1], min_p = pr[3], rp = pr[4], presence = pr[5],
               frequency = pr[6];
  const int top_k = static_cast<int>(pr[2]), n_top = static_cast<int>(pr[7]);
  const int mrow = a.mask_rows[r];
  const int32_t* mask = mrow >= 0 ? a.masks + static_cast<size_t>(mrow) * words : nullptr;

  // The row, masked; then bias, repetition and presence/frequency penalties in the CPU's order
  // (serial: an id may repeat in the bias list, and these lists are short).
  for (int i = threadIdx.x; i < V; i += blockDim.x) {
    float x = row[i];
    if (mask && !((static_cast<uint32_t>(mask[i >> 5]) >> (i & 31)) & 1u)) x = -INFINITY;
    w[i] = x;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int j = a.bias_off[r]; j < a.bias_off[r + 1]; ++j) {
      float& x = w[a.bias_ids[j]];
      x = __double2float_rn(__dadd_rn(static_cast<double>(x), static_cast<double>(a.bias_vals[j])));
    }
    if (rp != 1) {
      for (int j = a.seen_off[r]; j < a.seen_off[r + 1]; ++j) {
        float& x = w[a.seen_ids[j]];
        const double v = x;
        x = __double2float_rn(v > 0 ? __ddiv_rn(v, rp) : __dmul_rn(v, rp));
      }
    }
    if (presence != 0 || frequency != 0) {
      for (int j = a.count_off[r]; j < a.count_off[r + 1]; ++j) {
        float& x = w[a.count_ids[j]];
        x = __double2float_rn(__dsub_rn(static_cast<double>(x),
            __dadd_rn(presence, __dmul_rn(frequency, static_cast<double>(a.count_vals[j])))));
      }
    }
  }
  __syncthreads();

  float maxv;
  int arg;
  block_argmax(w, V, &maxv, &arg);
  if (arg < 0) arg = 0;  // every logit -inf or NaN: the JS argmax answers 0
  const double max = maxv;

  if (temperature < kSampleGreedyTemperature) {
    if (threadIdx.x == 0) sh_token = arg;
  } else {
    const double inv_t = __ddiv_rn(1.0, temperature);
    const int k = top_k > 0 && top_k < V ? top_k : 0;
    if (threadIdx.x == 0) sh_kth = k > 0 ? kth_largest(w, V, k, a.sel + base) : -INFINITY;
    __syncthreads();
    const double kth = sh_kth;
    double* cw = a.cand_w + base;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
      const double x = w[i];
      cw[i] = x >= kth ? fast_exp(__dmul_rn(__dsub_rn(x, max), inv_t)) : 0.0;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      // Compaction and the running sum in index order, in place (the write index trails i).
      int32_t* ids = a.cand_ids + base;
      int n = 0;
      double sum = 0;
      for (int i = 0; i < V; ++i) {
        const double e = cw[i];
        if (e > 0) {
          ids[n] = i;
          cw[n] = e;
          sum = __dadd_rn(sum, e);
          ++n;
        }
      }
      int token;
      if (n == 0) {
        token = arg;
      } else {
        if (top_p < 1 && n > 1) {
          const double cutoff = nucleus_cutoff(cw, n, sum, top_p, a.sel + base);
          n = compact(ids, cw, n, cutoff, &sum);
        }
        if (min_p > 0 && n > 1) n = compact(ids, cw, n, min_p, &sum);
        uint32_t st[4] = {a.rng[r * 4], a.rng[r * 4 + 1], a.rng[r * 4 + 2], a.rng[r * 4 + 3]};
        const double u = __dmul_rn(next_float(st), sum);
        for (int j = 0; j < 4; ++j) a.rng[r * 4 + j] = st[j];
        double acc = 0;
        token = ids[n - 1];
        for (int j = 0; j < n; ++j) {
          acc = __dadd_rn(acc, cw[j]);
          if (u < acc) {
            token = ids[j];
            break;
          }
        }
      }
      sh_token = token;
    }
  }
  __syncthreads();
  const int token = sh_token;
  if (threadIdx.x == 0) {
    a.token[r] = token;
    a.top_counts[r] = 0;
    a.logprob[r] = __longlong_as_double(0x7ff8000000000000LL);
  }
  if (n_top < 0) return;

  // Logprobs: log-sum-exp in any order (f32 rounding is the promise), top-n by insertion.
  double part = 0;
  if (max != -INFINITY)
    for (int i = threadIdx.x; i < V; i += blockDim.x) part = __dadd_rn(part, fast_exp(__dsub_rn(w[i], max)));
  const double total = block_sum(part);
  if (threadIdx.x != 0) return;
  const double lse = max == -INFINITY ? -INFINITY : max + log(total);
  a.logprob[r] = static_cast<double>(w[token]) - lse;
  const int n = min(n_top, V);
  double vals[kSampleMaxTopLogprobs];
  int32_t ids[kSampleMaxTopLogprobs];
  int size = 0;
  for (int i = 0; i < V && n > 0; ++i) {
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
    a.top_ids[r * kSampleMaxTopLogprobs + j] = ids[j];
    a.top_lp[r * kSampleMaxTopLogprobs + j] = vals[j] - lse;
  }
  a.top_counts[r] = size;
}

// Bump allocation of one call's sections, 16-byte aligned.
struct Layout {
  size_t bytes = 0;
  size_t take(size_t n) {
    const size_t at = (bytes + 15) & ~size_t{15};
    bytes = at + n;
    return at;
  }
};

}  // namespace

void sample_batch(const float* logits, const SampleBatchHost& h, Stream s) {
  const int R = h.rows, V = h.vocab;
  if (R == 0) return;
  ensure_alive();
  const int words = (V + 31) / 32;
  const size_t r = static_cast<size_t>(R), v = static_cast<size_t>(V), top = r * kSampleMaxTopLogprobs;
  // Outputs first (one copy back), then inputs (one copy up), then scratch.
  Layout L;
  const size_t o_rng = L.take(r * 4 * 4), o_token = L.take(r * 4), o_counts = L.take(r * 4),
               o_lp = L.take(r * 8), o_top_lp = L.take(top * 8), o_top_ids = L.take(top * 4);
  const size_t out_bytes = L.bytes;
  const size_t i_params = L.take(r * kSampleParamCols * 8), i_bias_off = L.take((r + 1) * 4),
               i_bias_ids = L.take(h.n_bias * 4), i_bias_vals = L.take(h.n_bias * 4),
               i_seen_off = L.take((r + 1) * 4), i_seen_ids = L.take(h.n_seen * 4),
               i_count_off = L.take((r + 1) * 4), i_count_ids = L.take(h.n_counts * 4),
               i_count_vals = L.take(h.n_counts * 4), i_mask_rows = L.take(r * 4),
               i_masks = L.take(h.n_masks * words * 4);
  const size_t in_bytes = L.bytes;
  const size_t s_work = L.take(r * v * 4), s_ids = L.take(r * v * 4), s_w = L.take(r * v * 8),
               s_sel = L.take(r * v * 8);

  std::vector<char> host(in_bytes, 0);
  auto put = [&](size_t at, const void* src, size_t n) {
    if (n) std::memcpy(host.data() + at, src, n);
  };
  put(o_rng, h.rng, r * 16);
  put(i_params, h.params, r * kSampleParamCols * 8);
  put(i_bias_off, h.bias_offsets, (r + 1) * 4);
  put(i_bias_ids, h.bias_ids, h.n_bias * 4);
  put(i_bias_vals, h.bias_values, h.n_bias * 4);
  put(i_seen_off, h.seen_offsets, (r + 1) * 4);
  put(i_seen_ids, h.seen_ids, h.n_seen * 4);
  put(i_count_off, h.count_offsets, (r + 1) * 4);
  put(i_count_ids, h.count_ids, h.n_counts * 4);
  put(i_count_vals, h.count_values, h.n_counts * 4);
  if (h.mask_rows) {
    put(i_mask_rows, h.mask_rows, r * 4);
    put(i_masks, h.masks, h.n_masks * words * 4);
  } else {
    std::memset(host.data() + i_mask_rows, 0xff, r * 4);  // -1: no mask
  }

  s = or_default(s);
  auto mem = device_alloc(L.bytes, s);
  char* d = static_cast<char*>(mem->ptr);
  memcpy_h2d(d, host.data(), in_bytes, s);
  Args a;
  a.params = reinterpret_cast<const double*>(d + i_params);
  a.rng = reinterpret_cast<uint32_t*>(d + o_rng);
  a.bias_off = reinterpret_cast<const int32_t*>(d + i_bias_off);
  a.bias_ids = reinterpret_cast<const int32_t*>(d + i_bias_ids);
  a.bias_vals = reinterpret_cast<const float*>(d + i_bias_vals);
  a.seen_off = reinterpret_cast<const int32_t*>(d + i_seen_off);
  a.seen_ids = reinterpret_cast<const int32_t*>(d + i_seen_ids);
  a.count_off = reinterpret_cast<const int32_t*>(d + i_count_off);
  a.count_ids = reinterpret_cast<const int32_t*>(d + i_count_ids);
  a.count_vals = reinterpret_cast<const int32_t*>(d + i_count_vals);
  a.mask_rows = reinterpret_cast<const int32_t*>(d + i_mask_rows);
  a.masks = reinterpret_cast<const int32_t*>(d + i_masks);
  a.token = reinterpret_cast<int32_t*>(d + o_token);
  a.top_counts = reinterpret_cast<int32_t*>(d + o_counts);
  a.logprob = reinterpret_cast<double*>(d + o_lp);
  a.top_lp = reinterpret_cast<double*>(d + o_top_lp);
  a.top_ids = reinterpret_cast<int32_t*>(d + o_top_ids);
  a.work = reinterpret_cast<float*>(d + s_work);
  a.cand_ids = reinterpret_cast<int32_t*>(d + s_ids);
  a.cand_w = reinterpret_cast<double*>(d + s_w);
  a.sel = reinterpret_cast<double*>(d + s_sel);
  sample_rows_kernel<<<R, kThreads, 0, s>>>(logits, V, words, a);
  EXPERTD_CUDA_LAUNCH_CHECK();
  // Pageable host memory: returns once the kernel and the copy are done.
  memcpy_d2h(host.data(), d, out_bytes, s);
  std::memcpy(h.rng, host.data() + o_rng, r * 16);
  std::memcpy(h.out.token_ids, host.data() + o_token, r * 4);
  std::memcpy(h.out.top_counts, host.data() + o_counts, r * 4);
  std::memcpy(h.out.logprobs, host.data() + o_lp, r * 8);
  std::memcpy(h.out.top_logprobs, host.data() + o_top_lp, top * 8);
  std::memcpy(h.out.top_ids, host.data() + o_top_ids, top * 4);
}

}  // namespace expertd::cuda
