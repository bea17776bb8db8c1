// GroupGemm: the fused expert FFN over all experts of a layer in one call.
// Phase 1: x -> h = SiLU(gate(x)) * up(x) per (expert, gate/up chunk, row tile), the two tiles
// side by side in registers; phase 2: h -> y by the down projection. Both phases hand all
// experts' work items to the pool at once, so 2 cores stay busy with 1 expert or 64.
// Experts whose down projection reads int8 activations get h quantized per row between the phases.
#include <atomic>
#include <numeric>

#include "expertd/ops.h"
#include "expertd/thread_pool.h"
#include "gemm_kernels.h"

namespace expertd {

using namespace gemm;

namespace {

// Activations of x in each form a path may read (filled only for the forms some expert needs).
struct XForms {
  Act bf16;     // Bf16Dot, Amx
  Act rounded;  // f32 rounded to bf16 (fast mode without bf16 dot products)
  Act plain;    // f32 as given (padded copy when H is odd)
  Act i8;       // int8 per row (Vnni, ScalarI8)
};

struct FfnCall {
  const int32_t* offsets;
  const PackedWeight* const* gate_up;
  const PackedWeight* const* down;
  int h;
  float* y;
  bool fast;
  const CpuFeatures* cpu;
  XForms x;
  uint8_t* hbuf;       // [rows, Ip] in f32 row pitch; bf16 rows use the first half of each row
  size_t h_row_bytes;  // Ip * 4
  Act h_i8;            // h quantized per row, for the experts whose down projection is int8
  const std::vector<Task>* tasks;
};

Act x_for(const FfnCall& c, Path path, bool round) {
  if (bf16_act_path(path)) return c.x.bf16;
  if (int8_path(path)) return c.x.i8;
  return round ? c.x.rounded : c.x.plain;
}

HFormat h_format(Path down_path, bool round) {
  if (bf16_act_path(down_path)) return HFormat::Bf16;
  if (int8_path(down_path)) return HFormat::F32;  // quantized per row after phase 1
  return round ? HFormat::F32Rounded : HFormat::F32;
}

// The int8 row form several weights can read: codes padded to the largest kp, blocks of the gcd
// of kActBlock and their groups.
struct I8Shape {
  int ld = 0, block = kActBlock;
  bool int4 = false;
  void add(const PackedWeight& w) {
    ld = std::max(ld, w.kp);
    block = std::gcd(block, w.group);
    int4 = int4 || w.q == QFormat::I4 || w.q == QFormat::FP4;
  }
  // NOTE: int4 kernels step k by 8 inside a block; int8 and int4 experts with an int8 hidden size
  // that is not a multiple of 8 cannot share one form (no --quantize makes such a layer).
  void check() const {
    EXPERTD_CHECK(!int4 || block % 8 == 0, ErrorCode::Internal,
                  "int8 activation blocks of " + std::to_string(block) +
                      " columns cannot feed an int4 expert");
  }
};

void run_gate_up_task(const FfnCall& c, const Task& t) {
  const PackedWeight& w = *c.gate_up[t.g];
  const PackedWeight& dn = *c.down[t.g];
  const Path path = choose_path(*c.cpu, w, c.fast);
  const Path down_path = choose_path(*c.cpu, dn, c.fast);
  const HFormat fmt = h_format(down_path, rounds_activations(dn, c.fast));
  const int row0 = c.offsets[t.g] + t.r0;
  const Act x = act_rows(x_for(c, path, rounds_activations(w, c.fast)), path, row0);
  uint8_t* h = c.hbuf + row0 * c.h_row_bytes;
  run_tiles(tile_table(path, w), path, x, t.r1 - t.r0, w, t.b0, t.b1,
            [&](int r, int mr, int b, int nr, const float* tile) {
              store_gate_up(*c.cpu, tile, mr, nr, b, h + r * c.h_row_bytes, c.h_row_bytes, fmt);
            });
}

void run_down_task(const FfnCall& c, const Task& t) {
  const PackedWeight& w = *c.down[t.g];
  const Path path = choose_path(*c.cpu, w, c.fast);
  const int row0 = c.offsets[t.g] + t.r0;
  // h rows have a fixed byte pitch, so their element stride depends on the stored type.
  Act x{c.hbuf + row0 * c.h_row_bytes, c.h_row_bytes / act_size(path)};
  if (int8_path(path)) x = act_rows(c.h_i8, path, row0);
  const size_t ldy = static_cast<size_t>(c.h);
  float* y = c.y + row0 * ldy;
  run_tiles(tile_table(path, w), path, x, t.r1 - t.r0, w, t.b0, t.b1,
            [&](int r, int mr, int b, int nr, const float* tile) {
              store_plain(tile, mr, nr, w, b, y + r * ldy, ldy, nullptr, false);
            });
}

}  // namespace

void group_gemm_ffn(const float* x, const int32_t* offsets, int num_experts,
                    const PackedWeight* const* gate_up, const PackedWeight* const* down, int h,
                    int inter, float* y, bool fast_bf16) {
  const int rows = offsets[num_experts];
  if (rows <= 0) return;
  const CpuFeatures& cpu = cpu_features();
  GemmScratch& s = gemm_scratch();
  auto& pool = ThreadPool::instance();
  const int ip = (inter + 15) / 16 * 16;

  FfnCall c{};
  c.offsets = offsets;
  c.gate_up = gate_up;
  c.down = down;
  c.h = h;
  c.y = y;
  c.fast = fast_bf16;
  c.cpu = &cpu;

  // Act-order experts (PackedWeight::perm on gate_up): each one's rows of x in its input order. A down
  // projection's order is folded into its gate_up rows at load, so h needs none.
  bool any_perm = false;
  for (int e = 0; e < num_experts; ++e) {
    if (offsets[e + 1] <= offsets[e] || !gate_up[e]) continue;
    any_perm = any_perm || gate_up[e]->perm != nullptr;
    EXPERTD_CHECK(!down[e] || !down[e]->perm, ErrorCode::InvalidArg,
                  "a down projection with an input order: fold it into the expert's gate_up rows");
  }
  if (any_perm) {
    auto* xp = static_cast<float*>(s.x_perm.get(static_cast<size_t>(rows) * h * sizeof(float)));
    for (int e = 0; e < num_experts; ++e)
      if (offsets[e + 1] > offsets[e])
        gather_columns(x, offsets[e], offsets[e + 1], h, gate_up[e] ? gate_up[e]->perm.get() : nullptr, xp);
    x = xp;
  }

  // Prepare each activation form some active expert reads.
  bool need_bf16 = false, need_rounded = false, need_plain = false;
  I8Shape x_i8, h_i8;
  for (int e = 0; e < num_experts; ++e) {
    if (offsets[e + 1] <= offsets[e]) continue;
    EXPERTD_CHECK(gate_up[e] && down[e], ErrorCode::Range, "expert has rows but no weights");
    const PackedWeight& w = *gate_up[e];
    const Path p = choose_path(cpu, w, fast_bf16);
    if (bf16_act_path(p)) need_bf16 = true;
    else if (int8_path(p)) x_i8.add(w);
    else if (rounds_activations(w, fast_bf16)) need_rounded = true;
    else need_plain = true;
    if (int8_path(choose_path(cpu, *down[e], fast_bf16))) h_i8.add(*down[e]);
  }
  const int kp = (h + 1) / 2 * 2;
  if (need_bf16) c.x.bf16 = prepare_activations(Path::Bf16Dot, true, x, rows, h, kp, s.x_bf16);
  if (need_rounded)
    c.x.rounded = prepare_activations(Path::Scalar, true, x, rows, h, kp, s.x_f32);
  if (need_plain)
    c.x.plain = prepare_activations(Path::Scalar, false, x, rows, h, kp, s.x_f32_plain);
  if (x_i8.ld > 0) {
    x_i8.check();
    c.x.i8 = alloc_i8(rows, x_i8.ld, x_i8.block, s.x_i8, s.x_i8_scale, s.x_i8_sums);
    quantize_rows_i8_pool(cpu, x, static_cast<size_t>(h), rows, h, c.x.i8);
  }

  c.h_row_bytes = static_cast<size_t>(ip) * 4;
  c.hbuf = static_cast<uint8_t*>(s.h.get(static_cast<size_t>(rows) * c.h_row_bytes));
  if (h_i8.ld > 0) {
    h_i8.check();
    c.h_i8 = alloc_i8(rows, h_i8.ld, h_i8.block, s.h_i8, s.h_i8_scale, s.h_i8_sums);
  }
  auto down_i8 = [&](int e) { return int8_path(choose_path(cpu, *down[e], fast_bf16)); };

  // Phase 1 (gate/up + SiLU*mul -> h) and phase 2 (down projection h -> y) work items. With few
  // rows the chunks shrink so that the threads get several items each even when a single expert
  // is active.
  const int threads = static_cast<int>(pool.num_threads());
  int active = 0;
  for (int e = 0; e < num_experts; ++e) active += offsets[e + 1] > offsets[e];
  const bool one_job = static_cast<size_t>(rows) * inter <= (size_t{1} << 16);  // decode-sized
  const int per_thread = one_job ? kDecodeTasksPerThread : kTasksPerThread;
  const int min_chunks = std::max(1, (threads * per_thread + active - 1) / active);
  auto plan_phase = [&](const PackedWeight* const* ws) {
    for (int e = 0; e < num_experts; ++e)
      if (offsets[e + 1] > offsets[e])
        plan_tasks(s.tasks, e, offsets[e + 1] - offsets[e], *ws[e], choose_path(cpu, *ws[e], fast_bf16), min_chunks);
  };
  s.tasks.clear();
  plan_phase(gate_up);
  const size_t n_gate_up = s.tasks.size();
  c.tasks = &s.tasks;
  // An expert's h rows quantized for an int8 down projection (the scales need whole blocks, which
  // phase 1 writes in pieces).
  const auto quantize_h = [&c, inter](int r0, int r1) {
    quantize_rows_i8(*c.cpu, reinterpret_cast<const float*>(c.hbuf), c.h_row_bytes / 4, r0, r1, inter, c.h_i8);
  };

  if (one_job) {
    // Few rows (decode): both phases in one job. An expert's down items wait for its own gate/up
    // items only (they are all claimed by then: items are claimed in order, phase 1's first), and
    // the thread that finishes an expert's last gate/up item quantizes its h rows. No join and no
    // serial quantization between the phases; every number is computed as in the two-job path.
    plan_phase(down);
    auto& pending = s.expert_pending;
    auto& ready = s.expert_ready;
    if (pending.size() < static_cast<size_t>(num_experts)) {
      pending = std::vector<std::atomic<int>>(num_experts);
      ready = std::vector<std::atomic<int>>(num_experts);
    }
    for (int e = 0; e < num_experts; ++e) {
      pending[e].store(0, std::memory_order_relaxed);
      ready[e].store(0, std::memory_order_relaxed);
    }
    for (size_t t = 0; t < n_gate_up; ++t) pending[s.tasks[t].g].fetch_add(1, std::memory_order_relaxed);
    pool.parallel_for(s.tasks.size(), [&](size_t t, size_t) {
      const Task& k = s.tasks[t];
      if (t < n_gate_up) {
        try {
          run_gate_up_task(c, k);
        } catch (...) {
          ready[k.g].store(-1, std::memory_order_release);  // its down items give up
          throw;
        }
        if (pending[k.g].fetch_sub(1, std::memory_order_acq_rel) == 1) {
          if (h_i8.ld > 0 && down_i8(k.g)) quantize_h(offsets[k.g], offsets[k.g + 1]);
          int expected = 0;
          ready[k.g].compare_exchange_strong(expected, 1, std::memory_order_release);
        }
        return;
      }
      int r;
      while ((r = ready[k.g].load(std::memory_order_acquire)) == 0) {
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
      }
      if (r > 0) run_down_task(c, k);
    });
    return;
  }

  pool.parallel_for(n_gate_up, [&c](size_t t, size_t) { run_gate_up_task(c, (*c.tasks)[t]); });

  // Between the phases: the h rows of the experts whose down projection is int8, in row chunks on
  // the pool.
  if (h_i8.ld > 0) {
    constexpr int kRowsPerTask = 32;
    s.tasks.clear();
    for (int e = 0; e < num_experts; ++e)
      if (offsets[e + 1] > offsets[e] && down_i8(e))
        for (int r = offsets[e]; r < offsets[e + 1]; r += kRowsPerTask)
          s.tasks.push_back(Task{e, r, std::min(offsets[e + 1], r + kRowsPerTask), 0, 0});
    pool.parallel_for(s.tasks.size(), [&](size_t t, size_t) { quantize_h(s.tasks[t].r0, s.tasks[t].r1); });
  }

  s.tasks.clear();
  plan_phase(down);
  pool.parallel_for(s.tasks.size(), [&c](size_t t, size_t) { run_down_task(c, (*c.tasks)[t]); });
}

}  // namespace expertd
