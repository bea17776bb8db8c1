// Argument checks at the addon edge: every binding validates its inputs here and throws
// TypeError/RangeError with an exact, indexed message and a `code`, so kernels can trust shapes.
#pragma once
#include <napi.h>

#include <cstdint>
#include <string>

#include "expertd/dtype.h"
#include "expertd/errors.h"

namespace expertd::addon {

[[noreturn]] inline void throw_type(Napi::Env env, const std::string& msg) {
  Napi::Error e = Napi::TypeError::New(env, msg);
  e.Set("code", Napi::String::New(env, "E_INVALID_ARG"));
  throw e;
}

[[noreturn]] inline void throw_range(Napi::Env env, const std::string& msg) {
  Napi::Error e = Napi::RangeError::New(env, msg);
  e.Set("code", Napi::String::New(env, "E_INVALID_ARG"));
  throw e;
}

// Converts a native failure into a JS Error carrying its code.
[[noreturn]] inline void throw_native(Napi::Env env, const expertd::Error& err) {
  if (err.code() == ErrorCode::InvalidArg) throw_type(env, err.what());
  if (err.code() == ErrorCode::Range) throw_range(env, err.what());
  Napi::Error e = Napi::Error::New(env, err.what());
  e.Set("code", Napi::String::New(env, error_code_name(err.code())));
  throw e;
}

// Runs a kernel call, mapping every C++ exception to a JS error (never lets one escape to node).
template <typename F>
inline void guard(Napi::Env env, F&& fn) {
  try {
    fn();
  } catch (const Napi::Error&) {
    throw;
  } catch (const expertd::Error& err) {
    throw_native(env, err);
  } catch (const std::bad_alloc&) {
    Napi::Error e = Napi::Error::New(env, "out of host memory");
    e.Set("code", Napi::String::New(env, "E_OOM"));
    throw e;
  } catch (const std::exception& ex) {
    Napi::Error e = Napi::Error::New(env, std::string("native error: ") + ex.what());
    e.Set("code", Napi::String::New(env, "E_INTERNAL"));
    throw e;
  }
}

inline void expect_args(const Napi::CallbackInfo& info, size_t n, const char* fn) {
  if (info.Length() < n)
    throw_type(info.Env(), std::string(fn) + " expects " + std::to_string(n) +
                               " arguments, got " + std::to_string(info.Length()));
}

inline int64_t get_int(const Napi::CallbackInfo& info, size_t i, const char* name, int64_t min,
                       int64_t max) {
  Napi::Env env = info.Env();
  if (!info[i].IsNumber()) throw_type(env, std::string(name) + " must be a number");
  double v = info[i].As<Napi::Number>().DoubleValue();
  if (v != static_cast<double>(static_cast<int64_t>(v)))
    throw_type(env, std::string(name) + " must be an integer, got " + std::to_string(v));
  int64_t iv = static_cast<int64_t>(v);
  if (iv < min || iv > max)
    throw_range(env, std::string(name) + " is " + std::to_string(iv) + ", expected " +
                         std::to_string(min) + ".." + std::to_string(max));
  return iv;
}

inline double get_double(const Napi::CallbackInfo& info, size_t i, const char* name) {
  if (!info[i].IsNumber()) throw_type(info.Env(), std::string(name) + " must be a number");
  return info[i].As<Napi::Number>().DoubleValue();
}

inline bool get_bool(const Napi::CallbackInfo& info, size_t i, const char* name) {
  if (!info[i].IsBoolean()) throw_type(info.Env(), std::string(name) + " must be a boolean");
  return info[i].As<Napi::Boolean>().Value();
}

inline bool is_nullish(const Napi::Value& v) { return v.IsNull() || v.IsUndefined(); }

template <typename T>
struct Span {
  T* data = nullptr;
  size_t length = 0;
};

template <typename T>
constexpr napi_typedarray_type typed_array_kind();
template <>
constexpr napi_typedarray_type typed_array_kind<float>() { return napi_float32_array; }
template <>
constexpr napi_typedarray_type typed_array_kind<int32_t>() { return napi_int32_array; }
template <>
constexpr napi_typedarray_type typed_array_kind<uint16_t>() { return napi_uint16_array; }
template <>
constexpr napi_typedarray_type typed_array_kind<uint8_t>() { return napi_uint8_array; }
template <>
constexpr napi_typedarray_type typed_array_kind<int8_t>() { return napi_int8_array; }
template <>
constexpr napi_typedarray_type typed_array_kind<uint32_t>() { return napi_uint32_array; }
template <>
constexpr napi_typedarray_type typed_array_kind<double>() { return napi_float64_array; }

template <typename T>
constexpr const char* typed_array_name();
template <>
constexpr const char* typed_array_name<float>() { return "Float32Array"; }
template <>
constexpr const char* typed_array_name<int32_t>() { return "Int32Array"; }
template <>
constexpr const char* typed_array_name<uint16_t>() { return "Uint16Array"; }
template <>
constexpr const char* typed_array_name<uint8_t>() { return "Uint8Array"; }
template <>
constexpr const char* typed_array_name<int8_t>() { return "Int8Array"; }
template <>
constexpr const char* typed_array_name<uint32_t>() { return "Uint32Array"; }
template <>
constexpr const char* typed_array_name<double>() { return "Float64Array"; }

// v as a typed array of element type T with at least `min_len` elements (exact when exact = true);
// name() makes the argument's name for an error, only when one is thrown.
// NOTE: one napi_get_typedarray_info call (Napi::TypedArrayOf's checks and constructors made three
// per array, and a decode step passes a few thousand arrays).
template <typename T, typename Name>
Span<T> typed_span(Napi::Env env, napi_value v, const Name& name, size_t min_len, bool exact = false) {
  napi_typedarray_type type = napi_int8_array;
  size_t len = 0;
  void* data = nullptr;
  bool is_typed = false;
  if (napi_is_typedarray(env, v, &is_typed) != napi_ok || !is_typed ||
      napi_get_typedarray_info(env, v, &type, &len, &data, nullptr, nullptr) != napi_ok ||
      type != typed_array_kind<T>())
    throw_type(env, std::string(name()) + " must be a " + typed_array_name<T>());
  if (exact ? len != min_len : len < min_len)
    throw_range(env, std::string(name()) + ".length is " + std::to_string(len) + ", expected " +
                         (exact ? "" : "at least ") + std::to_string(min_len));
  return Span<T>{static_cast<T*>(data), len};
}

// Argument i as a typed array of element type T (see typed_span).
template <typename T>
Span<T> get_array(const Napi::CallbackInfo& info, size_t i, const char* name, size_t min_len,
                  bool exact = false) {
  return typed_span<T>(info.Env(), info[i], [name] { return name; }, min_len, exact);
}

template <typename T>
Span<T> get_optional_array(const Napi::CallbackInfo& info, size_t i, const char* name,
                           size_t min_len, bool exact = false) {
  if (i >= info.Length() || is_nullish(info[i])) return Span<T>{};
  return get_array<T>(info, i, name, min_len, exact);
}

// A weight source: Float32Array (f32) or Uint16Array (bf16/f16 as named by dtype).
inline DType parse_dtype(Napi::Env env, const Napi::Value& v, const char* name) {
  if (!v.IsString()) throw_type(env, std::string(name) + " must be 'f32', 'bf16' or 'f16'");
  std::string s = v.As<Napi::String>().Utf8Value();
  if (s == "f32") return DType::F32;
  if (s == "bf16") return DType::BF16;
  if (s == "f16") return DType::F16;
  throw_type(env, std::string(name) + " is '" + s + "', expected 'f32', 'bf16' or 'f16'");
}

// Raw bytes of a typed array whose element type matches dtype, with >= n_elems elements.
inline const void* get_dtype_array(const Napi::CallbackInfo& info, size_t i, const char* name,
                                   DType dtype, size_t n_elems) {
  if (dtype == DType::F32) return get_array<float>(info, i, name, n_elems).data;
  return get_array<uint16_t>(info, i, name, n_elems).data;
}

}  // namespace expertd::addon
