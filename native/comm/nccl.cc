// NCCL backend of expertd::Comm (full build): all2allv as grouped ncclSend/ncclRecv over device
// buffers, the counts exchange, and unique-id creation for the rendezvous. libnccl.so.2 (or
// $EXPERTD_NCCL_SO) is loaded with dlopen at first use; nothing links against it.
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
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
constexpr int ncclInt8 = 0;

struct Nccl {
  void* lib = nullptr;
  ncclResult_t (*get_unique_id)(ncclUniqueId*) = nullptr;
  ncclResult_t (*comm_init_rank)(ncclComm_t*, int, ncclUniqueId, int) = nullptr;
  ncclResult_t (*comm_destroy)(ncclComm_t) = nullptr;
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
    // $EXPERTD_NCCL_SO, the pip wheels' folders (nvidia/cu13/lib, nvidia/nccl/lib), the loader path.
    n.lib = nccl_load().handle;
    if (!n.lib) return;
    ok = bind(n.lib, "ncclGetUniqueId", n.get_unique_id) &&
         bind(n.lib, "ncclCommInitRank", n.comm_init_rank) &&
         bind(n.lib, "ncclCommDestroy", n.comm_destroy) && bind(n.lib, "ncclSend", n.send) &&
         bind(n.lib, "ncclRecv", n.recv) && bind(n.lib, "ncclGroupStart", n.group_start) &&
         bind(n.lib, "ncclGroupEnd", n.group_end) &&
         bind(n.lib, "ncclGetErrorString", n.error_string);
  });
  return ok ? &n : nullptr;
}

const Nccl& nccl() {
  const Nccl* n = load_nccl();
  if (!n) {
    std::string tried;
    for (const std::string& t : nccl_load().tried) tried += (tried.empty() ? "" : "; ") + t;
    fail(ErrorCode::Nccl, "NCCL is not available: could not load libnccl.so.2 (tried " + tried +
                              "; install NCCL or set EXPERTD_NCCL_SO)");
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

class NcclComm final : public Comm {
 public:
  NcclComm(ncclComm_t comm, int rank, int world, int device)
      : comm_(comm), rank_(rank), world_(world), device_(device) {
    stream_ = cuda::stream_create(0);
  }
  ~NcclComm() override {
    cuda::stream_destroy(stream_);
    if (comm_) nccl().comm_destroy(comm_);
  }
  int rank() const override { return rank_; }
  int world_size() const override { return world_; }
  const char* backend() const override { return "nccl"; }

  // NOTE: send/recv are device pointers here (unlike loopback's host memory).
  void all2allv(const void* send, const int64_t* send_bytes, void* recv,
                const int64_t* recv_bytes) override {
    enqueue(send, send_bytes, recv, recv_bytes, stream_);
    cuda::stream_synchronize(stream_);
  }

  void enqueue(const void* send, const int64_t* send_bytes, void* recv, const int64_t* recv_bytes,
               cuda::Stream s) {
    cuda::ensure_alive();
    const Nccl& n = nccl();
    const char* sp = static_cast<const char*>(send);
    char* rp = static_cast<char*>(recv);
    EXPERTD_NCCL_CHECK(n.group_start());
    try {
      for (int r = 0; r < world_; ++r) {
        if (send_bytes[r] > 0)
          EXPERTD_NCCL_CHECK(n.send(sp, static_cast<size_t>(send_bytes[r]), ncclInt8, r, comm_, s));
        if (recv_bytes[r] > 0)
          EXPERTD_NCCL_CHECK(n.recv(rp, static_cast<size_t>(recv_bytes[r]), ncclInt8, r, comm_, s));
        sp += send_bytes[r];
        rp += recv_bytes[r];
      }
    } catch (...) {
      n.group_end();
      throw;
    }
    EXPERTD_NCCL_CHECK(n.group_end());
  }

  void all2all_i64(const int64_t* send, int64_t* recv) override {
    const size_t bytes = sizeof(int64_t) * world_;
    if (!scratch_) scratch_ = cuda::device_alloc(2 * bytes, stream_);
    char* d = static_cast<char*>(scratch_->ptr);
    cuda::memcpy_h2d(d, send, bytes, stream_);
    std::vector<int64_t> each(world_, sizeof(int64_t));
    enqueue(d, each.data(), d + bytes, each.data(), stream_);
    cuda::memcpy_d2h(recv, d + bytes, bytes, stream_);
    cuda::stream_synchronize(stream_);
  }

  void barrier() override {
    std::vector<int64_t> zeros(world_, 0), got(world_);
    all2all_i64(zeros.data(), got.data());
  }

 private:
  ncclComm_t comm_;
  int rank_, world_, device_;
  cuda::Stream stream_ = nullptr;
  std::shared_ptr<cuda::DeviceMem> scratch_;
};

}  // namespace

bool nccl_available() { return load_nccl() != nullptr; }

void nccl_unique_id(uint8_t* out) {
  ncclUniqueId id{};
  EXPERTD_NCCL_CHECK(nccl().get_unique_id(&id));
  std::memcpy(out, id.internal, kNcclUniqueIdBytes);
}

std::shared_ptr<Comm> nccl_join(const uint8_t* unique_id, int world_size, int rank) {
  cuda::ensure_alive();
  ncclUniqueId id{};
  std::memcpy(id.internal, unique_id, kNcclUniqueIdBytes);
  ncclComm_t comm = nullptr;
  EXPERTD_NCCL_CHECK(nccl().comm_init_rank(&comm, world_size, id, rank));
  try {
    return std::make_shared<NcclComm>(comm, rank, world_size, cuda::current_device());
  } catch (...) {
    nccl().comm_destroy(comm);
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
