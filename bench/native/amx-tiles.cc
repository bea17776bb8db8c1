// The AMX tile kernels (run_tiles_amx) beside the AVX512-BF16 register tiles (Bf16DotTile) on one
// thread over bf16 weights of N x K, m rows of x, a trivial epilogue: a development check of
// decode streaming (copies > 1 cycles the weights through DRAM) and prefill rate apart from the
// pool and the epilogues. Not part of `npm run bench` (it needs the C++ headers):
//   g++ -O3 -std=c++17 -Inative/include bench/native/amx-tiles.cc native/cpu/cpu_features.cc -o /tmp/amx-tiles
//   /tmp/amx-tiles 4096 4096 1 16     # N K m copies: decode from DRAM (thread CPU time, median of 11 rounds)
//   /tmp/amx-tiles 2816 1024 512 1    # prefill (weights in L2/L3 per row tile as DenseGemm runs them)
#include <algorithm>
#include <ctime>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../../native/cpu/gemm_kernels.h"

using namespace expertd;
using namespace expertd::gemm;

namespace {

// Thread CPU time: on a shared machine the time this thread ran, not the time it waited.
double now_s() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

}  // namespace

int main(int argc, char** argv) {
#if EXPERTD_GEMM_X86
  const int n = argc > 1 ? std::atoi(argv[1]) : 4096, k = argc > 2 ? std::atoi(argv[2]) : 4096;
  const int m = argc > 3 ? std::atoi(argv[3]) : 1, copies = argc > 4 ? std::atoi(argv[4]) : 16;
  const CpuFeatures& f = cpu_features();
  if (!f.amx_bf16 || !f.kernel_bf16dot) {
    std::fprintf(stderr, "this CPU (or the OS) has no AMX bf16 tiles\n");
    return 1;
  }
  if (n <= 0 || k <= 0 || m <= 0 || copies <= 0 || n % 64 != 0 || k % 32 != 0) {
    std::fprintf(stderr, "N must be a multiple of 64, K of 32\n");
    return 1;
  }
  std::srand(1);
  // Plain bf16 weights in the packed layout (random finite values: any bf16 with exponent < 0xff).
  std::vector<PackedWeight> ws(copies);
  const size_t elems = static_cast<size_t>(n) * k;
  for (PackedWeight& w : ws) {
    w.dtype = DType::BF16;
    w.n = w.np = n;
    w.k = w.kp = k;
    w.size_bytes = elems * 2;
    auto* p = static_cast<uint16_t*>(std::aligned_alloc(64, elems * 2));
    for (size_t i = 0; i < elems; ++i) p[i] = static_cast<uint16_t>(0x3c00 + (std::rand() & 0x7ff) - 0x400);
    w.data = std::shared_ptr<uint8_t>(reinterpret_cast<uint8_t*>(p), [](uint8_t* q) { std::free(q); });
  }
  std::vector<uint16_t> x(static_cast<size_t>(m) * k);
  for (auto& v : x) v = static_cast<uint16_t>(0x3f00 + (std::rand() & 0xff));
  const Act act{x.data(), static_cast<size_t>(k)};
  const TileFn* dot = tile_table(Path::Bf16Dot, ws[0]);
  double sink = 0;
  const auto epi = [&](int, int mr, int, int nr, const float* tile) { sink += tile[0] + tile[(mr - 1) * kTileLd + 16 * nr - 1]; };
  // Rows per call as DenseGemm's row tiles (plan_tasks) on one thread, all blocks in one pass.
  const auto pass = [&](Path path, const PackedWeight& w) {
    std::vector<Task> tasks;
    plan_tasks(tasks, 0, m, w, path, 1);
    for (const Task& t : tasks)
      run_tiles(dot, path, act_rows(act, path, t.r0), t.r1 - t.r0, w, t.b0, t.b1, epi);
  };
  const int reps = std::max(copies, static_cast<int>(2e9 / (2.0 * m * elems)));
  double best[2] = {1e30, 1e30};
  std::vector<double> times[2], ratios;
  for (int round = 0; round < 11; ++round)
    for (int pi = 0; pi < 2; ++pi) {
      const Path path = pi == 0 ? Path::Amx : Path::Bf16Dot;
      pass(path, ws[0]);
      const double t0 = now_s();
      for (int r = 0; r < reps; ++r) pass(path, ws[r % copies]);
      const double t = (now_s() - t0) / reps;
      times[pi].push_back(t);
      best[pi] = std::min(best[pi], t);
      if (pi == 1) ratios.push_back(times[0].back() / t);
    }
  for (int pi = 0; pi < 2; ++pi) {
    std::sort(times[pi].begin(), times[pi].end());
    const double med = times[pi][times[pi].size() / 2];
    std::printf("%-8s N=%d K=%d m=%d copies=%d: %.3f ms median (best %.3f), %.1f GB/s, %.0f GFLOP/s\n",
                pi == 0 ? "amx" : "bf16dot", n, k, m, copies, med * 1e3, best[pi] * 1e3,
                elems * 2 / med / 1e9, 2.0 * m * elems / med / 1e9);
  }
  // Paired: each round's two passes ran back to back, so their ratio shares the machine's state.
  std::sort(ratios.begin(), ratios.end());
  std::printf("amx / bf16dot time, median of paired rounds: %.2f (%.2f-%.2f) (sink %g)\n",
              ratios[ratios.size() / 2], ratios.front(), ratios.back(), sink);
  return 0;
#else
  std::fprintf(stderr, "x86-64 only\n");
  return 1;
#endif
}
