// cudaGatedDeltaRule's host function and kernels (native/cuda/deltanet.cu, transformed by
// test/cuda-deltanet-threads.test.ts into deltanet_host.inc) on host threads, over the inputs of
// one file; writes out and the state pool.
//   in:  int32 T Hk Hv Dk Dv l2 chunk B longest poolSlots; f32 q k v g beta pool; int32 slots starts
//   out: f32 out [T, Hv, Dv], pool
#include "shim.h"
#include "deltanet_host.inc"

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  FILE* f = std::fopen(argv[1], "rb");
  if (!f) return 2;
  int32_t h[10];
  if (std::fread(h, 4, 10, f) != 10) return 2;
  expertd::DeltaRuleParams p;
  p.tokens = h[0], p.hk = h[1], p.hv = h[2], p.dk = h[3], p.dv = h[4], p.l2norm_qk = h[5] != 0, p.chunk = h[6];
  const int b = h[7], longest = h[8], pool_slots = h[9];
  const size_t t = static_cast<size_t>(p.tokens);
  auto rd = [&](auto tag, size_t n) {
    std::vector<decltype(tag)> a(n);
    if (std::fread(a.data(), 4, n, f) != n) std::exit(2);
    return a;
  };
  auto q = rd(0.0f, t * p.hk * p.dk), k = rd(0.0f, t * p.hk * p.dk), v = rd(0.0f, t * p.hv * p.dv);
  auto g = rd(0.0f, t * p.hv), beta = rd(0.0f, t * p.hv);
  auto pool = rd(0.0f, static_cast<size_t>(pool_slots) * p.hv * p.dk * p.dv);
  auto slots = rd(int32_t{0}, b), starts = rd(int32_t{0}, b + 1);
  std::fclose(f);
  std::vector<float> out(t * p.hv * p.dv, NAN);
  expertd::cuda::gated_delta_rule_batch(q.data(), k.data(), v.data(), g.data(), beta.data(), pool.data(),
                                        pool_slots, slots.data(), starts.data(), b, out.data(), p, longest,
                                        nullptr);
  FILE* o = std::fopen(argv[2], "wb");
  if (!o) return 2;
  std::fwrite(out.data(), 4, out.size(), o);
  std::fwrite(pool.data(), 4, pool.size(), o);
  std::fclose(o);
  return 0;
}
