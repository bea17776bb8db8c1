// Bindings for the gemm family: weight packing (packWeight, packGateUp, repackInto,
// packedWeightAt), denseGemm and groupGemmFfn. Every shape and length is checked here, so the
// kernels can trust what they are given.
#include <string>
#include <vector>

#include "args.h"
#include "expertd/ops.h"
#include "expertd/thread_pool.h"
#include "expertd/weight_memory.h"
#include "handles.h"
#include "register.h"

namespace expertd::addon {

namespace {

constexpr int64_t kMaxDim = int64_t(1) << 24;

std::string str(int64_t v) { return std::to_string(v); }

// packWeight(src, dtype, n, k, format?, group?) -> PackedWeight (quantized when format is given)
Napi::Value pack_weight_js(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 4, "packWeight");
  const DType dtype = parse_dtype(env, info[1], "dtype");
  const int64_t n = get_int(info, 2, "n", 1, kMaxDim);
  const int64_t k = get_int(info, 3, "k", 1, kMaxDim);
  const QuantArg qa = quant_arg(info, 4);
  const void* src = get_dtype_array(info, 0, "src", dtype, static_cast<size_t>(n * k));
  std::shared_ptr<PackedWeight> w;
  guard(env, [&] {
    w = alloc_weight(qa, dtype, WeightKind::Plain, static_cast<int>(n), static_cast<int>(k));
    pack_weight(*w, src, dtype);
  });
  return WeightHandle::create(env, std::move(w));
}

// packGateUp(gate, up, dtype, i, h, format?, group?) -> PackedWeight of kind gate_up, n = 2i
Napi::Value pack_gate_up_js(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 5, "packGateUp");
  const DType dtype = parse_dtype(env, info[2], "dtype");
  const int64_t inter = get_int(info, 3, "i", 1, kMaxDim / 2);
  const int64_t h = get_int(info, 4, "h", 1, kMaxDim);
  const QuantArg qa = quant_arg(info, 5);
  const size_t len = static_cast<size_t>(inter * h);
  const void* gate = get_dtype_array(info, 0, "gate", dtype, len);
  const void* up = get_dtype_array(info, 1, "up", dtype, len);
  std::shared_ptr<PackedWeight> w;
  guard(env, [&] {
    w = alloc_weight(qa, dtype, WeightKind::GateUp, static_cast<int>(2 * inter), static_cast<int>(h));
    pack_gate_up(*w, gate, up, dtype);
  });
  return WeightHandle::create(env, std::move(w));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// packFp8(codes, scaleInv, n, k, br, bc, upCodes?, upScaleInv?) -> fp8 weight kept in fp8.
// With the up pair the result is a gate_up weight of n = 2 * (rows of codes).
Napi::Value pack_fp8_js(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 6, "packFp8");
  const int64_t n = get_int(info, 2, "n", 1, kMaxDim);
  const int64_t k = get_int(info, 3, "k", 1, kMaxDim);
  const int64_t br = get_int(info, 4, "br", 1, kMaxDim);
  const int64_t bc = get_int(info, 5, "bc", 2, kMaxDim);
  if (bc % 2) throw_range(env, "bc is " + str(bc) + ", expected an even block width");
  const size_t len = static_cast<size_t>(n * k);
  const size_t slen = static_cast<size_t>(ceil_div(n, br) * ceil_div(k, bc));
  const uint8_t* codes = get_array<uint8_t>(info, 0, "codes", len).data;
  const float* sc = get_array<float>(info, 1, "scaleInv", slen).data;
  const bool gu = info.Length() > 6 && !is_nullish(info[6]);
  const uint8_t* ucodes = gu ? get_array<uint8_t>(info, 6, "upCodes", len).data : nullptr;
  const float* usc = gu ? get_array<float>(info, 7, "upScaleInv", slen).data : nullptr;
  std::shared_ptr<PackedWeight> w;
  guard(env, [&] {
    w = alloc_quant_weight(QFormat::F8, static_cast<int>(bc),
                           gu ? WeightKind::GateUp : WeightKind::Plain,
                           static_cast<int>(gu ? 2 * n : n), static_cast<int>(k));
    pack_fp8_weight(*w, codes, sc, ucodes, usc, static_cast<int>(br), static_cast<int>(bc));
  });
  return WeightHandle::create(env, std::move(w));
}

// repackFp8Into(dst, codes, scaleInv, br, bc, upCodes?, upScaleInv?): an FP8 checkpoint's codes and
// block scales into an existing fp8 weight of group bc (expert cache slots), in place.
Napi::Value repack_fp8_into_js(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 5, "repackFp8Into");
  // NOTE: the handle's weight is shared (expert tables hold it too); repacking writes in place.
  PackedWeight& dst = const_cast<PackedWeight&>(get_weight(info, 0, "dst"));
  const int64_t br = get_int(info, 3, "br", 1, kMaxDim);
  const int64_t bc = get_int(info, 4, "bc", 2, kMaxDim);
  if (!dst.quantized() || dst.q != QFormat::F8 || dst.group != bc)
    throw_type(env, "dst must be an fp8 weight of group " + str(bc) + " (bc)");
  const bool gu = dst.kind == WeightKind::GateUp;
  const int64_t n = gu ? dst.n / 2 : dst.n, k = dst.k;
  const size_t len = static_cast<size_t>(n * k);
  const size_t slen = static_cast<size_t>(ceil_div(n, br) * ceil_div(k, bc));
  const uint8_t* codes = get_array<uint8_t>(info, 1, "codes", len).data;
  const float* sc = get_array<float>(info, 2, "scaleInv", slen).data;
  if (gu && (info.Length() < 7 || is_nullish(info[5]) || is_nullish(info[6])))
    throw_type(env, "a gate_up dst needs upCodes and upScaleInv");
  const uint8_t* ucodes = gu ? get_array<uint8_t>(info, 5, "upCodes", len).data : nullptr;
  const float* usc = gu ? get_array<float>(info, 6, "upScaleInv", slen).data : nullptr;
  guard(env, [&] { pack_fp8_weight(dst, codes, sc, ucodes, usc, static_cast<int>(br), static_cast<int>(bc)); });
  return env.Undefined();
}

// packMxfp4(blocks, scales, n, k, upBlocks?, upScales?) -> MXFP4 weight kept in MXFP4.
Napi::Value pack_mxfp4_js(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 4, "packMxfp4");
  const int64_t n = get_int(info, 2, "n", 1, kMaxDim);
  const int64_t k = get_int(info, 3, "k", 32, kMaxDim);
  if (k % 32) throw_range(env, "k is " + str(k) + ", expected a multiple of 32 (MXFP4 blocks)");
  const size_t blen = static_cast<size_t>(n * k / 2), slen = static_cast<size_t>(n * k / 32);
  const uint8_t* blocks = get_array<uint8_t>(info, 0, "blocks", blen).data;
  const uint8_t* scales = get_array<uint8_t>(info, 1, "scales", slen).data;
  const bool gu = info.Length() > 4 && !is_nullish(info[4]);
  const uint8_t* ublocks = gu ? get_array<uint8_t>(info, 4, "upBlocks", blen).data : nullptr;
  const uint8_t* uscales = gu ? get_array<uint8_t>(info, 5, "upScales", slen).data : nullptr;
  std::shared_ptr<PackedWeight> w;
  guard(env, [&] {
    w = alloc_quant_weight(QFormat::FP4, 32, gu ? WeightKind::GateUp : WeightKind::Plain,
                           static_cast<int>(gu ? 2 * n : n), static_cast<int>(k));
    pack_mxfp4_weight(*w, blocks, scales, ublocks, uscales);
  });
  return WeightHandle::create(env, std::move(w));
}

// repackMxfp4Into(dst, blocks, scales, upBlocks?, upScales?): new MXFP4 contents for an MXFP4 weight
// (an expert cache slot), same geometry; the arrays are packMxfp4's.
Napi::Value repack_mxfp4_into_js(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 3, "repackMxfp4Into");
  // NOTE: the handle's weight is shared (expert tables hold it too); repacking writes in place.
  PackedWeight& dst = const_cast<PackedWeight&>(get_weight(info, 0, "dst"));
  if (dst.q != QFormat::FP4)
    throw_type(env, std::string("dst is ") +
                        (dst.q == QFormat::None ? std::string("an unquantized") : std::string("a ") + qformat_name(dst.q)) +
                        " weight, expected an mxfp4 one");
  const bool gu = dst.kind == WeightKind::GateUp;
  const bool has_up = info.Length() > 3 && !is_nullish(info[3]);
  if (gu != has_up)
    throw_type(env, gu ? "upBlocks and upScales are required to repack a gate_up weight"
                       : "upBlocks must be null or absent for a plain weight");
  const int64_t rows = gu ? dst.n / 2 : dst.n;
  const size_t blen = static_cast<size_t>(rows * dst.k / 2), slen = static_cast<size_t>(rows * dst.k / 32);
  const uint8_t* blocks = get_array<uint8_t>(info, 1, "blocks", blen).data;
  const uint8_t* scales = get_array<uint8_t>(info, 2, "scales", slen).data;
  const uint8_t* ublocks = gu ? get_array<uint8_t>(info, 3, "upBlocks", blen).data : nullptr;
  const uint8_t* uscales = gu ? get_array<uint8_t>(info, 4, "upScales", slen).data : nullptr;
  guard(env, [&] { pack_mxfp4_weight(dst, blocks, scales, ublocks, uscales); });
  return env.Undefined();
}

// Int codes of an int8 / int4 weight quantized elsewhere (compressed-tensors checkpoints): codes one
// signed value per element, int4 within -8..7 (checked here, before any packing).
const int8_t* int_codes(const Napi::CallbackInfo& info, size_t i, const char* name, size_t len, QFormat q) {
  const int8_t* c = get_array<int8_t>(info, i, name, len, true).data;
  if (q == QFormat::I4)
    for (size_t j = 0; j < len; ++j)
      if (c[j] < -8 || c[j] > 7)
        throw_range(info.Env(), std::string(name) + "[" + str(static_cast<int64_t>(j)) + "] is " + str(c[j]) +
                                    ", outside the int4 range -8..7");
  return c;
}

// Optional zero points at args i (and i + 1, the up half's, for a gate_up weight), each of slen.
struct IntZeros {
  const int8_t* zeros = nullptr;
  const int8_t* up = nullptr;
};
IntZeros int_zeros(const Napi::CallbackInfo& info, size_t i, bool gu, size_t slen) {
  IntZeros z;
  if (info.Length() <= i || is_nullish(info[i])) return z;
  z.zeros = get_array<int8_t>(info, i, "zeros", slen, true).data;
  if (gu) {
    if (info.Length() <= i + 1 || is_nullish(info[i + 1])) throw_type(info.Env(), "a gate_up weight with zeros needs upZeros");
    z.up = get_array<int8_t>(info, i + 1, "upZeros", slen, true).data;
  }
  return z;
}

// packInt(codes, scales, n, k, format, group, upCodes?, upScales?, scaleDtype?, zeros?, upZeros?, perm?) -> int8 / int4 weight
// from codes and scales [n, ceil(k / group)] (int8 group 0: one scale per row, scales [n]). With the
// up pair the result is a gate_up weight of n = 2 * (rows of codes). scaleDtype: how an int4 weight
// holds its scales, 'f32' (default), 'bf16' or 'f16' (the checkpoint's: every scale must be exact in
// it); int8 keeps f32. zeros, upZeros (Int8Array, laid out as the scales): zero points, value =
// (code - zero) * scale (AWQ, asymmetric GPTQ / compressed-tensors); absent: symmetric. perm
// (Int32Array [k]): the codes' columns' input order (act-order GPTQ), shared by gate and up.
Napi::Value pack_int_js(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 6, "packInt");
  const int64_t n = get_int(info, 2, "n", 1, kMaxDim);
  const int64_t k = get_int(info, 3, "k", 1, kMaxDim);
  const QuantArg qa = quant_arg(info, 4);
  if (qa.q != QFormat::I8 && qa.q != QFormat::I4) throw_type(env, "format must be 'int8' or 'int4'");
  if (qa.q == QFormat::I8 && qa.group != 0) throw_range(env, "int8 group is " + str(qa.group) + ", expected 0 (one scale per row)");
  if (qa.q == QFormat::I4 && qa.group != 32 && qa.group != 128)
    throw_range(env, "int4 group is " + str(qa.group) + ", expected 32 or 128");
  const size_t len = static_cast<size_t>(n * k);
  const size_t slen = static_cast<size_t>(n * (qa.group ? ceil_div(k, qa.group) : 1));
  const int8_t* codes = int_codes(info, 0, "codes", len, qa.q);
  const float* sc = get_array<float>(info, 1, "scales", slen, true).data;
  const bool gu = info.Length() > 6 && !is_nullish(info[6]);
  const int8_t* ucodes = gu ? int_codes(info, 6, "upCodes", len, qa.q) : nullptr;
  const float* usc = gu ? get_array<float>(info, 7, "upScales", slen, true).data : nullptr;
  ScaleType st = ScaleType::F32;
  if (info.Length() > 8 && !is_nullish(info[8])) {
    const std::string d = info[8].IsString() ? info[8].As<Napi::String>().Utf8Value() : std::string();
    if (d == "bf16") st = ScaleType::BF16;
    else if (d == "f16") st = ScaleType::F16;
    else if (d != "f32") throw_type(env, "scaleDtype must be 'f32', 'bf16' or 'f16'");
    if (qa.q == QFormat::I8 && st != ScaleType::F32) throw_type(env, "int8 weights keep f32 scales: scaleDtype must be 'f32'");
  }
  const IntZeros z = int_zeros(info, 9, gu, slen);
  const int32_t* perm = get_optional_array<int32_t>(info, 11, "perm", static_cast<size_t>(k), true).data;
  std::shared_ptr<PackedWeight> w;
  guard(env, [&] {
    w = alloc_quant_weight(qa.q, qa.group, gu ? WeightKind::GateUp : WeightKind::Plain,
                           static_cast<int>(gu ? 2 * n : n), static_cast<int>(k), st);
    pack_int_weight(*w, codes, sc, ucodes, usc, true, z.zeros, z.up, perm);
  });
  return WeightHandle::create(env, std::move(w));
}

// repackIntInto(dst, codes, scales, upCodes?, upScales?, zeros?, upZeros?, perm?): packInt's arrays into
// an existing int8 / int4 weight of the same geometry and group (expert cache slots), in place; a
// weight with zero points (an input order) takes only arrays with them (it).
Napi::Value repack_int_into_js(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 3, "repackIntInto");
  // NOTE: the handle's weight is shared (expert tables hold it too); repacking writes in place.
  PackedWeight& dst = const_cast<PackedWeight&>(get_weight(info, 0, "dst"));
  if (dst.q != QFormat::I8 && dst.q != QFormat::I4)
    throw_type(env, std::string("dst is ") +
                        (dst.q == QFormat::None ? std::string("an unquantized") : std::string("a ") + qformat_name(dst.q)) +
                        " weight, expected an int8 or int4 one");
  const bool gu = dst.kind == WeightKind::GateUp;
  const bool has_up = info.Length() > 3 && !is_nullish(info[3]);
  if (gu != has_up)
    throw_type(env, gu ? "upCodes and upScales are required to repack a gate_up weight"
                       : "upCodes must be null or absent for a plain weight");
  const int64_t rows = gu ? dst.n / 2 : dst.n;
  const size_t len = static_cast<size_t>(rows * dst.k);
  const size_t slen = static_cast<size_t>(rows * ceil_div(dst.k, dst.group));
  const int8_t* codes = int_codes(info, 1, "codes", len, dst.q);
  const float* sc = get_array<float>(info, 2, "scales", slen, true).data;
  const int8_t* ucodes = gu ? int_codes(info, 3, "upCodes", len, dst.q) : nullptr;
  const float* usc = gu ? get_array<float>(info, 4, "upScales", slen, true).data : nullptr;
  const IntZeros z = int_zeros(info, 5, gu, slen);
  if ((z.zeros != nullptr) != (dst.zeros != nullptr))
    throw_type(env, dst.zeros ? "dst holds zero points: zeros are required" : "dst has no zero points: zeros must be null or absent");
  const int32_t* perm = get_optional_array<int32_t>(info, 7, "perm", static_cast<size_t>(dst.k), true).data;
  if ((perm != nullptr) != (dst.perm != nullptr))
    throw_type(env, dst.perm ? "dst holds an input order: perm is required" : "dst has no input order: perm must be null or absent");
  guard(env, [&] { pack_int_weight(dst, codes, sc, ucodes, usc, true, z.zeros, z.up, perm); });
  return env.Undefined();
}

// repackInto(dst, src, dtype, up?): new contents, same geometry; dtype is the source's (it is
// converted to dst's storage dtype when they differ).
Napi::Value repack_into_js(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 3, "repackInto");
  // NOTE: the handle's weight is shared (expert tables hold it too); repacking writes in place.
  PackedWeight& dst = const_cast<PackedWeight&>(get_weight(info, 0, "dst"));
  const DType dtype = parse_dtype(env, info[2], "dtype");
  const bool has_up = info.Length() > 3 && !is_nullish(info[3]);
  if (dst.kind == WeightKind::GateUp) {
    if (!has_up) throw_type(env, "up is required to repack a gate_up weight");
    const size_t len = static_cast<size_t>(dst.n / 2) * dst.k;
    const void* gate = get_dtype_array(info, 1, "src", dtype, len);
    const void* up = get_dtype_array(info, 3, "up", dtype, len);
    guard(env, [&] { pack_gate_up(dst, gate, up, dtype); });
  } else {
    if (has_up) throw_type(env, "up must be null or absent for a plain weight");
    const void* src =
        get_dtype_array(info, 1, "src", dtype, static_cast<size_t>(dst.n) * dst.k);
    guard(env, [&] { pack_weight(dst, src, dtype); });
  }
  return env.Undefined();
}

// packedWeightAt(w, row, col) -> number
Napi::Value packed_weight_at_js(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 3, "packedWeightAt");
  const PackedWeight& w = get_weight(info, 0, "w");
  const int64_t row = get_int(info, 1, "row", 0, w.n - 1);
  const int64_t col = get_int(info, 2, "col", 0, w.k - 1);
  float v = 0;
  guard(env, [&] { v = packed_weight_at(w, static_cast<int>(row), static_cast<int>(col)); });
  return Napi::Number::New(env, v);
}

// Tags the External that carries a prefetch list (a Hint) through JS.
constexpr napi_type_tag kPrefetchListTag = {0x6578706572746400ULL, 0x7072656665746368ULL};

// A weight's memory as prefetch regions: its codes (or elements), then its scales and zero points.
void add_regions(std::vector<ThreadPool::Region>& out, const PackedWeight& w) {
  const size_t scale_bytes = w.scale_bytes(), zero_bytes = w.zero_bytes();
  out.push_back({w.data.get(), w.size_bytes - scale_bytes - zero_bytes, w.data});
  if (scale_bytes) out.push_back({w.scales.get(), scale_bytes, w.scales});
  if (zero_bytes) out.push_back({w.zeros.get(), zero_bytes, w.zeros});
}

// prefetchList(...weights): the packed weights some GEMMs read, in that order (codes, then scales),
// as an opaque list for prefetch(). It holds them weakly: disposing one frees it as usual.
Napi::Value prefetch_list_js(const Napi::CallbackInfo& info) {
  auto regions = std::make_shared<std::vector<ThreadPool::Region>>();
  regions->reserve(2 * info.Length());
  for (size_t i = 0; i < info.Length(); ++i) add_regions(*regions, get_weight(info, i, "weights[i]"));
  auto* hint = new ThreadPool::Hint(std::move(regions));
  auto ext = Napi::External<ThreadPool::Hint>::New(info.Env(), hint, [](Napi::Env, ThreadPool::Hint* h) { delete h; });
  ext.TypeTag(&kPrefetchListTag);
  return ext;
}

// Argument i as a prefetchList() result (null when nullish).
ThreadPool::Hint get_prefetch_list(const Napi::CallbackInfo& info, size_t i, const char* name) {
  if (is_nullish(info[i])) return nullptr;
  if (!info[i].IsExternal() || !info[i].As<Napi::External<ThreadPool::Hint>>().CheckTypeTag(&kPrefetchListTag))
    throw_type(info.Env(), std::string(name) + " must be a prefetchList() result or null");
  return *info[i].As<Napi::External<ThreadPool::Hint>>().Data();
}

// prefetch(list | null): hands the pool's idle workers this list to read ahead (ThreadPool::prefetch);
// null clears the hint.
Napi::Value prefetch_js(const Napi::CallbackInfo& info) {
  expect_args(info, 1, "prefetch");
  ThreadPool::instance().prefetch(get_prefetch_list(info, 0, "list"));
  return info.Env().Undefined();
}

// prefetchedBytes(): bytes the pool's workers have read for prefetch() hints since it started.
Napi::Value prefetched_bytes_js(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<double>(ThreadPool::instance().prefetched_bytes()));
}

// weightMemory(): what the packed weights' allocator holds (weight_memory.h).
Napi::Value weight_memory_js(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const WeightMemoryStats st = weight_memory_stats();
  Napi::Object o = Napi::Object::New(env);
  o.Set("chunks", Napi::Number::New(env, static_cast<double>(st.chunks)));
  o.Set("dedicated", Napi::Number::New(env, static_cast<double>(st.dedicated)));
  o.Set("mappedBytes", Napi::Number::New(env, static_cast<double>(st.mapped_bytes)));
  o.Set("liveBytes", Napi::Number::New(env, static_cast<double>(st.live_bytes)));
  o.Set("liveAllocations", Napi::Number::New(env, static_cast<double>(st.live_allocations)));
  o.Set("hugePages", Napi::Boolean::New(env, st.huge_pages));
  return o;
}

// denseGemm(x, m, w, y, bias, accumulate, fast)
Napi::Value dense_gemm_js(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 7, "denseGemm");
  const int64_t m = get_int(info, 1, "m", 0, int64_t(1) << 30);
  const PackedWeight& w = get_weight(info, 2, "w");
  const float* x = get_array<float>(info, 0, "x", static_cast<size_t>(m) * w.k).data;
  float* y = get_array<float>(info, 3, "y", static_cast<size_t>(m) * w.n).data;
  const float* bias = get_optional_array<float>(info, 4, "bias", static_cast<size_t>(w.n)).data;
  const bool accumulate = get_bool(info, 5, "accumulate");
  const bool fast = get_bool(info, 6, "fast");
  guard(env, [&] { dense_gemm(x, static_cast<int>(m), w, y, bias, accumulate, fast); });
  return env.Undefined();
}

// groupGemmFfn(x, offsets, experts, y, fast)
Napi::Value group_gemm_ffn_js(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 5, "groupGemmFfn");
  ExpertTableHandle& table = get_expert_table(info, 2, "experts");
  const int num_experts = table.num_experts();
  const int h = table.hidden();
  const int32_t* offsets =
      get_array<int32_t>(info, 1, "offsets", static_cast<size_t>(num_experts) + 1, true).data;
  Span<float> x = get_array<float>(info, 0, "x", 0);
  Span<float> y = get_array<float>(info, 3, "y", 0);
  const bool fast = get_bool(info, 4, "fast");
  if (offsets[0] != 0) throw_range(env, "offsets[0] is " + str(offsets[0]) + ", expected 0");
  for (int e = 0; e < num_experts; ++e)
    if (offsets[e + 1] < offsets[e])
      throw_range(env, "offsets[" + str(e + 1) + "] is " + str(offsets[e + 1]) +
                           ", expected at least offsets[" + str(e) + "] = " + str(offsets[e]) +
                           " (offsets must be non-decreasing)");
  const int64_t rows = offsets[num_experts];
  const size_t need = static_cast<size_t>(rows) * h;
  if (x.length < need || y.length < need) {
    const bool is_x = x.length < need;
    throw_range(env, std::string(is_x ? "x" : "y") + ".length is " +
                         str(is_x ? x.length : y.length) + ", expected at least " + str(need) +
                         " (offsets[" + str(num_experts) + "] = " + str(rows) +
                         " rows of hidden " + str(h) + ")");
  }

  // Raw pointer views of the table for the kernel (grow-only, no allocation once warm).
  thread_local std::vector<const PackedWeight*> gate_up, down;
  gate_up.assign(num_experts, nullptr);
  down.assign(num_experts, nullptr);
  for (int e = 0; e < num_experts; ++e) {
    const int n_rows = offsets[e + 1] - offsets[e];
    if (n_rows == 0) continue;
    if (!table.gate_up()[e] || !table.down()[e])
      throw_range(env, "expert " + str(e) + " has " + str(n_rows) + " rows but no weights");
    gate_up[e] = table.gate_up()[e].get();
    down[e] = table.down()[e].get();
  }
  guard(env, [&] {
    group_gemm_ffn(x.data, offsets, num_experts, gate_up.data(), down.data(), h, table.inter(),
                   y.data, fast);
  });
  return env.Undefined();
}

}  // namespace

void register_gemm(Napi::Env env, Napi::Object exports) {
  exports.Set("packWeight", Napi::Function::New(env, pack_weight_js, "packWeight"));
  exports.Set("packGateUp", Napi::Function::New(env, pack_gate_up_js, "packGateUp"));
  exports.Set("packFp8", Napi::Function::New(env, pack_fp8_js, "packFp8"));
  exports.Set("packMxfp4", Napi::Function::New(env, pack_mxfp4_js, "packMxfp4"));
  exports.Set("repackMxfp4Into", Napi::Function::New(env, repack_mxfp4_into_js, "repackMxfp4Into"));
  exports.Set("repackInto", Napi::Function::New(env, repack_into_js, "repackInto"));
  exports.Set("packInt", Napi::Function::New(env, pack_int_js, "packInt"));
  exports.Set("repackIntInto", Napi::Function::New(env, repack_int_into_js, "repackIntInto"));
  exports.Set("repackFp8Into", Napi::Function::New(env, repack_fp8_into_js, "repackFp8Into"));
  exports.Set("packedWeightAt", Napi::Function::New(env, packed_weight_at_js, "packedWeightAt"));
  exports.Set("denseGemm", Napi::Function::New(env, dense_gemm_js, "denseGemm"));
  exports.Set("prefetchList", Napi::Function::New(env, prefetch_list_js, "prefetchList"));
  exports.Set("prefetch", Napi::Function::New(env, prefetch_js, "prefetch"));
  exports.Set("prefetchedBytes", Napi::Function::New(env, prefetched_bytes_js, "prefetchedBytes"));
  exports.Set("weightMemory", Napi::Function::New(env, weight_memory_js, "weightMemory"));
  exports.Set("groupGemmFfn", Napi::Function::New(env, group_gemm_ffn_js, "groupGemmFfn"));
}

}  // namespace expertd::addon
