// The persistent CPU thread pool (see thread_pool.h).
#include "expertd/thread_pool.h"

#include <algorithm>
#include <chrono>

namespace expertd {

namespace {
// Bytes a worker reads of a prefetch hint before it looks for a job again (a job waits at most
// about this long for it: a few microseconds from DRAM).
constexpr size_t kPrefetchChunk = 4 << 10;
constexpr uint64_t kJobClosed = uint64_t(1) << 31;
constexpr uint64_t kJobActiveMask = kJobClosed - 1;
inline uint64_t job_tag(uint64_t generation) { return (generation & 0xffffffffu) << 32; }
}  // namespace

ThreadPool& ThreadPool::instance() {
  static ThreadPool pool;
  return pool;
}

ThreadPool::ThreadPool() {
  size_t n = std::thread::hardware_concurrency();
  start(n == 0 ? 1 : n);
}

ThreadPool::~ThreadPool() { stop(); }

void ThreadPool::set_num_threads(size_t n) {
  if (n == 0) n = std::thread::hardware_concurrency();
  if (n == 0) n = 1;
  std::lock_guard<std::mutex> submit(submit_mu_);
  if (n == num_threads_) return;
  stop();
  start(n);
}

void ThreadPool::start(size_t n) {
  quit_.store(false);
  num_threads_ = n;
  workers_.clear();
  // NOTE: every worker must read its starting generation before the first job is published,
  // or it would sleep through that job while the caller waits for it forever.
  pending_threads_.store(n - 1);
  for (size_t i = 1; i < n; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
  while (pending_threads_.load(std::memory_order_acquire) != 0) std::this_thread::yield();
}

void ThreadPool::stop() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    quit_.store(true);
    generation_.fetch_add(1);
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
  workers_.clear();
  num_threads_ = 1;
}

void ThreadPool::run_job(size_t thread) {
  for (;;) {
    size_t t = next_task_.fetch_add(1, std::memory_order_relaxed);
    if (t >= n_tasks_) break;
    try {
      (*fn_)(t, thread);
    } catch (...) {
      std::lock_guard<std::mutex> lk(err_mu_);
      if (!error_) error_ = std::current_exception();
    }
  }
}

void ThreadPool::worker_loop(size_t index) {
  uint64_t seen = generation_.load();
  pending_threads_.fetch_sub(1, std::memory_order_acq_rel);  // started (see start())
  for (;;) {
    // Spin briefly (decode steps issue jobs microseconds apart), then sleep. The clock is read
    // once per 32 pauses: read on every one, it was a few percent of a decode step's CPU time.
    auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(200);
    for (unsigned spins = 1; generation_.load(std::memory_order_acquire) == seen; ++spins) {
      if (hint_pending_.load(std::memory_order_relaxed) && prefetch_chunk()) {
        spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(200);
        continue;
      }
      if (spins % 32 == 0 && std::chrono::steady_clock::now() >= spin_until) break;
#if defined(__x86_64__)
      __builtin_ia32_pause();
#endif
    }
    if (generation_.load(std::memory_order_acquire) == seen) {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return generation_.load() != seen; });
    }
    seen = generation_.load(std::memory_order_acquire);
    if (quit_.load()) return;
    // Join the job published with this generation, unless the caller already closed it (it ran
    // every task itself) or a newer job replaced it (then the loop comes straight back for that).
    uint64_t s = job_.load(std::memory_order_acquire);
    bool joined = false;
    while ((s & ~(kJobClosed | kJobActiveMask)) == job_tag(seen) && !(s & kJobClosed)) {
      if (job_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
        joined = true;
        break;
      }
    }
    if (!joined) continue;
    run_job(index);
    job_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

void ThreadPool::parallel_for(size_t n_tasks, const TaskFn& fn) {
  if (n_tasks == 0) return;
  std::lock_guard<std::mutex> submit(submit_mu_);
  if (num_threads_ == 1 || n_tasks == 1) {
    for (size_t t = 0; t < n_tasks; ++t) fn(t, 0);
    return;
  }
  fn_ = &fn;
  n_tasks_ = n_tasks;
  error_ = nullptr;
  next_task_.store(0);
  {
    std::lock_guard<std::mutex> lk(mu_);
    // NOTE: the job word is opened before the generation moves, so a worker that sees the new
    // generation also sees its job open (release/acquire through generation_).
    uint64_t g = generation_.load() + 1;
    job_.store(job_tag(g), std::memory_order_release);
    generation_.store(g, std::memory_order_release);
  }
  cv_.notify_all();
  run_job(0);
  // Every task is claimed: close the job and wait only for the workers that joined it.
  job_.fetch_or(kJobClosed, std::memory_order_acq_rel);
  while ((job_.load(std::memory_order_acquire) & kJobActiveMask) != 0) {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
  }
  fn_ = nullptr;
  if (error_) {
    auto e = error_;
    error_ = nullptr;
    std::rethrow_exception(e);
  }
}

bool ThreadPool::hint_is_done(const void* p) const {
  return std::find(std::begin(hint_done_), std::end(hint_done_), p) != std::end(hint_done_);
}

void ThreadPool::prefetch(Hint hint) {
  if (num_threads_ == 1) return;  // nobody idles while the caller works
  Hint old;
  {
    std::lock_guard<SpinLock> lk(hint_mu_);
    const void* part = hint_ && hint_region_ < hint_->size() ? (*hint_)[hint_region_].p : nullptr;
    const size_t part_offset = hint_offset_;
    old = std::move(hint_);  // released outside the lock
    hint_ = std::move(hint);
    hint_region_ = 0;
    hint_offset_ = 0;
    if (hint_) {
      while (hint_region_ < hint_->size() && hint_is_done((*hint_)[hint_region_].p)) ++hint_region_;
      if (hint_region_ < hint_->size() && (*hint_)[hint_region_].p == part) hint_offset_ = part_offset;
    }
    hint_pending_.store(hint_ && hint_region_ < hint_->size(), std::memory_order_relaxed);
  }
}

void ThreadPool::prefetch_reached(const void* p) {
  if (!hint_pending_.load(std::memory_order_relaxed)) return;
  std::lock_guard<SpinLock> lk(hint_mu_);
  if (!hint_) return;
  const auto& regions = *hint_;
  for (size_t r = hint_region_; r < regions.size(); ++r) {
    if (regions[r].p != p) continue;
    for (size_t d = hint_region_; d <= r; ++d) hint_done(regions[d].p);
    hint_region_ = r + 1;
    hint_offset_ = 0;
    break;
  }
}

bool ThreadPool::prefetch_chunk() {
  const uint8_t* p = nullptr;
  size_t n = 0;
  std::shared_ptr<const void> keep;
  {
    std::unique_lock<SpinLock> lk(hint_mu_, std::try_to_lock);
    if (!lk.owns_lock()) return false;
    const size_t count = hint_ ? hint_->size() : 0;
    for (; hint_region_ < count; ++hint_region_, hint_offset_ = 0) {
      const Region& r = (*hint_)[hint_region_];
      if (hint_offset_ == 0 && hint_is_done(r.p)) continue;
      if (hint_offset_ < r.bytes && (keep = r.keep.lock())) break;
      if (hint_offset_ >= r.bytes) hint_done(r.p);
    }
    if (hint_region_ >= count) {
      hint_pending_.store(false, std::memory_order_relaxed);
      return false;
    }
    const Region& r = (*hint_)[hint_region_];
    p = static_cast<const uint8_t*>(r.p) + hint_offset_;
    n = std::min(kPrefetchChunk, r.bytes - hint_offset_);
    hint_offset_ += n;
  }
  // One load per cache line (volatile: kept; the hardware prefetcher follows the sequential run).
  for (size_t i = 0; i < n; i += 64) (void)*reinterpret_cast<const volatile uint8_t*>(p + i);
  prefetched_bytes_.fetch_add(n, std::memory_order_relaxed);
  return true;
}

void ThreadPool::run_on_all(const std::function<void(size_t, size_t)>& fn) {
  size_t n = num_threads_;
  parallel_for(n, [&](size_t task, size_t) { fn(task, n); });
}

}  // namespace expertd
