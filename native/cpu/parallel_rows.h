// Splits row-wise ops over the thread pool only when the work is big enough to pay for the
// wake-up, without allocating: the pool's std::function holds one pointer (small-buffer storage).
#pragma once
#include <algorithm>
#include <cstddef>
#include <type_traits>

#include "expertd/thread_pool.h"

namespace expertd {

// Below this many elements of work an op runs on the calling thread (a pool round trip costs
// a few microseconds, about what 32K elements of a memory-bound op take on one core).
constexpr size_t kParallelMinWork = size_t{1} << 15;

// fn(r0, r1) over [0, rows) in contiguous chunks; work_per_row is in elements.
template <typename F>
void parallel_rows(size_t rows, size_t work_per_row, F&& fn) {
  if (rows == 0) return;
  ThreadPool& pool = ThreadPool::instance();
  size_t threads = pool.num_threads();
  if (threads <= 1 || rows == 1 || rows * work_per_row < kParallelMinWork) {
    fn(size_t{0}, rows);
    return;
  }
  // A few chunks per thread balance uneven cores; never chunks below ~kParallelMinWork/4.
  size_t min_rows = std::max<size_t>(1, (kParallelMinWork / 4) / std::max<size_t>(1, work_per_row));
  size_t chunks = std::min(rows, threads * 4);
  size_t chunk = std::max(min_rows, (rows + chunks - 1) / chunks);
  size_t n_tasks = (rows + chunk - 1) / chunk;
  struct Ctx {
    std::remove_reference_t<F>* fn;
    size_t rows, chunk;
  } ctx{&fn, rows, chunk};
  const Ctx* c = &ctx;
  pool.parallel_for(n_tasks, [c](size_t task, size_t) {
    size_t r0 = task * c->chunk;
    size_t r1 = std::min(c->rows, r0 + c->chunk);
    (*c->fn)(r0, r1);
  });
}

}  // namespace expertd
