// Quantized experts on the device: the byte layout of one quantized matrix in device memory and
// the dequantising GroupGemm FFN over it (native/cuda/group_gemm_quant.cu). Plain C++ (no CUDA
// headers); src/model/cuda-quant.ts writes the same layout on the host.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "expertd/cuda_backend.h"
#include "expertd/ops.h"

namespace expertd::cuda {

// A table's quantization: q, and
//   I8  per output row (group unused, 0)
//   I4  group = k per scale, 32 or 128 (a ragged last group is allowed)
//   F8  group = block columns (bc), block_rows = block rows (br): 128 x 128 in the checkpoints
//   FP4 group = 32 (MXFP4)
//   zeros (I8 / I4 only): the matrices carry zero points (AWQ, GPTQ sym false, compressed-tensors
//   symmetric false), value = (code - zero) * scale
struct QuantLayout {
  QFormat q = QFormat::None;
  int group = 0;
  int block_rows = 0;
  bool zeros = false;
};

// One matrix W [n, k] (gate_up: n = 2I, gate rows then up rows) in one device allocation:
//   codes  [n][k * bits / 8] bytes, row-major: I8 int8; F8 e4m3fn; I4 two's complement nibbles,
//          FP4 e2m1 nibbles, element 2j in the low nibble of byte j (MXFP4's `_blocks` as shipped)
//   scales at scale_offset (16-byte aligned):
//          I8  f32 [n]                     value = code * s[r]
//          I4  f32 [n][ceil(k / group)]    value = code * s[r][c / group]
//          F8  f32 [sr][ceil(k / bc)]      value = e4m3(code) * s[r / br][c / bc] (the checkpoint's
//              weight_scale_inv); gate_up: the gate grid's ceil(I / br) rows, then the up grid's
//          FP4 u8  [n][k / 32]             value = e2m1(code) * 2^(s - 127) (e8m0; 255 is NaN)
//   zeros at zero_offset (16-byte aligned; a layout with zeros only): int8 laid out as the scales,
//          I8 [n], I4 [n][ceil(k / group)]; value = (code - zero) * scale
//   total_bytes: a multiple of 16, so matrices can follow each other in one buffer.
struct QuantMatrixBytes {
  size_t code_bytes = 0;
  size_t scale_offset = 0;
  size_t scale_bytes = 0;
  size_t total_bytes = 0;
  size_t zero_offset = 0;   // 0: no zero points
  size_t zero_bytes = 0;
  int scale_cols = 0;       // scales per scale row
  int gate_scale_rows = 0;  // F8 gate_up: the first scale row of the up half
};

inline size_t round16(size_t v) { return (v + 15) / 16 * 16; }

inline QuantMatrixBytes quant_matrix_bytes(const QuantLayout& l, int n, int k, bool gate_up) {
  QuantMatrixBytes b;
  const size_t bits = static_cast<size_t>(qformat_bits(l.q));
  b.code_bytes = static_cast<size_t>(n) * static_cast<size_t>(k) * bits / 8;
  b.scale_offset = round16(b.code_bytes);
  size_t scales = 0, elem = 4;
  switch (l.q) {
    case QFormat::I8: b.scale_cols = 1; scales = static_cast<size_t>(n); break;
    case QFormat::I4:
      b.scale_cols = (k + l.group - 1) / l.group;
      scales = static_cast<size_t>(n) * b.scale_cols;
      break;
    case QFormat::F8: {
      b.scale_cols = (k + l.group - 1) / l.group;
      const int half = gate_up ? n / 2 : n;
      b.gate_scale_rows = (half + l.block_rows - 1) / l.block_rows;
      scales = static_cast<size_t>(gate_up ? 2 * b.gate_scale_rows : b.gate_scale_rows) * b.scale_cols;
      break;
    }
    case QFormat::FP4:
      b.scale_cols = k / 32;
      scales = static_cast<size_t>(n) * b.scale_cols;
      elem = 1;
      break;
    default: break;
  }
  b.scale_bytes = scales * elem;
  b.total_bytes = round16(b.scale_offset + b.scale_bytes);
  if (l.zeros && (l.q == QFormat::I8 || l.q == QFormat::I4)) {
    b.zero_offset = b.total_bytes;
    b.zero_bytes = scales;
    b.total_bytes = round16(b.zero_offset + b.zero_bytes);
  }
  return b;
}

// Why the layout cannot serve an FFN of this shape, or "" when it can: the kernels read codes in
// 16-byte chunks (k a multiple of 16 for 8-bit codes, of 32 for 4-bit ones; k is hidden for
// gate_up and inter for down), and the group must be what the format allows.
inline std::string quant_layout_error(const QuantLayout& l, int hidden, int inter) {
  const char* name = qformat_name(l.q);
  if (l.zeros && l.q != QFormat::I8 && l.q != QFormat::I4)
    return std::string("zero points are for int8 / int4 weights, not ") + name;
  switch (l.q) {
    case QFormat::I8: break;
    case QFormat::I4:
      if (l.group != 32 && l.group != 128)
        return "int4 groups are 32 or 128, got " + std::to_string(l.group);
      break;
    case QFormat::F8:
      if (l.group < 16 || l.group % 16 || l.block_rows < 1)
        return "fp8 blocks must be positive with block columns a multiple of 16, got " +
               std::to_string(l.block_rows) + " x " + std::to_string(l.group);
      break;
    case QFormat::FP4:
      if (l.group != 32) return "mxfp4 scales cover 32 values, not " + std::to_string(l.group);
      break;
    default: return "no quantization format";
  }
  const int align = qformat_bits(l.q) == 4 ? 32 : 16;
  if (hidden % align || inter % align)
    return std::string(name) + " experts on the device need hidden and inter multiples of " +
           std::to_string(align) + " (hidden is " + std::to_string(hidden) + ", inter is " +
           std::to_string(inter) + ")";
  return "";
}

// Why the layout cannot serve a plain GEMM pass y [rows, n] = x [rows, k] W^T over a matrix of n
// rows, or "": k a multiple of 16 (8-bit codes) or 32 (4-bit), n even (float2 stores).
inline std::string quant_dense_error(const QuantLayout& l, int n, int k) {
  const int align = qformat_bits(l.q) == 4 ? 32 : 16;
  std::string why = quant_layout_error(l, align, align);
  if (!why.empty()) return why;
  if (k % align || n % 2 || n < 2)
    return std::string(qformat_name(l.q)) + " matrices on the device need k a multiple of " +
           std::to_string(align) + " and n even (n is " + std::to_string(n) + ", k is " +
           std::to_string(k) + ")";
  return "";
}

// The fused expert FFN over quantized weights (group_gemm_ffn's contract, bf16 x and h, f32 y):
// gate_up[e] / down[e] point at one matrix each in the layout above (null: the expert is skipped,
// its rows of h_scratch and y kept). Every weight is dequantised in registers to
// bf16(f32(value)) (round to nearest even) and multiplied on bf16 tensor cores (mma.sync, sm_80+),
// f32 accumulate. tile: Auto, Small or Large (the sm90 tiles are bf16 only: E_INVALID_ARG).
//
// Fp8Path::Act (fp8 tables with 128-column blocks, sm_89+): instead, x and h are quantized per
// (row, 128 k) to e4m3 with s = amax / 448 (code = e4m3(v / s), nearest even, saturating), each
// 128-k block is summed on e4m3 tensor cores in f32 (p), and acc = acc + p * (s_x * s_w), each
// operation rounded to f32. Auto takes it where available and EXPERTD_FP8_ACT=1 (opt-in until the
// kernels have run on a GPU); Dequant never does; Act forces it (E_INVALID_ARG where unavailable).
enum class Fp8Path : int { Auto = 0, Dequant = 1, Act = 2 };
void group_gemm_quant_ffn(const uint16_t* x, const int32_t* offsets, const uint8_t* const* gate_up,
                          const uint8_t* const* down, int num_experts, int rows, int hidden,
                          int inter, const QuantLayout& layout, uint16_t* h_scratch, float* y,
                          GemmTile tile, Stream s, Fp8Path path = Fp8Path::Auto);
// Whether the FP8-activation kernels can run on the current device (sm_89+, code in the build).
bool group_gemm_fp8_act_available();

// One plain pass of the dequantising GroupGemm (no activation, the dequant path only): y [rows, n]
// f32 = x [rows, k] bf16 W_e^T for the rows of each expert e (offsets), W_e = weights[e] a matrix of
// n rows in the layout above (gate_up: a gate_up matrix, n = 2I, columns gate then up; F8 reads its
// two scale grids). Empty slots (null) and rows past offsets[E] keep their rows of y. gpt-oss's
// biased experts run on it (biased_ffn.cu); tile as group_gemm_quant_ffn.
void group_gemm_quant_plain(const uint16_t* x, const int32_t* offsets, const uint8_t* const* weights,
                            int num_experts, int rows, int n, int k, bool gate_up,
                            const QuantLayout& layout, float* y, GemmTile tile, Stream s);

// gpt-oss's experts over a quantized table: group_gemm_biased_ffn's contract (cuda_backend.h), the
// two passes through group_gemm_quant_plain (weights dequantised to bf16 as the fused FFN does).
void group_gemm_biased_quant_ffn(const uint16_t* x, const int32_t* offsets,
                                 const uint8_t* const* gate_up, const uint8_t* const* down,
                                 int num_experts, int rows, int hidden, int inter,
                                 const QuantLayout& layout, const float* gate_up_bias,
                                 const float* down_bias, float alpha, float limit,
                                 float* gu_scratch, uint16_t* h_scratch, float* y, Stream s);

// A plain quantized GEMM (--quantize-dense on the device): y [m, n] f32 (+)= x [m, k] bf16 W^T
// (+ bias [n] f32), W one matrix [n, k] in the layout above (not gate_up), dequantised to bf16 as
// the GroupGemm does; the epilogue is dense_gemm's: (acc + bias) + old y, each an f32 add. x and w
// 16-byte aligned, y 8-byte.
void dense_gemm_quant(const uint16_t* x, int m, const uint8_t* w, int n, int k,
                      const QuantLayout& layout, float* y, const float* bias, bool accumulate,
                      Stream s);

}  // namespace expertd::cuda
