// Internal to DenseGemm and GroupGemm: register-tile kernels over the packed weight layout
// (portable C++, AVX-512 FMA on widened weights, AVX512-BF16 dot products, AVX512-VNNI int8 dot
// products on quantized weights; AVX2 + FMA ones in avx2_kernels.h; AMX bf16 tiles in
// amx_kernels.h), activation preparation (bf16
// rounding, int8 per-token quantization), epilogues (bias/accumulate store, fused SiLU(gate)*up)
// and grow-only scratch.
//
// NOTE (determinism): every output element is one accumulator that runs over k = 0..Kp-1 in
// order, whatever the tile shape (MR x NR), the task split or the thread count. Tile shapes only
// choose how many such accumulators run side by side, so a row gives bit-identical results alone
// or inside any batch. Do not split K across tasks or accumulators without keeping that promise.
// The instructions differ in their low bits (vdpbf16ps rounds twice per k pair, odd k first;
// AMX's tdpbf16ps sums a 32-k step its own way), so the path of a weight must never depend on
// the number of rows: choose_path looks at the weight, the mode and the CPU only, and on an AMX
// machine every fast-mode bf16 call runs Path::Amx, one row included. Within AMX each element
// runs its 32-k steps in order, and rows of a tile never interact.
#pragma once
#include <atomic>
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#include "expertd/cpu_features.h"
#include "expertd/dtype.h"
#include "expertd/errors.h"
#include "expertd/ops.h"
#include "parallel_rows.h"
#include "quant_layout.h"
#include "simd_exp.h"

// x86 kernels are compiled in unless EXPERTD_PORTABLE_ONLY asks for the portable build alone
// (used to check that build on x86 hosts).
#if defined(__x86_64__) && !defined(EXPERTD_PORTABLE_ONLY)
#define EXPERTD_GEMM_X86 1
#else
#define EXPERTD_GEMM_X86 0
#endif

#if EXPERTD_GEMM_X86
#include <immintrin.h>
// GCC 12 reports _mm512_undefined_epi32() inside _mm512_slli_epi32 as maybe-uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define EXPERTD_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define EXPERTD_AVX512BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
#define EXPERTD_AVX512VNNI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")))
#endif

namespace expertd::gemm {

constexpr int kMr = 6;             // rows of x per register tile
constexpr int kNr = 4;             // 16-row weight blocks per register tile (even: gate/up pairs)
constexpr int kTileLd = kNr * 16;  // floats between rows of a tile buffer
// A task is a chunk of ~kChunkBytes of weight blocks times a row tile of up to ~kRowTileBytes of
// activations (and at most kMaxRowTile rows): both stay in L2 (1-2 MB per core) while every
// register tile of the row tile passes over the chunk, so each weight byte comes from DRAM once
// per row tile, and a row tile is as tall as L2 allows (prefill reuses each chunk ~100x).
constexpr size_t kChunkBytes = 256 << 10;
constexpr size_t kRowTileBytes = 320 << 10;
constexpr int kMaxRowTile = 240;
// Tasks per thread a call plans at least (plan_tasks' min_chunks), enough for dynamic claiming to
// even out the threads. A decode-sized call (a DenseGemm of one register tile of rows, a GroupGemm
// small enough for one job) asks for fewer: each of its tasks is a weight stream the hardware
// prefetcher starts anew. NOTE: measured on AMD Zen 4, 2 threads,
// weights from DRAM, in one process against 4: a 1536 x 1024 DenseGemm int4 g128 25.6 -> 22.4 us,
// int8 38.2 -> 35.4 (bf16 and fp8 within +-4%), mixtral-like's decode GroupGemm at batch 1 (2 experts)
// int4 g128 0.180 -> 0.172 ms, bf16 and int8 1-2% (bench/RESULTS.md, session 25).
constexpr int kTasksPerThread = 4;
constexpr int kDecodeTasksPerThread = 2;

// Which kernel family runs a weight. Activations are bf16 (uint16) rows for Bf16Dot, int8 rows
// (codes, a scale per row, code sums per group) for Vnni and ScalarI8, f32 rows for the others.
// Bf16Dot runs bf16 weights, and fp8 weights decoded to bf16 in registers; Amx (bf16 rows too)
// runs bf16 weights on AMX tiles (amx_kernels.h).
// Avx2 and Avx2I8 (avx2_kernels.h) are Avx512 and Vnni for CPUs without AVX-512; Avx2F8 is
// Bf16Dot's fp8 arithmetic there (f32 activations, rounded to bf16 as fast mode does).
enum class Path : int { Scalar = 0, Avx512 = 1, Bf16Dot = 2, Vnni = 3, ScalarI8 = 4, Amx = 5, Avx2 = 6, Avx2I8 = 7, Avx2F8 = 8 };

// Activations are bf16 rows.
inline bool bf16_act_path(Path p) { return p == Path::Bf16Dot || p == Path::Amx; }
inline size_t act_size(Path p) {
  return bf16_act_path(p) ? 2 : (p == Path::Vnni || p == Path::ScalarI8 || p == Path::Avx2I8) ? 1 : 4;
}
inline bool int8_path(Path p) { return p == Path::Vnni || p == Path::ScalarI8 || p == Path::Avx2I8; }

// Fast mode on int8, int4 and MXFP4 weights quantizes activations to int8 (symmetric, an f32
// scale per block of gcd(kActBlock, group) columns of a row) and multiplies codes by codes (MXFP4:
// the doubled e2m1 values, -12..12): int8 k steps of 4 and 4-bit steps of 8 need the groups (and
// so kp) to be multiples of them; other shapes keep f32 activations.
// NOTE (block of 128): each block ends in one int32 -> f32 conversion and one FMA per accumulator,
// which at 32 columns (llama.cpp's Q8_0) cost the int8 kernel ~40% of its dot products: a 512-row
// GEMM ran at 0.85x bf16 on AMD Zen 4, 1.29x at 128 (bench quant-kernels). 128 is DeepSeek-V3's
// 1 x 128 activation tile, finer than vLLM's per-token W8A8 scale; int4 in groups of 32 keeps
// blocks of 32 (its weight scale changes there anyway). Fidelity on the trained fixtures (hidden
// 64: one block per row) did not drop: int8 fast mode 1909/1920 top-1 at 128 vs 1906 at 32.
constexpr int kActBlock = 128;
inline bool int8_activations(const PackedWeight& w, bool fast) {
  if (!fast) return false;
  if (w.q == QFormat::I8) return w.group % 4 == 0 && w.kp % 4 == 0;
  if (w.q == QFormat::I4 || w.q == QFormat::FP4) return w.group % 8 == 0 && w.kp % 8 == 0;
  return false;
}

// Fast mode on bf16 and fp8 weights rounds activations (x, and h between the expert projections)
// to bf16 whichever path runs it, so fast-mode numbers mean the same thing on every machine (the
// int8 activations of int8_activations likewise: the portable ScalarI8 computes them too).
inline bool rounds_activations(const PackedWeight& w, bool fast) {
  return fast && ((!w.quantized() && w.dtype == DType::BF16) || w.q == QFormat::F8);
}

inline Path choose_path(const CpuFeatures& f, const PackedWeight& w, bool fast) {
  if (int8_activations(w, fast)) {
#if EXPERTD_GEMM_X86
    if (f.kernel_vnni) return Path::Vnni;
    if (f.kernel_avx2) return Path::Avx2I8;
#endif
    return Path::ScalarI8;
  }
#if EXPERTD_GEMM_X86
  // NOTE: not a function of M (see the determinism NOTE above).
  if (fast && !w.quantized() && w.dtype == DType::BF16 && f.kernel_bf16dot)
    return f.amx_bf16 ? Path::Amx : Path::Bf16Dot;
  // fp8 -> bf16 in registers: whole 4-k chunks inside a scale group.
  if (fast && w.q == QFormat::F8 && f.kernel_bf16dot && w.group % 4 == 0)
    return Path::Bf16Dot;
  if (f.kernel_avx512) return Path::Avx512;
  if (fast && w.q == QFormat::F8 && f.kernel_avx2 && w.group % 4 == 0) return Path::Avx2F8;
  // AVX2 decodes k pairs: quantized weights need even scale groups (every format's are).
  if (f.kernel_avx2 && (!w.quantized() || w.group % 2 == 0)) return Path::Avx2;
#endif
  (void)f;
  return Path::Scalar;
}

// Activation rows as a kernel reads them: element type per Path, ld in elements. Int8 rows also
// carry, per block of `block` columns (blocks_ld per row), the dequantisation scale and the sum
// of the codes, from which the VNNI kernels undo the +128 / +8 shift of the weight codes.
struct Act {
  const void* data = nullptr;
  size_t ld = 0;
  const float* scales = nullptr;
  const int32_t* sums = nullptr;
  size_t blocks_ld = 0;
  int block = 0;
};

// a advanced by rows.
inline Act act_rows(Act a, Path p, int rows) {
  a.data = static_cast<const uint8_t*>(a.data) + static_cast<size_t>(rows) * a.ld * act_size(p);
  if (a.scales) a.scales += static_cast<size_t>(rows) * a.blocks_ld;
  if (a.sums) a.sums += static_cast<size_t>(rows) * a.blocks_ld;
  return a;
}

// Grow-only, 64-byte aligned buffer (no allocation once warm).
class Buffer {
 public:
  Buffer() = default;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { std::free(p_); }
  void* get(size_t bytes) {
    if (bytes > cap_) {
      size_t want = std::max(bytes, cap_ + cap_ / 2);
      want = (want + 63) / 64 * 64;
      void* q = std::aligned_alloc(64, want);
      if (!q) fail(ErrorCode::OutOfMemory, "out of host memory for " + std::to_string(want) +
                                               " bytes of GEMM scratch");
      std::free(p_);
      p_ = static_cast<uint8_t*>(q);
      cap_ = want;
    }
    return p_;
  }

 private:
  uint8_t* p_ = nullptr;
  size_t cap_ = 0;
};

// One unit of parallel work: rows [r0, r1) of group g (expert, or 0 for DenseGemm) against
// weight blocks [b0, b1).
struct Task {
  int g, r0, r1, b0, b1;
};

// Per calling thread (the engine worker, tests on the main thread): scratch survives calls.
struct GemmScratch {
  Buffer x_bf16, x_f32, x_f32_plain, h, x_perm;
  Buffer x_i8, x_i8_scale, x_i8_sums, h_i8, h_i8_scale, h_i8_sums;
  std::vector<Task> tasks;
  // group_gemm_ffn's one-job decode path: per expert, gate/up items left and whether h is ready.
  std::vector<std::atomic<int>> expert_pending, expert_ready;
};

inline GemmScratch& gemm_scratch() {
  thread_local GemmScratch s;
  return s;
}

// Rows [r0, r1) of x [., k] (row pitch k) gathered by perm into out (same pitch): out[r][j] =
// x[r][perm[j]] (an act-order weight's input order, PackedWeight::perm); perm null copies them.
inline void gather_columns(const float* x, int r0, int r1, int k, const int32_t* perm, float* out) {
  for (int r = r0; r < r1; ++r) {
    const float* xr = x + static_cast<size_t>(r) * k;
    float* o = out + static_cast<size_t>(r) * k;
    if (!perm) {
      std::memcpy(o, xr, static_cast<size_t>(k) * sizeof(float));
      continue;
    }
    for (int j = 0; j < k; ++j) o[j] = xr[perm[j]];
  }
}

// Appends the tasks of one weight on a path: row tiles (multiples of the path's rows per tile)
// times chunks of weight blocks (chunk sizes are multiples of kNr, so gate/up pairs never split).
// min_chunks keeps enough tasks for the threads when a single small-M weight is the whole job.
inline void plan_tasks(std::vector<Task>& out, int g, int rows, const PackedWeight& w, Path path,
                       int min_chunks) {
  if (rows <= 0) return;
  const size_t act_bytes = act_size(path);
  const int row_step = path == Path::Amx ? 32 : kMr;  // kAmxRows (amx_kernels.h)
  const int blocks = w.np / 16;
  const size_t block_bytes = static_cast<size_t>(w.kp) * w.k_bytes16();
  // A task of one register tile of rows (decode) reads each weight byte once whatever its chunk,
  // so only min_chunks splits its matrix: one long stream per task reads faster than 256 KiB pieces
  // (the decode GroupGemm up to 10% faster on the bench experts; bench/RESULTS.md, session 24).
  int nc = rows <= kMr && min_chunks > 0 ? blocks
                                         : static_cast<int>(std::max<size_t>(1, kChunkBytes / block_bytes));
  if (min_chunks > 0) nc = std::min(nc, (blocks + min_chunks - 1) / min_chunks);
  nc = std::max(kNr, nc / kNr * kNr);
  int max_rows = static_cast<int>(kRowTileBytes / (static_cast<size_t>(w.kp) * act_bytes));
  max_rows = std::max(row_step, std::min(kMaxRowTile, max_rows / row_step * row_step));
  const int row_tiles = (rows + max_rows - 1) / max_rows;
  int mc = (rows + row_tiles - 1) / row_tiles;
  mc = (mc + row_step - 1) / row_step * row_step;
  for (int b = 0; b < blocks; b += nc)
    for (int r = 0; r < rows; r += mc)
      out.push_back(Task{g, r, std::min(rows, r + mc), b, std::min(blocks, b + nc)});
}

// ---------------------------------------------------------------------------------------------
// Tile kernels: tile[r * kTileLd + b * 16 + i] = sum_k x[r][k] * W[16 (b0 + b) + i][k] for
// r < MR, b < NR. w points at block b0; wstride = 16 * kp elements between blocks. Quantized
// kernels also read scales (at block b0; sstride = (kp / group) * 16 floats between blocks);
// the others ignore them.
struct QScales {
  const void* s = nullptr;  // block b0's scales, of type st (F8 and I8: always F32)
  ScaleType st = ScaleType::F32;
  size_t sstride = 0;       // scales (not bytes) between blocks
  int group = 0;
  // Int8 activation rows (Vnni, ScalarI8): x's scales and code sums per block (see Act).
  const float* xscales = nullptr;
  const int32_t* xsums = nullptr;
  size_t xblocks_ld = 0;
  int xblock = 0;
  // Scale i (counted from s) as f32; f32 scales in place (F8, I8).
  float at(size_t i) const { return scale_value(s, st, i); }
  const float* f32() const { return static_cast<const float*>(s); }
};
using TileFn = void (*)(const void* x, size_t ldx, const void* w, size_t wstride, int kp,
                        float* tile, QScales qs);

#if EXPERTD_GEMM_X86
// The 16 scales s[i, i + 16) of type ST as f32 (exact: bf16 by a shift, f16 by vcvtph2ps).
template <ScaleType ST>
EXPERTD_AVX512 __attribute__((always_inline)) inline __m512 load_scales16(const void* s, size_t i) {
  if constexpr (ST == ScaleType::F32) {
    return _mm512_loadu_ps(static_cast<const float*>(s) + i);
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(s) + i));
    if constexpr (ST == ScaleType::BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    else return _mm512_cvtph_ps(h);
  }
}
// The same with the type read from qs (a branch the predictor always gets right).
EXPERTD_AVX512 __attribute__((always_inline)) inline __m512 load_scales16(const QScales& qs, size_t i) {
  if (qs.st == ScaleType::F32) return load_scales16<ScaleType::F32>(qs.s, i);
  if (qs.st == ScaleType::BF16) return load_scales16<ScaleType::BF16>(qs.s, i);
  return load_scales16<ScaleType::F16>(qs.s, i);
}
#endif

// The portable register tile over any weight form: L::load_pair(w, wstride, b, k, qs, w0, w1, nr)
// widens elements k and k+1 of block b's 16 rows to f32 (nr: the tile's blocks, which place F8's
// codes). Also the reference for what the SIMD kernels compute: per k pair, acc += x[k] * w[k];
// acc += x[k+1] * w[k+1].
template <class L>
struct ScalarLoop {
  template <int MR, int NR>
  static void run(const void* xv, size_t ldx, const void* w, size_t wstride, int kp,
                  float* tile, QScales qs) {
    const float* x = static_cast<const float*>(xv);
    float acc[MR][NR][16];
    std::memset(acc, 0, sizeof(acc));
    float w0[16], w1[16];
    for (int k = 0; k < kp; k += 2) {
      for (int b = 0; b < NR; ++b) {
        L::load_pair(w, wstride, b, k, qs, w0, w1, NR);
        for (int r = 0; r < MR; ++r) {
          const float x0 = x[r * ldx + k], x1 = x[r * ldx + k + 1];
          float* a = acc[r][b];
          for (int i = 0; i < 16; ++i) {
            float t = a[i];
            t += x0 * w0[i];
            t += x1 * w1[i];
            a[i] = t;
          }
        }
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int b = 0; b < NR; ++b) std::memcpy(tile + r * kTileLd + b * 16, acc[r][b], 64);
  }
};

// Portable kernel (f32 activations, any float weight dtype).
template <DType WD>
struct ScalarTile : ScalarLoop<ScalarTile<WD>> {
  static void load_pair(const void* w, size_t wstride, int b, int k, QScales, float* w0, float* w1, int) {
    const size_t off = b * wstride;
    if constexpr (WD == DType::BF16) {
      const uint16_t* p = static_cast<const uint16_t*>(w) + off + static_cast<size_t>(k / 2) * 32;
      for (int i = 0; i < 16; ++i) {
        w0[i] = bf16_to_f32(p[2 * i]);
        w1[i] = bf16_to_f32(p[2 * i + 1]);
      }
    } else if constexpr (WD == DType::F16) {
      const uint16_t* p = static_cast<const uint16_t*>(w) + off + static_cast<size_t>(k) * 16;
      for (int i = 0; i < 16; ++i) {
        w0[i] = f16_to_f32(p[i]);
        w1[i] = f16_to_f32(p[16 + i]);
      }
    } else {
      const float* p = static_cast<const float*>(w) + off + static_cast<size_t>(k) * 16;
      for (int i = 0; i < 16; ++i) {
        w0[i] = p[i];
        w1[i] = p[16 + i];
      }
    }
  }
};

#if EXPERTD_GEMM_X86
// AVX-512 on f32 activations: bf16 pairs widen with shift/mask (even k = v << 16, odd k =
// v & 0xffff0000), f16 with vcvtph2ps, f32 directly; one FMA per k per accumulator.
template <DType WD>
struct Avx512Tile {
  template <int MR, int NR>
  EXPERTD_AVX512 static void run(const void* xv, size_t ldx, const void* wv, size_t wstride,
                                 int kp, float* tile, QScales) {
    const float* x = static_cast<const float*>(xv);
    __m512 acc[MR][NR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int b = 0; b < NR; ++b) acc[r][b] = _mm512_setzero_ps();
    if constexpr (WD == DType::BF16) {
      const uint16_t* w = static_cast<const uint16_t*>(wv);
      const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
      for (int kk = 0; kk < kp / 2; ++kk) {
#pragma GCC unroll 4
        for (int b = 0; b < NR; ++b) {
          __m512i v = _mm512_load_si512(w + b * wstride + static_cast<size_t>(kk) * 32);
          __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
          __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
#pragma GCC unroll 8
          for (int r = 0; r < MR; ++r) {
            const float* xr = x + r * ldx + 2 * kk;
            acc[r][b] = _mm512_fmadd_ps(_mm512_set1_ps(xr[0]), we, acc[r][b]);
            acc[r][b] = _mm512_fmadd_ps(_mm512_set1_ps(xr[1]), wo, acc[r][b]);
          }
        }
      }
    } else {
      for (int k = 0; k < kp; ++k) {
#pragma GCC unroll 4
        for (int b = 0; b < NR; ++b) {
          __m512 wk;
          if constexpr (WD == DType::F16) {
            const uint16_t* w = static_cast<const uint16_t*>(wv);
            wk = _mm512_cvtph_ps(_mm256_load_si256(
                reinterpret_cast<const __m256i*>(w + b * wstride + static_cast<size_t>(k) * 16)));
          } else {
            const float* w = static_cast<const float*>(wv);
            wk = _mm512_load_ps(w + b * wstride + static_cast<size_t>(k) * 16);
          }
#pragma GCC unroll 8
          for (int r = 0; r < MR; ++r)
            acc[r][b] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * ldx + k]), wk, acc[r][b]);
        }
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int b = 0; b < NR; ++b) _mm512_store_ps(tile + r * kTileLd + b * 16, acc[r][b]);
  }
};

// Lines [p, p + 64 n) into L2 (prefetcht1).
template <int N>
__attribute__((always_inline)) inline void prefetch_l2(const uint8_t* p) {
#pragma GCC unroll 4
  for (int i = 0; i < N; ++i) __builtin_prefetch(p + 64 * i, 0, 2);
}

// The one-row bf16 vdpbf16ps kernel asks for each of its NR blocks' weights this far ahead
// (bytes, into L2). NOTE: measured on AMD Zen 4 (bench quant-kernels --experts qwen3moe-like, three
// rounds), when the fp8 kernel read its blocks apart too: fp8 0.32-0.36 -> 0.25-0.27 ms per decode
// GroupGemm; DenseGemm 512 x 1024 from DRAM 1 KiB ahead gained less. The blocks stay NR streams
// here (not VnniTile's few_rows): vdpbf16ps sums in f32, and a block's sums must keep the k order
// every row tile gives them (the same bits alone or in a batch), so the independent chains are the
// NR blocks. (fp8 interleaves the blocks in its layout instead: quant_layout.h.)
constexpr int kBf16DotPrefetch = 2048;
// The one-row fp8, int8 and int4 kernels ask for no weights ahead: each reads one sequential
// stream (quant_layout.h), which the hardware prefetcher follows. NOTE: measured on AMD Zen 4 (2
// vCPUs, session 23, `bench quant-kernels --experts`, one thread): a prefetcht1 per weight line
// (fp8 1 KiB ahead, int8 / int4 4 KiB) cut the rate from DRAM to int4 g128 21-22 GB/s against
// 30 without it, fp8 26 against 31, int8 about 5%; one every other line sat between. Two threads
// in the VM's fast memory state: the mixtral-like int4 g128 decode GroupGemm read 0.65x bf16's
// bytes per second with them, 0.85-0.89x without. The bf16 kernel's NR streams (above) still gain.
static_assert(kNr == kF8Group, "an fp8 register tile is one interleaved group of blocks");

// AVX512-BF16: one vdpbf16ps multiplies a broadcast (x[k], x[k+1]) pair against a weight row
// pair of 16 outputs (the [Kp/2][16][2] block row), so a zmm load of weights feeds MR rows.
struct Bf16DotTile {
  template <int MR, int NR>
  EXPERTD_AVX512BF16 static void run(const void* xv, size_t ldx, const void* wv, size_t wstride,
                                     int kp, float* tile, QScales) {
    typedef int32_t __attribute__((may_alias, aligned(2))) pair_t;
    const uint16_t* x = static_cast<const uint16_t*>(xv);
    const uint16_t* w = static_cast<const uint16_t*>(wv);
    __m512 acc[MR][NR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int b = 0; b < NR; ++b) acc[r][b] = _mm512_setzero_ps();
    const int kp2 = kp / 2;
    for (int kk = 0; kk < kp2; ++kk) {
      __m512i wb[NR];
#pragma GCC unroll 4
      for (int b = 0; b < NR; ++b) {
        wb[b] = _mm512_load_si512(w + b * wstride + static_cast<size_t>(kk) * 32);
        // One row (decode): 2 KiB ahead into L2 (kBf16DotPrefetch). NOTE:
        // measured on AMD Zen 4 (quant-kernels --experts qwen3moe-like, three rounds): the bf16
        // decode GroupGemm 0.49-0.55 -> 0.42-0.46 ms; DenseGemm 512 x 1024 from DRAM 42-51 ->
        // 35-41 us.
        if constexpr (MR == 1)
          prefetch_l2<1>(reinterpret_cast<const uint8_t*>(w + b * wstride + static_cast<size_t>(kk) * 32) + kBf16DotPrefetch);
      }
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m512i xb =
            _mm512_set1_epi32(*reinterpret_cast<const pair_t*>(x + r * ldx + 2 * kk));
#pragma GCC unroll 4
        for (int b = 0; b < NR; ++b)
          acc[r][b] = _mm512_dpbf16_ps(acc[r][b], (__m512bh)xb, (__m512bh)wb[b]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int b = 0; b < NR; ++b) _mm512_store_ps(tile + r * kTileLd + b * 16, acc[r][b]);
  }
};
#endif


// ---------------------------------------------------------------------------------------------
// Quantized weights (see QFormat in ops.h): codes decode to f32, times the (row, group) scale,
// then the same accumulation as the f32 kernels. Activations are f32 on every path.

// The 8 e2m1 magnitudes times 2 (bit 3 of a code is its sign): integers, so that the int8 kernels
// multiply them as codes. The packer stores MXFP4 scales halved to match (2^(e - 128), quant.cc),
// which gives every kernel the same values as e2m1 x 2^(e - 127) exactly.
inline constexpr int kFp4Mag2[8] = {0, 1, 2, 3, 4, 6, 8, 12};
inline constexpr int fp4_int(int code) { return code & 8 ? -kFp4Mag2[code & 7] : kFp4Mag2[code & 7]; }
// The 16 doubled e2m1 values as f32 (code 8 is -0).
inline const float* fp4_e2m1_table() {
  static const std::array<float, 16> t = [] {
    std::array<float, 16> a{};
    for (int n = 0; n < 16; ++n) a[n] = n & 8 ? -static_cast<float>(kFp4Mag2[n & 7]) : static_cast<float>(kFp4Mag2[n & 7]);
    return a;
  }();
  return t.data();
}
constexpr int kFp4IntOffset = 12;  // the int8 kernels' unsigned form of a doubled e2m1 value: + 12
// Those unsigned forms by code, one byte each (a 128-bit lane's vpshufb table).
struct alignas(16) Fp4Operands { uint8_t v[16]; };
inline constexpr Fp4Operands kFp4Operands = [] {
  Fp4Operands t{};
  for (int n = 0; n < 16; ++n) t.v[n] = static_cast<uint8_t>(fp4_int(n) + kFp4IntOffset);
  return t;
}();

// Block b of a register tile of nr blocks that starts at w (bstride bytes between blocks but for
// F8, whose tile is one interleaved group: quant_layout.h), and the bytes between its 4-k chunks.
template <QFormat Q>
inline const uint8_t* tile_block(const uint8_t* w, size_t bstride, int b) {
  return Q == QFormat::F8 ? w + kChunk8 * b : w + b * bstride;
}
template <QFormat Q>
constexpr size_t tile_cstride(int nr) { return Q == QFormat::F8 ? kChunk8 * nr : kChunk8; }

// Code of row i (0..15) at column c of a block of kp columns (quant_layout.h), decoded; cstride:
// the bytes between the block's chunks (8-bit codes).
template <QFormat Q>
inline float decode_code(const uint8_t* blk, int c, int i, int kp, size_t cstride = kChunk8) {
  if constexpr (Q == QFormat::I8) {
    return static_cast<float>(i8_load(blk[code8_offset(Q, i, c, kp)]));
  } else if constexpr (Q == QFormat::F8) {
    return fp8_e4m3_to_f32(f8_load(blk[code8_offset(Q, i, c, kp, cstride)]));
  } else {
    int shift;
    const int nib = (blk[code4_offset(i, c, kp, &shift)] >> shift) & 0xf;
    if constexpr (Q == QFormat::I4) return static_cast<float>((nib ^ 8) - 8);
    else return fp4_e2m1_table()[nib];
  }
}

template <QFormat Q>
struct ScalarQTile : ScalarLoop<ScalarQTile<Q>> {
  static void load_pair(const void* wv, size_t wstride, int b, int k, QScales qs, float* w0,
                        float* w1, int nr) {
    const uint8_t* blk = tile_block<Q>(static_cast<const uint8_t*>(wv), wstride * qformat_bits(Q) / 8, b);
    const size_t cs = tile_cstride<Q>(nr);
    const int kp = static_cast<int>(wstride / 16);
    const size_t sc = b * qs.sstride + static_cast<size_t>(k / qs.group) * 16;
    for (int i = 0; i < 16; ++i) {
      const float s = Q == QFormat::F8 ? std::fabs(qs.at(sc + i)) : qs.at(sc + i);  // F8: the sign is a flag
      w0[i] = decode_code<Q>(blk, k, i, kp, cs) * s;
      w1[i] = decode_code<Q>(blk, k + 1, i, kp, cs) * s;
    }
  }
};

#if EXPERTD_GEMM_X86
// 16 codes of column k (the 16 rows of a block of kp columns) -> f32, unscaled (cstride: F8's
// bytes between chunks).
template <QFormat Q>
EXPERTD_AVX512 inline __m512 decode16(const uint8_t* blk, int k, int kp, size_t cstride) {
  if constexpr (Q == QFormat::I8) {
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
    const int c0 = k / 4 * 4;
    if (c0 + 4 <= kp) {  // a whole chunk: row i's 4 bytes are int32 lane i; byte k % 4, sign-extended
      const __m512i v = _mm512_xor_si512(_mm512_load_si512(blk + static_cast<size_t>(c0) * 16), flip);
      return _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_sll_epi32(v, _mm_cvtsi32_si128(24 - 8 * (k & 3))), 24));
    }
    const __m128i v = _mm_load_si128(reinterpret_cast<const __m128i*>(blk + static_cast<size_t>(k) * 16));  // tail
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_xor_si128(v, _mm512_castsi512_si128(flip))));
  } else if constexpr (Q == QFormat::F8) {
    // Gather the 16 rows' bytes and put their bits back in e4m3 order (quant_layout.h), then e4m3 -> f32: the 7 magnitude bits moved to
    // the top of an f32's exponent/mantissa make 2^(e - 127) * 1.m (or a denormal for e = 0);
    // times 2^120 rebias that exactly (denormal inputs are exact unless DAZ is set, which Node
    // never does). The 0x7f NaN is not decoded.
    __m512i u;
    const int c0 = k / 4 * 4, j = k & 3;
    if (c0 + 4 <= kp) {  // a whole chunk: the k pair's words of lane L's rows are its qword j / 2
      const __m512i v = _mm512_load_si512(blk + static_cast<size_t>(c0 / 4) * cstride);
      const int h = j >> 1;
      const __m512i q = _mm512_permutexvar_epi64(_mm512_setr_epi64(h, 2 + h, 4 + h, 6 + h, 0, 0, 0, 0), v);
      const __m512i pairs = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(q));
      u = _mm512_and_si512(_mm512_srli_epi32(pairs, 8 * (j & 1)), _mm512_set1_epi32(0xff));
    } else {
      alignas(16) uint8_t b[16];
      for (int i = 0; i < 16; ++i) b[i] = blk[code8_offset(Q, i, k, kp, cstride)];
      u = _mm512_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(b)));
    }
    u = _mm512_or_si512(  // f8_load
        _mm512_or_si512(_mm512_and_si512(u, _mm512_set1_epi32(0x80)),
                        _mm512_and_si512(_mm512_slli_epi32(u, 4), _mm512_set1_epi32(0x70))),
        _mm512_and_si512(_mm512_srli_epi32(u, 3), _mm512_set1_epi32(0x0f)));
    const __m512i mag = _mm512_slli_epi32(_mm512_and_si512(u, _mm512_set1_epi32(0x7f)), 20);
    const __m512 f = _mm512_mul_ps(_mm512_castsi512_ps(mag), _mm512_set1_ps(0x1p120f));
    const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(u, _mm512_set1_epi32(0x80)), 24);
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(f), sign));
  } else {
    __m512i nib;
    const int c0 = k / 8 * 8;
    if (c0 + 8 <= kp) {  // a whole chunk: row i's 4 bytes are int32 lane i
      const int shift = 8 * (k & 3) + ((k & 4) ? 4 : 0);
      const __m512i v = _mm512_load_si512(blk + static_cast<size_t>(c0) * 8);
      nib = _mm512_and_si512(_mm512_srl_epi32(v, _mm_cvtsi32_si128(shift)), _mm512_set1_epi32(0xf));
    } else {  // tail: byte j holds rows j (low) and j + 8 (high)
      const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + static_cast<size_t>(k) * 8));
      const __m128i m = _mm_set1_epi8(0x0f);
      const __m128i lo = _mm_and_si128(v, m);
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
      nib = _mm512_cvtepu8_epi32(_mm_unpacklo_epi64(lo, hi));
    }
    if constexpr (Q == QFormat::I4) {
      const __m512i e = _mm512_set1_epi32(8);
      return _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_xor_si512(nib, e), e));
    } else {
      return _mm512_permutexvar_ps(nib, _mm512_loadu_ps(fp4_e2m1_table()));
    }
  }
}

template <QFormat Q>
struct Avx512QTile {
  template <int MR, int NR>
  EXPERTD_AVX512 static void run(const void* xv, size_t ldx, const void* wv, size_t wstride,
                                 int kp, float* tile, QScales qs) {
    const float* x = static_cast<const float*>(xv);
    const uint8_t* w = static_cast<const uint8_t*>(wv);
    const size_t bstride = wstride * qformat_bits(Q) / 8;
    const int wkp = static_cast<int>(wstride / 16);  // the layout's kp (kp here may stop short)
    __m512 acc[MR][NR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int b = 0; b < NR; ++b) acc[r][b] = _mm512_setzero_ps();
    for (int k0 = 0; k0 < kp; k0 += qs.group) {
      __m512 sc[NR];
#pragma GCC unroll 4
      for (int b = 0; b < NR; ++b)
        sc[b] = load_scales16(qs, b * qs.sstride + static_cast<size_t>(k0 / qs.group) * 16);
      if constexpr (Q == QFormat::F8)  // the sign is a flag
#pragma GCC unroll 4
        for (int b = 0; b < NR; ++b) sc[b] = _mm512_abs_ps(sc[b]);
      const int k1 = std::min(kp, k0 + qs.group);
      for (int k = k0; k < k1; ++k) {
#pragma GCC unroll 4
        for (int b = 0; b < NR; ++b) {
          const __m512 wk = _mm512_mul_ps(decode16<Q>(tile_block<Q>(w, bstride, b), k, wkp, tile_cstride<Q>(NR)), sc[b]);
#pragma GCC unroll 8
          for (int r = 0; r < MR; ++r)
            acc[r][b] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * ldx + k]), wk, acc[r][b]);
        }
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int b = 0; b < NR; ++b) _mm512_store_ps(tile + r * kTileLd + b * 16, acc[r][b]);
  }
};
#endif

// ---------------------------------------------------------------------------------------------
// Int8 and int4 weights against int8 activations (fast mode): per activation block (which divides
// the weight's scale group) an exact integer dot product of the codes, then acc += float(dot) *
// (weight scale * activation scale). The integer dot is exact, so the portable and VNNI kernels
// differ only by f32 rounding of the per-block terms.

// Signed code of row i (0..15) at column c of a block of kp columns (FP4: the doubled e2m1 value).
template <QFormat Q>
inline int code_int(const uint8_t* blk, int c, int i, int kp) {
  if constexpr (Q == QFormat::I8) {
    return i8_load(blk[code8_offset(Q, i, c, kp)]);
  } else {
    int shift;
    const int nib = (blk[code4_offset(i, c, kp, &shift)] >> shift) & 0xf;
    if constexpr (Q == QFormat::FP4) return fp4_int(nib);
    return (nib ^ 8) - 8;
  }
}

// What the unsigned operands add to each code: sum(x * (w + s)) - s * sum(x) undoes it.
template <QFormat Q>
constexpr uint32_t operand_offset() {
  return Q == QFormat::I8 ? 128u : Q == QFormat::FP4 ? static_cast<uint32_t>(kFp4IntOffset) : 8u;
}

template <QFormat Q>
struct ScalarI8Tile {
  template <int MR, int NR>
  static void run(const void* xv, size_t ldx, const void* wv, size_t wstride, int kp,
                  float* tile, QScales qs) {
    const int8_t* x = static_cast<const int8_t*>(xv);
    const size_t bstride = wstride * qformat_bits(Q) / 8;
    for (int r = 0; r < MR; ++r) {
      const float* xs = qs.xscales + static_cast<size_t>(r) * qs.xblocks_ld;
      for (int b = 0; b < NR; ++b) {
        const uint8_t* blk = static_cast<const uint8_t*>(wv) + b * bstride;
        float accf[16] = {0};
        for (int k0 = 0; k0 < kp; k0 += qs.xblock) {
          int32_t acc[16] = {0};
          for (int k = k0; k < k0 + qs.xblock; ++k) {
            const int xk = x[r * ldx + k];
            if (xk == 0) continue;
            for (int i = 0; i < 16; ++i) acc[i] += code_int<Q>(blk, k, i, static_cast<int>(wstride / 16)) * xk;
          }
          const size_t sc = b * qs.sstride + static_cast<size_t>(k0 / qs.group) * 16;
          const float sx = xs[k0 / qs.xblock];
          for (int i = 0; i < 16; ++i) accf[i] += static_cast<float>(acc[i]) * (qs.at(sc + i) * sx);
        }
        std::memcpy(tile + r * kTileLd + b * 16, accf, 64);
      }
    }
  }
};

#if EXPERTD_GEMM_X86
typedef int32_t __attribute__((may_alias, aligned(1))) unaligned_i32;

// How far ahead the few-rows int8 / int4 kernel asks for its scale stream (bytes, into L2; the
// weights themselves are left to the hardware prefetcher: see the note after kBf16DotPrefetch). Past
// a task's end it touches the next task's scales (or nothing: prefetches never fault).
constexpr int kFewRowsScalePrefetch = 1024;
// Blocks of 32 columns (int4 g32, MXFP4): few_rows copies a 16-row block's scales, up to this many
// bytes, into L1 in one burst before its codes, instead of reading them as a second stream beside
// the codes (see few_rows).
constexpr size_t kScaleBurstBytes = 8 << 10;
// Register tiles of up to this many rows run VnniTile::few_rows (decode's rows per expert); more
// run blocks(). NOTE: measured on AMD Zen 4, one thread, the decode GroupGemm at qwen3moe-like's
// expert shape with 2-4 rows per expert, as a share of bf16's time in the same run: 2 rows int8
// 0.59 -> 0.46, int4 g128 0.41 -> 0.28; 3 rows int8 even, int4 g128 0.43 -> 0.31; 4 rows int8
// 0.62 -> 0.67 (worse: 16 accumulators and 4 weight vectors leave no room), int4 g128 0.47 -> 0.40.
template <QFormat Q>
constexpr int few_rows_max() { return Q == QFormat::I8 ? 2 : 4; }

// AVX512-VNNI: vpdpbusd multiplies 4 unsigned bytes by 4 signed bytes per int32 lane. The weight
// codes are the unsigned side, shifted by +128 (int8, xor 0x80) or +8 (int4, xor 0x8), and the
// activations the signed side; sum(x * (w + s)) - s * sum(x) undoes the shift per block: the
// int32 accumulators start at -s * sum(x) (from the code sums prepared with the activations), so
// each block costs one conversion and one FMA per accumulator, into f32 accumulators that stay in
// registers. Both layouts hold [16 rows][4 k] per 64 bytes (quant_layout.h): an int8 chunk is
// the unsigned operand as loaded (the packer stored code + 128); the low and the high nibbles of
// an int4 chunk are each one after a mask and a shift.
// NOTE (int8 layout): until session 12 int8 codes were stored [k][16] and signed, and every call
// made the operand with an xor and a vpermb per 64 bytes (prefill once per task into a buffer):
// the one-row decode GroupGemm at qwen3moe-like's expert shape ran 0.27-0.31 ms, 1.71-1.81x bf16,
// against 0.25-0.27 ms, 1.82-1.88x with the operand as stored (bench quant-kernels --experts,
// AMD Zen 4).
template <QFormat Q>
struct VnniTile {
  template <int MR, int NR>
  EXPERTD_AVX512VNNI static void run(const void* xv, size_t ldx, const void* wv, size_t wstride,
                                     int kp, float* tile, QScales qs) {
    // Blocks of kActBlock and of 32 (int4 g32) run a k loop of known length, unrolled; the
    // others (small or odd groups) the general one.
    const auto* x = static_cast<const int8_t*>(xv);
    const auto* w = static_cast<const uint8_t*>(wv);
    if constexpr (MR <= few_rows_max<Q>()) {
      // The scale type as a template argument: few_rows is decode's whole inner loop.
      if (Q == QFormat::I8 || qs.st == ScaleType::F32)
        few_rows_kb<MR, NR, ScaleType::F32>(x, ldx, w, wstride, kp, tile, qs);
      else if (qs.st == ScaleType::BF16)
        few_rows_kb<MR, NR, ScaleType::BF16>(x, ldx, w, wstride, kp, tile, qs);
      else
        few_rows_kb<MR, NR, ScaleType::F16>(x, ldx, w, wstride, kp, tile, qs);
      return;
    }
    // NOTE (registers): with several rows the f32 sums live in the tile (L1), not in registers:
    // MR x NR int32 accumulators plus as many f32 ones are 48 zmm at 6 x 4, more than the 32 there
    // are, and the compiler's spills inside the k loop made a prefill-sized call slower than bf16
    // (0.72x at 512 rows on AMD Zen 4). The tile is read and written once per activation block
    // (two rows with their sums in registers measured no faster: DenseGemm 512 x 1024, Zen 4).
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int b = 0; b < NR; ++b) _mm512_store_ps(tile + r * kTileLd + b * 16, _mm512_setzero_ps());
    if (qs.xblock == kActBlock)
      blocks<MR, NR, kActBlock>(x, ldx, w, wstride, kp, tile, qs);
    else if (qs.xblock == 32)
      blocks<MR, NR, 32>(x, ldx, w, wstride, kp, tile, qs);
    else
      blocks<MR, NR, 0>(x, ldx, w, wstride, kp, tile, qs);
  }

  // Activation bytes k .. k + 3 in every lane.
  EXPERTD_AVX512VNNI __attribute__((always_inline)) static inline __m512i x4(const int8_t* x, int k) {
    return _mm512_set1_epi32(*reinterpret_cast<const unaligned_i32*>(x + k));
  }

  // The operand of the low (hi = false) or the high nibbles of a 64-byte 4-bit chunk.
  template <bool Hi>
  EXPERTD_AVX512VNNI __attribute__((always_inline)) static inline __m512i nibbles(__m512i v, __m512i n8,
                                                                                __m512i lo4, __m512i fp4ops) {
    const __m512i nib = Hi ? _mm512_srli_epi16(v, 4) : v;
    if constexpr (Q == QFormat::FP4)  // the nibble's operand from the lane's table
      return _mm512_shuffle_epi8(fp4ops, _mm512_and_si512(nib, lo4));
    else  // (v ^ 8) & 0xf per nibble half: ternary logic (a ^ b) & c = 0x28.
      return _mm512_ternarylogic_epi32(nib, n8, lo4, 0x28);
  }

  template <int MR, int NR, ScaleType ST>
  EXPERTD_AVX512VNNI __attribute__((always_inline)) static inline void few_rows_kb(
      const int8_t* x, size_t ldx, const uint8_t* w, size_t wstride, int kp, float* tile, QScales qs) {
    if (qs.xblock == kActBlock)
      few_rows<MR, NR, kActBlock, ST>(x, ldx, w, wstride, kp, tile, qs);
    else if (qs.xblock == 32)
      few_rows<MR, NR, 32, ST>(x, ldx, w, wstride, kp, tile, qs);
    else
      few_rows<MR, NR, 0, ST>(x, ldx, w, wstride, kp, tile, qs);
  }

  // Few rows (decode, up to few_rows_max): each 16-row block's whole k before the next block's, so
  // that a task reads its weights as one sequential stream (its blocks are contiguous, and so are
  // their scales) instead of NR streams a block apart. Those streams are short at decode's shapes
  // (an int4 block of a 256-k down projection is 2 KiB), and the hardware prefetcher started each
  // anew. Each weight vector is loaded and decoded once for the rows; the x broadcasts come from
  // L1; four int32 accumulators per row keep four vpdpbusd chains, and the f32 sums stay in
  // registers. Per row, block and activation block the same int32 sum and the same FMA into the
  // f32 sum as blocks(): the same bits.
  template <int MR, int NR, int KB, ScaleType ST>
  EXPERTD_AVX512VNNI __attribute__((always_inline)) static inline void few_rows(
      const int8_t* x, size_t ldx, const uint8_t* w, size_t wstride, int kp, float* tile, QScales qs) {
    const size_t bstride = wstride * qformat_bits(Q) / 8;
    const int kb = KB ? KB : qs.xblock;
    const int blocks_per_group = qs.group / kb;
    const __m512i n8 = _mm512_set1_epi8(0x08), lo4 = _mm512_set1_epi8(0x0f);
    const __m512i n88 = _mm512_set1_epi8(static_cast<char>(0x88)), hi4 = _mm512_set1_epi8(static_cast<char>(0xf0));
    const __m512i fp4ops = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(kFp4Operands.v)));
    // Groups of 32: a block's scales (1 KiB at k 1024 in bf16) copied to L1 at its start. Read
    // group by group instead, beside the codes, that second stream held one thread's int4 g32
    // decode GroupGemm ~10% under its rate without scales. NOTE: measured on AMD Zen 4, one thread,
    // qwen3moe-like's expert shape: 0.156-0.159 -> 0.144-0.149 ms at one row, 0.182-0.189 ->
    // 0.163-0.169 at two; int8 and int4 g128 (a quarter of the scale bytes) gained nothing.
    const size_t sbytes = static_cast<size_t>(kp / qs.group) * 16 * scale_type_size(ST);
    const bool burst = KB == 32 && sbytes <= kScaleBurstBytes && sbytes % 64 == 0;
    alignas(64) uint8_t sbuf[KB == 32 ? kScaleBurstBytes : 64];
#pragma GCC unroll 1
    for (int b = 0; b < NR; ++b) {
      const uint8_t* wb = w + b * bstride;
      const uint8_t* sb = static_cast<const uint8_t*>(qs.s) + b * qs.sstride * scale_type_size(ST);
      if (burst) {
        for (size_t i = 0; i < sbytes; i += 64) _mm512_store_si512(sbuf + i, _mm512_loadu_si512(sb + i));
        sb = sbuf;
      }
      __m512 sum[MR];
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) sum[r] = _mm512_setzero_ps();
      int gi = 0, in_group = 0;
      for (int g0 = 0, xb = 0; g0 < kp; g0 += kb, ++xb) {
        __m512i a0[MR], a1[MR], a2[MR], a3[MR];
#pragma GCC unroll 4
        for (int r = 0; r < MR; ++r) {
          const uint32_t comp = static_cast<uint32_t>(qs.xsums[static_cast<size_t>(r) * qs.xblocks_ld + xb]) * operand_offset<Q>();
          a0[r] = _mm512_set1_epi32(static_cast<int32_t>(0u - comp));
          a1[r] = a2[r] = a3[r] = _mm512_setzero_si512();
        }
        // One k step: the four operand vectors o0..o3 (k, k + 4, k + 8, k + 12) against every row.
        auto step4 = [&](int k, __m512i o0, __m512i o1, __m512i o2, __m512i o3) EXPERTD_AVX512VNNI __attribute__((always_inline)) {
#pragma GCC unroll 4
          for (int r = 0; r < MR; ++r) {
            const int8_t* xr = x + r * ldx;
            a0[r] = _mm512_dpbusd_epi32(a0[r], o0, x4(xr, k));
            a1[r] = _mm512_dpbusd_epi32(a1[r], o1, x4(xr, k + 4));
            a2[r] = _mm512_dpbusd_epi32(a2[r], o2, x4(xr, k + 8));
            a3[r] = _mm512_dpbusd_epi32(a3[r], o3, x4(xr, k + 12));
          }
        };
        auto step2 = [&](int k, __m512i o0, __m512i o1) EXPERTD_AVX512VNNI __attribute__((always_inline)) {
#pragma GCC unroll 4
          for (int r = 0; r < MR; ++r) {
            const int8_t* xr = x + r * ldx;
            a0[r] = _mm512_dpbusd_epi32(a0[r], o0, x4(xr, k));
            a1[r] = _mm512_dpbusd_epi32(a1[r], o1, x4(xr, k + 4));
          }
        };
        int k = g0;
        if constexpr (Q == QFormat::I8) {
#pragma GCC unroll 8
          for (; k + 16 <= g0 + kb; k += 16)
            step4(k, _mm512_load_si512(wb + static_cast<size_t>(k) * 16), _mm512_load_si512(wb + static_cast<size_t>(k + 4) * 16),
                  _mm512_load_si512(wb + static_cast<size_t>(k + 8) * 16), _mm512_load_si512(wb + static_cast<size_t>(k + 12) * 16));
          for (; k < g0 + kb; k += 4) {
            const __m512i o = _mm512_load_si512(wb + static_cast<size_t>(k) * 16);
#pragma GCC unroll 4
            for (int r = 0; r < MR; ++r) a0[r] = _mm512_dpbusd_epi32(a0[r], o, x4(x + r * ldx, k));
          }
        } else if constexpr (Q == QFormat::I4) {
          // The high nibbles as 16 x their operand, (v ^ 0x88) & 0xf0, with no shift: one op per
          // 64-byte half instead of two. a1 and a3 then sum 16 x the products (exact in int32: at
          // most 64 k x 240 x 128 per block), divided back out once per block. Blocks of 32 (int4
          // g32) run the 8-k loop alone: two chains of four, and the block's epilogue adds two
          // sums instead of four (integer sums: the same bits). NOTE: measured on AMD Zen 4, one
          // thread, qwen3moe-like's decode GroupGemm: 0.171-0.181 -> 0.163-0.168 ms.
#pragma GCC unroll 4
          for (; KB != 32 && k + 16 <= g0 + kb; k += 16) {
            const __m512i v0 = _mm512_load_si512(wb + static_cast<size_t>(k) * 8);
            const __m512i v1 = _mm512_load_si512(wb + static_cast<size_t>(k + 8) * 8);
            step4(k, _mm512_ternarylogic_epi32(v0, n88, lo4, 0x28), _mm512_ternarylogic_epi32(v0, n88, hi4, 0x28),
                  _mm512_ternarylogic_epi32(v1, n88, lo4, 0x28), _mm512_ternarylogic_epi32(v1, n88, hi4, 0x28));
          }
#pragma GCC unroll 4
          for (; k < g0 + kb; k += 8) {
            const __m512i v = _mm512_load_si512(wb + static_cast<size_t>(k) * 8);
            step2(k, _mm512_ternarylogic_epi32(v, n88, lo4, 0x28), _mm512_ternarylogic_epi32(v, n88, hi4, 0x28));
          }
#pragma GCC unroll 4
          for (int r = 0; r < MR; ++r) {
            a1[r] = _mm512_srai_epi32(_mm512_add_epi32(a1[r], a3[r]), 4);
            a3[r] = _mm512_setzero_si512();
          }
        } else {
#pragma GCC unroll 4
          for (; k + 16 <= g0 + kb; k += 16) {
            const __m512i v0 = _mm512_load_si512(wb + static_cast<size_t>(k) * 8);
            const __m512i v1 = _mm512_load_si512(wb + static_cast<size_t>(k + 8) * 8);
            step4(k, nibbles<false>(v0, n8, lo4, fp4ops), nibbles<true>(v0, n8, lo4, fp4ops),
                  nibbles<false>(v1, n8, lo4, fp4ops), nibbles<true>(v1, n8, lo4, fp4ops));
          }
          for (; k < g0 + kb; k += 8) {
            const __m512i v = _mm512_load_si512(wb + static_cast<size_t>(k) * 8);
            step2(k, nibbles<false>(v, n8, lo4, fp4ops), nibbles<true>(v, n8, lo4, fp4ops));
          }
        }
        const __m512 sc = load_scales16<ST>(sb, static_cast<size_t>(gi) * 16);
        if (++in_group == blocks_per_group) {  // the next group's scales: the scale stream ahead
          in_group = 0;
          ++gi;
          if (!burst) prefetch_l2<1>(sb + static_cast<size_t>(gi) * 16 * scale_type_size(ST) + kFewRowsScalePrefetch);
        }
#pragma GCC unroll 4
        for (int r = 0; r < MR; ++r) {
          const __m512i acc = _mm512_add_epi32(_mm512_add_epi32(a0[r], a1[r]), _mm512_add_epi32(a2[r], a3[r]));
          const __m512 xs = _mm512_set1_ps(qs.xscales[static_cast<size_t>(r) * qs.xblocks_ld + xb]);
          sum[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_mul_ps(sc, xs), sum[r]);
        }
      }
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) _mm512_store_ps(tile + r * kTileLd + b * 16, sum[r]);
    }
  }

  // Every block of k: int32 dot products, then one conversion and one FMA per accumulator into
  // the tile. KB: the block length when known at compile time, else 0 (qs.xblock).
  template <int MR, int NR, int KB>
  EXPERTD_AVX512VNNI __attribute__((always_inline)) static inline void blocks(
      const int8_t* x, size_t ldx, const uint8_t* w, size_t wstride, int kp, float* tile, QScales qs) {
    const size_t bstride = wstride * qformat_bits(Q) / 8;
    const int kb = KB ? KB : qs.xblock;
    const __m512i n8 = _mm512_set1_epi8(0x08), lo4 = _mm512_set1_epi8(0x0f);
    // FP4: the operand of each nibble (vpshufb).
    const __m512i fp4ops = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(kFp4Operands.v)));
    // The weight scale group of a block, counted (kb divides the group): a division per block
    // was an idiv per 32 k.
    const int blocks_per_group = qs.group / kb;
    int gi = 0, in_group = 0;
    for (int g0 = 0; g0 < kp; g0 += kb) {
      const int xb = g0 / kb;
      __m512i acc[MR][NR];
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        // s * sum(x) in uint32: the shifted dot wraps modulo 2^32, the difference is exact.
        const uint32_t comp = static_cast<uint32_t>(qs.xsums[static_cast<size_t>(r) * qs.xblocks_ld + xb]) * operand_offset<Q>();
        const __m512i c = _mm512_set1_epi32(static_cast<int32_t>(0u - comp));
#pragma GCC unroll 4
        for (int b = 0; b < NR; ++b) acc[r][b] = c;
      }
      // NOTE (registers): the NR weight vectors of a k step are decoded first, then each row's
      // 4 activation bytes are broadcast once and meet all of them: MR x NR accumulators + NR
      // weights + one broadcast + the constants fit the 32 zmm at 6 x 4 (a broadcast per row
      // held across the blocks did not, and spilled). Integer sums: the order is free.
      if constexpr (Q == QFormat::I8) {
#pragma GCC unroll 8
        for (int k = g0; k < g0 + kb; k += 4) {
          __m512i wk[NR];
#pragma GCC unroll 4
          for (int b = 0; b < NR; ++b) {
            wk[b] = _mm512_load_si512(w + b * bstride + static_cast<size_t>(k) * 16);
          }
#pragma GCC unroll 8
          for (int r = 0; r < MR; ++r) {
            const __m512i xv = x4(x + r * ldx, k);
#pragma GCC unroll 4
            for (int b = 0; b < NR; ++b) acc[r][b] = _mm512_dpbusd_epi32(acc[r][b], wk[b], xv);
          }
        }
      } else {
#pragma GCC unroll 4
        for (int k = g0; k < g0 + kb; k += 8) {
          // Low nibbles (k .. k + 3) of every block, then the high ones (k + 4 .. k + 7) from
          // a second (L1) load: NR decoded vectors at a time, as for int8.
#pragma GCC unroll 2
          for (int half = 0; half < 2; ++half) {
            __m512i wk[NR];
#pragma GCC unroll 4
            for (int b = 0; b < NR; ++b) {
              const __m512i v = _mm512_load_si512(w + b * bstride + static_cast<size_t>(k) * 8);
              wk[b] = half ? nibbles<true>(v, n8, lo4, fp4ops) : nibbles<false>(v, n8, lo4, fp4ops);
            }
#pragma GCC unroll 8
            for (int r = 0; r < MR; ++r) {
              const __m512i xv = x4(x + r * ldx, k + 4 * half);
#pragma GCC unroll 4
              for (int b = 0; b < NR; ++b) acc[r][b] = _mm512_dpbusd_epi32(acc[r][b], wk[b], xv);
            }
          }
        }
      }
      __m512 sc[NR];
#pragma GCC unroll 4
      for (int b = 0; b < NR; ++b) sc[b] = load_scales16(qs, b * qs.sstride + static_cast<size_t>(gi) * 16);
      if (++in_group == blocks_per_group) {
        in_group = 0;
        ++gi;
      }
      // The compiler would otherwise forward the tile's stores to the next block's loads and
      // keep the f32 sums as values after all, spilled to the stack (a second copy of each).
      __asm__ volatile("" ::: "memory");
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m512 xs = _mm512_set1_ps(qs.xscales[static_cast<size_t>(r) * qs.xblocks_ld + xb]);
#pragma GCC unroll 4
        for (int b = 0; b < NR; ++b) {
          float* t = tile + r * kTileLd + b * 16;
          _mm512_store_ps(t, _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][b]), _mm512_mul_ps(sc[b], xs),
                                             _mm512_load_ps(t)));
        }
      }
    }
  }
};

// fp8 e4m3 weights against bf16 activations, decoded to bf16 k pairs in registers by a shift, two
// unpacks and a mask, no table. The packer stores each e4m3 code with its bits reordered
// (quant_layout.h): c' = s e0 m2 m1 m0 e3 e2 e1. The bf16 2^(e + 1) * 1.mmm, which is the e4m3
// value times 2^8 for every normal code (e = 1..15), exactly, has high byte (s 1 0 0 0 e3 e2 e1)
// = (c' & 0x87) | 0x40 and low byte (e0 m2 m1 m0 0 0 0 0) = (c' << 1) & 0xf0; vpunpck{l,h}bw of
// (c' << 1, c') makes the words of the two zmm of bf16 k pairs of a 64-byte chunk (4 k x 16 rows)
// that vdpbf16ps wants, and one ternary-logic op per zmm masks them and sets bit 14. The 2^8 goes
// back out with the block scale (scale * 2^-8 is exact for any normal scale).
// Codes with e = 0 (zero and the subnormals m * 2^-9) do not decode so (and vdpbf16ps flushes
// bf16 subnormals anyway): the groups that hold any (flagged by the packer in the sign of a
// scale) run a fix-up, those words from a table of +-m * 2^-9 * 2^8 = +-m / 2 (normal bf16
// numbers) indexed by the code's s and m bits. The NaN code decodes to a finite value (real
// weights never hold it).
// The constants of f8_pairs.
struct F8PairConsts {
  __m512i keep, bias, exp_words, sub;
  EXPERTD_AVX512BF16 F8PairConsts() {
    keep = _mm512_set1_epi16(static_cast<short>(0x87f0));
    bias = _mm512_set1_epi16(0x4000);
    exp_words = _mm512_set1_epi16(0x4700);  // e0 and e3 e2 e1 in the high byte
    // Index (word >> 11) & 31 = s e0 m2 m1 m0: +-m / 2 as bf16 at s m (e0 = 0 for these codes).
    alignas(64) uint16_t sub_tab[32];
    for (int i = 0; i < 32; ++i) {
      const float v = static_cast<float>(i & 7) * 0.5f * (i & 16 ? -1.0f : 1.0f);
      sub_tab[i] = f32_to_bf16(v);
    }
    sub = _mm512_load_si512(sub_tab);
  }
};

// Whether any of a block's 16 rows has an exponent-0 code in a group (s: the rows' scales there,
// each row's sign its flag, quant_layout.h).
EXPERTD_AVX512BF16 inline bool f8_block_exp0(const float* s) {
  return _mm512_movepi32_mask(_mm512_castps_si512(_mm512_load_ps(s))) != 0;
}

// One 4-k chunk of 16 rows' fp8 codes (64 bytes, the F8 layout) as the two zmm of bf16 k pairs
// vdpbf16ps takes: wa the (k, k+1) pairs, wb the (k+2, k+3) pairs (see Bf16DotF8Tile).
EXPERTD_AVX512BF16 __attribute__((always_inline)) inline void f8_pairs(
    const uint8_t* codes, bool exp0, const F8PairConsts& fc, __m512i* wa_out, __m512i* wb_out) {
  const __m512i c = _mm512_load_si512(codes);
  const __m512i c1 = _mm512_slli_epi16(c, 1);
  const __m512i ra = _mm512_unpacklo_epi8(c1, c), rb = _mm512_unpackhi_epi8(c1, c);
  // (a & b) | c = 0xea
  __m512i wa = _mm512_ternarylogic_epi32(ra, fc.keep, fc.bias, 0xea);
  __m512i wb = _mm512_ternarylogic_epi32(rb, fc.keep, fc.bias, 0xea);
  if (exp0) {
    wa = _mm512_mask_mov_epi16(wa, _mm512_testn_epi16_mask(ra, fc.exp_words),
                               _mm512_permutexvar_epi16(_mm512_srli_epi16(ra, 11), fc.sub));
    wb = _mm512_mask_mov_epi16(wb, _mm512_testn_epi16_mask(rb, fc.exp_words),
                               _mm512_permutexvar_epi16(_mm512_srli_epi16(rb, 11), fc.sub));
  }
  *wa_out = wa;
  *wb_out = wb;
}

// Pre = false: the codes widened in registers; true: read from decode_f8_blocks's buffer (the
// same pairs), for the many row tiles of a prefill.
template <bool Pre>
struct Bf16DotF8TileT {
  template <int MR, int NR>
  EXPERTD_AVX512BF16 static void run(const void* xv, size_t ldx, const void* wv, size_t wstride,
                                     int kp, float* tile, QScales qs) {
    const uint16_t* x = static_cast<const uint16_t*>(xv);
    const uint8_t* w = static_cast<const uint8_t*>(wv);  // the codes: one interleaved group (quant_layout.h)
    const uint16_t* wd = static_cast<const uint16_t*>(wv);  // Pre: 16 kp bf16 per block, blocks apart
    const size_t bstride = wstride;  // Pre: one bf16 per weight
    const F8PairConsts fc;
    const __m512 unscale = _mm512_set1_ps(0x1p-8f);
    // NOTE (registers): the f32 sums over the groups live in the tile, as in VnniTile: in
    // registers they and the group's accumulators were 48 zmm at 6 x 4, and spilled in the k loop.
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int b = 0; b < NR; ++b) _mm512_store_ps(tile + r * kTileLd + b * 16, _mm512_setzero_ps());
    for (int g0 = 0, gi = 0; g0 < kp; g0 += qs.group, ++gi) {
      const int g1 = std::min(kp, g0 + qs.group);
      __m512 acc[MR][NR];
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
        for (int b = 0; b < NR; ++b) acc[r][b] = _mm512_setzero_ps();
      bool exp0[NR] = {};
      if constexpr (!Pre) {
#pragma GCC unroll 4
        for (int b = 0; b < NR; ++b) exp0[b] = f8_block_exp0(qs.f32() + b * qs.sstride + static_cast<size_t>(gi) * 16);
      }
      // The group's whole chunks, then, where kp (the activations' even k) ends on a k pair inside
      // the last chunk, that chunk's first pair alone (the activations stop there); and the whole
      // chunks without the exponent-0 fix-up where none of the tile's blocks needs it in the group.
      // The same dot products in the same order either way: the x broadcasts are shared by the NR
      // blocks and the per-chunk tests leave the loop.
      const int gw = g0 + (g1 - g0) / 4 * 4;
      bool any0 = false;
#pragma GCC unroll 4
      for (int b = 0; b < NR; ++b) any0 = any0 || exp0[b];
      if (any0) {
        for (int k = g0; k < gw; k += 4) chunk<MR, NR, true, true>(x, ldx, w, wd, bstride, k, exp0, fc, acc);
      } else {
        for (int k = g0; k < gw; k += 4) chunk<MR, NR, true, false>(x, ldx, w, wd, bstride, k, exp0, fc, acc);
      }
      if (gw < g1) chunk<MR, NR, false, true>(x, ldx, w, wd, bstride, gw, exp0, fc, acc);
      __asm__ volatile("" ::: "memory");  // reload the tile (see VnniTile)
#pragma GCC unroll 4
      for (int b = 0; b < NR; ++b) {
        const __m512 sc = _mm512_mul_ps(
            _mm512_abs_ps(_mm512_load_ps(qs.f32() + b * qs.sstride + static_cast<size_t>(gi) * 16)), unscale);
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
          float* t = tile + r * kTileLd + b * 16;
          _mm512_store_ps(t, _mm512_fmadd_ps(acc[r][b], sc, _mm512_load_ps(t)));
        }
      }
    }
  }

  // Chunk k / 4 of the tile's NR blocks into acc: its (k, k + 1) pairs, and with Two its (k + 2,
  // k + 3) ones; Fix: the exponent-0 fix-up where exp0[b] says (else no block needs it).
  template <int MR, int NR, bool Two, bool Fix>
  EXPERTD_AVX512BF16 __attribute__((always_inline)) static inline void chunk(
      const uint16_t* x, size_t ldx, const uint8_t* w, const uint16_t* wd, size_t bstride, int k,
      const bool* exp0, const F8PairConsts& fc, __m512 (&acc)[MR][NR]) {
    typedef int32_t __attribute__((may_alias, aligned(2))) pair_t;
#pragma GCC unroll 4
    for (int b = 0; b < NR; ++b) {
      __m512i wa, wb;
      if constexpr (Pre) {
        const uint16_t* d = wd + b * bstride + static_cast<size_t>(k) * 16;  // chunk k / 4
        wa = _mm512_load_si512(d);
        wb = _mm512_load_si512(d + 32);
      } else {
        // Chunk k / 4 of block b: the group's chunks are 64 NR bytes, one sequential stream.
        const uint8_t* p = w + static_cast<size_t>(k) * 16 * NR + kChunk8 * b;
        f8_pairs(p, Fix && exp0[b], fc, &wa, &wb);
      }
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m512i xa = _mm512_set1_epi32(*reinterpret_cast<const pair_t*>(x + r * ldx + k));
        acc[r][b] = _mm512_dpbf16_ps(acc[r][b], (__m512bh)xa, (__m512bh)wa);
      }
      if constexpr (Two) {
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
          const __m512i xb = _mm512_set1_epi32(*reinterpret_cast<const pair_t*>(x + r * ldx + k + 2));
          acc[r][b] = _mm512_dpbf16_ps(acc[r][b], (__m512bh)xb, (__m512bh)wb);
        }
      }
    }
  }
};
using Bf16DotF8Tile = Bf16DotF8TileT<false>;

// Widens the fp8 codes of nb blocks (w: the first, at the start of an F8 group, and the last the
// end of one or of the matrix; wstride = 16 kp; s: its scales, sstride apart) to the bf16 k pairs
// Bf16DotF8Tile makes in registers, stored in its read order with the blocks apart: block b's
// chunk k / 4 at out[b * wstride + 16 k] (wa, then wb 32 elements on), for k < kend.
EXPERTD_AVX512BF16 inline void decode_f8_blocks(const uint8_t* w, size_t wstride, int kend, int nb,
                                                const float* s, size_t sstride, int group,
                                                uint16_t* out) {
  const F8PairConsts fc;
  const int kp = static_cast<int>(wstride / 16);
  for (int b = 0; b < nb; ++b) {
    const uint8_t* blk = w + f8_block_offset(b, kp);
    const size_t cs = kChunk8 * f8_group_width(b, nb);
    for (int g0 = 0, gi = 0; g0 < kend; g0 += group, ++gi) {
      const bool exp0 = f8_block_exp0(s + b * sstride + static_cast<size_t>(gi) * 16);
      const int g1 = std::min(kend, g0 + group);
      for (int k = g0; k < g1; k += 4) {
        __m512i wa, wb;
        f8_pairs(blk + static_cast<size_t>(k / 4) * cs, exp0, fc, &wa, &wb);
        uint16_t* d = out + b * wstride + static_cast<size_t>(k) * 16;
        _mm512_store_si512(d, wa);
        _mm512_store_si512(d + 32, wb);
      }
    }
  }
}

#endif

}  // namespace expertd::gemm

#include "avx2_kernels.h"

namespace expertd::gemm {

template <class K, int... I>
constexpr std::array<TileFn, sizeof...(I)> make_tile_table(std::integer_sequence<int, I...>) {
  return {{&K::template run<I / kNr + 1, I % kNr + 1>...}};
}

// Table of kernels for quantized weights of format q on a path (Scalar or Avx512: f32
// activations; ScalarI8 or Vnni: int8 activations; Bf16Dot: fp8 against bf16 activations).
inline const TileFn* qtile_table(Path path, QFormat q) {
  using Seq = std::make_integer_sequence<int, kMr * kNr>;
  if (path == Path::ScalarI8) {
    static const auto si_i8 = make_tile_table<ScalarI8Tile<QFormat::I8>>(Seq{});
    static const auto si_i4 = make_tile_table<ScalarI8Tile<QFormat::I4>>(Seq{});
    static const auto si_fp4 = make_tile_table<ScalarI8Tile<QFormat::FP4>>(Seq{});
    return q == QFormat::I8 ? si_i8.data() : q == QFormat::I4 ? si_i4.data() : si_fp4.data();
  }
#if EXPERTD_GEMM_X86
  if (path == Path::Vnni) {
    static const auto v_i8 = make_tile_table<VnniTile<QFormat::I8>>(Seq{});
    static const auto v_i4 = make_tile_table<VnniTile<QFormat::I4>>(Seq{});
    static const auto v_fp4 = make_tile_table<VnniTile<QFormat::FP4>>(Seq{});
    return q == QFormat::I8 ? v_i8.data() : q == QFormat::I4 ? v_i4.data() : v_fp4.data();
  }
  if (path == Path::Bf16Dot) {
    static const auto d_f8 = make_tile_table<Bf16DotF8Tile>(Seq{});
    return d_f8.data();
  }
  if (path == Path::Avx2I8) {
    static const auto v_i8 = make_tile_table<Avx2I8Tile<QFormat::I8>>(Seq{});
    static const auto v_i4 = make_tile_table<Avx2I8Tile<QFormat::I4>>(Seq{});
    static const auto v_fp4 = make_tile_table<Avx2I8Tile<QFormat::FP4>>(Seq{});
    return q == QFormat::I8 ? v_i8.data() : q == QFormat::I4 ? v_i4.data() : v_fp4.data();
  }
  if (path == Path::Avx2F8) {
    static const auto a2_f8 = make_tile_table<Avx2F8Tile>(Seq{});
    return a2_f8.data();
  }
  if (path == Path::Avx2) {
    static const auto a_i8 = make_tile_table<Avx2QTile<QFormat::I8>>(Seq{});
    static const auto a_i4 = make_tile_table<Avx2QTile<QFormat::I4>>(Seq{});
    static const auto a_f8 = make_tile_table<Avx2QTile<QFormat::F8>>(Seq{});
    static const auto a_fp4 = make_tile_table<Avx2QTile<QFormat::FP4>>(Seq{});
    return q == QFormat::I8 ? a_i8.data() : q == QFormat::I4 ? a_i4.data()
           : q == QFormat::F8 ? a_f8.data() : a_fp4.data();
  }
#endif
  static const auto s_i8 = make_tile_table<ScalarQTile<QFormat::I8>>(Seq{});
  static const auto s_i4 = make_tile_table<ScalarQTile<QFormat::I4>>(Seq{});
  static const auto s_f8 = make_tile_table<ScalarQTile<QFormat::F8>>(Seq{});
  static const auto s_fp4 = make_tile_table<ScalarQTile<QFormat::FP4>>(Seq{});
#if EXPERTD_GEMM_X86
  static const auto a_i8 = make_tile_table<Avx512QTile<QFormat::I8>>(Seq{});
  static const auto a_i4 = make_tile_table<Avx512QTile<QFormat::I4>>(Seq{});
  static const auto a_f8 = make_tile_table<Avx512QTile<QFormat::F8>>(Seq{});
  static const auto a_fp4 = make_tile_table<Avx512QTile<QFormat::FP4>>(Seq{});
  if (path != Path::Scalar)
    return q == QFormat::I8 ? a_i8.data() : q == QFormat::I4 ? a_i4.data()
           : q == QFormat::F8 ? a_f8.data() : a_fp4.data();
#endif
  (void)path;
  return q == QFormat::I8 ? s_i8.data() : q == QFormat::I4 ? s_i4.data()
         : q == QFormat::F8 ? s_f8.data() : s_fp4.data();
}

// Table of kernels for (path, weight dtype), indexed [(mr - 1) * kNr + (nr - 1)].
inline const TileFn* tile_table(Path path, DType wd) {
  using Seq = std::make_integer_sequence<int, kMr * kNr>;
  static const auto scalar_bf16 = make_tile_table<ScalarTile<DType::BF16>>(Seq{});
  static const auto scalar_f16 = make_tile_table<ScalarTile<DType::F16>>(Seq{});
  static const auto scalar_f32 = make_tile_table<ScalarTile<DType::F32>>(Seq{});
#if EXPERTD_GEMM_X86
  static const auto avx_bf16 = make_tile_table<Avx512Tile<DType::BF16>>(Seq{});
  static const auto avx_f16 = make_tile_table<Avx512Tile<DType::F16>>(Seq{});
  static const auto avx_f32 = make_tile_table<Avx512Tile<DType::F32>>(Seq{});
  static const auto dot_bf16 = make_tile_table<Bf16DotTile>(Seq{});
  if (path == Path::Bf16Dot) return dot_bf16.data();
  if (path == Path::Avx2) {
    static const auto a2_bf16 = make_tile_table<Avx2Tile<DType::BF16>>(Seq{});
    static const auto a2_f16 = make_tile_table<Avx2Tile<DType::F16>>(Seq{});
    static const auto a2_f32 = make_tile_table<Avx2Tile<DType::F32>>(Seq{});
    return wd == DType::BF16 ? a2_bf16.data() : wd == DType::F16 ? a2_f16.data() : a2_f32.data();
  }
  if (path == Path::Avx512)
    return wd == DType::BF16 ? avx_bf16.data() : wd == DType::F16 ? avx_f16.data() : avx_f32.data();
#endif
  (void)path;
  return wd == DType::BF16 ? scalar_bf16.data()
                           : wd == DType::F16 ? scalar_f16.data() : scalar_f32.data();
}

#if EXPERTD_GEMM_X86
// The table of the pre-decoded fp8 kernel (run_tiles picks it for prefill-sized calls).
inline const TileFn* f8_decoded_table() {
  using Seq = std::make_integer_sequence<int, kMr * kNr>;
  static const auto t = make_tile_table<Bf16DotF8TileT<true>>(Seq{});
  return t.data();
}
#endif

// The kernel table for a packed weight on a path (none for Amx: run_tiles_amx).
inline const TileFn* tile_table(Path path, const PackedWeight& w) {
  if (path == Path::Amx) return nullptr;
  return w.quantized() ? qtile_table(path, w.q) : tile_table(path, w.dtype);
}

}  // namespace expertd::gemm

#include "amx_kernels.h"

namespace expertd::gemm {

// ---------------------------------------------------------------------------------------------
// Zero points (PackedWeight::zeros: AWQ, asymmetric GPTQ and compressed-tensors). The kernels
// multiply the codes as for a symmetric weight; then, per output row i of a tile,
//   y[r, i] -= sum_g scale[i, g] * zero[i, g] * xg[r, g],
// xg[r, g] the sum of row r's activations over group g as the kernel read them (int8 rows: per
// activation block, which divides the group, its scale times its code sum; f32 rows: the values,
// to the k the kernel ran). One place for every kernel path, prefill and decode alike, and a row's
// result does not depend on the rows beside it.

// The group sums of rows [0, mr) of a tile (x advanced to the tile's first row): gs[r * groups + g].
inline void zero_point_sums(Path path, const uint8_t* xr, size_t ld, const QScales& qs, int mr, int kp,
                            int group, int groups, float* gs) {
  if (int8_path(path)) {
    const int per = group / qs.xblock;
    for (int r = 0; r < mr; ++r)
      for (int g = 0; g < groups; ++g) {
        float v = 0.0f;
        for (int j = g * per; j < (g + 1) * per; ++j) {
          const size_t at = static_cast<size_t>(r) * qs.xblocks_ld + j;
          v += qs.xscales[at] * static_cast<float>(qs.xsums[at]);
        }
        gs[r * groups + g] = v;
      }
    return;
  }
  EXPERTD_CHECK(act_size(path) == 4, ErrorCode::Internal, "zero points on a path without f32 or int8 activations");
  for (int r = 0; r < mr; ++r) {
    const float* x = reinterpret_cast<const float*>(xr) + static_cast<size_t>(r) * ld;
    for (int g = 0; g < groups; ++g) {
      const int k1 = std::min(kp, (g + 1) * group);
      float a[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // four chains: a long f32 sum is latency bound
      int k = g * group;
      for (; k + 4 <= k1; k += 4)
        for (int j = 0; j < 4; ++j) a[j] += x[k + j];
      for (; k < k1; ++k) a[0] += x[k];
      gs[r * groups + g] = (a[0] + a[1]) + (a[2] + a[3]);
    }
  }
}

#if EXPERTD_GEMM_X86
template <ScaleType ST>
EXPERTD_AVX512 inline void zero_points_avx512(const PackedWeight& w, int b, int nr, int mr, const float* gs,
                                              int groups, float* tile) {
  const size_t gp = static_cast<size_t>(w.kp / w.group);
  const int8_t* z = reinterpret_cast<const int8_t*>(w.zeros.get());
  // Each (block, group)'s scale x zero once, for every row of the tile (a row's sum runs over g in
  // order, as the scalar path's).
  for (int bi = 0; bi < nr; ++bi) {
    __m512 corr[kMr];
#pragma GCC unroll 8
    for (int r = 0; r < kMr; ++r) corr[r] = _mm512_setzero_ps();
    for (int g = 0; g < groups; ++g) {
      const size_t at = (static_cast<size_t>(b + bi) * gp + g) * 16;
      const __m512 zf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z + at))));
      const __m512 c = _mm512_mul_ps(load_scales16<ST>(w.scales.get(), at), zf);
#pragma GCC unroll 8
      for (int r = 0; r < kMr; ++r)
        if (r < mr) corr[r] = _mm512_fmadd_ps(c, _mm512_set1_ps(gs[r * groups + g]), corr[r]);
    }
#pragma GCC unroll 8
    for (int r = 0; r < kMr; ++r) {
      if (r >= mr) break;
      float* t = tile + r * kTileLd + bi * 16;
      _mm512_store_ps(t, _mm512_sub_ps(_mm512_load_ps(t), corr[r]));
    }
  }
}
#endif

// Subtracts the zero points' term from a finished tile of rows [0, mr), blocks [b, b + nr).
inline void apply_zero_points(Path path, const PackedWeight& w, int b, int nr, int mr, const float* gs,
                              int groups, float* tile) {
#if EXPERTD_GEMM_X86
  if (path == Path::Vnni || path == Path::Avx512) {
    switch (w.scale_type) {
      case ScaleType::F32: return zero_points_avx512<ScaleType::F32>(w, b, nr, mr, gs, groups, tile);
      case ScaleType::BF16: return zero_points_avx512<ScaleType::BF16>(w, b, nr, mr, gs, groups, tile);
      default: return zero_points_avx512<ScaleType::F16>(w, b, nr, mr, gs, groups, tile);
    }
  }
#endif
  (void)path;
  const size_t gp = static_cast<size_t>(w.kp / w.group);
  const int8_t* z = reinterpret_cast<const int8_t*>(w.zeros.get());
  for (int bi = 0; bi < nr; ++bi)
    for (int r = 0; r < mr; ++r)
      for (int i = 0; i < 16; ++i) {
        float corr = 0.0f;
        for (int g = 0; g < groups; ++g) {
          const size_t at = (static_cast<size_t>(b + bi) * gp + g) * 16 + i;
          corr = std::fma(scale_value(w.scales.get(), w.scale_type, at) * static_cast<float>(z[at]), gs[r * groups + g], corr);
        }
        tile[r * kTileLd + bi * 16 + i] -= corr;
      }
}

// Runs every register tile of rows [0, rows) of x against blocks [b0, b1) of w, handing each
// finished tile to epi(row, mr, block, nr, tile). Rows outermost: an MR-row slice of x stays in
// L1 while the task's weight chunk streams from L2. Path::Amx hands tiles of up to 32 rows.
template <class Epi>
inline void run_tiles(const TileFn* table, Path path, Act x, int rows, const PackedWeight& w,
                      int b0, int b1, const Epi& epi) {
#if EXPERTD_GEMM_X86
  if (path == Path::Amx) {
    EXPERTD_CHECK(!w.zeros, ErrorCode::Internal, "AMX tiles do not apply zero points");
    return run_tiles_amx(x, rows, w, b0, b1, epi);
  }
#endif
  alignas(64) float tile[kMr * kTileLd];
  const size_t xes = act_size(path);
  const size_t wstride = static_cast<size_t>(16) * w.kp;
  const uint8_t* wbase = static_cast<const uint8_t*>(w.ptr());
  const size_t block_bytes = static_cast<size_t>(w.kp) * w.k_bytes16();
  // Int8 kernels run whole groups (padded codes and activations are zero); the others stop at
  // the even k their activations are padded to.
  const int kp = int8_path(path) ? w.kp : w.k_even();
  QScales qs;
  if (w.quantized()) {
    qs.group = w.group;
    qs.st = w.scale_type;
    qs.sstride = static_cast<size_t>(w.kp / w.group) * 16;
    qs.xblocks_ld = x.blocks_ld;
    qs.xblock = x.block;
  }
  // fp8 against many row tiles (prefill): the task's blocks widened to bf16 once, not in every row
  // tile's registers; the same pairs in the same order, so the same bits as a row alone. From 8
  // tiles: DenseGemm [2816 x 1024] on Zen 4 at 512 rows 0.69x -> 0.93x bf16, at 64 rows even, at
  // 8 rows (2 tiles) 0.84x -> 0.68x, so not there.
  // F8 codes are interleaved in groups of kF8Group blocks (quant_layout.h), one per register tile:
  // a task starts on a group (plan_tasks' chunks are multiples of kNr).
  EXPERTD_CHECK(!w.quantized() || w.q != QFormat::F8 || b0 % kF8Group == 0, ErrorCode::Internal,
                "an fp8 task starts inside an interleaved block group");
  const uint8_t* wb0 = wbase + b0 * block_bytes;  // block b0 as the kernels read it
  size_t bbytes = block_bytes;
#if EXPERTD_GEMM_X86
  constexpr int kDecodeOnceRows = 8 * kMr;
  static thread_local Buffer decoded;
  if (path == Path::Bf16Dot && w.q == QFormat::F8 && rows >= kDecodeOnceRows) {
    bbytes = static_cast<size_t>(w.kp) * 32;  // 16 rows x kp bf16
    auto* d = static_cast<uint16_t*>(decoded.get(static_cast<size_t>(b1 - b0) * bbytes));
    decode_f8_blocks(wb0, wstride, (kp + 3) / 4 * 4, b1 - b0, w.scales_f32() + b0 * qs.sstride,
                     qs.sstride, w.group, d);
    wb0 = reinterpret_cast<const uint8_t*>(d);
    table = f8_decoded_table();
  }
#endif
  // Zero points: each row tile's group sums, once for all its blocks.
  const int zgroups = w.zeros ? w.kp / w.group : 0;
  static thread_local std::vector<float> zsums;
  if (zgroups) zsums.resize(static_cast<size_t>(kMr) * zgroups);
  for (int r = 0; r < rows; r += kMr) {
    const int mr = std::min(kMr, rows - r);
    const uint8_t* xr = static_cast<const uint8_t*>(x.data) + r * x.ld * xes;
    if (x.scales) {
      qs.xscales = x.scales + static_cast<size_t>(r) * x.blocks_ld;
      qs.xsums = x.sums + static_cast<size_t>(r) * x.blocks_ld;
    }
    if (zgroups) zero_point_sums(path, xr, x.ld, qs, mr, kp, w.group, zgroups, zsums.data());
    for (int b = b0; b < b1; b += kNr) {
      const int nr = std::min(kNr, b1 - b);
      if (w.quantized()) qs.s = w.scales.get() + b * qs.sstride * scale_type_size(w.scale_type);
      table[(mr - 1) * kNr + (nr - 1)](xr, x.ld, wb0 + (b - b0) * bbytes, wstride, kp, tile, qs);
      if (zgroups) apply_zero_points(path, w, b, nr, mr, zsums.data(), zgroups, tile);
      epi(r, mr, b, nr, tile);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Activation preparation: x [rows, k] f32 -> what the path reads, in grow-only scratch.

#if EXPERTD_GEMM_X86
EXPERTD_AVX512BF16 inline void rows_to_bf16(const float* x, int rows, int k, int kp,
                                            uint16_t* out) {
  for (int r = 0; r < rows; ++r) {
    const float* xr = x + static_cast<size_t>(r) * k;
    uint16_t* o = out + static_cast<size_t>(r) * kp;
    for (int c = 0; c < k; c += 16) {
      const int n = std::min(16, k - c);
      const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
      __m256bh v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, xr + c));
      _mm256_mask_storeu_epi16(o + c, m, (__m256i)v);
    }
    if (kp > k) o[k] = 0;
  }
}
#endif

inline Act prepare_activations(Path path, bool round, const float* x, int rows, int k, int kp,
                               Buffer& buf) {
#if EXPERTD_GEMM_X86
  if (bf16_act_path(path)) {
    uint16_t* out = static_cast<uint16_t*>(buf.get(static_cast<size_t>(rows) * kp * 2));
    rows_to_bf16(x, rows, k, kp, out);
    return Act{out, static_cast<size_t>(kp)};
  }
#endif
  if (!round && k == kp) return Act{x, static_cast<size_t>(k)};
  // Odd k: a padded copy, so the last k pair never reads past a row (the weight there is 0).
  float* out = static_cast<float*>(buf.get(static_cast<size_t>(rows) * kp * 4));
  for (int r = 0; r < rows; ++r) {
    const float* xr = x + static_cast<size_t>(r) * k;
    float* o = out + static_cast<size_t>(r) * kp;
    if (round)
      for (int c = 0; c < k; ++c) o[c] = bf16_to_f32(f32_to_bf16(xr[c]));
    else
      std::memcpy(o, xr, static_cast<size_t>(k) * 4);
    if (kp > k) o[k] = 0.0f;
  }
  return Act{out, static_cast<size_t>(kp)};
}

// Int8 activation rows (Vnni, ScalarI8): per block of `block` columns, scale = absmax / 127 and
// code = round-to-nearest-even(x / scale) in [-127, 127] (f32 division, as a reference can repeat
// it), codes zero in [k, ld), and the sum of the block's codes. ld must be at least the kp of
// every weight that reads the rows, and block must divide each one's group.
inline void quantize_row_i8_scalar(const float* x, int k, int ld, int block, int8_t* codes,
                                   float* scales, int32_t* sums) {
  for (int j = 0; j < ld / block; ++j) {
    const int c0 = j * block, c1 = std::min(k, c0 + block);
    float amax = 0.0f;
    for (int c = c0; c < c1; ++c) {
      const float a = std::fabs(x[c]);
      if (!(a <= amax)) amax = a;  // NaN sticks (and makes the scale NaN: the output says so)
    }
    const float sc = amax / 127.0f;
    scales[j] = sc;
    int32_t sum = 0;
    for (int c = c0; c < c0 + block; ++c) {
      float v = c < c1 && sc > 0.0f ? std::nearbyint(x[c] / sc) : 0.0f;
      v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
      codes[c] = static_cast<int8_t>(v == v ? v : 0.0f);
      sum += codes[c];
    }
    sums[j] = sum;
  }
}

#if EXPERTD_GEMM_X86
// The same numbers (vdivps rounds like the scalar division; vcvtps2dq rounds to nearest even
// under the default MXCSR, which Node keeps). Blocks of 16 or more columns; the scalar one below.
EXPERTD_AVX512 inline void quantize_row_i8_avx512(const float* x, int k, int ld, int block,
                                                  int8_t* codes, float* scales, int32_t* sums) {
  const __m512i lim = _mm512_set1_epi32(127), nlim = _mm512_set1_epi32(-127);
  for (int j = 0; j < ld / block; ++j) {
    const int c0 = j * block, c1 = std::min(k, c0 + block);
    __m512 vmax = _mm512_setzero_ps();
    bool nan = false;
    for (int c = c0; c < c1; c += 16) {
      const __mmask16 m = static_cast<__mmask16>(c1 - c >= 16 ? 0xffff : (1u << (c1 - c)) - 1);
      const __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(m, x + c));
      nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) != 0;
      vmax = _mm512_max_ps(vmax, a);
    }
    const float amax = nan ? std::nanf("") : _mm512_reduce_max_ps(vmax);
    const float sc = amax / 127.0f;
    scales[j] = sc;
    __m512i vsum = _mm512_setzero_si512();
    const __m512 vs = _mm512_set1_ps(sc);
    const bool live = sc > 0.0f;
    for (int c = c0; c < c0 + block; c += 16) {
      const int n = std::max(0, std::min(16, c1 - c));
      const __mmask16 m = static_cast<__mmask16>(live ? (n >= 16 ? 0xffff : (1u << n) - 1) : 0);
      __m512i q = _mm512_maskz_cvtps_epi32(m, _mm512_div_ps(_mm512_maskz_loadu_ps(m, x + c), vs));
      q = _mm512_max_epi32(_mm512_min_epi32(q, lim), nlim);
      vsum = _mm512_add_epi32(vsum, q);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + c), _mm512_cvtepi32_epi8(q));
    }
    sums[j] = _mm512_reduce_add_epi32(vsum);
  }
}
#endif

// Scratch for int8 rows [rows] of ld codes in blocks of `block` (ld and block as above).
inline Act alloc_i8(int rows, int ld, int block, Buffer& codes_buf, Buffer& scale_buf,
                    Buffer& sums_buf) {
  Act a;
  a.data = codes_buf.get(static_cast<size_t>(rows) * ld);
  a.ld = static_cast<size_t>(ld);
  a.blocks_ld = static_cast<size_t>(ld / block);
  a.scales = static_cast<float*>(scale_buf.get(static_cast<size_t>(rows) * a.blocks_ld * 4));
  a.sums = static_cast<int32_t*>(sums_buf.get(static_cast<size_t>(rows) * a.blocks_ld * 4));
  a.block = block;
  return a;
}

// Rows [r0, r1) of x (ldx floats apart, k used) into a's rows [r0, r1).
// A row equal to the one before it (a decode token's copies, one per expert it chose, after the
// permute) copies that row's codes, scales and sums: memcmp leaves distinct rows within a few
// bytes, and quantizing was the largest serial part of a decode step's GroupGemm call (its top-k
// copies of one token, each quantized).
inline void quantize_rows_i8(const CpuFeatures& f, const float* x, size_t ldx, int r0, int r1, int k,
                             const Act& a) {
  const int ld = static_cast<int>(a.ld);
  for (int r = r0; r < r1; ++r) {
    const float* xr = x + static_cast<size_t>(r) * ldx;
    int8_t* cr = const_cast<int8_t*>(static_cast<const int8_t*>(a.data)) + static_cast<size_t>(r) * ld;
    float* sc = const_cast<float*>(a.scales) + static_cast<size_t>(r) * a.blocks_ld;
    int32_t* sr = const_cast<int32_t*>(a.sums) + static_cast<size_t>(r) * a.blocks_ld;
    if (r > r0 && std::memcmp(xr - ldx, xr, static_cast<size_t>(k) * sizeof(float)) == 0) {
      std::memcpy(cr, cr - ld, static_cast<size_t>(ld));
      std::memcpy(sc, sc - a.blocks_ld, a.blocks_ld * sizeof(float));
      std::memcpy(sr, sr - a.blocks_ld, a.blocks_ld * sizeof(int32_t));
      continue;
    }
#if EXPERTD_GEMM_X86
    if (f.kernel_avx512 && a.block % 16 == 0) {
      quantize_row_i8_avx512(xr, k, ld, a.block, cr, sc, sr);
      continue;
    }
    if (f.kernel_avx2 && a.block % 8 == 0) {
      quantize_row_i8_avx2(xr, k, ld, a.block, cr, sc, sr);
      continue;
    }
#endif
    (void)f;
    quantize_row_i8_scalar(xr, k, ld, a.block, cr, sc, sr);
  }
}

// quantize_rows_i8 over rows [0, rows), in row chunks on the pool once that pays (a prefill).
inline void quantize_rows_i8_pool(const CpuFeatures& f, const float* x, size_t ldx, int rows, int k, const Act& a) {
  parallel_rows(static_cast<size_t>(rows), static_cast<size_t>(k), [&](size_t r0, size_t r1) {
    quantize_rows_i8(f, x, ldx, static_cast<int>(r0), static_cast<int>(r1), k, a);
  });
}

// ---------------------------------------------------------------------------------------------
// Epilogues.

// Logical output columns of packed block b: [col0, col0 + count). GateUp blocks map back to
// gate columns [0, I) and up columns [I, 2I).
inline void block_columns(const PackedWeight& w, int b, int* col0, int* count) {
  if (w.kind == WeightKind::Plain) {
    *col0 = 16 * b;
    *count = std::min(16, w.n - 16 * b);
  } else {
    const int inter = w.n / 2;
    const int q0 = 16 * (b / 2);
    *count = std::min(16, inter - q0);
    *col0 = (b & 1) ? inter + q0 : q0;
  }
}

// y[r][col] = (accumulate ? y[r][col] : 0) + (tile + bias[col]) for the tile's real columns.
inline void store_plain(const float* tile, int mr, int nr, const PackedWeight& w, int b0,
                        float* y, size_t ldy, const float* bias, bool accumulate) {
  for (int b = 0; b < nr; ++b) {
    int col0, count;
    block_columns(w, b0 + b, &col0, &count);
    for (int r = 0; r < mr; ++r) {
      const float* t = tile + r * kTileLd + b * 16;
      float* yr = y + r * ldy + col0;
      for (int i = 0; i < count; ++i) {
        float v = t[i];
        if (bias) v += bias[col0 + i];
        if (accumulate) v += yr[i];
        yr[i] = v;
      }
    }
  }
}

// How h (the SiLU(gate)*up rows between the two expert projections) is stored.
enum class HFormat : int { F32 = 0, F32Rounded = 1, Bf16 = 2 };

// tile holds gate/up block pairs (blocks b0 + 2p, b0 + 2p + 1) -> h columns 16 * (b0/2 + p) + i.
// h points at the tile's first row; h_row_bytes between rows.
inline void store_gate_up_scalar(const float* tile, int mr, int nr, int b0, uint8_t* h,
                                 size_t h_row_bytes, HFormat fmt) {
  for (int r = 0; r < mr; ++r) {
    for (int p = 0; p < nr / 2; ++p) {
      const float* g = tile + r * kTileLd + 2 * p * 16;
      const float* u = g + 16;
      const size_t col0 = static_cast<size_t>(b0 / 2 + p) * 16;
      for (int i = 0; i < 16; ++i) {
        const float s = g[i] / (1.0f + std::exp(-g[i]));
        float v = s * u[i];
        if (fmt == HFormat::Bf16) {
          reinterpret_cast<uint16_t*>(h + r * h_row_bytes)[col0 + i] = f32_to_bf16(v);
        } else {
          if (fmt == HFormat::F32Rounded) v = bf16_to_f32(f32_to_bf16(v));
          reinterpret_cast<float*>(h + r * h_row_bytes)[col0 + i] = v;
        }
      }
    }
  }
}

#if EXPERTD_GEMM_X86
// SiLU(g) * u = g / (1 + e^-g) * u
// NOTE: the arithmetic of siluMul (activation.cc: simd_exp.h's exp512_ps, then g / (1 + e) * u), so
// EPS-MoE's per-expert DenseGemm path (gate_up GEMM, siluMul, down GEMM) gives the fused GroupGemm's
// bits and the planner's kernel choice never changes an output (test/eps.test.ts).
EXPERTD_AVX512 inline __m512 silu_mul512(__m512 g, __m512 u) {
  const __m512 e = exp512_ps(_mm512_sub_ps(_mm512_setzero_ps(), g));
  return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), u);
}

EXPERTD_AVX512 inline void store_gate_up_avx512(const float* tile, int mr, int nr, int b0,
                                                uint8_t* h, size_t h_row_bytes, HFormat fmt) {
  for (int r = 0; r < mr; ++r) {
    for (int p = 0; p < nr / 2; ++p) {
      const float* g = tile + r * kTileLd + 2 * p * 16;
      __m512 v = silu_mul512(_mm512_load_ps(g), _mm512_load_ps(g + 16));
      float* out = reinterpret_cast<float*>(h + r * h_row_bytes) + (b0 / 2 + p) * 16;
      if (fmt == HFormat::F32Rounded) {  // round to nearest even at bit 16, as f32_to_bf16
        __m512i u = _mm512_castps_si512(v);
        __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
        u = _mm512_and_si512(u, _mm512_set1_epi32(static_cast<int>(0xffff0000u)));
        v = _mm512_castsi512_ps(u);
      }
      _mm512_storeu_ps(out, v);
    }
  }
}

EXPERTD_AVX512BF16 inline void store_gate_up_bf16(const float* tile, int mr, int nr, int b0,
                                                  uint8_t* h, size_t h_row_bytes) {
  for (int r = 0; r < mr; ++r) {
    for (int p = 0; p < nr / 2; ++p) {
      const float* g = tile + r * kTileLd + 2 * p * 16;
      const __m512 v = silu_mul512(_mm512_load_ps(g), _mm512_load_ps(g + 16));
      uint16_t* out = reinterpret_cast<uint16_t*>(h + r * h_row_bytes) + (b0 / 2 + p) * 16;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}
#endif

#if EXPERTD_GEMM_X86
// The AVX2 form (16 gate/up columns as two halves), silu_mul256 as activation.cc's siluMul.
__attribute__((target("avx2,fma"))) inline void store_gate_up_avx2(const float* tile, int mr, int nr, int b0,
                                                                   uint8_t* h, size_t h_row_bytes, HFormat fmt) {
  for (int r = 0; r < mr; ++r) {
    for (int p = 0; p < nr / 2; ++p) {
      const float* g = tile + r * kTileLd + 2 * p * 16;
      float* out = reinterpret_cast<float*>(h + r * h_row_bytes) + (b0 / 2 + p) * 16;
      for (int half = 0; half < 2; ++half) {
        __m256 v = silu_mul256(_mm256_load_ps(g + 8 * half), _mm256_load_ps(g + 16 + 8 * half));
        if (fmt == HFormat::F32Rounded) {  // round to nearest even at bit 16, as f32_to_bf16
          __m256i u = _mm256_castps_si256(v);
          const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
          u = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
          v = _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
        }
        _mm256_storeu_ps(out + 8 * half, v);
      }
    }
  }
}
#endif

// Fused SiLU(gate)*up epilogue, in the form activation.cc's siluMul takes on this CPU (AVX-512,
// AVX2 or portable: chosen by the CPU, not by the weight's path), so that EPS-MoE's per-expert
// dense path gives the GroupGemm's bits whichever kernel ran the gate/up GEMM (int8 activations
// on an AVX-512 CPU without VNNI run Avx2I8, for instance). (HFormat::Bf16 is asked for only when
// the down projection runs Bf16Dot or Amx: the CPU has bf16.)
inline void store_gate_up(const CpuFeatures& f, const float* tile, int mr, int nr, int b0, uint8_t* h,
                          size_t h_row_bytes, HFormat fmt) {
#if EXPERTD_GEMM_X86
  if (f.kernel_avx512) {
    if (fmt == HFormat::Bf16) return store_gate_up_bf16(tile, mr, nr, b0, h, h_row_bytes);
    return store_gate_up_avx512(tile, mr, nr, b0, h, h_row_bytes, fmt);
  }
  if (f.kernel_avx2) return store_gate_up_avx2(tile, mr, nr, b0, h, h_row_bytes, fmt);
#endif
  (void)f;
  store_gate_up_scalar(tile, mr, nr, b0, h, h_row_bytes, fmt);
}

}  // namespace expertd::gemm

#if EXPERTD_GEMM_X86
#pragma GCC diagnostic pop
#endif
