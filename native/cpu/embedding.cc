// Embedding gather and dtype conversions (f32/bf16/f16, and DeepSeek-V3's block-scaled fp8).
// Conversions round to nearest even and are bitwise equal between the AVX-512 and portable paths.
#include <algorithm>
#include <cstring>

#include "expertd/cpu_features.h"
#include "expertd/ops.h"
#include "parallel_rows.h"

#if defined(__x86_64__)
#include "x86_intrin.h"
#endif

namespace expertd {

namespace {

// ---- portable element loops
void to_f32_scalar(const void* src, DType dt, float* dst, size_t n) {
  if (dt == DType::F32) {
    std::memcpy(dst, src, n * sizeof(float));
  } else if (dt == DType::BF16) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (size_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (size_t i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
  }
}

void from_f32_scalar(const float* src, uint16_t* dst, DType dt, size_t n) {
  if (dt == DType::BF16) {
    for (size_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
  } else {
    for (size_t i = 0; i < n; ++i) dst[i] = f32_to_f16(src[i]);
  }
}

#if defined(__x86_64__)
// ---- AVX-512 (integer rounding for bf16, so NaN and denormals match f32_to_bf16 bit for bit;
// vcvtneps2bf16 would flush denormals).
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 bf16x16_to_f32(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m256i f32x16_to_bf16(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __m512i nan = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  const __mmask16 is_nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, is_nan, nan));
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m256i f32x16_to_f16(__m512 f) {
  __m256i h = _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // f32_to_f16 makes every NaN the canonical sign|0x7e00; vcvtps2ph keeps payload bits.
  const __mmask16 is_nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
  const __m256i sign = _mm256_and_si256(h, _mm256_set1_epi16(static_cast<int16_t>(0x8000)));
  const __m256i canon = _mm256_or_si256(sign, _mm256_set1_epi16(0x7e00));
  return _mm256_mask_mov_epi16(h, is_nan, canon);
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) void to_f32_avx512(const void* src, DType dt,
                                                                        float* dst, size_t n) {
  if (dt == DType::F32) {
    std::memcpy(dst, src, n * sizeof(float));
    return;
  }
  const uint16_t* s = static_cast<const uint16_t*>(src);
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i));
    _mm512_storeu_ps(dst + i, dt == DType::BF16 ? bf16x16_to_f32(h) : _mm512_cvtph_ps(h));
  }
  if (i < n) to_f32_scalar(s + i, dt, dst + i, n - i);
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) void from_f32_avx512(const float* src,
                                                                          uint16_t* dst, DType dt,
                                                                          size_t n) {
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 f = _mm512_loadu_ps(src + i);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        dt == DType::BF16 ? f32x16_to_bf16(f) : f32x16_to_f16(f));
  }
  if (i < n) from_f32_scalar(src + i, dst + i, dt, n - i);
}
#endif

void to_f32(const void* src, DType dt, float* dst, size_t n) {
#if defined(__x86_64__)
  if (cpu_features().kernel_avx512) return to_f32_avx512(src, dt, dst, n);
#endif
  to_f32_scalar(src, dt, dst, n);
}

void from_f32(const float* src, uint16_t* dst, DType dt, size_t n) {
#if defined(__x86_64__)
  if (cpu_features().kernel_avx512) return from_f32_avx512(src, dst, dt, n);
#endif
  from_f32_scalar(src, dst, dt, n);
}

// Load-time conversions run in chunks that fit L1/L2 (bf16 <-> f16 goes through f32 there).
constexpr size_t kConvertChunk = 4096;

}  // namespace

void embedding(const void* table, DType dtype, int vocab, int h, const int32_t* ids, int tokens,
               float* out) {
  const size_t hs = static_cast<size_t>(h);
  const size_t esz = dtype_size(dtype);
  parallel_rows(static_cast<size_t>(tokens), hs, [&](size_t t0, size_t t1) {
    for (size_t t = t0; t < t1; ++t)
      to_f32(static_cast<const uint8_t*>(table) + static_cast<size_t>(ids[t]) * hs * esz, dtype,
             out + t * hs, hs);
  });
}

void convert(const void* src, DType src_dtype, void* dst, DType dst_dtype, size_t n) {
  if (src_dtype == dst_dtype) {
    std::memcpy(dst, src, n * dtype_size(src_dtype));
    return;
  }
  const size_t chunks = (n + kConvertChunk - 1) / kConvertChunk;
  parallel_rows(chunks, kConvertChunk, [&](size_t c0, size_t c1) {
    float tmp[kConvertChunk];
    for (size_t c = c0; c < c1; ++c) {
      const size_t i0 = c * kConvertChunk;
      const size_t len = std::min(kConvertChunk, n - i0);
      if (dst_dtype == DType::F32) {
        to_f32(static_cast<const uint8_t*>(src) + i0 * dtype_size(src_dtype), src_dtype,
               static_cast<float*>(dst) + i0, len);
      } else if (src_dtype == DType::F32) {
        from_f32(static_cast<const float*>(src) + i0, static_cast<uint16_t*>(dst) + i0, dst_dtype,
                 len);
      } else {
        to_f32(static_cast<const uint16_t*>(src) + i0, src_dtype, tmp, len);
        from_f32(tmp, static_cast<uint16_t*>(dst) + i0, dst_dtype, len);
      }
    }
  });
}

void dequant_fp8_block(const uint8_t* src, const float* scale_inv, int rows, int cols,
                       int block_rows, int block_cols, uint16_t* dst) {
  static const auto lut = [] {
    struct Lut { float v[256]; } l;
    for (int i = 0; i < 256; ++i) l.v[i] = fp8_e4m3_to_f32(static_cast<uint8_t>(i));
    return l;
  }();
  const size_t cs = static_cast<size_t>(cols);
  const size_t scale_cols = (cs + block_cols - 1) / block_cols;
  // HF/DeepSeek weight_dequant: (fp8 -> f32) * scale in f32, then rounded to bf16.
  parallel_rows(static_cast<size_t>(rows), cs, [&](size_t r0, size_t r1) {
    float tmp[kConvertChunk];
    for (size_t r = r0; r < r1; ++r) {
      const float* srow = scale_inv + (r / block_rows) * scale_cols;
      const uint8_t* s = src + r * cs;
      uint16_t* d = dst + r * cs;
      for (size_t c0 = 0; c0 < cs; c0 += kConvertChunk) {
        const size_t len = std::min(kConvertChunk, cs - c0);
        // walk the chunk block by block so the scale index is not a division per element
        for (size_t c = 0; c < len;) {
          const size_t b = (c0 + c) / block_cols;
          const size_t end = std::min(len, (b + 1) * block_cols - c0);
          const float sc = srow[b];
          for (; c < end; ++c) tmp[c] = lut.v[s[c0 + c]] * sc;
        }
        from_f32(tmp, d + c0, DType::BF16, len);
      }
    }
  });
}

}  // namespace expertd
