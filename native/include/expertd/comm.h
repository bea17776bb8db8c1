// The comm interface the MoE layer's dispatch/combine go through. A single rank is the identity;
// the loopback backend joins in-process ranks (worker threads) for tests and simulation; the Gloo
// backend joins CPU ranks in separate processes or hosts (TCP); the NCCL backend (full build only)
// is the production path between GPUs and nodes.
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

// Multi-process CPU group over Gloo's TCP transport, rendezvous through the store of
// src/dist/store.ts at host:port (keys under `prefix`/, so groups sharing a store do not mix).
// Blocks the calling thread until world_size ranks have connected (or timeout_ms: E_COMM); every
// later collective fails with E_COMM (never hangs) when a peer is lost or silent for timeout_ms.
// `listen_host` is the address peers reach this rank at (empty: the local address of the
// connection to the store). A Comm may be used from one thread other than the joining one; its
// collectives are serialised.
struct GlooJoinOptions {
  std::string host;
  int port = 0;
  std::string prefix;
  int rank = 0;
  int world_size = 0;
  int timeout_ms = 0;
  std::string listen_host;
};
// Whether this build has Gloo (else gloo_join throws E_UNSUPPORTED).
bool gloo_compiled();
std::shared_ptr<Comm> gloo_join(const GlooJoinOptions& options);

}  // namespace expertd
