// NCCL backend of expertd::Comm (full build): all2allv as grouped ncclSend/ncclRecv over device
// buffers, the counts exchange, and unique-id creation for the rendezvous. libnccl.so.2 (or
// $EXPERTD_NCCL_SO, NCCL 2.14 or later) is loaded with dlopen at first use; nothing links against it.
//
// Nothing waits on a peer without a deadline (the group's timeout, --dist-timeout): the join is a
// nonblocking ncclCommInitRankConfig polled with ncclCommGetAsyncError; a blocking collective polls
// its stream; a collective only enqueued on a caller's stream is watched by the group's watchdog
// thread (an event recorded after it). Past the deadline the communicator is aborted
// (ncclCommAbort: the kernels of every rank's pending collectives return) and the call, or the next
// one after a watched collective expired, raises E_COMM naming what did not finish.
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <atomic>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "../cuda/cuda_common.h"
#include "expertd/comm.h"
#include "expertd/cuda_backend.h"
#include "expertd/errors.h"

namespace expertd {
namespace {

// The few NCCL types used (nccl.h, stable ABI since 2.x).
using ncclResult_t = int;
using ncclComm_t = void*;
struct ncclUniqueId {
  char internal[kNcclUniqueIdBytes];
};
constexpr int ncclSuccess = 0;
constexpr int ncclInProgress = 7;
constexpr int ncclInt8 = 0;

// ncclConfig_t as NCCL 2.14 defined it (later versions read the fields of the version given).
struct ncclConfig {
  size_t size;
  unsigned int magic;
  unsigned int version;
  int blocking;
  int cgaClusterSize;
  int minCTAs;
  int maxCTAs;
  const char* netName;
};

ncclConfig nonblocking_config() {
  ncclConfig c{};
  c.size = sizeof(ncclConfig);
  c.magic = 0xcafebeef;
  c.version = 21400;  // NCCL_VERSION(2, 14, 0)
  c.blocking = 0;
  c.cgaClusterSize = c.minCTAs = c.maxCTAs = INT_MIN;  // NCCL_CONFIG_UNDEF_INT: NCCL's defaults
  c.netName = nullptr;
  return c;
}

using Clock = std::chrono::steady_clock;

struct Nccl {
  void* lib = nullptr;
  ncclResult_t (*get_unique_id)(ncclUniqueId*) = nullptr;
  ncclResult_t (*comm_init_rank_config)(ncclComm_t*, int, ncclUniqueId, int, ncclConfig*) = nullptr;
  ncclResult_t (*comm_get_async_error)(ncclComm_t, ncclResult_t*) = nullptr;
  ncclResult_t (*comm_abort)(ncclComm_t) = nullptr;
  ncclResult_t (*send)(const void*, size_t, int, int, ncclComm_t, cudaStream_t) = nullptr;
  ncclResult_t (*recv)(void*, size_t, int, int, ncclComm_t, cudaStream_t) = nullptr;
  ncclResult_t (*group_start)() = nullptr;
  ncclResult_t (*group_end)() = nullptr;
  const char* (*error_string)(ncclResult_t) = nullptr;
};

template <typename F>
bool bind(void* lib, const char* name, F& fn) {
  fn = reinterpret_cast<F>(dlsym(lib, name));
  return fn != nullptr;
}

const Nccl* load_nccl() {
  static std::once_flag once;
  static Nccl n;
  static bool ok = false;
  std::call_once(once, [] {
    const char* env = getenv("EXPERTD_NCCL_SO");
    n.lib = dlopen(env && *env ? env : "libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
    if (!n.lib) return;
    ok = bind(n.lib, "ncclGetUniqueId", n.get_unique_id) &&
         bind(n.lib, "ncclCommInitRankConfig", n.comm_init_rank_config) &&
         bind(n.lib, "ncclCommGetAsyncError", n.comm_get_async_error) &&
         bind(n.lib, "ncclCommAbort", n.comm_abort) && bind(n.lib, "ncclSend", n.send) &&
         bind(n.lib, "ncclRecv", n.recv) && bind(n.lib, "ncclGroupStart", n.group_start) &&
         bind(n.lib, "ncclGroupEnd", n.group_end) &&
         bind(n.lib, "ncclGetErrorString", n.error_string);
  });
  return ok ? &n : nullptr;
}

const Nccl& nccl() {
  const Nccl* n = load_nccl();
  if (!n) {
    const char* env = getenv("EXPERTD_NCCL_SO");
    fail(ErrorCode::Nccl, std::string("NCCL is not available: could not load ") +
                              (env && *env ? env : "libnccl.so.2") +
                              " with the NCCL 2.14+ API (install NCCL or set EXPERTD_NCCL_SO)");
  }
  return *n;
}

[[noreturn]] void raise_nccl(ncclResult_t r, const char* stmt, const char* file, int line) {
  const Nccl* n = load_nccl();
  fail(ErrorCode::Nccl, std::string("NCCL ") + (n ? n->error_string(r) : "error") + " (" +
                            std::to_string(r) + ") in " + stmt + " at " + file + ":" +
                            std::to_string(line));
}

#define EXPERTD_NCCL_CHECK(stmt)                                               \
  do {                                                                         \
    ncclResult_t expertd_nr_ = (stmt);                                         \
    if (expertd_nr_ != ncclSuccess) raise_nccl(expertd_nr_, #stmt, __FILE__, __LINE__); \
  } while (0)

// Polls comm's asynchronous state until it leaves ncclInProgress or the deadline passes; returns
// the state (ncclInProgress at the deadline).
ncclResult_t settle(const Nccl& n, ncclComm_t comm, Clock::time_point deadline) {
  auto pause = std::chrono::microseconds(20);
  for (;;) {
    ncclResult_t state = ncclInProgress;
    const ncclResult_t r = n.comm_get_async_error(comm, &state);
    if (r != ncclSuccess) return r;
    if (state != ncclInProgress || Clock::now() >= deadline) return state;
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::microseconds(2000));
  }
}

class NcclComm final : public Comm {
 public:
  NcclComm(ncclComm_t comm, int rank, int world, int device, int timeout_ms)
      : comm_(comm), rank_(rank), world_(world), device_(device), timeout_(timeout_ms) {
    stream_ = cuda::stream_create(0);
    watchdog_ = std::thread([this] { watch(); });
  }
  ~NcclComm() override {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (watchdog_.joinable()) watchdog_.join();
    // Abort, not destroy: it never waits on a peer (one that died would hang ncclCommDestroy),
    // and it ends whatever is still pending here.
    abort_comm("the group was disposed");
    for (auto& p : pending_) cudaEventDestroy(p.done);
    cuda::stream_destroy(stream_);
  }
  int rank() const override { return rank_; }
  int world_size() const override { return world_; }
  const char* backend() const override { return "nccl"; }

  // NOTE: send/recv are device pointers here (unlike loopback's host memory).
  void all2allv(const void* send, const int64_t* send_bytes, void* recv,
                const int64_t* recv_bytes) override {
    enqueue(send, send_bytes, recv, recv_bytes, stream_, false);
    wait_stream("all2allv");
  }

  // Enqueues the grouped send/recv on s. watch: the watchdog aborts the group if it has not
  // finished on s within the timeout (the caller does not wait for it).
  void enqueue(const void* send, const int64_t* send_bytes, void* recv, const int64_t* recv_bytes,
               cuda::Stream s, bool watch = true) {
    cuda::ensure_alive();
    ncclComm_t comm = nullptr;
    {
      std::lock_guard<std::mutex> lk(mu_);
      comm = comm_;
    }
    check_live();
    const Nccl& n = nccl();
    const auto deadline = Clock::now() + timeout_;
    const char* sp = static_cast<const char*>(send);
    char* rp = static_cast<char*>(recv);
    EXPERTD_NCCL_CHECK(n.group_start());
    try {
      for (int r = 0; r < world_; ++r) {
        if (send_bytes[r] > 0)
          EXPERTD_NCCL_CHECK(n.send(sp, static_cast<size_t>(send_bytes[r]), ncclInt8, r, comm, s));
        if (recv_bytes[r] > 0)
          EXPERTD_NCCL_CHECK(n.recv(rp, static_cast<size_t>(recv_bytes[r]), ncclInt8, r, comm, s));
        sp += send_bytes[r];
        rp += recv_bytes[r];
      }
    } catch (...) {
      n.group_end();
      throw;
    }
    // Nonblocking communicator: ncclGroupEnd may leave the launch in progress.
    ncclResult_t r = n.group_end();
    if (r == ncclInProgress) r = settle(n, comm, deadline);
    if (r == ncclInProgress) expire("an all2allv could not be issued");
    if (r != ncclSuccess) {
      abort_comm("ncclGroupEnd failed");
      raise_nccl(r, "ncclGroupEnd()", __FILE__, __LINE__);
    }
    if (!watch) return;
    cudaEvent_t done = nullptr;
    if (cudaEventCreateWithFlags(&done, cudaEventDisableTiming) != cudaSuccess) return;
    if (cudaEventRecord(done, s) != cudaSuccess) {
      cudaEventDestroy(done);
      return;
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      pending_.push_back({done, Clock::now() + timeout_});
    }
    cv_.notify_all();
  }

  void all2all_i64(const int64_t* send, int64_t* recv) override {
    const size_t bytes = sizeof(int64_t) * world_;
    if (!scratch_) scratch_ = cuda::device_alloc(2 * bytes, stream_);
    char* d = static_cast<char*>(scratch_->ptr);
    cuda::memcpy_h2d(d, send, bytes, stream_);
    std::vector<int64_t> each(world_, sizeof(int64_t));
    enqueue(d, each.data(), d + bytes, each.data(), stream_, false);
    cuda::memcpy_d2h(recv, d + bytes, bytes, stream_);
    wait_stream("all2allCounts");
  }

  void barrier() override {
    std::vector<int64_t> zeros(world_, 0), got(world_);
    all2all_i64(zeros.data(), got.data());
  }

 private:
  struct Watched {
    cudaEvent_t done;
    Clock::time_point deadline;
  };

  // E_COMM once the group was aborted (a deadline passed, or NCCL reported an error).
  void check_live() {
    std::lock_guard<std::mutex> lk(mu_);
    if (aborted_)
      fail(ErrorCode::Comm, "NCCL group rank " + std::to_string(rank_) + " of " +
                                std::to_string(world_) + " was aborted: " + reason_);
  }

  // Aborts the communicator once (any thread); later calls see reason.
  void abort_comm(const std::string& reason) {
    ncclComm_t c = nullptr;
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (aborted_) return;
      aborted_ = true;
      reason_ = reason;
      c = comm_;
      comm_ = nullptr;
    }
    if (c) nccl().comm_abort(c);
  }

  [[noreturn]] void expire(const std::string& what) {
    const std::string why = what + ": not every rank took part within " +
                            std::to_string(timeout_.count()) + " ms (a peer died, hung or lost its link)";
    abort_comm(why);
    fail(ErrorCode::Comm, "NCCL group rank " + std::to_string(rank_) + " of " +
                              std::to_string(world_) + ": " + why + "; the group was aborted");
  }

  // Waits for the group's own stream, polling, at most the timeout; then aborts.
  void wait_stream(const char* what) {
    const auto deadline = Clock::now() + timeout_;
    auto pause = std::chrono::microseconds(5);
    for (;;) {
      const cudaError_t q = cudaStreamQuery(stream_);
      if (q == cudaSuccess) break;
      if (q != cudaErrorNotReady) cuda::raise_cuda(q, "cudaStreamQuery(group stream)", __FILE__, __LINE__);
      ncclResult_t state = ncclSuccess;
      {
        std::lock_guard<std::mutex> lk(mu_);
        if (!aborted_) nccl().comm_get_async_error(comm_, &state);
      }
      if (state != ncclSuccess && state != ncclInProgress) {
        abort_comm(std::string("NCCL reported an error during ") + what);
        raise_nccl(state, what, __FILE__, __LINE__);
      }
      check_live();
      if (Clock::now() >= deadline) expire(std::string(what) + " did not finish");
      std::this_thread::sleep_for(pause);
      pause = std::min(pause * 2, std::chrono::microseconds(1000));
    }
    check_live();
  }

  // The watchdog: collectives enqueued on callers' streams must finish within the timeout.
  void watch() {
    cudaSetDevice(device_);
    std::unique_lock<std::mutex> lk(mu_);
    while (!stop_) {
      cv_.wait_for(lk, std::chrono::milliseconds(pending_.empty() ? 100 : 2));
      while (!pending_.empty()) {
        Watched& w = pending_.front();
        const cudaError_t q = cudaEventQuery(w.done);
        if (q == cudaErrorNotReady && !aborted_ && Clock::now() < w.deadline) break;
        const bool late = q == cudaErrorNotReady && !aborted_;
        cudaEventDestroy(w.done);
        pending_.pop_front();
        if (late) {
          lk.unlock();
          abort_comm("an all2allv enqueued on a stream did not finish within " +
                     std::to_string(timeout_.count()) + " ms (a peer died, hung or lost its link)");
          lk.lock();
        }
      }
    }
  }

  ncclComm_t comm_;
  int rank_, world_, device_;
  std::chrono::milliseconds timeout_;
  cuda::Stream stream_ = nullptr;
  std::shared_ptr<cuda::DeviceMem> scratch_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Watched> pending_;
  bool stop_ = false;
  bool aborted_ = false;
  std::string reason_;
  std::thread watchdog_;
};

}  // namespace

bool nccl_available() { return load_nccl() != nullptr; }

void nccl_unique_id(uint8_t* out) {
  ncclUniqueId id{};
  EXPERTD_NCCL_CHECK(nccl().get_unique_id(&id));
  std::memcpy(out, id.internal, kNcclUniqueIdBytes);
}

std::shared_ptr<Comm> nccl_join(const uint8_t* unique_id, int world_size, int rank, int timeout_ms) {
  cuda::ensure_alive();
  const Nccl& n = nccl();
  ncclUniqueId id{};
  std::memcpy(id.internal, unique_id, kNcclUniqueIdBytes);
  ncclConfig config = nonblocking_config();
  ncclComm_t comm = nullptr;
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  ncclResult_t r = n.comm_init_rank_config(&comm, world_size, id, rank, &config);
  if (r == ncclInProgress) r = settle(n, comm, deadline);
  if (r == ncclInProgress) {
    n.comm_abort(comm);
    fail(ErrorCode::Comm, "NCCL join: rank " + std::to_string(rank) + " of " +
                              std::to_string(world_size) + ": not every rank joined within " +
                              std::to_string(timeout_ms) + " ms (ncclCommInitRankConfig aborted)");
  }
  if (r != ncclSuccess) {
    if (comm) n.comm_abort(comm);
    raise_nccl(r, "ncclCommInitRankConfig(&comm, world_size, id, rank, &config)", __FILE__, __LINE__);
  }
  try {
    return std::make_shared<NcclComm>(comm, rank, world_size, cuda::current_device(), timeout_ms);
  } catch (...) {
    n.comm_abort(comm);
    throw;
  }
}

void nccl_all2allv_async(Comm& comm, const void* send, const int64_t* send_bytes, void* recv,
                         const int64_t* recv_bytes, cuda::Stream s) {
  auto* nc = dynamic_cast<NcclComm*>(&comm);
  if (!nc) fail(ErrorCode::InvalidArg, "nccl_all2allv_async: the group is not an NCCL group");
  nc->enqueue(send, send_bytes, recv, recv_bytes, cuda::or_default(s));
}

}  // namespace expertd
