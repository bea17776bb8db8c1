// Weight packing into the 16-row blocked layout (see ops.h): allocation, packing of plain and
// gate/up weights (with dtype conversion), and element read-back for tests.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "expertd/errors.h"
#include "expertd/ops.h"
#include "expertd/thread_pool.h"

namespace expertd {

namespace {

int round_up(int v, int m) { return (v + m - 1) / m * m; }

// Physical row (within the padded [np] rows) of logical row r. GateUp interleaves 16-row blocks:
// gate rows [16j, 16j+16) -> block 2j, up rows of the same range -> block 2j+1.
int physical_row(const PackedWeight& w, int r) {
  if (w.kind == WeightKind::Plain) return r;
  int inter = w.n / 2;
  bool up = r >= inter;
  int q = up ? r - inter : r;
  return (q / 16) * 32 + (up ? 16 : 0) + q % 16;
}

// Element offset of (physical row p, col c) in the packed buffer (same for every dtype: a block
// holds 16 * kp elements).
size_t packed_offset(const PackedWeight& w, int p, int c) {
  size_t block = static_cast<size_t>(p / 16) * 16 * w.kp;
  int i = p % 16;
  if (w.dtype == DType::BF16) return block + static_cast<size_t>(c / 2) * 32 + i * 2 + (c & 1);
  return block + static_cast<size_t>(c) * 16 + i;
}

float load_as_f32(const void* src, DType t, size_t idx) {
  switch (t) {
    case DType::F32: return static_cast<const float*>(src)[idx];
    case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(src)[idx]);
    default: return f16_to_f32(static_cast<const uint16_t*>(src)[idx]);
  }
}

// One row of the source converted to the storage dtype into out[k] (bit copy when dtypes match,
// so NaN payloads and signed zeros survive).
void convert_row(const void* src_row, DType src_t, int k, DType dst_t, void* out) {
  if (src_t == dst_t) {
    std::memcpy(out, src_row, static_cast<size_t>(k) * dtype_size(dst_t));
    return;
  }
  for (int c = 0; c < k; ++c) {
    float v = load_as_f32(src_row, src_t, c);
    if (dst_t == DType::F32) static_cast<float*>(out)[c] = v;
    else if (dst_t == DType::BF16) static_cast<uint16_t*>(out)[c] = f32_to_bf16(v);
    else static_cast<uint16_t*>(out)[c] = f32_to_f16(v);
  }
}

// Fills block `blk` of w from the logical rows given by row_src(logical_row) -> pointer or null.
template <class RowSrc>
void pack_block(PackedWeight& w, int blk, DType src_t, const RowSrc& row_src,
                std::vector<uint8_t>& rowbuf) {
  const size_t es = dtype_size(w.dtype);
  uint8_t* base = w.data.get() + static_cast<size_t>(blk) * 16 * w.kp * es;
  std::memset(base, 0, static_cast<size_t>(16) * w.kp * es);
  rowbuf.resize(static_cast<size_t>(w.kp) * es);
  // Logical row of each physical row of the block (-1 = padding).
  for (int i = 0; i < 16; ++i) {
    int p = blk * 16 + i;
    int logical;
    if (w.kind == WeightKind::Plain) {
      logical = p < w.n ? p : -1;
    } else {
      int inter = w.n / 2;
      int q = (p / 32) * 16 + p % 16;
      bool up = (p / 16) % 2 == 1;
      logical = q < inter ? (up ? inter + q : q) : -1;
    }
    if (logical < 0) continue;
    convert_row(row_src(logical), src_t, w.k, w.dtype, rowbuf.data());
    if (w.dtype == DType::BF16) {
      const uint16_t* r = reinterpret_cast<const uint16_t*>(rowbuf.data());
      uint16_t* d = reinterpret_cast<uint16_t*>(base);
      for (int c = 0; c < w.k; ++c) d[(c / 2) * 32 + i * 2 + (c & 1)] = r[c];
    } else if (w.dtype == DType::F16) {
      const uint16_t* r = reinterpret_cast<const uint16_t*>(rowbuf.data());
      uint16_t* d = reinterpret_cast<uint16_t*>(base);
      for (int c = 0; c < w.k; ++c) d[c * 16 + i] = r[c];
    } else {
      const float* r = reinterpret_cast<const float*>(rowbuf.data());
      float* d = reinterpret_cast<float*>(base);
      for (int c = 0; c < w.k; ++c) d[c * 16 + i] = r[c];
    }
  }
}

template <class RowSrc>
void pack_all(PackedWeight& w, DType src_t, const RowSrc& row_src) {
  EXPERTD_CHECK(w.data != nullptr, ErrorCode::Internal, "packed weight has no storage");
  int blocks = w.np / 16;
  auto& pool = ThreadPool::instance();
  // A few blocks per task: packing is memory-bound, tasks only need to spread over the cores.
  int per_task = std::max(1, blocks / static_cast<int>(pool.num_threads() * 8));
  int tasks = (blocks + per_task - 1) / per_task;
  pool.parallel_for(static_cast<size_t>(tasks), [&](size_t t, size_t) {
    thread_local std::vector<uint8_t> rowbuf;
    int b1 = std::min(blocks, static_cast<int>(t + 1) * per_task);
    for (int b = static_cast<int>(t) * per_task; b < b1; ++b) pack_block(w, b, src_t, row_src, rowbuf);
  });
}

}  // namespace

std::shared_ptr<PackedWeight> alloc_packed_weight(DType dtype, WeightKind kind, int n, int k) {
  EXPERTD_CHECK(n > 0 && k > 0, ErrorCode::Range, "weight dimensions must be positive");
  EXPERTD_CHECK(kind == WeightKind::Plain || n % 2 == 0, ErrorCode::Range,
                "a gate_up weight needs an even n (2 * inter)");
  auto w = std::make_shared<PackedWeight>();
  w->dtype = dtype;
  w->kind = kind;
  w->n = n;
  w->k = k;
  w->np = kind == WeightKind::GateUp ? 2 * round_up(n / 2, 16) : round_up(n, 16);
  w->kp = round_up(k, 2);
  w->size_bytes = static_cast<size_t>(w->np) * w->kp * dtype_size(dtype);
  size_t alloc = (w->size_bytes + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, alloc);
  if (!p)
    fail(ErrorCode::OutOfMemory,
         "out of host memory for a packed weight of " + std::to_string(w->size_bytes) + " bytes");
  std::memset(p, 0, alloc);
  w->data = std::shared_ptr<uint8_t>(static_cast<uint8_t*>(p), [](uint8_t* q) { std::free(q); });
  return w;
}

void pack_weight(PackedWeight& w, const void* src, DType src_dtype) {
  const size_t row_bytes = static_cast<size_t>(w.k) * dtype_size(src_dtype);
  const uint8_t* s = static_cast<const uint8_t*>(src);
  pack_all(w, src_dtype, [&](int r) { return s + static_cast<size_t>(r) * row_bytes; });
}

void pack_gate_up(PackedWeight& w, const void* gate, const void* up, DType src_dtype) {
  EXPERTD_CHECK(w.kind == WeightKind::GateUp, ErrorCode::InvalidArg,
                "pack_gate_up needs a gate_up weight");
  const size_t row_bytes = static_cast<size_t>(w.k) * dtype_size(src_dtype);
  const int inter = w.n / 2;
  const uint8_t* g = static_cast<const uint8_t*>(gate);
  const uint8_t* u = static_cast<const uint8_t*>(up);
  pack_all(w, src_dtype, [&](int r) {
    return r < inter ? g + static_cast<size_t>(r) * row_bytes
                     : u + static_cast<size_t>(r - inter) * row_bytes;
  });
}

float packed_weight_at(const PackedWeight& w, int row, int col) {
  EXPERTD_CHECK(row >= 0 && row < w.n && col >= 0 && col < w.k, ErrorCode::Range,
                "packed weight element out of range");
  return load_as_f32(w.ptr(), w.dtype, packed_offset(w, physical_row(w, row), col));
}

}  // namespace expertd
