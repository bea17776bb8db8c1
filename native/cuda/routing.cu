// Routing on the device (softmax/sigmoid, correction bias, group-limited top-k, renormalise,
// scale; counts), the stable permutation to expert-contiguous rows with offsets computed on the
// device, and the weighted unpermute+combine. Semantics and roundings of native/cpu's versions.
#include <algorithm>
#include <climits>

#include "cuda_common.h"

namespace expertd::cuda {
namespace {

struct RouteArgs {
  const float* logits;  // [T, E]
  const float* bias;    // [E] or null
  int tokens, e, k;
  int scoring;  // 0 softmax, 1 sigmoid
  int n_group, topk_group, group_top2;
  int renormalize;
  float scale;
  int32_t* ids;      // [T, k]
  float* weights;    // [T, k]
  int32_t* counts;   // [E], zeroed before the launch
};

// One warp per token. Per-warp shared scratch: score [E], choice [E], group [n_group] f32, and
// excluded [E] bytes (expert in a dropped group, or already chosen).
__global__ void route_kernel(const RouteArgs a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int E = a.e;
  const size_t per_warp = static_cast<size_t>(E) * 8 + static_cast<size_t>(a.n_group) * 4 + E;
  const size_t per_warp_aligned = (per_warp + 15) / 16 * 16;
  unsigned char* base = smem_raw + warp * per_warp_aligned;
  float* score = reinterpret_cast<float*>(base);
  float* choice = score + E;
  float* group = choice + E;
  unsigned char* excluded = reinterpret_cast<unsigned char*>(group + a.n_group);
  const int t = blockIdx.x * warps + warp;
  if (t >= a.tokens) return;  // NOTE: warp-uniform; no block barrier follows
  const float* lg = a.logits + static_cast<size_t>(t) * E;

  if (a.scoring == 0) {
    float mx = -INFINITY;
    for (int i = lane; i < E; i += 32) mx = fmaxf(mx, lg[i]);
    mx = warp_max(mx);
    double sum = 0.0;
    for (int i = lane; i < E; i += 32) {
      const float v = expf(lg[i] - mx);
      score[i] = v;
      sum += v;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    const float inv = static_cast<float>(1.0 / sum);
    for (int i = lane; i < E; i += 32) score[i] *= inv;
  } else {
    for (int i = lane; i < E; i += 32) score[i] = 1.0f / (1.0f + expf(-lg[i]));
  }
  for (int i = lane; i < E; i += 32) {
    choice[i] = a.bias ? score[i] + a.bias[i] : score[i];
    excluded[i] = 0;
  }
  __syncwarp();

  if (a.n_group > 1 && a.topk_group < a.n_group) {
    const int gs = E / a.n_group;
    for (int g = lane; g < a.n_group; g += 32) {
      const float* c = choice + g * gs;
      float b0 = c[0], b1 = -INFINITY;
      int i0 = 0, i1 = -1;
      for (int i = 1; i < gs; ++i) {
        if (rank_before(c[i], i, b0, i0)) {
          b1 = b0, i1 = i0;
          b0 = c[i], i0 = i;
        } else if (i1 < 0 || rank_before(c[i], i, b1, i1)) {
          b1 = c[i], i1 = i;
        }
      }
      group[g] = a.group_top2 ? b0 + b1 : b0;
    }
    __syncwarp();
    // Keep the topk_group best groups: mark the others' experts excluded.
    for (int g = lane; g < a.n_group; g += 32) {
      int better = 0;  // groups ranked before g
      for (int h = 0; h < a.n_group; ++h) better += rank_before(group[h], h, group[g], g);
      if (better >= a.topk_group)
        for (int i = 0; i < gs; ++i) excluded[g * gs + i] = 1;
    }
    __syncwarp();
  }

  // Top-k by choice score, best first: k rounds of a warp argmax.
  double sum = 0.0;
  int32_t* ids = a.ids + static_cast<size_t>(t) * a.k;
  float* w = a.weights + static_cast<size_t>(t) * a.k;
  for (int j = 0; j < a.k; ++j) {
    float bv = 0.0f;
    int bi = -1;
    for (int i = lane; i < E; i += 32)
      if (!excluded[i] && (bi < 0 || rank_before(choice[i], i, bv, bi))) bv = choice[i], bi = i;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (oi >= 0 && (bi < 0 || rank_before(ov, oi, bv, bi))) bv = ov, bi = oi;
    }
    // NOTE: bi >= 0: the binding checks k <= topk_group * E / n_group.
    if (lane == 0) {
      excluded[bi] = 1;
      ids[j] = bi;
      w[j] = score[bi];
      sum += score[bi];
      atomicAdd(a.counts + bi, 1);
    }
    __syncwarp();
  }
  if (lane == 0) {
    if (a.renormalize) {
      const float denom = static_cast<float>(sum) + 1e-20f;
      for (int j = 0; j < a.k; ++j) w[j] /= denom;
    }
    if (a.scale != 1.0f)
      for (int j = 0; j < a.k; ++j) w[j] *= a.scale;
  }
}

// Stable permutation, one block: counts and offsets, then ranks chunk by chunk (warp peers by
// __match_any_sync, earlier warps by shared per-warp counts, earlier chunks by a cursor).
// NOTE: ids live on the device, so the binding cannot check them: an id outside 0..E-1 is
// skipped (counted nowhere, permIndex -1, no row of x_perm), never used as a shared-memory index.
constexpr int kPermThreads = 512;
constexpr int kPermWarps = kPermThreads / 32;

__global__ void __launch_bounds__(kPermThreads)
    permute_index_kernel(const int32_t* ids, int n, int num_experts, int32_t* perm_index,
                         int32_t* offsets) {
  extern __shared__ int32_t sh[];
  int32_t* cursor = sh;                      // [E]
  int32_t* wcount = sh + num_experts;        // [warps][E]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  for (int i = tid; i < num_experts * (kPermWarps + 1); i += kPermThreads) sh[i] = 0;
  __syncthreads();
  for (int p = tid; p < n; p += kPermThreads) {
    const int e = ids[p];
    if (static_cast<unsigned>(e) < static_cast<unsigned>(num_experts)) atomicAdd(cursor + e, 1);
  }
  __syncthreads();
  if (tid == 0) {
    int32_t run = 0;
    for (int e = 0; e < num_experts; ++e) {
      const int32_t c = cursor[e];
      offsets[e] = run;
      cursor[e] = run;
      run += c;
    }
    offsets[num_experts] = run;
  }
  __syncthreads();
  for (int base = 0; base < n; base += kPermThreads) {
    const int p = base + tid;
    int e = p < n ? ids[p] : -1;
    if (static_cast<unsigned>(e) >= static_cast<unsigned>(num_experts)) {
      if (p < n) perm_index[p] = -1;  // out of range: no row
      e = -1;
    }
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    const int leader = __ffs(peers) - 1;
    const int rank_w = __popc(peers & ((1u << lane) - 1u));
    if (e >= 0 && lane == leader) wcount[warp * num_experts + e] = __popc(peers);
    __syncthreads();
    if (e >= 0) {
      int r = cursor[e] + rank_w;
      for (int w = 0; w < warp; ++w) r += wcount[w * num_experts + e];
      perm_index[p] = r;
    }
    __syncthreads();
    if (e >= 0 && lane == leader) {
      atomicAdd(cursor + e, __popc(peers));
      wcount[warp * num_experts + e] = 0;
    }
    __syncthreads();
  }
}

template <typename OutT>
__device__ __forceinline__ OutT from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ uint16_t from_f32<uint16_t>(float v) { return f32_to_bf16_bits(v); }

// One block per (token, slot) pair: x_perm[perm_index[p]] = x[p / k] (nothing for a skipped id).
template <typename OutT>
__global__ void permute_copy_kernel(const float* x, int h, int top_k, const int32_t* perm_index,
                                    OutT* x_perm) {
  const int p = blockIdx.x;
  if (perm_index[p] < 0) return;
  const float* src = x + static_cast<size_t>(p / top_k) * h;
  OutT* dst = x_perm + static_cast<size_t>(perm_index[p]) * h;
  for (int c = threadIdx.x; c < h; c += blockDim.x) dst[c] = from_f32<OutT>(src[c]);
}

// Multiply then add (no FMA), slot order, then add to out: the CPU's roundings exactly. A slot
// whose perm_index is outside 0..rows-1 (permute's -1 for a skipped id) adds nothing; a token with
// no valid slot gets 0 (added to out when accumulating).
__global__ void unpermute_combine_kernel(const float* y_perm, const int32_t* perm_index,
                                         const float* weights, int top_k, int h, int rows,
                                         float* out, int accumulate) {
  const int t = blockIdx.x;
  const int c = blockIdx.y * blockDim.x + threadIdx.x;
  if (c >= h) return;
  const int32_t* pidx = perm_index + static_cast<size_t>(t) * top_k;
  const float* w = weights + static_cast<size_t>(t) * top_k;
  float s = 0.0f;
  bool any = false;
  for (int j = 0; j < top_k; ++j) {
    if (static_cast<unsigned>(pidx[j]) >= static_cast<unsigned>(rows)) continue;
    const float v = __fmul_rn(w[j], y_perm[static_cast<size_t>(pidx[j]) * h + c]);
    s = any ? __fadd_rn(s, v) : v;  // the first product as is: no 0 + v (-0 stays -0)
    any = true;
  }
  float* o = out + static_cast<size_t>(t) * h + c;
  *o = accumulate ? __fadd_rn(*o, s) : s;
}

// One block per row r < rows: out[r] = x[r] with its columns in the input order of the row's expert,
// out[r, j] = x[r, perm[e * h + j]] for offsets[e] <= r < offsets[e + 1] (the last such e, so that
// empty experts before a row's own are passed over); rows from offsets[num_experts] on (identity
// experts) are copied as they are. Without offsets (a dense Linear) every row takes perm's first row.
__global__ void gather_expert_columns_kernel(const uint16_t* x, const int32_t* offsets, int num_experts,
                                             int h, const int32_t* perm, uint16_t* out) {
  const int r = blockIdx.x;
  const uint16_t* src = x + static_cast<size_t>(r) * h;
  uint16_t* dst = out + static_cast<size_t>(r) * h;
  const int32_t* order = perm;  // no offsets: the one order; null: the row as it is
  if (offsets) {
    order = nullptr;
    if (r < offsets[num_experts]) {
      int lo = 0, hi = num_experts;  // offsets[lo] <= r < offsets[hi]
      while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (offsets[mid] <= r) lo = mid;
        else hi = mid;
      }
      order = perm + static_cast<size_t>(lo) * h;
    }
  }
  for (int c = threadIdx.x; c < h; c += blockDim.x) dst[c] = src[order ? order[c] : c];
}

}  // namespace

void gather_expert_columns(const uint16_t* x, const int32_t* offsets, int num_experts, int rows, int h,
                           const int32_t* perm, uint16_t* out, Stream s) {
  ensure_alive();
  if (rows <= 0 || h <= 0) return;
  s = or_default(s);
  EXPERTD_CHECK(x != out, ErrorCode::InvalidArg, "gatherExpertColumns: out must not be x");
  EXPERTD_CHECK(offsets || num_experts == 1, ErrorCode::InvalidArg, "gatherExpertColumns: without offsets e must be 1");
  const int threads = std::min(256, (h + 31) / 32 * 32);
  gather_expert_columns_kernel<<<rows, threads, 0, s>>>(x, offsets, num_experts, h, perm, out);
  EXPERTD_CUDA_LAUNCH_CHECK();
}

void route(const float* logits, const RoutingParams& p, int32_t* ids, float* weights,
           int32_t* counts, Stream s) {
  ensure_alive();
  s = or_default(s);
  EXPERTD_CUDA_CHECK(cudaMemsetAsync(counts, 0, sizeof(int32_t) * p.num_experts, s));
  if (p.tokens <= 0) return;
  const int n_group = std::max(1, p.n_group);
  RouteArgs a{logits, p.bias, p.tokens, p.num_experts, p.top_k,
              p.scoring == Scoring::Sigmoid ? 1 : 0, n_group, p.topk_group,
              p.group_score == GroupScore::Top2Sum ? 1 : 0, p.renormalize ? 1 : 0, p.scale,
              ids, weights, counts};
  const size_t per_warp = (static_cast<size_t>(p.num_experts) * 9 + n_group * 4 + 15) / 16 * 16;
  EXPERTD_CHECK(per_warp <= 48 * 1024, ErrorCode::InvalidArg, "route: too many experts");
  const int warps = static_cast<int>(std::max<size_t>(1, std::min<size_t>(4, 48 * 1024 / per_warp)));
  const unsigned blocks = blocks_for(static_cast<size_t>(p.tokens), warps);
  route_kernel<<<blocks, warps * 32, per_warp * warps, s>>>(a);
  EXPERTD_CUDA_LAUNCH_CHECK();
}

void permute_rows(const float* x, int tokens, int h, const int32_t* ids, int top_k,
                  int num_experts, void* x_perm, DType perm_dtype, int32_t* perm_index,
                  int32_t* offsets, Stream s) {
  ensure_alive();
  s = or_default(s);
  EXPERTD_CHECK(perm_dtype == DType::F32 || perm_dtype == DType::BF16, ErrorCode::InvalidArg,
                "permute: x_perm must be f32 or bf16");
  const int n = tokens * top_k;
  const size_t smem = sizeof(int32_t) * static_cast<size_t>(num_experts) * (kPermWarps + 1);
  EXPERTD_CHECK(num_experts <= 1024, ErrorCode::InvalidArg, "permute: at most 1024 experts");
  if (smem > 48 * 1024)  // per device, cheap: set whenever needed
    EXPERTD_CUDA_CHECK(cudaFuncSetAttribute(permute_index_kernel,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(smem)));
  permute_index_kernel<<<1, kPermThreads, smem, s>>>(ids, n, num_experts, perm_index, offsets);
  EXPERTD_CUDA_LAUNCH_CHECK();
  if (n == 0 || h == 0) return;
  const int threads = std::min(256, (h + 31) / 32 * 32);
  if (perm_dtype == DType::F32)
    permute_copy_kernel<float><<<n, threads, 0, s>>>(x, h, top_k, perm_index, static_cast<float*>(x_perm));
  else
    permute_copy_kernel<uint16_t><<<n, threads, 0, s>>>(x, h, top_k, perm_index, static_cast<uint16_t*>(x_perm));
  EXPERTD_CUDA_LAUNCH_CHECK();
}

void unpermute_combine(const float* y_perm, const int32_t* perm_index, const float* weights,
                       int tokens, int top_k, int h, float* out, bool accumulate, Stream s) {
  ensure_alive();
  if (tokens <= 0 || h <= 0) return;
  s = or_default(s);
  const dim3 grid(tokens, blocks_for(static_cast<size_t>(h), 256));
  // perm_index is int32: rows beyond INT_MAX cannot be named anyway.
  const int rows = static_cast<int>(std::min<long long>(static_cast<long long>(tokens) * top_k, INT_MAX));
  unpermute_combine_kernel<<<grid, 256, 0, s>>>(y_perm, perm_index, weights, top_k, h, rows, out,
                                                accumulate ? 1 : 0);
  EXPERTD_CUDA_LAUNCH_CHECK();
}

}  // namespace expertd::cuda
