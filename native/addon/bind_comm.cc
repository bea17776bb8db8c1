// Bindings for the comm family: a CommGroup object (rank, worldSize, backend, all2allv,
// all2allCounts, barrier, all2allvAsync, setSimulatedLink, dispose) over a native Comm (loopback or Gloo) and its comm
// thread (comm/comm_queue.h). Blocking collectives block the calling JS thread (a worker: the
// engine's or a test's rank), never longer than the group's timeout; async ones return an op whose
// wait(timeoutMs) blocks only until that op is done.
#include <cmath>
#include <list>
#include <memory>
#include <string>
#include <vector>

#include "../comm/comm_queue.h"
#include "args.h"
#include "expertd/comm.h"
#include "register.h"

namespace expertd::addon {
namespace {

// A blocking collective waits on the comm thread at most this long; the backend's own timeout
// (the group's) normally ends it far sooner.
constexpr int64_t kBlockingWaitMs = 3'600'000;

// An async op and the JS buffers it reads and writes, kept alive until it finished. The
// references are touched on the JS thread only.
struct JsOp {
  std::shared_ptr<CommOp> op;
  Napi::ObjectReference send, recv;
};

// Shared by the group object's methods; dispose() stops the comm thread (after its queued ops)
// and drops the Comm (which leaves the group), and so does the collection of the last method as
// a backstop.
struct CommState {
  std::shared_ptr<Comm> comm;
  std::unique_ptr<CommQueue> queue;
  std::list<std::shared_ptr<JsOp>> in_flight;
  std::string label;  // for error messages

  // Releases the buffers of finished async ops (JS thread).
  void sweep() {
    for (auto it = in_flight.begin(); it != in_flight.end();) {
      if (queue && !queue->wait(*(*it)->op, 0)) { ++it; continue; }
      (*it)->send.Reset();
      (*it)->recv.Reset();
      it = in_flight.erase(it);
    }
  }
  void stop() {
    queue.reset();  // joins the comm thread: every queued op has finished
    sweep();
    comm.reset();
  }
  ~CommState() {
    queue.reset();
    // NOTE: collected during environment teardown, deleting references could touch a dead env:
    // leave them to the teardown.
    for (auto& op : in_flight) {
      op->send.SuppressDestruct();
      op->recv.SuppressDestruct();
    }
  }
};

std::shared_ptr<Comm> live(Napi::Env env, CommState& st) {
  if (!st.comm) throw_native(env, Error(ErrorCode::Disposed, st.label + " has been disposed"));
  st.sweep();
  return st.comm;
}

// A blocking collective, in order with the group's async ones.
void run_blocking(Napi::Env env, CommState& st, std::shared_ptr<CommOp> op) {
  guard(env, [&] { st.queue->run(op, kBlockingWaitMs); });
}

Span<double> get_f64(const Napi::CallbackInfo& info, size_t i, const char* name, size_t min_len) {
  Napi::Env env = info.Env();
  Napi::Value v = info[i];
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_float64_array)
    throw_type(env, std::string(name) + " must be a Float64Array");
  auto arr = v.As<Napi::Float64Array>();
  if (arr.ElementLength() < min_len)
    throw_range(env, std::string(name) + ".length is " + std::to_string(arr.ElementLength()) +
                         ", expected at least " + std::to_string(min_len));
  return Span<double>{arr.Data(), arr.ElementLength()};
}

// The first n values of a Float64Array as int64 (each a safe integer, >= 0 when counts).
std::vector<int64_t> to_i64(Napi::Env env, const Span<double>& a, size_t n, const char* name,
                            bool non_negative) {
  std::vector<int64_t> v(n);
  for (size_t r = 0; r < n; ++r) {
    const double d = a.data[r];
    if (!std::isfinite(d) || d != std::floor(d) || std::fabs(d) > 9007199254740991.0 ||
        (non_negative && d < 0))
      throw_range(env, std::string(name) + "[" + std::to_string(r) + "] is " + std::to_string(d) +
                           ", expected " + (non_negative ? "a non-negative" : "an") +
                           " integer");
    v[r] = static_cast<int64_t>(d);
  }
  return v;
}

int64_t sum(const std::vector<int64_t>& v) {
  int64_t s = 0;
  for (int64_t x : v) s += x;
  return s;
}

Napi::Object make_group(Napi::Env env, std::shared_ptr<Comm> comm, const std::string& label) {
  auto st = std::make_shared<CommState>();
  st->queue = std::make_unique<CommQueue>(comm);
  st->comm = std::move(comm);
  st->label = label;
  Napi::Object obj = Napi::Object::New(env);
  const auto ro = napi_enumerable;
  obj.DefineProperties({
      Napi::PropertyDescriptor::Value("rank", Napi::Number::New(env, st->comm->rank()), ro),
      Napi::PropertyDescriptor::Value("worldSize", Napi::Number::New(env, st->comm->world_size()), ro),
      Napi::PropertyDescriptor::Value("backend", Napi::String::New(env, st->comm->backend()), ro),
  });

  obj.Set("all2allv", Napi::Function::New(env, [st](const Napi::CallbackInfo& info) -> Napi::Value {
    Napi::Env env = info.Env();
    expect_args(info, 4, "all2allv");
    std::shared_ptr<Comm> c = live(env, *st);
    const size_t world = static_cast<size_t>(c->world_size());
    Span<uint8_t> send = get_array<uint8_t>(info, 0, "send", 0);
    std::vector<int64_t> send_bytes = to_i64(env, get_f64(info, 1, "sendBytes", world), world, "sendBytes", true);
    Span<uint8_t> recv = get_array<uint8_t>(info, 2, "recv", 0);
    std::vector<int64_t> recv_bytes = to_i64(env, get_f64(info, 3, "recvBytes", world), world, "recvBytes", true);
    if (static_cast<int64_t>(send.length) < sum(send_bytes))
      throw_range(env, "send.length is " + std::to_string(send.length) + ", expected at least " +
                           std::to_string(sum(send_bytes)) + " (the sum of sendBytes)");
    if (static_cast<int64_t>(recv.length) < sum(recv_bytes))
      throw_range(env, "recv.length is " + std::to_string(recv.length) + ", expected at least " +
                           std::to_string(sum(recv_bytes)) + " (the sum of recvBytes)");
    auto op = std::make_shared<CommOp>();
    op->kind = CommOp::Kind::All2allv;
    op->send = send.data;
    op->recv = recv.data;
    op->send_bytes = std::move(send_bytes);
    op->recv_bytes = std::move(recv_bytes);
    run_blocking(env, *st, op);
    return env.Undefined();
  }, "all2allv"));

  // Queues an all2allv on the comm thread and returns at once: {wait(timeoutMs) -> seconds the op
  // took there, done() -> boolean}. send and recv stay referenced until it finished.
  obj.Set("all2allvAsync", Napi::Function::New(env, [st](const Napi::CallbackInfo& info) -> Napi::Value {
    Napi::Env env = info.Env();
    expect_args(info, 4, "all2allvAsync");
    std::shared_ptr<Comm> c = live(env, *st);
    const size_t world = static_cast<size_t>(c->world_size());
    Span<uint8_t> send = get_array<uint8_t>(info, 0, "send", 0);
    std::vector<int64_t> send_bytes = to_i64(env, get_f64(info, 1, "sendBytes", world), world, "sendBytes", true);
    Span<uint8_t> recv = get_array<uint8_t>(info, 2, "recv", 0);
    std::vector<int64_t> recv_bytes = to_i64(env, get_f64(info, 3, "recvBytes", world), world, "recvBytes", true);
    if (static_cast<int64_t>(send.length) < sum(send_bytes))
      throw_range(env, "send.length is " + std::to_string(send.length) + ", expected at least " +
                           std::to_string(sum(send_bytes)) + " (the sum of sendBytes)");
    if (static_cast<int64_t>(recv.length) < sum(recv_bytes))
      throw_range(env, "recv.length is " + std::to_string(recv.length) + ", expected at least " +
                           std::to_string(sum(recv_bytes)) + " (the sum of recvBytes)");
    auto js = std::make_shared<JsOp>();
    js->op = std::make_shared<CommOp>();
    js->op->kind = CommOp::Kind::All2allv;
    js->op->send = send.data;
    js->op->recv = recv.data;
    js->op->send_bytes = std::move(send_bytes);
    js->op->recv_bytes = std::move(recv_bytes);
    js->send = Napi::Persistent(info[0].As<Napi::Object>());
    js->recv = Napi::Persistent(info[2].As<Napi::Object>());
    guard(env, [&] { st->queue->submit(js->op); });
    st->in_flight.push_back(js);
    std::shared_ptr<CommOp> op = js->op;
    Napi::Object handle = Napi::Object::New(env);
    handle.Set("wait", Napi::Function::New(env, [st, op](const Napi::CallbackInfo& info) -> Napi::Value {
      Napi::Env env = info.Env();
      expect_args(info, 1, "wait");
      const int64_t timeout_ms = get_int(info, 0, "timeoutMs", 0, 2147483647);
      if (!st->queue) throw_native(env, Error(ErrorCode::Disposed, st->label + " has been disposed"));
      if (!st->queue->wait(*op, timeout_ms))
        throw_native(env, Error(ErrorCode::Internal, st->label + ": all2allv did not finish within " +
                                                         std::to_string(timeout_ms) + " ms"));
      st->sweep();
      guard(env, [&] { CommQueue::rethrow(*op); });
      return Napi::Number::New(env, op->seconds);
    }, "wait"));
    handle.Set("done", Napi::Function::New(env, [st, op](const Napi::CallbackInfo& info) -> Napi::Value {
      return Napi::Boolean::New(info.Env(), !st->queue || st->queue->wait(*op, 0));
    }, "done"));
    return handle;
  }, "all2allvAsync"));

  // Benchmarks: a simulated link of bytesPerSecond for every later all2allv (0: off).
  obj.Set("setSimulatedLink", Napi::Function::New(env, [st](const Napi::CallbackInfo& info) -> Napi::Value {
    Napi::Env env = info.Env();
    expect_args(info, 1, "setSimulatedLink");
    live(env, *st);
    if (!info[0].IsNumber()) throw_type(env, "bytesPerSecond must be a number");
    const double bps = info[0].As<Napi::Number>().DoubleValue();
    if (!std::isfinite(bps) || bps < 0)
      throw_range(env, "bytesPerSecond is " + std::to_string(bps) + ", expected a finite number >= 0");
    st->queue->set_link(bps);
    return env.Undefined();
  }, "setSimulatedLink"));

  obj.Set("all2allCounts", Napi::Function::New(env, [st](const Napi::CallbackInfo& info) -> Napi::Value {
    Napi::Env env = info.Env();
    expect_args(info, 2, "all2allCounts");
    std::shared_ptr<Comm> c = live(env, *st);
    const size_t world = static_cast<size_t>(c->world_size());
    std::vector<int64_t> send = to_i64(env, get_f64(info, 0, "send", world), world, "send", false);
    Span<double> recv = get_f64(info, 1, "recv", world);
    auto op = std::make_shared<CommOp>();
    op->kind = CommOp::Kind::All2allI64;
    op->send_bytes = std::move(send);
    op->recv_bytes.assign(world, 0);
    run_blocking(env, *st, op);
    for (size_t r = 0; r < world; ++r) recv.data[r] = static_cast<double>(op->recv_bytes[r]);
    return env.Undefined();
  }, "all2allCounts"));

  obj.Set("barrier", Napi::Function::New(env, [st](const Napi::CallbackInfo& info) -> Napi::Value {
    Napi::Env env = info.Env();
    live(env, *st);
    auto op = std::make_shared<CommOp>();
    op->kind = CommOp::Kind::Barrier;
    run_blocking(env, *st, op);
    return env.Undefined();
  }, "barrier"));

  obj.Set("dispose", Napi::Function::New(env, [st](const Napi::CallbackInfo& info) -> Napi::Value {
    st->stop();  // idempotent
    return info.Env().Undefined();
  }, "dispose"));
  return obj;
}

Napi::Value loopback_join_js(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 4, "loopbackJoin");
  if (!info[0].IsString()) throw_type(env, "group must be a string");
  const std::string name = info[0].As<Napi::String>().Utf8Value();
  if (name.empty()) throw_range(env, "group must not be empty");
  const int64_t world = get_int(info, 1, "worldSize", 1, 4096);
  const int64_t rank = get_int(info, 2, "rank", 0, world - 1);
  const int64_t timeout_ms = get_int(info, 3, "timeoutMs", 0, 2147483647);
  std::shared_ptr<Comm> comm;
  try {
    comm = loopback_join(name, static_cast<int>(world), static_cast<int>(rank),
                         static_cast<int>(timeout_ms));
  } catch (const Error& err) {
    // comm.h gives a join timeout the code E_INVALID_ARG (the ranks asked for never came), but it
    // is not a TypeError: raise a plain Error carrying that code.
    if (err.code() != ErrorCode::InvalidArg) throw_native(env, err);
    Napi::Error e = Napi::Error::New(env, err.what());
    e.Set("code", Napi::String::New(env, error_code_name(err.code())));
    throw e;
  }
  return make_group(env, std::move(comm),
                    "comm group '" + name + "' rank " + std::to_string(rank));
}

int64_t option_int(Napi::Env env, const Napi::Object& o, const char* name, int64_t min, int64_t max) {
  Napi::Value v = o.Get(name);
  if (!v.IsNumber()) throw_type(env, std::string("options.") + name + " must be a number");
  const double d = v.As<Napi::Number>().DoubleValue();
  if (!std::isfinite(d) || d != std::floor(d))
    throw_type(env, std::string("options.") + name + " must be an integer, got " + std::to_string(d));
  if (d < static_cast<double>(min) || d > static_cast<double>(max))
    throw_range(env, std::string("options.") + name + " is " + std::to_string(static_cast<int64_t>(d)) +
                         ", expected " + std::to_string(min) + ".." + std::to_string(max));
  return static_cast<int64_t>(d);
}

std::string option_string(Napi::Env env, const Napi::Object& o, const char* name, bool required) {
  Napi::Value v = o.Get(name);
  if (!required && (v.IsUndefined() || v.IsNull())) return "";
  if (!v.IsString()) throw_type(env, std::string("options.") + name + " must be a string");
  std::string s = v.As<Napi::String>().Utf8Value();
  if (s.empty()) throw_range(env, std::string("options.") + name + " must not be empty");
  return s;
}

// glooJoin({ host, port, prefix, rank, worldSize, timeoutMs, listenHost? }): blocks the calling
// thread (a worker's, never the main thread's) until the group is connected.
Napi::Value gloo_join_js(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 1, "glooJoin");
  if (!info[0].IsObject()) throw_type(env, "glooJoin options must be an object");
  Napi::Object o = info[0].As<Napi::Object>();
  GlooJoinOptions opt;
  opt.host = option_string(env, o, "host", true);
  opt.port = static_cast<int>(option_int(env, o, "port", 1, 65535));
  opt.prefix = option_string(env, o, "prefix", true);
  opt.world_size = static_cast<int>(option_int(env, o, "worldSize", 1, 4096));
  opt.rank = static_cast<int>(option_int(env, o, "rank", 0, opt.world_size - 1));
  opt.timeout_ms = static_cast<int>(option_int(env, o, "timeoutMs", 1, 2147483647));
  opt.listen_host = option_string(env, o, "listenHost", false);
  std::shared_ptr<Comm> comm;
  guard(env, [&] { comm = gloo_join(opt); });
  return make_group(env, std::move(comm),
                    "comm group '" + opt.prefix + "' rank " + std::to_string(opt.rank));
}

}  // namespace

void register_comm(Napi::Env env, Napi::Object exports) {
  exports.Set("loopbackJoin", Napi::Function::New(env, loopback_join_js, "loopbackJoin"));
  exports.Set("glooJoin", Napi::Function::New(env, gloo_join_js, "glooJoin"));
}

}  // namespace expertd::addon
