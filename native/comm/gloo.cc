// Gloo comm: CPU ranks in separate processes (or hosts) exchanging over Gloo's TCP transport
// (gloo::alltoallv, gloo::alltoall), with the rendezvous through the store of
// src/dist/store.ts (a blocking C++ client of its wire protocol). Compiled to a clear error when
// the build has no Gloo (EXPERTD_HAVE_GLOO unset).
#include <string>

#include "expertd/comm.h"
#include "expertd/errors.h"

#ifdef EXPERTD_HAVE_GLOO
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include <gloo/alltoall.h>
#include <gloo/alltoallv.h>
#include <gloo/common/error.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/device.h>
#include <gloo/transport/tcp/address.h>
#endif

namespace expertd {

#ifndef EXPERTD_HAVE_GLOO

bool gloo_compiled() { return false; }

std::shared_ptr<Comm> gloo_join(const GlooJoinOptions&) {
  fail(ErrorCode::Unsupported,
       "multi-process CPU ranks are unavailable: this build has no Gloo; apt-get install "
       "libgloo-dev and rebuild");
}

#else

namespace {

using Clock = std::chrono::steady_clock;
using Ms = std::chrono::milliseconds;

int ms_left(Clock::time_point deadline) {
  const auto left = std::chrono::duration_cast<Ms>(deadline - Clock::now()).count();
  return left > 0 ? static_cast<int>(left) : 0;
}

// A blocking client of the rendezvous store (protocol: the comment at the top of
// src/dist/store.ts). One request at a time; every read and write is bounded by a deadline.
class StoreConn final : public gloo::rendezvous::Store {
 public:
  StoreConn(const std::string& host, int port, std::string prefix, std::string label,
            Clock::time_point deadline)
      : prefix_(std::move(prefix)), label_(std::move(label)), deadline_(deadline) {
    address_ = host + ":" + std::to_string(port);
    connect_with_retries(host, port);
  }
  ~StoreConn() override {
    if (fd_ >= 0) ::close(fd_);
  }

  // The local address of the connection to the store: the interface peers can reach us on.
  std::string local_address() const {
    sockaddr_storage ss{};
    socklen_t len = sizeof(ss);
    if (getsockname(fd_, reinterpret_cast<sockaddr*>(&ss), &len) != 0)
      fail(ErrorCode::Comm, label_ + ": getsockname: " + std::strerror(errno));
    char buf[INET6_ADDRSTRLEN] = {0};
    const void* a = ss.ss_family == AF_INET6
                        ? static_cast<const void*>(&reinterpret_cast<sockaddr_in6*>(&ss)->sin6_addr)
                        : static_cast<const void*>(&reinterpret_cast<sockaddr_in*>(&ss)->sin_addr);
    if (!inet_ntop(ss.ss_family, a, buf, sizeof(buf)))
      fail(ErrorCode::Comm, label_ + ": inet_ntop: " + std::strerror(errno));
    return buf;
  }

  void set(const std::string& key, const std::vector<char>& data) override {
    std::vector<uint8_t> body;
    begin(body, 1);
    put_bytes(body, prefix_ + key);
    put_bytes(body, std::string(data.begin(), data.end()));
    expect_ok(request(body, deadline_), "set", key);
  }

  std::vector<char> get(const std::string& key) override {
    std::vector<char> v = get_until(key, deadline_);
    note_peer_address(key, v);
    return v;
  }

  // The address each peer rank listens on for its pair with this rank, as Gloo prints it ("[ip]:port"),
  // read from the blobs connectFullMesh exchanges (rank r's key holds one address per peer of r, in
  // rank order without r). Only for naming peers in errors: an unexpected layout names none.
  std::vector<std::pair<std::string, int>> peer_names;
  int rank = -1, world_size = 0;

  void wait(const std::vector<std::string>& keys) override {
    for (const auto& k : keys) get_until(k, deadline_);
  }

  void wait(const std::vector<std::string>& keys, const Ms& timeout) override {
    const auto d = std::min(deadline_, Clock::now() + timeout);
    for (const auto& k : keys) get_until(k, d);
  }

 private:
  void note_peer_address(const std::string& key, const std::vector<char>& blob) {
    if (world_size < 2 || key.empty() || key.find_first_not_of("0123456789") != std::string::npos) return;
    const int peer = std::atoi(key.c_str());
    if (peer == rank || peer < 0 || peer >= world_size || blob.size() % (world_size - 1) != 0) return;
    const size_t each = blob.size() / (world_size - 1);
    const size_t at = static_cast<size_t>(rank < peer ? rank : rank - 1) * each;
    try {
      gloo::transport::tcp::Address a(std::vector<char>(blob.begin() + at, blob.begin() + at + each));
      peer_names.emplace_back(a.str(), peer);
    } catch (const std::exception&) {
    }
  }

  struct Reply {
    uint8_t status = 0;
    std::vector<uint8_t> payload;
  };

  std::vector<char> get_until(const std::string& key, Clock::time_point deadline) {
    const int wait_ms = ms_left(deadline);
    std::vector<uint8_t> body;
    begin(body, 2);
    put_u32(body, static_cast<uint32_t>(wait_ms));
    put_bytes(body, prefix_ + key);
    // The store answers TIMEOUT after wait_ms; a second more covers a store that stops answering.
    Reply r = request(body, deadline + Ms(1000));
    if (r.status == 1) {
      std::string who = "key '" + prefix_ + key + "'";
      if (!key.empty() && key.find_first_not_of("0123456789") == std::string::npos)
        who = "rank " + key + " to join (its address, store key '" + prefix_ + key + "')";
      fail(ErrorCode::Comm, label_ + ": waited " + std::to_string(wait_ms) + " ms for " + who +
                                " on the store at " + address_ + "; it never came");
    }
    expect_ok(r, "get", key);
    if (r.payload.size() < 4) fail(ErrorCode::Comm, label_ + ": malformed answer from the store at " + address_);
    const uint32_t n = get_u32(r.payload.data());
    if (r.payload.size() != 4 + static_cast<size_t>(n))
      fail(ErrorCode::Comm, label_ + ": malformed answer from the store at " + address_);
    return std::vector<char>(r.payload.begin() + 4, r.payload.end());
  }

  void expect_ok(const Reply& r, const char* op, const std::string& key) {
    if (r.status == 0) return;
    std::string msg = "status " + std::to_string(r.status);
    if (r.status == 2 && r.payload.size() >= 4) msg = std::string(r.payload.begin() + 4, r.payload.end());
    fail(ErrorCode::Comm, label_ + ": store " + op + "('" + prefix_ + key + "') failed: " + msg);
  }

  void begin(std::vector<uint8_t>& body, uint8_t op) {
    body.push_back(op);
    put_u32(body, ++next_id_);
  }
  static void put_u32(std::vector<uint8_t>& b, uint32_t v) {
    for (int i = 0; i < 4; ++i) b.push_back(static_cast<uint8_t>(v >> (8 * i)));
  }
  static uint32_t get_u32(const uint8_t* p) {
    return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
  }
  static void put_bytes(std::vector<uint8_t>& b, const std::string& s) {
    put_u32(b, static_cast<uint32_t>(s.size()));
    b.insert(b.end(), s.begin(), s.end());
  }

  Reply request(const std::vector<uint8_t>& body, Clock::time_point deadline) {
    std::vector<uint8_t> frame;
    put_u32(frame, static_cast<uint32_t>(body.size()));
    frame.insert(frame.end(), body.begin(), body.end());
    send_all(frame.data(), frame.size(), deadline);
    uint8_t head[4];
    recv_all(head, 4, deadline);
    const uint32_t n = get_u32(head);
    if (n < 5 || n > (64u << 20) + 4096) fail(ErrorCode::Comm, label_ + ": malformed frame from the store at " + address_);
    std::vector<uint8_t> in(n);
    recv_all(in.data(), n, deadline);
    if (get_u32(in.data()) != next_id_)
      fail(ErrorCode::Comm, label_ + ": the store at " + address_ + " answered out of turn");
    Reply r;
    r.status = in[4];
    r.payload.assign(in.begin() + 5, in.end());
    return r;
  }

  // Waits for fd readiness until the deadline; throws E_COMM on timeout.
  void wait_fd(short events, Clock::time_point deadline, const char* what) {
    for (;;) {
      pollfd p{fd_, events, 0};
      const int rc = ::poll(&p, 1, ms_left(deadline));
      if (rc > 0) return;
      if (rc == 0)
        fail(ErrorCode::Comm, label_ + ": the store at " + address_ + " did not answer (" + what + ") in time");
      if (errno != EINTR) fail(ErrorCode::Comm, label_ + ": poll: " + std::strerror(errno));
    }
  }

  void send_all(const uint8_t* p, size_t n, Clock::time_point deadline) {
    while (n > 0) {
      wait_fd(POLLOUT, deadline, "send");
      const ssize_t k = ::send(fd_, p, n, MSG_NOSIGNAL);
      if (k < 0) {
        if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
        fail(ErrorCode::Comm, label_ + ": connection to the store at " + address_ + " lost: " + std::strerror(errno));
      }
      p += k;
      n -= static_cast<size_t>(k);
    }
  }

  void recv_all(uint8_t* p, size_t n, Clock::time_point deadline) {
    while (n > 0) {
      wait_fd(POLLIN, deadline, "recv");
      const ssize_t k = ::recv(fd_, p, n, 0);
      if (k == 0) fail(ErrorCode::Comm, label_ + ": connection to the store at " + address_ + " lost");
      if (k < 0) {
        if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
        fail(ErrorCode::Comm, label_ + ": connection to the store at " + address_ + " lost: " + std::strerror(errno));
      }
      p += k;
      n -= static_cast<size_t>(k);
    }
  }

  // Rank 0's store may come up after this rank: retry until the deadline.
  void connect_with_retries(const std::string& host, int port) {
    std::string last = "timed out";
    int delay_ms = 20;
    for (;;) {
      addrinfo hints{};
      hints.ai_family = AF_UNSPEC;
      hints.ai_socktype = SOCK_STREAM;
      addrinfo* res = nullptr;
      const int gai = getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res);
      if (gai != 0) {
        last = std::string("getaddrinfo: ") + gai_strerror(gai);
      } else {
        for (addrinfo* a = res; a && fd_ < 0; a = a->ai_next) {
          const int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
          if (fd < 0) { last = std::strerror(errno); continue; }
          int rc = ::connect(fd, a->ai_addr, a->ai_addrlen);
          if (rc != 0 && errno == EINPROGRESS) {
            pollfd p{fd, POLLOUT, 0};
            rc = ::poll(&p, 1, std::max(1, ms_left(deadline_)));
            int err = 0;
            socklen_t len = sizeof(err);
            if (rc > 0 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err == 0) rc = 0;
            else { errno = rc == 0 ? ETIMEDOUT : err; rc = -1; }
          }
          if (rc == 0) {
            const int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
            fd_ = fd;
          } else {
            last = std::strerror(errno);
            ::close(fd);
          }
        }
        freeaddrinfo(res);
      }
      if (fd_ >= 0) return;
      const int left = ms_left(deadline_);
      if (left <= 0) break;
      std::this_thread::sleep_for(Ms(std::min(delay_ms, left)));
      delay_ms = std::min(delay_ms * 2, 500);
    }
    fail(ErrorCode::Comm, label_ + ": could not connect to the store at " + address_ + " (" + last + ")");
  }

  std::string prefix_;
  std::string label_;
  std::string address_;
  Clock::time_point deadline_;
  int fd_ = -1;
  uint32_t next_id_ = 0;
};

class GlooComm final : public Comm {
 public:
  GlooComm(std::shared_ptr<gloo::transport::Device> dev,
           std::shared_ptr<gloo::rendezvous::Context> ctx, int timeout_ms, std::string label)
      : dev_(std::move(dev)), ctx_(std::move(ctx)), timeout_(timeout_ms), label_(std::move(label)) {
  }

  // Each peer's address as Gloo prints it in its errors, to name the rank behind a failure.
  std::vector<std::pair<std::string, int>> peer_names_;

  ~GlooComm() override {
    // NOTE: the context (its pairs) before the device whose loop thread serves them.
    ctx_.reset();
    dev_.reset();
  }

  int rank() const override { return ctx_->rank; }
  int world_size() const override { return ctx_->size; }
  const char* backend() const override { return "gloo"; }

  void all2allv(const void* send, const int64_t* send_bytes, void* recv,
                const int64_t* recv_bytes) override {
    const int world = ctx_->size, me = ctx_->rank;
    std::lock_guard<std::mutex> lk(mu_);
    // What every peer will send this rank, checked against recv_bytes before any data moves.
    // NOTE: Gloo does not check it: a rank expecting 16 bytes from a peer that sent 8 returned
    // success with half its buffer unwritten (gloo.test.ts "sizes that do not match", seen with
    // this check removed). The cost is one small all-to-all per all2allv.
    std::vector<int64_t> incoming(world);
    run("all2allv", [&] { exchange_i64(send_bytes, incoming.data()); });
    for (int r = 0; r < world; ++r) {
      if (incoming[r] != recv_bytes[r]) {
        broken_ = label_ + ": all2allv: rank " + std::to_string(r) + " sends " +
                  std::to_string(incoming[r]) + " bytes to rank " + std::to_string(me) +
                  ", which expects " + std::to_string(recv_bytes[r]) + "; the group is broken";
        fail(ErrorCode::Range, broken_);
      }
    }
    run("all2allv", [&] {
      static char empty = 0;  // Gloo wants a pointer even for zero bytes
      gloo::AlltoallvOptions opts(ctx_);
      opts.setInput(send ? const_cast<char*>(static_cast<const char*>(send)) : &empty,
                    std::vector<int64_t>(send_bytes, send_bytes + world));
      opts.setOutput(recv ? static_cast<char*>(recv) : &empty,
                     std::vector<int64_t>(recv_bytes, recv_bytes + world));
      opts.setTag(next_tag());
      opts.setTimeout(timeout_);
      gloo::alltoallv(opts);
    });
  }

  void all2all_i64(const int64_t* send, int64_t* recv) override {
    std::lock_guard<std::mutex> lk(mu_);
    run("all2all counts", [&] { exchange_i64(send, recv); });
  }

  // A one-value all-to-all: no rank leaves it before every rank has entered it. NOTE: not
  // gloo::barrier, which took 4.0 ms per call at 3 ranks on loopback TCP (0.07 ms at 2) while a
  // one-value all-to-all took 0.1 ms in the same processes (medians of 40 calls, two runs, while
  // writing this; `npm run bench -- comm` times this barrier).
  void barrier() override {
    std::lock_guard<std::mutex> lk(mu_);
    std::vector<int64_t> zeros(static_cast<size_t>(ctx_->size) * 2, 0);
    run("barrier", [&] { exchange_i64(zeros.data(), zeros.data() + ctx_->size); });
  }

 private:
  uint32_t next_tag() { return tag_++; }

  void exchange_i64(const int64_t* send, int64_t* recv) {
    gloo::AlltoallOptions opts(ctx_);
    opts.setInput(const_cast<int64_t*>(send), static_cast<size_t>(ctx_->size));
    opts.setOutput(recv, static_cast<size_t>(ctx_->size));
    opts.setTag(next_tag());
    opts.setTimeout(timeout_);
    gloo::alltoall(opts);
  }

  // Runs one Gloo call; any failure breaks the group for good (a peer may be gone, the pairs are
  // in an unknown state) and becomes E_COMM naming this rank and Gloo's reason (which names the
  // peer's address when it knows it).
  template <typename F>
  void run(const char* what, F&& fn) {
    if (!broken_.empty()) fail(ErrorCode::Comm, broken_);
    try {
      fn();
    } catch (const std::exception& e) {
      std::string why = e.what();
      for (const auto& [address, r] : peer_names_)
        if (why.find(address) != std::string::npos) { why += " (rank " + std::to_string(r) + ")"; break; }
      broken_ = label_ + ": " + what + " failed: " + why + "; the group is broken";
      fail(ErrorCode::Comm, broken_);
    }
  }

  std::shared_ptr<gloo::transport::Device> dev_;
  std::shared_ptr<gloo::rendezvous::Context> ctx_;
  Ms timeout_;
  std::string label_;
  std::mutex mu_;        // one collective at a time, from whichever thread
  std::string broken_;   // set once a collective failed
  uint32_t tag_ = 1;
};

}  // namespace

bool gloo_compiled() { return true; }

std::shared_ptr<Comm> gloo_join(const GlooJoinOptions& o) {
  if (o.world_size < 1) fail(ErrorCode::Range, "worldSize is " + std::to_string(o.world_size) + ", expected at least 1");
  if (o.rank < 0 || o.rank >= o.world_size)
    fail(ErrorCode::Range, "rank is " + std::to_string(o.rank) + ", expected 0.." + std::to_string(o.world_size - 1));
  if (o.timeout_ms <= 0) fail(ErrorCode::Range, "timeoutMs is " + std::to_string(o.timeout_ms) + ", expected > 0");
  const std::string label = "gloo group '" + o.prefix + "' rank " + std::to_string(o.rank) + "/" +
                            std::to_string(o.world_size);
  const auto deadline = Clock::now() + Ms(o.timeout_ms);
  try {
    StoreConn store(o.host, o.port, o.prefix + "/", label, deadline);
    store.rank = o.rank;
    store.world_size = o.world_size;
    gloo::transport::tcp::attr attr;
    attr.hostname = o.listen_host.empty() ? store.local_address() : o.listen_host;
    auto dev = gloo::transport::tcp::CreateDevice(attr);
    auto ctx = std::make_shared<gloo::rendezvous::Context>(o.rank, o.world_size);
    ctx->setTimeout(Ms(o.timeout_ms));
    ctx->connectFullMesh(store, dev);
    auto comm = std::make_shared<GlooComm>(std::move(dev), std::move(ctx), o.timeout_ms, label);
    comm->peer_names_ = std::move(store.peer_names);
    return comm;
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    fail(ErrorCode::Comm, label + ": join failed: " + e.what());
  }
}

#endif  // EXPERTD_HAVE_GLOO

}  // namespace expertd
