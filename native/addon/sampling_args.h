// The batched sampler's arguments as read and checked at the addon edge (bind_sampling.cc), shared
// by the CPU binding (sampleBatch) and the device one (cudaSampleBatch in native/cuda/bind_cuda.cc).
#pragma once
#include <napi.h>

#include <cstdint>
#include <vector>

#include "args.h"
#include "expertd/sampling.h"

namespace expertd::addon {

// Views of the caller's typed arrays (valid during the call) and the per-row descriptors.
struct ParsedSampleBatch {
  size_t rows = 0, vocab = 0, words = 0;
  const double* params = nullptr;      // [rows, 8]
  uint32_t* rng = nullptr;             // [rows, 4], advanced in place
  const int32_t* bias_offsets = nullptr;
  const int32_t* bias_ids = nullptr;
  const float* bias_values = nullptr;
  const int32_t* seen_offsets = nullptr;
  const int32_t* seen_ids = nullptr;
  const int32_t* count_offsets = nullptr;
  const int32_t* count_ids = nullptr;
  const int32_t* count_values = nullptr;
  const int32_t* mask_rows = nullptr;  // [rows] or null
  const int32_t* masks = nullptr;      // [n_masks, words]
  size_t n_bias = 0, n_seen = 0, n_counts = 0, n_masks = 0;
  std::vector<SampleSeq> seqs;         // [rows], pointing into the arrays above
  SampleOut out;
};

// Reads batch (SampleBatchArgs) and out (SampleBatchOut); throws TypeError/RangeError naming the
// first bad field, index or value.
ParsedSampleBatch parse_sample_batch(Napi::Env env, int64_t rows, int64_t vocab, Napi::Object batch,
                                     Napi::Object out);

}  // namespace expertd::addon
