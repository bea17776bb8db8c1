// Binding of the batched sampler (sampleBatch): reads the per-row knobs, penalty lists and grammar
// bitmasks of one engine step, checks every value and id so the kernel can trust them, and runs
// the rows on the thread pool (the caller is the engine worker, never the main thread).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "args.h"
#include "expertd/sampling.h"
#include "register.h"
#include "sampling_args.h"

namespace expertd::addon {

namespace {

// Column order of batch.params: one row of kParamCols f64 per sequence.
constexpr int kParamCols = kSampleParamCols;
const char* const kParamNames[kParamCols] = {"temperature", "topP", "topK", "minP",
                                              "repetitionPenalty", "presencePenalty",
                                              "frequencyPenalty", "numTopLogprobs"};

std::string num(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "Infinity" : "-Infinity";
  char buf[32];
  for (int p = 1; p <= 17; ++p) {
    std::snprintf(buf, sizeof buf, "%.*g", p, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  return buf;
}

template <typename T>
Span<T> field(Napi::Env env, Napi::Object obj, const char* key, size_t min_len, bool exact,
              bool optional = false) {
  Napi::Value v = obj.Get(key);
  if (optional && is_nullish(v)) return Span<T>{};
  return typed_span<T>(env, v, [key] { return std::string("batch.") + key; }, min_len, exact);
}

template <typename T>
Span<T> out_field(Napi::Env env, Napi::Object obj, const char* key, size_t min_len) {
  return typed_span<T>(env, obj.Get(key), [key] { return std::string("out.") + key; }, min_len);
}

// A CSR list: offsets [rows + 1] non-decreasing from 0, ids in [0, V).
struct List {
  const int32_t* offsets;
  const int32_t* ids;
};

List read_list(Napi::Env env, Napi::Object batch, const char* offsets_key, const char* ids_key,
               size_t rows, int64_t vocab, size_t* total) {
  auto off = field<int32_t>(env, batch, offsets_key, rows + 1, true);
  if (off.data[0] != 0)
    throw_range(env, std::string("batch.") + offsets_key + "[0] is " + std::to_string(off.data[0]) +
                         ", expected 0");
  for (size_t r = 0; r < rows; ++r)
    if (off.data[r + 1] < off.data[r])
      throw_range(env, std::string("batch.") + offsets_key + "[" + std::to_string(r + 1) + "] is " +
                           std::to_string(off.data[r + 1]) + ", expected >= " +
                           std::to_string(off.data[r]));
  *total = static_cast<size_t>(off.data[rows]);
  auto ids = field<int32_t>(env, batch, ids_key, *total, false);
  for (size_t i = 0; i < *total; ++i)
    if (ids.data[i] < 0 || ids.data[i] >= vocab)
      throw_range(env, std::string("batch.") + ids_key + "[" + std::to_string(i) + "] is " +
                           std::to_string(ids.data[i]) + ", expected 0.." + std::to_string(vocab - 1));
  return {off.data, ids.data};
}

void check_param(Napi::Env env, size_t r, int c, double v) {
  bool ok;
  std::string expected;
  switch (c) {
    case 0: ok = std::isfinite(v) && v >= 0; expected = ">= 0"; break;
    case 1: ok = v > 0 && v <= 1; expected = "in (0, 1]"; break;
    case 2: ok = v == std::floor(v) && v >= -1 && v <= 2147483647.0; expected = "-1, 0 (off) or a positive integer"; break;
    case 3: ok = v >= 0 && v <= 1; expected = "in [0, 1]"; break;
    case 4: ok = std::isfinite(v) && v > 0; expected = "> 0"; break;
    case 7: ok = v == std::floor(v) && v >= -1 && v <= kSampleMaxTopLogprobs;
            expected = "an integer -1.." + std::to_string(kSampleMaxTopLogprobs); break;
    default: ok = std::isfinite(v); expected = "a finite number"; break;
  }
  if (!ok)
    throw_range(env, "batch.params[" + std::to_string(r * kParamCols + c) + "] (" + kParamNames[c] +
                         " of row " + std::to_string(r) + ") is " + num(v) + ", expected " + expected);
}

}  // namespace

ParsedSampleBatch parse_sample_batch(Napi::Env env, int64_t rows, int64_t vocab, Napi::Object batch,
                                     Napi::Object outo) {
  const size_t R = static_cast<size_t>(rows);
  ParsedSampleBatch b;

  auto params = field<double>(env, batch, "params", R * kParamCols, false);
  auto rng = field<uint32_t>(env, batch, "rngState", R * 4, false);
  size_t n_bias = 0, n_seen = 0, n_counts = 0;
  List bias = read_list(env, batch, "biasOffsets", "biasIds", R, vocab, &n_bias);
  auto bias_values = field<float>(env, batch, "biasValues", n_bias, false);
  List seen = read_list(env, batch, "seenOffsets", "seenIds", R, vocab, &n_seen);
  List counts = read_list(env, batch, "countOffsets", "countIds", R, vocab, &n_counts);
  auto count_values = field<int32_t>(env, batch, "countValues", n_counts, false);
  const size_t words = static_cast<size_t>((vocab + 31) / 32);
  auto mask_rows = field<int32_t>(env, batch, "bitmaskRows", R, false, true);
  Span<int32_t> mask{};
  size_t n_masks = 0;
  if (mask_rows.data) {
    Napi::Value mv = batch.Get("bitmask");
    if (!mv.IsTypedArray() || mv.As<Napi::TypedArray>().TypedArrayType() != napi_int32_array)
      throw_type(env, "batch.bitmask must be an Int32Array when batch.bitmaskRows is given");
    mask = field<int32_t>(env, batch, "bitmask", 0, false);
    if (mask.length % words != 0)
      throw_range(env, "batch.bitmask.length is " + std::to_string(mask.length) +
                           ", expected a multiple of ceil(vocabSize / 32) = " + std::to_string(words));
    n_masks = mask.length / words;
    for (size_t r = 0; r < R; ++r)
      if (mask_rows.data[r] < -1 || mask_rows.data[r] >= static_cast<int64_t>(n_masks))
        throw_range(env, "batch.bitmaskRows[" + std::to_string(r) + "] is " +
                             std::to_string(mask_rows.data[r]) + ", expected -1.." +
                             std::to_string(static_cast<int64_t>(n_masks) - 1));
  }

  auto token_ids = out_field<int32_t>(env, outo, "tokenIds", R);
  auto logprobs = out_field<double>(env, outo, "logprobs", R);
  auto top_ids = out_field<int32_t>(env, outo, "topIds", R * kSampleMaxTopLogprobs);
  auto top_lp = out_field<double>(env, outo, "topLogprobs", R * kSampleMaxTopLogprobs);
  auto top_counts = out_field<int32_t>(env, outo, "topCounts", R);

  std::vector<SampleSeq> seqs(R);
  for (size_t r = 0; r < R; ++r) {
    const double* pr = params.data + r * kParamCols;
    for (int c = 0; c < kParamCols; ++c) check_param(env, r, c, pr[c]);
    uint32_t* st = rng.data + r * 4;
    if ((st[0] | st[1] | st[2] | st[3]) == 0)
      throw_range(env, "batch.rngState of row " + std::to_string(r) +
                           " is all zero, which xoshiro128** cannot leave");
    SampleSeq& q = seqs[r];
    q.p.temperature = pr[0];
    q.p.top_p = pr[1];
    q.p.top_k = static_cast<int32_t>(pr[2]);
    q.p.min_p = pr[3];
    q.p.repetition_penalty = pr[4];
    q.p.presence_penalty = pr[5];
    q.p.frequency_penalty = pr[6];
    q.p.num_top_logprobs = static_cast<int32_t>(pr[7]);
    q.rng = st;
    q.bias_ids = bias.ids + bias.offsets[r];
    q.bias_values = bias_values.data + bias.offsets[r];
    q.n_bias = bias.offsets[r + 1] - bias.offsets[r];
    q.seen_ids = seen.ids + seen.offsets[r];
    q.n_seen = seen.offsets[r + 1] - seen.offsets[r];
    q.count_ids = counts.ids + counts.offsets[r];
    q.count_values = count_values.data + counts.offsets[r];
    q.n_counts = counts.offsets[r + 1] - counts.offsets[r];
    if (mask_rows.data && mask_rows.data[r] >= 0)
      q.bitmask = mask.data + static_cast<size_t>(mask_rows.data[r]) * words;
  }
  b.out.token_ids = token_ids.data;
  b.out.logprobs = logprobs.data;
  b.out.top_ids = top_ids.data;
  b.out.top_logprobs = top_lp.data;
  b.out.top_counts = top_counts.data;
  b.rows = R;
  b.vocab = static_cast<size_t>(vocab);
  b.words = words;
  b.params = params.data;
  b.rng = rng.data;
  b.bias_offsets = bias.offsets;
  b.bias_ids = bias.ids;
  b.bias_values = bias_values.data;
  b.seen_offsets = seen.offsets;
  b.seen_ids = seen.ids;
  b.count_offsets = counts.offsets;
  b.count_ids = counts.ids;
  b.count_values = count_values.data;
  b.mask_rows = mask_rows.data;
  b.masks = mask.data;
  b.n_bias = n_bias;
  b.n_seen = n_seen;
  b.n_counts = n_counts;
  b.n_masks = n_masks;
  b.seqs = std::move(seqs);
  return b;
}

namespace {


// sampleBatch(logits, rows, vocabSize, batch, out)
Napi::Value sample_batch(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 5, "sampleBatch");
  const int64_t rows = get_int(info, 1, "rows", 0, 1 << 20);
  const int64_t vocab = get_int(info, 2, "vocabSize", 1, 1 << 30);
  auto logits = get_array<float>(info, 0, "logits", static_cast<size_t>(rows * vocab));
  if (!info[3].IsObject()) throw_type(env, "batch must be an object");
  if (!info[4].IsObject()) throw_type(env, "out must be an object");
  ParsedSampleBatch b = parse_sample_batch(env, rows, vocab, info[3].As<Napi::Object>(), info[4].As<Napi::Object>());
  guard(env, [&] {
    expertd::sample_batch(logits.data, static_cast<int>(rows), static_cast<int>(vocab), b.seqs.data(), b.out);
  });
  return env.Undefined();
}

}  // namespace

void register_sampling(Napi::Env env, Napi::Object exports) {
  exports.Set("sampleBatch", Napi::Function::New(env, sample_batch, "sampleBatch"));
}

}  // namespace expertd::addon
