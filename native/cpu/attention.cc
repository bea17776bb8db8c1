// Attention over the paged KV cache (prefill and decode, GQA, sliding window, MLA dims, sinks; an
// f32, bf16 or fp8 e4m3 cache), and the KV cache write. Flash-style online softmax in f32 on the thread pool, AVX-512 where present:
// each 16-key block is a small register-blocked GEMM (scores, then P.V) over the tile's rows.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "expertd/cpu_features.h"
#include "expertd/errors.h"
#include "expertd/ops.h"
#include "expertd/thread_pool.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace expertd {
namespace {

// NOTE: determinism. The engine relies on a query's output being bit-identical whether its
// sequence is computed alone or batched with others, and whether its prefill ran in one call or in
// chunks. So the arithmetic of one query row depends only on that row's position and its keys:
//   - keys are visited in order, in blocks of kKeyBlock aligned to absolute key positions;
//   - the blocks are grouped into segments of kSegment keys (absolute-aligned); each segment gives
//     a partial (max m, sum l, acc) computed from scratch, and the partials of the segments the
//     row sees are folded in segment order with one combine function.
// Work splitting (token tiles, split-K over segments for long decodes) only decides which thread
// computes which partial, never how a partial is computed or folded. The AVX-512 kernel shares
// K/V loads between the rows of a tile (decode and prefill run the same code), but every lane of
// its arithmetic belongs to one row, so a row's bits never depend on which rows share its tile.
constexpr int kKeyBlock = 16;
constexpr int kSegment = 512;
constexpr int kTileRows = 32;  // target (token, head) rows per work item
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// One work item: tokens [t0, t1) of a sequence and every query head of one kv head.
struct Tile {
  const int32_t* table;  // the sequence's block table row [max_blocks]
  int q_start, q_len, ctx_len;
  int kvh;
  int t0, t1;
  int seg_lo, seg_hi;   // segments [seg_lo, seg_hi] touched by some row of the tile
  int64_t split_off;    // float offset of its partials in the split scratch; -1: not split
};

struct Ctx {
  const float* q;
  const void* k_cache;  // p->kv_dtype elements
  const void* v_cache;
  const AttentionParams* p;
  float* out;
  int group;   // query heads per kv head
  int stride;  // floats per row state: [m, l, pad..16) then acc [dv rounded up to 16]
};

inline int row_pos(const Tile& t, int i) { return t.ctx_len - t.q_len + i; }
// First visible key of a query at position pos (HF masking_utils sliding_window_overlay keeps
// kv_idx > q_idx - sliding_window, i.e. the window counts the query itself).
inline int row_lo(int pos, int window) { return window > 0 ? std::max(0, pos - window + 1) : 0; }
inline bool row_visits(int pos, int lo, int seg) {
  return seg * kSegment <= pos && seg * kSegment + kSegment - 1 >= lo;
}

inline size_t cache_row(const Tile& t, const AttentionParams& p, int j) {
  size_t blk = static_cast<size_t>(t.table[j / p.block_size]);
  return (blk * p.block_size + static_cast<size_t>(j % p.block_size)) * p.kv_heads + t.kvh;
}

// cache_row of keys lo..hi (at most one key block) into rows[j - lo], walking the block table
// instead of dividing by the block size for every key.
inline void cache_rows(const Tile& t, const AttentionParams& p, int lo, int hi, size_t* rows) {
  const int bs = p.block_size;
  int b = lo / bs, o = lo - b * bs;
  size_t base = static_cast<size_t>(t.table[b]) * bs;
  for (int j = lo; j <= hi; ++j) {
    rows[j - lo] = (base + static_cast<size_t>(o)) * p.kv_heads + t.kvh;
    if (++o == bs && j < hi) {
      o = 0;
      base = static_cast<size_t>(t.table[++b]) * bs;
    }
  }
}

// Widens n cache elements of type `dt` to f32 (times `scale` for fp8): the dequantised values,
// the same bits as fp8_e4m3_to_f32(x) * scale / bf16_to_f32(x) (so an fp8 or bf16 cache gives the
// results of an f32 cache holding these values). NOTE: the fp8 NaN code 0x7f never occurs (writes
// saturate); the AVX-512 kernel's load_kv16 would read it as 480 * scale.
void dequant_row_portable(const void* src, KvDtype dt, float scale, int n, float* dst) {
  if (dt == KvDtype::BF16) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (int d = 0; d < n; ++d) dst[d] = bf16_to_f32(s[d]);
  } else {
    const uint8_t* s = static_cast<const uint8_t*>(src);
    for (int d = 0; d < n; ++d) dst[d] = fp8_e4m3_to_f32(s[d]) * scale;
  }
}

// K and V rows of keys [lo, hi] of the key block starting at kb0 for the portable kernel: kp[j - kb0],
// vp[j - kb0]. An f32 cache is read in place; a bf16 / fp8 one is widened into a per-thread buffer
// (the key block stays in L1), the K rows once per tile and block, shared by every query row of the
// tile. (The AVX-512 kernel widens in registers instead.)
using DequantRow = void (*)(const void*, KvDtype, float, int, float*);
inline void key_block_rows(const Ctx& c, const Tile& t, int kb0, int lo, int hi, const float** kp,
                           const float** vp, DequantRow dq = dequant_row_portable) {
  const AttentionParams& p = *c.p;
  if (p.kv_dtype == KvDtype::F32) {
    const float* kc = static_cast<const float*>(c.k_cache);
    const float* vc = static_cast<const float*>(c.v_cache);
    for (int j = lo; j <= hi; ++j) {
      const size_t row = cache_row(t, p, j);
      kp[j - kb0] = kc + row * p.dk;
      vp[j - kb0] = vc + row * p.v_stride + p.v_offset;
    }
    return;
  }
  // MLA: values are a slice of the key row (one array, one scale).
  const bool shared = c.k_cache == c.v_cache && p.v_stride == p.dk;
  const size_t es = kv_dtype_size(p.kv_dtype);
  const int kw = (p.dk + 15) / 16 * 16, vw = shared ? 0 : (p.dv + 15) / 16 * 16;
  thread_local std::vector<float> tl_rows;
  const size_t need = static_cast<size_t>(kKeyBlock) * (kw + vw);
  if (tl_rows.size() < need) tl_rows.resize(need);
  const float ks = p.kv_dtype == KvDtype::FP8 ? p.k_scales[t.kvh] : 1.0f;
  const float vs = p.kv_dtype == KvDtype::FP8 ? p.v_scales[t.kvh] : 1.0f;
  const uint8_t* kc = static_cast<const uint8_t*>(c.k_cache);
  const uint8_t* vc = static_cast<const uint8_t*>(c.v_cache);
  for (int j = lo; j <= hi; ++j) {
    const size_t row = cache_row(t, p, j);
    float* kr = tl_rows.data() + static_cast<size_t>(j - kb0) * kw;
    dq(kc + row * p.dk * es, p.kv_dtype, ks, p.dk, kr);
    kp[j - kb0] = kr;
    if (shared) {
      vp[j - kb0] = kr + p.v_offset;
    } else {
      float* vr = tl_rows.data() + static_cast<size_t>(kKeyBlock) * kw + static_cast<size_t>(j - kb0) * vw;
      dq(vc + (row * p.v_stride + p.v_offset) * es, p.kv_dtype, vs, p.dv, vr);
      vp[j - kb0] = vr;
    }
  }
}

// A row state's denominator gains the head's sink: l += e^(sink - m) (m is the row's running max
// over real keys; at least one key, the query's own, is always visible).
inline void add_sink(const AttentionParams& p, int head, float* st) {
  if (p.sinks) st[1] += std::exp(p.sinks[head] - st[0]);
}

// ------------------------------------------------------------------ portable kernels
// noinline: one compiled body per function, so no call site can contract or reorder differently.
__attribute__((noinline)) void segment_partial_portable(const Ctx& c, const Tile& t, int seg,
                                                        float* part) {
  const AttentionParams& p = *c.p;
  const int g = c.group, dk = p.dk, dv = p.dv, tokens = t.t1 - t.t0;
  const int seg_begin = seg * kSegment, seg_end = seg_begin + kSegment - 1;
  for (int r = 0; r < tokens * g; ++r) {
    float* st = part + static_cast<size_t>(r) * c.stride;
    st[0] = kNegInf;
    st[1] = 0.0f;
    std::fill(st + 16, st + 16 + dv, 0.0f);
  }
  const int kmin = std::max(seg_begin, row_lo(row_pos(t, t.t0), p.sliding_window));
  const int kmax = std::min(seg_end, row_pos(t, t.t1 - 1));
  const float* kp[kKeyBlock];
  const float* vp[kKeyBlock];
  float s[kKeyBlock];
  for (int kb0 = kmin / kKeyBlock * kKeyBlock; kb0 <= kmax; kb0 += kKeyBlock) {
    const int jb_lo = std::max(kb0, kmin), jb_hi = std::min(kb0 + kKeyBlock - 1, kmax);
    key_block_rows(c, t, kb0, jb_lo, jb_hi, kp, vp);
    for (int i = t.t0; i < t.t1; ++i) {
      const int pos = row_pos(t, i);
      const int lo = std::max({row_lo(pos, p.sliding_window), kb0, seg_begin});
      const int hi = std::min({pos, kb0 + kKeyBlock - 1, seg_end});
      if (lo > hi) continue;
      for (int hh = 0; hh < g; ++hh) {
        const float* qr = c.q + static_cast<size_t>(t.q_start + i) * p.q_row_stride +
                          static_cast<size_t>(t.kvh * g + hh) * dk;
        float* st = part + static_cast<size_t>((i - t.t0) * g + hh) * c.stride;
        float mb = kNegInf;
        for (int j = lo; j <= hi; ++j) {
          const float* kr = kp[j - kb0];
          float dot = 0.0f;
          for (int d = 0; d < dk; ++d) dot += qr[d] * kr[d];
          s[j - kb0] = dot * p.scale;
          mb = std::max(mb, s[j - kb0]);
        }
        const float m_old = st[0], m_new = std::max(m_old, mb);
        const float alpha = m_old == kNegInf ? 0.0f : std::exp(m_old - m_new);
        float sum = 0.0f;
        for (int j = lo; j <= hi; ++j) {
          s[j - kb0] = std::exp(s[j - kb0] - m_new);
          sum += s[j - kb0];
        }
        st[0] = m_new;
        st[1] = st[1] * alpha + sum;
        float* acc = st + 16;
        for (int d = 0; d < dv; ++d) acc[d] *= alpha;
        for (int j = lo; j <= hi; ++j) {
          const float pj = s[j - kb0];
          const float* vr = vp[j - kb0];
          for (int d = 0; d < dv; ++d) acc[d] += pj * vr[d];
        }
      }
    }
  }
}

// total = fold(total, part) for one row state.
__attribute__((noinline)) void combine_portable(float* total, const float* part, int dv) {
  const float m = std::max(total[0], part[0]);
  const float at = std::exp(total[0] - m), ap = std::exp(part[0] - m);
  total[0] = m;
  total[1] = total[1] * at + part[1] * ap;
  for (int d = 0; d < dv; ++d) total[16 + d] = total[16 + d] * at + part[16 + d] * ap;
}

__attribute__((noinline)) void finalize_portable(const float* st, int dv, float* out) {
  const float inv = 1.0f / st[1];
  for (int d = 0; d < dv; ++d) out[d] = st[16 + d] * inv;
}

// ------------------------------------------------------------------ AVX-512 kernels
#if defined(__x86_64__)
// GCC 12 warns about the deliberately undefined lanes inside its own AVX-512 intrinsics
// (_mm512_undefined_ps in roundscale/scalef/reduce): a false positive.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define EXPERTD_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

// exp(x) for x <= 0 (scores minus their running max): Cody-Waite reduction and a degree-6
// polynomial, ~1 ulp; inputs below -87 are flushed to (near) zero, far below f32 softmax noise.
EXPERTD_AVX512 inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.0f / 720.0f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f / 120.0f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f / 24.0f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f / 6.0f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(0.5f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, n);
}

EXPERTD_AVX512 inline __mmask16 tail_mask(int n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

// Asks for the cache lines of [ptr, ptr + bytes) into L2 (a hint: no fault, no effect on results).
// NOTE: measured on AMD Zen 4 (2 vCPUs): into L1 (prefetcht0), the 64 lines of a key block's K and V
// rows (bf16, 4 kv heads x 64 dims) asked at once stalled on the L1's miss buffers (perf: the
// prefetch loop held ~13% of the kernel's samples). Into L2: a decode call from DRAM at 1100 tokens
// of context 134-210 -> 89-140 us, at 512 93-106 -> 58-82 us, at 96 unchanged (14-15 us); the
// qwen3moe-like decode step at ~1100 tokens int4 8.6-10.0 -> 7.3-8.4 ms, bf16 17.8 -> 15.7-16.4 ms.
// Two blocks ahead measured no better.
EXPERTD_AVX512 inline void prefetch_bytes(const uint8_t* ptr, size_t bytes) {
  const uintptr_t first = reinterpret_cast<uintptr_t>(ptr) & ~uintptr_t{63};
  const uintptr_t last = reinterpret_cast<uintptr_t>(ptr + bytes - 1);
  for (uintptr_t a = first; a <= last; a += 64) _mm_prefetch(reinterpret_cast<const char*>(a), _MM_HINT_T1);
}

// 16x16 transpose in registers: r[i] lane j -> r[j] lane i.
EXPERTD_AVX512 inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  __m512 u[16];
  for (int k = 0; k < 4; ++k) {
    u[4 * k + 0] = _mm512_shuffle_ps(t[4 * k], t[4 * k + 2], 0x44);
    u[4 * k + 1] = _mm512_shuffle_ps(t[4 * k], t[4 * k + 2], 0xEE);
    u[4 * k + 2] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0x44);
    u[4 * k + 3] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88);
    const __m512 v1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);
    const __m512 w0 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
    const __m512 w1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
    r[c] = _mm512_shuffle_f32x4(v0, w0, 0x88);
    r[4 + c] = _mm512_shuffle_f32x4(v1, w1, 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(v0, w0, 0xDD);
    r[12 + c] = _mm512_shuffle_f32x4(v1, w1, 0xDD);
  }
}

// 16 cache elements row[d0, d0 + 16) (lanes outside m zero) as f32, widened in registers: the
// same bits as dequant_row_avx512 (bf16 << 16; fp8 e4m3 -> f16 bits -> f32, times mul = 256 x
// scale), so each dtype's arithmetic below is the f32 kernel's on the dequantised values, without
// the copy through a per-thread buffer.
template <KvDtype DT>
EXPERTD_AVX512 inline __m512 load_kv16(const uint8_t* row, int d0, __mmask16 m, __m512 mul) {
  if constexpr (DT == KvDtype::F32) {
    return _mm512_maskz_loadu_ps(m, reinterpret_cast<const float*>(row) + d0);
  } else if constexpr (DT == KvDtype::BF16) {
    const __m256i h = _mm256_maskz_loadu_epi16(m, reinterpret_cast<const uint16_t*>(row) + d0);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    const __m256i b = _mm256_cvtepu8_epi16(_mm_maskz_loadu_epi8(m, row + d0));
    const __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8),
                                      _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x7f)), 7));
    return _mm512_mul_ps(_mm512_cvtph_ps(h), mul);
  }
}

// kt [dk, 16]: kt[d * 16 + j] = kp[j][d], the key block laid out with one key per lane (kp: the
// cache rows, elements of DT).
template <KvDtype DT>
EXPERTD_AVX512 inline void transpose_keys(const uint8_t* const kp[kKeyBlock], int dk, __m512 kmul,
                                          float* kt) {
  __m512 r[16];
  for (int d0 = 0; d0 < dk; d0 += 16) {
    const __mmask16 m = tail_mask(dk - d0);
    for (int j = 0; j < 16; ++j) r[j] = load_kv16<DT>(kp[j], d0, m, kmul);
    transpose16(r);
    const int n = std::min(16, dk - d0);
    for (int i = 0; i < n; ++i) _mm512_store_ps(kt + static_cast<size_t>(d0 + i) * 16, r[i]);
  }
}

// Scores of R query rows against one transposed key block: s[r * 16 + j] = q_r . k_j * scale.
// NOTE: determinism. A row's dot product is four accumulators over d = 0,1,2,3 mod 4, each
// summed in d order, then (a0 + a1) + (a2 + a3): the same bits whichever rows share the call
// (decode, prefill, any R), because each lane's chain only ever sees its own row and key.
template <int R>
EXPERTD_AVX512 inline void block_scores(const float* const* qr, const float* kt, int dk,
                                        float scale, float* s) {
  __m512 a[R][4];
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < 4; ++k) a[r][k] = _mm512_setzero_ps();
  int d = 0;
  for (; d + 4 <= dk; d += 4) {
    const __m512 k0 = _mm512_load_ps(kt + static_cast<size_t>(d) * 16);
    const __m512 k1 = _mm512_load_ps(kt + static_cast<size_t>(d + 1) * 16);
    const __m512 k2 = _mm512_load_ps(kt + static_cast<size_t>(d + 2) * 16);
    const __m512 k3 = _mm512_load_ps(kt + static_cast<size_t>(d + 3) * 16);
    for (int r = 0; r < R; ++r) {
      a[r][0] = _mm512_fmadd_ps(_mm512_set1_ps(qr[r][d]), k0, a[r][0]);
      a[r][1] = _mm512_fmadd_ps(_mm512_set1_ps(qr[r][d + 1]), k1, a[r][1]);
      a[r][2] = _mm512_fmadd_ps(_mm512_set1_ps(qr[r][d + 2]), k2, a[r][2]);
      a[r][3] = _mm512_fmadd_ps(_mm512_set1_ps(qr[r][d + 3]), k3, a[r][3]);
    }
  }
  for (int k = 0; d < dk; ++d, ++k) {
    const __m512 kv = _mm512_load_ps(kt + static_cast<size_t>(d) * 16);
    for (int r = 0; r < R; ++r) a[r][k] = _mm512_fmadd_ps(_mm512_set1_ps(qr[r][d]), kv, a[r][k]);
  }
  const __m512 sc = _mm512_set1_ps(scale);
  for (int r = 0; r < R; ++r) {
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(a[r][0], a[r][1]), _mm512_add_ps(a[r][2], a[r][3]));
    _mm512_store_ps(s + r * 16, _mm512_mul_ps(sum, sc));
  }
}

// acc_r[d0, d0 + 16 NV) = acc_r * alpha_r + sum over keys j in [lo, hi] (in order) of p_r[j] v_j,
// (j relative to the block start) for NR rows that share the key range (the heads of one token), so each V load serves NR rows.
// Per row and lane this is the same sequence of f32 operations whatever NR and NV are.
template <KvDtype DT, int NR, int NV>
EXPERTD_AVX512 inline void block_pv(float* const* acc, const float* alpha, const float* pr,
                                    const uint8_t* const* vp, __m512 vmul, int lo, int hi, int d0,
                                    __mmask16 last) {
  __m512 a[NR][NV];
  for (int r = 0; r < NR; ++r) {
    const __m512 av = _mm512_set1_ps(alpha[r]);
    for (int v = 0; v < NV; ++v) a[r][v] = _mm512_mul_ps(_mm512_loadu_ps(acc[r] + d0 + 16 * v), av);
  }
  for (int j = lo; j <= hi; ++j) {
    __m512 vv[NV];
    for (int v = 0; v < NV; ++v)
      vv[v] = load_kv16<DT>(vp[j], d0 + 16 * v, v + 1 < NV ? static_cast<__mmask16>(0xFFFF) : last, vmul);
    for (int r = 0; r < NR; ++r) {
      const __m512 pj = _mm512_set1_ps(pr[r * kKeyBlock + j]);
      for (int v = 0; v < NV; ++v) a[r][v] = _mm512_fmadd_ps(pj, vv[v], a[r][v]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(acc[r] + d0 + 16 * v, a[r][v]);
}

template <KvDtype DT, int NR>
EXPERTD_AVX512 inline void block_pv_rows(float* const* acc, const float* alpha, const float* pr,
                                         const uint8_t* const* vp, __m512 vmul, int lo, int hi,
                                         int dv) {
  int d0 = 0;
  for (; d0 + 64 <= dv; d0 += 64)
    block_pv<DT, NR, 4>(acc, alpha, pr, vp, vmul, lo, hi, d0, static_cast<__mmask16>(0xFFFF));
  for (; d0 < dv; d0 += 16) block_pv<DT, NR, 1>(acc, alpha, pr, vp, vmul, lo, hi, d0, tail_mask(dv - d0));
}

template <KvDtype DT>
EXPERTD_AVX512 __attribute__((noinline)) void segment_partial_avx512(const Ctx& c, const Tile& t,
                                                                     int seg, float* part) {
  const AttentionParams& p = *c.p;
  const int g = c.group, dk = p.dk, dv = p.dv, tokens = t.t1 - t.t0;
  const int rows = tokens * g;
  const int seg_begin = seg * kSegment, seg_end = seg_begin + kSegment - 1;
  for (int r = 0; r < rows; ++r) {
    float* st = part + static_cast<size_t>(r) * c.stride;
    st[0] = kNegInf;
    st[1] = 0.0f;
    for (int d = 0; d < dv; d += 16) _mm512_storeu_ps(st + 16 + d, _mm512_setzero_ps());
  }
  // Grow-only per-thread scratch, 64-byte aligned (need has 16 floats of slack): the transposed
  // key block kt [dk, 16] and the block's scores [rows, 16].
  thread_local std::vector<float> tl_buf;
  const size_t kt_floats = static_cast<size_t>(dk) * 16, need = kt_floats + rows * 16 + 16;
  if (tl_buf.size() < need) tl_buf.resize(need);
  float* kt = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(tl_buf.data()) + 63) & ~uintptr_t{63});
  float* scores = kt + kt_floats;
  const float* qrow[4];
  const int kmin = std::max(seg_begin, row_lo(row_pos(t, t.t0), p.sliding_window));
  const int kmax = std::min(seg_end, row_pos(t, t.t1 - 1));
  // The key block's cache rows, read in place whatever the dtype (widened in registers).
  const uint8_t* kp[kKeyBlock];
  const uint8_t* vp[kKeyBlock];
  const size_t es = kv_dtype_size(DT);
  const uint8_t* kc = static_cast<const uint8_t*>(c.k_cache);
  const uint8_t* vc = static_cast<const uint8_t*>(c.v_cache);
  // MLA: values are a slice of the key row (one array, one scale).
  const bool shared = c.k_cache == c.v_cache && p.v_stride == p.dk;
  const float ks = DT == KvDtype::FP8 ? p.k_scales[t.kvh] : 1.0f;
  const float vs = DT == KvDtype::FP8 ? (shared ? ks : p.v_scales[t.kvh]) : 1.0f;
  const __m512 kmul = _mm512_set1_ps(256.0f * ks), vmul = _mm512_set1_ps(256.0f * vs);
  // Per head of one token: probabilities pr [g, 16], rescale factors and accumulators.
  thread_local std::vector<float> tl_pr;
  thread_local std::vector<float*> tl_accs;
  if (tl_pr.size() < static_cast<size_t>(g) * kKeyBlock * 2 + 16) {
    tl_pr.resize(static_cast<size_t>(g) * kKeyBlock * 2 + 16);
    tl_accs.resize(g);
  }
  float* pr = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(tl_pr.data()) + 63) & ~uintptr_t{63});
  float* alphas = pr + static_cast<size_t>(g) * kKeyBlock;
  float** accs = tl_accs.data();
  alignas(64) float m_olds[16];
  alignas(64) float m_news[16];
  for (int kb0 = kmin / kKeyBlock * kKeyBlock; kb0 <= kmax; kb0 += kKeyBlock) {
    const int jb_lo = std::max(kb0, kmin), jb_hi = std::min(kb0 + kKeyBlock - 1, kmax);
    size_t rows_at[kKeyBlock];
    cache_rows(t, p, jb_lo, jb_hi, rows_at);
    for (int j = jb_lo; j <= jb_hi; ++j) {
      const size_t row = rows_at[j - jb_lo];
      kp[j - kb0] = kc + row * p.dk * es;
      vp[j - kb0] = vc + (row * p.v_stride + p.v_offset) * es;
    }
    // The next key block's K and V rows are on their way while this one computes: a decode reads
    // its sequence's scattered cache blocks once, so without this every row load waits on memory.
    if (kb0 + kKeyBlock <= kmax) {
      const int n_lo = kb0 + kKeyBlock, n_hi = std::min(kb0 + 2 * kKeyBlock - 1, kmax);
      cache_rows(t, p, n_lo, n_hi, rows_at);
      for (int j = n_lo; j <= n_hi; ++j) {
        const size_t row = rows_at[j - n_lo];
        prefetch_bytes(kc + row * p.dk * es, static_cast<size_t>(dk) * es);
        prefetch_bytes(vc + (row * p.v_stride + p.v_offset) * es, static_cast<size_t>(dv) * es);
      }
    }
    // Lanes outside [jb_lo, jb_hi] read a valid key; their scores are masked below.
    for (int j = kb0; j < jb_lo; ++j) kp[j - kb0] = kp[jb_lo - kb0];
    for (int j = jb_hi + 1; j < kb0 + kKeyBlock; ++j) kp[j - kb0] = kp[jb_lo - kb0];
    transpose_keys<DT>(kp, dk, kmul, kt);
    // Rows that see some key of this block: tokens [i_lo, t1) (row_pos grows with i; rows past
    // their sliding window are skipped in the softmax loop below).
    int i_lo = t.t0;
    while (i_lo < t.t1 && row_pos(t, i_lo) < jb_lo) ++i_lo;
    int r = (i_lo - t.t0) * g;
    for (; r + 4 <= rows; r += 4) {
      for (int k = 0; k < 4; ++k) {
        const int rr = r + k, i = t.t0 + rr / g, hh = rr % g;
        qrow[k] = c.q + static_cast<size_t>(t.q_start + i) * p.q_row_stride +
                  static_cast<size_t>(t.kvh * g + hh) * dk;
      }
      block_scores<4>(qrow, kt, dk, p.scale, scores + static_cast<size_t>(r) * 16);
    }
    for (; r < rows; ++r) {
      const int i = t.t0 + r / g, hh = r % g;
      qrow[0] = c.q + static_cast<size_t>(t.q_start + i) * p.q_row_stride +
                static_cast<size_t>(t.kvh * g + hh) * dk;
      block_scores<1>(qrow, kt, dk, p.scale, scores + static_cast<size_t>(r) * 16);
    }
    for (int i = i_lo; i < t.t1; ++i) {
      const int pos = row_pos(t, i);
      const int lo = std::max({row_lo(pos, p.sliding_window), kb0, seg_begin});
      const int hi = std::min({pos, kb0 + kKeyBlock - 1, seg_end});
      if (lo > hi) continue;
      const __mmask16 vis = static_cast<__mmask16>(tail_mask(hi - kb0 + 1) & ~tail_mask(lo - kb0));
      // The heads' rescale factors alpha = exp(m_old - m_new) in one vector exp per 16 heads
      // (lane-wise, so a head's alpha does not depend on the others).
      for (int h0 = 0; h0 < g; h0 += 16) {
        const int nh = std::min(16, g - h0);
        for (int hh = h0; hh < h0 + nh; ++hh) {
          const int rr = (i - t.t0) * g + hh;
          const float* st = part + static_cast<size_t>(rr) * c.stride;
          const __m512 sv = _mm512_mask_loadu_ps(_mm512_set1_ps(kNegInf), vis, scores + rr * 16);
          m_olds[hh - h0] = st[0];
          m_news[hh - h0] = std::max(st[0], _mm512_reduce_max_ps(sv));
        }
        const __mmask16 hm = tail_mask(nh);
        const __m512 mo = _mm512_maskz_loadu_ps(hm, m_olds), mn = _mm512_maskz_loadu_ps(hm, m_news);
        const __mmask16 started = _mm512_cmp_ps_mask(mo, _mm512_set1_ps(kNegInf), _CMP_NEQ_OQ);
        _mm512_mask_storeu_ps(alphas + h0, hm,
                              _mm512_maskz_mov_ps(started, exp512(_mm512_sub_ps(mo, mn))));
        for (int hh = h0; hh < h0 + nh; ++hh) {
          const int rr = (i - t.t0) * g + hh;
          float* st = part + static_cast<size_t>(rr) * c.stride;
          const __m512 sv = _mm512_mask_loadu_ps(_mm512_set1_ps(kNegInf), vis, scores + rr * 16);
          const float m_new = m_news[hh - h0];
          const __m512 pv = _mm512_maskz_mov_ps(vis, exp512(_mm512_sub_ps(sv, _mm512_set1_ps(m_new))));
          _mm512_store_ps(pr + static_cast<size_t>(hh) * kKeyBlock, pv);
          st[0] = m_new;
          st[1] = st[1] * alphas[hh] + _mm512_reduce_add_ps(pv);
          accs[hh] = st + 16;
        }
      }
      int hh = 0;
      for (; hh + 4 <= g; hh += 4)
        block_pv_rows<DT, 4>(accs + hh, alphas + hh, pr + hh * kKeyBlock, vp, vmul, lo - kb0, hi - kb0, dv);
      for (; hh < g; ++hh)
        block_pv_rows<DT, 1>(accs + hh, alphas + hh, pr + hh * kKeyBlock, vp, vmul, lo - kb0, hi - kb0, dv);
    }
  }
}

EXPERTD_AVX512 __attribute__((noinline)) void combine_avx512(float* total, const float* part,
                                                             int dv) {
  const float m = std::max(total[0], part[0]);
  const float at = std::exp(total[0] - m), ap = std::exp(part[0] - m);
  total[0] = m;
  total[1] = total[1] * at + part[1] * ap;
  const __m512 atv = _mm512_set1_ps(at), apv = _mm512_set1_ps(ap);
  for (int d = 0; d < dv; d += 16) {
    __m512 a = _mm512_mul_ps(_mm512_loadu_ps(total + 16 + d), atv);
    a = _mm512_fmadd_ps(_mm512_loadu_ps(part + 16 + d), apv, a);
    _mm512_storeu_ps(total + 16 + d, a);
  }
}

EXPERTD_AVX512 __attribute__((noinline)) void finalize_avx512(const float* st, int dv, float* out) {
  const __m512 inv = _mm512_set1_ps(1.0f / st[1]);
  for (int d = 0; d < dv; d += 16) {
    const __mmask16 m = tail_mask(dv - d);
    _mm512_mask_storeu_ps(out + d, m, _mm512_mul_ps(_mm512_loadu_ps(st + 16 + d), inv));
  }
}
#undef EXPERTD_AVX512
#pragma GCC diagnostic pop
#endif

// ------------------------------------------------------------------ AVX2 kernel
// CPUs with AVX2 + FMA but no AVX-512: the portable kernel's structure (row by row, K and V rows
// widened by key_block_rows) with its scalar loops made vector: q.k over d in 8-lane chains (two
// per key, four keys at a time, summed in a fixed order), the block's exps in two vectors, and
// P.V as 8-lane FMAs over d. A row's arithmetic depends only on its own q and keys, so alone and
// batched, one call or chunked, it gives the same bits (the NOTE above).
#if defined(__x86_64__)
#define EXPERTD_AVX2 __attribute__((target("avx2,fma,f16c")))

// exp(x) for x <= 0: exp512's reduction and polynomial on 8 lanes (2^n built in the exponent
// field, exact for n >= -126, which x >= -87 keeps).
EXPERTD_AVX2 inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.0f / 720.0f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f / 120.0f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f / 24.0f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f / 6.0f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(0.5f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// dequant_row_portable's values, 8 at a time: bf16 << 16; fp8 e4m3 -> the f16 s 0 eeee mmm 0000000
// (the value times 2^-8, subnormals exact) -> f32, times 256 x scale (exact: the same bits).
EXPERTD_AVX2 void dequant_row_avx2(const void* src, KvDtype dt, float scale, int n, float* dst) {
  int d = 0;
  if (dt == KvDtype::BF16) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (; d + 8 <= n; d += 8)
      _mm256_storeu_ps(dst + d, _mm256_castsi256_ps(_mm256_slli_epi32(
                                    _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + d))), 16)));
  } else {
    const uint8_t* s = static_cast<const uint8_t*>(src);
    const __m256 mul = _mm256_set1_ps(256.0f * scale);
    for (; d + 8 <= n; d += 8) {
      const __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + d)));
      const __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8),
                                     _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x7f)), 7));
      _mm256_storeu_ps(dst + d, _mm256_mul_ps(_mm256_cvtph_ps(h), mul));
    }
  }
  if (d < n) dequant_row_portable(static_cast<const uint8_t*>(src) + d * kv_dtype_size(dt), dt, scale, n - d, dst + d);
}

EXPERTD_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// q . k_j for the keys of kr (N at a time), d in 8-lane chains (d mod 16 < 8 and >= 8), then the
// tail d one by one.
template <int N>
EXPERTD_AVX2 inline void dots_avx2(const float* q, const float* const* kr, int dk, float* out) {
  __m256 a[N][2];
  for (int n = 0; n < N; ++n) a[n][0] = a[n][1] = _mm256_setzero_ps();
  int d = 0;
  for (; d + 16 <= dk; d += 16) {
    const __m256 q0 = _mm256_loadu_ps(q + d), q1 = _mm256_loadu_ps(q + d + 8);
    for (int n = 0; n < N; ++n) {
      a[n][0] = _mm256_fmadd_ps(q0, _mm256_loadu_ps(kr[n] + d), a[n][0]);
      a[n][1] = _mm256_fmadd_ps(q1, _mm256_loadu_ps(kr[n] + d + 8), a[n][1]);
    }
  }
  if (d + 8 <= dk) {
    const __m256 q0 = _mm256_loadu_ps(q + d);
    for (int n = 0; n < N; ++n) a[n][0] = _mm256_fmadd_ps(q0, _mm256_loadu_ps(kr[n] + d), a[n][0]);
    d += 8;
  }
  for (int n = 0; n < N; ++n) {
    float s = hsum256(_mm256_add_ps(a[n][0], a[n][1]));
    for (int e = d; e < dk; ++e) s = std::fma(q[e], kr[n][e], s);
    out[n] = s;
  }
}

__attribute__((noinline)) EXPERTD_AVX2 void segment_partial_avx2(const Ctx& c, const Tile& t, int seg,
                                                                 float* part) {
  const AttentionParams& p = *c.p;
  const int g = c.group, dk = p.dk, dv = p.dv, tokens = t.t1 - t.t0;
  const int seg_begin = seg * kSegment, seg_end = seg_begin + kSegment - 1;
  for (int r = 0; r < tokens * g; ++r) {
    float* st = part + static_cast<size_t>(r) * c.stride;
    st[0] = kNegInf;
    st[1] = 0.0f;
    std::fill(st + 16, st + 16 + dv, 0.0f);
  }
  const int kmin = std::max(seg_begin, row_lo(row_pos(t, t.t0), p.sliding_window));
  const int kmax = std::min(seg_end, row_pos(t, t.t1 - 1));
  const float* kp[kKeyBlock];
  const float* vp[kKeyBlock];
  alignas(32) float s[kKeyBlock] = {};
  const int dv8 = dv / 8 * 8;
  for (int kb0 = kmin / kKeyBlock * kKeyBlock; kb0 <= kmax; kb0 += kKeyBlock) {
    const int jb_lo = std::max(kb0, kmin), jb_hi = std::min(kb0 + kKeyBlock - 1, kmax);
    key_block_rows(c, t, kb0, jb_lo, jb_hi, kp, vp, dequant_row_avx2);
    for (int i = t.t0; i < t.t1; ++i) {
      const int pos = row_pos(t, i);
      const int lo = std::max({row_lo(pos, p.sliding_window), kb0, seg_begin});
      const int hi = std::min({pos, kb0 + kKeyBlock - 1, seg_end});
      if (lo > hi) continue;
      for (int hh = 0; hh < g; ++hh) {
        const float* qr = c.q + static_cast<size_t>(t.q_start + i) * p.q_row_stride +
                          static_cast<size_t>(t.kvh * g + hh) * dk;
        float* st = part + static_cast<size_t>((i - t.t0) * g + hh) * c.stride;
        int j = lo;
        for (; j + 4 <= hi + 1; j += 4) dots_avx2<4>(qr, kp + (j - kb0), dk, s + (j - kb0));
        for (; j <= hi; ++j) dots_avx2<1>(qr, kp + (j - kb0), dk, s + (j - kb0));
        float mb = kNegInf;
        for (int jj = lo; jj <= hi; ++jj) {
          s[jj - kb0] *= p.scale;
          mb = std::max(mb, s[jj - kb0]);
        }
        const float m_old = st[0], m_new = std::max(m_old, mb);
        const float alpha = m_old == kNegInf ? 0.0f : std::exp(m_old - m_new);
        // The block's 16 exps as two vectors; lanes outside [lo, hi] are not used.
        const __m256 mn = _mm256_set1_ps(m_new);
        _mm256_store_ps(s, exp256(_mm256_min_ps(_mm256_sub_ps(_mm256_load_ps(s), mn), _mm256_setzero_ps())));
        _mm256_store_ps(s + 8, exp256(_mm256_min_ps(_mm256_sub_ps(_mm256_load_ps(s + 8), mn), _mm256_setzero_ps())));
        float sum = 0.0f;
        for (int jj = lo; jj <= hi; ++jj) sum += s[jj - kb0];
        st[0] = m_new;
        st[1] = st[1] * alpha + sum;
        float* acc = st + 16;
        const __m256 av = _mm256_set1_ps(alpha);
        for (int d = 0; d < dv8; d += 8) {
          __m256 a = _mm256_mul_ps(_mm256_loadu_ps(acc + d), av);
          for (int jj = lo; jj <= hi; ++jj)
            a = _mm256_fmadd_ps(_mm256_set1_ps(s[jj - kb0]), _mm256_loadu_ps(vp[jj - kb0] + d), a);
          _mm256_storeu_ps(acc + d, a);
        }
        for (int d = dv8; d < dv; ++d) {
          float a = acc[d] * alpha;
          for (int jj = lo; jj <= hi; ++jj) a = std::fma(s[jj - kb0], vp[jj - kb0][d], a);
          acc[d] = a;
        }
      }
    }
  }
}
#undef EXPERTD_AVX2
#endif

struct Kernels {
  void (*segment_partial)(const Ctx&, const Tile&, int, float*);
  void (*combine)(float*, const float*, int);
  void (*finalize)(const float*, int, float*);
};

Kernels pick_kernels(KvDtype dt) {
#if defined(__x86_64__)
  if (cpu_features().kernel_avx512) {
    auto seg = dt == KvDtype::BF16  ? segment_partial_avx512<KvDtype::BF16>
               : dt == KvDtype::FP8 ? segment_partial_avx512<KvDtype::FP8>
                                    : segment_partial_avx512<KvDtype::F32>;
    return {seg, combine_avx512, finalize_avx512};
  }
  if (cpu_features().kernel_avx2) return {segment_partial_avx2, combine_portable, finalize_portable};
#endif
  return {segment_partial_portable, combine_portable, finalize_portable};
}

// Segments a row at (pos, lo) sees: [lo / kSegment, pos / kSegment].
inline int first_seg(int lo) { return lo / kSegment; }

struct Task {
  int32_t tile;
  int32_t seg;  // -1: the whole tile on one thread
};

// Grow-only scratch owned by the calling thread (two engine workers may run attention at once).
struct CallScratch {
  std::vector<Tile> tiles;
  std::vector<Task> tasks;
  std::vector<float> split;
};

struct ThreadScratch {
  std::vector<float> part;
  std::vector<float> total;
};

}  // namespace

void paged_attention(const float* q, const void* k_cache, const void* v_cache,
                     const int32_t* seq_info, const int32_t* block_tables,
                     const AttentionParams& p, float* out) {
  // NOTE: the pool's tasks must reach the caller's scratch through this reference; naming a
  // thread_local inside a task would give the worker thread's own (empty) instance.
  thread_local CallScratch tls_scratch;
  CallScratch& cs = tls_scratch;
  const Kernels kern = pick_kernels(p.kv_dtype);
  const int g = p.heads / p.kv_heads;
  const int stride = 16 + (p.dv + 15) / 16 * 16;
  const int tile_tokens = std::max(1, kTileRows / g);
  const Ctx c{q, k_cache, v_cache, &p, out, g, stride};

  cs.tiles.clear();
  for (int s = 0; s < p.num_seqs; ++s) {
    const int q_start = seq_info[3 * s], q_len = seq_info[3 * s + 1], ctx = seq_info[3 * s + 2];
    if (q_len <= 0) continue;
    const int32_t* table = block_tables + static_cast<size_t>(s) * p.max_blocks;
    for (int t0 = 0; t0 < q_len; t0 += tile_tokens) {
      const int t1 = std::min(q_len, t0 + tile_tokens);
      const int lo = row_lo(ctx - q_len + t0, p.sliding_window), hi = ctx - q_len + t1 - 1;
      for (int kvh = 0; kvh < p.kv_heads; ++kvh)
        cs.tiles.push_back(Tile{table, q_start, q_len, ctx, kvh, t0, t1, first_seg(lo),
                                hi / kSegment, -1});
    }
  }
  if (cs.tiles.empty()) return;

  // Split-K (flash-decoding) for tiles that span several segments when there are too few tiles
  // to keep every thread busy. Results do not depend on this choice (see the NOTE above).
  const size_t threads = ThreadPool::instance().num_threads();
  const bool split_some = threads > 1 && cs.tiles.size() < 4 * threads;
  constexpr int64_t kMaxSplitFloats = int64_t{16} << 20;  // 64 MiB of partials at most
  int64_t split_floats = 0;
  cs.tasks.clear();
  for (size_t ti = 0; ti < cs.tiles.size(); ++ti) {
    Tile& t = cs.tiles[ti];
    const int nseg = t.seg_hi - t.seg_lo + 1;
    const int64_t need = int64_t{t.t1 - t.t0} * g * nseg * stride;
    if (split_some && nseg > 1 && split_floats + need <= kMaxSplitFloats) {
      t.split_off = split_floats;
      split_floats += need;
      for (int s = t.seg_lo; s <= t.seg_hi; ++s)
        cs.tasks.push_back(Task{static_cast<int32_t>(ti), s});
    } else {
      cs.tasks.push_back(Task{static_cast<int32_t>(ti), -1});
    }
  }
  if (static_cast<int64_t>(cs.split.size()) < split_floats) cs.split.resize(split_floats);
  float* split = cs.split.data();

  auto out_row = [&](const Tile& t, int i, int hh) {
    return out + (static_cast<size_t>(t.q_start + i) * p.heads + t.kvh * g + hh) * p.dv;
  };
  // Row state of row r of split tile t in segment s.
  auto split_row = [&](const Tile& t, int s, int64_t r) {
    const int64_t rows = int64_t{t.t1 - t.t0} * g;
    return split + t.split_off + ((s - t.seg_lo) * rows + r) * stride;
  };

  ThreadPool::instance().parallel_for(cs.tasks.size(), [&](size_t task, size_t) {
    const Task tk = cs.tasks[task];
    const Tile& t = cs.tiles[static_cast<size_t>(tk.tile)];
    if (tk.seg >= 0) {
      kern.segment_partial(c, t, tk.seg, split_row(t, tk.seg, 0));
      return;
    }
    // Whole tile: segment by segment, each row folds its partials in segment order, exactly as
    // the split path's second pass does.
    thread_local ThreadScratch ts;
    const size_t n = static_cast<size_t>(t.t1 - t.t0) * g * stride;
    if (ts.part.size() < n) ts.part.resize(n);
    if (ts.total.size() < n) ts.total.resize(n);
    for (int s = t.seg_lo; s <= t.seg_hi; ++s) {
      kern.segment_partial(c, t, s, ts.part.data());
      for (int i = t.t0; i < t.t1; ++i) {
        const int pos = row_pos(t, i), lo = row_lo(pos, p.sliding_window);
        if (!row_visits(pos, lo, s)) continue;
        for (int hh = 0; hh < g; ++hh) {
          const size_t off = static_cast<size_t>((i - t.t0) * g + hh) * stride;
          if (s == first_seg(lo))
            std::memcpy(ts.total.data() + off, ts.part.data() + off, sizeof(float) * stride);
          else
            kern.combine(ts.total.data() + off, ts.part.data() + off, p.dv);
        }
      }
    }
    for (int i = t.t0; i < t.t1; ++i)
      for (int hh = 0; hh < g; ++hh) {
        float* st = ts.total.data() + static_cast<size_t>((i - t.t0) * g + hh) * stride;
        add_sink(p, t.kvh * g + hh, st);
        kern.finalize(st, p.dv, out_row(t, i, hh));
      }
  });

  if (split_floats == 0) return;
  // Second pass: fold the split tiles' partials, one task per split tile.
  cs.tasks.clear();
  for (size_t ti = 0; ti < cs.tiles.size(); ++ti)
    if (cs.tiles[ti].split_off >= 0) cs.tasks.push_back(Task{static_cast<int32_t>(ti), -1});
  ThreadPool::instance().parallel_for(cs.tasks.size(), [&](size_t task, size_t) {
    thread_local ThreadScratch ts;
    const Tile& t = cs.tiles[static_cast<size_t>(cs.tasks[task].tile)];
    if (ts.total.size() < static_cast<size_t>(stride)) ts.total.resize(stride);
    float* total = ts.total.data();
    for (int i = t.t0; i < t.t1; ++i) {
      const int pos = row_pos(t, i), lo = row_lo(pos, p.sliding_window);
      for (int hh = 0; hh < g; ++hh) {
        const int64_t r = (i - t.t0) * g + hh;
        std::memcpy(total, split_row(t, first_seg(lo), r), sizeof(float) * stride);
        for (int s = first_seg(lo) + 1; s <= pos / kSegment; ++s)
          kern.combine(total, split_row(t, s, r), p.dv);
        add_sink(p, t.kvh * g + hh, total);
        kern.finalize(total, p.dv, out_row(t, i, hh));
      }
    }
  });
}

namespace {

// n f32 values -> cache elements of type dt (fp8: x / scale, saturated).
void store_row(const float* src, int n, KvDtype dt, float scale, void* dst) {
  if (dt == KvDtype::F32) {
    std::memcpy(dst, src, sizeof(float) * n);
  } else if (dt == KvDtype::BF16) {
    uint16_t* d = static_cast<uint16_t*>(dst);
    for (int i = 0; i < n; ++i) d[i] = f32_to_bf16(src[i]);
  } else {
    // NOTE: divide, not multiply by 1 / scale: the stored byte is e4m3(x / scale) exactly as the
    // references compute it.
    uint8_t* d = static_cast<uint8_t*>(dst);
    for (int i = 0; i < n; ++i) d[i] = f32_to_fp8_e4m3(src[i] / scale);
  }
}

}  // namespace

void kv_cache_write(const float* k, const float* v, int tokens, const int32_t* slots,
                    void* k_cache, void* v_cache, int kv_heads, int dk, int dv, int v_stride,
                    KvDtype dtype, const float* k_scales, const float* v_scales) {
  // NOTE: duplicate slots in one call are a caller bug (the chunks below run concurrently).
  constexpr int kChunk = 64;
  const size_t es = kv_dtype_size(dtype);
  uint8_t* kc = static_cast<uint8_t*>(k_cache);
  uint8_t* vc = static_cast<uint8_t*>(v_cache);
  const bool fp8 = dtype == KvDtype::FP8;
  const size_t n_chunks = static_cast<size_t>((tokens + kChunk - 1) / kChunk);
  ThreadPool::instance().parallel_for(n_chunks, [&](size_t chunk, size_t) {
    const int t_end = std::min(tokens, static_cast<int>(chunk + 1) * kChunk);
    for (int t = static_cast<int>(chunk) * kChunk; t < t_end; ++t) {
      const int32_t slot = slots[t];
      if (slot < 0) continue;
      const size_t row = static_cast<size_t>(slot) * kv_heads;
      for (int h = 0; h < kv_heads; ++h)
        store_row(k + (static_cast<size_t>(t) * kv_heads + h) * dk, dk, dtype,
                  fp8 ? k_scales[h] : 1.0f, kc + (row + h) * dk * es);
      if (v == nullptr) continue;
      for (int h = 0; h < kv_heads; ++h)
        store_row(v + (static_cast<size_t>(t) * kv_heads + h) * dv, dv, dtype,
                  fp8 ? v_scales[h] : 1.0f, vc + (row + h) * v_stride * es);
    }
  });
}

}  // namespace expertd
