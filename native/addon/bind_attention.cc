// Bindings for the attention family: paged attention over the KV cache and KV cache writes.
// Every shape, sequence and block id is checked here so the kernels can trust them.
#include <algorithm>
#include <cmath>
#include <string>

#include "args.h"
#include "expertd/ops.h"
#include "register.h"

namespace expertd::addon {
namespace {

constexpr int64_t kMaxInt = 2147483647;

// opts[key] as an integer in [min, max]; `def` when absent (required = false).
int64_t opt_int(Napi::Env env, const Napi::Object& opts, const char* key, int64_t min,
                int64_t max, bool required, int64_t def = 0) {
  // NOTE: a dozen of these per attention call. The error texts are built only when thrown. The
  // lookup itself (napi_get_named_property makes a V8 string from the UTF-8 key and finds it in the
  // string table every time) costs about as much as the attention of a 16-token decode; keeping
  // the keys as strings made once (in an array: node-api 8 cannot reference a string) measured no
  // faster, V8 looked them up again as keys.
  Napi::Value v = opts.Get(key);
  auto name = [key] { return std::string("opts.") + key; };
  if (is_nullish(v)) {
    if (required) throw_type(env, name() + " is required");
    return def;
  }
  if (!v.IsNumber()) throw_type(env, name() + " must be a number");
  const double d = v.As<Napi::Number>().DoubleValue();
  if (!std::isfinite(d) || d != std::floor(d))
    throw_type(env, name() + " must be an integer, got " + std::to_string(d));
  if (d < static_cast<double>(min) || d > static_cast<double>(max))
    throw_range(env, name() + " is " + std::to_string(static_cast<int64_t>(d)) + ", expected " +
                         std::to_string(min) + ".." + std::to_string(max));
  return static_cast<int64_t>(d);
}

std::string s(int64_t v) { return std::to_string(v); }

// A KV cache array: its element type is the array's (Float32Array f32, Uint16Array bf16,
// Uint8Array fp8 e4m3).
struct CacheArray {
  void* data = nullptr;
  size_t length = 0;  // elements
  KvDtype dtype = KvDtype::F32;
};

CacheArray get_cache(const Napi::CallbackInfo& info, size_t i, const char* name) {
  Napi::Env env = info.Env();
  Napi::Value v = info[i];
  if (v.IsTypedArray()) {
    auto ta = v.As<Napi::TypedArray>();
    switch (ta.TypedArrayType()) {
      case napi_float32_array: {
        auto a = get_array<float>(info, i, name, 0);
        return {a.data, a.length, KvDtype::F32};
      }
      case napi_uint16_array: {
        auto a = get_array<uint16_t>(info, i, name, 0);
        return {a.data, a.length, KvDtype::BF16};
      }
      case napi_uint8_array: {
        auto a = get_array<uint8_t>(info, i, name, 0);
        return {a.data, a.length, KvDtype::FP8};
      }
      default:
        break;
    }
  }
  throw_type(env, std::string(name) +
                      " must be a Float32Array (f32), Uint16Array (bf16) or Uint8Array (fp8 e4m3)");
}

// Per kv head fp8 scales: finite and positive (a zero scale would divide by zero on write).
const float* get_scales(Napi::Env env, const Napi::Value& v, const std::string& name, int kv_heads) {
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
    throw_type(env, name + " must be a Float32Array [kvHeads] for an fp8 (Uint8Array) cache");
  auto a = v.As<Napi::Float32Array>();
  if (a.ElementLength() < static_cast<size_t>(kv_heads))
    throw_range(env, name + ".length is " + s(static_cast<int64_t>(a.ElementLength())) +
                         ", expected at least kvHeads = " + s(kv_heads));
  for (int h = 0; h < kv_heads; ++h)
    if (!(std::isfinite(a[h]) && a[h] > 0.0f))
      throw_range(env, name + "[" + s(h) + "] is " + std::to_string(a[h]) +
                           ", expected a finite number > 0");
  return a.Data();
}

Napi::Value paged_attention_js(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 7, "pagedAttention");
  if (!info[5].IsObject() || info[5].IsArray()) throw_type(env, "opts must be an object");
  const Napi::Object opts = info[5].As<Napi::Object>();

  AttentionParams p;
  p.num_seqs = static_cast<int>(opt_int(env, opts, "numSeqs", 0, kMaxInt, true));
  p.heads = static_cast<int>(opt_int(env, opts, "heads", 1, 65536, true));
  p.kv_heads = static_cast<int>(opt_int(env, opts, "kvHeads", 1, 65536, true));
  p.dk = static_cast<int>(opt_int(env, opts, "dk", 1, 65536, true));
  p.dv = static_cast<int>(opt_int(env, opts, "dv", 1, 65536, true));
  p.v_stride = static_cast<int>(opt_int(env, opts, "vStride", 1, 1 << 20, false, p.dv));
  p.v_offset = static_cast<int>(opt_int(env, opts, "vOffset", 0, 1 << 20, false, 0));
  p.block_size = static_cast<int>(opt_int(env, opts, "blockSize", 1, 1 << 20, true));
  p.max_blocks = static_cast<int>(opt_int(env, opts, "maxBlocks", 0, kMaxInt, true));
  p.sliding_window = static_cast<int>(opt_int(env, opts, "slidingWindow", 0, kMaxInt, false, 0));
  const int64_t head_floats = int64_t{p.heads} * p.dk;
  p.q_row_stride = static_cast<int>(opt_int(env, opts, "qRowStride", 1, kMaxInt, false, head_floats));
  {
    Napi::Value sv = opts.Get("scale");
    if (!sv.IsNumber()) throw_type(env, "opts.scale must be a number");
    const double sc = sv.As<Napi::Number>().DoubleValue();
    if (!std::isfinite(sc)) throw_range(env, "opts.scale is " + std::to_string(sc) + ", expected a finite number");
    p.scale = static_cast<float>(sc);
  }
  if (p.heads % p.kv_heads != 0)
    throw_range(env, "opts.heads is " + s(p.heads) + ", expected a multiple of opts.kvHeads (" +
                         s(p.kv_heads) + ")");
  if (int64_t{p.v_offset} + p.dv > p.v_stride)
    throw_range(env, "opts.vOffset + opts.dv is " + s(int64_t{p.v_offset} + p.dv) +
                         ", expected at most opts.vStride (" + s(p.v_stride) + ")");
  if (p.q_row_stride < head_floats)
    throw_range(env, "opts.qRowStride is " + s(p.q_row_stride) + ", expected at least heads * dk = " +
                         s(head_floats));

  Span<float> q = get_array<float>(info, 0, "q", 0);
  const CacheArray k_cache = get_cache(info, 1, "kCache");
  const int64_t block_floats_k = int64_t{p.block_size} * p.kv_heads * p.dk;
  const int64_t num_blocks = static_cast<int64_t>(k_cache.length) / block_floats_k;
  const CacheArray v_cache = get_cache(info, 2, "vCache");
  if (v_cache.dtype != k_cache.dtype)
    throw_type(env, std::string("vCache holds ") + kv_dtype_name(v_cache.dtype) + ", expected " +
                        kv_dtype_name(k_cache.dtype) + " like kCache");
  const int64_t v_need = num_blocks * p.block_size * p.kv_heads * p.v_stride;
  if (static_cast<int64_t>(v_cache.length) < v_need)
    throw_range(env, "vCache.length is " + s(static_cast<int64_t>(v_cache.length)) +
                         ", expected at least " + s(v_need));
  p.kv_dtype = k_cache.dtype;
  if (p.kv_dtype == KvDtype::FP8) {
    p.k_scales = get_scales(env, opts.Get("kScales"), "opts.kScales", p.kv_heads);
    p.v_scales = get_scales(env, opts.Get("vScales"), "opts.vScales", p.kv_heads);
  }
  Span<int32_t> seq_info = get_array<int32_t>(info, 3, "seqInfo", size_t(p.num_seqs) * 3);
  Span<int32_t> tables =
      get_array<int32_t>(info, 4, "blockTables", size_t(p.num_seqs) * size_t(p.max_blocks));
  Span<float> out = get_array<float>(info, 6, "out", 0);
  {
    // Optional per-head attention sinks (gpt-oss): a Float32Array of exactly `heads` logits.
    Napi::Value sv = opts.Get("sinks");
    if (!is_nullish(sv)) {
      if (!sv.IsTypedArray() || sv.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
        throw_type(env, "opts.sinks must be a Float32Array");
      auto arr = sv.As<Napi::Float32Array>();
      if (arr.ElementLength() != static_cast<size_t>(p.heads))
        throw_range(env, "opts.sinks.length is " + s(static_cast<int64_t>(arr.ElementLength())) +
                             ", expected heads = " + s(p.heads));
      p.sinks = arr.Data();
    }
  }

  const int64_t ctx_cap = int64_t{p.max_blocks} * p.block_size;
  int64_t rows = 0;  // q/out token rows the call touches
  for (int i = 0; i < p.num_seqs; ++i) {
    const int64_t q_start = seq_info.data[3 * i], q_len = seq_info.data[3 * i + 1],
                  ctx = seq_info.data[3 * i + 2];
    const std::string at = "seqInfo[" + s(i) + "] ";
    if (q_start < 0) throw_range(env, at + "qStart is " + s(q_start) + ", expected at least 0");
    if (q_len < 0) throw_range(env, at + "qLen is " + s(q_len) + ", expected at least 0");
    if (ctx < q_len)
      throw_range(env, at + "ctxLen is " + s(ctx) + ", expected at least qLen (" + s(q_len) + ")");
    if (ctx > ctx_cap)
      throw_range(env, at + "ctxLen is " + s(ctx) + ", expected at most maxBlocks * blockSize = " +
                           s(ctx_cap));
    if (q_len == 0) continue;
    rows = std::max(rows, q_start + q_len);
    // Only the blocks some query can see are read (a sliding window may have freed older ones).
    const int64_t first_pos = ctx - q_len;
    const int64_t lo = p.sliding_window > 0 ? std::max<int64_t>(0, first_pos - p.sliding_window + 1) : 0;
    for (int64_t b = lo / p.block_size; b <= (ctx - 1) / p.block_size; ++b) {
      const int64_t id = tables.data[int64_t{i} * p.max_blocks + b];
      if (id < 0 || id >= num_blocks)
        throw_range(env, "blockTables[" + s(i) + "][" + s(b) + "] is " + s(id) + ", expected 0.." +
                             s(num_blocks - 1) + " (kCache holds " + s(num_blocks) + " blocks)");
    }
  }
  if (rows > 0) {
    const int64_t q_need = (rows - 1) * p.q_row_stride + head_floats;
    if (static_cast<int64_t>(q.length) < q_need)
      throw_range(env, "q.length is " + s(q.length) + ", expected at least " + s(q_need));
    const int64_t out_need = rows * p.heads * p.dv;
    if (static_cast<int64_t>(out.length) < out_need)
      throw_range(env, "out.length is " + s(out.length) + ", expected at least " + s(out_need));
  }
  guard(env, [&] {
    paged_attention(q.data, k_cache.data, v_cache.data, seq_info.data, tables.data, p, out.data);
  });
  return env.Undefined();
}

// kvCacheWrite(k, v, t, slots, kCache, vCache, kvHeads, dk, dv, vStride, kScales?, vScales?)
Napi::Value kv_cache_write_js(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 10, "kvCacheWrite");
  const int64_t t = get_int(info, 2, "t", 0, kMaxInt);
  const int64_t kv_heads = get_int(info, 6, "kvHeads", 1, 65536);
  const int64_t dk = get_int(info, 7, "dk", 1, 65536);
  const int64_t dv = get_int(info, 8, "dv", 0, 65536);
  const int64_t v_stride = get_int(info, 9, "vStride", 0, 1 << 20);
  if (v_stride < dv)
    throw_range(env, "vStride is " + s(v_stride) + ", expected at least dv (" + s(dv) + ")");
  Span<float> k = get_array<float>(info, 0, "k", size_t(t * kv_heads * dk));
  Span<float> v{};
  if (!is_nullish(info[1])) v = get_array<float>(info, 1, "v", size_t(t * kv_heads * dv));
  Span<int32_t> slots = get_array<int32_t>(info, 3, "slots", size_t(t));
  const CacheArray k_cache = get_cache(info, 4, "kCache");
  int64_t num_slots = static_cast<int64_t>(k_cache.length) / (kv_heads * dk);
  const char* limit = "kCache";
  CacheArray v_cache{};
  if (v.data != nullptr) {
    if (is_nullish(info[5])) throw_type(env, "vCache must be given when v is given");
    v_cache = get_cache(info, 5, "vCache");
    if (v_cache.dtype != k_cache.dtype)
      throw_type(env, std::string("vCache holds ") + kv_dtype_name(v_cache.dtype) + ", expected " +
                          kv_dtype_name(k_cache.dtype) + " like kCache");
    if (v_stride == 0) throw_range(env, "vStride is 0, expected at least 1 when v is given");
    const int64_t v_slots = static_cast<int64_t>(v_cache.length) / (kv_heads * v_stride);
    if (v_slots < num_slots) {
      num_slots = v_slots;
      limit = "vCache";
    }
  }
  const float* k_scales = nullptr;
  const float* v_scales = nullptr;
  if (k_cache.dtype == KvDtype::FP8) {
    k_scales = get_scales(env, info.Length() > 10 ? info[10] : env.Undefined(), "kScales", static_cast<int>(kv_heads));
    if (v.data != nullptr)
      v_scales = get_scales(env, info.Length() > 11 ? info[11] : env.Undefined(), "vScales", static_cast<int>(kv_heads));
  }
  for (int64_t i = 0; i < t; ++i)
    if (slots.data[i] >= num_slots)
      throw_range(env, "slots[" + s(i) + "] is " + s(slots.data[i]) + ", expected less than " +
                           s(num_slots) + " (" + limit + " holds " + s(num_slots) + " slots)");
  guard(env, [&] {
    kv_cache_write(k.data, v.data, static_cast<int>(t), slots.data, k_cache.data, v_cache.data,
                   static_cast<int>(kv_heads), static_cast<int>(dk), static_cast<int>(dv),
                   static_cast<int>(v_stride), k_cache.dtype, k_scales, v_scales);
  });
  return env.Undefined();
}

}  // namespace

void register_attention(Napi::Env env, Napi::Object exports) {
  exports.Set("pagedAttention", Napi::Function::New(env, paged_attention_js, "pagedAttention"));
  exports.Set("kvCacheWrite", Napi::Function::New(env, kv_cache_write_js, "kvCacheWrite"));
}

}  // namespace expertd::addon
