// Quantized packed weights: allocation, quantization at load (--quantize int8|int4|fp8) and
// packing of pre-quantized checkpoint data (FP8 block-scaled, MXFP4), into the 16-row block
// layout the GEMM kernels read (QFormat in ops.h).
//
// Every path goes through one per-row form: codes (one byte per element, zero past k) and f32
// scales per group, so quantizing, FP8 and MXFP4 share the block writer (which stores the scales
// in the weight's ScaleType).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "expertd/errors.h"
#include "expertd/ops.h"
#include "expertd/thread_pool.h"
#include "expertd/weight_memory.h"
#include "gemm_kernels.h"
#include "packed_layout.h"
#include "quant_layout.h"

namespace expertd {

namespace {

int round_up(int v, int m) { return (v + m - 1) / m * m; }

// One logical row in the shared form: codes[kp] and scales[kp / group].
struct QRow {
  std::vector<uint8_t> codes;
  std::vector<float> scales;
};

// v in scale type t (exact where the caller made it so: see round_scale and pack_int_weight).
uint16_t scale16(float v, ScaleType t) { return t == ScaleType::BF16 ? f32_to_bf16(v) : f32_to_f16(v); }

// A scale as type t holds it: the nearest value of t (ties to even), or v for F32.
float round_scale(float v, ScaleType t) {
  return t == ScaleType::F32 ? v : scale16_value(scale16(v, t), t);
}

// Writes block blk of w from 16 rows (nullptr: a padding row, all zero).
void write_block(PackedWeight& w, int blk, const QRow* const* rows) {
  const int groups = w.kp / w.group;
  thread_local std::vector<float> sblk;  // the block's scales [groups][16] as f32
  sblk.assign(static_cast<size_t>(groups) * 16, 0.0f);
  float* sdst = sblk.data();
  for (int g = 0; g < groups; ++g)
    for (int i = 0; i < 16; ++i) sdst[g * 16 + i] = rows[i] ? rows[i]->scales[g] : 0.0f;
  // NOTE: a slot may be repacked with another expert: clear the block (padding rows and padding
  // columns stay zero), then put every live code where quant_layout.h says. An F8 block's chunks
  // lie among its group's (quant_layout.h), so it is cleared chunk by chunk.
  uint8_t* dst;
  size_t cstride = kChunk8;
  if (w.q == QFormat::F8) {
    dst = w.data.get() + f8_block_offset(blk, w.kp);
    cstride = kChunk8 * f8_group_width(blk, w.np / 16);
    for (int c = 0; c < (w.kp + 3) / 4; ++c) std::memset(dst + c * cstride, 0, kChunk8);
  } else {
    dst = w.data.get() + static_cast<size_t>(blk) * w.kp * w.k_bytes16();
    std::memset(dst, w.q == QFormat::I8 ? i8_store(0) : 0, static_cast<size_t>(w.kp) * w.k_bytes16());
  }
  if (qformat_bits(w.q) == 8) {
    for (int i = 0; i < 16; ++i) {
      if (!rows[i]) continue;
      const uint8_t* c = rows[i]->codes.data();
      if (w.q == QFormat::F8)
        for (int k = 0; k < w.kp; ++k) dst[code8_offset(w.q, i, k, w.kp, cstride)] = f8_store(c[k]);
      else
        for (int k = 0; k < w.kp; ++k) dst[code8_offset(w.q, i, k, w.kp)] = i8_store(static_cast<int8_t>(c[k]));
    }
    if (w.q == QFormat::F8)  // the exponent-0 flags (quant_layout.h); padding codes are 0
      for (int g = 0; g < groups; ++g)
        for (int i = 0; i < 16; ++i) {
          bool exp0 = !rows[i];
          for (int k = g * w.group; k < (g + 1) * w.group && !exp0; ++k) exp0 = f8_exp0(rows[i]->codes[k]);
          if (exp0) sdst[g * 16 + i] = -sdst[g * 16 + i];
        }
  } else {
    for (int i = 0; i < 16; ++i) {
      if (!rows[i]) continue;
      const uint8_t* c = rows[i]->codes.data();
      for (int k = 0; k < w.kp; ++k) {
        int shift;
        const size_t off = code4_offset(i, k, w.kp, &shift);
        dst[off] = static_cast<uint8_t>(dst[off] | ((c[k] & 0xf) << shift));
      }
    }
  }
  const size_t first = static_cast<size_t>(blk) * groups * 16;
  if (w.scale_type == ScaleType::F32) {
    std::memcpy(w.scales.get() + first * 4, sdst, sblk.size() * 4);
  } else {
    uint16_t* s16 = reinterpret_cast<uint16_t*>(w.scales.get()) + first;
    for (size_t j = 0; j < sblk.size(); ++j) s16[j] = scale16(sdst[j], w.scale_type);
  }
}

// Packs every block of w; fill(logical_row, QRow&) produces one row. Blocks run in parallel on
// the pool (use_pool) or on the calling thread.
template <class Fill>
void pack_rows(PackedWeight& w, const Fill& fill, bool use_pool) {
  const int blocks = w.np / 16;
  auto run = [&](int b0, int b1) {
    thread_local std::vector<QRow> rows(16);
    for (int b = b0; b < b1; ++b) {
      const QRow* ptrs[16];
      for (int i = 0; i < 16; ++i) {
        const int logical = logical_row(w, b * 16 + i);
        if (logical < 0) {
          ptrs[i] = nullptr;
          continue;
        }
        QRow& r = rows[i];
        r.codes.assign(static_cast<size_t>(w.kp), 0);
        r.scales.assign(static_cast<size_t>(w.kp / w.group), 0.0f);
        fill(logical, r);
        ptrs[i] = &r;
      }
      write_block(w, b, ptrs);
    }
  };
  if (!use_pool) return run(0, blocks);
  auto& pool = ThreadPool::instance();
  const int per_task = std::max(1, blocks / static_cast<int>(pool.num_threads() * 8));
  const int tasks = (blocks + per_task - 1) / per_task;
  pool.parallel_for(static_cast<size_t>(tasks), [&](size_t t, size_t) {
    run(static_cast<int>(t) * per_task, std::min(blocks, static_cast<int>(t + 1) * per_task));
  });
}

// Source row r of a Plain or GateUp weight: (matrix pointer, row within it).
struct SrcRow {
  const void* m;
  int row;
};

SrcRow source_row(const PackedWeight& w, const void* src, const void* up, int r) {
  if (w.kind == WeightKind::GateUp && r >= w.n / 2) return {up, r - w.n / 2};
  return {src, r};
}

// F8 --quantize: scale_inv per (block_rows x group) block of each matrix (gate and up apart),
// absmax / 448, in the layout of a checkpoint's weight_scale_inv.
std::vector<float> fp8_block_scales(const void* m, DType t, int rows, int k, int br, int bc) {
  const int nbr = (rows + br - 1) / br, nbc = (k + bc - 1) / bc;
  std::vector<float> s(static_cast<size_t>(nbr) * nbc, 0.0f);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < k; ++c) {
      float& a = s[static_cast<size_t>(r / br) * nbc + c / bc];
      a = std::max(a, std::fabs(load_as_f32(m, t, static_cast<size_t>(r) * k + c)));
    }
  for (float& a : s) a = a / 448.0f;
  return s;
}

void check_quant(const PackedWeight& w, QFormat want, const char* what) {
  EXPERTD_CHECK(w.data != nullptr && w.scales != nullptr, ErrorCode::Internal,
                "quantized weight has no storage");
  EXPERTD_CHECK(w.q == want, ErrorCode::InvalidArg,
                std::string(what) + " needs a " + qformat_name(want) + " weight, got " +
                    qformat_name(w.q));
}

}  // namespace

std::shared_ptr<PackedWeight> alloc_quant_weight(QFormat q, int group, WeightKind kind, int n,
                                                 int k, ScaleType scale_type) {
  EXPERTD_CHECK(q != QFormat::None, ErrorCode::InvalidArg, "alloc_quant_weight needs a format");
  EXPERTD_CHECK(n > 0 && k > 0, ErrorCode::Range, "weight dimensions must be positive");
  EXPERTD_CHECK(kind == WeightKind::Plain || n % 2 == 0, ErrorCode::Range,
                "a gate_up weight needs an even n (2 * inter)");
  const int k_even = round_up(k, 2);
  if (q == QFormat::I8 && group == 0) group = k_even;
  EXPERTD_CHECK(group >= 2 && group % 2 == 0, ErrorCode::Range,
                "quantization group " + std::to_string(group) + " must be even and positive");
  if (q == QFormat::FP4)
    EXPERTD_CHECK(group == 32, ErrorCode::Range, "MXFP4 scales cover 32 values, not " +
                                                     std::to_string(group));
  if (q == QFormat::FP4) scale_type = ScaleType::BF16;  // powers of two: exact
  EXPERTD_CHECK(q == QFormat::I4 || q == QFormat::FP4 || scale_type == ScaleType::F32, ErrorCode::InvalidArg,
                std::string(qformat_name(q)) + " weights keep f32 scales, not " + scale_type_name(scale_type));
  auto w = std::make_shared<PackedWeight>();
  w->dtype = DType::F32;  // what the kernels compute in
  w->scale_type = scale_type;
  w->q = q;
  w->group = group;
  w->kind = kind;
  w->n = n;
  w->k = k;
  w->np = kind == WeightKind::GateUp ? 2 * round_up(n / 2, 16) : round_up(n, 16);
  w->kp = round_up(k_even, group);
  const size_t code_bytes = static_cast<size_t>(w->np / 16) * w->kp * w->k_bytes16();
  w->size_bytes = code_bytes + w->scale_bytes();
  const std::string what = "a " + std::string(qformat_name(q)) + " weight";
  w->data = alloc_weight_bytes(code_bytes, what.c_str());
  w->scales = alloc_weight_bytes(w->scale_bytes(), (what + "'s scales").c_str());
  return w;
}

void quantize_weight(PackedWeight& w, const void* src, const void* up, DType src_dtype,
                     int block_rows, bool use_pool) {
  EXPERTD_CHECK(w.quantized() && w.data && w.scales, ErrorCode::InvalidArg,
                "quantize_weight needs a quantized weight");
  EXPERTD_CHECK(w.kind == WeightKind::Plain || up != nullptr, ErrorCode::InvalidArg,
                "quantizing a gate_up weight needs its up half");
  EXPERTD_CHECK(w.q != QFormat::FP4, ErrorCode::InvalidArg,
                "MXFP4 is a checkpoint format, not a quantization target");
  const int k = w.k, group = w.group;
  if (w.q == QFormat::F8) {
    EXPERTD_CHECK(block_rows > 0, ErrorCode::Range, "fp8 block rows must be positive");
    const int rows = w.kind == WeightKind::GateUp ? w.n / 2 : w.n;
    const std::vector<float> s0 = fp8_block_scales(src, src_dtype, rows, k, block_rows, group);
    const std::vector<float> s1 = w.kind == WeightKind::GateUp
                                      ? fp8_block_scales(up, src_dtype, rows, k, block_rows, group)
                                      : std::vector<float>();
    const int nbc = (k + group - 1) / group;
    pack_rows(w, [&](int r, QRow& q) {
      const SrcRow s = source_row(w, src, up, r);
      const std::vector<float>& st = s.m == src ? s0 : s1;
      for (int g = 0; g < nbc; ++g) q.scales[g] = st[static_cast<size_t>(s.row / block_rows) * nbc + g];
      for (int c = 0; c < k; ++c) {
        const float sc = q.scales[c / group];
        const float v = load_as_f32(s.m, src_dtype, static_cast<size_t>(s.row) * k + c);
        q.codes[c] = sc > 0.0f ? f32_to_fp8_e4m3(v / sc) : 0;
      }
    }, use_pool);
    return;
  }
  const float qmax = w.q == QFormat::I8 ? 127.0f : 7.0f;
  pack_rows(w, [&](int r, QRow& q) {
    const SrcRow s = source_row(w, src, up, r);
    thread_local std::vector<float> x;
    x.resize(static_cast<size_t>(k));
    for (int c = 0; c < k; ++c) x[c] = load_as_f32(s.m, src_dtype, static_cast<size_t>(s.row) * k + c);
    for (int c0 = 0, g = 0; c0 < k; c0 += group, ++g) {
      const int c1 = std::min(k, c0 + group);
      float amax = 0.0f;
      for (int c = c0; c < c1; ++c) amax = std::max(amax, std::fabs(x[c]));
      // Symmetric: code = round(x / scale) in [-qmax, qmax], against the scale as the weight holds
      // it (16-bit scales: rounded first, so that code * scale is what the kernels compute with).
      const float sc = round_scale(amax / qmax, w.scale_type);
      EXPERTD_CHECK(std::isfinite(sc), ErrorCode::Range,
                    "a weight group's scale (" + std::to_string(amax / qmax) + ") overflows " + scale_type_name(w.scale_type));
      q.scales[g] = sc;
      for (int c = c0; c < c1; ++c) {
        const float v = sc > 0.0f ? std::nearbyint(x[c] / sc) : 0.0f;
        q.codes[c] = static_cast<uint8_t>(static_cast<int8_t>(std::max(-qmax, std::min(qmax, v))));
      }
    }
  }, use_pool);
}

void pack_fp8_weight(PackedWeight& w, const uint8_t* codes, const float* scale_inv,
                     const uint8_t* codes_up, const float* scale_inv_up, int br, int bc,
                     bool use_pool) {
  check_quant(w, QFormat::F8, "pack_fp8_weight");
  EXPERTD_CHECK(bc == w.group, ErrorCode::InvalidArg,
                "fp8 block columns " + std::to_string(bc) + " differ from the weight's group " +
                    std::to_string(w.group));
  EXPERTD_CHECK(br > 0, ErrorCode::Range, "fp8 block rows must be positive");
  EXPERTD_CHECK(w.kind == WeightKind::Plain || (codes_up && scale_inv_up), ErrorCode::InvalidArg,
                "an fp8 gate_up weight needs its up half");
  const int k = w.k, nbc = (k + bc - 1) / bc, inter = w.n / 2;
  const bool gu = w.kind == WeightKind::GateUp;
  pack_rows(w, [&](int r, QRow& q) {
    const bool is_up = gu && r >= inter;
    const int row = is_up ? r - inter : r;
    const uint8_t* c = (is_up ? codes_up : codes) + static_cast<size_t>(row) * k;
    const float* s = (is_up ? scale_inv_up : scale_inv) + static_cast<size_t>(row / br) * nbc;
    std::memcpy(q.codes.data(), c, static_cast<size_t>(k));
    for (int g = 0; g < nbc; ++g) q.scales[g] = s[g];
  }, use_pool);
}

void pack_mxfp4_weight(PackedWeight& w, const uint8_t* blocks, const uint8_t* scales,
                       const uint8_t* blocks_up, const uint8_t* scales_up) {
  check_quant(w, QFormat::FP4, "pack_mxfp4_weight");
  EXPERTD_CHECK(w.k % 32 == 0, ErrorCode::Range,
                "an MXFP4 weight needs k a multiple of 32, got " + std::to_string(w.k));
  EXPERTD_CHECK(w.kind == WeightKind::Plain || (blocks_up && scales_up), ErrorCode::InvalidArg,
                "an MXFP4 gate_up weight needs its up half");
  const int k = w.k, nb = k / 32, inter = w.n / 2;
  const bool gu = w.kind == WeightKind::GateUp;
  pack_rows(w, [&](int r, QRow& q) {
    const bool is_up = gu && r >= inter;
    const int row = is_up ? r - inter : r;
    const uint8_t* b = (is_up ? blocks_up : blocks) + static_cast<size_t>(row) * nb * 16;
    const uint8_t* s = (is_up ? scales_up : scales) + static_cast<size_t>(row) * nb;
    for (int c = 0; c < k; ++c) q.codes[c] = (c & 1) ? (b[c / 2] >> 4) : (b[c / 2] & 0xf);
    // e8m0: 2^(s - 127); 255 is NaN in the format and is kept as NaN. Stored halved (exact, down
    // to 2^-128): the kernels' e2m1 values are doubled (gemm_kernels.h fp4_e2m1_table).
    for (int g = 0; g < nb; ++g)
      q.scales[g] = s[g] == 255 ? std::nanf("") : std::ldexp(1.0f, static_cast<int>(s[g]) - 128);
  }, true);
}

namespace {

// Zero points [rows, groups] (GateUp: gate's and up's) into w.zeros in the scales' layout; padding
// rows and the groups past k hold 0. Allocated on first use.
void write_zeros(PackedWeight& w, const int8_t* zeros, const int8_t* zeros_up, int groups) {
  const bool gu = w.kind == WeightKind::GateUp;
  if (!zeros) return;
  EXPERTD_CHECK(!gu || zeros_up, ErrorCode::InvalidArg, "an int gate_up weight with zero points needs up's too");
  const size_t gp = static_cast<size_t>(w.kp / w.group);
  if (!w.zeros) {
    w.zeros = alloc_weight_bytes(static_cast<size_t>(w.np) * gp, "an int weight's zero points");
    w.size_bytes += w.zero_bytes();
  }
  int8_t* z = reinterpret_cast<int8_t*>(w.zeros.get());
  std::memset(z, 0, w.zero_bytes());
  const int inter = w.n / 2;
  for (int r = 0; r < w.n; ++r) {
    const bool is_up = gu && r >= inter;
    const int8_t* src = (is_up ? zeros_up : zeros) + static_cast<size_t>(is_up ? r - inter : r) * groups;
    const int p = physical_row(w, r);
    for (int g = 0; g < groups; ++g) z[(static_cast<size_t>(p / 16) * gp + g) * 16 + p % 16] = src[g];
  }
}

}  // namespace

void pack_int_weight(PackedWeight& w, const int8_t* codes, const float* scales,
                     const int8_t* codes_up, const float* scales_up, bool use_pool,
                     const int8_t* zeros, const int8_t* zeros_up, const int32_t* perm) {
  EXPERTD_CHECK(zeros || !w.zeros, ErrorCode::InvalidArg,
                "the weight holds zero points: packing into it needs them");
  EXPERTD_CHECK(perm || !w.perm, ErrorCode::InvalidArg,
                "the weight holds an input order (act-order): packing into it needs one");
  if (perm) {
    std::vector<uint8_t> seen(static_cast<size_t>(w.k), 0);
    for (int j = 0; j < w.k; ++j) {
      EXPERTD_CHECK(perm[j] >= 0 && perm[j] < w.k && !seen[perm[j]], ErrorCode::InvalidArg,
                    "perm is not a permutation of 0.." + std::to_string(w.k - 1) + " (at " + std::to_string(j) + ")");
      seen[perm[j]] = 1;
    }
    if (!w.perm) {
      w.perm = std::shared_ptr<int32_t>(new int32_t[w.k], std::default_delete<int32_t[]>());
      w.size_bytes += static_cast<size_t>(w.k) * sizeof(int32_t);
    }
    std::memcpy(w.perm.get(), perm, static_cast<size_t>(w.k) * sizeof(int32_t));
  }
  EXPERTD_CHECK(w.q == QFormat::I8 || w.q == QFormat::I4, ErrorCode::InvalidArg,
                std::string("pack_int_weight needs an int8 or int4 weight, got ") + qformat_name(w.q));
  EXPERTD_CHECK(w.data != nullptr && w.scales != nullptr, ErrorCode::Internal,
                "quantized weight has no storage");
  EXPERTD_CHECK(w.kind == WeightKind::Plain || (codes_up && scales_up), ErrorCode::InvalidArg,
                "an int gate_up weight needs its up half");
  const int k = w.k, groups = (k + w.group - 1) / w.group, inter = w.n / 2;
  const bool gu = w.kind == WeightKind::GateUp;
  if (w.scale_type != ScaleType::F32) {  // every scale exact in the weight's 16 bits
    const int rows = gu ? inter : w.n;
    for (const float* m : {scales, gu ? scales_up : nullptr}) {
      if (!m) continue;
      for (size_t j = 0; j < static_cast<size_t>(rows) * groups; ++j) {
        const float r = round_scale(m[j], w.scale_type);
        EXPERTD_CHECK(r == m[j] || (std::isnan(r) && std::isnan(m[j])), ErrorCode::InvalidArg,
                      "int scale " + std::to_string(m[j]) + " (row " + std::to_string(j / groups) + ") is not a " +
                          scale_type_name(w.scale_type) + " number: the weight holds its scales in " +
                          scale_type_name(w.scale_type));
      }
    }
  }
  pack_rows(w, [&](int r, QRow& q) {
    const bool is_up = gu && r >= inter;
    const int row = is_up ? r - inter : r;
    const int8_t* c = (is_up ? codes_up : codes) + static_cast<size_t>(row) * k;
    const float* s = (is_up ? scales_up : scales) + static_cast<size_t>(row) * groups;
    // The shared row form holds a code's two's complement byte (I4: its low nibble is the code).
    std::memcpy(q.codes.data(), c, static_cast<size_t>(k));
    for (int g = 0; g < groups; ++g) q.scales[g] = s[g];
  }, use_pool);
  write_zeros(w, zeros, zeros_up, groups);
}

float quant_weight_at(const PackedWeight& w, int row, int col) {
  if (w.perm) {  // act-order: input col is stored column j with perm[j] == col
    const int32_t* pm = w.perm.get();
    col = static_cast<int>(std::find(pm, pm + w.k, col) - pm);
  }
  const int p = physical_row(w, row);
  const uint8_t* blk = w.data.get() + static_cast<size_t>(p / 16) * w.kp * w.k_bytes16();
  const int i = p % 16;
  float v;
  switch (w.q) {
    case QFormat::I8: v = gemm::decode_code<QFormat::I8>(blk, col, i, w.kp); break;
    case QFormat::I4: v = gemm::decode_code<QFormat::I4>(blk, col, i, w.kp); break;
    case QFormat::F8:
      v = gemm::decode_code<QFormat::F8>(w.data.get() + f8_block_offset(p / 16, w.kp), col, i, w.kp,
                                         kChunk8 * f8_group_width(p / 16, w.np / 16));
      break;
    default: v = gemm::decode_code<QFormat::FP4>(blk, col, i, w.kp); break;
  }
  const size_t groups = static_cast<size_t>(w.kp / w.group);
  const size_t at = (static_cast<size_t>(p / 16) * groups + col / w.group) * 16 + i;
  const float s = scale_value(w.scales.get(), w.scale_type, at);
  if (w.zeros) v -= static_cast<float>(reinterpret_cast<const int8_t*>(w.zeros.get())[at]);
  return v * (w.q == QFormat::F8 ? std::fabs(s) : s);  // F8: the sign is a flag
}

}  // namespace expertd
