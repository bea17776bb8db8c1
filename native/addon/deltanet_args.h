// The Gated DeltaNet options object ({T, Hk, Hv, Dk, Dv, l2normQk, chunk?, qStride?, kStride?,
// vStride?}), read and checked the same way by the CPU binding (bind_deltanet.cc) and the CUDA one.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "args.h"
#include "expertd/ops.h"

namespace expertd::addon {

namespace deltanet_args {

inline std::string s(int64_t v) { return std::to_string(v); }

inline int64_t opt_int(Napi::Env env, Napi::Object o, const char* key, bool required, int64_t def,
                       int64_t min, int64_t max) {
  Napi::Value v = o.Get(key);
  const std::string name = std::string("opts.") + key;
  if (v.IsUndefined()) {
    if (required) throw_type(env, name + " must be an integer");
    return def;
  }
  if (!v.IsNumber()) throw_type(env, name + " must be an integer");
  const double d = v.As<Napi::Number>().DoubleValue();
  if (!std::isfinite(d) || d != std::floor(d)) throw_type(env, name + " must be an integer");
  if (d < static_cast<double>(min) || d > static_cast<double>(max))
    throw_range(env, name + " is " + std::to_string(static_cast<int64_t>(d)) + ", expected " + s(min) +
                         ".." + s(max));
  return static_cast<int64_t>(d);
}

}  // namespace deltanet_args

constexpr int64_t kDeltaMaxChunk = 256;

// opts of gatedDeltaRule(Batch) / cudaGatedDeltaRule. dk_max bounds Dk (the CUDA kernel keeps a
// state slice in shared memory).
inline DeltaRuleParams delta_params(Napi::Env env, const Napi::Value& v, int64_t dk_max = 65536) {
  using deltanet_args::opt_int;
  using deltanet_args::s;
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  if (!v.IsObject() || v.IsArray() || v.IsTypedArray()) throw_type(env, "opts must be an object");
  Napi::Object o = v.As<Napi::Object>();
  DeltaRuleParams p;
  p.tokens = static_cast<int>(opt_int(env, o, "T", true, 0, 0, kMax));
  p.hk = static_cast<int>(opt_int(env, o, "Hk", true, 0, 1, kMax));
  p.hv = static_cast<int>(opt_int(env, o, "Hv", true, 0, 1, kMax));
  p.dk = static_cast<int>(opt_int(env, o, "Dk", true, 0, 1, dk_max));
  p.dv = static_cast<int>(opt_int(env, o, "Dv", true, 0, 1, 65536));
  if (p.hv % p.hk != 0)
    throw_range(env, "opts.Hv is " + s(p.hv) + ", expected a multiple of opts.Hk (" + s(p.hk) + ")");
  Napi::Value l2 = o.Get("l2normQk");
  if (!l2.IsBoolean()) throw_type(env, "opts.l2normQk must be a boolean");
  p.l2norm_qk = l2.As<Napi::Boolean>().Value();
  p.chunk = static_cast<int>(opt_int(env, o, "chunk", false, 64, 1, kDeltaMaxChunk));
  const int64_t qk_row = static_cast<int64_t>(p.hk) * p.dk;
  const int64_t v_row = static_cast<int64_t>(p.hv) * p.dv;
  if (qk_row > kMax || v_row > kMax)
    throw_range(env, "opts.Hk * opts.Dk and opts.Hv * opts.Dv must be at most " + s(kMax));
  p.q_stride = static_cast<int>(opt_int(env, o, "qStride", false, qk_row, qk_row, kMax));
  p.k_stride = static_cast<int>(opt_int(env, o, "kStride", false, qk_row, qk_row, kMax));
  p.v_stride = static_cast<int>(opt_int(env, o, "vStride", false, v_row, v_row, kMax));
  return p;
}

// Elements a strided [T, row] operand must have: (T-1) rows apart plus one row.
inline int64_t strided_len(int64_t t, int64_t stride, int64_t row) {
  return t == 0 ? 0 : (t - 1) * stride + row;
}

}  // namespace expertd::addon
