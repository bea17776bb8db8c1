// Weight and expert-table handles (see handles.h).
#include "handles.h"

#include "args.h"

namespace expertd::addon {

namespace {
constexpr napi_type_tag kWeightTag = {0x6578706572746401ULL, 0x7061636b65647731ULL};
constexpr napi_type_tag kExpertTableTag = {0x6578706572746402ULL, 0x6578706572747431ULL};
}  // namespace

bool is_weight(const Napi::Value& v) {
  return v.IsObject() && v.As<Napi::Object>().CheckTypeTag(&kWeightTag);
}

bool is_expert_table(const Napi::Value& v) {
  return v.IsObject() && v.As<Napi::Object>().CheckTypeTag(&kExpertTableTag);
}

Napi::Function WeightHandle::define(Napi::Env env) {
  return DefineClass(env, "PackedWeight",
                     {InstanceMethod("dispose", &WeightHandle::dispose),
                      InstanceAccessor("n", &WeightHandle::getN, nullptr),
                      InstanceAccessor("k", &WeightHandle::getK, nullptr),
                      InstanceAccessor("dtype", &WeightHandle::getDtype, nullptr),
                      InstanceAccessor("kind", &WeightHandle::getKind, nullptr),
                      InstanceAccessor("quant", &WeightHandle::getQuant, nullptr),
                      InstanceAccessor("sizeBytes", &WeightHandle::getSizeBytes, nullptr),
                      InstanceAccessor("disposed", &WeightHandle::getDisposed, nullptr)});
}

WeightHandle::WeightHandle(const Napi::CallbackInfo& info) : Napi::ObjectWrap<WeightHandle>(info) {
  // Constructed only through create(): the weight arrives as an External.
  if (info.Length() == 1 && info[0].IsExternal()) {
    auto* sp = info[0].As<Napi::External<std::shared_ptr<PackedWeight>>>().Data();
    weight_ = *sp;
    info.This().As<Napi::Object>().TypeTag(&kWeightTag);
    accounted_ = static_cast<int64_t>(weight_->size_bytes);
    Napi::MemoryManagement::AdjustExternalMemory(info.Env(), accounted_);
  } else {
    throw_type(info.Env(), "PackedWeight cannot be constructed directly; use packWeight()");
  }
}

Napi::Object WeightHandle::create(Napi::Env env, std::shared_ptr<PackedWeight> w) {
  auto* data = env.GetInstanceData<AddonData>();
  std::shared_ptr<PackedWeight> tmp = std::move(w);
  auto ext = Napi::External<std::shared_ptr<PackedWeight>>::New(env, &tmp);
  return data->weight_ctor.New({ext});
}

const std::shared_ptr<PackedWeight>& WeightHandle::get(Napi::Env env, const char* what) const {
  if (!weight_) {
    Napi::Error e = Napi::Error::New(env, std::string(what) + " has been disposed");
    e.Set("code", Napi::String::New(env, "E_DISPOSED"));
    throw e;
  }
  return weight_;
}

Napi::Value WeightHandle::dispose(const Napi::CallbackInfo& info) {
  if (weight_) {
    Napi::MemoryManagement::AdjustExternalMemory(info.Env(), -accounted_);
    accounted_ = 0;
    weight_.reset();
  }
  return info.Env().Undefined();
}

Napi::Value WeightHandle::getN(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), get(info.Env(), "weight")->n);
}
Napi::Value WeightHandle::getK(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), get(info.Env(), "weight")->k);
}
Napi::Value WeightHandle::getDtype(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), dtype_name(get(info.Env(), "weight")->dtype));
}
Napi::Value WeightHandle::getKind(const Napi::CallbackInfo& info) {
  return Napi::String::New(
      info.Env(), get(info.Env(), "weight")->kind == WeightKind::GateUp ? "gate_up" : "plain");
}
Napi::Value WeightHandle::getQuant(const Napi::CallbackInfo& info) {
  const PackedWeight& w = *get(info.Env(), "weight");
  if (!w.quantized()) return info.Env().Null();
  return Napi::String::New(info.Env(), qformat_name(w.q));
}
Napi::Value WeightHandle::getSizeBytes(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(),
                           weight_ ? static_cast<double>(weight_->size_bytes) : 0.0);
}
Napi::Value WeightHandle::getDisposed(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), !weight_);
}

// --quantize formats by name (MXFP4 is a checkpoint format only).
QFormat parse_quantize(Napi::Env env, const Napi::Value& v) {
  const std::string s = v.IsString() ? v.As<Napi::String>().Utf8Value() : std::string();
  if (s == "int8") return QFormat::I8;
  if (s == "int4") return QFormat::I4;
  if (s == "fp8") return QFormat::F8;
  throw_type(env, "format must be \"int8\", \"int4\" or \"fp8\"");
  return QFormat::None;
}

QuantArg quant_arg(const Napi::CallbackInfo& info, size_t i) {
  QuantArg a;
  if (info.Length() <= i || is_nullish(info[i])) return a;
  a.q = parse_quantize(info.Env(), info[i]);
  a.group = static_cast<int>(get_int(info, i + 1, "group", 0, int64_t(1) << 24));
  return a;
}

std::shared_ptr<PackedWeight> alloc_weight(const QuantArg& qa, DType dtype, WeightKind kind, int n, int k) {
  return qa.q == QFormat::None ? alloc_packed_weight(dtype, kind, n, k)
                               : alloc_quant_weight(qa.q, qa.group, kind, n, k, quantize_scale_type(qa.q));
}

const PackedWeight& get_weight(const Napi::CallbackInfo& info, size_t i, const char* name) {
  Napi::Env env = info.Env();
  if (!is_weight(info[i])) throw_type(env, std::string(name) + " must be a PackedWeight");
  auto* h = WeightHandle::Unwrap(info[i].As<Napi::Object>());
  return *h->get(env, name);
}

// ---------------------------------------------------------------------------------------------

Napi::Function ExpertTableHandle::define(Napi::Env env) {
  return DefineClass(env, "ExpertTable",
                     {InstanceMethod("set", &ExpertTableHandle::set),
                      InstanceMethod("clear", &ExpertTableHandle::clear),
                      InstanceMethod("has", &ExpertTableHandle::has),
                      InstanceMethod("get", &ExpertTableHandle::get),
                      InstanceMethod("dispose", &ExpertTableHandle::dispose),
                      InstanceAccessor("numExperts", &ExpertTableHandle::getNumExperts, nullptr)});
}

// new ExpertTable(numExperts, hidden, inter)
ExpertTableHandle::ExpertTableHandle(const Napi::CallbackInfo& info)
    : Napi::ObjectWrap<ExpertTableHandle>(info) {
  expect_args(info, 3, "ExpertTable");
  int e = static_cast<int>(get_int(info, 0, "numExperts", 1, 1 << 16));
  hidden_ = static_cast<int>(get_int(info, 1, "hidden", 1, 1 << 20));
  inter_ = static_cast<int>(get_int(info, 2, "inter", 1, 1 << 20));
  gate_up_.resize(e);
  down_.resize(e);
  info.This().As<Napi::Object>().TypeTag(&kExpertTableTag);
}

// set(expert, gateUp: PackedWeight [2I, H] gate_up, down: PackedWeight [H, I])
Napi::Value ExpertTableHandle::set(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (disposed_) throw_native(env, Error(ErrorCode::Disposed, "ExpertTable has been disposed"));
  expect_args(info, 3, "ExpertTable.set");
  int e = static_cast<int>(get_int(info, 0, "expert", 0, num_experts() - 1));
  for (size_t i = 1; i <= 2; ++i) {
    if (!is_weight(info[i]))
      throw_type(env, i == 1 ? "gateUp must be a PackedWeight" : "down must be a PackedWeight");
  }
  auto gu = WeightHandle::Unwrap(info[1].As<Napi::Object>())->get(env, "gateUp");
  auto dn = WeightHandle::Unwrap(info[2].As<Napi::Object>())->get(env, "down");
  if (gu->kind != WeightKind::GateUp) throw_type(env, "gateUp must be a gate_up weight (packGateUp)");
  if (gu->n != 2 * inter_ || gu->k != hidden_)
    throw_range(env, "gateUp shape is [" + std::to_string(gu->n) + ", " + std::to_string(gu->k) +
                         "], expected [" + std::to_string(2 * inter_) + ", " +
                         std::to_string(hidden_) + "]");
  if (dn->kind != WeightKind::Plain || dn->n != hidden_ || dn->k != inter_)
    throw_range(env, "down shape is [" + std::to_string(dn->n) + ", " + std::to_string(dn->k) +
                         "], expected [" + std::to_string(hidden_) + ", " +
                         std::to_string(inter_) + "]");
  gate_up_[e] = gu;
  down_[e] = dn;
  return env.Undefined();
}

Napi::Value ExpertTableHandle::clear(const Napi::CallbackInfo& info) {
  expect_args(info, 1, "ExpertTable.clear");
  int e = static_cast<int>(get_int(info, 0, "expert", 0, num_experts() - 1));
  if (!disposed_) {
    gate_up_[e].reset();
    down_[e].reset();
  }
  return info.Env().Undefined();
}

Napi::Value ExpertTableHandle::has(const Napi::CallbackInfo& info) {
  expect_args(info, 1, "ExpertTable.has");
  int e = static_cast<int>(get_int(info, 0, "expert", 0, num_experts() - 1));
  return Napi::Boolean::New(info.Env(), !disposed_ && gate_up_[e] != nullptr);
}

// get(expert): new handles sharing the slot's weights ({gateUp, down}), or null when empty. Used by
// the per-expert DenseGemm path of the MoE layer.
Napi::Value ExpertTableHandle::get(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 1, "ExpertTable.get");
  int e = static_cast<int>(get_int(info, 0, "expert", 0, num_experts() - 1));
  if (disposed_ || !gate_up_[e]) return env.Null();
  Napi::Object o = Napi::Object::New(env);
  o.Set("gateUp", WeightHandle::create(env, gate_up_[e]));
  o.Set("down", WeightHandle::create(env, down_[e]));
  return o;
}

Napi::Value ExpertTableHandle::dispose(const Napi::CallbackInfo& info) {
  disposed_ = true;
  for (auto& p : gate_up_) p.reset();
  for (auto& p : down_) p.reset();
  return info.Env().Undefined();
}

Napi::Value ExpertTableHandle::getNumExperts(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), num_experts());
}

ExpertTableHandle& get_expert_table(const Napi::CallbackInfo& info, size_t i, const char* name) {
  Napi::Env env = info.Env();
  if (!is_expert_table(info[i]))
    throw_type(env, std::string(name) + " must be an ExpertTable");
  auto* t = ExpertTableHandle::Unwrap(info[i].As<Napi::Object>());
  if (t->disposed()) throw_native(env, Error(ErrorCode::Disposed, std::string(name) + " has been disposed"));
  return *t;
}

}  // namespace expertd::addon
