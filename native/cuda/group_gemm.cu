// GroupGemm on tensor cores: one launch over every expert of a layer, bf16 operands, f32
// accumulate (mma.sync m16n8k16, ldmatrix, cp.async multi-stage pipeline; sm_80, runs on sm_90a).
// The gate/up pass fuses SiLU(gate)*up in registers; the down pass writes f32 (+bias, +=).
#include <algorithm>

#include "cuda_common.h"
#include "mma_sm80.cuh"

namespace expertd::cuda {
namespace {

struct KArgs {
  const uint16_t* x;                // [rows, k] bf16
  const int32_t* offsets;           // [E + 1] or nullptr (one group: single_weight, rows)
  const uint16_t* const* weights;   // [E] device pointers
  const uint16_t* single_weight;    // used when offsets == nullptr
  int num_experts;
  int rows;
  int n;  // output columns (gate_up: I)
  int k;
  void* out;
  const float* bias;
  int accumulate;
};

using namespace sm80;  // cp_async16, ldmatrix_x4, mma_bf16, silu (mma_sm80.cuh)

// CTA tile BM rows x BN weight rows, BK deep; warps WARPS_M x WARPS_N; STAGES-deep cp.async ring.
// gate_up: the BN weight rows of a CTA are BN/2 gate rows then the matching BN/2 up rows, and each
// warp's n-tiles pair gate tile j with up tile j so both accumulators sit in the same thread.
template <int BM, int BN, int BK, int WARPS_M, int WARPS_N, int STAGES, bool GATE_UP>
__global__ void __launch_bounds__(WARPS_M* WARPS_N * 32)
    group_gemm_kernel(const KArgs a) {
  constexpr int kThreads = WARPS_M * WARPS_N * 32;
  constexpr int WM = BM / WARPS_M;
  constexpr int WN = BN / WARPS_N;
  constexpr int MI = WM / 16;
  constexpr int NJ = WN / 8;
  constexpr int LDS = BK + 8;  // +16 bytes per row: ldmatrix rows land in distinct banks
  constexpr int CPR = BK / 8;  // 16-byte chunks per row
  static_assert(WM % 16 == 0 && WN % 16 == 0 && NJ % 2 == 0, "warp tile");
  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* sA = smem;                      // [STAGES][BM][LDS]
  uint16_t* sB = smem + STAGES * BM * LDS;  // [STAGES][BN][LDS]
  __shared__ int s_e, s_r0, s_r1;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
  const int tile = blockIdx.y;

  // Map this CTA's m-tile to (expert, row range): tiles are numbered expert by expert.
  if (a.offsets == nullptr) {
    if (tid == 0) {
      s_e = 0;
      s_r0 = tile * BM;
      s_r1 = a.rows;
    }
  } else if (warp == 0) {
    expert_row_tile(a.offsets, a.num_experts, tile, BM, lane, &s_e, &s_r0, &s_r1);
  }
  __syncthreads();
  const int e = s_e, r0 = s_r0, r1 = s_r1;
  if (e < 0 || r0 >= r1) return;
  const uint16_t* W = a.offsets == nullptr ? a.single_weight : a.weights[e];
  // NOTE: the contract of an empty table slot (the binding cannot check offsets, they live on
  // the device): an expert with rows but no weights is skipped, and its rows of this pass's output
  // (hScratch for gate/up, y for down) stay as they were. Rows past offsets[num_experts] belong to
  // no expert and are never touched. The device engine relies on both: LongCat-Flash's identity
  // experts sit after the real experts, beyond the table, and cudaCopyRowRange fills their rows.
  if (W == nullptr) return;

  const int col0 = blockIdx.x * (GATE_UP ? BN / 2 : BN);  // first output column of the CTA
  const int K = a.k;

  auto load_stage = [&](int stage, int kt) {
    const int k0 = kt * BK;
    uint16_t* A = sA + stage * BM * LDS;
    uint16_t* B = sB + stage * BN * LDS;
    for (int c = tid; c < BM * CPR; c += kThreads) {
      const int r = c / CPR, kc = (c % CPR) * 8;
      const int gr = r0 + r;
      const bool ok = gr < r1 && k0 + kc < K;
      cp_async16(A + r * LDS + kc, ok ? a.x + static_cast<size_t>(gr) * K + k0 + kc : a.x, ok);
    }
    for (int c = tid; c < BN * CPR; c += kThreads) {
      const int r = c / CPR, kc = (c % CPR) * 8;
      int wrow;
      bool ok;
      if (GATE_UP) {
        const int i = col0 + (r % (BN / 2));
        wrow = (r < BN / 2 ? 0 : a.n) + i;
        ok = i < a.n;
      } else {
        wrow = col0 + r;
        ok = wrow < a.n;
      }
      ok = ok && k0 + kc < K;
      cp_async16(B + r * LDS + kc, ok ? W + static_cast<size_t>(wrow) * K + k0 + kc : W, ok);
    }
  };

  // Weight-tile row of this warp's n-tile j.
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
    __syncthreads();  // tile kt visible to all; stage (kt-1) % STAGES free to refill
    const int nk = kt + STAGES - 1;
    if (nk < KT) load_stage(nk % STAGES, nk);
    cp_async_commit();

    const uint16_t* A = sA + (kt % STAGES) * BM * LDS;
    const uint16_t* B = sB + (kt % STAGES) * BN * LDS;
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
        ldmatrix_x4(r, B + (b_row(j) + (lane & 7)) * LDS + kk + ((lane >> 3) & 1) * 8);
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

  // Epilogue: c0,c1 at (row lane/4, cols 2*(lane%4)+{0,1}); c2,c3 eight rows below.
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
          const uint32_t packed = static_cast<uint32_t>(f32_to_bf16_bits(v0)) |
                                  (static_cast<uint32_t>(f32_to_bf16_bits(v1)) << 16);
          *reinterpret_cast<uint32_t*>(out + col) = packed;
        }
      } else {
        float* out = static_cast<float*>(a.out) + static_cast<size_t>(gr) * a.n;
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
          const int col = col0 + wn * WN + j * 8 + (lane & 3) * 2;
          if (col >= a.n) continue;
          float2 v = make_float2(acc[mi][j][2 * h], acc[mi][j][2 * h + 1]);
          if (a.bias) {
            v.x += a.bias[col];
            v.y += a.bias[col + 1];
          }
          if (a.accumulate) {
            const float2 old = *reinterpret_cast<const float2*>(out + col);
            v.x += old.x;
            v.y += old.y;
          }
          *reinterpret_cast<float2*>(out + col) = v;
        }
      }
    }
  }
}

template <int BM, int BN, int BK, int WARPS_M, int WARPS_N, int STAGES>
void launch(const KArgs& a, bool gate_up, Stream s) {
  constexpr int kSmem = STAGES * (BM + BN) * (BK + 8) * 2;
  static_assert(kSmem <= 48 * 1024, "no opt-in needed");
  const int cols_per_cta = gate_up ? BN / 2 : BN;
  const long long m_tiles = a.offsets ? (a.rows + BM - 1) / BM + std::min(a.num_experts, a.rows)
                                      : (a.rows + BM - 1) / BM;
  const long long n_tiles = (a.n + cols_per_cta - 1) / cols_per_cta;
  EXPERTD_CHECK(m_tiles <= 65535, ErrorCode::InvalidArg,
                "group_gemm: too many row tiles (" + std::to_string(m_tiles) + "); split the call");
  EXPERTD_CHECK(n_tiles <= 2147483647LL, ErrorCode::InvalidArg, "group_gemm: n too large");
  const dim3 grid(static_cast<unsigned>(n_tiles), static_cast<unsigned>(m_tiles));
  const dim3 block(WARPS_M * WARPS_N * 32);
  if (gate_up)
    group_gemm_kernel<BM, BN, BK, WARPS_M, WARPS_N, STAGES, true><<<grid, block, kSmem, s>>>(a);
  else
    group_gemm_kernel<BM, BN, BK, WARPS_M, WARPS_N, STAGES, false><<<grid, block, kSmem, s>>>(a);
  EXPERTD_CUDA_LAUNCH_CHECK();
}

// Below this many rows per expert (on average) the small tile wins: few rows, so the work is
// streaming weights, and 16-row tiles with 64-wide N split the weights over many more CTAs.
constexpr int kSmallTileRowsPerExpert = 16;

void run(const KArgs& a, bool gate_up, GemmTile tile, Stream s) {
  ensure_alive();
  EXPERTD_CHECK(a.k % 8 == 0 && a.n % 8 == 0, ErrorCode::InvalidArg,
                "group_gemm: k and n must be multiples of 8");
  EXPERTD_CHECK(reinterpret_cast<uintptr_t>(a.x) % 16 == 0, ErrorCode::InvalidArg,
                "group_gemm: x must be 16-byte aligned");
  EXPERTD_CHECK(!is_sm90_tile(tile), ErrorCode::InvalidArg,
                std::string("group_gemm: tile '") + gemm_tile_name(tile) + "' applies to group_gemm_ffn only");
  if (a.rows <= 0 || a.n <= 0) return;
  if (tile == GemmTile::Auto)
    tile = a.rows <= kSmallTileRowsPerExpert * std::max(1, a.num_experts) ? GemmTile::Small
                                                                          : GemmTile::Large;
  s = or_default(s);
  if (tile == GemmTile::Small)
    launch<16, 64, 64, 1, 4, 4>(a, gate_up, s);
  else
    launch<64, 128, 32, 2, 2, 3>(a, gate_up, s);
}

}  // namespace

void group_gemm(const GroupGemmParams& p, Stream s) {
  KArgs a{p.x, p.offsets, p.weights, nullptr, p.num_experts, p.rows, p.n, p.k, p.out, p.bias,
          p.accumulate ? 1 : 0};
  EXPERTD_CHECK(p.offsets != nullptr, ErrorCode::InvalidArg,
                "group_gemm: offsets are required (dense_gemm takes a single weight)");
  EXPERTD_CHECK(!p.gate_up || (p.bias == nullptr && !p.accumulate), ErrorCode::InvalidArg,
                "group_gemm: bias/accumulate apply to the plain pass only");
  run(a, p.gate_up, p.tile, s);
}

void group_gemm_ffn(const uint16_t* x, const int32_t* offsets, const uint16_t* const* gate_up,
                    const uint16_t* const* down, int num_experts, int rows, int hidden, int inter,
                    uint16_t* h_scratch, float* y, GemmTile tile, Stream s,
                    const void* expert_maps) {
  if (sm90_group_gemm_ffn(x, offsets, gate_up, down, num_experts, rows, hidden, inter, h_scratch,
                          y, tile, expert_maps, s))
    return;
  KArgs g{x, offsets, gate_up, nullptr, num_experts, rows, inter, hidden, h_scratch, nullptr, 0};
  run(g, true, tile, s);
  KArgs d{h_scratch, offsets, down, nullptr, num_experts, rows, hidden, inter, y, nullptr, 0};
  run(d, false, tile, s);
}

// The in-house dense fallback (dense_gemm.cc picks it when cuBLASLt is absent or declined).
void dense_gemm_kernel(const uint16_t* x, int m, const uint16_t* w, int n, int k, float* y,
                       const float* bias, bool accumulate, Stream s) {
  KArgs a{x, nullptr, nullptr, w, 1, m, n, k, y, bias, accumulate ? 1 : 0};
  run(a, false, m <= kSmallTileRowsPerExpert ? GemmTile::Small : GemmTile::Large, s);
}

}  // namespace expertd::cuda
