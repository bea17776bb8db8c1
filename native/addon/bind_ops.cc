// Bindings for the ops family: routing, permutation and combine, norms, rope, activations,
// embedding, softmax/top-n and dtype conversions. Every index and length is checked here so the
// kernels in native/cpu can trust their inputs.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>
#include <utility>

#include "args.h"
#include "expertd/ops.h"
#include "register.h"

namespace expertd::addon {

namespace {

constexpr int64_t kMaxDim = std::numeric_limits<int32_t>::max();

// Shortest round-trip decimal of a number, as JS would print it for ordinary values.
std::string fmt_num(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "Infinity" : "-Infinity";
  char buf[32];
  for (int p = 1; p <= 17; ++p) {
    std::snprintf(buf, sizeof buf, "%.*g", p, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  return buf;
}

std::string s(int64_t v) { return std::to_string(v); }

// Every ids[i] in [0, n): the message names the first offender.
void check_ids(Napi::Env env, const char* name, const int32_t* ids, size_t len, int64_t n) {
  for (size_t i = 0; i < len; ++i)
    if (ids[i] < 0 || ids[i] >= n)
      throw_range(env, std::string(name) + "[" + std::to_string(i) + "] is " + s(ids[i]) +
                           ", expected 0.." + s(n - 1));
}

double get_finite(const Napi::CallbackInfo& info, size_t i, const char* name) {
  if (!info[i].IsNumber()) throw_type(info.Env(), std::string(name) + " must be a finite number");
  double v = info[i].As<Napi::Number>().DoubleValue();
  if (!std::isfinite(v))
    throw_range(info.Env(), std::string(name) + " is " + fmt_num(v) + ", expected a finite number");
  return v;
}

// ---- route

struct OptsReader {
  Napi::Env env;
  Napi::Object obj;

  Napi::Value get(const char* key) { return obj.Get(key); }

  // The error texts below are built only when thrown (route reads its options on every call).
  int64_t integer(const char* key, int64_t def, int64_t min, int64_t max) {
    Napi::Value v = get(key);
    if (v.IsUndefined()) return def;
    if (!v.IsNumber()) throw_type(env, std::string("opts.") + key + " must be an integer");
    double d = v.As<Napi::Number>().DoubleValue();
    if (!std::isfinite(d) || d != std::floor(d)) throw_type(env, std::string("opts.") + key + " must be an integer");
    if (d < static_cast<double>(min) || d > static_cast<double>(max))
      throw_range(env, std::string("opts.") + key + " is " + fmt_num(d) + ", expected " + s(min) + ".." + s(max));
    return static_cast<int64_t>(d);
  }

  // One of two strings; def when undefined (required when def is null).
  int choice(const char* key, const char* a, const char* b, int def) {
    Napi::Value v = get(key);
    if (v.IsUndefined() && def >= 0) return def;
    auto both = [&] { return std::string("'") + a + "' or '" + b + "'"; };
    if (!v.IsString()) throw_type(env, std::string("opts.") + key + " must be " + both());
    std::string str = v.As<Napi::String>().Utf8Value();
    if (str == a) return 0;
    if (str == b) return 1;
    throw_type(env, std::string("opts.") + key + " is '" + str + "', expected " + both());
  }
};

Napi::Value route(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 8, "route");
  const int64_t t = get_int(info, 1, "t", 0, kMaxDim);
  const int64_t e = get_int(info, 2, "e", 1, kMaxDim);
  const int64_t k = get_int(info, 3, "k", 1, e);
  auto logits = get_array<float>(info, 0, "logits", t * e);
  if (!info[4].IsObject() || info[4].IsArray() || info[4].IsTypedArray())
    throw_type(env, "opts must be an object");
  OptsReader o{env, info[4].As<Napi::Object>()};

  RoutingParams p;
  p.tokens = static_cast<int>(t);
  p.num_experts = static_cast<int>(e);
  p.top_k = static_cast<int>(k);
  p.scoring = o.choice("scoring", "softmax", "sigmoid", -1) == 0 ? Scoring::Softmax : Scoring::Sigmoid;
  Napi::Value bias = o.get("bias");
  if (!is_nullish(bias)) {
    if (!bias.IsTypedArray() || bias.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
      throw_type(env, "opts.bias must be a Float32Array");
    auto arr = bias.As<Napi::Float32Array>();
    if (static_cast<int64_t>(arr.ElementLength()) != e)
      throw_range(env, "opts.bias.length is " + s(arr.ElementLength()) + ", expected " + s(e));
    p.bias = arr.Data();
  }
  p.n_group = static_cast<int>(o.integer("nGroup", 1, 1, e));
  if (e % p.n_group != 0)
    throw_range(env, "e is " + s(e) + ", expected a multiple of opts.nGroup (" + s(p.n_group) + ")");
  p.topk_group = static_cast<int>(o.integer("topkGroup", p.n_group, 1, p.n_group));
  p.group_score = o.choice("groupScore", "max", "top2sum", 0) == 0 ? GroupScore::Max : GroupScore::Top2Sum;
  const int64_t group_size = e / p.n_group;
  if (p.n_group > 1 && p.group_score == GroupScore::Top2Sum && group_size < 2)
    throw_range(env, "opts.groupScore 'top2sum' needs at least 2 experts per group, got " +
                         s(group_size) + " (e " + s(e) + " / opts.nGroup " + s(p.n_group) + ")");
  if (p.n_group > 1 && k > p.topk_group * group_size)
    throw_range(env, "k is " + s(k) + ", expected at most " + s(p.topk_group * group_size) +
                         " (opts.topkGroup " + s(p.topk_group) + " * e " + s(e) + " / opts.nGroup " +
                         s(p.n_group) + ")");
  Napi::Value renorm = o.get("renormalize");
  if (!renorm.IsUndefined()) {
    if (!renorm.IsBoolean()) throw_type(env, "opts.renormalize must be a boolean");
    p.renormalize = renorm.As<Napi::Boolean>().Value();
  }
  Napi::Value scale = o.get("scale");
  if (!scale.IsUndefined()) {
    if (!scale.IsNumber() || !std::isfinite(scale.As<Napi::Number>().DoubleValue()))
      throw_type(env, "opts.scale must be a finite number");
    p.scale = static_cast<float>(scale.As<Napi::Number>().DoubleValue());
  }

  auto ids = get_array<int32_t>(info, 5, "ids", t * k);
  auto weights = get_array<float>(info, 6, "weights", t * k);
  auto counts = get_array<int32_t>(info, 7, "counts", e);
  guard(env, [&] { expertd::route(logits.data, p, ids.data, weights.data, counts.data); });
  return env.Undefined();
}

// ---- permute / combine

Napi::Value permute(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 9, "permute");
  const int64_t t = get_int(info, 1, "t", 0, kMaxDim);
  const int64_t h = get_int(info, 2, "h", 1, kMaxDim);
  const int64_t k = get_int(info, 4, "k", 1, kMaxDim);
  const int64_t e = get_int(info, 5, "e", 1, kMaxDim);
  if (t * k > kMaxDim) throw_range(env, "t * k is " + s(t * k) + ", expected at most " + s(kMaxDim));
  auto x = get_array<float>(info, 0, "x", t * h);
  auto ids = get_array<int32_t>(info, 3, "ids", t * k);
  auto x_perm = get_array<float>(info, 6, "xPerm", t * k * h);
  auto perm_index = get_array<int32_t>(info, 7, "permIndex", t * k);
  auto offsets = get_array<int32_t>(info, 8, "offsets", e + 1);
  check_ids(env, "ids", ids.data, static_cast<size_t>(t * k), e);
  guard(env, [&] {
    permute_rows(x.data, static_cast<int>(t), static_cast<int>(h), ids.data, static_cast<int>(k),
                 static_cast<int>(e), x_perm.data, perm_index.data, offsets.data);
  });
  return env.Undefined();
}

Napi::Value unpermute_combine(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 8, "unpermuteCombine");
  const int64_t t = get_int(info, 3, "t", 0, kMaxDim);
  const int64_t k = get_int(info, 4, "k", 1, kMaxDim);
  const int64_t h = get_int(info, 5, "h", 1, kMaxDim);
  auto y_perm = get_array<float>(info, 0, "yPerm", 0);
  auto perm_index = get_array<int32_t>(info, 1, "permIndex", t * k);
  auto weights = get_array<float>(info, 2, "weights", t * k);
  auto out = get_array<float>(info, 6, "out", t * h);
  const bool accumulate = get_bool(info, 7, "accumulate");
  // yPerm may hold more rows than t * k (a shared arena); every referenced row must exist.
  check_ids(env, "permIndex", perm_index.data, static_cast<size_t>(t * k),
            static_cast<int64_t>(y_perm.length) / h);
  guard(env, [&] {
    expertd::unpermute_combine(y_perm.data, perm_index.data, weights.data, static_cast<int>(t),
                               static_cast<int>(k), static_cast<int>(h), out.data, accumulate);
  });
  return env.Undefined();
}

// ---- elementwise

Napi::Value rms_norm(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 7, "rmsNorm");
  const int64_t rows = get_int(info, 1, "rows", 0, kMaxDim);
  const int64_t dim = get_int(info, 2, "dim", 1, kMaxDim);
  auto x = get_array<float>(info, 0, "x", rows * dim);
  auto w = get_array<float>(info, 3, "w", dim);
  const double eps = get_finite(info, 4, "eps");
  if (eps < 0) throw_range(env, "eps is " + fmt_num(eps) + ", expected >= 0");
  auto out = get_array<float>(info, 5, "out", rows * dim);
  auto residual = get_optional_array<float>(info, 6, "residual", rows * dim);
  guard(env, [&] {
    expertd::rms_norm(x.data, static_cast<int>(rows), static_cast<int>(dim), w.data,
                      static_cast<float>(eps), out.data, residual.data);
  });
  return env.Undefined();
}

Napi::Value rope(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 10, "rope");
  const int64_t t = get_int(info, 1, "t", 0, kMaxDim);
  const int64_t heads = get_int(info, 2, "heads", 1, kMaxDim);
  const int64_t row_stride = get_int(info, 3, "rowStride", 0, kMaxDim);
  const int64_t head_stride = get_int(info, 4, "headStride", 1, kMaxDim);
  const int64_t offset = get_int(info, 5, "offset", 0, kMaxDim);
  auto inv_freq = get_array<float>(info, 7, "invFreq", 1);
  const int64_t rot = 2 * static_cast<int64_t>(inv_freq.length);
  if (offset + rot > head_stride)
    throw_range(env, "offset + rotDim is " + s(offset + rot) + " (rotDim = 2 * invFreq.length), " +
                         "expected at most headStride (" + s(head_stride) + ")");
  if (row_stride < heads * head_stride)
    throw_range(env, "rowStride is " + s(row_stride) + ", expected at least heads * headStride (" +
                         s(heads * head_stride) + ")");
  const int64_t need = t == 0 ? 0 : (t - 1) * row_stride + (heads - 1) * head_stride + offset + rot;
  auto x = get_array<float>(info, 0, "x", need);
  auto positions = get_array<int32_t>(info, 6, "positions", t);
  for (int64_t i = 0; i < t; ++i)
    if (positions.data[i] < 0)
      throw_range(env, "positions[" + s(i) + "] is " + s(positions.data[i]) + ", expected >= 0");
  const double attn_scale = get_finite(info, 8, "attnScale");
  const bool interleaved = get_bool(info, 9, "interleaved");
  guard(env, [&] {
    expertd::rope(x.data, static_cast<int>(t), static_cast<int>(heads), static_cast<int>(row_stride),
                  static_cast<int>(head_stride), static_cast<int>(offset), positions.data,
                  inv_freq.data, static_cast<int>(rot), static_cast<float>(attn_scale), interleaved);
  });
  return env.Undefined();
}

Napi::Value silu_mul(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 4, "siluMul");
  const int64_t t = get_int(info, 1, "t", 0, kMaxDim);
  const int64_t i = get_int(info, 2, "i", 1, kMaxDim);
  auto gu = get_array<float>(info, 0, "gu", t * 2 * i);
  auto out = get_array<float>(info, 3, "out", t * i);
  guard(env, [&] { expertd::silu_mul(gu.data, static_cast<int>(t), static_cast<int>(i), out.data); });
  return env.Undefined();
}

// A typed array of dtype's element kind; returns its data and element count.
std::pair<void*, size_t> get_dtype_span(const Napi::CallbackInfo& info, size_t i, const char* name,
                                        DType dtype, size_t min_len) {
  if (dtype == DType::F32) {
    auto a = get_array<float>(info, i, name, min_len);
    return {a.data, a.length};
  }
  auto a = get_array<uint16_t>(info, i, name, min_len);
  return {a.data, a.length};
}

Napi::Value embedding(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 6, "embedding");
  const DType dtype = parse_dtype(env, info[1], "dtype");
  const int64_t v = get_int(info, 2, "v", 1, kMaxDim);
  const int64_t h = get_int(info, 3, "h", 1, kMaxDim);
  auto table = get_dtype_span(info, 0, "table", dtype, v * h);
  auto ids = get_array<int32_t>(info, 4, "ids", 0);
  const int64_t t = static_cast<int64_t>(ids.length);
  if (t > kMaxDim) throw_range(env, "ids.length is " + s(t) + ", expected at most " + s(kMaxDim));
  auto out = get_array<float>(info, 5, "out", t * h);
  check_ids(env, "ids", ids.data, ids.length, v);
  guard(env, [&] {
    expertd::embedding(table.first, dtype, static_cast<int>(v), static_cast<int>(h), ids.data,
                       static_cast<int>(t), out.data);
  });
  return env.Undefined();
}

Napi::Value softmax(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 5, "softmax");
  const int64_t rows = get_int(info, 1, "rows", 0, kMaxDim);
  const int64_t cols = get_int(info, 2, "cols", 1, kMaxDim);
  auto x = get_array<float>(info, 0, "x", rows * cols);
  auto out = get_array<float>(info, 3, "out", rows * cols);
  const bool log = get_bool(info, 4, "log");
  guard(env, [&] {
    softmax_rows(x.data, static_cast<int>(rows), static_cast<int>(cols), out.data, log);
  });
  return env.Undefined();
}

Napi::Value top_n(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 6, "topN");
  const int64_t rows = get_int(info, 1, "rows", 0, kMaxDim);
  const int64_t cols = get_int(info, 2, "cols", 1, kMaxDim);
  const int64_t n = get_int(info, 3, "n", 1, cols);
  auto x = get_array<float>(info, 0, "x", rows * cols);
  auto ids = get_array<int32_t>(info, 4, "ids", rows * n);
  auto vals = get_array<float>(info, 5, "vals", rows * n);
  guard(env, [&] {
    expertd::top_n(x.data, static_cast<int>(rows), static_cast<int>(cols), static_cast<int>(n),
                   ids.data, vals.data);
  });
  return env.Undefined();
}

Napi::Value convert(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 4, "convert");
  const DType src_dtype = parse_dtype(env, info[1], "srcDtype");
  const DType dst_dtype = parse_dtype(env, info[3], "dstDtype");
  auto src = get_dtype_span(info, 0, "src", src_dtype, 0);
  auto dst = get_dtype_span(info, 2, "dst", dst_dtype, src.second);
  guard(env, [&] { expertd::convert(src.first, src_dtype, dst.first, dst_dtype, src.second); });
  return env.Undefined();
}

Napi::Value dequant_fp8(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 7, "dequantFp8");
  const int64_t rows = get_int(info, 2, "rows", 0, kMaxDim);
  const int64_t cols = get_int(info, 3, "cols", 1, kMaxDim);
  const int64_t br = get_int(info, 4, "blockRows", 1, kMaxDim);
  const int64_t bc = get_int(info, 5, "blockCols", 1, kMaxDim);
  auto src = get_array<uint8_t>(info, 0, "src", rows * cols);
  auto scale = get_array<float>(info, 1, "scaleInv", ((rows + br - 1) / br) * ((cols + bc - 1) / bc));
  auto dst = get_array<uint16_t>(info, 6, "dst", rows * cols);
  guard(env, [&] {
    dequant_fp8_block(src.data, scale.data, static_cast<int>(rows), static_cast<int>(cols),
                      static_cast<int>(br), static_cast<int>(bc), dst.data);
  });
  return env.Undefined();
}

}  // namespace

void register_ops(Napi::Env env, Napi::Object exports) {
  exports.Set("route", Napi::Function::New(env, route, "route"));
  exports.Set("permute", Napi::Function::New(env, permute, "permute"));
  exports.Set("unpermuteCombine", Napi::Function::New(env, unpermute_combine, "unpermuteCombine"));
  exports.Set("rmsNorm", Napi::Function::New(env, rms_norm, "rmsNorm"));
  exports.Set("rope", Napi::Function::New(env, rope, "rope"));
  exports.Set("siluMul", Napi::Function::New(env, silu_mul, "siluMul"));
  exports.Set("embedding", Napi::Function::New(env, embedding, "embedding"));
  exports.Set("softmax", Napi::Function::New(env, softmax, "softmax"));
  exports.Set("topN", Napi::Function::New(env, top_n, "topN"));
  exports.Set("convert", Napi::Function::New(env, convert, "convert"));
  exports.Set("dequantFp8", Napi::Function::New(env, dequant_fp8, "dequantFp8"));
}

}  // namespace expertd::addon
