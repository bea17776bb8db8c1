// Runs a CUDA kernel file's source on the host (test/cuda-deltanet-threads.test.ts): every CUDA
// thread a std::thread, __syncthreads and the warp shuffles std::barrier, the _rn intrinsics plain
// f32 operations (compiled with -ffp-contract=off), blocks one after another, shared memory poisoned
// (NaN) per block. Enough of the CUDA surface for native/cuda/deltanet.cu; not a GPU model (no
// timing, no memory model beyond what the barriers order).
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "expertd/cuda_backend.h"
#include "expertd/errors.h"

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3() = default;
  dim3(unsigned x_, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct HostBlock {
  std::unique_ptr<std::barrier<>> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<double> shfl;
};
inline HostBlock* g_block;
inline float* g_shared;
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(x)
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline void __trap() {
  std::fprintf(stderr, "cu-threads: __trap() in block (%u, %u)\n", blockIdx.x, blockIdx.y);
  std::exit(3);
}
inline void __syncthreads() { g_block->block->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { g_block->warps[threadIdx.x / 32]->arrive_and_wait(); }
inline double __shfl_xor_sync(unsigned, double v, int o) {
  const unsigned t = threadIdx.x;
  g_block->shfl[t] = v;
  __syncwarp();
  const double r = g_block->shfl[(t & ~31u) | ((t & 31u) ^ static_cast<unsigned>(o))];
  __syncwarp();
  return r;
}
using std::max;
using std::min;

namespace expertd::cuda {
inline void ensure_alive() {}
inline Stream or_default(Stream s) { return s; }
inline unsigned blocks_for(size_t n, unsigned threads) {
  return static_cast<unsigned>((n + threads - 1) / threads);
}
}  // namespace expertd::cuda
#define EXPERTD_CUDA_CHECK(stmt) (void)0
#define EXPERTD_CUDA_LAUNCH_CHECK() (void)0
#define cudaFuncSetAttribute(...) 0

// kernel<<<grid, threads, smem, stream>>>(args) becomes host_launch(grid, threads, smem, [&] { kernel(args); }).
// One std::thread per CUDA thread for the whole launch, walking the blocks in order (a barrier between
// blocks, where the shared memory is poisoned again).
template <class F>
void host_launch(dim3 grid, unsigned threads, size_t smem_bytes, F body) {
  std::vector<float> shared(smem_bytes / sizeof(float) + 1);
  blockDim = dim3(threads);
  g_shared = shared.data();
  HostBlock hb;
  hb.block = std::make_unique<std::barrier<>>(threads);
  for (unsigned w = 0; w < (threads + 31) / 32; ++w) hb.warps.push_back(std::make_unique<std::barrier<>>(32));
  hb.shfl.assign(threads, 0.0);
  g_block = &hb;
  std::vector<std::thread> ts;
  ts.reserve(threads);
  for (unsigned t = 0; t < threads; ++t)
    ts.emplace_back([&, t] {
      threadIdx = dim3(t);
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          if (t == 0) std::fill(shared.begin(), shared.end(), NAN);
          hb.block->arrive_and_wait();
          blockIdx = dim3(bx, by);
          body();  // a thread that returns early from the kernel still meets the barriers below
          hb.block->arrive_and_wait();
        }
    });
  for (auto& th : ts) th.join();
}
