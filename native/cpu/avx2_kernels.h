// Internal to gemm_kernels.h: register tiles for CPUs with AVX2 + FMA but no AVX-512 (AMD Zen 2
// and 3, Intel client cores, many cloud instances), where the portable kernels would otherwise
// run scalar code.
//
// A 16-row weight block is two 8-float vectors (halves h = 0, 1: rows 8h..8h+7). The 16 ymm
// registers do not hold MR x 2 NR accumulators at MR = 6, so a tile runs in passes: each pass
// takes PV of its 2 NR vectors over the whole k range (x rows stay in L1 between passes), PV as
// large as the registers allow (all 8 at one row, so decode keeps 8 independent FMA chains).
//
// Numbers: Avx2Tile and Avx2QTile make per element the same FMAs in the same k order as
// Avx512Tile and Avx512QTile (fp8 decodes to value * 2^-8 and scales by scale * 2^8, both exact,
// so the product rounds once as decode * scale does); Avx2I8Tile makes the exact integer dot of
// each activation block and then VnniTile's one FMA per block. A weight's outputs on an AVX2
// machine are therefore the AVX-512 machine's outputs for the same path family.
#pragma once

#if EXPERTD_GEMM_X86

#define EXPERTD_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace expertd::gemm {

// The 8 scales qs.s[i, i + 8) as f32 (exact), whatever their type.
EXPERTD_AVX2 __attribute__((always_inline)) inline __m256 load_scales8(const QScales& qs, size_t i) {
  if (qs.st == ScaleType::F32) return _mm256_loadu_ps(qs.f32() + i);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(qs.s) + i));
  if (qs.st == ScaleType::BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

// The vectors per pass: the largest divisor of nv whose accumulators (mr each) and per-vector
// registers (per_vec each) fit the budget.
constexpr int avx2_pass_vectors(int mr, int nv, int per_vec, int budget) {
  for (int pv = nv; pv > 1; --pv)
    if (nv % pv == 0 && pv * (mr + per_vec) <= budget) return pv;
  return 1;
}

// How far ahead (bytes, into L2) the one-row bf16 and fp8 kernels ask for each block's weights,
// as their AVX-512 forms do (gemm_kernels.h, kBf16DotPrefetch); the int8/int4 one (a pass per
// block: one stream) twice as far, as VnniTile::few_rows. NOTE: measured with setSimdLevel('avx2')
// on AMD Zen 4 (DenseGemm 512 x 1024 from DRAM, 2 threads, 3 rounds): bf16 42-48 -> 39-44 us,
// fp8 32.6-42.3 -> 29.9-32.2 us, int8 26.5-32.8 -> 24.8-26.6 us, int4 g32 22.9-27.5 -> 17.3-23.8.
constexpr int kAvx2OneRowPrefetch = 2048;

// f32 activations against bf16, f16 or f32 weights.
template <DType WD>
struct Avx2Tile {
  template <int MR, int NR>
  EXPERTD_AVX2 static void run(const void* xv, size_t ldx, const void* wv, size_t wstride, int kp,
                               float* tile, QScales) {
    constexpr int NV = 2 * NR;
    constexpr int PV = avx2_pass_vectors(MR, NV, 0, 12);
#pragma GCC unroll 8
    for (int v0 = 0; v0 < NV; v0 += PV) pass<MR, PV>(static_cast<const float*>(xv), ldx, wv, wstride, kp, tile, v0);
  }

  template <int MR, int PV>
  EXPERTD_AVX2 __attribute__((always_inline)) static inline void pass(
      const float* x, size_t ldx, const void* wv, size_t wstride, int kp, float* tile, int v0) {
    __m256 acc[MR][PV];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < PV; ++v) acc[r][v] = _mm256_setzero_ps();
    if constexpr (WD == DType::BF16) {
      // [kp / 2][16][2]: a vector's 8 rows of a k pair are 32 contiguous bytes.
      const uint16_t* w = static_cast<const uint16_t*>(wv);
      const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
      for (int kk = 0; kk < kp / 2; ++kk) {
#pragma GCC unroll 8
        for (int v = 0; v < PV; ++v) {
          const int b = (v0 + v) >> 1, h = (v0 + v) & 1;
          const __m256i p = _mm256_load_si256(
              reinterpret_cast<const __m256i*>(w + b * wstride + static_cast<size_t>(kk) * 32 + 16 * h));
          if (MR == 1 && h == 0)  // one row: the block's stream ahead into L2 (kAvx2OneRowPrefetch)
            prefetch_l2<1>(reinterpret_cast<const uint8_t*>(w + b * wstride + static_cast<size_t>(kk) * 32) + kAvx2OneRowPrefetch);
          const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(p, 16));
          const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(p, hi));
#pragma GCC unroll 8
          for (int r = 0; r < MR; ++r) {
            const float* xr = x + r * ldx + 2 * kk;
            acc[r][v] = _mm256_fmadd_ps(_mm256_broadcast_ss(xr), we, acc[r][v]);
            acc[r][v] = _mm256_fmadd_ps(_mm256_broadcast_ss(xr + 1), wo, acc[r][v]);
          }
        }
      }
    } else {
      for (int k = 0; k < kp; ++k) {
#pragma GCC unroll 8
        for (int v = 0; v < PV; ++v) {
          const int b = (v0 + v) >> 1, h = (v0 + v) & 1;
          const size_t off = b * wstride + static_cast<size_t>(k) * 16 + 8 * h;
          __m256 wk;
          if constexpr (WD == DType::F16)
            wk = _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(wv) + off)));
          else
            wk = _mm256_load_ps(static_cast<const float*>(wv) + off);
#pragma GCC unroll 8
          for (int r = 0; r < MR; ++r)
            acc[r][v] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + r * ldx + k), wk, acc[r][v]);
        }
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < PV; ++v) _mm256_store_ps(tile + r * kTileLd + 8 * (v0 + v), acc[r][v]);
  }
};

// fp8 codes of 8 rows x a k pair, interleaved (row 0 k, row 0 k + 1, row 1 k, ...) in the F8
// layout's stored bit order c' = s e0 m2 m1 m0 e3 e2 e1, as f32 of their values times 2^-8: each
// code becomes the f16 s 0 e3 e2 e1 e0 m2 m1 m0 0000000 (the f16 bias 15 against e4m3's 7 makes
// it the value times 2^-8, subnormals and zero included, exactly), its high byte from two
// nibble-table pshufbs, and vcvtph2ps widens it. No fix-up pass for exponent-0 codes.
EXPERTD_AVX2 __attribute__((always_inline)) inline void f8_pair_f32(__m128i codes, __m256* w0, __m256* w1) {
  const __m128i c = _mm_shuffle_epi8(codes, _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
  const __m128i lo4 = _mm_set1_epi8(0x0f);
  // Low nibble m0 e3 e2 e1 -> e3 e2 e1 at bits 5..3; high nibble s e0 m2 m1 -> s at 7, e0 m2 m1 at 2..0.
  const __m128i t_lo = _mm_setr_epi8(0, 8, 16, 24, 32, 40, 48, 56, 0, 8, 16, 24, 32, 40, 48, 56);
  const __m128i t_hi = _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, static_cast<char>(0x80), static_cast<char>(0x81),
                                     static_cast<char>(0x82), static_cast<char>(0x83), static_cast<char>(0x84),
                                     static_cast<char>(0x85), static_cast<char>(0x86), static_cast<char>(0x87));
  const __m128i hi = _mm_or_si128(_mm_shuffle_epi8(t_lo, _mm_and_si128(c, lo4)),
                                  _mm_shuffle_epi8(t_hi, _mm_and_si128(_mm_srli_epi16(c, 4), lo4)));
  const __m128i lo = _mm_and_si128(_mm_slli_epi16(c, 4), _mm_set1_epi8(static_cast<char>(0x80)));  // m0 -> bit 7
  *w0 = _mm256_cvtph_ps(_mm_unpacklo_epi8(lo, hi));
  *w1 = _mm256_cvtph_ps(_mm_unpackhi_epi8(lo, hi));
}

// A whole 4-k chunk of vector half h (32 bytes: 128-bit lane L holds rows 8h + 4L..+3, their
// (k, k + 1) pairs, then their (k + 2, k + 3) pairs) as the four f32 vectors of k..k+3, f8_pair_f32's
// f16 values: one pshufb sorts each lane by k, the f16 bytes as there, vpermq joins the lanes' rows.
EXPERTD_AVX2 __attribute__((always_inline)) inline void f8_chunk_f32(const uint8_t* p, __m256* wq) {
  const __m256i sort = _mm256_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15,
                                        0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
  const __m256i c = _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), sort);
  const __m256i lo4 = _mm256_set1_epi8(0x0f);
  const __m256i t_lo = _mm256_setr_epi8(0, 8, 16, 24, 32, 40, 48, 56, 0, 8, 16, 24, 32, 40, 48, 56,
                                        0, 8, 16, 24, 32, 40, 48, 56, 0, 8, 16, 24, 32, 40, 48, 56);
  const char s0 = static_cast<char>(0x80), s1 = static_cast<char>(0x81), s2 = static_cast<char>(0x82),
             s3 = static_cast<char>(0x83), s4 = static_cast<char>(0x84), s5 = static_cast<char>(0x85),
             s6 = static_cast<char>(0x86), s7 = static_cast<char>(0x87);
  const __m256i t_hi = _mm256_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, s0, s1, s2, s3, s4, s5, s6, s7,
                                        0, 1, 2, 3, 4, 5, 6, 7, s0, s1, s2, s3, s4, s5, s6, s7);
  const __m256i hi = _mm256_or_si256(_mm256_shuffle_epi8(t_lo, _mm256_and_si256(c, lo4)),
                                     _mm256_shuffle_epi8(t_hi, _mm256_and_si256(_mm256_srli_epi16(c, 4), lo4)));
  const __m256i lo = _mm256_and_si256(_mm256_slli_epi16(c, 4), _mm256_set1_epi8(static_cast<char>(0x80)));
  // Per lane: words of k, k + 1 (4 rows each), then of k + 2, k + 3; vpermq puts lane 0's rows
  // before lane 1's.
  const __m256i a = _mm256_permute4x64_epi64(_mm256_unpacklo_epi8(lo, hi), _MM_SHUFFLE(3, 1, 2, 0));
  const __m256i b = _mm256_permute4x64_epi64(_mm256_unpackhi_epi8(lo, hi), _MM_SHUFFLE(3, 1, 2, 0));
  wq[0] = _mm256_cvtph_ps(_mm256_castsi256_si128(a));
  wq[1] = _mm256_cvtph_ps(_mm256_extracti128_si256(a, 1));
  wq[2] = _mm256_cvtph_ps(_mm256_castsi256_si128(b));
  wq[3] = _mm256_cvtph_ps(_mm256_extracti128_si256(b, 1));
}

// The codes of vector half h (rows 8h..8h+7) at columns k, k + 1 (k even) of a block, unscaled
// (F8: times 2^-8), as f32.
template <QFormat Q>
EXPERTD_AVX2 __attribute__((always_inline)) inline void decode_pair8(const uint8_t* blk, int k, int kp, int h,
                                                                     __m256* w0, __m256* w1,
                                                                     size_t cstride = kChunk8) {
  if constexpr (Q == QFormat::I8) {  // code + 128
    const int c0 = k / 4 * 4;
    if (c0 + 4 <= kp) {  // a whole chunk: row i's 4 bytes are int32 lane i, k % 4 is 0 or 2
      const __m256i v = _mm256_xor_si256(_mm256_load_si256(reinterpret_cast<const __m256i*>(blk + static_cast<size_t>(c0) * 16 + 32 * h)),
                                         _mm256_set1_epi8(static_cast<char>(0x80)));
      const int s = 24 - 8 * (k & 3);
      *w0 = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_sll_epi32(v, _mm_cvtsi32_si128(s)), 24));
      *w1 = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_sll_epi32(v, _mm_cvtsi32_si128(s - 8)), 24));
    } else {  // the tail: [k][16]
      const __m128i flip = _mm_set1_epi8(static_cast<char>(0x80));
      const uint8_t* p = blk + static_cast<size_t>(k) * 16 + 8 * h;
      *w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_xor_si128(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)), flip)));
      *w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_xor_si128(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 16)), flip)));
    }
  } else if constexpr (Q == QFormat::F8) {
    const int c0 = k / 4 * 4;
    __m128i codes;
    if (c0 + 4 <= kp) {  // a whole chunk: 128-bit lane L holds rows 4L..4L+3, pair j / 2 at byte 8 (j / 2)
      const uint8_t* p = blk + static_cast<size_t>(c0 / 4) * cstride + 32 * h + 8 * ((k & 3) >> 1);
      codes = _mm_unpacklo_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)),
                                 _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 16)));
    } else {  // the tail pair: byte 2 i + j
      codes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + static_cast<size_t>(c0 / 4) * cstride + 16 * h));
    }
    f8_pair_f32(codes, w0, w1);
  } else {
    const __m256i lo4 = _mm256_set1_epi32(0xf);
    __m256i n0, n1;
    const int c0 = k / 8 * 8;
    if (c0 + 8 <= kp) {  // a whole chunk: row i's 4 bytes are int32 lane i
      const int j = k & 7;
      const int shift = 8 * (j & 3) + ((j & 4) ? 4 : 0);
      const __m256i v = _mm256_load_si256(reinterpret_cast<const __m256i*>(blk + static_cast<size_t>(c0) * 8 + 32 * h));
      n0 = _mm256_and_si256(_mm256_srl_epi32(v, _mm_cvtsi32_si128(shift)), lo4);
      n1 = _mm256_and_si256(_mm256_srl_epi32(v, _mm_cvtsi32_si128(shift + 8)), lo4);
    } else {  // tail: byte j of column k holds rows j (low nibble) and j + 8 (high)
      const uint8_t* p = blk + static_cast<size_t>(k) * 8;
      const __m128i s = _mm_cvtsi32_si128(4 * h);
      n0 = _mm256_and_si256(_mm256_srl_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))), s), lo4);
      n1 = _mm256_and_si256(_mm256_srl_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8))), s), lo4);
    }
    if constexpr (Q == QFormat::I4) {
      const __m256i e = _mm256_set1_epi32(8);
      *w0 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_xor_si256(n0, e), e));
      *w1 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_xor_si256(n1, e), e));
    } else {  // e2m1: the magnitude from the 8 non-negative entries, bit 3 the sign
      const __m256 mag = _mm256_loadu_ps(fp4_e2m1_table());
      *w0 = _mm256_castsi256_ps(_mm256_or_si256(_mm256_castps_si256(_mm256_permutevar8x32_ps(mag, n0)),
                                                _mm256_slli_epi32(_mm256_srli_epi32(n0, 3), 31)));
      *w1 = _mm256_castsi256_ps(_mm256_or_si256(_mm256_castps_si256(_mm256_permutevar8x32_ps(mag, n1)),
                                                _mm256_slli_epi32(_mm256_srli_epi32(n1, 3), 31)));
    }
  }
}

// f32 activations against quantized weights: decode(code) * scale, then Avx2Tile's FMAs. Needs
// even scale groups (a k pair never straddles two).
template <QFormat Q>
struct Avx2QTile {
  template <int MR, int NR>
  EXPERTD_AVX2 static void run(const void* xv, size_t ldx, const void* wv, size_t wstride, int kp,
                               float* tile, QScales qs) {
    constexpr int NV = 2 * NR;
    constexpr int PV = avx2_pass_vectors(MR, NV, 1, 12);
#pragma GCC unroll 8
    for (int v0 = 0; v0 < NV; v0 += PV)
      pass<MR, PV>(static_cast<const float*>(xv), ldx, static_cast<const uint8_t*>(wv), wstride, kp, tile, qs, v0,
                   tile_cstride<Q>(NR));
  }

  // cs: the bytes between a block's 4-k chunks (F8: its interleaved group's, quant_layout.h).
  template <int MR, int PV>
  EXPERTD_AVX2 __attribute__((always_inline)) static inline void pass(
      const float* x, size_t ldx, const uint8_t* w, size_t wstride, int kp, float* tile, QScales qs, int v0,
      size_t cs) {
    const size_t bstride = wstride * qformat_bits(Q) / 8;
    const int wkp = static_cast<int>(wstride / 16);  // the layout's kp (kp here may stop short)
    __m256 acc[MR][PV];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < PV; ++v) acc[r][v] = _mm256_setzero_ps();
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int k0 = 0, gi = 0; k0 < kp; k0 += qs.group, ++gi) {
      __m256 sc[PV];
#pragma GCC unroll 8
      for (int v = 0; v < PV; ++v) {
        const int b = (v0 + v) >> 1, h = (v0 + v) & 1;
        sc[v] = load_scales8(qs, b * qs.sstride + static_cast<size_t>(gi) * 16 + 8 * h);
        if constexpr (Q == QFormat::F8)  // the sign of row 0's scale is a flag; the 2^-8 goes back out
          sc[v] = _mm256_mul_ps(_mm256_and_ps(sc[v], abs_mask), _mm256_set1_ps(0x1p8f));
      }
      const int k1 = std::min(kp, k0 + qs.group);
      int k = k0;
      if constexpr (Q == QFormat::F8) {
        // Whole 4-k chunks (groups are multiples of 4 where the layout has chunks): one load and
        // one decode for four k, the FMAs in the same k order as the pairs below.
        // NOTE (registers): the decode's five constants, PV accumulators and its temporaries fill
        // the 16 ymm; the scales are read from L1 each chunk (the barrier keeps them memory
        // operands), or the compiler spilled the accumulators (2.2x slower at one row).
        alignas(32) float scm[PV][8];
#pragma GCC unroll 8
        for (int v = 0; v < PV; ++v) _mm256_store_ps(scm[v], sc[v]);
        const int kc = k0 % 4 == 0 ? std::min(k1, wkp / 4 * 4) / 4 * 4 : k0;
        for (; k < kc; k += 4) {
          __asm__ volatile("" ::: "memory");
#pragma GCC unroll 8
          for (int v = 0; v < PV; ++v) {
            const int b = (v0 + v) >> 1, h = (v0 + v) & 1;
            __m256 wq[4];
            f8_chunk_f32(tile_block<Q>(w, bstride, b) + static_cast<size_t>(k / 4) * cs + 32 * h, wq);
#pragma GCC unroll 4
            for (int j = 0; j < 4; ++j) wq[j] = _mm256_mul_ps(wq[j], _mm256_load_ps(scm[v]));
#pragma GCC unroll 8
            for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
              for (int j = 0; j < 4; ++j)
                acc[r][v] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + r * ldx + k + j), wq[j], acc[r][v]);
          }
        }
      }
      for (; k < k1; k += 2) {
#pragma GCC unroll 8
        for (int v = 0; v < PV; ++v) {
          const int b = (v0 + v) >> 1, h = (v0 + v) & 1;
          __m256 w0, w1;
          decode_pair8<Q>(tile_block<Q>(w, bstride, b), k, wkp, h, &w0, &w1, cs);
          w0 = _mm256_mul_ps(w0, sc[v]);
          w1 = _mm256_mul_ps(w1, sc[v]);
#pragma GCC unroll 8
          for (int r = 0; r < MR; ++r) {
            acc[r][v] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + r * ldx + k), w0, acc[r][v]);
            acc[r][v] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + r * ldx + k + 1), w1, acc[r][v]);
          }
        }
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < PV; ++v) _mm256_store_ps(tile + r * kTileLd + 8 * (v0 + v), acc[r][v]);
  }
};

// Fast mode's fp8 (f32 activations already rounded to bf16): Bf16DotF8Tile's arithmetic without
// vdpbf16ps. A 4-k chunk's codes become the bf16 k pairs f8_pairs makes (each code's value times
// 2^8: shift, mask and the exponent bias, no f16 round trip), widened to f32 by a shift or a mask;
// per pair the odd k's product goes in first, then the even one's, as vdpbf16ps sums them (a bf16
// activation times an e4m3 value is exact in f32, so each FMA rounds once, where the dot product
// rounds), and per scale group one FMA puts the group's sum times |scale| * 2^-8 into the tile.
// The outputs are Bf16DotF8Tile's bits but where an f32 value is subnormal (vdpbf16ps flushes
// those). Exponent-0 codes (zero and the subnormals) decode wrong by the shift alone: where a
// group's row flags (quant_layout.h) say a vector's rows hold any, their words come from a table
// of +-m / 2.
// Reference mode keeps Avx2QTile (decode times scale, then the FMAs: the portable kernel's order).

// The exponent-0 fix-up of a chunk's 32 codes c (stored order): each code's correct word, its low
// and high bytes looked up by m per byte (before the unpack, so once for both word vectors), blended
// in where the code's exponent is 0.
EXPERTD_AVX2 __attribute__((always_inline)) inline void f8_fix_exp0(__m256i c, __m256i ra, __m256i rb, __m256i* wa, __m256i* wb) {
  // bf16 of m / 2 for m = 0..7: the low bytes, and the high bytes, at index m (both lanes).
  const __m256i tlo = _mm256_setr_epi8(0, 0, static_cast<char>(0x80), static_cast<char>(0xc0), 0, 0x20, 0x40, 0x60,
                                       0, 0, 0, 0, 0, 0, 0, 0,
                                       0, 0, static_cast<char>(0x80), static_cast<char>(0xc0), 0, 0x20, 0x40, 0x60,
                                       0, 0, 0, 0, 0, 0, 0, 0);
  const __m256i thi = _mm256_setr_epi8(0, 0x3f, 0x3f, 0x3f, 0x40, 0x40, 0x40, 0x40, 0, 0, 0, 0, 0, 0, 0, 0,
                                       0, 0x3f, 0x3f, 0x3f, 0x40, 0x40, 0x40, 0x40, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m256i m = _mm256_and_si256(_mm256_srli_epi16(c, 3), _mm256_set1_epi8(7));  // m2 m1 m0 per byte
  const __m256i lo = _mm256_shuffle_epi8(tlo, m);
  const __m256i hi = _mm256_or_si256(_mm256_shuffle_epi8(thi, m), _mm256_and_si256(c, _mm256_set1_epi8(static_cast<char>(0x80))));
  const __m256i e0 = _mm256_set1_epi16(0x4700), zero = _mm256_setzero_si256();
  *wa = _mm256_blendv_epi8(*wa, _mm256_unpacklo_epi8(lo, hi), _mm256_cmpeq_epi16(_mm256_and_si256(ra, e0), zero));
  *wb = _mm256_blendv_epi8(*wb, _mm256_unpackhi_epi8(lo, hi), _mm256_cmpeq_epi16(_mm256_and_si256(rb, e0), zero));
}

// Vector half h's 8 rows of a 4-k chunk (32 bytes of the F8 layout) as bf16 k pairs, row i's
// (k, k + 1) in dword i of *wa, its (k + 2, k + 3) in *wb (the low word the even k).
template <bool Fix>
EXPERTD_AVX2 __attribute__((always_inline)) inline void f8_words(const uint8_t* p, __m256i* wa, __m256i* wb) {
  const __m256i c = _mm256_load_si256(reinterpret_cast<const __m256i*>(p));
  // Word = c' << 8 | (c' << 1) & 0xff: the high byte s e0 m2 m1 m0 e3 e2 e1, the low e0 m2 m1 m0 ...;
  // & 0x87f0 leaves s, e3 e2 e1 e0 as the exponent's low bits and m2 m1 m0 as the mantissa's top,
  // | 0x4000 the bias: value * 2^8.
  const __m256i c1 = _mm256_slli_epi16(c, 1);
  const __m256i ra = _mm256_unpacklo_epi8(c1, c), rb = _mm256_unpackhi_epi8(c1, c);
  const __m256i keep = _mm256_set1_epi16(static_cast<short>(0x87f0)), bias = _mm256_set1_epi16(0x4000);
  *wa = _mm256_or_si256(_mm256_and_si256(ra, keep), bias);
  *wb = _mm256_or_si256(_mm256_and_si256(rb, keep), bias);
  if constexpr (Fix) {
    f8_fix_exp0(c, ra, rb, wa, wb);
  }
}

struct Avx2F8Tile {
  template <int MR, int NR>
  EXPERTD_AVX2 static void run(const void* xv, size_t ldx, const void* wv, size_t wstride, int kp,
                               float* tile, QScales qs) {
    constexpr int NV = 2 * NR;
    // Vectors per pass: as many as the registers hold beside the decode's constants, fewer where
    // the exponent-0 fix-up's constants need registers too. Passes run inside a scale group (each
    // group's sums start at zero), so every group picks its own.
    constexpr int PV = avx2_pass_vectors(MR, NV, 0, 11);
    constexpr int PF = avx2_pass_vectors(MR, PV, 0, 6);  // divides PV
    const float* x = static_cast<const float*>(xv);
    const uint8_t* w = static_cast<const uint8_t*>(wv);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) _mm256_store_ps(tile + r * kTileLd + 8 * v, _mm256_setzero_ps());
    for (int g0 = 0, gi = 0; g0 < kp; g0 += qs.group, ++gi) {
      const int g1 = std::min(kp, g0 + qs.group);
      // The halves whose rows hold an exponent-0 code in this group (a row's flag is its scale's sign).
      unsigned fix = 0;
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v)
        fix |= (_mm256_movemask_ps(_mm256_load_ps(qs.f32() + (v >> 1) * qs.sstride + static_cast<size_t>(gi) * 16 + 8 * (v & 1))) != 0 ? 1u : 0u) << v;
#pragma GCC unroll 8
      for (int v0 = 0; v0 < NV; v0 += PV) {
        if (!((fix >> v0) & ((1u << PV) - 1))) {
          pass<MR, PV, NR, false>(x, ldx, w, g0, g1, gi, tile, qs, v0, 0);
        } else {
#pragma GCC unroll 8
          for (int u0 = v0; u0 < v0 + PV; u0 += PF) pass<MR, PF, NR, true>(x, ldx, w, g0, g1, gi, tile, qs, u0, fix >> u0);
        }
      }
    }
  }

  // Group [g0, g1) of vectors v0..v0+PV-1 into the tile; Fix: the vectors whose bit in fix is set
  // (bit v for vector v0 + v) run the exponent-0 fix-up. w: the tile's NR blocks, one interleaved
  // group (quant_layout.h): chunk k / 4 of block b at 64 (NR k / 4 + b).
  template <int MR, int PV, int NR, bool Fix>
  EXPERTD_AVX2 __attribute__((always_inline)) static inline void pass(
      const float* x, size_t ldx, const uint8_t* w, int g0, int g1, int gi, float* tile,
      QScales qs, int v0, unsigned fix) {
    const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
    __m256 acc[MR][PV];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < PV; ++v) acc[r][v] = _mm256_setzero_ps();
    for (int k = g0; k < g1; k += 4) {
#pragma GCC unroll 8
      for (int v = 0; v < PV; ++v) {
        const int b = (v0 + v) >> 1, h = (v0 + v) & 1;
        const uint8_t* p = w + static_cast<size_t>(k) * 16 * NR + kChunk8 * b + 32 * h;
        if (MR == 1 && h == 0) prefetch_l2<1>(p + kAvx2OneRowPrefetch);  // as Avx2Tile
        __m256i wa, wb;
        if (Fix && ((fix >> v) & 1))
          f8_words<true>(p, &wa, &wb);
        else
          f8_words<false>(p, &wa, &wb);
        const __m256 w0 = _mm256_castsi256_ps(_mm256_slli_epi32(wa, 16));
        const __m256 w1 = _mm256_castsi256_ps(_mm256_and_si256(wa, hi));
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
          acc[r][v] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + r * ldx + k + 1), w1, acc[r][v]);
          acc[r][v] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + r * ldx + k), w0, acc[r][v]);
        }
        // NOTE: kp (the activations' even k) may end on a k pair inside the last chunk (see
        // Bf16DotF8Tile): its second pair is not read.
        if (__builtin_expect(k + 2 < g1, 1)) {
          const __m256 w2 = _mm256_castsi256_ps(_mm256_slli_epi32(wb, 16));
          const __m256 w3 = _mm256_castsi256_ps(_mm256_and_si256(wb, hi));
#pragma GCC unroll 8
          for (int r = 0; r < MR; ++r) {
            acc[r][v] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + r * ldx + k + 3), w3, acc[r][v]);
            acc[r][v] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + r * ldx + k + 2), w2, acc[r][v]);
          }
        }
      }
    }
    __asm__ volatile("" ::: "memory");  // reload the tile (see VnniTile)
#pragma GCC unroll 8
    for (int v = 0; v < PV; ++v) {
      const int b = (v0 + v) >> 1, h = (v0 + v) & 1;
      const __m256 sc = _mm256_mul_ps(
          _mm256_and_ps(_mm256_load_ps(qs.f32() + b * qs.sstride + static_cast<size_t>(gi) * 16 + 8 * h),
                        _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))),
          _mm256_set1_ps(0x1p-8f));
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        float* t = tile + r * kTileLd + 8 * (v0 + v);
        _mm256_store_ps(t, _mm256_fmadd_ps(acc[r][v], sc, _mm256_load_ps(t)));
      }
    }
  }
};

// Int8 and int4 weights against int8 activations: per activation block the exact integer dot,
// then one conversion and one FMA per accumulator into the tile (VnniTile's arithmetic). Without
// vpdpbusd: vpmaddubsw (unsigned x signed bytes, adjacent products summed in int16) and vpmaddwd
// by ones. The int16 sums must not saturate: int4 takes the codes + 8 (0..15) as the unsigned side
// (15 * 127 * 2 fits) and undoes the shift with the activation sums as VnniTile does; int8 takes
// |w| (at most 128) as the unsigned side and the activation with w's sign (vpsignb) as the signed
// one (128 * 127 * 2 = 32512 fits), so a -128 code is exact too.
template <QFormat Q>
struct Avx2I8Tile {
  template <int MR, int NR>
  EXPERTD_AVX2 static void run(const void* xv, size_t ldx, const void* wv, size_t wstride, int kp,
                               float* tile, QScales qs) {
    constexpr int NV = 2 * NR;
    // A pass per block at most (decode's one to a few rows per expert: the weights stream in one
    // sequential run, see VnniTile::few_rows); the integer sums and the FMAs per block are the
    // same whatever the pass: the same bits. NOTE: measured with setSimdLevel('avx2') on AMD Zen 4
    // (one thread, qwen3moe-like's decode GroupGemm, 2 rows per expert), two blocks per pass ->
    // one: int8 0.476-0.480 -> 0.313-0.329 ms, int4 g32 0.377-0.400 -> 0.212-0.218, g128
    // 0.340-0.348 -> 0.182-0.190 (bench/RESULTS.md, session 25).
    constexpr int PV = std::min(2, avx2_pass_vectors(MR, NV, 0, 11));
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) _mm256_store_ps(tile + r * kTileLd + 8 * v, _mm256_setzero_ps());
#pragma GCC unroll 8
    for (int v0 = 0; v0 < NV; v0 += PV)
      pass<MR, PV>(static_cast<const int8_t*>(xv), ldx, static_cast<const uint8_t*>(wv), wstride, kp, tile, qs, v0);
  }

  template <int MR, int PV>
  EXPERTD_AVX2 __attribute__((always_inline)) static inline void pass(
      const int8_t* x, size_t ldx, const uint8_t* w, size_t wstride, int kp, float* tile, QScales qs, int v0) {
    typedef int32_t __attribute__((may_alias, aligned(1))) u_i32;
    const size_t bstride = wstride * qformat_bits(Q) / 8;
    const int kb = qs.xblock;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int g0 = 0; g0 < kp; g0 += kb) {
      const int xb = g0 / kb;
      __m256i acc[MR][PV];
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        // 4-bit: the codes + 8 (MXFP4: + 12) make the dot; -8 (-12) * sum(x) (uint32, the
        // difference is exact) undoes it.
        const uint32_t comp = Q != QFormat::I8 ? static_cast<uint32_t>(qs.xsums[static_cast<size_t>(r) * qs.xblocks_ld + xb]) * operand_offset<Q>() : 0u;
        const __m256i c = _mm256_set1_epi32(static_cast<int32_t>(0u - comp));
#pragma GCC unroll 8
        for (int v = 0; v < PV; ++v) acc[r][v] = c;
      }
      if constexpr (Q != QFormat::I8) {
        // Chunks of 8 k: row i's 4 bytes are int32 lane i, k..k+3 in the low nibbles, k+4..k+7
        // in the high ones. The products of 32 k add up in int16 (8 vpmaddubsw results of at most
        // 2 * 15 * 127 each: 30480 fits; MXFP4's operands reach 24, so 16 k: 4 x 6096), then one
        // vpmaddwd widens them.
        constexpr int kSpan = Q == QFormat::FP4 ? 16 : 32;
        const __m256i optab = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(kFp4Operands.v)));
        for (int s0 = g0; s0 < g0 + kb; s0 += kSpan) {
          __m256i a16[MR][PV];
#pragma GCC unroll 8
          for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
            for (int v = 0; v < PV; ++v) a16[r][v] = _mm256_setzero_si256();
          for (int k = s0; k < std::min(s0 + kSpan, g0 + kb); k += 8) {
#pragma GCC unroll 8
            for (int v = 0; v < PV; ++v) {
              const int b = (v0 + v) >> 1, h = (v0 + v) & 1;
              const __m256i raw = _mm256_load_si256(reinterpret_cast<const __m256i*>(w + b * bstride + static_cast<size_t>(k) * 8 + 32 * h));
              if (PV == 2 && h == 0) prefetch_l2<1>(w + b * bstride + static_cast<size_t>(k) * 8 + 2 * kAvx2OneRowPrefetch);
              __m256i lo, hi;
              if constexpr (Q == QFormat::FP4) {  // each nibble's operand from the table
                lo = _mm256_shuffle_epi8(optab, _mm256_and_si256(raw, _mm256_set1_epi8(0x0f)));
                hi = _mm256_shuffle_epi8(optab, _mm256_and_si256(_mm256_srli_epi16(raw, 4), _mm256_set1_epi8(0x0f)));
              } else {
                const __m256i t = _mm256_xor_si256(raw, _mm256_set1_epi8(static_cast<char>(0x88)));  // codes + 8
                lo = _mm256_and_si256(t, _mm256_set1_epi8(0x0f));
                hi = _mm256_and_si256(_mm256_srli_epi16(t, 4), _mm256_set1_epi8(0x0f));
              }
#pragma GCC unroll 8
              for (int r = 0; r < MR; ++r) {
                const __m256i x0 = _mm256_set1_epi32(*reinterpret_cast<const u_i32*>(x + r * ldx + k));
                const __m256i x1 = _mm256_set1_epi32(*reinterpret_cast<const u_i32*>(x + r * ldx + k + 4));
                a16[r][v] = _mm256_add_epi16(a16[r][v], _mm256_maddubs_epi16(lo, x0));
                a16[r][v] = _mm256_add_epi16(a16[r][v], _mm256_maddubs_epi16(hi, x1));
              }
            }
          }
#pragma GCC unroll 8
          for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
            for (int v = 0; v < PV; ++v) acc[r][v] = _mm256_add_epi32(acc[r][v], _mm256_madd_epi16(a16[r][v], ones));
        }
      } else {
        for (int k = g0; k < g0 + kb; k += 4) {
#pragma GCC unroll 8
          for (int v = 0; v < PV; ++v) {
            const int b = (v0 + v) >> 1, h = (v0 + v) & 1;
            // The chunk's half h is rows 8h..8h+7 x 4 k, each row's k..k+3 one dword (code + 128:
            // the xor makes the signed codes).
            const __m256i wq = _mm256_xor_si256(
                _mm256_load_si256(reinterpret_cast<const __m256i*>(w + b * bstride + static_cast<size_t>(k) * 16 + 32 * h)),
                _mm256_set1_epi8(static_cast<char>(0x80)));
            if (PV == 2 && h == 0) prefetch_l2<1>(w + b * bstride + static_cast<size_t>(k) * 16 + 2 * kAvx2OneRowPrefetch);
            const __m256i wabs = _mm256_abs_epi8(wq);
#pragma GCC unroll 8
            for (int r = 0; r < MR; ++r) {
              const __m256i xv = _mm256_set1_epi32(*reinterpret_cast<const u_i32*>(x + r * ldx + k));
              const __m256i prod = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(xv, wq));
              acc[r][v] = _mm256_add_epi32(acc[r][v], _mm256_madd_epi16(prod, ones));
            }
          }
        }
      }
      __asm__ volatile("" ::: "memory");  // reload the tile (see VnniTile)
#pragma GCC unroll 8
      for (int v = 0; v < PV; ++v) {
        const int b = (v0 + v) >> 1, h = (v0 + v) & 1;
        const __m256 sc = load_scales8(qs, b * qs.sstride + static_cast<size_t>(g0 / qs.group) * 16 + 8 * h);
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
          const __m256 xs = _mm256_set1_ps(qs.xscales[static_cast<size_t>(r) * qs.xblocks_ld + xb]);
          float* t = tile + r * kTileLd + 8 * (v0 + v);
          _mm256_store_ps(t, _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][v]), _mm256_mul_ps(sc, xs), _mm256_load_ps(t)));
        }
      }
    }
  }
};

// quantize_row_i8_avx512 on AVX2 (the same numbers: vdivps rounds as the scalar division does,
// vcvtps2dq to nearest even; a NaN block scales to NaN with zero codes, an x / scale that is NaN
// codes 0 as in the scalar form). Blocks of a multiple of 8 columns.
EXPERTD_AVX2 inline void quantize_row_i8_avx2(const float* x, int k, int ld, int block, int8_t* codes,
                                              float* scales, int32_t* sums) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i lim = _mm256_set1_epi32(127), nlim = _mm256_set1_epi32(-127);
  for (int j = 0; j < ld / block; ++j) {
    const int c0 = j * block, c1 = std::min(k, c0 + block);
    __m256 vmax = _mm256_setzero_ps();
    int nan = 0, c = c0;
    for (; c + 8 <= c1; c += 8) {
      const __m256 a = _mm256_and_ps(_mm256_loadu_ps(x + c), abs_mask);
      nan |= _mm256_movemask_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q));
      vmax = _mm256_max_ps(vmax, a);
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    for (; c < c1; ++c) {
      const float a = std::fabs(x[c]);
      if (a != a) nan = 1;
      else if (a > amax) amax = a;
    }
    const float sc = nan ? std::nanf("") : amax / 127.0f;
    scales[j] = sc;
    const bool live = sc > 0.0f;
    const __m256 vs = _mm256_set1_ps(sc);
    __m256i vsum = _mm256_setzero_si256();
    for (c = c0; c < c0 + block; c += 8) {
      const int n = live ? std::max(0, std::min(8, c1 - c)) : 0;
      __m256 v;
      if (n == 8) {
        v = _mm256_loadu_ps(x + c);
      } else {
        alignas(32) float t[8] = {};
        for (int i = 0; i < n; ++i) t[i] = x[c + i];
        v = _mm256_load_ps(t);
      }
      const __m256 d = _mm256_div_ps(v, vs);
      __m256i q = _mm256_andnot_si256(_mm256_castps_si256(_mm256_cmp_ps(d, d, _CMP_UNORD_Q)), _mm256_cvtps_epi32(d));
      q = _mm256_max_epi32(_mm256_min_epi32(q, lim), nlim);
      vsum = _mm256_add_epi32(vsum, q);
      const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + c), _mm_packs_epi16(w, w));
    }
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(vsum), _mm256_extracti128_si256(vsum, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(1, 0, 3, 2)));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(2, 3, 0, 1)));
    sums[j] = _mm_cvtsi128_si32(s4);
  }
}

}  // namespace expertd::gemm

#endif
