// DenseGemm: Y = X * W^T (+ bias) (+= Y) over a packed weight, split across the thread pool by
// (row tile, weight block chunk) so decode streams every weight byte once and prefill reuses
// each chunk from L2 for a whole row tile.
#include <numeric>

#include "expertd/ops.h"
#include "expertd/thread_pool.h"
#include "gemm_kernels.h"

namespace expertd {

using namespace gemm;

namespace {

struct DenseCall {
  const TileFn* table;
  Path path;
  Act x;
  const PackedWeight* w;
  float* y;
  const float* bias;
  bool accumulate;
  const std::vector<Task>* tasks;
};

void run_dense_task(const DenseCall& c, const Task& t) {
  const size_t ldy = static_cast<size_t>(c.w->n);
  const Act x = act_rows(c.x, c.path, t.r0);
  float* y = c.y + t.r0 * ldy;
  run_tiles(c.table, c.path, x, t.r1 - t.r0, *c.w, t.b0, t.b1,
            [&](int r, int mr, int b, int nr, const float* tile) {
              store_plain(tile, mr, nr, *c.w, b, y + r * ldy, ldy, c.bias, c.accumulate);
            });
}

}  // namespace

void dense_gemm(const float* x, int m, const PackedWeight& w, float* y, const float* bias,
                bool accumulate, bool fast_bf16) {
  if (m <= 0) return;
  const CpuFeatures& f = cpu_features();
  const Path path = choose_path(f, w, fast_bf16);
  GemmScratch& s = gemm_scratch();
  if (w.perm) {  // an act-order weight: x in its columns' input order
    auto* xp = static_cast<float*>(s.x_perm.get(static_cast<size_t>(m) * w.k * sizeof(float)));
    gather_columns(x, 0, m, w.k, w.perm.get(), xp);
    x = xp;
  }
  auto& pool = ThreadPool::instance();
  // A prefetch hint that lists w moves past it (its scales follow its codes in a hint).
  pool.prefetch_reached(w.quantized() ? static_cast<const void*>(w.scales.get()) : w.ptr());

  DenseCall c;
  c.path = path;
  c.table = tile_table(path, w);
  if (int8_path(path)) {
    c.x = alloc_i8(m, w.kp, std::gcd(kActBlock, w.group), s.x_i8, s.x_i8_scale, s.x_i8_sums);
    quantize_rows_i8_pool(f, x, static_cast<size_t>(w.k), m, w.k, c.x);
  } else {
    c.x = prepare_activations(path, rounds_activations(w, fast_bf16), x, m, w.k, w.k_even(),
                              bf16_act_path(path) ? s.x_bf16 : s.x_f32);
  }
  c.w = &w;
  c.y = y;
  c.bias = bias;
  c.accumulate = accumulate;
  s.tasks.clear();
  plan_tasks(s.tasks, 0, m, w, path,
             static_cast<int>(pool.num_threads()) * (m <= kMr ? kDecodeTasksPerThread : kTasksPerThread));
  c.tasks = &s.tasks;
  // NOTE: the lambda captures one reference, so std::function stores it without allocating.
  pool.parallel_for(s.tasks.size(), [&c](size_t t, size_t) { run_dense_task(c, (*c.tasks)[t]); });
}

}  // namespace expertd
