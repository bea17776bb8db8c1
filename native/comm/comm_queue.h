// A comm thread per group: runs the group's collectives one at a time, in the order they were
// queued, on a native thread, so that the caller computes while they travel (the EPS-MoE pipeline).
// Generic over any Comm backend (loopback, Gloo, ...): it only calls the Comm interface.
#pragma once
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "expertd/comm.h"
#include "expertd/errors.h"

namespace expertd {

// One queued collective. The caller keeps the buffers alive until done() (the bindings hold
// references to them).
struct CommOp {
  enum class Kind { All2allv, All2allI64, Barrier };
  Kind kind = Kind::Barrier;
  const void* send = nullptr;
  void* recv = nullptr;
  std::vector<int64_t> send_bytes;  // [world] (All2allv) or the values (All2allI64)
  std::vector<int64_t> recv_bytes;  // [world] (All2allv) or the received values (All2allI64)
  // Written by the comm thread under the queue's mutex.
  bool finished = false;
  bool failed = false;
  ErrorCode error_code = ErrorCode::Internal;
  std::string error;
  double seconds = 0;  // on the comm thread, simulated link time included
};

class CommQueue {
 public:
  explicit CommQueue(std::shared_ptr<Comm> comm);
  ~CommQueue();  // finishes the queued ops (each bounded by the backend's own timeout), then joins
  CommQueue(const CommQueue&) = delete;
  CommQueue& operator=(const CommQueue&) = delete;

  Comm& comm() { return *comm_; }
  // Queues op; it runs after every op queued before it. Starts the thread on first use.
  void submit(const std::shared_ptr<CommOp>& op);
  // Runs op on the calling thread when the queue is idle and no thread was started, else queues
  // it and waits (timeout_ms): either way in order with the queued ops. Throws the op's error.
  void run(const std::shared_ptr<CommOp>& op, int64_t timeout_ms);
  // Waits until op finished; false on timeout (the op stays queued or in flight).
  bool wait(const CommOp& op, int64_t timeout_ms);
  // Throws the op's error, if it failed.
  static void rethrow(const CommOp& op);
  // A simulated link (benchmarks): every all2allv then also takes
  // max(bytes sent to peers, bytes received from peers) / bytes_per_second, slept on the thread
  // that runs it. 0: off.
  void set_link(double bytes_per_second) { link_bytes_per_s_ = bytes_per_second; }
  double link() const { return link_bytes_per_s_; }

 private:
  void execute(CommOp& op);
  void loop();

  std::shared_ptr<Comm> comm_;
  std::mutex mu_;
  std::condition_variable cv_;       // work queued / stop
  std::condition_variable done_cv_;  // an op finished
  std::deque<std::shared_ptr<CommOp>> queue_;
  bool stop_ = false;
  bool running_op_ = false;
  std::thread thread_;
  double link_bytes_per_s_ = 0;
};

}  // namespace expertd
