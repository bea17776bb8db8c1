// Paged attention on the device (f32, bf16 or fp8 e4m3 cache with static per-kv-head scales; layouts
// and semantics of ops.h): causal, GQA, sliding window, sinks, MLA dims with V read from the K cache. Keys
// and values are widened to f32 as they are staged in shared memory. Flash-style online softmax over 32-key chunks
// staged in shared memory; split-K over absolute key ranges (flash-decoding) when the query
// tiles alone cannot fill the GPU, folded by a second kernel. Also the KV cache write.
#include <algorithm>
#include <mutex>
#include <vector>

#include "cuda_common.h"

namespace expertd::cuda {
namespace {

constexpr int kRows = 8;       // (token, head) rows per CTA: 4 warps x 2 rows
constexpr int kKeys = 32;      // keys per shared-memory chunk (one per lane)
constexpr int kThreads = 128;

// The stored element types: f32, bf16 bits, fp8 e4m3fn bits. A value reads as the CPU kernels'
// dequantisation (dtype.h): bf16 widened, e4m3 x scale rounded once to f32.
__device__ __forceinline__ float kv_load(const float* p, size_t i, float) { return p[i]; }
__device__ __forceinline__ float kv_load(const uint16_t* p, size_t i, float) {
  return __uint_as_float(static_cast<uint32_t>(p[i]) << 16);
}
__device__ __forceinline__ float kv_load(const uint8_t* p, size_t i, float scale) {
  const uint32_t b = p[i], e = (b >> 3) & 15u, m = b & 7u;
  const float mag = e == 0 ? static_cast<float>(m) * (1.0f / 512.0f) : __uint_as_float(((e + 120u) << 23) | (m << 20));
  return __fmul_rn((b & 0x80u) ? -mag : mag, scale);
}

// f32 -> stored element: the same rounding as dtype.h's f32_to_bf16 and f32_to_fp8_e4m3 (nearest
// even; e4m3 of x / scale, saturated to +-448).
__device__ __forceinline__ void kv_store(float* p, size_t i, float x, float) { p[i] = x; }
__device__ __forceinline__ void kv_store(uint16_t* p, size_t i, float x, float) {
  uint32_t u = __float_as_uint(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    p[i] = static_cast<uint16_t>((u >> 16) | 0x40);
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  p[i] = static_cast<uint16_t>(u >> 16);
}
__device__ __forceinline__ void kv_store(uint8_t* p, size_t i, float x, float scale) {
  const uint32_t u = __float_as_uint(__fdiv_rn(x, scale));
  const uint32_t sign = (u >> 24) & 0x80u, absu = u & 0x7fffffffu;
  uint32_t h;
  if (absu > 0x7f800000u) {
    h = 0x7fu;
  } else if (absu >= 0x43e00000u) {
    h = 0x7eu;
  } else if (absu < 0x3c800000u) {
    const float scaled = __uint_as_float(absu) * 512.0f;
    h = static_cast<uint32_t>(scaled);
    const float rem = scaled - static_cast<float>(h);
    if (rem > 0.5f || (rem == 0.5f && (h & 1u))) ++h;
  } else {
    h = ((((absu >> 23) - 127u + 7u) << 3)) | ((absu >> 20) & 7u);
    const uint32_t rest = absu & 0xfffffu;
    if (rest > 0x80000u || (rest == 0x80000u && (h & 1u))) ++h;
    if (h > 0x7eu) h = 0x7eu;
  }
  p[i] = static_cast<uint8_t>(sign | h);
}

struct AttnArgs {
  const float* q;
  const void* k_cache;  // CacheT elements
  const void* v_cache;
  const int32_t* seq_info;      // [num_seqs, 3] (q_start, q_len, ctx_len)
  const int32_t* block_tables;  // [num_seqs, max_blocks]
  float* out;                   // [T, heads, dv]
  float* part;                  // [T, heads, nsplit, dv + 2] (nsplit > 1)
  int num_seqs, heads, kv_heads, dk, dv, v_stride, v_offset, block_size, max_blocks;
  float scale;
  int window, q_row_stride;
  int group;    // query heads per kv head
  int hpc;      // heads per CTA (<= kRows)
  int bq;       // tokens per CTA (kRows / hpc)
  int nsplit;
  int seg;      // keys per split (multiple of kKeys)
  int share_kv; // V is read from the K chunk (MLA)
  int key_cap;  // keys at positions >= key_cap are never read: min(max_context, max_blocks * block_size)
  KvScales scales;  // fp8: per kv head (by value: no device buffer to keep alive)
  const float* sinks;  // [heads] device, or null (gpt-oss)
};

struct TileRows {
  int seq, q_start, q_len, ctx, t0;
};

// Maps blockIdx.x to (sequence, first token): tiles are numbered sequence by sequence.
__device__ bool find_tile(const AttnArgs& a, TileRows& out) {
  __shared__ int s_seq, s_t0;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int tile = blockIdx.x;
  if (warp == 0) {
    if (lane == 0) s_seq = -1;
    __syncwarp();
    int base = 0;
    for (int s0 = 0; s0 < a.num_seqs; s0 += 32) {
      const int s = s0 + lane;
      const int ql = s < a.num_seqs ? a.seq_info[3 * s + 1] : 0;
      const int t = ql > 0 ? (ql + a.bq - 1) / a.bq : 0;
      const int inc = warp_inclusive_scan(t, lane);
      const int excl = inc - t;
      if (t > 0 && tile >= base + excl && tile < base + inc) {
        s_seq = s;
        s_t0 = (tile - base - excl) * a.bq;
      }
      base += __shfl_sync(0xffffffffu, inc, 31);
      if (base > tile) break;
    }
  }
  __syncthreads();
  if (s_seq < 0) return false;
  out.seq = s_seq;
  out.q_start = a.seq_info[3 * s_seq];
  out.q_len = a.seq_info[3 * s_seq + 1];
  out.ctx = a.seq_info[3 * s_seq + 2];
  out.t0 = s_t0;
  return true;
}

// Row r of a CTA: token t0 + r / hpc, head chunk blockIdx.y % chunks.
struct RowInfo {
  bool valid;
  int token;  // index within the sequence
  int head;   // global query head
  int pos, lo;
};

__device__ RowInfo row_info(const AttnArgs& a, const TileRows& tr, int r) {
  RowInfo ri;
  const int chunks = (a.group + a.hpc - 1) / a.hpc;
  const int kvh = blockIdx.y / chunks, hc = blockIdx.y % chunks;
  const int hh = hc * a.hpc + r % a.hpc;
  ri.token = tr.t0 + r / a.hpc;
  ri.valid = r < a.bq * a.hpc && ri.token < tr.q_len && hh < a.group;
  ri.head = kvh * a.group + hh;
  ri.pos = tr.ctx - tr.q_len + ri.token;
  ri.lo = a.window > 0 ? max(0, ri.pos - a.window + 1) : 0;
  // NOTE: seq_info lives on the device, so nothing upstream can hold ctx_len to max_context (the
  // splits' key ranges) or to max_blocks * block_size (the block-table row). Past them the query
  // keeps its position but sees no key: the result is wrong, and nothing outside the buffers is
  // read. A row left with no visible key comes out NaN.
  ri.pos = min(ri.pos, a.key_cap - 1);
  return ri;
}

template <int NACC, typename CacheT>  // dv <= 32 * NACC
__global__ void __launch_bounds__(kThreads) paged_attention_kernel(const AttnArgs a) {
  extern __shared__ float sm[];
  const int dk = a.dk, dv = a.dv, ldk = dk + 1;  // +1: lane j reads row j conflict-free
  float* q_s = sm;                       // [kRows][dk]
  float* k_s = q_s + kRows * dk;         // [kKeys][dk + 1]
  float* v_s = k_s + kKeys * ldk;        // [kKeys][dv] unless share_kv
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  TileRows tr;
  if (!find_tile(a, tr)) return;
  const int chunks = (a.group + a.hpc - 1) / a.hpc;
  const int kvh = blockIdx.y / chunks;
  const int z = blockIdx.z;
  const int split_lo = z * a.seg, split_hi = split_lo + a.seg - 1;
  const int32_t* table = a.block_tables + static_cast<size_t>(tr.seq) * a.max_blocks;

  // Key range of the whole CTA within this split.
  int kmin = 0x7fffffff, kmax = -1;
  for (int r = 0; r < kRows; ++r) {
    const RowInfo ri = row_info(a, tr, r);
    if (!ri.valid) continue;
    kmin = min(kmin, max(ri.lo, split_lo));
    kmax = max(kmax, min(ri.pos, split_hi));
  }
  for (int u = threadIdx.x; u < kRows * dk; u += kThreads) {
    const int r = u / dk, d = u % dk;
    const RowInfo ri = row_info(a, tr, r);
    q_s[u] = ri.valid ? a.q[static_cast<size_t>(tr.q_start + ri.token) * a.q_row_stride +
                           static_cast<size_t>(ri.head) * dk + d]
                      : 0.0f;
  }

  const RowInfo my[2] = {row_info(a, tr, warp * 2), row_info(a, tr, warp * 2 + 1)};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  float acc[2][NACC];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr)
#pragma unroll
    for (int i = 0; i < NACC; ++i) acc[rr][i] = 0.0f;

  // NOTE: kmin/kmax are the same in every thread, so the barriers below are uniform.
  const int kb_first = kmax >= kmin ? kmin / kKeys * kKeys : 0;
  for (int kb = kb_first; kmax >= kmin && kb <= kmax; kb += kKeys) {
    __syncthreads();  // previous chunk consumed (and q_s written, first time)
    for (int j = warp; j < kKeys; j += kThreads / 32) {
      const int key = kb + j;
      if (key < kmin || key > kmax) continue;
      const size_t crow =
          (static_cast<size_t>(table[key / a.block_size]) * a.block_size + key % a.block_size) *
              a.kv_heads + kvh;
      const CacheT* kr = static_cast<const CacheT*>(a.k_cache) + crow * dk;
      const float ks = a.scales.k[kvh];
      for (int d = lane; d < dk; d += 32) k_s[j * ldk + d] = kv_load(kr, d, ks);
      if (!a.share_kv) {
        const CacheT* vr = static_cast<const CacheT*>(a.v_cache) + crow * a.v_stride + a.v_offset;
        const float vs = a.scales.v[kvh];
        for (int d = lane; d < dv; d += 32) v_s[j * dv + d] = kv_load(vr, d, vs);
      }
    }
    __syncthreads();
    const int key = kb + lane;
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const RowInfo& ri = my[rr];
      if (!ri.valid) continue;  // warp-uniform
      const bool vis = key >= max(ri.lo, split_lo) && key <= min(ri.pos, split_hi);
      float sc = -INFINITY;
      if (vis) {
        const float* qr = q_s + (warp * 2 + rr) * dk;
        const float* kr = k_s + lane * ldk;
        float d0 = 0.0f, d1 = 0.0f;
        int d = 0;
        for (; d + 1 < dk; d += 2) {
          d0 = fmaf(qr[d], kr[d], d0);
          d1 = fmaf(qr[d + 1], kr[d + 1], d1);
        }
        if (d < dk) d0 = fmaf(qr[d], kr[d], d0);
        sc = (d0 + d1) * a.scale;
      }
      const float mc = warp_max(sc);
      if (mc == -INFINITY) continue;  // no visible key in this chunk for this row
      const float m_new = fmaxf(m[rr], mc);
      const float alpha = m[rr] == -INFINITY ? 0.0f : expf(m[rr] - m_new);
      const float p = vis ? expf(sc - m_new) : 0.0f;
      l[rr] = l[rr] * alpha + warp_sum(p);
      m[rr] = m_new;
#pragma unroll
      for (int i = 0; i < NACC; ++i) acc[rr][i] *= alpha;
      for (int jj = 0; jj < kKeys; ++jj) {
        const float pj = __shfl_sync(0xffffffffu, p, jj);
        if (pj == 0.0f) continue;  // warp-uniform
        const float* vr = a.share_kv ? k_s + jj * ldk + a.v_offset : v_s + jj * dv;
#pragma unroll
        for (int i = 0; i < NACC; ++i) {
          const int d = lane + 32 * i;
          if (d < dv) acc[rr][i] = fmaf(pj, vr[d], acc[rr][i]);
        }
      }
    }
  }

#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const RowInfo& ri = my[rr];
    if (!ri.valid) continue;
    const size_t orow = static_cast<size_t>(tr.q_start + ri.token) * a.heads + ri.head;
    if (a.nsplit == 1) {
      // The sink enters the denominator only: l += e^(sink - m) (m the row's max over its keys).
      const float lt = a.sinks ? l[rr] + expf(a.sinks[ri.head] - m[rr]) : l[rr];
      const float inv = 1.0f / lt;
      float* o = a.out + orow * dv;
#pragma unroll
      for (int i = 0; i < NACC; ++i)
        if (lane + 32 * i < dv) o[lane + 32 * i] = acc[rr][i] * inv;
    } else {
      float* st = a.part + (orow * a.nsplit + z) * (dv + 2);
      if (lane == 0) {
        st[0] = m[rr];
        st[1] = l[rr];
      }
#pragma unroll
      for (int i = 0; i < NACC; ++i)
        if (lane + 32 * i < dv) st[2 + lane + 32 * i] = acc[rr][i];
    }
  }
}

// Folds the split partials of each row in split order (same tile mapping, grid.z = 1).
__global__ void __launch_bounds__(kThreads) attention_combine_kernel(const AttnArgs a) {
  TileRows tr;
  if (!find_tile(a, tr)) return;
  for (int r = 0; r < kRows; ++r) {
    const RowInfo ri = row_info(a, tr, r);
    if (!ri.valid) continue;
    const size_t orow = static_cast<size_t>(tr.q_start + ri.token) * a.heads + ri.head;
    const float* st = a.part + orow * a.nsplit * (a.dv + 2);
    float mx = -INFINITY;
    for (int z = 0; z < a.nsplit; ++z) mx = fmaxf(mx, st[z * (a.dv + 2)]);
    float lsum = 0.0f;
    for (int z = 0; z < a.nsplit; ++z) {
      const float mz = st[z * (a.dv + 2)];
      if (mz != -INFINITY) lsum += st[z * (a.dv + 2) + 1] * expf(mz - mx);
    }
    // NOTE: once per row, after the merge (a split must not add it: it would count nsplit times).
    if (a.sinks) lsum += expf(a.sinks[ri.head] - mx);
    const float inv = 1.0f / lsum;
    for (int d = threadIdx.x; d < a.dv; d += kThreads) {
      float v = 0.0f;
      for (int z = 0; z < a.nsplit; ++z) {
        const float mz = st[z * (a.dv + 2)];
        if (mz != -INFINITY) v += st[z * (a.dv + 2) + 2 + d] * expf(mz - mx);
      }
      a.out[orow * a.dv + d] = v * inv;
    }
  }
}

template <typename CacheT>
__global__ void kv_cache_write_kernel(const float* k, const float* v, const int32_t* slots,
                                      CacheT* k_cache, CacheT* v_cache, int kv_heads, int dk,
                                      int dv, int v_stride, const KvScales sc) {
  const int t = blockIdx.x;
  const int32_t slot = slots[t];
  if (slot < 0) return;
  const size_t row = static_cast<size_t>(slot) * kv_heads;
  for (int u = threadIdx.x; u < kv_heads * dk; u += blockDim.x)
    kv_store(k_cache, row * dk + u, k[static_cast<size_t>(t) * kv_heads * dk + u], sc.k[u / dk]);
  if (!v) return;
  for (int u = threadIdx.x; u < kv_heads * dv; u += blockDim.x) {
    const int h = u / dv, d = u % dv;
    kv_store(v_cache, (row + h) * v_stride + d, v[static_cast<size_t>(t) * kv_heads * dv + u], sc.v[h]);
  }
}

int sm_count_of_current_device() {
  static std::mutex mu;
  static std::vector<int> counts;
  const int dev = current_device();
  std::lock_guard<std::mutex> lock(mu);
  if (counts.size() <= static_cast<size_t>(dev)) counts.resize(dev + 1, 0);
  if (!counts[dev]) EXPERTD_CUDA_CHECK(cudaDeviceGetAttribute(&counts[dev], cudaDevAttrMultiProcessorCount, dev));
  return counts[dev];
}

}  // namespace

void paged_attention(const float* q, const void* k_cache, const void* v_cache,
                     const int32_t* seq_info, const int32_t* block_tables,
                     const AttentionParams& p, int total_tokens, int max_context, float* out,
                     Stream s) {
  ensure_alive();
  EXPERTD_CHECK(p.kv_dtype != KvDtype::FP8 || p.kv_heads <= kMaxScaleHeads, ErrorCode::InvalidArg,
                "paged_attention: an fp8 cache on CUDA takes at most 256 kv heads");
  s = or_default(s);
  if (total_tokens <= 0 || p.num_seqs <= 0) return;
  EXPERTD_CHECK(p.dv <= 512, ErrorCode::InvalidArg, "paged_attention: dv > 512 is not supported on CUDA");
  AttnArgs a{};
  a.q = q;
  a.k_cache = k_cache;
  a.v_cache = v_cache;
  a.seq_info = seq_info;
  a.block_tables = block_tables;
  a.out = out;
  a.num_seqs = p.num_seqs;
  a.heads = p.heads;
  a.kv_heads = p.kv_heads;
  a.dk = p.dk;
  a.dv = p.dv;
  a.v_stride = p.v_stride;
  a.v_offset = p.v_offset;
  a.block_size = p.block_size;
  a.max_blocks = p.max_blocks;
  a.scale = p.scale;
  a.window = p.sliding_window;
  a.q_row_stride = p.q_row_stride;
  a.group = p.heads / p.kv_heads;
  a.hpc = std::min(a.group, kRows);
  a.bq = kRows / a.hpc;
  a.sinks = p.sinks;
  a.share_kv = (v_cache == k_cache && p.v_stride == p.dk && p.v_offset + p.dv <= p.dk) ? 1 : 0;
  for (int h = 0; h < p.kv_heads && h < kMaxScaleHeads; ++h) {
    a.scales.k[h] = p.kv_dtype == KvDtype::FP8 ? p.k_scales[h] : 1.0f;
    a.scales.v[h] = p.kv_dtype == KvDtype::FP8 ? p.v_scales[h] : 1.0f;
  }
  a.key_cap = static_cast<int>(std::min<long long>(std::max(1, max_context),
                                                   static_cast<long long>(p.max_blocks) * p.block_size));
  const int chunks = (a.group + a.hpc - 1) / a.hpc;

  // Split-K only when the query tiles leave the GPU idle; each split keeps >= 256 keys.
  const long long base_ctas = static_cast<long long>((total_tokens + a.bq - 1) / a.bq) * p.kv_heads * chunks;
  const long long target = 2LL * sm_count_of_current_device();
  const int max_splits = std::max(1, (max_context + 255) / 256);
  a.nsplit = static_cast<int>(std::min<long long>(max_splits, std::max<long long>(1, (target + base_ctas - 1) / base_ctas)));
  a.seg = ((std::max(1, max_context) + a.nsplit - 1) / a.nsplit + kKeys - 1) / kKeys * kKeys;
  a.nsplit = std::max(1, (std::max(1, max_context) + a.seg - 1) / a.seg);
  std::shared_ptr<DeviceMem> part;
  if (a.nsplit > 1) {
    part = device_alloc(sizeof(float) * static_cast<size_t>(total_tokens) * p.heads * a.nsplit * (p.dv + 2), s);
    a.part = static_cast<float*>(part->ptr);
  }

  const long long tiles = (total_tokens + a.bq - 1) / a.bq + p.num_seqs;
  EXPERTD_CHECK(tiles <= 2147483647LL && static_cast<long long>(p.kv_heads) * chunks <= 65535 && a.nsplit <= 65535,
                ErrorCode::InvalidArg, "paged_attention: grid too large");
  const dim3 grid(static_cast<unsigned>(tiles), p.kv_heads * chunks, a.nsplit);
  const size_t smem = sizeof(float) * (static_cast<size_t>(kRows) * p.dk + kKeys * (p.dk + 1) +
                                       (a.share_kv ? 0 : static_cast<size_t>(kKeys) * p.dv));
  auto go = [&](auto kernel) {
    if (smem > 48 * 1024)
      EXPERTD_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(smem)));
    kernel<<<grid, kThreads, smem, s>>>(a);
    EXPERTD_CUDA_LAUNCH_CHECK();
  };
  auto by_dv = [&](auto tag) {
    using CacheT = decltype(tag);
    if (p.dv <= 128)
      go(paged_attention_kernel<4, CacheT>);
    else
      go(paged_attention_kernel<16, CacheT>);
  };
  if (p.kv_dtype == KvDtype::BF16)
    by_dv(uint16_t{});
  else if (p.kv_dtype == KvDtype::FP8)
    by_dv(uint8_t{});
  else
    by_dv(float{});
  if (a.nsplit > 1) {
    attention_combine_kernel<<<dim3(static_cast<unsigned>(tiles), p.kv_heads * chunks, 1), kThreads, 0, s>>>(a);
    EXPERTD_CUDA_LAUNCH_CHECK();
  }
  // `part` returns to the stream's cache here: stream order protects it from the next user.
}

void kv_cache_write(const float* k, const float* v, int tokens, const int32_t* slots,
                    void* k_cache, void* v_cache, int kv_heads, int dk, int dv, int v_stride,
                    KvDtype dtype, const float* k_scales, const float* v_scales, Stream s) {
  ensure_alive();
  EXPERTD_CHECK(dtype != KvDtype::FP8 || kv_heads <= kMaxScaleHeads, ErrorCode::InvalidArg,
                "kv_cache_write: an fp8 cache on CUDA takes at most 256 kv heads");
  if (tokens <= 0) return;
  KvScales sc;
  for (int h = 0; h < kMaxScaleHeads; ++h) sc.k[h] = sc.v[h] = 1.0f;
  if (dtype == KvDtype::FP8)
    for (int h = 0; h < kv_heads; ++h) {
      sc.k[h] = k_scales[h];
      if (v_scales) sc.v[h] = v_scales[h];
    }
  auto go = [&](auto* kc, auto* vc) {
    kv_cache_write_kernel<<<tokens, 128, 0, or_default(s)>>>(k, v, slots, kc, vc, kv_heads, dk, dv, v_stride, sc);
  };
  if (dtype == KvDtype::BF16)
    go(static_cast<uint16_t*>(k_cache), static_cast<uint16_t*>(v_cache));
  else if (dtype == KvDtype::FP8)
    go(static_cast<uint8_t*>(k_cache), static_cast<uint8_t*>(v_cache));
  else
    go(static_cast<float*>(k_cache), static_cast<float*>(v_cache));
  EXPERTD_CUDA_LAUNCH_CHECK();
}

}  // namespace expertd::cuda
