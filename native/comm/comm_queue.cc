// The per-group comm thread (see comm_queue.h): a FIFO of collectives run one at a time, with an
// optional simulated link that sleeps each all2allv's modelled transfer time.
#include "comm_queue.h"

#include <algorithm>

namespace expertd {

using Clock = std::chrono::steady_clock;

CommQueue::CommQueue(std::shared_ptr<Comm> comm) : comm_(std::move(comm)) {}

CommQueue::~CommQueue() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void CommQueue::execute(CommOp& op) {
  const auto t0 = Clock::now();
  bool failed = false;
  ErrorCode code = ErrorCode::Internal;
  std::string error;
  try {
    switch (op.kind) {
      case CommOp::Kind::All2allv: {
        comm_->all2allv(op.send, op.send_bytes.data(), op.recv, op.recv_bytes.data());
        if (link_bytes_per_s_ > 0) {
          int64_t out = 0, in = 0;
          const int me = comm_->rank();
          for (int r = 0; r < comm_->world_size(); ++r) {
            if (r == me) continue;
            out += op.send_bytes[r];
            in += op.recv_bytes[r];
          }
          const double s = static_cast<double>(std::max(out, in)) / link_bytes_per_s_;
          std::this_thread::sleep_until(t0 + std::chrono::duration_cast<Clock::duration>(
                                                 std::chrono::duration<double>(s)));
        }
        break;
      }
      case CommOp::Kind::All2allI64:
        comm_->all2all_i64(op.send_bytes.data(), op.recv_bytes.data());
        break;
      case CommOp::Kind::Barrier:
        comm_->barrier();
        break;
    }
  } catch (const Error& e) {
    failed = true;
    code = e.code();
    error = e.what();
  } catch (const std::exception& e) {
    failed = true;
    error = std::string("comm op: ") + e.what();
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  std::lock_guard<std::mutex> lk(mu_);
  op.failed = failed;
  op.error_code = code;
  op.error = std::move(error);
  op.seconds = seconds;
  op.finished = true;
}

void CommQueue::loop() {
  for (;;) {
    std::shared_ptr<CommOp> op;
    {
      std::unique_lock<std::mutex> lk(mu_);
      // NOTE: queued ops run even after stop_: a peer may already be waiting in them, and each
      // collective is bounded by the backend's timeout.
      cv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;
      op = queue_.front();
      queue_.pop_front();
      running_op_ = true;
    }
    execute(*op);
    {
      std::lock_guard<std::mutex> lk(mu_);
      running_op_ = false;
    }
    done_cv_.notify_all();
  }
}

void CommQueue::submit(const std::shared_ptr<CommOp>& op) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (stop_) fail(ErrorCode::Disposed, "the comm queue has stopped");
    queue_.push_back(op);
    if (!thread_.joinable()) thread_ = std::thread([this] { loop(); });
  }
  cv_.notify_one();
}

bool CommQueue::wait(const CommOp& op, int64_t timeout_ms) {
  std::unique_lock<std::mutex> lk(mu_);
  return done_cv_.wait_until(lk, Clock::now() + std::chrono::milliseconds(timeout_ms),
                             [&] { return op.finished; });
}

void CommQueue::rethrow(const CommOp& op) {
  if (op.failed) fail(op.error_code, op.error);
}

void CommQueue::run(const std::shared_ptr<CommOp>& op, int64_t timeout_ms) {
  bool direct = false;
  {
    std::lock_guard<std::mutex> lk(mu_);
    direct = !thread_.joinable();
  }
  if (direct) {
    execute(*op);
  } else {
    submit(op);
    if (!wait(*op, timeout_ms))
      fail(ErrorCode::Internal, "comm op did not finish within " + std::to_string(timeout_ms) + " ms");
  }
  rethrow(*op);
}

}  // namespace expertd
