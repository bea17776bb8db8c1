// Element types and scalar conversions (bf16/f16 <-> f32, fp8 e4m3). bf16 and f16 travel as uint16_t.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace expertd {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

inline size_t dtype_size(DType t) { return t == DType::F32 ? 4 : 2; }
inline const char* dtype_name(DType t) {
  return t == DType::F32 ? "f32" : t == DType::BF16 ? "bf16" : "f16";
}

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, NaN stays NaN (same as torch's float -> bfloat16).
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do { mant <<= 1; ++e; } while ((mant & 0x400u) == 0);
      u = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t absu = u & 0x7fffffffu;
  if (absu > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (absu >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> inf
  if (absu < 0x38800000u) {  // subnormal or zero in f16
    float af;
    std::memcpy(&af, &absu, 4);
    // scale so that the f16 subnormal unit (2^-24) becomes 1, round to nearest even
    float scaled = af * 16777216.0f;
    uint32_t r = static_cast<uint32_t>(scaled);
    float rem = scaled - static_cast<float>(r);
    if (rem > 0.5f || (rem == 0.5f && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t mant = absu & 0x7fffffu;
  uint32_t exp = (absu >> 23) - 127 + 15;
  uint32_t h = (exp << 10) | (mant >> 13);
  uint32_t rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

// OCP fp8 e4m3fn (no infinities, 0x7f/0xff are NaN), as in DeepSeek-V3 checkpoints.
inline float fp8_e4m3_to_f32(uint8_t v) {
  uint32_t sign = (v & 0x80u) << 24;
  uint32_t exp = (v >> 3) & 0xfu;
  uint32_t mant = v & 0x7u;
  if (exp == 0xf && mant == 0x7) {
    uint32_t nan = sign | 0x7fc00000u;
    float f;
    std::memcpy(&f, &nan, 4);
    return f;
  }
  float mag;
  if (exp == 0) {
    mag = static_cast<float>(mant) * (1.0f / 512.0f);  // 2^-6 * mant/8
  } else {
    uint32_t u = ((exp + 127 - 7) << 23) | (mant << 20);
    std::memcpy(&mag, &u, 4);
  }
  return sign ? -mag : mag;
}

// f32 -> e4m3fn, round to nearest even, saturating to +-448 (as torch's float8_e4m3fn cast of
// values already scaled into range); NaN -> 0x7f.
inline uint8_t f32_to_fp8_e4m3(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return 0x7f;
  if (a >= 0x43e00000u) return sign | 0x7e;  // >= 448 (and inf): the largest finite
  if (a < 0x3c800000u) {                       // below 2^-6: subnormal, units of 2^-9
    float af;
    std::memcpy(&af, &a, 4);
    const float scaled = af * 512.0f;  // exact (power of two)
    uint32_t m = static_cast<uint32_t>(scaled);
    const float rem = scaled - static_cast<float>(m);
    if (rem > 0.5f || (rem == 0.5f && (m & 1u))) ++m;  // m == 8 is the smallest normal, 0x08
    return static_cast<uint8_t>(sign | m);
  }
  a += 0x7ffffu + ((a >> 20) & 1u);  // round the mantissa to 3 bits
  const uint32_t e = (a >> 23) - 127 + 7;
  if (e > 15 || (e == 15 && ((a >> 20) & 7u) == 7u)) return sign | 0x7e;
  return static_cast<uint8_t>(sign | (e << 3) | ((a >> 20) & 7u));
}

}  // namespace expertd
