// Weight packing into the 16-row blocked layout (see ops.h): allocation, packing of plain and
// gate/up weights (with dtype conversion), and element read-back for tests.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "expertd/errors.h"
#include "expertd/ops.h"
#include "expertd/weight_memory.h"
#include "expertd/thread_pool.h"
#include "packed_layout.h"

namespace expertd {

namespace {

int round_up(int v, int m) { return (v + m - 1) / m * m; }

// Element offset of (physical row p, col c) in the packed buffer (same for every dtype: a block
// holds 16 * kp elements).
size_t packed_offset(const PackedWeight& w, int p, int c) {
  size_t block = static_cast<size_t>(p / 16) * 16 * w.kp;
  int i = p % 16;
  if (w.dtype == DType::BF16) return block + static_cast<size_t>(c / 2) * 32 + i * 2 + (c & 1);
  return block + static_cast<size_t>(c) * 16 + i;
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

// dst[c * 16 + i] = rows[i][c] for c < cols: a 16-row transpose of T-sized elements (bf16
// pairs travel as one uint32, so the same loop builds the [Kp/2][16][2] layout).
template <typename T>
void transpose16(const uint8_t* const* rows, int cols, T* dst) {
  const T* r[16];
  for (int i = 0; i < 16; ++i) r[i] = reinterpret_cast<const T*>(rows[i]);
  for (int c = 0; c < cols; ++c)
    for (int i = 0; i < 16; ++i) {
      T v;
      std::memcpy(&v, r[i] + c, sizeof(T));
      dst[static_cast<size_t>(c) * 16 + i] = v;
    }
}

struct PackScratch {
  std::vector<uint8_t> rows;  // [16][kp] converted rows (source dtype != storage dtype)
  std::vector<uint8_t> zero;  // one zero row (padding rows of the block)
};

// Fills block `blk` of w from the logical rows given by row_src(logical_row) -> pointer.
template <class RowSrc>
void pack_block(PackedWeight& w, int blk, DType src_t, const RowSrc& row_src, PackScratch& ps) {
  const size_t es = dtype_size(w.dtype);
  const size_t row_bytes = static_cast<size_t>(w.kp) * es;
  uint8_t* base = w.data.get() + static_cast<size_t>(blk) * 16 * row_bytes;
  ps.zero.assign(row_bytes, 0);
  if (src_t != w.dtype) ps.rows.resize(16 * row_bytes);
  const uint8_t* rows[16];
  for (int i = 0; i < 16; ++i) {
    const int logical = logical_row(w, blk * 16 + i);
    if (logical < 0) {
      rows[i] = ps.zero.data();
    } else if (src_t == w.dtype) {
      rows[i] = static_cast<const uint8_t*>(row_src(logical));
    } else {
      uint8_t* r = ps.rows.data() + i * row_bytes;
      convert_row(row_src(logical), src_t, w.k, w.dtype, r);
      rows[i] = r;
    }
  }
  if (w.dtype == DType::BF16) {
    uint32_t* d = reinterpret_cast<uint32_t*>(base);
    transpose16<uint32_t>(rows, w.k / 2, d);
    if (w.k % 2) {  // last pair: (x[k-1], 0); source rows end at k-1, so read 2 bytes only
      for (int i = 0; i < 16; ++i) {
        uint16_t v;
        std::memcpy(&v, rows[i] + static_cast<size_t>(w.k - 1) * 2, 2);
        d[static_cast<size_t>(w.k / 2) * 16 + i] = v;
      }
    }
  } else {
    if (es == 4) transpose16<uint32_t>(rows, w.k, reinterpret_cast<uint32_t*>(base));
    else transpose16<uint16_t>(rows, w.k, reinterpret_cast<uint16_t*>(base));
    if (w.kp > w.k) std::memset(base + static_cast<size_t>(w.k) * 16 * es, 0, 16 * es);
  }
}

template <class RowSrc>
void pack_all(PackedWeight& w, DType src_t, const RowSrc& row_src, bool use_pool) {
  EXPERTD_CHECK(w.data != nullptr, ErrorCode::Internal, "packed weight has no storage");
  int blocks = w.np / 16;
  if (!use_pool) {
    thread_local PackScratch ps;
    for (int b = 0; b < blocks; ++b) pack_block(w, b, src_t, row_src, ps);
    return;
  }
  auto& pool = ThreadPool::instance();
  // A few blocks per task: packing is memory-bound, tasks only need to spread over the cores.
  int per_task = std::max(1, blocks / static_cast<int>(pool.num_threads() * 8));
  int tasks = (blocks + per_task - 1) / per_task;
  pool.parallel_for(static_cast<size_t>(tasks), [&](size_t t, size_t) {
    thread_local PackScratch ps;
    int b1 = std::min(blocks, static_cast<int>(t + 1) * per_task);
    for (int b = static_cast<int>(t) * per_task; b < b1; ++b) pack_block(w, b, src_t, row_src, ps);
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
  w->data = alloc_weight_bytes(w->size_bytes, "a packed weight");
  return w;
}

void pack_weight(PackedWeight& w, const void* src, DType src_dtype, bool use_pool) {
  if (w.quantized()) return quantize_weight(w, src, nullptr, src_dtype, 128, use_pool);
  const size_t row_bytes = static_cast<size_t>(w.k) * dtype_size(src_dtype);
  const uint8_t* s = static_cast<const uint8_t*>(src);
  pack_all(w, src_dtype, [&](int r) { return s + static_cast<size_t>(r) * row_bytes; }, use_pool);
}

void pack_gate_up(PackedWeight& w, const void* gate, const void* up, DType src_dtype,
                  bool use_pool) {
  EXPERTD_CHECK(w.kind == WeightKind::GateUp, ErrorCode::InvalidArg,
                "pack_gate_up needs a gate_up weight");
  if (w.quantized()) return quantize_weight(w, gate, up, src_dtype, 128, use_pool);
  const size_t row_bytes = static_cast<size_t>(w.k) * dtype_size(src_dtype);
  const int inter = w.n / 2;
  const uint8_t* g = static_cast<const uint8_t*>(gate);
  const uint8_t* u = static_cast<const uint8_t*>(up);
  pack_all(w, src_dtype, [&](int r) {
    return r < inter ? g + static_cast<size_t>(r) * row_bytes
                     : u + static_cast<size_t>(r - inter) * row_bytes;
  }, use_pool);
}

float packed_weight_at(const PackedWeight& w, int row, int col) {
  EXPERTD_CHECK(row >= 0 && row < w.n && col >= 0 && col < w.k, ErrorCode::Range,
                "packed weight element out of range");
  if (w.quantized()) return quant_weight_at(w, row, col);
  return load_as_f32(w.ptr(), w.dtype, packed_offset(w, physical_row(w, row), col));
}

}  // namespace expertd
