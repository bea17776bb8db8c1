// The quantized register-tile kernels alone, one thread, MR activation rows (1: decode; 6: the
// prefill tile), 4 weight blocks per call as DenseGemm runs them, over an N x K weight: a
// development check of the kernels' instruction cost, apart from the pool, the activations'
// preparation and DRAM (a small N x K stays in L2). Not part of `npm run bench` (it needs the C++
// headers):
//   g++ -O3 -std=c++17 -Inative/include bench/native/quant-tiles.cc -o /tmp/quant-tiles
//   /tmp/quant-tiles 256 1024     # N K: 256 x 1024 stays in L2 (best of 6 x 20 passes)
//   /tmp/quant-tiles 256 1024 6   # the same with 6 rows per tile (compute-bound: GMAC/s)
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <utility>
#include <vector>

#include "../../native/cpu/gemm_kernels.h"

using namespace expertd;
using namespace expertd::gemm;

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

int main(int argc, char** argv) {
#if EXPERTD_GEMM_X86
  const int n = argc > 1 ? std::atoi(argv[1]) : 256, k = argc > 2 ? std::atoi(argv[2]) : 1024;
  const int mr = argc > 3 ? std::atoi(argv[3]) : 1;
  if (n <= 0 || k <= 0 || n % 64 != 0 || k % 128 != 0 || mr < 1 || mr > kMr) {
    std::fprintf(stderr, "N must be a multiple of 64, K of 128, MR 1..%d\n", kMr);
    return 1;
  }
  const size_t codes = static_cast<size_t>(n) * k;
  auto alloc = [](size_t bytes) { return std::aligned_alloc(64, (bytes + 63) / 64 * 64); };
  std::srand(1);
  auto* w8 = static_cast<uint8_t*>(alloc(codes));  // int8 / int4 codes: any byte
  for (size_t i = 0; i < codes; ++i) w8[i] = static_cast<uint8_t>(std::rand());
  auto* wf8 = static_cast<uint8_t*>(alloc(codes));  // e4m3 codes with e != 0 (the fast path)
  for (size_t i = 0; i < codes; ++i) wf8[i] = f8_store(static_cast<uint8_t>((std::rand() & 0xf6) | 0x08));
  auto* wbf = static_cast<uint16_t*>(alloc(codes * 2));
  for (size_t i = 0; i < codes; ++i) wbf[i] = static_cast<uint16_t>(0x3f80 + (std::rand() & 0x7f));
  const size_t nscale = static_cast<size_t>(n) * (k / 32);
  auto* sc = static_cast<float*>(alloc(nscale * 4));
  for (size_t i = 0; i < nscale; ++i) sc[i] = 0.01f;
  const size_t xn = static_cast<size_t>(mr) * k;
  auto* xi = static_cast<int8_t*>(alloc(xn));
  for (size_t i = 0; i < xn; ++i) xi[i] = static_cast<int8_t>(std::rand() % 255 - 127);
  auto* xb = static_cast<uint16_t*>(alloc(xn * 2));
  for (size_t i = 0; i < xn; ++i) xb[i] = 0x3f80;
  std::vector<float> xs(static_cast<size_t>(mr) * (k / 32), 0.01f);
  std::vector<int32_t> xsum(static_cast<size_t>(mr) * (k / 32), 3);
  alignas(64) float tile[kMr * kTileLd];
  using Seq = std::make_integer_sequence<int, kMr * kNr>;
  struct Kernel {
    const char* name;
    TileFn fn;
    const void* x;
    const void* w;
    size_t bytes16;  // bytes per k step of a 16-row block
    int group;
    double best = 1e9;
  };
  const int ti = (mr - 1) * kNr + kNr - 1;  // MR rows, NR = kNr blocks
  std::vector<Kernel> ks = {
      {"bf16", make_tile_table<Bf16DotTile>(Seq{})[ti], xb, wbf, 32, 32},
      {"int8", make_tile_table<VnniTile<QFormat::I8>>(Seq{})[ti], xi, w8, 16, k},
      {"int4 g32", make_tile_table<VnniTile<QFormat::I4>>(Seq{})[ti], xi, w8, 8, 32},
      {"int4 g128", make_tile_table<VnniTile<QFormat::I4>>(Seq{})[ti], xi, w8, 8, 128},
      {"fp8", make_tile_table<Bf16DotF8Tile>(Seq{})[ti], xb, wf8, 16, 128},
  };
  const int blocks = n / 16;
  for (int round = 0; round < 6; ++round)
    for (Kernel& kn : ks) {
      QScales qs;
      qs.group = kn.group;
      qs.sstride = static_cast<size_t>(k / kn.group) * 16;
      qs.xscales = xs.data();
      qs.xsums = xsum.data();
      qs.xblocks_ld = static_cast<size_t>(k / 32);
      qs.xblock = 32;
      const size_t block_bytes = static_cast<size_t>(k) * kn.bytes16;
      for (int rep = 0; rep < 21; ++rep) {
        const double t0 = now_s();
        for (int b = 0; b < blocks; b += kNr) {
          qs.s = sc + b * qs.sstride;
          kn.fn(kn.x, static_cast<size_t>(k), static_cast<const uint8_t*>(kn.w) + b * block_bytes,
                static_cast<size_t>(16) * k, k, tile, qs);
        }
        if (rep > 0) kn.best = std::min(kn.best, now_s() - t0);
      }
    }
  std::printf("MR %d\n| kernel | us per pass | weight GB/s (codes + scales) | GMAC/s |\n|---|---:|---:|---:|\n", mr);
  for (const Kernel& kn : ks) {
    const bool quant = kn.bytes16 != 32;
    const double bytes = static_cast<double>(blocks) * k * kn.bytes16 +
                         (quant ? static_cast<double>(n) * (k / kn.group) * 4 : 0.0);
    std::printf("| %s | %.2f | %.1f | %.1f |\n", kn.name, kn.best * 1e6, bytes / kn.best / 1e9,
                static_cast<double>(mr) * n * k / kn.best / 1e9);
  }
  return 0;
#else
  (void)argc;
  (void)argv;
  std::fprintf(stderr, "x86 only\n");
  return 1;
#endif
}
