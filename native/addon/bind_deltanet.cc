// Bindings for the Gated DeltaNet ops (causal conv with state, gated delta rule, gated RMSNorm),
// one sequence or a batch of sequences with per-sequence state slots. Every length, slot and
// sequence boundary is checked here so native/cpu/deltanet.cc can trust its inputs.
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "args.h"
#include "deltanet_args.h"
#include "expertd/ops.h"
#include "register.h"

namespace expertd::addon {

namespace {

constexpr int64_t kMaxDim = std::numeric_limits<int32_t>::max();
constexpr int64_t kMaxConvKernel = 64;  // NOTE: deltanet.cc keeps K-1 taps in a stack array

std::string s(int64_t v) { return std::to_string(v); }

// seqStarts [B+1]: 0, nondecreasing, ending at t. slots [B]: distinct, in [0, poolSlots).
void check_batch(Napi::Env env, const Span<int32_t>& slots, const Span<int32_t>& starts,
                 int64_t num_seqs, int64_t t, int64_t pool_slots) {
  if (starts.data[0] != 0) throw_range(env, "seqStarts[0] is " + s(starts.data[0]) + ", expected 0");
  for (int64_t b = 0; b < num_seqs; ++b)
    if (starts.data[b + 1] < starts.data[b])
      throw_range(env, "seqStarts[" + s(b + 1) + "] is " + s(starts.data[b + 1]) +
                           ", expected at least seqStarts[" + s(b) + "] (" + s(starts.data[b]) + ")");
  if (starts.data[num_seqs] != t)
    throw_range(env, "seqStarts[" + s(num_seqs) + "] is " + s(starts.data[num_seqs]) +
                         ", expected t (" + s(t) + ")");
  std::vector<int32_t> owner(static_cast<size_t>(pool_slots), -1);
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int32_t sl = slots.data[b];
    if (sl < 0 || sl >= pool_slots)
      throw_range(env, "slots[" + s(b) + "] is " + s(sl) + ", expected 0.." + s(pool_slots - 1) +
                           " (the state pool holds " + s(pool_slots) + " states)");
    if (owner[sl] >= 0)
      throw_range(env, "slots[" + s(b) + "] is " + s(sl) + ", the same as slots[" + s(owner[sl]) +
                           "]; each sequence needs its own state slot");
    owner[sl] = static_cast<int32_t>(b);
  }
}

// ---- causal conv

struct ConvArgs {
  int64_t t, c, k;
  Span<float> x, weight, bias, out;
};

ConvArgs conv_args(const Napi::CallbackInfo& info, size_t out_index) {
  ConvArgs a;
  a.t = get_int(info, 1, "t", 0, kMaxDim);
  a.c = get_int(info, 2, "c", 1, kMaxDim);
  a.k = get_int(info, 5, "k", 1, kMaxConvKernel);
  if (a.t * a.c > kMaxDim)
    throw_range(info.Env(), "t * c is " + s(a.t * a.c) + ", expected at most " + s(kMaxDim));
  a.x = get_array<float>(info, 0, "x", a.t * a.c);
  a.weight = get_array<float>(info, 3, "weight", a.c * a.k, true);
  a.bias = get_optional_array<float>(info, 4, "bias", a.c, true);
  a.out = get_array<float>(info, out_index, "out", a.t * a.c);
  return a;
}

Napi::Value causal_conv1d(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 9, "causalConv1d");
  ConvArgs a = conv_args(info, 8);
  auto state = get_array<float>(info, 6, "convState", a.c * (a.k - 1), true);
  const bool silu = get_bool(info, 7, "silu");
  guard(env, [&] {
    expertd::causal_conv1d(a.x.data, static_cast<int>(a.t), static_cast<int>(a.c), a.weight.data,
                           a.bias.data, static_cast<int>(a.k), state.data, silu, a.out.data);
  });
  return env.Undefined();
}

Napi::Value causal_conv1d_batch(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 11, "causalConv1dBatch");
  ConvArgs a = conv_args(info, 10);
  auto pool = get_array<float>(info, 6, "statePool", 0);
  auto slots = get_array<int32_t>(info, 7, "slots", 0);
  const int64_t b = static_cast<int64_t>(slots.length);
  auto starts = get_array<int32_t>(info, 8, "seqStarts", b + 1, true);
  const bool silu = get_bool(info, 9, "silu");
  const int64_t per = a.c * (a.k - 1);
  if (per > 0 && pool.length % per != 0)
    throw_range(env, "statePool.length is " + s(pool.length) + ", expected a multiple of c * (k - 1) (" +
                         s(per) + ")");
  const int64_t pool_slots = per > 0 ? static_cast<int64_t>(pool.length) / per : b;
  check_batch(env, slots, starts, b, a.t, pool_slots);
  guard(env, [&] {
    expertd::causal_conv1d_batch(a.x.data, static_cast<int>(a.t), static_cast<int>(a.c),
                                 a.weight.data, a.bias.data, static_cast<int>(a.k), pool.data,
                                 slots.data, starts.data, static_cast<int>(b), silu, a.out.data);
  });
  return env.Undefined();
}

// ---- gated delta rule

struct DeltaArrays {
  Span<float> q, k, v, g, beta, out;
};

DeltaArrays delta_arrays(const Napi::CallbackInfo& info, const DeltaRuleParams& p, size_t out_index) {
  const int64_t t = p.tokens;
  const int64_t qk_row = static_cast<int64_t>(p.hk) * p.dk;
  const int64_t v_row = static_cast<int64_t>(p.hv) * p.dv;
  if (t * v_row > kMaxDim * 4)
    throw_range(info.Env(), "T * Hv * Dv is " + s(t * v_row) + ", expected at most " + s(kMaxDim * 4));
  DeltaArrays a;
  a.q = get_array<float>(info, 0, "q", strided_len(t, p.q_stride, qk_row));
  a.k = get_array<float>(info, 1, "k", strided_len(t, p.k_stride, qk_row));
  a.v = get_array<float>(info, 2, "v", strided_len(t, p.v_stride, v_row));
  a.g = get_array<float>(info, 3, "g", t * p.hv);
  a.beta = get_array<float>(info, 4, "beta", t * p.hv);
  a.out = get_array<float>(info, out_index, "out", t * v_row);
  return a;
}

Napi::Value gated_delta_rule(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 8, "gatedDeltaRule");
  const DeltaRuleParams p = delta_params(env, info[7]);
  DeltaArrays a = delta_arrays(info, p, 6);
  auto state = get_array<float>(info, 5, "state",
                                static_cast<int64_t>(p.hv) * p.dk * p.dv, true);
  guard(env, [&] {
    expertd::gated_delta_rule(a.q.data, a.k.data, a.v.data, a.g.data, a.beta.data, state.data,
                              a.out.data, p);
  });
  return env.Undefined();
}

Napi::Value gated_delta_rule_batch(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 10, "gatedDeltaRuleBatch");
  const DeltaRuleParams p = delta_params(env, info[9]);
  DeltaArrays a = delta_arrays(info, p, 8);
  auto pool = get_array<float>(info, 5, "statePool", 0);
  auto slots = get_array<int32_t>(info, 6, "slots", 0);
  const int64_t b = static_cast<int64_t>(slots.length);
  auto starts = get_array<int32_t>(info, 7, "seqStarts", b + 1, true);
  const int64_t per = static_cast<int64_t>(p.hv) * p.dk * p.dv;
  if (pool.length % per != 0)
    throw_range(env, "statePool.length is " + s(pool.length) + ", expected a multiple of Hv * Dk * Dv (" +
                         s(per) + ")");
  check_batch(env, slots, starts, b, p.tokens, static_cast<int64_t>(pool.length) / per);
  guard(env, [&] {
    expertd::gated_delta_rule_batch(a.q.data, a.k.data, a.v.data, a.g.data, a.beta.data, pool.data,
                                    slots.data, starts.data, static_cast<int>(b), a.out.data, p);
  });
  return env.Undefined();
}

// ---- gated RMSNorm

Napi::Value gated_rms_norm(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 7, "gatedRmsNorm");
  const int64_t rows = get_int(info, 4, "rows", 0, kMaxDim);
  const int64_t d = get_int(info, 5, "d", 1, kMaxDim);
  if (rows * d > kMaxDim * 4)
    throw_range(env, "rows * d is " + s(rows * d) + ", expected at most " + s(kMaxDim * 4));
  auto x = get_array<float>(info, 0, "x", rows * d);
  auto z = get_array<float>(info, 1, "z", rows * d);
  auto w = get_array<float>(info, 2, "weight", d, true);
  if (!info[3].IsNumber()) throw_type(env, "eps must be a finite number");
  const double eps = info[3].As<Napi::Number>().DoubleValue();
  if (!std::isfinite(eps) || eps < 0)
    throw_range(env, "eps is " + std::to_string(eps) + ", expected a finite number >= 0");
  auto out = get_array<float>(info, 6, "out", rows * d);
  guard(env, [&] {
    expertd::gated_rms_norm(x.data, z.data, w.data, static_cast<float>(eps), static_cast<int>(rows),
                            static_cast<int>(d), out.data);
  });
  return env.Undefined();
}

}  // namespace

void register_deltanet(Napi::Env env, Napi::Object exports) {
  exports.Set("causalConv1d", Napi::Function::New(env, causal_conv1d, "causalConv1d"));
  exports.Set("causalConv1dBatch", Napi::Function::New(env, causal_conv1d_batch, "causalConv1dBatch"));
  exports.Set("gatedDeltaRule", Napi::Function::New(env, gated_delta_rule, "gatedDeltaRule"));
  exports.Set("gatedDeltaRuleBatch",
              Napi::Function::New(env, gated_delta_rule_batch, "gatedDeltaRuleBatch"));
  exports.Set("gatedRmsNorm", Napi::Function::New(env, gated_rms_norm, "gatedRmsNorm"));
}

}  // namespace expertd::addon
