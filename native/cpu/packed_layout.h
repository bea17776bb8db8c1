// Internal to weight packing: where a logical row of a packed weight lives (see ops.h: GateUp
// interleaves 16-row blocks of gate and up rows).
#pragma once
#include "expertd/ops.h"

namespace expertd {

// Physical row (within the padded [np] rows) of logical row r.
inline int physical_row(const PackedWeight& w, int r) {
  if (w.kind == WeightKind::Plain) return r;
  const int inter = w.n / 2;
  const bool up = r >= inter;
  const int q = up ? r - inter : r;
  return (q / 16) * 32 + (up ? 16 : 0) + q % 16;
}

// Logical row held by physical row p of w, or -1 for padding.
inline int logical_row(const PackedWeight& w, int p) {
  if (w.kind == WeightKind::Plain) return p < w.n ? p : -1;
  const int inter = w.n / 2;
  const int q = (p / 32) * 16 + p % 16;
  const bool up = (p / 16) % 2 == 1;
  return q < inter ? (up ? inter + q : q) : -1;
}

// Element idx of a float source array as f32.
inline float load_as_f32(const void* src, DType t, size_t idx) {
  switch (t) {
    case DType::F32: return static_cast<const float*>(src)[idx];
    case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(src)[idx]);
    default: return f16_to_f32(static_cast<const uint16_t*>(src)[idx]);
  }
}

// Dequantised element (row, col) of a quantized weight (quant.cc).
float quant_weight_at(const PackedWeight& w, int row, int col);

}  // namespace expertd
