// The CPU op surface: plain C++ over caller-owned memory (no napi, no CUDA). The addon validates
// arguments before calling these; kernels assume shapes are consistent. Shapes use the field's
// letters: T tokens, H hidden, I expert intermediate, E experts, k top-k, M/N/K GEMM dims.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>

#include "expertd/dtype.h"

namespace expertd {

// ---------------------------------------------------------------------------------------------
// Packed weights. A weight W[N, K] (the HF Linear layout) is repacked once into blocks of 16
// output rows so that one kernel streams it for decode (GEMV) and prefill (register-blocked GEMM):
//   bf16: block b = rows [16b, 16b+16): [Kp/2][16][2]  (two consecutive k of one row side by side,
//         the VNNI pair layout vdpbf16ps wants)
//   f16 / f32: block b: [Kp][16]
// N is padded to Np (multiple of 16) and K to Kp (even) with zeros.
// A gate/up pair (kind GateUp, logical N = 2*I) interleaves blocks: block 2j holds gate rows
// [16j, 16j+16), block 2j+1 the up rows of the same range, so the kernel can apply SiLU(gate)*up
// while both tiles are in registers. I is padded to a multiple of 16 for this.
enum class WeightKind : int { Plain = 0, GateUp = 1 };

// Quantized storage (weights only; activations stay f32). A quantized weight keeps integer or
// minifloat codes in the same 16-row blocks, Kp x 16 codes per block (ordered inside a block as
// the kernels read them: native/cpu/quant_layout.h), plus scales per (row, group of `group` k):
// scales [Np/16][Kp/group][16], f32 or 16-bit (ScaleType). The value of element (r, c) is decode(code) * scale(r, c /
// group), and the kernels compute exactly that in f32 (so a quantized GEMM equals an f32 GEMM over
// the dequantised weight, in the same order).
//   I8  int8 codes, one byte each (symmetric, -127..127 from --quantize)
//   I4  int4 two's complement nibbles (-8..7), two per byte, in chunks of 8 k
//   F8  fp8 e4m3fn codes, one byte each (DeepSeek-V3 style checkpoints, --quantize fp8), bits
//       reordered, in chunks of 4 k; the sign of some scales is a flag (read them as |scale|)
//   FP4 fp4 e2m1 nibbles (MXFP4, gpt-oss), nibble layout as I4; scales are powers of two
// Kp is a multiple of `group` (and even); padding codes are zero.
enum class QFormat : int { None = 0, I8 = 1, I4 = 2, F8 = 3, FP4 = 4 };

inline const char* qformat_name(QFormat q) {
  switch (q) {
    case QFormat::I8: return "int8";
    case QFormat::I4: return "int4";
    case QFormat::F8: return "fp8";
    case QFormat::FP4: return "mxfp4";
    default: return "none";
  }
}
inline int qformat_bits(QFormat q) { return q == QFormat::I4 || q == QFormat::FP4 ? 4 : 8; }

// How a quantized weight holds its scales. A 4-bit weight's f32 scale per 32 codes is a fifth of
// its bytes, and decode reads every byte once per token, so 4-bit formats keep theirs in 16 bits
// where that is exact: --quantize int4 rounds its scales to bf16 before it rounds the codes to
// them, MXFP4's e8m0 powers of two are bf16 numbers, and compressed-tensors int4 scales stay in
// the checkpoint's dtype (bf16, f16, or f32). I8 and F8 (a scale per row or per 128 x 128 block)
// keep f32.
enum class ScaleType : int { F32 = 0, BF16 = 1, F16 = 2 };
inline size_t scale_type_size(ScaleType t) { return t == ScaleType::F32 ? 4 : 2; }
inline const char* scale_type_name(ScaleType t) {
  return t == ScaleType::F32 ? "f32" : t == ScaleType::BF16 ? "bf16" : "f16";
}
// --quantize's scales for format q: bf16 for int4 (rounded before the codes are), else f32.
inline ScaleType quantize_scale_type(QFormat q) { return q == QFormat::I4 ? ScaleType::BF16 : ScaleType::F32; }
// A 16-bit scale (t BF16 or F16) as f32 (exact).
inline float scale16_value(uint16_t h, ScaleType t) { return t == ScaleType::BF16 ? bf16_to_f32(h) : f16_to_f32(h); }
// Scale i of an array of type t, as f32 (exact).
inline float scale_value(const void* s, ScaleType t, size_t i) {
  if (t == ScaleType::F32) return static_cast<const float*>(s)[i];
  return scale16_value(static_cast<const uint16_t*>(s)[i], t);
}

struct PackedWeight {
  DType dtype = DType::BF16;  // storage dtype (the checkpoint's)
  WeightKind kind = WeightKind::Plain;
  int n = 0;   // logical output rows (GateUp: 2*I)
  int k = 0;   // logical reduction length
  int np = 0;  // padded rows (GateUp: 2*Ip)
  int kp = 0;  // padded k (even)
  size_t size_bytes = 0;           // codes/elements plus scales
  std::shared_ptr<uint8_t> data;  // 64-byte aligned, owned
  QFormat q = QFormat::None;      // quantized storage (dtype is then F32: what the kernels read)
  int group = 0;                  // k per scale group (quantized only)
  std::shared_ptr<uint8_t> scales;  // [np/16][kp/group][16] of scale_type (quantized only)
  ScaleType scale_type = ScaleType::F32;
  // Zero points of an int8 / int4 weight that has them (AWQ, GPTQ sym false, compressed-tensors
  // symmetric false), else null: [np/16][kp/group][16] int8 beside the scales, and the value is
  // (code - zero) * scale. The kernels multiply the codes as for a symmetric weight and the
  // GEMMs' epilogue subtracts sum over groups of scale * zero * (the group's sum of x).
  std::shared_ptr<uint8_t> zeros;
  // Input order of an int weight from an act-order checkpoint (GPTQ desc_act), else null: [k], column
  // j of the codes is input perm[j], so that each scale group is contiguous. DenseGemm and the gate_up
  // pass of GroupGemm gather x by it (a down projection's order is folded into its gate_up's rows).
  std::shared_ptr<int32_t> perm;
  const void* ptr() const { return data.get(); }
  size_t zero_bytes() const { return zeros ? static_cast<size_t>(np) * (kp / group) : 0; }
  bool quantized() const { return q != QFormat::None; }
  // The scales' bytes (zero unless quantized).
  size_t scale_bytes() const {
    return quantized() ? static_cast<size_t>(np) * (kp / group) * scale_type_size(scale_type) : 0;
  }
  // F32 scales as floats (F8 and I8 always; the caller checks scale_type otherwise).
  const float* scales_f32() const { return reinterpret_cast<const float*>(scales.get()); }
  // k rounded up to even: the reduction length the kernels run (kp may be padded further to a
  // multiple of a quantized weight's group; those codes are zero and are skipped).
  int k_even() const { return (k + 1) / 2 * 2; }
  // Bytes of one k step of a 16-row block (16 elements or codes).
  size_t k_bytes16() const {
    return quantized() ? static_cast<size_t>(2 * qformat_bits(q)) : 16 * dtype_size(dtype);
  }
};

// Allocates an empty packed weight of the given geometry (contents zero).
std::shared_ptr<PackedWeight> alloc_packed_weight(DType dtype, WeightKind kind, int n, int k);
// Packs src [n, k] (row-major, dtype) into w; w must have been allocated with the same geometry.
// A quantized w (expert cache slots under --quantize) is filled by quantize_weight.
// use_pool = false packs on the calling thread only (the expert loader's copy thread must not
// enter the compute pool).
void pack_weight(PackedWeight& w, const void* src, DType src_dtype, bool use_pool = true);
// Packs gate [I, K] and up [I, K] into a GateUp weight of logical n = 2*I.
void pack_gate_up(PackedWeight& w, const void* gate, const void* up, DType src_dtype,
                  bool use_pool = true);
// Reads element (row, col) back as f32 (tests, debugging); quantized: the dequantised value.
float packed_weight_at(const PackedWeight& w, int row, int col);

// Quantized weights. group: k per scale (I8: 0 means one scale per output row, i.e. group = Kp;
// I4: 32 or 128; F8: the k side of the block scales, 128; FP4: 32).
// scale_type: how the scales are held; F32 for I8 and F8, any for I4 (--quantize int4: BF16), BF16
// for FP4.
std::shared_ptr<PackedWeight> alloc_quant_weight(QFormat q, int group, WeightKind kind, int n,
                                                 int k, ScaleType scale_type = ScaleType::F32);
// Quantizes src [n, k] (or gate/up [I, K] each for GateUp) with scales computed from the data:
// I8/I4 symmetric absmax per (row, group); F8 absmax / 448 per (block_rows x group) block, the
// way FP8 checkpoints are made (block_rows = 128). FP4 is not a --quantize target.
void quantize_weight(PackedWeight& w, const void* src, const void* up, DType src_dtype,
                     int block_rows = 128, bool use_pool = true);
// Packs pre-quantized checkpoint data. F8: codes [n, k] e4m3 and scale_inv [ceil(n/br),
// ceil(k/bc)] f32 with bc == w.group. FP4 (MXFP4): blocks [n, k/32, 16] bytes (two e2m1 codes
// per byte, low nibble first) and e8m0 scales [n, k/32]. For GateUp, the *_up arguments give the
// up half (same shapes with n = I); gate and up share br. use_pool = false: on the calling thread
// only (the expert loader's copy thread).
void pack_fp8_weight(PackedWeight& w, const uint8_t* codes, const float* scale_inv,
                     const uint8_t* codes_up, const float* scale_inv_up, int br, int bc,
                     bool use_pool = true);
void pack_mxfp4_weight(PackedWeight& w, const uint8_t* blocks, const uint8_t* scales,
                       const uint8_t* blocks_up, const uint8_t* scales_up);
// Packs integer codes quantized elsewhere (compressed-tensors int8 / int4 checkpoints) into an I8
// or I4 weight: codes [n, k] one signed value per byte (I4: -8..7), scales [n, ceil(k / w.group)]
// f32 (I8 per row: [n, 1]); value = code * scale. GateUp takes the up half as for FP8. Each scale
// must be exact in w.scale_type (a checkpoint's bf16 or f16 scales are), else InvalidArg.
// zeros (and zeros_up for GateUp), laid out as the scales: per (row, group) zero points, value =
// (code - zero) * scale; w gains its zeros buffer on the first such call. A weight with zero
// points takes only packs with them (and one without, only packs without).
// perm ([k], a permutation of 0..k-1, shared by gate and up): the input order of the codes' columns
// (PackedWeight::perm); a weight with one takes only packs with one.
void pack_int_weight(PackedWeight& w, const int8_t* codes, const float* scales,
                     const int8_t* codes_up, const float* scales_up, bool use_pool = true,
                     const int8_t* zeros = nullptr, const int8_t* zeros_up = nullptr,
                     const int32_t* perm = nullptr);

// ---------------------------------------------------------------------------------------------
// DenseGemm: Y[M, N] = X[M, K] * W[N, K]^T (+ bias[N]) (+= Y if accumulate).
// fast_bf16: X is rounded to bf16 and bf16 dot products are used where W is bf16 (fast mode);
// otherwise W is widened and accumulated in f32 against f32 X (reference mode).
void dense_gemm(const float* x, int m, const PackedWeight& w, float* y, const float* bias,
                bool accumulate, bool fast_bf16);

// GroupGemm, fused expert FFN for all experts of a layer in one call:
//   for each expert e with rows [offsets[e], offsets[e+1]):
//     y[r] = down_e( SiLU(gate_e(x[r])) * up_e(x[r]) )
// x: [offsets[E], H] f32, y: [offsets[E], H] f32. gate_up[e] is a GateUp weight [2I, H], down[e]
// a Plain weight [H, I]; experts with zero rows may be null. Work is split across threads by
// (expert, output tile) weighted by rows, never one expert per thread.
void group_gemm_ffn(const float* x, const int32_t* offsets, int num_experts,
                    const PackedWeight* const* gate_up, const PackedWeight* const* down, int h,
                    int inter, float* y, bool fast_bf16);

// ---------------------------------------------------------------------------------------------
// Routing.
enum class Scoring : int { Softmax = 0, Sigmoid = 1 };
enum class GroupScore : int { Max = 0, Top2Sum = 1 };  // DeepSeek-V2 group_limited_greedy / V3 noaux_tc

struct RoutingParams {
  int tokens = 0;
  int num_experts = 0;
  int top_k = 1;
  Scoring scoring = Scoring::Softmax;
  const float* bias = nullptr;  // [E] score-correction bias: used to choose experts, not as weight
  int n_group = 1;              // group-limited top-k when n_group > 1
  int topk_group = 1;
  GroupScore group_score = GroupScore::Max;
  bool renormalize = false;     // weights /= sum of the chosen k weights
  float scale = 1.0f;           // routed scaling factor, applied last
};

// logits [T, E] -> ids [T, k] (chosen experts, best selection score first, ties to the lower id),
// weights [T, k], counts [E] (tokens routed to each expert; overwritten).
void route(const float* logits, const RoutingParams& p, int32_t* ids, float* weights,
           int32_t* counts);

// Permute token rows into expert-contiguous order (stable: by expert, then token, then slot).
// x [T, H] -> x_perm [T*k, H]; perm_index [T*k]: row of x_perm holding (t, j); offsets [E+1].
void permute_rows(const float* x, int tokens, int h, const int32_t* ids, int top_k,
                  int num_experts, float* x_perm, int32_t* perm_index, int32_t* offsets);
// out[t] (+)= sum_j weights[t, j] * y_perm[perm_index[t*k + j]]
void unpermute_combine(const float* y_perm, const int32_t* perm_index, const float* weights,
                       int tokens, int top_k, int h, float* out, bool accumulate);

// ---------------------------------------------------------------------------------------------
// Elementwise and normalisation.
// out = x / sqrt(mean(x^2) + eps) * w   (row by row over dim). With residual != null:
// residual += x first, then the normalised residual is written to out. out may alias x.
void rms_norm(const float* x, int rows, int dim, const float* w, float eps, float* out,
              float* residual);

// Rotary embedding in place on x viewed as [T rows][heads][...]: for each head, dims
// [offset, offset + rot_dim) rotate with angle pos * inv_freq[i] (i < rot_dim/2), values scaled
// by attn_scale (YaRN mscale; 1 otherwise). Rotate-half pairs (i, i + rot_dim/2); interleaved
// pairs (2i, 2i+1).
void rope(float* x, int tokens, int heads, int row_stride, int head_stride, int offset,
          const int32_t* positions, const float* inv_freq, int rot_dim, float attn_scale,
          bool interleaved);

// gu [T, 2I] (gate then up per row) -> out [T, I] = SiLU(gate) * up.
void silu_mul(const float* gu, int tokens, int inter, float* out);

// out [T, H] f32 = table[ids[t]] (table [V, H] in its checkpoint dtype).
void embedding(const void* table, DType dtype, int vocab, int h, const int32_t* ids, int tokens,
               float* out);

// Row-wise softmax or log-softmax over cols; out may alias x.
void softmax_rows(const float* x, int rows, int cols, float* out, bool log);
// The n largest values of each row, descending (ties to the lower index).
void top_n(const float* x, int rows, int cols, int n, int32_t* ids, float* vals);

// Converts n elements between dtypes (load time: f32/bf16/f16 in any direction).
void convert(const void* src, DType src_dtype, void* dst, DType dst_dtype, size_t n);
// fp8 e4m3 weight [rows, cols] with block scales scale_inv [ceil(rows/br), ceil(cols/bc)] (f32)
// -> bf16 (DeepSeek-V3 checkpoints).
void dequant_fp8_block(const uint8_t* src, const float* scale_inv, int rows, int cols,
                       int block_rows, int block_cols, uint16_t* dst);

// ---------------------------------------------------------------------------------------------
// Attention over a paged KV cache (f32). Cache layouts:
//   k_cache [num_blocks, block_size, kv_heads, dk]
//   v_cache [num_blocks, block_size, kv_heads, v_stride], values read from [v_offset, v_offset+dv)
//   (MLA passes v_cache = k_cache, v_stride = dk, v_offset = 0: the latent is both K and V).
struct AttentionParams {
  int num_seqs = 0;
  int heads = 0;
  int kv_heads = 0;
  int dk = 0;
  int dv = 0;
  int v_stride = 0;
  int v_offset = 0;
  int block_size = 16;
  int max_blocks = 0;       // columns of block_tables
  float scale = 1.0f;       // softmax scale
  int sliding_window = 0;   // 0 = none; else key positions > pos - window are visible
  int q_row_stride = 0;     // floats between token rows of q (>= heads * dk)
  KvDtype kv_dtype = KvDtype::F32;  // element type of k_cache / v_cache
  // fp8 only: static dequantisation scales per kv head ([kv_heads] f32; value = e4m3 * scale).
  const float* k_scales = nullptr;
  const float* v_scales = nullptr;
  // [heads] learned logit per query head that joins the softmax denominator only (gpt-oss
  // attention sinks): out = sum_j e^(s_j) v_j / (sum_j e^(s_j) + e^(sink)). nullptr = none.
  const float* sinks = nullptr;
};

// seq_info [num_seqs, 3]: (q_start, q_len, ctx_len): the sequence's new tokens are q rows
// [q_start, q_start + q_len) at positions ctx_len - q_len + i; keys 0..ctx_len-1 are in the cache.
// out [T, heads, dv]. Causal.
// The cache holds p.kv_dtype elements; the kernel reads them directly (a key block is widened to
// f32 in registers or L1, then the same f32 arithmetic runs as for an f32 cache holding the
// dequantised values: results are bit-identical to that).
void paged_attention(const float* q, const void* k_cache, const void* v_cache,
                     const int32_t* seq_info, const int32_t* block_tables,
                     const AttentionParams& p, float* out);

// Writes k [T, kv_heads, dk] and (optionally) v [T, kv_heads, dv] at cache slots
// slots[t] = block * block_size + offset (negative: skipped).
// The cache holds `dtype` elements: bf16 rounds to nearest even, fp8 stores e4m3(x / scale[head])
// rounded to nearest even and saturated to +-448 (k_scales / v_scales [kv_heads], fp8 only).
void kv_cache_write(const float* k, const float* v, int tokens, const int32_t* slots,
                    void* k_cache, void* v_cache, int kv_heads, int dk, int dv, int v_stride,
                    KvDtype dtype = KvDtype::F32, const float* k_scales = nullptr,
                    const float* v_scales = nullptr);

// ---------------------------------------------------------------------------------------------
// Gated DeltaNet (Qwen3-Next / Qwen3.5 linear attention), f32, semantics of transformers'
// qwen3_next (torch_causal_conv1d_update / causal_conv1d_fn, l2norm, torch_chunk_gated_delta_rule,
// torch_recurrent_gated_delta_rule, Qwen3NextRMSNormGated). native/cpu/deltanet.cc.

// Depthwise causal conv over time: x [T, C] row-major, weight [C, K] (HF conv1d.weight squeezed),
// bias [C] or null, conv_state [C, K-1] in/out: the last K-1 inputs of each channel, oldest first
// (zeros for a new sequence), so calls continue a sequence. out [T, C] = conv (+ bias), then SiLU
// when silu. out may alias x. Per channel the arithmetic is the same whatever the split of the
// sequence into calls: split calls equal one call bit for bit.
void causal_conv1d(const float* x, int tokens, int channels, const float* weight,
                   const float* bias, int kernel, float* conv_state, bool silu, float* out);

// A batch of sequences in one call: sequence b owns rows [seq_starts[b], seq_starts[b+1]) of x
// and out and the state at state_pool + slots[b] * C * (K-1). Slots are distinct. Each sequence
// gets exactly the arithmetic of causal_conv1d alone.
void causal_conv1d_batch(const float* x, int tokens, int channels, const float* weight,
                         const float* bias, int kernel, float* state_pool, const int32_t* slots,
                         const int32_t* seq_starts, int num_seqs, bool silu, float* out);

struct DeltaRuleParams {
  int tokens = 0;        // T (all sequences of a batch together)
  int hk = 0;            // q/k heads
  int hv = 0;            // v heads (a multiple of hk; v head h reads q/k head h / (hv / hk))
  int dk = 0;
  int dv = 0;
  bool l2norm_qk = true; // q, k = x * rsqrt(sum(x^2) + 1e-6) first
  int chunk = 64;        // chunk length of the chunkwise (T > 1) algorithm
  int q_stride = 0;      // floats between token rows of q (>= hk * dk); 0 = hk * dk
  int k_stride = 0;      // of k (>= hk * dk); 0 = hk * dk
  int v_stride = 0;      // of v (>= hv * dv); 0 = hv * dv
};

// One sequence: q [T, hk, dk], k [T, hk, dk], v [T, hv, dv] (rows p.*_stride apart), g [T, hv]
// (log decay, <= 0), beta [T, hv], state [hv, dk, dv] in/out (HF's recurrent_state layout),
// out [T, hv, dv]. q is scaled by dk^-0.5 after the l2norm. T == 1 runs the recurrent step;
// T > 1 the chunkwise (UT transform) algorithm in chunks of p.chunk, in f32. Threaded over heads.
void gated_delta_rule(const float* q, const float* k, const float* v, const float* g,
                      const float* beta, float* state, float* out, const DeltaRuleParams& p);

// A batch of sequences: sequence b owns token rows [seq_starts[b], seq_starts[b+1]) and the
// state at state_pool + slots[b] * hv * dk * dv (slots distinct). Threaded over (sequence, head);
// each (sequence, head) runs exactly the arithmetic of gated_delta_rule on that sequence alone,
// so batched equals alone bit for bit (decode at batch B: B recurrent steps in one call).
void gated_delta_rule_batch(const float* q, const float* k, const float* v, const float* g,
                            const float* beta, float* state_pool, const int32_t* slots,
                            const int32_t* seq_starts, int num_seqs, float* out,
                            const DeltaRuleParams& p);

// Qwen3NextRMSNormGated: out = (w * (x * rsqrt(mean(x^2) + eps))) * SiLU(z), row by row over dim
// (the weight as is, not 1 + w). x, z, out [rows, dim]; out may alias x.
void gated_rms_norm(const float* x, const float* z, const float* w, float eps, int rows, int dim,
                    float* out);

}  // namespace expertd
