// A persistent thread pool over all cores. The calling thread takes part as worker 0, workers
// spin briefly before sleeping so decode-sized jobs start in microseconds, and one job runs at a
// time (concurrent callers queue on a mutex). The caller never waits for a worker that has not
// joined the job yet: on a busy machine a descheduled worker would otherwise stall every job.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace expertd {

// A test-and-test-and-set lock for sections of a few dozen instructions shared by the caller and
// the pool's workers (std::mutex would put a caller that meets a worker inside to sleep in the
// kernel, tens of microseconds on a VM, for a section a worker leaves in nanoseconds).
class SpinLock {
 public:
  void lock() {
    while (locked_.exchange(true, std::memory_order_acquire)) {
      while (locked_.load(std::memory_order_relaxed)) {
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
      }
    }
  }
  bool try_lock() { return !locked_.load(std::memory_order_relaxed) && !locked_.exchange(true, std::memory_order_acquire); }
  void unlock() { locked_.store(false, std::memory_order_release); }

 private:
  std::atomic<bool> locked_{false};
};

class ThreadPool {
 public:
  // fn(task_index, thread_index): tasks are handed out dynamically in [0, n_tasks).
  using TaskFn = std::function<void(size_t task, size_t thread)>;

  static ThreadPool& instance();

  size_t num_threads() const { return num_threads_; }
  void set_num_threads(size_t n);  // 0 = hardware concurrency

  // Runs fn over n_tasks on all threads and returns when every task has finished. Exceptions
  // thrown by a task are rethrown here (the first one). Safe to call from several threads.
  void parallel_for(size_t n_tasks, const TaskFn& fn);

  // Runs fn(thread_index, num_threads) once on every thread (for static partitioning).
  void run_on_all(const std::function<void(size_t thread, size_t nthreads)>& fn);

  // Memory the next jobs will read: idle workers (those spinning between jobs) read it, in order,
  // a chunk at a time, so that it sits in the shared cache when the job comes. A decode step runs
  // serial code (norms, rope, routing, JS) between its GEMMs while the other cores wait; the next
  // weights are known there. Regions hold their memory weakly: a freed one is skipped.
  struct Region {
    const void* p = nullptr;
    size_t bytes = 0;
    std::weak_ptr<const void> keep;
  };
  using Hint = std::shared_ptr<const std::vector<Region>>;
  // Replaces the previous hint (null clears it). Regions the last hints or jobs read through are
  // skipped, and a region the previous hint was part way through goes on where it stopped.
  void prefetch(Hint hint);
  // A job is about to read the region starting at p: the hint skips to after it (the job reads it
  // itself; a worker behind it would only read it again).
  void prefetch_reached(const void* p);
  // Bytes the workers have read for prefetch hints since the pool started.
  uint64_t prefetched_bytes() const { return prefetched_bytes_.load(std::memory_order_relaxed); }

  ~ThreadPool();

 private:
  ThreadPool();
  void start(size_t n);
  void stop();
  void worker_loop(size_t index);
  void run_job(size_t thread);
  // Worker side of prefetch(): reads the hint's next chunk; false when none is left.
  bool prefetch_chunk();

  size_t num_threads_ = 1;
  std::vector<std::thread> workers_;
  std::mutex submit_mu_;  // one job at a time
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> quit_{false};
  std::atomic<size_t> next_task_{0};
  std::atomic<size_t> pending_threads_{0};  // start-up handshake only
  // The job's admission word: (generation low 32 bits) << 32 | kJobClosed | workers inside.
  // A worker may run tasks only after joining the open job of the generation it woke for; the
  // caller closes the job once every task is claimed and waits only for the workers inside.
  std::atomic<uint64_t> job_{0};
  size_t n_tasks_ = 0;
  const TaskFn* fn_ = nullptr;
  std::mutex err_mu_;
  std::exception_ptr error_;
  SpinLock hint_mu_;  // guards the hint_* fields below
  Hint hint_;
  size_t hint_region_ = 0, hint_offset_ = 0;
  std::atomic<bool> hint_pending_{false};
  std::atomic<uint64_t> prefetched_bytes_{0};
  // The last regions read through (by a worker or a job): still in the cache.
  static constexpr size_t kHintDone = 16;
  const void* hint_done_[kHintDone] = {};
  size_t hint_done_next_ = 0;
  void hint_done(const void* p) { hint_done_[hint_done_next_++ % kHintDone] = p; }
  bool hint_is_done(const void* p) const;
};

}  // namespace expertd
