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

struct PackedWeight {
  DType dtype = DType::BF16;  // storage dtype (the checkpoint's)
  WeightKind kind = WeightKind::Plain;
  int n = 0;   // logical output rows (GateUp: 2*I)
  int k = 0;   // logical reduction length
  int np = 0;  // padded rows (GateUp: 2*Ip)
  int kp = 0;  // padded k (even)
  size_t size_bytes = 0;
  std::shared_ptr<uint8_t> data;  // 64-byte aligned, owned
  const void* ptr() const { return data.get(); }
};

// Allocates an empty packed weight of the given geometry (contents zero).
std::shared_ptr<PackedWeight> alloc_packed_weight(DType dtype, WeightKind kind, int n, int k);
// Packs src [n, k] (row-major, dtype) into w; w must have been allocated with the same geometry.
// use_pool = false packs on the calling thread only (the expert loader's copy thread must not
// enter the compute pool).
void pack_weight(PackedWeight& w, const void* src, DType src_dtype, bool use_pool = true);
// Packs gate [I, K] and up [I, K] into a GateUp weight of logical n = 2*I.
void pack_gate_up(PackedWeight& w, const void* gate, const void* up, DType src_dtype,
                  bool use_pool = true);
// Reads element (row, col) back as f32 (tests, debugging).
float packed_weight_at(const PackedWeight& w, int row, int col);

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
  // [heads] learned logit per query head that joins the softmax denominator only (gpt-oss
  // attention sinks): out = sum_j e^(s_j) v_j / (sum_j e^(s_j) + e^(sink)). nullptr = none.
  const float* sinks = nullptr;
};

// seq_info [num_seqs, 3]: (q_start, q_len, ctx_len): the sequence's new tokens are q rows
// [q_start, q_start + q_len) at positions ctx_len - q_len + i; keys 0..ctx_len-1 are in the cache.
// out [T, heads, dv]. Causal.
void paged_attention(const float* q, const float* k_cache, const float* v_cache,
                     const int32_t* seq_info, const int32_t* block_tables,
                     const AttentionParams& p, float* out);

// Writes k [T, kv_heads, dk] and (optionally) v [T, kv_heads, dv] at cache slots
// slots[t] = block * block_size + offset (negative: skipped).
void kv_cache_write(const float* k, const float* v, int tokens, const int32_t* slots,
                    float* k_cache, float* v_cache, int kv_heads, int dk, int dv, int v_stride);

}  // namespace expertd
