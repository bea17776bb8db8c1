// Loopback comm: in-process ranks (worker threads) exchanging through shared memory. For tests
// and one-process simulation of expert parallelism; never for traffic between machines.
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

#include "expertd/comm.h"
#include "expertd/errors.h"

namespace expertd {
namespace {

using Clock = std::chrono::steady_clock;

// What one rank posts for the collective in progress; peers read it between the two barriers.
struct Post {
  const uint8_t* send = nullptr;
  const int64_t* send_bytes = nullptr;  // [world] (all2allv) or the i64 values (all2all_i64)
};

// A formed (or forming) group. Every collective is: post, barrier, pull from peers, barrier; the
// second barrier keeps each sender's buffer alive until every peer has read it.
struct Group {
  std::string name;
  int world = 0;
  int timeout_ms = 0;
  std::mutex mu;
  std::condition_variable cv;
  // Forming: which ranks have joined.
  std::vector<bool> joined;
  int joined_count = 0;
  bool formed = false;
  // Barrier state: `arrived` ranks are waiting at barrier generation `generation`.
  int arrived = 0;
  uint64_t generation = 0;
  // Once broken (a rank timed out or left), every wait and every later collective fails, so no
  // rank can hang on a peer that will never come.
  std::string broken;
  std::vector<Post> posts;

  // Waits until every rank reached this barrier. Throws if the group breaks or the deadline passes
  // (which breaks it for everyone).
  void barrier(int rank, const char* what) {
    std::unique_lock<std::mutex> lk(mu);
    if (!broken.empty()) fail(ErrorCode::Internal, broken);
    const uint64_t gen = generation;
    if (++arrived == world) {
      arrived = 0;
      ++generation;
      cv.notify_all();
      return;
    }
    const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
    for (;;) {
      // NOTE: the generation is checked before `broken`: a barrier that completed stays completed
      // even if a peer leaves right after it.
      if (generation != gen) return;
      if (!broken.empty()) fail(ErrorCode::Internal, broken);
      if (cv.wait_until(lk, deadline) == std::cv_status::timeout && generation == gen &&
          broken.empty()) {
        broken = "loopback group '" + name + "': rank " + std::to_string(rank) + " waited " +
                 std::to_string(timeout_ms) + " ms in " + what + " for " +
                 std::to_string(world - arrived) + " of " + std::to_string(world) +
                 " ranks; the group is broken";
        cv.notify_all();
        fail(ErrorCode::Internal, broken);
      }
    }
  }

  void leave(int rank) {
    std::lock_guard<std::mutex> lk(mu);
    if (broken.empty())
      broken = "loopback group '" + name + "': rank " + std::to_string(rank) + " has left the group";
    cv.notify_all();
  }
};

std::mutex g_registry_mu;
std::map<std::string, std::shared_ptr<Group>> g_forming;  // groups still waiting for ranks

class LoopbackComm final : public Comm {
 public:
  LoopbackComm(std::shared_ptr<Group> g, int rank) : g_(std::move(g)), rank_(rank) {}
  ~LoopbackComm() override { g_->leave(rank_); }

  int rank() const override { return rank_; }
  int world_size() const override { return g_->world; }
  const char* backend() const override { return "loopback"; }

  void all2allv(const void* send, const int64_t* send_bytes, void* recv,
                const int64_t* recv_bytes) override {
    post(static_cast<const uint8_t*>(send), send_bytes);
    g_->barrier(rank_, "all2allv");
    // Pull what each peer sends to this rank. A size mismatch is reported only after the second
    // barrier, so that the peers are not left waiting.
    std::string mismatch;
    uint8_t* dst = static_cast<uint8_t*>(recv);
    for (int r = 0; r < g_->world; ++r) {
      const Post& src = g_->posts[r];
      int64_t off = 0;
      for (int d = 0; d < rank_; ++d) off += src.send_bytes[d];
      const int64_t n = src.send_bytes[rank_];
      if (n != recv_bytes[r]) {
        if (mismatch.empty())
          mismatch = "all2allv: rank " + std::to_string(r) + " sends " + std::to_string(n) +
                     " bytes to rank " + std::to_string(rank_) + ", which expects " +
                     std::to_string(recv_bytes[r]);
      } else if (n > 0) {
        std::memcpy(dst, src.send + off, static_cast<size_t>(n));
      }
      dst += recv_bytes[r];
    }
    g_->barrier(rank_, "all2allv");
    if (!mismatch.empty()) fail(ErrorCode::Range, mismatch);
  }

  void all2all_i64(const int64_t* send, int64_t* recv) override {
    post(nullptr, send);
    g_->barrier(rank_, "all2all counts");
    for (int r = 0; r < g_->world; ++r) recv[r] = g_->posts[r].send_bytes[rank_];
    g_->barrier(rank_, "all2all counts");
  }

  void barrier() override { g_->barrier(rank_, "barrier"); }

 private:
  void post(const uint8_t* send, const int64_t* values) {
    std::lock_guard<std::mutex> lk(g_->mu);
    g_->posts[rank_] = Post{send, values};
  }

  std::shared_ptr<Group> g_;
  int rank_;
};

}  // namespace

std::shared_ptr<Comm> loopback_join(const std::string& group_name, int world_size, int rank,
                                    int timeout_ms) {
  if (world_size < 1) fail(ErrorCode::Range, "worldSize is " + std::to_string(world_size) + ", expected at least 1");
  if (rank < 0 || rank >= world_size)
    fail(ErrorCode::Range, "rank is " + std::to_string(rank) + ", expected 0.." +
                               std::to_string(world_size - 1));
  std::shared_ptr<Group> g;
  {
    std::lock_guard<std::mutex> lk(g_registry_mu);
    auto it = g_forming.find(group_name);
    if (it == g_forming.end()) {
      g = std::make_shared<Group>();
      g->name = group_name;
      g->world = world_size;
      g->timeout_ms = timeout_ms;
      g->joined.assign(world_size, false);
      g->posts.assign(world_size, Post{});
      g_forming[group_name] = g;
    } else {
      g = it->second;
    }
    std::lock_guard<std::mutex> glk(g->mu);
    if (g->world != world_size)
      fail(ErrorCode::Range, "loopback group '" + group_name + "' is forming with worldSize " +
                                 std::to_string(g->world) + ", got " + std::to_string(world_size));
    if (g->joined[rank])
      fail(ErrorCode::Range, "rank " + std::to_string(rank) + " has already joined loopback group '" +
                                 group_name + "'");
    g->joined[rank] = true;
    if (++g->joined_count == world_size) {
      // Formed: later joins of this name start a new group.
      g->formed = true;
      g_forming.erase(group_name);
      g->cv.notify_all();
    }
  }
  std::unique_lock<std::mutex> lk(g->mu);
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  if (!g->cv.wait_until(lk, deadline, [&] { return g->formed; })) {
    lk.unlock();
    // Withdraw, so that a retry (or another process of ranks) can form the group.
    std::lock_guard<std::mutex> rlk(g_registry_mu);
    std::lock_guard<std::mutex> glk(g->mu);
    if (!g->formed) {
      g->joined[rank] = false;
      const int waiting = --g->joined_count;
      auto it = g_forming.find(group_name);
      if (waiting == 0 && it != g_forming.end() && it->second == g) g_forming.erase(it);
      fail(ErrorCode::InvalidArg,
           "loopback group '" + group_name + "': " + std::to_string(waiting + 1) + " of " +
               std::to_string(world_size) + " ranks joined within " + std::to_string(timeout_ms) +
               " ms");
    }
    // Formed just after the deadline: go ahead.
  }
  return std::make_shared<LoopbackComm>(g, rank);
}

}  // namespace expertd
