// The comm interface the MoE layer's dispatch/combine go through. A single rank is the identity;
// the loopback backend joins in-process ranks (worker threads) for tests and simulation; the NCCL
// backend (full build only) is the production path between GPUs and nodes.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

namespace expertd {

class Comm {
 public:
  virtual ~Comm() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  virtual const char* backend() const = 0;
  // Every rank sends send_bytes[r] bytes (consecutive in send, in rank order) to rank r and
  // receives recv_bytes[r] bytes from rank r into recv (consecutive, in rank order).
  virtual void all2allv(const void* send, const int64_t* send_bytes, void* recv,
                        const int64_t* recv_bytes) = 0;
  // Each rank contributes world_size int64 values (one per peer); rank r receives value r of
  // every rank: the counts exchange that precedes an all2allv.
  virtual void all2all_i64(const int64_t* send, int64_t* recv) = 0;
  virtual void barrier() = 0;
};

// In-process group: the first `world_size` joins of `group_name` form it; join blocks until all
// ranks have joined (or timeout_ms elapses: E_INVALID_ARG).
std::shared_ptr<Comm> loopback_join(const std::string& group_name, int world_size, int rank,
                                    int timeout_ms);

}  // namespace expertd
