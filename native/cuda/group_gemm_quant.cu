// GroupGemm over quantized experts (int8 per row, int4 groups, fp8 e4m3 block-scaled, MXFP4) for
// sm_80+: the codes stream into shared memory by cp.async (their own bytes, no more), each CTA
// dequantises its weight tile in registers to bf16 and runs the bf16 mma.sync path of
// group_gemm.cu (ldmatrix, m16n8k16, f32 accumulate, SiLU*mul fused in the gate/up pass).
// FP8 tables with 128-wide blocks also have an FP8-activation path for sm_89+ (DeepSeek-V3's recipe,
// as DeepGEMM): x and h quantized per (row, 128 k) to e4m3 with an f32 scale, mma.sync e4m3 x e4m3
// -> f32 over each 128-k block, then acc += block sum x (x scale x weight scale).
#include <cuda_fp8.h>

#include <algorithm>
#include <cstdlib>

#include "cuda_common.h"
#include "mma_sm80.cuh"
#include "expertd/cuda_quant.h"

namespace expertd::cuda {
namespace {

struct QArgs {
  const uint16_t* x;               // [rows, k] bf16
  const int32_t* offsets;          // [E + 1]
  const uint8_t* const* weights;   // [E] device pointers to one matrix each (cuda_quant.h layout)
  int num_experts;
  int rows;
  int n;  // output columns (gate_up: I; the matrix has 2n rows)
  int k;
  void* out;
  int group;            // I4 group, F8 block columns, FP4 32
  int block_rows;       // F8 block rows
  int scale_cols;       // scales per scale row
  int gate_scale_rows;  // F8 gate_up: first scale row of the up half
  size_t scale_offset;  // bytes from the matrix start to its scales
  int half;             // gate_up matrices: the first weight row of the up half (I); 0 otherwise
  size_t zero_offset;   // bytes from the matrix start to its zero points (I8 / I4); 0: none
  // The plain GEMM (dense_gemm_quant): one matrix for every row (offsets and weights unused), and
  // its epilogue (acc + bias[col]) + old y, each an f32 add (dense_gemm's order).
  const uint8_t* dense_w;
  const float* bias;
  bool accumulate;
};

using namespace sm80;  // cp_async16, ldmatrix_x4, mma_bf16, silu (mma_sm80.cuh)

// e4m3fn bits -> f32, exact (0x7f / 0xff NaN; subnormals m x 2^-9).
__device__ __forceinline__ float e4m3_to_f32(uint32_t b) {
  const uint32_t sign = (b & 0x80u) << 24, e = (b >> 3) & 0xfu, m = b & 7u;
  if (e == 0xfu && m == 7u) return __uint_as_float(0x7fc00000u | sign);
  if (e == 0) return __uint_as_float(sign | __float_as_uint(static_cast<float>(m) * 0.001953125f));
  return __uint_as_float(sign | ((e + 120u) << 23) | (m << 20));
}
// e2m1 nibble -> f32 (0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives).
__device__ __forceinline__ float e2m1_to_f32(uint32_t nib) {
  const uint32_t e = (nib >> 1) & 3u, m = nib & 1u;
  const float mag = e == 0 ? 0.5f * static_cast<float>(m)
                           : __uint_as_float(((e + 126u) << 23) | (m << 22));
  return (nib & 8u) ? -mag : mag;
}
// e8m0 -> 2^(s - 127); 255 is NaN.
__device__ __forceinline__ float e8m0_to_f32(uint32_t s) {
  if (s == 255u) return __uint_as_float(0x7fc00000u);
  return s == 0 ? __uint_as_float(0x00400000u) : __uint_as_float(s << 23);
}

// The scale of element (wrow, c) of the matrix at W.
template <QFormat Q>
__device__ __forceinline__ float scale_at(const QArgs& a, const uint8_t* W, int wrow, int c) {
  const uint8_t* s = W + a.scale_offset;
  if (Q == QFormat::I8) return reinterpret_cast<const float*>(s)[wrow];
  if (Q == QFormat::I4)
    return reinterpret_cast<const float*>(s)[static_cast<size_t>(wrow) * a.scale_cols + c / a.group];
  if (Q == QFormat::F8) {
    // NOTE: a gate_up matrix has two scale grids (gate's, then up's), in the fused pass (n = I)
    // and in the plain one (n = 2I) alike.
    const int srow = a.half > 0 && wrow >= a.half ? a.gate_scale_rows + (wrow - a.half) / a.block_rows
                                                  : wrow / a.block_rows;
    return reinterpret_cast<const float*>(s)[static_cast<size_t>(srow) * a.scale_cols + c / a.group];
  }
  return e8m0_to_f32(s[static_cast<size_t>(wrow) * a.scale_cols + c / 32]);
}

// The zero point of element (wrow, c) as f32 (laid out as the I8 / I4 scales), 0 without zero points:
// code - 0 is the code, so a symmetric matrix dequantises to the same bits.
template <QFormat Q>
__device__ __forceinline__ float zero_at(const QArgs& a, const uint8_t* W, int wrow, int c) {
  if ((Q != QFormat::I8 && Q != QFormat::I4) || a.zero_offset == 0) return 0.0f;
  const int8_t* z = reinterpret_cast<const int8_t*>(W + a.zero_offset);
  return static_cast<float>(Q == QFormat::I8 ? z[wrow] : z[static_cast<size_t>(wrow) * a.scale_cols + c / a.group]);
}

// One code's value before its scale: a byte (I8 int8, F8 e4m3fn) or a nibble (I4 two's complement,
// FP4 e2m1).
template <QFormat Q>
__device__ __forceinline__ float code_value(uint32_t c) {
  if (Q == QFormat::I8) return static_cast<float>(static_cast<int8_t>(c));
  if (Q == QFormat::F8) return e4m3_to_f32(c);
  if (Q == QFormat::I4) return static_cast<float>(static_cast<int>(c << 28) >> 28);
  return e2m1_to_f32(c);
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  return static_cast<uint32_t>(f32_to_bf16_bits(lo)) |
         (static_cast<uint32_t>(f32_to_bf16_bits(hi)) << 16);
}

// Eight codes starting at raw (8 bytes for 8-bit formats, 4 for 4-bit) -> eight bf16 values
// bf16(f32(code - zero) * scale) (zero: 0 but for int weights with zero points; code - zero is an
// exact small integer), packed in pairs.
template <QFormat Q>
__device__ __forceinline__ uint4 dequant8(const uint8_t* raw, float sc, float zf) {
  float v[8];
  if (Q == QFormat::I8 || Q == QFormat::F8) {
    const uint2 w = *reinterpret_cast<const uint2*>(raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      v[i] = __fmul_rn(__fsub_rn(code_value<Q>(((i < 4 ? w.x : w.y) >> (8 * (i & 3))) & 0xffu), zf), sc);
    }
  } else {
    const uint32_t w = *reinterpret_cast<const uint32_t*>(raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      v[i] = __fmul_rn(__fsub_rn(code_value<Q>((w >> (4 * i)) & 0xfu), zf), sc);
    }
  }
  return make_uint4(pack_bf16(v[0], v[1]), pack_bf16(v[2], v[3]), pack_bf16(v[4], v[5]),
                    pack_bf16(v[6], v[7]));
}

// This CTA's rows (blockIdx.y: a tile of bm rows): of one expert (expert_row_tile), or of the one
// matrix of the plain GEMM (dense_w). Written to shared memory; every thread returns after the sync.
__device__ __forceinline__ void tile_rows(const QArgs& a, int bm, int tid, int lane, int* e, int* r0, int* r1) {
  if (a.dense_w != nullptr) {
    if (tid == 0) {
      *e = 0;
      *r0 = blockIdx.y * bm;
      *r1 = min(a.rows, *r0 + bm);
    }
  } else if (tid < 32) {
    expert_row_tile(a.offsets, a.num_experts, blockIdx.y, bm, lane, e, r0, r1);
  }
  __syncthreads();
}

// CTA tile BM rows x BN weight rows, BK deep; warps WARPS_M x WARPS_N; a STAGES-deep cp.async ring
// of x tiles and raw code tiles, and one bf16 weight tile that the CTA dequantises each k step.
// gate_up: the BN weight rows of a CTA are BN/2 gate rows then the matching BN/2 up rows.
template <QFormat Q, int BM, int BN, int BK, int WARPS_M, int WARPS_N, int STAGES, bool GATE_UP>
__global__ void __launch_bounds__(WARPS_M* WARPS_N * 32)
    group_gemm_quant_kernel(const QArgs a) {
  constexpr int kThreads = WARPS_M * WARPS_N * 32;
  constexpr int kBits = Q == QFormat::I4 || Q == QFormat::FP4 ? 4 : 8;
  constexpr int WM = BM / WARPS_M;
  constexpr int WN = BN / WARPS_N;
  constexpr int MI = WM / 16;
  constexpr int NJ = WN / 8;
  constexpr int LDS = BK + 8;           // bf16 row stride: ldmatrix rows land in distinct banks
  constexpr int CPR = BK / 8;           // 16-byte x chunks per row
  constexpr int RAWB = BK * kBits / 8;  // code bytes per weight row and k step
  constexpr int RCPR = RAWB / 16;       // 16-byte code chunks per row
  constexpr int KPC = 128 / kBits;      // k values per code chunk
  static_assert(WM % 16 == 0 && WN % 16 == 0 && NJ % 2 == 0, "warp tile");
  static_assert(RAWB % 16 == 0, "code chunks");
  extern __shared__ __align__(16) uint8_t smem_q[];
  uint16_t* sA = reinterpret_cast<uint16_t*>(smem_q);  // [STAGES][BM][LDS] bf16
  uint16_t* sB = sA + STAGES * BM * LDS;               // [BN][LDS] bf16 (dequantised)
  uint8_t* sR = reinterpret_cast<uint8_t*>(sB + BN * LDS);  // [STAGES][BN][RAWB] codes
  __shared__ int s_e, s_r0, s_r1;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
  tile_rows(a, BM, tid, lane, &s_e, &s_r0, &s_r1);
  const int e = s_e, r0 = s_r0, r1 = s_r1;
  if (e < 0 || r0 >= r1) return;
  const uint8_t* W = a.dense_w != nullptr ? a.dense_w : a.weights[e];
  // NOTE: the contract of an empty table slot, as group_gemm.cu: an expert with rows but no
  // weights is skipped (its rows of h_scratch / y stay as they were).
  if (W == nullptr) return;

  const int col0 = blockIdx.x * (GATE_UP ? BN / 2 : BN);
  const int K = a.k;
  const size_t row_bytes = static_cast<size_t>(K) * kBits / 8;

  // Weight row of tile row r (and whether it exists).
  auto w_row = [&](int r, bool* ok) {
    if (GATE_UP) {
      const int i = col0 + (r % (BN / 2));
      *ok = i < a.n;
      return (r < BN / 2 ? 0 : a.n) + i;
    }
    *ok = col0 + r < a.n;
    return col0 + r;
  };

  auto load_stage = [&](int stage, int kt) {
    const int k0 = kt * BK;
    uint16_t* A = sA + stage * BM * LDS;
    for (int c = tid; c < BM * CPR; c += kThreads) {
      const int r = c / CPR, kc = (c % CPR) * 8;
      const int gr = r0 + r;
      const bool ok = gr < r1 && k0 + kc < K;
      cp_async16(A + r * LDS + kc, ok ? a.x + static_cast<size_t>(gr) * K + k0 + kc : a.x, ok);
    }
    uint8_t* R = sR + stage * BN * RAWB;
    for (int c = tid; c < BN * RCPR; c += kThreads) {
      const int r = c / RCPR, ch = c % RCPR;
      bool ok;
      const int wrow = w_row(r, &ok);
      // NOTE: K is a multiple of KPC (quant_layout_error), so a chunk is all in or all out.
      ok = ok && k0 + ch * KPC < K;
      const uint8_t* src = W + static_cast<size_t>(wrow) * row_bytes + (k0 + ch * KPC) * kBits / 8;
      cp_async16(R + r * RAWB + ch * 16, ok ? src : W, ok);
    }
  };

  // Codes of stage `stage` (k step kt) -> sB, eight values per thread and pass.
  auto dequant_stage = [&](int stage, int kt) {
    const int k0 = kt * BK;
    const uint8_t* R = sR + stage * BN * RAWB;
    for (int u = tid; u < BN * (BK / 8); u += kThreads) {
      const int r = u / (BK / 8), c8 = (u % (BK / 8)) * 8;
      bool ok;
      const int wrow = w_row(r, &ok);
      uint4 v = make_uint4(0, 0, 0, 0);
      if (ok && k0 + c8 < K)
        v = dequant8<Q>(R + r * RAWB + c8 * kBits / 8, scale_at<Q>(a, W, wrow, k0 + c8), zero_at<Q>(a, W, wrow, k0 + c8));
      *reinterpret_cast<uint4*>(sB + r * LDS + c8) = v;
    }
  };

  auto b_row = [&](int j) {
    if (GATE_UP)
      return j < NJ / 2 ? wn * (WN / 2) + j * 8 : BN / 2 + wn * (WN / 2) + (j - NJ / 2) * 8;
    return wn * WN + j * 8;
  };

  float acc[MI][NJ][4];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int j = 0; j < NJ; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[mi][j][c] = 0.0f;

  const int KT = (K + BK - 1) / BK;
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < KT) load_stage(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<STAGES - 2>();
    // Stage kt visible to all; every warp is done with the previous sB and stage (kt-1) % STAGES.
    __syncthreads();
    const int nk = kt + STAGES - 1;
    if (nk < KT) load_stage(nk % STAGES, nk);
    cp_async_commit();
    dequant_stage(kt % STAGES, kt);
    __syncthreads();

    const uint16_t* A = sA + (kt % STAGES) * BM * LDS;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t af[MI][4];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
        ldmatrix_x4(af[mi], A + (wm * WM + mi * 16 + (lane & 15)) * LDS + kk + (lane >> 4) * 8);
      uint32_t bf[NJ][2];
#pragma unroll
      for (int jp = 0; jp < NJ; jp += 2) {
        uint32_t r[4];
        const int j = jp + (lane >> 4);
        ldmatrix_x4(r, sB + (b_row(j) + (lane & 7)) * LDS + kk + ((lane >> 3) & 1) * 8);
        bf[jp][0] = r[0];
        bf[jp][1] = r[1];
        bf[jp + 1][0] = r[2];
        bf[jp + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int j = 0; j < NJ; ++j) mma_bf16(acc[mi][j], af[mi], bf[j][0], bf[j][1]);
    }
  }
  cp_async_wait<0>();

  // Epilogue (group_gemm.cu's): c0,c1 at (row lane/4, cols 2*(lane%4)+{0,1}); c2,c3 eight rows below.
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int gr = r0 + wm * WM + mi * 16 + (lane >> 2) + h * 8;
      if (gr >= r1) continue;
      if (GATE_UP) {
        uint16_t* out = static_cast<uint16_t*>(a.out) + static_cast<size_t>(gr) * a.n;
#pragma unroll
        for (int j = 0; j < NJ / 2; ++j) {
          const int col = col0 + wn * (WN / 2) + j * 8 + (lane & 3) * 2;
          if (col >= a.n) continue;
          const float v0 = silu(acc[mi][j][2 * h]) * acc[mi][j + NJ / 2][2 * h];
          const float v1 = silu(acc[mi][j][2 * h + 1]) * acc[mi][j + NJ / 2][2 * h + 1];
          *reinterpret_cast<uint32_t*>(out + col) = pack_bf16(v0, v1);
        }
      } else {
        float* out = static_cast<float*>(a.out) + static_cast<size_t>(gr) * a.n;
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
          const int col = col0 + wn * WN + j * 8 + (lane & 3) * 2;
          if (col >= a.n) continue;
          float v0 = acc[mi][j][2 * h], v1 = acc[mi][j][2 * h + 1];
          if (a.bias != nullptr) {
            v0 = __fadd_rn(v0, a.bias[col]);
            v1 = __fadd_rn(v1, a.bias[col + 1]);
          }
          if (a.accumulate) {
            const float2 o = *reinterpret_cast<const float2*>(out + col);
            v0 = __fadd_rn(v0, o.x);
            v1 = __fadd_rn(v1, o.y);
          }
          *reinterpret_cast<float2*>(out + col) = make_float2(v0, v1);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------ FP8 activations (sm_89+)
// x [rows, k] bf16 -> codes [rows, k] e4m3 and scales [rows, ceil(k / 128)] f32: per (row, 128-k
// group) s = amax / 448, code = e4m3(x / s) (round to nearest even, saturating; 0 where s is 0).
// One warp per (row, group): rows on grid.x (prefill rows can pass grid.y's 65535), four values per
// lane (k % 16 == 0: a lane's four are all in or out).
__global__ void quantize_act_e4m3_kernel(const uint16_t* __restrict__ x, int k, uint8_t* __restrict__ codes,
                                         float* __restrict__ scales) {
  const int row = blockIdx.x, kb = blockIdx.y, lane = threadIdx.x;
  const int c = kb * 128 + lane * 4;
  const size_t at = static_cast<size_t>(row) * k + c;
  float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (c < k) {
    const uint2 w = *reinterpret_cast<const uint2*>(x + at);
    v[0] = bf16_bits_to_f32(static_cast<uint16_t>(w.x & 0xffffu));
    v[1] = bf16_bits_to_f32(static_cast<uint16_t>(w.x >> 16));
    v[2] = bf16_bits_to_f32(static_cast<uint16_t>(w.y & 0xffffu));
    v[3] = bf16_bits_to_f32(static_cast<uint16_t>(w.y >> 16));
  }
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; ++i) amax = fmaxf(amax, fabsf(v[i]));
  amax = warp_max(amax);
  const float sc = __fdiv_rn(amax, 448.0f);
  if (lane == 0) scales[static_cast<size_t>(row) * ((k + 127) / 128) + kb] = sc;
  if (c >= k) return;
  uint32_t packed = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t b = sc > 0.0f ? static_cast<uint32_t>(__nv_cvt_float_to_fp8(__fdiv_rn(v[i], sc), __NV_SATFINITE, __NV_E4M3))
                                 : 0u;
    packed |= b << (8 * i);
  }
  *reinterpret_cast<uint32_t*>(codes + at) = packed;
}

__device__ __forceinline__ void mma_e4m3(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();  // never launched: fp8_act_available() requires sm_89 code on an sm_89+ device
#endif
}

struct F8Args {
  const uint8_t* xq;       // [rows, k] e4m3
  const float* xs;         // [rows, ceil(k / 128)]
  const int32_t* offsets;  // [E + 1]
  const uint8_t* const* weights;
  int num_experts;
  int rows;
  int n;
  int k;
  void* out;
  int block_rows;
  int scale_cols;
  int gate_scale_rows;
  size_t scale_offset;
};

// CTA tile BM x BN, one 128-k block (128 bytes of codes per row) per k step; a STAGES-deep cp.async
// ring of both operands (ldmatrix reads 8-bit tiles as b16 pairs: the m16n8k32 fragments).
template <int BM, int BN, int WARPS_M, int WARPS_N, int STAGES, bool GATE_UP>
__global__ void __launch_bounds__(WARPS_M* WARPS_N * 32)
    group_gemm_fp8_act_kernel(const F8Args a) {
  constexpr int kThreads = WARPS_M * WARPS_N * 32;
  constexpr int BK = 128;
  constexpr int WM = BM / WARPS_M;
  constexpr int WN = BN / WARPS_N;
  constexpr int MI = WM / 16;
  constexpr int NJ = WN / 8;
  constexpr int LDB = BK + 16;  // bytes per smem row: ldmatrix rows land in distinct banks
  constexpr int CPR = BK / 16;
  static_assert(WM % 16 == 0 && WN % 16 == 0 && NJ % 2 == 0, "warp tile");
  extern __shared__ __align__(16) uint8_t smem_f8[];
  uint8_t* sA = smem_f8;                      // [STAGES][BM][LDB]
  uint8_t* sB = smem_f8 + STAGES * BM * LDB;  // [STAGES][BN][LDB]
  __shared__ int s_e, s_r0, s_r1;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
  if (warp == 0) expert_row_tile(a.offsets, a.num_experts, blockIdx.y, BM, lane, &s_e, &s_r0, &s_r1);
  __syncthreads();
  const int e = s_e, r0 = s_r0, r1 = s_r1;
  if (e < 0 || r0 >= r1) return;
  const uint8_t* W = a.weights[e];
  if (W == nullptr) return;  // an empty slot: rows kept (group_gemm.cu's contract)
  const int col0 = blockIdx.x * (GATE_UP ? BN / 2 : BN);
  const int K = a.k, KB = (K + BK - 1) / BK;
  const float* wscale = reinterpret_cast<const float*>(W + a.scale_offset);

  auto w_row = [&](int r, bool* ok) {
    if (GATE_UP) {
      const int i = col0 + (r % (BN / 2));
      *ok = i < a.n;
      return (r < BN / 2 ? 0 : a.n) + i;
    }
    *ok = col0 + r < a.n;
    return col0 + r;
  };
  auto load_stage = [&](int stage, int kt) {
    const int k0 = kt * BK;
    uint8_t* A = sA + stage * BM * LDB;
    uint8_t* B = sB + stage * BN * LDB;
    for (int c = tid; c < BM * CPR; c += kThreads) {
      const int r = c / CPR, kc = (c % CPR) * 16;
      const int gr = r0 + r;
      const bool ok = gr < r1 && k0 + kc < K;
      cp_async16(A + r * LDB + kc, ok ? a.xq + static_cast<size_t>(gr) * K + k0 + kc : a.xq, ok);
    }
    for (int c = tid; c < BN * CPR; c += kThreads) {
      const int r = c / CPR, kc = (c % CPR) * 16;
      bool ok;
      const int wrow = w_row(r, &ok);
      ok = ok && k0 + kc < K;
      cp_async16(B + r * LDB + kc, ok ? W + static_cast<size_t>(wrow) * K + k0 + kc : W, ok);
    }
  };
  auto b_row = [&](int j) {
    if (GATE_UP)
      return j < NJ / 2 ? wn * (WN / 2) + j * 8 : BN / 2 + wn * (WN / 2) + (j - NJ / 2) * 8;
    return wn * WN + j * 8;
  };
  // The weight scale row of this thread's column `col` of n-tile j (gate_up: gate or up half).
  auto w_srow = [&](int j, int col) {
    if (GATE_UP && j >= NJ / 2) return a.gate_scale_rows + col / a.block_rows;
    return col / a.block_rows;
  };

  float acc[MI][NJ][4];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int j = 0; j < NJ; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[mi][j][c] = 0.0f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < KB) load_stage(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < KB; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    const int nk = kt + STAGES - 1;
    if (nk < KB) load_stage(nk % STAGES, nk);
    cp_async_commit();

    const uint8_t* A = sA + (kt % STAGES) * BM * LDB;
    const uint8_t* B = sB + (kt % STAGES) * BN * LDB;
    float part[MI][NJ][4];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int j = 0; j < NJ; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) part[mi][j][c] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 32) {
      uint32_t af[MI][4];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
        ldmatrix_x4(af[mi], A + (wm * WM + mi * 16 + (lane & 15)) * LDB + kk + (lane >> 4) * 16);
      uint32_t bf[NJ][2];
#pragma unroll
      for (int jp = 0; jp < NJ; jp += 2) {
        uint32_t r[4];
        const int j = jp + (lane >> 4);
        ldmatrix_x4(r, B + (b_row(j) + (lane & 7)) * LDB + kk + ((lane >> 3) & 1) * 16);
        bf[jp][0] = r[0];
        bf[jp][1] = r[1];
        bf[jp + 1][0] = r[2];
        bf[jp + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int j = 0; j < NJ; ++j) mma_e4m3(part[mi][j], af[mi], bf[j][0], bf[j][1]);
    }
    // Promotion: acc += part x (x scale x weight scale), each an f32 rounding (no FMA).
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int gr = r0 + wm * WM + mi * 16 + (lane >> 2) + h * 8;
        const float sx = gr < r1 ? a.xs[static_cast<size_t>(gr) * KB + kt] : 0.0f;
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int col = GATE_UP ? col0 + wn * (WN / 2) + (j % (NJ / 2)) * 8 + (lane & 3) * 2 + c
                                    : col0 + wn * WN + j * 8 + (lane & 3) * 2 + c;
            if (col >= a.n) continue;
            const float sw = wscale[static_cast<size_t>(w_srow(j, col)) * a.scale_cols + kt];
            acc[mi][j][2 * h + c] = __fadd_rn(acc[mi][j][2 * h + c], __fmul_rn(part[mi][j][2 * h + c], __fmul_rn(sx, sw)));
          }
        }
      }
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int gr = r0 + wm * WM + mi * 16 + (lane >> 2) + h * 8;
      if (gr >= r1) continue;
      if (GATE_UP) {
        uint16_t* out = static_cast<uint16_t*>(a.out) + static_cast<size_t>(gr) * a.n;
#pragma unroll
        for (int j = 0; j < NJ / 2; ++j) {
          const int col = col0 + wn * (WN / 2) + j * 8 + (lane & 3) * 2;
          if (col >= a.n) continue;
          const float v0 = silu(acc[mi][j][2 * h]) * acc[mi][j + NJ / 2][2 * h];
          const float v1 = silu(acc[mi][j][2 * h + 1]) * acc[mi][j + NJ / 2][2 * h + 1];
          *reinterpret_cast<uint32_t*>(out + col) = pack_bf16(v0, v1);
        }
      } else {
        float* out = static_cast<float*>(a.out) + static_cast<size_t>(gr) * a.n;
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
          const int col = col0 + wn * WN + j * 8 + (lane & 3) * 2;
          if (col >= a.n) continue;
          *reinterpret_cast<float2*>(out + col) = make_float2(acc[mi][j][2 * h], acc[mi][j][2 * h + 1]);
        }
      }
    }
  }
}

template <int BM, int BN, int WARPS_M, int WARPS_N, int STAGES>
void launch_fp8(const F8Args& a, bool gate_up, Stream s) {
  constexpr int kSmem = STAGES * (BM + BN) * (128 + 16);
  static_assert(kSmem <= 48 * 1024, "no opt-in needed");
  const int cols_per_cta = gate_up ? BN / 2 : BN;
  const long long m_tiles = (a.rows + BM - 1) / BM + std::min(a.num_experts, a.rows);
  const long long n_tiles = (a.n + cols_per_cta - 1) / cols_per_cta;
  EXPERTD_CHECK(m_tiles <= 65535, ErrorCode::InvalidArg,
                "group_gemm_quant: too many row tiles (" + std::to_string(m_tiles) + "); split the call");
  const dim3 grid(static_cast<unsigned>(n_tiles), static_cast<unsigned>(m_tiles));
  const dim3 block(WARPS_M * WARPS_N * 32);
  if (gate_up)
    group_gemm_fp8_act_kernel<BM, BN, WARPS_M, WARPS_N, STAGES, true><<<grid, block, kSmem, s>>>(a);
  else
    group_gemm_fp8_act_kernel<BM, BN, WARPS_M, WARPS_N, STAGES, false><<<grid, block, kSmem, s>>>(a);
  EXPERTD_CUDA_LAUNCH_CHECK();
}

// ---- The decode kernel (GEMV): a few rows per expert, no shared-memory weight tile ----------
// Each warp streams the codes of kGemvWeightRows weight rows (gate_up: kGemvWeightRows / 2 gate rows
// and the matching up rows) with 16-byte loads, lane l taking the chunks l, l + 32, ... along k,
// dequantises them in registers to bf16(f32(code) x scale) (the tile kernels' values) and multiplies
// them in f32 with x (bf16, kGemvKc values of each of the tile's rows staged in shared memory at a
// time); a warp reduction at the end. A tile is up to kGemvRows rows of one expert (expert_row_tile),
// so only the experts with rows get CTAs. Opt-in (EXPERTD_QGEMV=1) until it has run on a GPU.
constexpr int kGemvRows = 4;
constexpr int kGemvWarps = 4;
constexpr int kGemvWeightRows = 4;
constexpr int kGemvKc = 2048;

__device__ __forceinline__ float bf16_round(float v) { return bf16_bits_to_f32(f32_to_bf16_bits(v)); }

// Values 8s..8s+7 of a 16-byte code chunk, as bf16(f32(code - zf) x sc) (zf: dequant8's zero).
template <QFormat Q>
__device__ __forceinline__ void gemv_dequant8(const uint4& c, int s, float sc, float zf, float (&w)[8]) {
  const uint32_t words[4] = {c.x, c.y, c.z, c.w};
  constexpr bool kByte = Q == QFormat::I8 || Q == QFormat::F8;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const uint32_t c = kByte ? (words[2 * s + (i >> 2)] >> (8 * (i & 3))) & 0xffu : (words[s] >> (4 * i)) & 0xfu;
    w[i] = bf16_round(__fmul_rn(__fsub_rn(code_value<Q>(c), zf), sc));
  }
}

// The warp's dot products over the tile's NR rows (NR <= kGemvRows), k in [0, K).
template <QFormat Q, int NR>
__device__ __forceinline__ void gemv_warp(const QArgs& a, const uint8_t* W, const int (&wrow)[kGemvWeightRows],
                                          const bool (&ok)[kGemvWeightRows], const uint16_t* sx, int k0, int kc,
                                          int lane, float (&acc)[kGemvWeightRows][kGemvRows]) {
  constexpr int kBits = Q == QFormat::I4 || Q == QFormat::FP4 ? 4 : 8;
  constexpr int KPC = 128 / kBits;  // k values per 16-byte code chunk
  const size_t row_bytes = static_cast<size_t>(a.k) * kBits / 8;
  for (int ch = lane; ch * KPC < kc; ch += 32) {
    const int kl = ch * KPC;  // k within the staged chunk
    uint4 code[kGemvWeightRows];
    float sc[kGemvWeightRows], zf[kGemvWeightRows];
#pragma unroll
    for (int j = 0; j < kGemvWeightRows; ++j) {
      code[j] = make_uint4(0, 0, 0, 0);
      sc[j] = 0.0f;
      zf[j] = 0.0f;
      if (ok[j]) {
        code[j] = __ldg(reinterpret_cast<const uint4*>(W + static_cast<size_t>(wrow[j]) * row_bytes + (k0 + kl) * kBits / 8));
        sc[j] = scale_at<Q>(a, W, wrow[j], k0 + kl);
        zf[j] = zero_at<Q>(a, W, wrow[j], k0 + kl);
      }
    }
#pragma unroll
    for (int s8 = 0; s8 < KPC / 8; ++s8) {
      float xv[NR][8];
#pragma unroll
      for (int r = 0; r < NR; ++r) {
        const uint4 xr = *reinterpret_cast<const uint4*>(sx + r * kGemvKc + kl + 8 * s8);
        const uint32_t xw[4] = {xr.x, xr.y, xr.z, xr.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          xv[r][2 * i] = __uint_as_float(xw[i] << 16);
          xv[r][2 * i + 1] = __uint_as_float(xw[i] & 0xffff0000u);
        }
      }
#pragma unroll
      for (int j = 0; j < kGemvWeightRows; ++j) {
        float w[8];
        gemv_dequant8<Q>(code[j], s8, sc[j], zf[j], w);
#pragma unroll
        for (int r = 0; r < NR; ++r)
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[j][r] = fmaf(w[i], xv[r][i], acc[j][r]);
      }
    }
  }
}

template <QFormat Q, bool GATE_UP>
__global__ void __launch_bounds__(kGemvWarps * 32) group_gemm_quant_gemv_kernel(const QArgs a) {
  __shared__ __align__(16) uint16_t sx[kGemvRows * kGemvKc];
  __shared__ int s_e, s_r0, s_r1;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  tile_rows(a, kGemvRows, tid, lane, &s_e, &s_r0, &s_r1);
  const int e = s_e, r0 = s_r0;
  if (e < 0 || r0 >= s_r1) return;
  const int nr = min(kGemvRows, s_r1 - r0);
  const uint8_t* W = a.dense_w != nullptr ? a.dense_w : a.weights[e];
  if (W == nullptr) return;  // an empty table slot: its rows of h / y stay as they were

  // This warp's weight rows: gate_up, columns c0, c0 + 1 (gate rows c, up rows n + c); else columns
  // c0 .. c0 + 3.
  constexpr int CW = GATE_UP ? kGemvWeightRows / 2 : kGemvWeightRows;
  const int c0 = (blockIdx.x * kGemvWarps + warp) * CW;
  int wrow[kGemvWeightRows];
  bool ok[kGemvWeightRows];
#pragma unroll
  for (int j = 0; j < kGemvWeightRows; ++j) {
    const int c = c0 + (GATE_UP ? j % CW : j);
    ok[j] = c < a.n;
    wrow[j] = GATE_UP && j >= CW ? a.n + c : c;
  }
  float acc[kGemvWeightRows][kGemvRows];
#pragma unroll
  for (int j = 0; j < kGemvWeightRows; ++j)
#pragma unroll
    for (int r = 0; r < kGemvRows; ++r) acc[j][r] = 0.0f;

  for (int k0 = 0; k0 < a.k; k0 += kGemvKc) {
    const int kc = min(kGemvKc, a.k - k0);
    __syncthreads();  // every warp is done with the previous chunk of x
    // Rows past nr as zeros (nr == 3 runs the 4-row code; their sums are never written).
    for (int u = tid; u < (nr == 3 ? kGemvRows : nr) * (kc / 8); u += kGemvWarps * 32) {
      const int r = u / (kc / 8), c8 = (u % (kc / 8)) * 8;
      *reinterpret_cast<uint4*>(sx + r * kGemvKc + c8) =
          r < nr ? __ldg(reinterpret_cast<const uint4*>(a.x + static_cast<size_t>(r0 + r) * a.k + k0 + c8))
                 : make_uint4(0, 0, 0, 0);
    }
    __syncthreads();
    if (c0 >= a.n) continue;
    if (nr == 1) gemv_warp<Q, 1>(a, W, wrow, ok, sx, k0, kc, lane, acc);
    else if (nr == 2) gemv_warp<Q, 2>(a, W, wrow, ok, sx, k0, kc, lane, acc);
    else gemv_warp<Q, kGemvRows>(a, W, wrow, ok, sx, k0, kc, lane, acc);
  }
  if (c0 >= a.n) return;
#pragma unroll
  for (int j = 0; j < kGemvWeightRows; ++j)
#pragma unroll
    for (int r = 0; r < kGemvRows; ++r)
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) acc[j][r] += __shfl_xor_sync(0xffffffffu, acc[j][r], off);
  // Lane (r * CW + j) writes row r's column c0 + j.
#pragma unroll
  for (int r = 0; r < kGemvRows; ++r) {
#pragma unroll
    for (int j = 0; j < CW; ++j) {
      if (lane != r * CW + j || r >= nr || !ok[j]) continue;
      const int gr = r0 + r, col = c0 + j;
      if (GATE_UP) {
        static_cast<uint16_t*>(a.out)[static_cast<size_t>(gr) * a.n + col] =
            f32_to_bf16_bits(silu(acc[j][r]) * acc[GATE_UP ? j + CW : j][r]);
      } else {
        float* out = static_cast<float*>(a.out) + static_cast<size_t>(gr) * a.n + col;
        float v = acc[j][r];
        if (a.bias != nullptr) v = __fadd_rn(v, a.bias[col]);
        if (a.accumulate) v = __fadd_rn(v, *out);
        *out = v;
      }
    }
  }
}

// Whether the decode kernel takes this call: opted in (EXPERTD_QGEMV=1; read per call) and few rows
// per expert on average.
constexpr int kGemvRowsPerExpert = 2;
bool gemv_wanted(int rows, int num_experts) {
  const char* env = std::getenv("EXPERTD_QGEMV");
  return env != nullptr && env[0] == '1' && rows <= kGemvRowsPerExpert * std::max(1, num_experts);
}

template <QFormat Q>
void launch_gemv(const QArgs& a, bool gate_up, Stream s) {
  const int cols_per_cta = kGemvWarps * (gate_up ? kGemvWeightRows / 2 : kGemvWeightRows);
  const long long m_tiles = (a.rows + kGemvRows - 1) / kGemvRows + (a.dense_w ? 0 : std::min(a.num_experts, a.rows));
  const long long n_tiles = (a.n + cols_per_cta - 1) / cols_per_cta;
  EXPERTD_CHECK(m_tiles <= 65535, ErrorCode::InvalidArg,
                "group_gemm_quant: too many row tiles (" + std::to_string(m_tiles) + "); split the call");
  const dim3 grid(static_cast<unsigned>(n_tiles), static_cast<unsigned>(m_tiles));
  if (gate_up)
    group_gemm_quant_gemv_kernel<Q, true><<<grid, kGemvWarps * 32, 0, s>>>(a);
  else
    group_gemm_quant_gemv_kernel<Q, false><<<grid, kGemvWarps * 32, 0, s>>>(a);
  EXPERTD_CUDA_LAUNCH_CHECK();
}

template <QFormat Q, int BM, int BN, int BK, int WARPS_M, int WARPS_N, int STAGES>
void launch(const QArgs& a, bool gate_up, Stream s) {
  constexpr int kBits = Q == QFormat::I4 || Q == QFormat::FP4 ? 4 : 8;
  constexpr int kSmem = STAGES * BM * (BK + 8) * 2 + BN * (BK + 8) * 2 + STAGES * BN * BK * kBits / 8;
  static_assert(kSmem <= 48 * 1024, "no opt-in needed");
  const int cols_per_cta = gate_up ? BN / 2 : BN;
  const long long m_tiles = (a.rows + BM - 1) / BM + (a.dense_w ? 0 : std::min(a.num_experts, a.rows));
  const long long n_tiles = (a.n + cols_per_cta - 1) / cols_per_cta;
  EXPERTD_CHECK(m_tiles <= 65535, ErrorCode::InvalidArg,
                "group_gemm_quant: too many row tiles (" + std::to_string(m_tiles) + "); split the call");
  const dim3 grid(static_cast<unsigned>(n_tiles), static_cast<unsigned>(m_tiles));
  const dim3 block(WARPS_M * WARPS_N * 32);
  if (gate_up)
    group_gemm_quant_kernel<Q, BM, BN, BK, WARPS_M, WARPS_N, STAGES, true><<<grid, block, kSmem, s>>>(a);
  else
    group_gemm_quant_kernel<Q, BM, BN, BK, WARPS_M, WARPS_N, STAGES, false><<<grid, block, kSmem, s>>>(a);
  EXPERTD_CUDA_LAUNCH_CHECK();
}

// group_gemm.cu's crossover: below this many rows per expert the decode tile streams the weights
// over more CTAs.
constexpr int kSmallTileRowsPerExpert = 16;

template <QFormat Q>
void run_format(const QArgs& a, bool gate_up, bool small, Stream s) {
  if (small && gemv_wanted(a.rows, a.dense_w ? 1 : a.num_experts))
    launch_gemv<Q>(a, gate_up, s);
  else if (small)
    launch<Q, 16, 64, 64, 1, 4, 4>(a, gate_up, s);
  else
    launch<Q, 64, 128, 32, 2, 2, 3>(a, gate_up, s);
}

void run(QFormat q, const QArgs& a, bool gate_up, bool small, Stream s) {
  if (a.rows <= 0 || a.n <= 0) return;
  switch (q) {
    case QFormat::I8: return run_format<QFormat::I8>(a, gate_up, small, s);
    case QFormat::I4: return run_format<QFormat::I4>(a, gate_up, small, s);
    case QFormat::F8: return run_format<QFormat::F8>(a, gate_up, small, s);
    case QFormat::FP4: return run_format<QFormat::FP4>(a, gate_up, small, s);
    default: fail(ErrorCode::InvalidArg, "group_gemm_quant: no quantization format");
  }
}

// rows_n: the matrix's rows (gate_up: 2I); n: the pass's output columns (the fused gate_up pass: I).
QArgs args_for(const QuantLayout& l, const uint16_t* x, const int32_t* offsets,
               const uint8_t* const* w, int e, int rows, int rows_n, int n, int k, bool gate_up,
               void* out) {
  const QuantMatrixBytes b = quant_matrix_bytes(l, rows_n, k, gate_up);
  return QArgs{x, offsets, w, e, rows, n, k, out, l.q == QFormat::FP4 ? 32 : l.group,
               std::max(1, l.block_rows), b.scale_cols, b.gate_scale_rows, b.scale_offset,
               gate_up ? rows_n / 2 : 0, b.zero_offset, nullptr, nullptr, false};
}

// Whether the FP8-activation kernels can run on the current device: sm_89+ and this build holding
// their code for it (an sm_80 PTX JIT has no e4m3 mma). Cached per device.
bool fp8_act_available() {
  static int cached[64];  // 0 unknown, 1 yes, 2 no
  const int dev = current_device();
  int& c = cached[dev & 63];
  if (c == 0) {
    const DeviceInfo di = device_info(dev);
    cudaFuncAttributes attr{};
    const bool ok = di.cc_major * 10 + di.cc_minor >= 89 &&
                    cudaFuncGetAttributes(&attr, group_gemm_fp8_act_kernel<16, 64, 1, 4, 3, false>) == cudaSuccess &&
                    attr.binaryVersion >= 89;
    cudaGetLastError();
    c = ok ? 1 : 2;
  }
  return c == 1;
}

}  // namespace

bool group_gemm_fp8_act_available() { return fp8_act_available(); }

void group_gemm_quant_ffn(const uint16_t* x, const int32_t* offsets, const uint8_t* const* gate_up,
                          const uint8_t* const* down, int num_experts, int rows, int hidden,
                          int inter, const QuantLayout& layout, uint16_t* h_scratch, float* y,
                          GemmTile tile, Stream s, Fp8Path path) {
  ensure_alive();
  const std::string why = quant_layout_error(layout, hidden, inter);
  EXPERTD_CHECK(why.empty(), ErrorCode::InvalidArg, "group_gemm_quant: " + why);
  EXPERTD_CHECK(!is_sm90_tile(tile), ErrorCode::InvalidArg,
                std::string("group_gemm: tile '") + gemm_tile_name(tile) +
                    "' runs bf16 experts only; this table holds " + qformat_name(layout.q) + " experts");
  EXPERTD_CHECK(reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(h_scratch) % 16 == 0,
                ErrorCode::InvalidArg, "group_gemm_quant: x and h_scratch must be 16-byte aligned");
  const bool fp8_table = layout.q == QFormat::F8 && layout.group == 128;
  if (path == Fp8Path::Act) {
    EXPERTD_CHECK(fp8_table, ErrorCode::InvalidArg,
                  std::string("group_gemm_quant: FP8 activations need an fp8 table with 128-column blocks; this one is ") +
                      qformat_name(layout.q) + " with groups of " + std::to_string(layout.group));
    EXPERTD_CHECK(fp8_act_available(), ErrorCode::InvalidArg,
                  "group_gemm_quant: FP8 activations need an sm_89+ device and its code in this build");
  }
  if (rows <= 0) return;
  const bool small = tile == GemmTile::Small ||
                     (tile == GemmTile::Auto && rows <= kSmallTileRowsPerExpert * std::max(1, num_experts));
  s = or_default(s);
  const char* env = std::getenv("EXPERTD_FP8_ACT");
  const bool act = path == Fp8Path::Act ||
                   (path == Fp8Path::Auto && fp8_table && env && env[0] == '1' && fp8_act_available());
  if (act) {
    // Activation codes and scales in the caching allocator, freed in stream order.
    const int kmax = std::max(hidden, inter), kbmax = (kmax + 127) / 128;
    auto q = device_alloc(static_cast<size_t>(rows) * kmax, s);
    auto sc = device_alloc(static_cast<size_t>(rows) * kbmax * sizeof(float), s);
    auto* xq = static_cast<uint8_t*>(q->ptr);
    auto* xs = static_cast<float*>(sc->ptr);
    const auto pass = [&](const uint16_t* in, int k, int n, const uint8_t* const* w, bool gu, void* out) {
      quantize_act_e4m3_kernel<<<dim3(rows, (k + 127) / 128), 32, 0, s>>>(in, k, xq, xs);
      EXPERTD_CUDA_LAUNCH_CHECK();
      const QuantMatrixBytes b = quant_matrix_bytes(layout, gu ? 2 * n : n, k, gu);
      const F8Args a{xq, xs, offsets, w, num_experts, rows, n, k, out, layout.block_rows,
                     b.scale_cols, b.gate_scale_rows, b.scale_offset};
      if (small)
        launch_fp8<16, 64, 1, 4, 3>(a, gu, s);
      else
        launch_fp8<64, 64, 2, 2, 2>(a, gu, s);
    };
    pass(x, hidden, inter, gate_up, true, h_scratch);
    pass(h_scratch, inter, hidden, down, false, y);
    return;
  }
  run(layout.q, args_for(layout, x, offsets, gate_up, num_experts, rows, 2 * inter, inter, hidden, true, h_scratch),
      true, small, s);
  run(layout.q, args_for(layout, h_scratch, offsets, down, num_experts, rows, hidden, hidden, inter, false, y),
      false, small, s);
}

void group_gemm_quant_plain(const uint16_t* x, const int32_t* offsets, const uint8_t* const* weights,
                            int num_experts, int rows, int n, int k, bool gate_up,
                            const QuantLayout& layout, float* y, GemmTile tile, Stream s) {
  ensure_alive();
  const std::string why = quant_dense_error(layout, n, k);
  EXPERTD_CHECK(why.empty(), ErrorCode::InvalidArg, "group_gemm_quant: " + why);
  EXPERTD_CHECK(!is_sm90_tile(tile), ErrorCode::InvalidArg,
                std::string("group_gemm: tile '") + gemm_tile_name(tile) +
                    "' runs bf16 experts only; this table holds " + qformat_name(layout.q) + " experts");
  EXPERTD_CHECK(reinterpret_cast<uintptr_t>(x) % 16 == 0, ErrorCode::InvalidArg,
                "group_gemm_quant: x must be 16-byte aligned");
  if (rows <= 0) return;
  const bool small = tile == GemmTile::Small ||
                     (tile == GemmTile::Auto && rows <= kSmallTileRowsPerExpert * std::max(1, num_experts));
  run(layout.q, args_for(layout, x, offsets, weights, num_experts, rows, n, n, k, gate_up, y), false,
      small, or_default(s));
}

void dense_gemm_quant(const uint16_t* x, int m, const uint8_t* w, int n, int k,
                      const QuantLayout& layout, float* y, const float* bias, bool accumulate,
                      Stream s) {
  ensure_alive();
  const std::string why = quant_dense_error(layout, n, k);
  EXPERTD_CHECK(why.empty(), ErrorCode::InvalidArg, "dense_gemm_quant: " + why);
  EXPERTD_CHECK(reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0,
                ErrorCode::InvalidArg, "dense_gemm_quant: x and w must be 16-byte aligned");
  if (m <= 0) return;
  QArgs a = args_for(layout, x, nullptr, nullptr, 1, m, n, n, k, false, y);
  a.dense_w = w;
  a.bias = bias;
  a.accumulate = accumulate;
  run(layout.q, a, false, m <= kSmallTileRowsPerExpert, or_default(s));
}

}  // namespace expertd::cuda
