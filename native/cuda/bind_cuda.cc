// JS bindings of the CUDA backend (full build): device buffers, pinned host buffers, streams,
// events and expert tables as handles, copies, and one function per op (all prefixed `cuda`).
// Ops enqueue on a stream (the device's default stream when none is given) and return at once.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "../addon/args.h"
#include "../addon/deltanet_args.h"
#include "../addon/register.h"
#include "../addon/sampling_args.h"
#include "expertd/cuda_backend.h"
#include "expertd/cuda_quant.h"

namespace expertd::addon {
namespace {

using cuda::DeviceMem;
using cuda::Stream;

[[noreturn]] void throw_disposed(Napi::Env env, const std::string& what) {
  Napi::Error e = Napi::Error::New(env, what + " has been disposed");
  e.Set("code", Napi::String::New(env, "E_DISPOSED"));
  throw e;
}

// Per-env constructors of the handle classes (the addon's instance data belongs to handles.h).
struct Ctors {
  Napi::FunctionReference buffer, stream, event, table;
};
std::mutex g_ctors_mu;
std::map<napi_env, Ctors*> g_ctors;

Ctors& ctors(Napi::Env env) {
  std::lock_guard<std::mutex> lock(g_ctors_mu);
  return *g_ctors.at(env);
}

// ------------------------------------------------------------------------------- CudaBuffer
class BufferHandle : public Napi::ObjectWrap<BufferHandle> {
 public:
  static Napi::Function define(Napi::Env env) {
    return DefineClass(env, "CudaBuffer",
                       {InstanceMethod("dispose", &BufferHandle::dispose),
                        InstanceMethod("view", &BufferHandle::view),
                        InstanceAccessor("sizeBytes", &BufferHandle::size_bytes, nullptr),
                        InstanceAccessor("device", &BufferHandle::device, nullptr),
                        InstanceAccessor("disposed", &BufferHandle::disposed, nullptr)});
  }
  struct Init {
    std::shared_ptr<DeviceMem> mem;
    size_t offset, size;
  };
  static Napi::Object create(Napi::Env env, Init init) {
    auto ext = Napi::External<Init>::New(env, &init);
    return ctors(env).buffer.New({ext});
  }
  explicit BufferHandle(const Napi::CallbackInfo& info) : Napi::ObjectWrap<BufferHandle>(info) {
    if (info.Length() != 1 || !info[0].IsExternal())
      throw_type(info.Env(), "CudaBuffer cannot be constructed directly; use cudaBuffer()");
    Init* init = info[0].As<Napi::External<Init>>().Data();
    mem_ = init->mem;
    offset_ = init->offset;
    size_ = init->size;
  }
  char* ptr(Napi::Env env, const std::string& name) const {
    if (!mem_) throw_disposed(env, name);
    return static_cast<char*>(mem_->ptr) + offset_;
  }
  size_t size() const { return size_; }
  const std::shared_ptr<DeviceMem>& mem() const { return mem_; }
  size_t offset() const { return offset_; }

 private:
  Napi::Value dispose(const Napi::CallbackInfo& info) {
    mem_.reset();  // the block returns to the cache when its last view goes
    return info.Env().Undefined();
  }
  // view(offsetBytes, sizeBytes): a handle on a byte range sharing this allocation.
  Napi::Value view(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    expect_args(info, 2, "view");
    if (!mem_) throw_disposed(env, "buffer");
    const int64_t off = get_int(info, 0, "offsetBytes", 0, static_cast<int64_t>(size_));
    const int64_t len = get_int(info, 1, "sizeBytes", 0, static_cast<int64_t>(size_) - off);
    return create(env, Init{mem_, offset_ + static_cast<size_t>(off), static_cast<size_t>(len)});
  }
  Napi::Value size_bytes(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), static_cast<double>(size_));
  }
  Napi::Value device(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), mem_ ? mem_->device : -1);
  }
  Napi::Value disposed(const Napi::CallbackInfo& info) {
    return Napi::Boolean::New(info.Env(), !mem_);
  }
  std::shared_ptr<DeviceMem> mem_;
  size_t offset_ = 0, size_ = 0;
};

// ------------------------------------------------------------------------------- CudaStream
class StreamHandle : public Napi::ObjectWrap<StreamHandle> {
 public:
  static Napi::Function define(Napi::Env env) {
    return DefineClass(env, "CudaStream",
                       {InstanceMethod("synchronize", &StreamHandle::synchronize),
                        InstanceMethod("query", &StreamHandle::query),
                        InstanceMethod("waitEvent", &StreamHandle::wait_event),
                        InstanceMethod("dispose", &StreamHandle::dispose),
                        InstanceAccessor("disposed", &StreamHandle::disposed, nullptr)});
  }
  // new CudaStream(priority = 0): lower numbers are higher priority (cudaStreamCreateWithPriority).
  explicit StreamHandle(const Napi::CallbackInfo& info) : Napi::ObjectWrap<StreamHandle>(info) {
    int priority = 0;
    if (info.Length() > 0 && !is_nullish(info[0]))
      priority = static_cast<int>(get_int(info, 0, "priority", -1000, 1000));
    guard(info.Env(), [&] { s_ = cuda::stream_create(priority); });
  }
  ~StreamHandle() override { cuda::stream_destroy(s_); }
  Stream get(Napi::Env env) const {
    if (!s_) throw_disposed(env, "stream");
    return s_;
  }

 private:
  Napi::Value synchronize(const Napi::CallbackInfo& info) {
    guard(info.Env(), [&] { cuda::stream_synchronize(get(info.Env())); });
    return info.Env().Undefined();
  }
  Napi::Value query(const Napi::CallbackInfo& info) {
    bool done = false;
    guard(info.Env(), [&] { done = cuda::stream_query(get(info.Env())); });
    return Napi::Boolean::New(info.Env(), done);
  }
  Napi::Value wait_event(const Napi::CallbackInfo& info);
  Napi::Value dispose(const Napi::CallbackInfo& info) {
    cuda::stream_destroy(s_);
    s_ = nullptr;
    return info.Env().Undefined();
  }
  Napi::Value disposed(const Napi::CallbackInfo& info) {
    return Napi::Boolean::New(info.Env(), !s_);
  }
  Stream s_ = nullptr;
};

// ------------------------------------------------------------------------------- CudaEvent
class EventHandle : public Napi::ObjectWrap<EventHandle> {
 public:
  static Napi::Function define(Napi::Env env) {
    return DefineClass(env, "CudaEvent",
                       {InstanceMethod("record", &EventHandle::record),
                        InstanceMethod("synchronize", &EventHandle::synchronize),
                        InstanceMethod("query", &EventHandle::query),
                        InstanceMethod("elapsedMs", &EventHandle::elapsed_ms),
                        InstanceMethod("dispose", &EventHandle::dispose)});
  }
  // new CudaEvent(timing = false)
  explicit EventHandle(const Napi::CallbackInfo& info) : Napi::ObjectWrap<EventHandle>(info) {
    const bool timing = info.Length() > 0 && !is_nullish(info[0]) && get_bool(info, 0, "timing");
    guard(info.Env(), [&] { e_ = cuda::event_create(timing); });
  }
  ~EventHandle() override { cuda::event_destroy(e_); }
  cuda::Event get(Napi::Env env) const {
    if (!e_) throw_disposed(env, "event");
    return e_;
  }

 private:
  Napi::Value record(const Napi::CallbackInfo& info);
  Napi::Value synchronize(const Napi::CallbackInfo& info) {
    guard(info.Env(), [&] { cuda::event_synchronize(get(info.Env())); });
    return info.Env().Undefined();
  }
  Napi::Value query(const Napi::CallbackInfo& info) {
    bool done = false;
    guard(info.Env(), [&] { done = cuda::event_query(get(info.Env())); });
    return Napi::Boolean::New(info.Env(), done);
  }
  // end.elapsedMs(start)
  Napi::Value elapsed_ms(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    expect_args(info, 1, "elapsedMs");
    if (!info[0].IsObject() || !info[0].As<Napi::Object>().InstanceOf(ctors(env).event.Value()))
      throw_type(env, "start must be a CudaEvent");
    EventHandle* start = EventHandle::Unwrap(info[0].As<Napi::Object>());
    float ms = 0.0f;
    guard(env, [&] { ms = cuda::event_elapsed_ms(start->get(env), get(env)); });
    return Napi::Number::New(env, ms);
  }
  Napi::Value dispose(const Napi::CallbackInfo& info) {
    cuda::event_destroy(e_);
    e_ = nullptr;
    return info.Env().Undefined();
  }
  cuda::Event e_ = nullptr;
};

// Optional stream argument i: a CudaStream, or null/undefined for the default stream.
Stream get_stream(const Napi::CallbackInfo& info, size_t i) {
  Napi::Env env = info.Env();
  if (i >= info.Length() || is_nullish(info[i])) return nullptr;
  if (!info[i].IsObject() || !info[i].As<Napi::Object>().InstanceOf(ctors(env).stream.Value()))
    throw_type(env, "stream must be a CudaStream or null");
  return StreamHandle::Unwrap(info[i].As<Napi::Object>())->get(env);
}

Napi::Value StreamHandle::wait_event(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 1, "waitEvent");
  if (!info[0].IsObject() || !info[0].As<Napi::Object>().InstanceOf(ctors(env).event.Value()))
    throw_type(env, "event must be a CudaEvent");
  cuda::Event e = EventHandle::Unwrap(info[0].As<Napi::Object>())->get(env);
  guard(env, [&] { cuda::stream_wait_event(get(env), e); });
  return env.Undefined();
}

Napi::Value EventHandle::record(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Stream s = get_stream(info, 0);
  guard(env, [&] { cuda::event_record(get(env), s); });
  return env.Undefined();
}

BufferHandle* unwrap_buffer(const Napi::CallbackInfo& info, size_t i, const char* name) {
  Napi::Env env = info.Env();
  if (i >= info.Length() || !info[i].IsObject() ||
      !info[i].As<Napi::Object>().InstanceOf(ctors(env).buffer.Value()))
    throw_type(env, std::string(name) + " must be a CudaBuffer");
  return BufferHandle::Unwrap(info[i].As<Napi::Object>());
}

// A live device buffer of at least need_bytes.
template <typename T = void>
T* get_buf(const Napi::CallbackInfo& info, size_t i, const char* name, size_t need_bytes) {
  Napi::Env env = info.Env();
  BufferHandle* b = unwrap_buffer(info, i, name);
  char* p = b->ptr(env, name);
  if (b->size() < need_bytes)
    throw_range(env, std::string(name) + ".sizeBytes is " + std::to_string(b->size()) +
                         ", expected at least " + std::to_string(need_bytes));
  return reinterpret_cast<T*>(p);
}

template <typename T = void>
T* get_opt_buf(const Napi::CallbackInfo& info, size_t i, const char* name, size_t need_bytes) {
  if (i >= info.Length() || is_nullish(info[i])) return nullptr;
  return get_buf<T>(info, i, name, need_bytes);
}

int dim(const Napi::CallbackInfo& info, size_t i, const char* name, int64_t min = 0,
        int64_t max = 2147483647) {
  return static_cast<int>(get_int(info, i, name, min, max));
}

// Bytes and data of a host typed array or ArrayBuffer.
struct HostBytes {
  char* data;
  size_t size;
};
HostBytes host_bytes(const Napi::CallbackInfo& info, size_t i, const char* name) {
  Napi::Value v = info[i];
  if (v.IsTypedArray()) {
    auto ta = v.As<Napi::TypedArray>();
    return HostBytes{static_cast<char*>(ta.ArrayBuffer().Data()) + ta.ByteOffset(), ta.ByteLength()};
  }
  if (v.IsArrayBuffer()) {
    auto ab = v.As<Napi::ArrayBuffer>();
    return HostBytes{static_cast<char*>(ab.Data()), ab.ByteLength()};
  }
  throw_type(info.Env(), std::string(name) + " must be a TypedArray or ArrayBuffer");
}

constexpr size_t F4 = sizeof(float), I4 = sizeof(int32_t), B2 = sizeof(uint16_t);
// Saturating: an overflowing size must fail the buffer check, not wrap below the buffer's size.
size_t mul(size_t a, size_t b) {
  size_t r;
  return __builtin_mul_overflow(a, b, &r) ? SIZE_MAX : r;
}
size_t mul(size_t a, size_t b, size_t c) { return mul(mul(a, b), c); }
size_t add_sat(size_t a, size_t b) {
  size_t r;
  return __builtin_add_overflow(a, b, &r) ? SIZE_MAX : r;
}

// get_buf for a buffer read as T on the device: its start must be aligned for T, or to `align`
// bytes where the kernel reads it in wider words (cp.async 16 B, float2 8 B). A misaligned access
// is a sticky error that loses the whole context.
template <typename T>
T* get_aligned_buf(const Napi::CallbackInfo& info, size_t i, const char* name, size_t need_bytes,
                   size_t align = alignof(T)) {
  T* p = get_buf<T>(info, i, name, need_bytes);
  if (reinterpret_cast<uintptr_t>(p) % align)
    throw_range(info.Env(), std::string(name) + " must start " + std::to_string(align) +
                                "-byte aligned");
  return p;
}

// An optional CudaBuffer in an options object (opts.<key>): null when absent, else a live buffer of
// at least need_bytes, aligned for float.
const float* opt_float_buf(Napi::Env env, Napi::Object o, const char* key, size_t need_bytes) {
  Napi::Value v = o.Get(key);
  if (is_nullish(v)) return nullptr;
  const std::string name = std::string("opts.") + key;
  if (!v.IsObject() || !v.As<Napi::Object>().InstanceOf(ctors(env).buffer.Value()))
    throw_type(env, name + " must be a CudaBuffer or null");
  BufferHandle* b = BufferHandle::Unwrap(v.As<Napi::Object>());
  const char* p = b->ptr(env, name.c_str());
  if (b->size() < need_bytes)
    throw_range(env, name + ".sizeBytes is " + std::to_string(b->size()) + ", expected at least " +
                         std::to_string(need_bytes));
  if (reinterpret_cast<uintptr_t>(p) % alignof(float)) throw_range(env, name + " must start 4-byte aligned");
  return reinterpret_cast<const float*>(p);
}

// A JS number as JS prints it (integers without a fraction, NaN, Infinity, shortest round trip).
std::string js_number(double d) {
  if (std::isnan(d)) return "NaN";
  if (std::isinf(d)) return d > 0 ? "Infinity" : "-Infinity";
  if (d == std::floor(d) && std::fabs(d) < 1e15) return std::to_string(static_cast<int64_t>(d));
  char buf[32];
  for (int prec = 15; prec <= 17; ++prec) {
    std::snprintf(buf, sizeof(buf), "%.*g", prec, d);
    if (std::strtod(buf, nullptr) == d) break;
  }
  return buf;
}

// The optional quantization of a CudaExpertTable: { format, group?, blockRows?, zeros? } (null: bf16).
// { format, group?, blockRows?, zeros? } or null, defaults filled in, not checked against a shape.
// zeros (int8 / int4): the matrices carry zero points (cuda_quant.h).
cuda::QuantLayout parse_quant_format(Napi::Env env, Napi::Value v) {
  cuda::QuantLayout l;
  if (is_nullish(v)) return l;
  if (!v.IsObject()) throw_type(env, "quant must be an object or null");
  Napi::Object o = v.As<Napi::Object>();
  Napi::Value f = o.Get("format");
  const std::string fmt = f.IsString() ? f.As<Napi::String>().Utf8Value() : "";
  int group = 0, block_rows = 0;
  if (fmt == "int8") l.q = QFormat::I8;
  else if (fmt == "int4") l.q = QFormat::I4;
  else if (fmt == "fp8") { l.q = QFormat::F8; group = 128; block_rows = 128; }
  else if (fmt == "mxfp4") { l.q = QFormat::FP4; group = 32; }
  else throw_type(env, "quant.format must be 'int8', 'int4', 'fp8' or 'mxfp4'");
  auto field = [&](const char* name, int def) {
    Napi::Value x = o.Get(name);
    if (is_nullish(x)) return def;
    const double d = x.IsNumber() ? x.As<Napi::Number>().DoubleValue() : -1;
    if (!(d >= 0 && d <= (1 << 20) && d == static_cast<int>(d)))
      throw_range(env, std::string("quant.") + name + " must be an integer 0.." + std::to_string(1 << 20));
    return static_cast<int>(d);
  };
  l.group = l.q == QFormat::I8 ? 0 : field("group", group);
  l.block_rows = l.q == QFormat::F8 ? field("blockRows", block_rows) : 0;
  Napi::Value z = o.Get("zeros");
  if (!is_nullish(z)) {
    if (!z.IsBoolean()) throw_type(env, "quant.zeros must be a boolean");
    l.zeros = z.As<Napi::Boolean>().Value();
  }
  return l;
}

cuda::QuantLayout parse_quant_layout(Napi::Env env, Napi::Value v, int hidden, int inter) {
  const cuda::QuantLayout l = parse_quant_format(env, v);
  if (l.q == QFormat::None) return l;
  const std::string why = cuda::quant_layout_error(l, hidden, inter);
  if (!why.empty()) throw_range(env, why);
  return l;
}

// ------------------------------------------------------------------------------- CudaExpertTable
// expert e -> (gate_up [2I, H] bf16, down [H, I] bf16) device buffers, or with a quantization one
// matrix each in cuda_quant.h's layout (codes, then scales). Holds the allocations, so
// disposing a buffer handle never leaves a dangling slot; the device pointer table is uploaded
// on the stream of the GEMM that reads it, when it changed.
// NOTE: use one table per stream: an upload must not overtake a GEMM still reading it elsewhere.
class TableHandle : public Napi::ObjectWrap<TableHandle> {
 public:
  static Napi::Function define(Napi::Env env) {
    return DefineClass(env, "CudaExpertTable",
                       {InstanceMethod("set", &TableHandle::set),
                        InstanceMethod("clear", &TableHandle::clear),
                        InstanceMethod("has", &TableHandle::has),
                        InstanceMethod("dispose", &TableHandle::dispose),
                        InstanceAccessor("numExperts", &TableHandle::num_experts_js, nullptr),
                        InstanceAccessor("quant", &TableHandle::quant_js, nullptr)});
  }
  // new CudaExpertTable(numExperts, hidden, inter, quant?)
  explicit TableHandle(const Napi::CallbackInfo& info) : Napi::ObjectWrap<TableHandle>(info) {
    expect_args(info, 3, "CudaExpertTable");
    e_ = dim(info, 0, "numExperts", 1, 1024);
    h_ = dim(info, 1, "hidden", 8, 1 << 20);
    i_ = dim(info, 2, "inter", 8, 1 << 20);
    if (h_ % 8 || i_ % 8) throw_range(info.Env(), "hidden and inter must be multiples of 8");
    quant_ = parse_quant_layout(info.Env(), info.Length() > 3 ? info[3] : info.Env().Undefined(), h_, i_);
    gate_up_.resize(e_);
    down_.resize(e_);
    ptrs_.assign(2 * static_cast<size_t>(e_), nullptr);
  }
  int num_experts() const { return e_; }
  int hidden() const { return h_; }
  int inter() const { return i_; }
  const cuda::QuantLayout& quant() const { return quant_; }
  bool quantized() const { return quant_.q != QFormat::None; }
  bool has_expert(int e) const { return gate_up_[e].mem != nullptr; }
  // Device pointer arrays (gate_up [E], down [E]), uploaded on s if stale.
  const uint16_t* const* device_table(Napi::Env env, Stream s) {
    if (disposed_) throw_disposed(env, "expert table");
    guard(env, [&] {
      if (!s) s = cuda::default_stream();
      if (!table_) table_ = cuda::device_alloc(sizeof(void*) * ptrs_.size(), s);
      if (dirty_) {
        cuda::memcpy_h2d(table_->ptr, ptrs_.data(), sizeof(void*) * ptrs_.size(), s);
        dirty_ = false;
      }
    });
    return static_cast<const uint16_t* const*>(table_->ptr);
  }
  // TMA descriptors of the weights for the sm_90a GroupGemm ([gate_up E | down E] ExpertMap),
  // re-encoded only for entries whose pointer changed, uploaded on s; nullptr where that path
  // cannot run on the current device.
  const void* device_maps(Napi::Env env, Stream s, bool forced) {
    if (disposed_) throw_disposed(env, "expert table");
    const void* out = nullptr;
    guard(env, [&] {
      if (!cuda::sm90_maps_wanted(forced)) return;
      if (!s) s = cuda::default_stream();
      const size_t n = ptrs_.size();
      if (!maps_) {
        maps_ = cuda::device_alloc(sizeof(cuda::ExpertMap) * n, s);
        maps_host_.assign(n, cuda::ExpertMap{});
        mapped_.assign(n, nullptr);
        maps_valid_.assign(n, false);
      }
      size_t lo = n, hi = 0;
      for (size_t i = 0; i < n; ++i) {
        if (maps_valid_[i] && mapped_[i] == ptrs_[i]) continue;
        const bool gate_up = i < static_cast<size_t>(e_);
        cuda::encode_expert_map(static_cast<const uint16_t*>(ptrs_[i]), gate_up, h_, i_, &maps_host_[i]);
        mapped_[i] = ptrs_[i];
        maps_valid_[i] = true;
        lo = std::min(lo, i);
        hi = i + 1;
      }
      auto* dst = static_cast<cuda::ExpertMap*>(maps_->ptr);
      if (lo < hi) cuda::memcpy_h2d(dst + lo, maps_host_.data() + lo, sizeof(cuda::ExpertMap) * (hi - lo), s);
      out = maps_->ptr;
    });
    return out;
  }

 private:
  struct Slot {
    std::shared_ptr<DeviceMem> mem;
    size_t offset = 0;
  };
  int expert_arg(const Napi::CallbackInfo& info) {
    if (disposed_) throw_disposed(info.Env(), "expert table");
    return dim(info, 0, "expert", 0, e_ - 1);
  }
  Napi::Value set(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    expect_args(info, 3, "set");
    const int e = expert_arg(info);
    if (quantized()) {
      get_buf(info, 1, "gateUp", cuda::quant_matrix_bytes(quant_, 2 * i_, h_, true).total_bytes);
      get_buf(info, 2, "down", cuda::quant_matrix_bytes(quant_, h_, i_, false).total_bytes);
    } else {
      get_buf(info, 1, "gateUp", mul(2 * static_cast<size_t>(i_), h_, B2));
      get_buf(info, 2, "down", mul(h_, i_, B2));
    }
    BufferHandle* gu = unwrap_buffer(info, 1, "gateUp");
    BufferHandle* dn = unwrap_buffer(info, 2, "down");
    if ((reinterpret_cast<uintptr_t>(gu->ptr(env, "gateUp")) | reinterpret_cast<uintptr_t>(dn->ptr(env, "down"))) % 16)
      throw_range(env, "gateUp and down must start 16-byte aligned");
    gate_up_[e] = Slot{gu->mem(), gu->offset()};
    down_[e] = Slot{dn->mem(), dn->offset()};
    ptrs_[e] = gu->ptr(env, "gateUp");
    ptrs_[e_ + e] = dn->ptr(env, "down");
    dirty_ = true;
    return env.Undefined();
  }
  Napi::Value clear(const Napi::CallbackInfo& info) {
    expect_args(info, 1, "clear");
    const int e = expert_arg(info);
    gate_up_[e] = Slot{};
    down_[e] = Slot{};
    ptrs_[e] = ptrs_[e_ + e] = nullptr;
    dirty_ = true;
    return info.Env().Undefined();
  }
  Napi::Value has(const Napi::CallbackInfo& info) {
    expect_args(info, 1, "has");
    return Napi::Boolean::New(info.Env(), has_expert(expert_arg(info)));
  }
  Napi::Value dispose(const Napi::CallbackInfo& info) {
    disposed_ = true;
    gate_up_.clear();
    down_.clear();
    table_.reset();
    maps_.reset();
    return info.Env().Undefined();
  }
  Napi::Value num_experts_js(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), e_);
  }
  Napi::Value quant_js(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!quantized()) return env.Null();
    Napi::Object o = Napi::Object::New(env);
    o.Set("format", qformat_name(quant_.q));
    o.Set("group", quant_.group);
    if (quant_.q == QFormat::F8) o.Set("blockRows", quant_.block_rows);
    if (quant_.zeros) o.Set("zeros", true);
    return o;
  }
  int e_ = 0, h_ = 0, i_ = 0;
  cuda::QuantLayout quant_;
  std::vector<Slot> gate_up_, down_;
  std::vector<const void*> ptrs_;  // [gate_up E | down E]
  std::shared_ptr<DeviceMem> table_;
  bool dirty_ = true;
  std::shared_ptr<DeviceMem> maps_;              // [2E] ExpertMap (device), sm_90a only
  std::vector<cuda::ExpertMap> maps_host_;       // [2E] as last encoded
  std::vector<const void*> mapped_;              // [2E] the pointer each map was encoded from
  std::vector<bool> maps_valid_;
  bool disposed_ = false;
};

// ------------------------------------------------------------------------------- device, memory
Napi::Value device_count(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), cuda_device_count());
}

Napi::Value device_info(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 1, "cudaDeviceInfo");
  const int d = dim(info, 0, "device", 0, std::max(0, cuda_device_count() - 1));
  if (cuda_device_count() == 0) throw_range(env, "device is 0, but no CUDA device is present");
  cuda::DeviceInfo di;
  guard(env, [&] { di = cuda::device_info(d); });
  Napi::Object o = Napi::Object::New(env);
  o.Set("name", di.name);
  o.Set("computeCapability", std::to_string(di.cc_major) + "." + std::to_string(di.cc_minor));
  o.Set("smCount", di.sm_count);
  o.Set("totalBytes", static_cast<double>(di.total_bytes));
  o.Set("l2Bytes", static_cast<double>(di.l2_bytes));
  o.Set("sharedMemPerBlockOptinBytes", static_cast<double>(di.smem_per_block_optin));
  return o;
}

Napi::Value set_device(const Napi::CallbackInfo& info) {
  expect_args(info, 1, "cudaSetDevice");
  const int d = dim(info, 0, "device", 0, 1023);
  guard(info.Env(), [&] { cuda::set_device(d); });
  return info.Env().Undefined();
}

Napi::Value device_lost(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), cuda_device_lost());
}

Napi::Value synchronize(const Napi::CallbackInfo& info) {
  guard(info.Env(), [&] { cuda::device_synchronize(); });
  return info.Env().Undefined();
}

Napi::Value mem_info(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  size_t free_b = 0, total_b = 0;
  guard(env, [&] { cuda::mem_info(&free_b, &total_b); });
  const cuda::AllocatorStats st = cuda::allocator_stats();
  Napi::Object o = Napi::Object::New(env);
  o.Set("freeBytes", static_cast<double>(free_b));
  o.Set("totalBytes", static_cast<double>(total_b));
  o.Set("allocatedBytes", static_cast<double>(st.allocated_bytes));
  o.Set("cachedBytes", static_cast<double>(st.cached_bytes));
  o.Set("peakBytes", static_cast<double>(st.peak_bytes));
  o.Set("deviceMallocs", static_cast<double>(st.device_mallocs));
  o.Set("cacheHits", static_cast<double>(st.cache_hits));
  return o;
}

Napi::Value empty_cache(const Napi::CallbackInfo& info) {
  guard(info.Env(), [&] { cuda::empty_cache(); });
  return info.Env().Undefined();
}

// cudaBuffer(sizeBytes, stream?)
Napi::Value buffer(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 1, "cudaBuffer");
  const int64_t size = get_int(info, 0, "sizeBytes", 0, int64_t{1} << 44);
  Stream s = get_stream(info, 1);
  std::shared_ptr<DeviceMem> mem;
  guard(env, [&] { mem = cuda::device_alloc(static_cast<size_t>(size), s ? s : cuda::default_stream()); });
  return BufferHandle::create(env, BufferHandle::Init{mem, 0, static_cast<size_t>(size)});
}

// cudaPinnedBuffer(sizeBytes): page-locked host memory as an ArrayBuffer (freed by its finalizer).
Napi::Value pinned_buffer(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 1, "cudaPinnedBuffer");
  const int64_t size = get_int(info, 0, "sizeBytes", 0, int64_t{1} << 44);
  void* p = nullptr;
  guard(env, [&] { p = cuda::pinned_alloc(static_cast<size_t>(size)); });
  Napi::MemoryManagement::AdjustExternalMemory(env, size);
  return Napi::ArrayBuffer::New(env, p, static_cast<size_t>(size), [size](Napi::Env e, void* data) {
    cuda::pinned_free(data);
    Napi::MemoryManagement::AdjustExternalMemory(e, -size);
  });
}

// cudaCopyToDevice(dst, dstOffsetBytes, src, stream?)
Napi::Value copy_to_device(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 3, "cudaCopyToDevice");
  const HostBytes src = host_bytes(info, 2, "src");
  BufferHandle* b = unwrap_buffer(info, 0, "dst");
  const int64_t off = get_int(info, 1, "dstOffsetBytes", 0, static_cast<int64_t>(b->size()));
  char* dst = get_buf<char>(info, 0, "dst", static_cast<size_t>(off) + src.size);
  Stream s = get_stream(info, 3);
  guard(env, [&] { cuda::memcpy_h2d(dst + off, src.data, src.size, s); });
  return env.Undefined();
}

// cudaCopyToHost(dst, src, srcOffsetBytes, stream?)
Napi::Value copy_to_host(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 3, "cudaCopyToHost");
  const HostBytes dst = host_bytes(info, 0, "dst");
  BufferHandle* b = unwrap_buffer(info, 1, "src");
  const int64_t off = get_int(info, 2, "srcOffsetBytes", 0, static_cast<int64_t>(b->size()));
  const char* src = get_buf<char>(info, 1, "src", static_cast<size_t>(off) + dst.size);
  Stream s = get_stream(info, 3);
  guard(env, [&] { cuda::memcpy_d2h(dst.data, src + off, dst.size, s); });
  return env.Undefined();
}

// cudaCopyDevice(dst, dstOffsetBytes, src, srcOffsetBytes, sizeBytes, stream?)
Napi::Value copy_device(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 5, "cudaCopyDevice");
  const int64_t doff = get_int(info, 1, "dstOffsetBytes", 0, int64_t{1} << 44);
  const int64_t soff = get_int(info, 3, "srcOffsetBytes", 0, int64_t{1} << 44);
  const int64_t n = get_int(info, 4, "sizeBytes", 0, int64_t{1} << 44);
  char* dst = get_buf<char>(info, 0, "dst", static_cast<size_t>(doff + n));
  const char* src = get_buf<char>(info, 2, "src", static_cast<size_t>(soff + n));
  Stream s = get_stream(info, 5);
  guard(env, [&] { cuda::memcpy_d2d(dst + doff, src + soff, static_cast<size_t>(n), s); });
  return env.Undefined();
}

// cudaFill(dst, byteValue, stream?): every byte set (0xff poisons f32 and bf16 with NaN).
Napi::Value fill(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 2, "cudaFill");
  BufferHandle* b = unwrap_buffer(info, 0, "dst");
  char* dst = b->ptr(env, "dst");
  const int byte = dim(info, 1, "byteValue", 0, 255);
  Stream s = get_stream(info, 2);
  guard(env, [&] { cuda::memset_async(dst, byte, b->size(), s); });
  return env.Undefined();
}

Napi::Object sm90_object(Napi::Env env, const cuda::Sm90Status& st) {
  static const char* const kNames[] = {"unchecked", "passed", "failed", "unavailable"};
  Napi::Object o = Napi::Object::New(env);
  o.Set("sm90", Napi::String::New(env, kNames[static_cast<int>(st.state)]));
  if (!st.reason.empty()) o.Set("reason", Napi::String::New(env, st.reason));
  return o;
}

// cudaGemmPaths() -> { sm90: 'unchecked' | 'passed' | 'failed' | 'unavailable', reason? }
Napi::Value gemm_paths(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  cuda::Sm90Status st;
  guard(env, [&] { st = cuda::sm90_status(); });
  return sm90_object(env, st);
}

// cudaSm90SelfCheck() -> the same object, after running the self-check if it had not run.
Napi::Value sm90_self_check(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  cuda::Sm90Status st;
  guard(env, [&] { st = cuda::sm90_self_check(); });
  return sm90_object(env, st);
}

Napi::Value cublaslt(const Napi::CallbackInfo& info) {
  const std::string lib = cuda::cublaslt_library();
  if (lib.empty()) return info.Env().Null();
  return Napi::String::New(info.Env(), lib);
}

// cudaLibraries() -> { cublasLt, nccl }: each { path: string | null, tried: string[] } (loads them).
Napi::Value libraries(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto one = [&](const LoadedLibrary& lib) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("path", lib.handle ? Napi::Value(Napi::String::New(env, lib.path)) : env.Null());
    Napi::Array tried = Napi::Array::New(env, lib.tried.size());
    for (size_t i = 0; i < lib.tried.size(); ++i) tried.Set(static_cast<uint32_t>(i), lib.tried[i]);
    o.Set("tried", tried);
    return o;
  };
  Napi::Object o = Napi::Object::New(env);
  o.Set("cublasLt", one(cublaslt_load()));
  o.Set("nccl", one(nccl_load()));
  return o;
}

// ------------------------------------------------------------------------------- ops
Napi::Value convert(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 5, "cudaConvert");
  const DType sd = parse_dtype(env, info[1], "srcDtype"), dd = parse_dtype(env, info[3], "dstDtype");
  const int64_t n = get_int(info, 4, "n", 0, int64_t{1} << 42);
  const void* src = get_buf(info, 0, "src", static_cast<size_t>(n) * dtype_size(sd));
  void* dst = get_buf(info, 2, "dst", static_cast<size_t>(n) * dtype_size(dd));
  Stream s = get_stream(info, 5);
  guard(env, [&] { cuda::convert(src, sd, dst, dd, static_cast<size_t>(n), s); });
  return env.Undefined();
}

cuda::GemmTile parse_tile(const Napi::CallbackInfo& info, size_t i) {
  if (i >= info.Length() || is_nullish(info[i])) return cuda::GemmTile::Auto;
  if (!info[i].IsObject()) throw_type(info.Env(), "opts must be an object");
  Napi::Value t = info[i].As<Napi::Object>().Get("tile");
  if (is_nullish(t)) return cuda::GemmTile::Auto;
  const std::string v = t.IsString() ? t.As<Napi::String>().Utf8Value() : "";
  if (v == "auto") return cuda::GemmTile::Auto;
  if (v == "small") return cuda::GemmTile::Small;
  if (v == "large") return cuda::GemmTile::Large;
  if (v == "sm90") return cuda::GemmTile::Sm90;
  if (v == "sm90-swizzle") return cuda::GemmTile::Sm90Swizzle;
  if (v == "sm90-persistent") return cuda::GemmTile::Sm90Persistent;
  throw_type(info.Env(), "opts.tile must be 'auto', 'small', 'large', 'sm90', 'sm90-swizzle' or 'sm90-persistent'");
}

// opts.fp8Path: 'auto' (default), 'dequant' or 'act' (cuda_quant.h's Fp8Path).
cuda::Fp8Path parse_fp8_path(const Napi::CallbackInfo& info, size_t i) {
  if (i >= info.Length() || is_nullish(info[i]) || !info[i].IsObject()) return cuda::Fp8Path::Auto;
  Napi::Value t = info[i].As<Napi::Object>().Get("fp8Path");
  if (is_nullish(t)) return cuda::Fp8Path::Auto;
  const std::string v = t.IsString() ? t.As<Napi::String>().Utf8Value() : "";
  if (v == "auto") return cuda::Fp8Path::Auto;
  if (v == "dequant") return cuda::Fp8Path::Dequant;
  if (v == "act") return cuda::Fp8Path::Act;
  throw_type(info.Env(), "opts.fp8Path must be 'auto', 'dequant' or 'act'");
}

// cudaGroupGemmFfn(x, offsets, experts, rows, hScratch, y, opts?, stream?)
Napi::Value group_gemm_ffn(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 6, "cudaGroupGemmFfn");
  if (!info[2].IsObject() || !info[2].As<Napi::Object>().InstanceOf(ctors(env).table.Value()))
    throw_type(env, "experts must be a CudaExpertTable");
  TableHandle* t = TableHandle::Unwrap(info[2].As<Napi::Object>());
  const int e = t->num_experts(), h = t->hidden(), inter = t->inter();
  const int rows = dim(info, 3, "rows", 0, 1 << 28);
  // Before the buffers: the options are checked on machines without a device too.
  const cuda::GemmTile tile = parse_tile(info, 6);
  const cuda::Fp8Path fp8_path = parse_fp8_path(info, 6);
  if (fp8_path == cuda::Fp8Path::Act && !t->quantized())
    throw_range(env, "opts.fp8Path 'act' needs an fp8 table; this one holds bf16 experts");
  // x and hScratch (the down pass's x) are read in 16-byte cp.async chunks, hScratch written as
  // bf16 pairs, y read and written as float2.
  const uint16_t* x = get_aligned_buf<uint16_t>(info, 0, "x", mul(rows, h, B2), 16);
  const int32_t* offsets = get_aligned_buf<int32_t>(info, 1, "offsets", (e + 1) * I4);
  uint16_t* hs = get_aligned_buf<uint16_t>(info, 4, "hScratch", mul(rows, inter, B2), 16);
  float* y = get_aligned_buf<float>(info, 5, "y", mul(rows, h, F4), 8);
  Stream s = get_stream(info, 7);
  const uint16_t* const* table = t->device_table(env, s);
  if (t->quantized()) {
    const auto* qt = reinterpret_cast<const uint8_t* const*>(table);
    guard(env, [&] {
      cuda::group_gemm_quant_ffn(x, offsets, qt, qt + e, e, rows, h, inter, t->quant(), hs, y, tile, s, fp8_path);
    });
    return env.Undefined();
  }
  const bool forced = cuda::is_sm90_tile(tile);
  const void* maps = tile == cuda::GemmTile::Auto || forced ? t->device_maps(env, s, forced) : nullptr;
  guard(env, [&] {
    cuda::group_gemm_ffn(x, offsets, table, table + e, e, rows, h, inter, hs, y, tile, s, maps);
  });
  return env.Undefined();
}

// cudaQuantPaths() -> { fp8Act }: whether the FP8-activation GroupGemm can run on the current device.
Napi::Value quant_paths(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  bool act = false;
  if (cuda_device_count() > 0) guard(env, [&] { act = cuda::group_gemm_fp8_act_available(); });
  Napi::Object o = Napi::Object::New(env);
  o.Set("fp8Act", act);
  return o;
}

// cudaGroupGemmBiasedFfn(x, offsets, experts, rows, guScratch, hScratch, y, opts, stream?)
// opts: { gateUpBias [E, 2I] f32, downBias [E, H] f32 (CudaBuffers), alpha, limit } (gpt-oss).
// A quantized table runs the dequantising GroupGemm's plain passes (group_gemm_quant.cu).
Napi::Value group_gemm_biased_ffn(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 8, "cudaGroupGemmBiasedFfn");
  if (!info[2].IsObject() || !info[2].As<Napi::Object>().InstanceOf(ctors(env).table.Value()))
    throw_type(env, "experts must be a CudaExpertTable");
  TableHandle* t = TableHandle::Unwrap(info[2].As<Napi::Object>());
  const int e = t->num_experts(), h = t->hidden(), inter = t->inter();
  const int rows = dim(info, 3, "rows", 0, 1 << 28);
  if (!info[7].IsObject()) throw_type(env, "opts must be an object");
  Napi::Object o = info[7].As<Napi::Object>();
  auto num = [&](const char* key) {
    Napi::Value v = o.Get(key);
    if (!v.IsNumber()) throw_type(env, std::string("opts.") + key + " must be a number");
    const double d = v.As<Napi::Number>().DoubleValue();
    if (!(d > 0) || !std::isfinite(d))
      throw_range(env, std::string("opts.") + key + " is " + std::to_string(d) + ", expected a positive number");
    return static_cast<float>(d);
  };
  const float alpha = num("alpha"), limit = num("limit");
  Stream s = get_stream(info, 8);
  // The plain passes read x and hScratch in 16-byte cp.async chunks and write guScratch and y as float2.
  const uint16_t* x = get_aligned_buf<uint16_t>(info, 0, "x", mul(rows, h, B2), 16);
  const int32_t* offsets = get_aligned_buf<int32_t>(info, 1, "offsets", (e + 1) * I4);
  float* gu = get_aligned_buf<float>(info, 4, "guScratch", mul(rows, 2 * static_cast<size_t>(inter), F4), 8);
  uint16_t* hs = get_aligned_buf<uint16_t>(info, 5, "hScratch", mul(rows, inter, B2), 16);
  float* y = get_aligned_buf<float>(info, 6, "y", mul(rows, h, F4), 8);
  const float* gub = opt_float_buf(env, o, "gateUpBias", mul(e, 2 * static_cast<size_t>(inter), F4));
  const float* db = opt_float_buf(env, o, "downBias", mul(e, h, F4));
  if (!gub || !db) throw_type(env, "opts.gateUpBias and opts.downBias must be CudaBuffers");
  const uint16_t* const* table = t->device_table(env, s);
  if (t->quantized()) {
    const auto* qt = reinterpret_cast<const uint8_t* const*>(table);
    guard(env, [&] {
      cuda::group_gemm_biased_quant_ffn(x, offsets, qt, qt + e, e, rows, h, inter, t->quant(), gub, db, alpha,
                                        limit, gu, hs, y, s);
    });
    return env.Undefined();
  }
  guard(env, [&] {
    cuda::group_gemm_biased_ffn(x, offsets, table, table + e, e, rows, h, inter, gub, db, alpha, limit, gu, hs, y, s);
  });
  return env.Undefined();
}

// cudaDenseGemmQuant(x, m, w, n, k, quant, y, bias, accumulate, stream?): y [m, n] f32 (+)= x [m, k]
// bf16 W^T (+ bias), W [n, k] one matrix in quant's layout (cuda_quant.h), --quantize-dense.
Napi::Value dense_gemm_quant(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 9, "cudaDenseGemmQuant");
  const int m = dim(info, 1, "m"), n = dim(info, 3, "n", 2), k = dim(info, 4, "k", 16);
  const cuda::QuantLayout l = parse_quant_format(env, info[5]);
  if (l.q == QFormat::None) throw_type(env, "quant must be an object");
  const std::string why = cuda::quant_dense_error(l, n, k);
  if (!why.empty()) throw_range(env, why);
  const size_t w_bytes = cuda::quant_matrix_bytes(l, n, k, false).total_bytes;
  const uint16_t* x = get_aligned_buf<uint16_t>(info, 0, "x", mul(m, k, B2), 16);
  const uint8_t* w = get_aligned_buf<uint8_t>(info, 2, "w", w_bytes, 16);
  float* y = get_aligned_buf<float>(info, 6, "y", mul(m, n, F4), 8);
  const float* bias = is_nullish(info[7]) ? nullptr : get_aligned_buf<float>(info, 7, "bias", n * F4, 4);
  const bool acc = get_bool(info, 8, "accumulate");
  Stream s = get_stream(info, 9);
  guard(env, [&] { cuda::dense_gemm_quant(x, m, w, n, k, l, y, bias, acc, s); });
  return env.Undefined();
}

// cudaDenseGemm(x, m, w, n, k, y, bias, accumulate, backend?, stream?) -> backend used
Napi::Value dense_gemm(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 8, "cudaDenseGemm");
  const int m = dim(info, 1, "m"), n = dim(info, 3, "n", 8), k = dim(info, 4, "k", 8);
  if (n % 8 || k % 8) throw_range(env, "n and k must be multiples of 8 (n is " + std::to_string(n) +
                                           ", k is " + std::to_string(k) + ")");
  // 16 bytes for every operand: the kernel reads x and w in cp.async chunks and y as float2, and
  // cuBLASLt's plans are chosen for the operands' alignment with 16 bytes as the floor.
  const uint16_t* x = get_aligned_buf<uint16_t>(info, 0, "x", mul(m, k, B2), 16);
  const uint16_t* w = get_aligned_buf<uint16_t>(info, 2, "w", mul(n, k, B2), 16);
  float* y = get_aligned_buf<float>(info, 5, "y", mul(m, n, F4), 16);
  const float* bias = is_nullish(info[6]) ? nullptr : get_aligned_buf<float>(info, 6, "bias", n * F4, 16);
  const bool acc = get_bool(info, 7, "accumulate");
  cuda::DenseBackend be = cuda::DenseBackend::Auto;
  if (info.Length() > 8 && !is_nullish(info[8])) {
    const std::string v = info[8].IsString() ? info[8].As<Napi::String>().Utf8Value() : "";
    if (v == "cublaslt") be = cuda::DenseBackend::CublasLt;
    else if (v == "kernel") be = cuda::DenseBackend::Kernel;
    else if (v != "auto") throw_type(env, "backend must be 'auto', 'cublaslt' or 'kernel'");
  }
  Stream s = get_stream(info, 9);
  cuda::DenseBackend used = be;
  guard(env, [&] { used = cuda::dense_gemm(x, m, w, n, k, y, bias, acc, be, s); });
  return Napi::String::New(env, used == cuda::DenseBackend::CublasLt ? "cublaslt" : "kernel");
}

// cudaRoute(logits, t, e, k, opts, ids, weights, counts, stream?)
Napi::Value route(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 8, "cudaRoute");
  RoutingParams p;
  p.tokens = dim(info, 1, "t");
  p.num_experts = dim(info, 2, "e", 1, 1024);
  p.top_k = dim(info, 3, "k", 1, p.num_experts);
  if (!info[4].IsObject()) throw_type(env, "opts must be an object");
  Napi::Object o = info[4].As<Napi::Object>();
  const std::string scoring = o.Get("scoring").IsString() ? o.Get("scoring").As<Napi::String>().Utf8Value() : "";
  if (scoring != "softmax" && scoring != "sigmoid")
    throw_type(env, "opts.scoring must be 'softmax' or 'sigmoid'");
  p.scoring = scoring == "sigmoid" ? Scoring::Sigmoid : Scoring::Softmax;
  auto opt_int = [&](const char* key, int def) {
    Napi::Value v = o.Get(key);
    if (is_nullish(v)) return def;
    if (!v.IsNumber()) throw_type(env, std::string("opts.") + key + " must be a number");
    return v.As<Napi::Number>().Int32Value();
  };
  p.n_group = opt_int("nGroup", 1);
  p.topk_group = opt_int("topkGroup", p.n_group);
  if (p.n_group < 1 || p.num_experts % p.n_group)
    throw_range(env, "opts.nGroup is " + std::to_string(p.n_group) + ", expected a divisor of e");
  if (p.topk_group < 1 || p.topk_group > p.n_group)
    throw_range(env, "opts.topkGroup is " + std::to_string(p.topk_group) + ", expected 1.." + std::to_string(p.n_group));
  Napi::Value gsv = o.Get("groupScore");
  const std::string gs = gsv.IsString() ? gsv.As<Napi::String>().Utf8Value() : "max";
  if (gs != "max" && gs != "top2sum") throw_type(env, "opts.groupScore must be 'max' or 'top2sum'");
  p.group_score = gs == "top2sum" ? GroupScore::Top2Sum : GroupScore::Max;
  if (p.group_score == GroupScore::Top2Sum && p.n_group > 1 && p.num_experts / p.n_group < 2)
    throw_range(env, "opts.groupScore 'top2sum' needs at least 2 experts per group");
  if (p.n_group > 1 && p.top_k > p.topk_group * (p.num_experts / p.n_group))
    throw_range(env, "k is " + std::to_string(p.top_k) + ", expected at most topkGroup * e / nGroup = " +
                         std::to_string(p.topk_group * (p.num_experts / p.n_group)));
  Napi::Value rn = o.Get("renormalize");
  p.renormalize = rn.IsBoolean() && rn.As<Napi::Boolean>().Value();
  Napi::Value sc = o.Get("scale");
  p.scale = sc.IsNumber() ? sc.As<Napi::Number>().FloatValue() : 1.0f;
  Napi::Value bias = o.Get("bias");
  if (!is_nullish(bias)) {
    if (!bias.IsObject() || !bias.As<Napi::Object>().InstanceOf(ctors(env).buffer.Value()))
      throw_type(env, "opts.bias must be a CudaBuffer or null");
    BufferHandle* b = BufferHandle::Unwrap(bias.As<Napi::Object>());
    if (b->size() < p.num_experts * F4)
      throw_range(env, "opts.bias.sizeBytes is " + std::to_string(b->size()) + ", expected at least " +
                           std::to_string(p.num_experts * F4));
    p.bias = reinterpret_cast<const float*>(b->ptr(env, "opts.bias"));
  }
  const float* logits = get_buf<float>(info, 0, "logits", mul(p.tokens, p.num_experts, F4));
  int32_t* ids = get_buf<int32_t>(info, 5, "ids", mul(p.tokens, p.top_k, I4));
  float* weights = get_buf<float>(info, 6, "weights", mul(p.tokens, p.top_k, F4));
  int32_t* counts = get_buf<int32_t>(info, 7, "counts", p.num_experts * I4);
  Stream s = get_stream(info, 8);
  guard(env, [&] { cuda::route(logits, p, ids, weights, counts, s); });
  return env.Undefined();
}

// cudaPermute(x, t, h, ids, k, e, xPerm, permIndex, offsets, permDtype, stream?)
Napi::Value permute(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 10, "cudaPermute");
  const int t = dim(info, 1, "t"), h = dim(info, 2, "h"), k = dim(info, 4, "k", 1, 1024);
  const int e = dim(info, 5, "e", 1, 1024);
  const DType pd = parse_dtype(env, info[9], "permDtype");
  if (pd == DType::F16) throw_type(env, "permDtype must be 'f32' or 'bf16'");
  const float* x = get_buf<float>(info, 0, "x", mul(t, h, F4));
  const int32_t* ids = get_buf<int32_t>(info, 3, "ids", mul(t, k, I4));
  void* xp = get_buf(info, 6, "xPerm", mul(mul(t, k), h, dtype_size(pd)));
  int32_t* pidx = get_buf<int32_t>(info, 7, "permIndex", mul(t, k, I4));
  int32_t* offs = get_buf<int32_t>(info, 8, "offsets", (e + 1) * I4);
  Stream s = get_stream(info, 10);
  guard(env, [&] { cuda::permute_rows(x, t, h, ids, k, e, xp, pd, pidx, offs, s); });
  return env.Undefined();
}

// cudaGatherExpertColumns(x, offsets, e, rows, h, perm, out, stream?)
Napi::Value gather_expert_columns(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 7, "cudaGatherExpertColumns");
  const int e = dim(info, 2, "e", 1, 1 << 20), rows = dim(info, 3, "rows"), h = dim(info, 4, "h");
  const uint16_t* x = get_buf<uint16_t>(info, 0, "x", mul(rows, h, 2));
  const int32_t* offs = info[1].IsNull() ? nullptr : get_buf<int32_t>(info, 1, "offsets", (e + 1) * I4);
  if (!offs && e != 1) throw_range(env, "cudaGatherExpertColumns: without offsets e must be 1");
  const int32_t* perm = get_buf<int32_t>(info, 5, "perm", mul(e, h, I4));
  uint16_t* out = get_buf<uint16_t>(info, 6, "out", mul(rows, h, 2));
  Stream s = get_stream(info, 7);
  guard(env, [&] { cuda::gather_expert_columns(x, offs, e, rows, h, perm, out, s); });
  return env.Undefined();
}

// cudaUnpermuteCombine(yPerm, permIndex, weights, t, k, h, out, accumulate, stream?)
Napi::Value unpermute_combine(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 8, "cudaUnpermuteCombine");
  const int t = dim(info, 3, "t"), k = dim(info, 4, "k", 1, 1024), h = dim(info, 5, "h");
  const float* yp = get_buf<float>(info, 0, "yPerm", mul(mul(t, k), h, F4));
  const int32_t* pidx = get_buf<int32_t>(info, 1, "permIndex", mul(t, k, I4));
  const float* w = get_buf<float>(info, 2, "weights", mul(t, k, F4));
  float* out = get_buf<float>(info, 6, "out", mul(t, h, F4));
  const bool acc = get_bool(info, 7, "accumulate");
  Stream s = get_stream(info, 8);
  guard(env, [&] { cuda::unpermute_combine(yp, pidx, w, t, k, h, out, acc, s); });
  return env.Undefined();
}

// cudaRmsNorm(x, rows, dim, w, eps, out, residual, stream?)
Napi::Value rms_norm(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 7, "cudaRmsNorm");
  const int rows = dim(info, 1, "rows"), d = dim(info, 2, "dim", 1);
  const float* x = get_buf<float>(info, 0, "x", mul(rows, d, F4));
  const float* w = get_buf<float>(info, 3, "w", d * F4);
  const float eps = static_cast<float>(get_double(info, 4, "eps"));
  float* out = get_buf<float>(info, 5, "out", mul(rows, d, F4));
  float* res = get_opt_buf<float>(info, 6, "residual", mul(rows, d, F4));
  Stream s = get_stream(info, 7);
  guard(env, [&] { cuda::rms_norm(x, rows, d, w, eps, out, res, s); });
  return env.Undefined();
}

// ---- Gated DeltaNet (deltanet.cu). slots [numSeqs] and seqStarts [numSeqs + 1] are device
// int32 buffers (the kernel traps on values outside the pool or the tokens).

// State slots a pool buffer holds: its size over one state's bytes (per_bytes 0: any slot is empty).
long long pool_slots_of(size_t pool_bytes, size_t per_bytes) {
  return per_bytes == 0 ? (1LL << 62) : static_cast<long long>(pool_bytes / per_bytes);
}

// cudaCausalConv1d(x, t, c, weight, bias, k, statePool, slots, seqStarts, numSeqs, silu, out,
//                  stream?)
Napi::Value causal_conv1d(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 12, "cudaCausalConv1d");
  const int t = dim(info, 1, "t"), c = dim(info, 2, "c", 1), k = dim(info, 5, "k", 1, 64);
  const int b = dim(info, 9, "numSeqs");
  const float* x = get_aligned_buf<float>(info, 0, "x", mul(t, c, F4));
  const float* w = get_aligned_buf<float>(info, 3, "weight", mul(c, k, F4));
  const float* bias = nullptr;
  if (!is_nullish(info[4])) bias = get_aligned_buf<float>(info, 4, "bias", mul(c, 1, F4));
  const size_t per = mul(mul(c, k - 1), F4);
  BufferHandle* pool_h = unwrap_buffer(info, 6, "statePool");
  float* pool = get_aligned_buf<float>(info, 6, "statePool", 0);
  const int32_t* slots = get_aligned_buf<int32_t>(info, 7, "slots", mul(b, I4));
  const int32_t* starts = get_aligned_buf<int32_t>(info, 8, "seqStarts", mul(b + 1, I4));
  const bool silu = get_bool(info, 10, "silu");
  float* out = get_aligned_buf<float>(info, 11, "out", mul(t, c, F4));
  Stream s = get_stream(info, 12);
  const long long slots_n = pool_slots_of(pool_h->size(), per);
  guard(env, [&] {
    cuda::causal_conv1d_batch(x, t, c, w, bias, k, pool, slots_n, slots, starts, b, silu, out, s);
  });
  return env.Undefined();
}

// cudaGatedDeltaRule(q, k, v, g, beta, statePool, slots, seqStarts, numSeqs, out, opts, stream?,
//                    seqLens?): seqLens [numSeqs] host Int32Array, the lengths seqStarts gives (a
// launch hint: without it the chunked kernel is launched whenever T >= opts.chunk).
Napi::Value gated_delta_rule(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 11, "cudaGatedDeltaRule");
  const DeltaRuleParams p = delta_params(env, info[10], cuda::kDeltaMaxDk);
  const int b = dim(info, 8, "numSeqs");
  const size_t t = static_cast<size_t>(p.tokens);
  const size_t qk_row = static_cast<size_t>(p.hk) * p.dk, v_row = static_cast<size_t>(p.hv) * p.dv;
  const float* q = get_aligned_buf<float>(info, 0, "q", mul(strided_len(p.tokens, p.q_stride, qk_row), F4));
  const float* k = get_aligned_buf<float>(info, 1, "k", mul(strided_len(p.tokens, p.k_stride, qk_row), F4));
  const float* v = get_aligned_buf<float>(info, 2, "v", mul(strided_len(p.tokens, p.v_stride, v_row), F4));
  const float* g = get_aligned_buf<float>(info, 3, "g", mul(t, p.hv, F4));
  const float* beta = get_aligned_buf<float>(info, 4, "beta", mul(t, p.hv, F4));
  BufferHandle* pool_h = unwrap_buffer(info, 5, "statePool");
  float* pool = get_aligned_buf<float>(info, 5, "statePool", 0);
  const int32_t* slots = get_aligned_buf<int32_t>(info, 6, "slots", mul(b, I4));
  const int32_t* starts = get_aligned_buf<int32_t>(info, 7, "seqStarts", mul(b + 1, I4));
  float* out = get_aligned_buf<float>(info, 9, "out", mul(t, v_row, F4));
  Stream s = get_stream(info, 11);
  int longest = p.tokens;
  const Span<int32_t> lens = get_optional_array<int32_t>(info, 12, "seqLens", static_cast<size_t>(b), true);
  if (lens.data) {
    longest = 0;
    for (size_t i = 0; i < lens.length; ++i) {
      if (lens.data[i] < 0 || lens.data[i] > p.tokens)
        throw_range(env, "seqLens[" + std::to_string(i) + "] is " + std::to_string(lens.data[i]) +
                             ", expected 0.." + std::to_string(p.tokens) + " (opts.T)");
      longest = std::max(longest, static_cast<int>(lens.data[i]));
    }
  }
  const long long slots_n = pool_slots_of(pool_h->size(), mul(mul(p.hv, p.dk), p.dv, F4));
  guard(env, [&] {
    cuda::gated_delta_rule_batch(q, k, v, g, beta, pool, slots_n, slots, starts, b, out, p, longest, s);
  });
  return env.Undefined();
}

// cudaGatedRmsNorm(x, z, weight, eps, rows, d, out, stream?)
Napi::Value gated_rms_norm(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 7, "cudaGatedRmsNorm");
  const int rows = dim(info, 4, "rows"), d = dim(info, 5, "d", 1);
  const float* x = get_aligned_buf<float>(info, 0, "x", mul(rows, d, F4));
  const float* z = get_aligned_buf<float>(info, 1, "z", mul(rows, d, F4));
  const float* w = get_aligned_buf<float>(info, 2, "weight", mul(d, 1, F4));
  const double eps = get_double(info, 3, "eps");
  if (!std::isfinite(eps) || eps < 0)
    throw_range(env, "eps is " + std::to_string(eps) + ", expected a finite number >= 0");
  float* out = get_aligned_buf<float>(info, 6, "out", mul(rows, d, F4));
  Stream s = get_stream(info, 7);
  guard(env, [&] { cuda::gated_rms_norm(x, z, w, static_cast<float>(eps), rows, d, out, s); });
  return env.Undefined();
}

// cudaRope(x, t, heads, rowStride, headStride, offset, positions, invFreq, rotDim, attnScale,
//          interleaved, stream?)
Napi::Value rope(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 11, "cudaRope");
  const int t = dim(info, 1, "t"), heads = dim(info, 2, "heads", 1);
  const int row_stride = dim(info, 3, "rowStride", 1), head_stride = dim(info, 4, "headStride", 0);
  const int offset = dim(info, 5, "offset", 0);
  // rotDim <= 4096: the kernel keeps cos/sin of a position in 4 * rotDim bytes of shared memory,
  // under the 48 KiB a launch gets without opting in.
  const int rot = dim(info, 8, "rotDim", 2, 4096);
  if (rot % 2) throw_range(env, "rotDim is " + std::to_string(rot) + ", expected an even number");
  // Heads rotated in parallel must not share a column (headStride 0 would race on every one).
  if (heads > 1 && head_stride < rot)
    throw_range(env, "headStride is " + std::to_string(head_stride) + ", expected at least rotDim = " +
                         std::to_string(rot) + " when heads > 1 (heads must not overlap)");
  const size_t span = static_cast<size_t>(heads - 1) * head_stride + offset + rot;
  if (span > static_cast<size_t>(row_stride))
    throw_range(env, "heads, headStride, offset and rotDim reach column " + std::to_string(span) +
                         ", beyond rowStride " + std::to_string(row_stride));
  float* x = get_buf<float>(info, 0, "x", t ? (mul(t - 1, row_stride) + span) * F4 : 0);
  const int32_t* pos = get_buf<int32_t>(info, 6, "positions", t * I4);
  const float* inv = get_buf<float>(info, 7, "invFreq", (rot / 2) * F4);
  const float scale = static_cast<float>(get_double(info, 9, "attnScale"));
  const bool il = get_bool(info, 10, "interleaved");
  Stream s = get_stream(info, 11);
  guard(env, [&] { cuda::rope(x, t, heads, row_stride, head_stride, offset, pos, inv, rot, scale, il, s); });
  return env.Undefined();
}

// cudaSiluMul(gu, t, i, out, stream?)
Napi::Value silu_mul(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 4, "cudaSiluMul");
  const int t = dim(info, 1, "t"), i = dim(info, 2, "i");
  const float* gu = get_buf<float>(info, 0, "gu", mul(t, 2 * static_cast<size_t>(i), F4));
  float* out = get_buf<float>(info, 3, "out", mul(t, i, F4));
  Stream s = get_stream(info, 4);
  guard(env, [&] { cuda::silu_mul(gu, t, i, out, s); });
  return env.Undefined();
}

// cudaClampedSwiglu(gu, t, i, alpha, limit, out, stream?)
Napi::Value clamped_swiglu(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 6, "cudaClampedSwiglu");
  const int t = dim(info, 1, "t"), i = dim(info, 2, "i");
  const double alpha = get_double(info, 3, "alpha"), limit = get_double(info, 4, "limit");
  if (!(alpha > 0) || !std::isfinite(alpha)) throw_range(env, "alpha is " + std::to_string(alpha) + ", expected a positive number");
  if (!(limit > 0) || !std::isfinite(limit)) throw_range(env, "limit is " + std::to_string(limit) + ", expected a positive number");
  Stream s = get_stream(info, 6);
  const float* gu = get_buf<float>(info, 0, "gu", mul(t, 2 * static_cast<size_t>(i), F4));
  float* out = get_buf<float>(info, 5, "out", mul(t, i, F4));
  guard(env, [&] {
    cuda::clamped_swiglu(gu, t, i, static_cast<float>(alpha), static_cast<float>(limit), out, s);
  });
  return env.Undefined();
}

// cudaEmbedding(table, dtype, v, h, ids, t, out, stream?)
Napi::Value embedding(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 7, "cudaEmbedding");
  const DType dt = parse_dtype(env, info[1], "dtype");
  const int v = dim(info, 2, "v", 1), h = dim(info, 3, "h", 1), t = dim(info, 5, "t");
  const void* table = get_buf(info, 0, "table", mul(v, h, dtype_size(dt)));
  const int32_t* ids = get_buf<int32_t>(info, 4, "ids", t * I4);
  float* out = get_buf<float>(info, 6, "out", mul(t, h, F4));
  Stream s = get_stream(info, 7);
  guard(env, [&] { cuda::embedding(table, dt, v, h, ids, t, out, s); });
  return env.Undefined();
}

// cudaSoftmax(x, rows, cols, out, log, stream?)
Napi::Value softmax(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 5, "cudaSoftmax");
  const int rows = dim(info, 1, "rows"), cols = dim(info, 2, "cols", 1);
  const float* x = get_buf<float>(info, 0, "x", mul(rows, cols, F4));
  float* out = get_buf<float>(info, 3, "out", mul(rows, cols, F4));
  const bool lg = get_bool(info, 4, "log");
  Stream s = get_stream(info, 5);
  guard(env, [&] { cuda::softmax_rows(x, rows, cols, out, lg, s); });
  return env.Undefined();
}

// cudaTopN(x, rows, cols, n, ids, vals, stream?)
Napi::Value top_n(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 6, "cudaTopN");
  const int rows = dim(info, 1, "rows"), cols = dim(info, 2, "cols", 1);
  const int n = dim(info, 3, "n", 1, cols);
  const float* x = get_buf<float>(info, 0, "x", mul(rows, cols, F4));
  int32_t* ids = get_buf<int32_t>(info, 4, "ids", mul(rows, n, I4));
  float* vals = get_buf<float>(info, 5, "vals", mul(rows, n, F4));
  Stream s = get_stream(info, 6);
  guard(env, [&] { cuda::top_n(x, rows, cols, n, ids, vals, s); });
  return env.Undefined();
}

// cudaSampleBatch(logits, rows, vocabSize, batch, out, stream?): the host arrays of sampleBatch,
// the logits on the device; returns with out and batch.rngState filled.
Napi::Value sample_batch(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 5, "cudaSampleBatch");
  const int rows = dim(info, 1, "rows", 0, 1 << 20), vocab = dim(info, 2, "vocabSize", 1, 1 << 30);
  const float* logits = get_aligned_buf<float>(info, 0, "logits", mul(rows, vocab, F4));
  if (!info[3].IsObject()) throw_type(env, "batch must be an object");
  if (!info[4].IsObject()) throw_type(env, "out must be an object");
  ParsedSampleBatch b = parse_sample_batch(env, rows, vocab, info[3].As<Napi::Object>(), info[4].As<Napi::Object>());
  Stream s = get_stream(info, 5);
  cuda::SampleBatchHost h;
  h.rows = rows;
  h.vocab = vocab;
  h.params = b.params;
  h.rng = b.rng;
  h.bias_offsets = b.bias_offsets;
  h.bias_ids = b.bias_ids;
  h.bias_values = b.bias_values;
  h.seen_offsets = b.seen_offsets;
  h.seen_ids = b.seen_ids;
  h.count_offsets = b.count_offsets;
  h.count_ids = b.count_ids;
  h.count_values = b.count_values;
  h.mask_rows = b.mask_rows;
  h.masks = b.masks;
  h.n_bias = b.n_bias;
  h.n_seen = b.n_seen;
  h.n_counts = b.n_counts;
  h.n_masks = b.n_masks;
  h.out = b.out;
  guard(env, [&] { cuda::sample_batch(logits, h, s); });
  return env.Undefined();
}

// The KV cache element type named by v ('f32' when absent).
KvDtype kv_dtype_arg(Napi::Env env, const Napi::Value& v, const std::string& name) {
  if (is_nullish(v)) return KvDtype::F32;
  if (v.IsString()) {
    const std::string s = v.As<Napi::String>().Utf8Value();
    if (s == "f32") return KvDtype::F32;
    if (s == "bf16") return KvDtype::BF16;
    if (s == "fp8") return KvDtype::FP8;
  }
  throw_type(env, name + " must be 'f32', 'bf16' or 'fp8'");
}

// Host fp8 scales [kv_heads]: finite and > 0; at most kMaxScaleHeads (they travel by value).
const float* kv_scales_arg(Napi::Env env, const Napi::Value& v, const std::string& name, int kv_heads) {
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
    throw_type(env, name + " must be a Float32Array [kvHeads] for an fp8 cache");
  if (kv_heads > cuda::kMaxScaleHeads)
    throw_range(env, "kvHeads is " + std::to_string(kv_heads) + ", expected at most " +
                         std::to_string(cuda::kMaxScaleHeads) + " for an fp8 cache");
  auto a = v.As<Napi::Float32Array>();
  if (a.ElementLength() < static_cast<size_t>(kv_heads))
    throw_range(env, name + ".length is " + std::to_string(a.ElementLength()) +
                         ", expected at least kvHeads = " + std::to_string(kv_heads));
  for (int h = 0; h < kv_heads; ++h)
    if (!(std::isfinite(a[h]) && a[h] > 0.0f))
      throw_range(env, name + "[" + std::to_string(h) + "] is " + std::to_string(a[h]) +
                           ", expected a finite number > 0");
  return a.Data();
}

// cudaKvCacheWrite(k, v, t, slots, kCache, vCache, kvHeads, dk, dv, vStride, numSlots, stream?,
//                  kvDtype?, kScales?, vScales?)
Napi::Value kv_cache_write(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 11, "cudaKvCacheWrite");
  const int t = dim(info, 2, "t"), kvh = dim(info, 6, "kvHeads", 1), dk = dim(info, 7, "dk", 1);
  const int dv = dim(info, 8, "dv", 0), vs = dim(info, 9, "vStride", 0);
  const int64_t slots_n = get_int(info, 10, "numSlots", 0, int64_t{1} << 40);
  const bool has_v = !is_nullish(info[1]);
  if (has_v && vs < dv) throw_range(env, "vStride is " + std::to_string(vs) + ", expected at least dv = " + std::to_string(dv));
  const float* k = get_buf<float>(info, 0, "k", mul(t, kvh, dk * F4));
  const float* v = has_v ? get_buf<float>(info, 1, "v", mul(t, kvh, dv * F4)) : nullptr;
  const int32_t* slots = get_buf<int32_t>(info, 3, "slots", t * I4);
  const KvDtype dt = kv_dtype_arg(env, info.Length() > 12 ? info[12] : env.Undefined(), "kvDtype");
  const size_t es = kv_dtype_size(dt);
  void* kc = get_aligned_buf<char>(info, 4, "kCache", mul(static_cast<size_t>(slots_n), kvh, dk * es), es);
  void* vc = has_v ? get_aligned_buf<char>(info, 5, "vCache", mul(static_cast<size_t>(slots_n), kvh, vs * es), es) : nullptr;
  Stream s = get_stream(info, 11);
  const float* ksc = nullptr;
  const float* vsc = nullptr;
  if (dt == KvDtype::FP8) {
    ksc = kv_scales_arg(env, info.Length() > 13 ? info[13] : env.Undefined(), "kScales", kvh);
    if (has_v) vsc = kv_scales_arg(env, info.Length() > 14 ? info[14] : env.Undefined(), "vScales", kvh);
  }
  // NOTE: slots live on the device: the kernel trusts them to be < numSlots (the engine's
  // block manager hands them out).
  guard(env, [&] { cuda::kv_cache_write(k, v, t, slots, kc, vc, kvh, dk, dv, vs, dt, ksc, vsc, s); });
  return env.Undefined();
}

// cudaPagedAttention(q, kCache, vCache, seqInfo, blockTables, opts, out, stream?)
// opts: AttentionOptions + totalTokens, maxContext, numBlocks.
Napi::Value paged_attention(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 7, "cudaPagedAttention");
  if (!info[5].IsObject()) throw_type(env, "opts must be an object");
  Napi::Object o = info[5].As<Napi::Object>();
  auto req = [&](const char* key, int64_t min, int64_t max, int64_t def, bool required) -> int {
    Napi::Value v = o.Get(key);
    if (is_nullish(v)) {
      if (required) throw_type(env, std::string("opts.") + key + " must be a number");
      return static_cast<int>(def);
    }
    if (!v.IsNumber()) throw_type(env, std::string("opts.") + key + " must be a number");
    const double d = v.As<Napi::Number>().DoubleValue();
    if (d != std::floor(d) || d < min || d > max)
      throw_range(env, std::string("opts.") + key + " is " + std::to_string(d) + ", expected an integer in " +
                           std::to_string(min) + ".." + std::to_string(max));
    return static_cast<int>(d);
  };
  AttentionParams p;
  p.num_seqs = req("numSeqs", 0, 1 << 20, 0, true);
  p.heads = req("heads", 1, 4096, 0, true);
  p.kv_heads = req("kvHeads", 1, p.heads, 0, true);
  if (p.heads % p.kv_heads) throw_range(env, "opts.heads must be a multiple of opts.kvHeads");
  p.dk = req("dk", 1, 4096, 0, true);
  p.dv = req("dv", 1, 512, 0, true);
  p.v_stride = req("vStride", 1, 1 << 16, p.dv, false);
  p.v_offset = req("vOffset", 0, 1 << 16, 0, false);
  if (p.v_offset + p.dv > p.v_stride) throw_range(env, "opts.vOffset + opts.dv exceeds opts.vStride");
  p.block_size = req("blockSize", 1, 1 << 16, 0, true);
  p.max_blocks = req("maxBlocks", 1, 1 << 24, 0, true);
  Napi::Value sc = o.Get("scale");
  if (!sc.IsNumber()) throw_type(env, "opts.scale must be a number");
  p.scale = sc.As<Napi::Number>().FloatValue();
  p.sliding_window = req("slidingWindow", 0, 1 << 30, 0, false);
  p.q_row_stride = req("qRowStride", p.heads * p.dk, 1 << 30, p.heads * p.dk, false);
  const int total = req("totalTokens", 0, 1 << 28, 0, true);
  const int max_ctx = req("maxContext", 1, 1 << 30, 0, true);
  const int num_blocks = req("numBlocks", 1, 1 << 30, 0, true);
  const float* q = get_buf<float>(info, 0, "q", total ? (mul(total - 1, p.q_row_stride) + p.heads * p.dk) * F4 : 0);
  p.kv_dtype = kv_dtype_arg(env, o.Get("kvDtype"), "opts.kvDtype");
  const size_t es = kv_dtype_size(p.kv_dtype);
  if (p.kv_dtype == KvDtype::FP8) {
    p.k_scales = kv_scales_arg(env, o.Get("kScales"), "opts.kScales", p.kv_heads);
    p.v_scales = kv_scales_arg(env, o.Get("vScales"), "opts.vScales", p.kv_heads);
  }
  const void* kc = get_aligned_buf<char>(info, 1, "kCache", mul(mul(num_blocks, p.block_size), p.kv_heads, p.dk * es), es);
  const void* vc = get_aligned_buf<char>(info, 2, "vCache", mul(mul(num_blocks, p.block_size), p.kv_heads, p.v_stride * es), es);
  // Optional per-head attention sinks (gpt-oss): a device array of `heads` f32 logits.
  p.sinks = opt_float_buf(env, o, "sinks", mul(p.heads, F4));
  const int32_t* si = get_buf<int32_t>(info, 3, "seqInfo", mul(p.num_seqs, 3, I4));
  const int32_t* bt = get_buf<int32_t>(info, 4, "blockTables", mul(p.num_seqs, p.max_blocks, I4));
  float* out = get_buf<float>(info, 6, "out", mul(total, p.heads, p.dv * F4));
  Stream s = get_stream(info, 7);
  // NOTE: seqInfo and blockTables live on the device; the engine builds them (ctx_len <=
  // maxContext, from its host copy of seqInfo; blocks < numBlocks; q rows within totalTokens). The
  // kernel reads no key past min(maxContext, maxBlocks * blockSize) whatever ctx_len says (the
  // result is then wrong, not a fault); block ids and q rows it trusts.
  guard(env, [&] { cuda::paged_attention(q, kc, vc, si, bt, p, total, max_ctx, out, s); });
  return env.Undefined();
}

// ------------------------------------------------------------------------------- glue
// The engine's small ops (glue.cu). Every scalar argument and the stream are checked before the
// buffers, and all of it before the device is touched.

// cudaGemmF32(x, m, w, wDtype, n, k, y, bias, accumulate, stream?)
Napi::Value gemm_f32(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 9, "cudaGemmF32");
  const int m = dim(info, 1, "m"), n = dim(info, 4, "n"), k = dim(info, 5, "k");
  const std::string wd = info[3].IsString() ? info[3].As<Napi::String>().Utf8Value() : "";
  if (wd != "f32" && wd != "bf16") throw_type(env, "wDtype must be 'f32' or 'bf16'");
  const DType wdt = wd == "f32" ? DType::F32 : DType::BF16;
  const bool acc = get_bool(info, 8, "accumulate");
  Stream s = get_stream(info, 9);
  const float* x = get_aligned_buf<float>(info, 0, "x", mul(m, k, F4));
  const void* w = wdt == DType::F32 ? static_cast<const void*>(get_aligned_buf<float>(info, 2, "w", mul(n, k, F4)))
                                    : static_cast<const void*>(get_aligned_buf<uint16_t>(info, 2, "w", mul(n, k, B2)));
  float* y = get_aligned_buf<float>(info, 6, "y", mul(m, n, F4));
  const float* bias = is_nullish(info[7]) ? nullptr : get_aligned_buf<float>(info, 7, "bias", mul(n, F4));
  guard(env, [&] { cuda::gemm_f32(x, m, w, wdt, n, k, y, bias, acc, s); });
  return env.Undefined();
}

// cudaAdd(y, x, n, stream?)
Napi::Value add(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 3, "cudaAdd");
  const int64_t n = get_int(info, 2, "n", 0, int64_t{1} << 42);
  Stream s = get_stream(info, 3);
  float* y = get_aligned_buf<float>(info, 0, "y", mul(static_cast<size_t>(n), F4));
  const float* x = get_aligned_buf<float>(info, 1, "x", mul(static_cast<size_t>(n), F4));
  guard(env, [&] { cuda::add(y, x, static_cast<size_t>(n), s); });
  return env.Undefined();
}

// cudaGatedAdd(out, y, gate, t, h, stream?)
Napi::Value gated_add(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 5, "cudaGatedAdd");
  const int t = dim(info, 3, "t"), h = dim(info, 4, "h");
  Stream s = get_stream(info, 5);
  float* out = get_aligned_buf<float>(info, 0, "out", mul(t, h, F4));
  const float* y = get_aligned_buf<float>(info, 1, "y", mul(t, h, F4));
  const float* gate = get_aligned_buf<float>(info, 2, "gate", mul(t, F4));
  guard(env, [&] { cuda::gated_add(out, y, gate, t, h, s); });
  return env.Undefined();
}

// cudaClamp(x, n, limit, stream?)
Napi::Value clamp(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 3, "cudaClamp");
  const int64_t n = get_int(info, 1, "n", 0, int64_t{1} << 42);
  const double limit = get_double(info, 2, "limit");
  if (!(limit >= 0)) throw_range(env, "limit is " + js_number(limit) + ", expected a non-negative number");
  Stream s = get_stream(info, 3);
  float* x = get_aligned_buf<float>(info, 0, "x", mul(static_cast<size_t>(n), F4));
  guard(env, [&] { cuda::clamp(x, static_cast<size_t>(n), static_cast<float>(limit), s); });
  return env.Undefined();
}

// cudaSigmoidMul(x, gate, n, stream?)
Napi::Value sigmoid_mul(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 3, "cudaSigmoidMul");
  const int64_t n = get_int(info, 2, "n", 0, int64_t{1} << 42);
  Stream s = get_stream(info, 3);
  float* x = get_aligned_buf<float>(info, 0, "x", mul(static_cast<size_t>(n), F4));
  const float* gate = get_aligned_buf<float>(info, 1, "gate", mul(static_cast<size_t>(n), F4));
  guard(env, [&] { cuda::sigmoid_mul(x, gate, static_cast<size_t>(n), s); });
  return env.Undefined();
}

// cudaDeltaGates(ba, t, hv, negA, dtBias, g, beta, stream?)
Napi::Value delta_gates(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 7, "cudaDeltaGates");
  const int t = dim(info, 1, "t"), hv = dim(info, 2, "hv");
  Stream s = get_stream(info, 7);
  const float* ba = get_aligned_buf<float>(info, 0, "ba", mul(t, 2 * static_cast<size_t>(hv), F4));
  const float* neg_a = get_aligned_buf<float>(info, 3, "negA", mul(hv, F4));
  const float* dt_bias = get_aligned_buf<float>(info, 4, "dtBias", mul(hv, F4));
  float* g = get_aligned_buf<float>(info, 5, "g", mul(t, hv, F4));
  float* beta = get_aligned_buf<float>(info, 6, "beta", mul(t, hv, F4));
  guard(env, [&] { cuda::delta_gates(ba, t, hv, neg_a, dt_bias, g, beta, s); });
  return env.Undefined();
}

// cudaCopy2D(dst, dstOffsetBytes, dstPitchBytes, src, srcOffsetBytes, srcPitchBytes, widthBytes,
//            rows, stream?)
// NOTE: the two slices must not overlap (cudaMemcpy2D's rule); nothing checks it here.
Napi::Value copy_2d(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 8, "cudaCopy2D");
  constexpr int64_t kMax = int64_t{1} << 44;
  const int64_t doff = get_int(info, 1, "dstOffsetBytes", 0, kMax);
  const int64_t dpitch = get_int(info, 2, "dstPitchBytes", 0, kMax);
  const int64_t soff = get_int(info, 4, "srcOffsetBytes", 0, kMax);
  const int64_t spitch = get_int(info, 5, "srcPitchBytes", 0, kMax);
  const int64_t width = get_int(info, 6, "widthBytes", 0, kMax);
  const int64_t rows = get_int(info, 7, "rows", 0, kMax);
  if (width > dpitch)
    throw_range(env, "widthBytes is " + std::to_string(width) + ", expected at most dstPitchBytes = " + std::to_string(dpitch));
  if (width > spitch)
    throw_range(env, "widthBytes is " + std::to_string(width) + ", expected at most srcPitchBytes = " + std::to_string(spitch));
  Stream s = get_stream(info, 8);
  // Bytes a slice reaches: offset + (rows - 1) * pitch + width (nothing when it is empty).
  auto reach = [&](int64_t off, int64_t pitch) -> size_t {
    if (rows == 0 || width == 0) return 0;
    return add_sat(add_sat(static_cast<size_t>(off), mul(static_cast<size_t>(rows - 1), static_cast<size_t>(pitch))),
                   static_cast<size_t>(width));
  };
  char* dst = get_buf<char>(info, 0, "dst", reach(doff, dpitch));
  const char* src = get_buf<char>(info, 3, "src", reach(soff, spitch));
  guard(env, [&] {
    cuda::copy_2d(dst + doff, static_cast<size_t>(dpitch), src + soff, static_cast<size_t>(spitch),
                  static_cast<size_t>(width), static_cast<size_t>(rows), s);
  });
  return env.Undefined();
}

// cudaCopyRowRange(dst, src, offsets, lo, hi, rowBytes, maxRows, stream?)
Napi::Value copy_row_range(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 7, "cudaCopyRowRange");
  const int lo = dim(info, 3, "lo");
  const int hi = dim(info, 4, "hi", lo, 2147483646);
  const int64_t row_bytes = get_int(info, 5, "rowBytes", 0, int64_t{1} << 40);
  const int max_rows = dim(info, 6, "maxRows");
  Stream s = get_stream(info, 7);
  const size_t span = mul(static_cast<size_t>(max_rows), static_cast<size_t>(row_bytes));
  void* dst = get_buf(info, 0, "dst", span);
  const void* src = get_buf(info, 1, "src", span);
  const int32_t* offsets = get_aligned_buf<int32_t>(info, 2, "offsets", mul(static_cast<size_t>(hi) + 1, I4));
  // NOTE: offsets[lo] and offsets[hi] live on the device; the kernel clamps them to [0, maxRows].
  guard(env, [&] {
    cuda::copy_row_range(dst, src, offsets, lo, hi, static_cast<size_t>(row_bytes), max_rows, s);
  });
  return env.Undefined();
}

// ------------------------------------------------------------------------------- NCCL
Napi::Value nccl_unique_id(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Uint8Array out = Napi::Uint8Array::New(env, kNcclUniqueIdBytes);
  guard(env, [&] { expertd::nccl_unique_id(out.Data()); });
  return out;
}

std::vector<int64_t> byte_counts(const Napi::CallbackInfo& info, size_t i, const char* name, int world) {
  Napi::Env env = info.Env();
  if (!info[i].IsTypedArray() || info[i].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array)
    throw_type(env, std::string(name) + " must be a Float64Array");
  auto a = info[i].As<Napi::Float64Array>();
  if (a.ElementLength() < static_cast<size_t>(world))
    throw_range(env, std::string(name) + ".length is " + std::to_string(a.ElementLength()) +
                         ", expected at least " + std::to_string(world));
  std::vector<int64_t> v(world);
  for (int r = 0; r < world; ++r) {
    const double d = a[r];
    if (!std::isfinite(d) || d < 0 || d != std::floor(d) || d > 9007199254740991.0)
      throw_range(env, std::string(name) + "[" + std::to_string(r) + "] is " + std::to_string(d) +
                           ", expected a non-negative integer");
    v[r] = static_cast<int64_t>(d);
  }
  return v;
}

// cudaNcclJoin(uniqueId, worldSize, rank, timeoutMs = 600000): blocks until every rank joined, at
// most timeoutMs (then E_COMM); timeoutMs also bounds each later collective of the group.
Napi::Value nccl_join(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 3, "cudaNcclJoin");
  Span<uint8_t> id = get_array<uint8_t>(info, 0, "uniqueId", kNcclUniqueIdBytes, true);
  const int world = dim(info, 1, "worldSize", 1, 65536);
  const int rank = dim(info, 2, "rank", 0, world - 1);
  const int timeout_ms = info.Length() > 3 && !is_nullish(info[3]) ? dim(info, 3, "timeoutMs", 1, 2147483647) : 600000;
  std::shared_ptr<Comm> comm;
  guard(env, [&] { comm = expertd::nccl_join(id.data, world, rank, timeout_ms); });
  auto st = std::make_shared<std::shared_ptr<Comm>>(comm);
  auto live = [st](Napi::Env e) -> Comm& {
    if (!*st) throw_disposed(e, "NCCL comm group");
    return **st;
  };
  Napi::Object g = Napi::Object::New(env);
  g.DefineProperties({
      Napi::PropertyDescriptor::Value("rank", Napi::Number::New(env, rank), napi_enumerable),
      Napi::PropertyDescriptor::Value("worldSize", Napi::Number::New(env, world), napi_enumerable),
      Napi::PropertyDescriptor::Value("backend", Napi::String::New(env, "nccl"), napi_enumerable),
  });
  // all2allv(send, sendBytes, recv, recvBytes, stream?): enqueued on stream when given, else
  // blocking on the group's own stream.
  g.Set("all2allv", Napi::Function::New(env, [live, world](const Napi::CallbackInfo& ci) -> Napi::Value {
    Napi::Env e = ci.Env();
    expect_args(ci, 4, "all2allv");
    Comm& c = live(e);
    std::vector<int64_t> sb = byte_counts(ci, 1, "sendBytes", world), rb = byte_counts(ci, 3, "recvBytes", world);
    int64_t ssum = 0, rsum = 0;
    for (int r = 0; r < world; ++r) ssum += sb[r], rsum += rb[r];
    const void* send = get_buf(ci, 0, "send", static_cast<size_t>(ssum));
    void* recv = get_buf(ci, 2, "recv", static_cast<size_t>(rsum));
    if (ci.Length() > 4 && !is_nullish(ci[4])) {
      Stream s = get_stream(ci, 4);
      guard(e, [&] { nccl_all2allv_async(c, send, sb.data(), recv, rb.data(), s); });
    } else {
      guard(e, [&] { c.all2allv(send, sb.data(), recv, rb.data()); });
    }
    return e.Undefined();
  }, "all2allv"));
  g.Set("all2allCounts", Napi::Function::New(env, [live, world](const Napi::CallbackInfo& ci) -> Napi::Value {
    Napi::Env e = ci.Env();
    expect_args(ci, 2, "all2allCounts");
    Comm& c = live(e);
    std::vector<int64_t> send = byte_counts(ci, 0, "send", world);
    if (!ci[1].IsTypedArray() || ci[1].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array ||
        ci[1].As<Napi::Float64Array>().ElementLength() < static_cast<size_t>(world))
      throw_type(e, "recv must be a Float64Array of at least worldSize elements");
    std::vector<int64_t> got(world);
    guard(e, [&] { c.all2all_i64(send.data(), got.data()); });
    auto recv = ci[1].As<Napi::Float64Array>();
    for (int r = 0; r < world; ++r) recv[r] = static_cast<double>(got[r]);
    return e.Undefined();
  }, "all2allCounts"));
  g.Set("barrier", Napi::Function::New(env, [live](const Napi::CallbackInfo& ci) -> Napi::Value {
    Comm& c = live(ci.Env());
    guard(ci.Env(), [&] { c.barrier(); });
    return ci.Env().Undefined();
  }, "barrier"));
  g.Set("dispose", Napi::Function::New(env, [st](const Napi::CallbackInfo& ci) -> Napi::Value {
    st->reset();
    return ci.Env().Undefined();
  }, "dispose"));
  return g;
}

}  // namespace

void register_cuda(Napi::Env env, Napi::Object exports) {
  auto* c = new Ctors();
  Napi::Function buf = BufferHandle::define(env), stream = StreamHandle::define(env);
  Napi::Function event = EventHandle::define(env), table = TableHandle::define(env);
  c->buffer = Napi::Persistent(buf);
  c->stream = Napi::Persistent(stream);
  c->event = Napi::Persistent(event);
  c->table = Napi::Persistent(table);
  {
    std::lock_guard<std::mutex> lock(g_ctors_mu);
    g_ctors[env] = c;
  }
  napi_env raw = env;
  env.AddCleanupHook([raw, c] {
    std::lock_guard<std::mutex> lock(g_ctors_mu);
    g_ctors.erase(raw);
    delete c;
  });
  exports.Set("CudaBuffer", buf);
  exports.Set("CudaStream", stream);
  exports.Set("CudaEvent", event);
  exports.Set("CudaExpertTable", table);
  auto fn = [&](const char* name, Napi::Value (*f)(const Napi::CallbackInfo&)) {
    exports.Set(name, Napi::Function::New(env, f, name));
  };
  fn("cudaDeviceCount", device_count);
  fn("cudaDeviceInfo", device_info);
  fn("cudaSetDevice", set_device);
  fn("cudaDeviceLost", device_lost);
  fn("cudaSynchronize", synchronize);
  fn("cudaMemInfo", mem_info);
  fn("cudaEmptyCache", empty_cache);
  fn("cudaBuffer", buffer);
  fn("cudaPinnedBuffer", pinned_buffer);
  fn("cudaCopyToDevice", copy_to_device);
  fn("cudaCopyToHost", copy_to_host);
  fn("cudaCopyDevice", copy_device);
  fn("cudaFill", fill);
  fn("cudaCublasLt", cublaslt);
  fn("cudaLibraries", libraries);
  fn("cudaGemmPaths", gemm_paths);
  fn("cudaSm90SelfCheck", sm90_self_check);
  fn("cudaConvert", convert);
  fn("cudaGroupGemmFfn", group_gemm_ffn);
  fn("cudaQuantPaths", quant_paths);
  fn("cudaGroupGemmBiasedFfn", group_gemm_biased_ffn);
  fn("cudaDenseGemm", dense_gemm);
  fn("cudaDenseGemmQuant", dense_gemm_quant);
  fn("cudaRoute", route);
  fn("cudaPermute", permute);
  fn("cudaGatherExpertColumns", gather_expert_columns);
  fn("cudaUnpermuteCombine", unpermute_combine);
  fn("cudaRmsNorm", rms_norm);
  fn("cudaRope", rope);
  fn("cudaCausalConv1d", causal_conv1d);
  fn("cudaGatedDeltaRule", gated_delta_rule);
  fn("cudaGatedRmsNorm", gated_rms_norm);
  fn("cudaSiluMul", silu_mul);
  fn("cudaClampedSwiglu", clamped_swiglu);
  fn("cudaEmbedding", embedding);
  fn("cudaSoftmax", softmax);
  fn("cudaTopN", top_n);
  fn("cudaSampleBatch", sample_batch);
  fn("cudaKvCacheWrite", kv_cache_write);
  fn("cudaPagedAttention", paged_attention);
  fn("cudaGemmF32", gemm_f32);
  fn("cudaAdd", add);
  fn("cudaGatedAdd", gated_add);
  fn("cudaClamp", clamp);
  fn("cudaSigmoidMul", sigmoid_mul);
  fn("cudaDeltaGates", delta_gates);
  fn("cudaCopy2D", copy_2d);
  fn("cudaCopyRowRange", copy_row_range);
  fn("cudaNcclUniqueId", nccl_unique_id);
  fn("cudaNcclJoin", nccl_join);
}

}  // namespace expertd::addon
