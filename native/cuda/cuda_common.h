// Internal to the CUDA backend: the check macro, the device-lost flag, launch checks and small
// device helpers shared by the kernel files. Includes the CUDA runtime (unlike include/expertd).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "expertd/cuda_backend.h"
#include "expertd/errors.h"

namespace expertd::cuda {

// Throws expertd::Error (E_CUDA, or E_OOM for allocation failures) naming the statement, file and
// line; a sticky error marks the device lost first.
[[noreturn]] void raise_cuda(cudaError_t err, const char* stmt, const char* file, int line);
// Refuses work once the device is lost (a sticky error poisons the whole context).
void ensure_alive();
// Whether err leaves the context unusable.
bool is_sticky(cudaError_t err);

inline Stream or_default(Stream s) { return s ? s : default_stream(); }

// The in-house dense GEMM (group_gemm.cu), the fallback of dense_gemm: same contract.
void dense_gemm_kernel(const uint16_t* x, int m, const uint16_t* w, int n, int k, float* y,
                       const float* bias, bool accumulate, Stream s);

// The sm_90a FFN (group_gemm_sm90.cu): runs both passes and returns true when `tile` and the
// shape select it (Auto: maps given, prefill shape, self-check passed, running it first if due);
// false leaves the call to the mma.sync kernels. Sm90 forces it (E_INVALID_ARG when unavailable).
bool sm90_group_gemm_ffn(const uint16_t* x, const int32_t* offsets, const uint16_t* const* gate_up,
                         const uint16_t* const* down, int num_experts, int rows, int hidden,
                         int inter, uint16_t* h_scratch, float* y, GemmTile tile,
                         const void* expert_maps, Stream s);

}  // namespace expertd::cuda

#define EXPERTD_CUDA_CHECK(stmt)                                                     \
  do {                                                                               \
    cudaError_t expertd_err_ = (stmt);                                               \
    if (expertd_err_ != cudaSuccess)                                                 \
      ::expertd::cuda::raise_cuda(expertd_err_, #stmt, __FILE__, __LINE__);          \
  } while (0)

// After every kernel launch: configuration errors show at once, faults at the next sync.
#define EXPERTD_CUDA_LAUNCH_CHECK() EXPERTD_CUDA_CHECK(cudaGetLastError())

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace expertd::cuda {

__device__ __forceinline__ float bf16_bits_to_f32(uint16_t h) {
  return __uint_as_float(static_cast<uint32_t>(h) << 16);
}
// Round to nearest even, NaN kept (matches dtype.h's f32_to_bf16 bit for bit).
__device__ __forceinline__ uint16_t f32_to_bf16_bits(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// Inclusive prefix sum over the 32 lanes of a warp (lane l gets v[0] + ... + v[l]).
__device__ __forceinline__ int warp_inclusive_scan(int v, int lane) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int u = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += u;
  }
  return v;
}

// The grouped GEMMs' tile lookup, run by one warp: row tile `tile` of the expert-contiguous rows
// (BM rows per tile, tiles of each expert in expert order) -> expert *e (-1: past the last tile) and
// its rows [*r0, *r1). Lane 0 writes the results; the caller syncs before reading them.
__device__ __forceinline__ void expert_row_tile(const int32_t* offsets, int num_experts, int tile, int bm,
                                                int lane, int* e, int* r0, int* r1) {
  if (lane == 0) *e = -1;
  __syncwarp();
  int base = 0;
  for (int e0 = 0; e0 < num_experts; e0 += 32) {
    const int ex = e0 + lane;
    int beg = 0, cnt = 0;
    if (ex < num_experts) {
      beg = offsets[ex];
      cnt = offsets[ex + 1] - beg;
    }
    const int t = cnt > 0 ? (cnt + bm - 1) / bm : 0;
    const int inc = warp_inclusive_scan(t, lane);
    const int excl = inc - t;
    if (t > 0 && tile >= base + excl && tile < base + inc) {
      *e = ex;
      *r0 = beg + (tile - base - excl) * bm;
      *r1 = beg + cnt;
    }
    base += __shfl_sync(0xffffffffu, inc, 31);
    if (base > tile) break;
  }
}

// The CPU's rank_before: larger first, ties to the lower index, NaN after everything.
__device__ __forceinline__ bool rank_before(float a, int ia, float b, int ib) {
  const bool na = a != a, nb = b != b;
  if (na || nb) return na == nb ? ia < ib : nb;
  if (a != b) return a > b;
  return ia < ib;
}

inline unsigned blocks_for(size_t n, unsigned threads) {
  return static_cast<unsigned>((n + threads - 1) / threads);
}

}  // namespace expertd::cuda
#endif
