// Bindings for the loader family: the ExpertLoader handle (a copy thread that fills expert cache
// slots from checkpoint byte ranges in priority order) and allocPackedWeight (an empty slot weight
// for it to fill). submit/poll/cancel never block; wait blocks the calling (engine) thread.
#include <cmath>
#include <memory>
#include <string>
#include <utility>

#include "args.h"
#include "expertd/expert_loader.h"
#include "handles.h"
#include "register.h"

namespace expertd::addon {

namespace {

constexpr int64_t kMaxDim = int64_t(1) << 24;
constexpr int64_t kMaxSafe = (int64_t(1) << 53);

std::shared_ptr<PackedWeight> weight_field(Napi::Env env, const Napi::Object& o, const char* key,
                                           const std::string& name) {
  Napi::Value v = o.Get(key);
  if (!is_weight(v))
    throw_type(env, name + " must be a PackedWeight");
  return WeightHandle::Unwrap(v.As<Napi::Object>())->get(env, name.c_str());
}

int64_t int_field(Napi::Env env, const Napi::Object& o, const char* key, const std::string& name,
                  int64_t min, int64_t max) {
  Napi::Value v = o.Get(key);
  if (!v.IsNumber()) throw_type(env, name + " must be a number");
  double d = v.As<Napi::Number>().DoubleValue();
  if (!std::isfinite(d) || d != std::floor(d)) throw_type(env, name + " must be an integer, got " + std::to_string(d));
  int64_t i = static_cast<int64_t>(d);
  if (i < min || i > max)
    throw_range(env, name + " is " + std::to_string(i) + ", expected " + std::to_string(min) + ".." +
                         std::to_string(max));
  return i;
}

FileRange range_field(Napi::Env env, const Napi::Object& job, const char* key, size_t want_bytes,
                      const std::string& shape) {
  const std::string name = std::string("job.") + key;
  Napi::Value v = job.Get(key);
  if (!v.IsObject()) throw_type(env, name + " must be an object {path, offset, sizeBytes}");
  Napi::Object r = v.As<Napi::Object>();
  Napi::Value p = r.Get("path");
  if (!p.IsString() || p.As<Napi::String>().Utf8Value().empty())
    throw_type(env, name + ".path must be a non-empty string");
  FileRange out;
  out.path = p.As<Napi::String>().Utf8Value();
  out.offset = static_cast<uint64_t>(int_field(env, r, "offset", name + ".offset", 0, kMaxSafe));
  out.size_bytes = static_cast<size_t>(int_field(env, r, "sizeBytes", name + ".sizeBytes", 0, kMaxSafe));
  if (out.size_bytes != want_bytes)
    throw_range(env, name + ".sizeBytes is " + std::to_string(out.size_bytes) + ", expected " +
                         std::to_string(want_bytes) + " (" + shape + ")");
  return out;
}

class ExpertLoaderHandle : public Napi::ObjectWrap<ExpertLoaderHandle> {
 public:
  static Napi::Function define(Napi::Env env) {
    return DefineClass(env, "ExpertLoader",
                       {InstanceMethod("submit", &ExpertLoaderHandle::submit),
                        InstanceMethod("poll", &ExpertLoaderHandle::poll),
                        InstanceMethod("wait", &ExpertLoaderHandle::wait),
                        InstanceMethod("cancel", &ExpertLoaderHandle::cancel),
                        InstanceMethod("stats", &ExpertLoaderHandle::stats),
                        InstanceMethod("dispose", &ExpertLoaderHandle::dispose),
                        InstanceAccessor("inFlight", &ExpertLoaderHandle::in_flight, nullptr),
                        InstanceAccessor("disposed", &ExpertLoaderHandle::disposed, nullptr)});
  }

  explicit ExpertLoaderHandle(const Napi::CallbackInfo& info)
      : Napi::ObjectWrap<ExpertLoaderHandle>(info) {
    guard(info.Env(), [&] { loader_ = std::make_unique<ExpertLoader>(); });
  }

 private:
  ExpertLoader& live(Napi::Env env) {
    if (!loader_) throw_native(env, Error(ErrorCode::Disposed, "ExpertLoader has been disposed"));
    return *loader_;
  }

  int64_t ticket_arg(const Napi::CallbackInfo& info, const char* fn) {
    expect_args(info, 1, fn);
    int64_t t = get_int(info, 0, "ticket", 1, kMaxSafe);
    if (!live(info.Env()).known(t))
      throw_range(info.Env(), "ticket " + std::to_string(t) +
                                  " is not pending (already waited for, cancelled, or never submitted)");
    return t;
  }

  // submit({gate, up, down: {path, offset, sizeBytes}, dtype, dst: {gateUp, down}, priority, delayUs?,
  //         fp8Block?: [br, bc], gateScale?, upScale?, downScale?, fp8Scales?: {dtype?, form?}})
  // With fp8Block the ranges are an FP8 checkpoint's e4m3 codes and the *Scale ranges their scales,
  // packed into fp8 slots of group bc (dtype is then ignored). fp8Scales says how the scales are
  // stored: dtype 'f32' (default), 'bf16' or 'f16'; form 'grid' (default: [ceil(rows / br),
  // ceil(cols / bc)]), 'channel' (one per row, [rows, 1]; br must be 1) or 'tensor' (one).
  // Or, layout 'gpt_oss', {gateUp [H, 2I], down [I, H], ...} in the checkpoint's layout.
  Napi::Value submit(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    expect_args(info, 1, "ExpertLoader.submit");
    ExpertLoader& loader = live(env);
    if (!info[0].IsObject()) throw_type(env, "job must be an object");
    Napi::Object o = info[0].As<Napi::Object>();
    ExpertLoadJob job;
    Napi::Value fb = o.Get("fp8Block");
    const bool fp8 = !is_nullish(fb);
    if (fp8) {
      if (!fb.IsArray() || fb.As<Napi::Array>().Length() != 2)
        throw_type(env, "job.fp8Block must be [blockRows, blockCols]");
      Napi::Array a = fb.As<Napi::Array>();
      for (uint32_t i = 0; i < 2; ++i) {
        Napi::Value v = a.Get(i);
        const double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1;
        if (!(d >= 1 && d <= kMaxDim && d == std::floor(d)))
          throw_range(env, "job.fp8Block[" + std::to_string(i) + "] must be a positive integer");
        (i == 0 ? job.fp8_br : job.fp8_bc) = static_cast<int>(d);
      }
      job.dtype = DType::BF16;  // unused
    } else {
      job.dtype = parse_dtype(env, o.Get("dtype"), "job.dtype");
    }
    Napi::Value dst = o.Get("dst");
    if (!dst.IsObject()) throw_type(env, "job.dst must be an object {gateUp, down}");
    job.gate_up_w = weight_field(env, dst.As<Napi::Object>(), "gateUp", "job.dst.gateUp");
    job.down_w = weight_field(env, dst.As<Napi::Object>(), "down", "job.dst.down");
    const PackedWeight& gu = *job.gate_up_w;
    const PackedWeight& dn = *job.down_w;
    if (gu.kind != WeightKind::GateUp) throw_type(env, "job.dst.gateUp must be a gate_up weight");
    if (dn.kind != WeightKind::Plain) throw_type(env, "job.dst.down must be a plain weight");
    const int64_t inter = gu.n / 2, h = gu.k;
    if (dn.n != h || dn.k != inter)
      throw_range(env, "job.dst.down shape is [" + std::to_string(dn.n) + ", " + std::to_string(dn.k) +
                           "], expected [" + std::to_string(h) + ", " + std::to_string(inter) +
                           "] (gateUp is [" + std::to_string(gu.n) + ", " + std::to_string(h) + "])");
    const char* elem = fp8 ? "e4m3" : dtype_name(job.dtype);
    const size_t bytes = static_cast<size_t>(inter * h) * (fp8 ? 1 : dtype_size(job.dtype));
    const std::string ih = "[" + std::to_string(inter) + ", " + std::to_string(h) + "] " + elem;
    const std::string hi = "[" + std::to_string(h) + ", " + std::to_string(inter) + "] " + elem;
    Napi::Value layout = o.Get("layout");
    if (!is_nullish(layout)) {
      const std::string l = layout.IsString() ? layout.As<Napi::String>().Utf8Value() : "";
      if (l != "rows" && l != "gpt_oss") throw_type(env, "job.layout must be 'rows' or 'gpt_oss'");
      job.gpt_oss = l == "gpt_oss";
    }
    if (job.gpt_oss && fp8) throw_type(env, "job.layout 'gpt_oss' has no FP8 form (drop fp8Block)");
    if (job.gpt_oss) {
      // The checkpoint's own layout: gate_up_proj [H, 2I] and down_proj [I, H] of one expert.
      const std::string h2i = "[" + std::to_string(h) + ", " + std::to_string(2 * inter) + "] " + elem;
      job.gate = range_field(env, o, "gateUp", 2 * bytes, h2i);
      job.down = range_field(env, o, "down", bytes, ih);
    } else {
      job.gate = range_field(env, o, "gate", bytes, ih);
      job.up = range_field(env, o, "up", bytes, ih);
      job.down = range_field(env, o, "down", bytes, hi);
    }
    if (fp8) {
      if (!gu.quantized() || gu.q != QFormat::F8 || !dn.quantized() || dn.q != QFormat::F8 ||
          gu.group != job.fp8_bc || dn.group != job.fp8_bc)
        throw_type(env, "job.dst weights must be fp8 weights of group " + std::to_string(job.fp8_bc) +
                            " (fp8Block[1]) for an FP8 job");
      const int64_t br = job.fp8_br, bc = job.fp8_bc;
      Napi::Value fs = o.Get("fp8Scales");
      std::string form = "grid";
      if (!is_nullish(fs)) {
        if (!fs.IsObject()) throw_type(env, "job.fp8Scales must be an object {dtype?, form?}");
        Napi::Object f = fs.As<Napi::Object>();
        if (!is_nullish(f.Get("dtype"))) job.fp8_scale_dtype = parse_dtype(env, f.Get("dtype"), "job.fp8Scales.dtype");
        if (!is_nullish(f.Get("form")))
          form = f.Get("form").IsString() ? f.Get("form").As<Napi::String>().Utf8Value() : "";
      }
      if (job.fp8_scale_dtype != DType::F32 && job.fp8_scale_dtype != DType::BF16 && job.fp8_scale_dtype != DType::F16)
        throw_type(env, "job.fp8Scales.dtype must be 'f32', 'bf16' or 'f16'");
      if (form == "grid") job.fp8_scale_form = Fp8ScaleForm::Grid;
      else if (form == "channel") job.fp8_scale_form = Fp8ScaleForm::Row;
      else if (form == "tensor") job.fp8_scale_form = Fp8ScaleForm::Tensor;
      else throw_type(env, "job.fp8Scales.form must be 'grid', 'channel' or 'tensor'");
      if (job.fp8_scale_form == Fp8ScaleForm::Row && br != 1)
        throw_range(env, "job.fp8Scales.form 'channel' needs fp8Block rows 1, got " + std::to_string(br));
      auto blocks = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
      // Scales stored per matrix [rows, cols]: the grid, a column of rows, or one.
      auto stored = [&](int64_t rows, int64_t cols) -> std::pair<int64_t, int64_t> {
        if (job.fp8_scale_form == Fp8ScaleForm::Grid) return {blocks(rows, br), blocks(cols, bc)};
        return {job.fp8_scale_form == Fp8ScaleForm::Row ? rows : 1, 1};
      };
      const size_t es = dtype_size(job.fp8_scale_dtype);
      const auto [r_ih, c_ih] = stored(inter, h);
      const auto [r_hi, c_hi] = stored(h, inter);
      const size_t s_ih = static_cast<size_t>(r_ih * c_ih) * es, s_hi = static_cast<size_t>(r_hi * c_hi) * es;
      const std::string sd = dtype_name(job.fp8_scale_dtype);
      const std::string sih = "[" + std::to_string(r_ih) + ", " + std::to_string(c_ih) + "] " + sd;
      const std::string shi = "[" + std::to_string(r_hi) + ", " + std::to_string(c_hi) + "] " + sd;
      job.gate_scale = range_field(env, o, "gateScale", s_ih, sih);
      job.up_scale = range_field(env, o, "upScale", s_ih, sih);
      job.down_scale = range_field(env, o, "downScale", s_hi, shi);
    }
    Napi::Value pr = o.Get("priority");
    if (!pr.IsNumber() || std::isnan(pr.As<Napi::Number>().DoubleValue()))
      throw_type(env, "job.priority must be a number");
    job.priority = pr.As<Napi::Number>().DoubleValue();
    Napi::Value d = o.Get("delayUs");
    if (!is_nullish(d)) {
      if (!d.IsNumber()) throw_type(env, "job.delayUs must be a number");
      job.delay_us = d.As<Napi::Number>().DoubleValue();
      if (!(job.delay_us >= 0 && job.delay_us <= 1e7))
        throw_range(env, "job.delayUs is " + std::to_string(job.delay_us) + ", expected 0..1e7");
    }
    int64_t t = 0;
    guard(env, [&] { t = loader.submit(std::move(job)); });
    return Napi::Number::New(env, static_cast<double>(t));
  }

  Napi::Value poll(const Napi::CallbackInfo& info) {
    int64_t t = ticket_arg(info, "ExpertLoader.poll");
    bool done = false;
    guard(info.Env(), [&] { done = loader_->poll(t); });
    return Napi::Boolean::New(info.Env(), done);
  }

  // wait(ticket) -> null on success, else the error text (the load's failure is the caller's to raise).
  Napi::Value wait(const Napi::CallbackInfo& info) {
    int64_t t = ticket_arg(info, "ExpertLoader.wait");
    std::string err;
    guard(info.Env(), [&] { err = loader_->wait(t); });
    if (err.empty()) return info.Env().Null();
    return Napi::String::New(info.Env(), err);
  }

  Napi::Value cancel(const Napi::CallbackInfo& info) {
    int64_t t = ticket_arg(info, "ExpertLoader.cancel");
    bool ok = false;
    guard(info.Env(), [&] { ok = loader_->cancel(t); });
    return Napi::Boolean::New(info.Env(), ok);
  }

  Napi::Value stats(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    ExpertLoader::Stats s = live(env).stats();
    Napi::Object o = Napi::Object::New(env);
    o.Set("busySeconds", s.busy_seconds);
    o.Set("readSeconds", s.read_seconds);
    o.Set("simulatedSeconds", s.simulated_seconds);
    o.Set("jobsDone", static_cast<double>(s.jobs_done));
    o.Set("bytesRead", static_cast<double>(s.bytes_read));
    return o;
  }

  Napi::Value in_flight(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), static_cast<double>(live(info.Env()).in_flight()));
  }

  Napi::Value disposed(const Napi::CallbackInfo& info) {
    return Napi::Boolean::New(info.Env(), !loader_);
  }

  // Finishes the running job (its weights stay alive through it), drops the queued ones.
  Napi::Value dispose(const Napi::CallbackInfo& info) {
    loader_.reset();
    return info.Env().Undefined();
  }

  std::unique_ptr<ExpertLoader> loader_;
};

// allocPackedWeight(dtype, kind, n, k, format?, group?) -> zero PackedWeight (an expert slot for
// the loader to fill; quantized when format is given)
Napi::Value alloc_packed_weight_js(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 4, "allocPackedWeight");
  const DType dtype = parse_dtype(env, info[0], "dtype");
  if (!info[1].IsString()) throw_type(env, "kind must be 'plain' or 'gate_up'");
  const std::string kind = info[1].As<Napi::String>().Utf8Value();
  if (kind != "plain" && kind != "gate_up")
    throw_type(env, "kind is '" + kind + "', expected 'plain' or 'gate_up'");
  const int64_t n = get_int(info, 2, "n", 1, kMaxDim);
  const int64_t k = get_int(info, 3, "k", 1, kMaxDim);
  if (kind == "gate_up" && n % 2 != 0)
    throw_range(env, "n is " + std::to_string(n) + ", expected an even number for a gate_up weight (2 * inter)");
  // Optional (format, group): a quantized slot (--quantize), filled by re-quantizing.
  const QuantArg qa = quant_arg(info, 4);
  std::shared_ptr<PackedWeight> w;
  guard(env, [&] {
    w = alloc_weight(qa, dtype, kind == "gate_up" ? WeightKind::GateUp : WeightKind::Plain,
                     static_cast<int>(n), static_cast<int>(k));
  });
  return WeightHandle::create(env, std::move(w));
}

}  // namespace

void register_loader(Napi::Env env, Napi::Object exports) {
  exports.Set("ExpertLoader", ExpertLoaderHandle::define(env));
  exports.Set("allocPackedWeight", Napi::Function::New(env, alloc_packed_weight_js, "allocPackedWeight"));
}

}  // namespace expertd::addon
