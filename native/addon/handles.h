// Opaque handles crossing the addon boundary: packed weights and per-layer expert tables. Each
// has dispose() and a finalizer backstop; a disposed handle raises E_DISPOSED when used.
#pragma once
#include <napi.h>

#include <memory>
#include <vector>

#include "expertd/ops.h"

namespace expertd::addon {

class WeightHandle : public Napi::ObjectWrap<WeightHandle> {
 public:
  static Napi::Function define(Napi::Env env);
  static Napi::Object create(Napi::Env env, std::shared_ptr<PackedWeight> w);
  explicit WeightHandle(const Napi::CallbackInfo& info);

  // The weight, or throws E_DISPOSED naming `what`.
  const std::shared_ptr<PackedWeight>& get(Napi::Env env, const char* what) const;

 private:
  Napi::Value dispose(const Napi::CallbackInfo& info);
  Napi::Value getN(const Napi::CallbackInfo& info);
  Napi::Value getK(const Napi::CallbackInfo& info);
  Napi::Value getDtype(const Napi::CallbackInfo& info);
  Napi::Value getKind(const Napi::CallbackInfo& info);
  Napi::Value getQuant(const Napi::CallbackInfo& info);
  Napi::Value getSizeBytes(const Napi::CallbackInfo& info);
  Napi::Value getDisposed(const Napi::CallbackInfo& info);
  std::shared_ptr<PackedWeight> weight_;
  int64_t accounted_ = 0;
};

// Per-layer table of expert slots: expert e -> (gate_up, down) packed weights. Holds shared
// references, so disposing a weight handle never leaves a dangling slot.
class ExpertTableHandle : public Napi::ObjectWrap<ExpertTableHandle> {
 public:
  static Napi::Function define(Napi::Env env);
  explicit ExpertTableHandle(const Napi::CallbackInfo& info);

  int num_experts() const { return static_cast<int>(gate_up_.size()); }
  int hidden() const { return hidden_; }
  int inter() const { return inter_; }
  const std::vector<std::shared_ptr<PackedWeight>>& gate_up() const { return gate_up_; }
  const std::vector<std::shared_ptr<PackedWeight>>& down() const { return down_; }
  bool disposed() const { return disposed_; }

 private:
  Napi::Value set(const Napi::CallbackInfo& info);
  Napi::Value clear(const Napi::CallbackInfo& info);
  Napi::Value has(const Napi::CallbackInfo& info);
  Napi::Value get(const Napi::CallbackInfo& info);
  Napi::Value dispose(const Napi::CallbackInfo& info);
  Napi::Value getNumExperts(const Napi::CallbackInfo& info);
  std::vector<std::shared_ptr<PackedWeight>> gate_up_;
  std::vector<std::shared_ptr<PackedWeight>> down_;
  int hidden_ = 0;
  int inter_ = 0;
  bool disposed_ = false;
};

// Whether v is a PackedWeight / ExpertTable handle (by the type tag their constructors set: a
// napi_instanceof per argument cost more than the rest of a small op's argument checks).
bool is_weight(const Napi::Value& v);
bool is_expert_table(const Napi::Value& v);
// Unwraps argument i as a live weight handle.
const PackedWeight& get_weight(const Napi::CallbackInfo& info, size_t i, const char* name);
// "int8" | "int4" | "fp8" -> QFormat (throws a TypeError otherwise).
QFormat parse_quantize(Napi::Env env, const Napi::Value& v);
// The optional trailing (format, group) of packWeight / packGateUp / allocPackedWeight: quantize
// at load (--quantize); absent or null = the float dtype.
struct QuantArg {
  QFormat q = QFormat::None;
  int group = 0;
};
QuantArg quant_arg(const Napi::CallbackInfo& info, size_t i);
// An empty packed weight: float of dtype, or quantized as qa says.
std::shared_ptr<PackedWeight> alloc_weight(const QuantArg& qa, DType dtype, WeightKind kind, int n, int k);
ExpertTableHandle& get_expert_table(const Napi::CallbackInfo& info, size_t i, const char* name);

// Per-env constructors (stored in the addon's instance data).
struct AddonData {
  Napi::FunctionReference weight_ctor;
  Napi::FunctionReference expert_table_ctor;
};

}  // namespace expertd::addon
