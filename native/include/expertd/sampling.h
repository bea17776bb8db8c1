// The batched token sampler's contract (CPU in native/cpu/sampling.cc, device in
// native/cuda/sampling.cu): one call per engine step over every sequence's logits row, with the
// same arithmetic as src/engine/sampler.ts so that seeded draws give the same tokens.
#pragma once
#include <cstddef>
#include <cstdint>

namespace expertd {

// OpenAI caps top_logprobs at 20 (MAX_TOP_LOGPROBS in sampler.ts).
constexpr int kSampleMaxTopLogprobs = 20;
// Columns of the per-row parameter matrix the bindings take (SampleBatchArgs.params).
constexpr int kSampleParamCols = 8;
// Temperatures below this sample greedily (GREEDY_TEMPERATURE in sampler.ts).
constexpr double kSampleGreedyTemperature = 1e-5;

// One sequence's knobs, as SamplingParams in src/engine/types.ts (already validated).
struct SampleParams {
  double temperature = 0;
  double top_p = 1;
  int32_t top_k = 0;            // <= 0 or >= V: off
  double min_p = 0;
  double repetition_penalty = 1;
  double presence_penalty = 0;
  double frequency_penalty = 0;
  int32_t num_top_logprobs = -1;  // -1: no logprobs; 0..20: the sampled one plus this many
};

// One row of the batch. Every id was checked against V at the addon edge.
struct SampleSeq {
  SampleParams p;
  uint32_t* rng = nullptr;  // [4] xoshiro128** state, advanced in place (same stream as rng.ts)
  const int32_t* bias_ids = nullptr;  // [n_bias] logit_bias, applied in order
  const float* bias_values = nullptr;
  int32_t n_bias = 0;
  const int32_t* seen_ids = nullptr;  // [n_seen] distinct ids of prompt + output (repetition penalty)
  int32_t n_seen = 0;
  const int32_t* count_ids = nullptr;  // [n_counts] distinct output ids and their occurrences
  const int32_t* count_values = nullptr;
  int32_t n_counts = 0;
  // [ceil(V/32)] grammar bitmask (xgrammar's layout: bit j of word i = token 32i+j allowed), or
  // null. Applied first: a disallowed token's logit becomes -inf.
  const int32_t* bitmask = nullptr;
};

// [rows] sampled ids; logprobs [rows] (the sampled token's, NaN when not requested);
// top ids/logprobs [rows, 20] highest first, top_counts [rows].
struct SampleOut {
  int32_t* token_ids = nullptr;
  double* logprobs = nullptr;
  int32_t* top_ids = nullptr;
  double* top_logprobs = nullptr;
  int32_t* top_counts = nullptr;
};

// logits: [rows, vocab] f32, not modified. Threaded over rows on the thread pool.
void sample_batch(const float* logits, int rows, int vocab, const SampleSeq* seqs,
                  const SampleOut& out);

}  // namespace expertd
