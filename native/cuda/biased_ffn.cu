// gpt-oss's experts on the device: gate_up and down projections with per-expert biases and the
// clamped SwiGLU between them, as two plain GroupGemm passes (group_gemm.cu) with a bias+activation
// kernel and a bias kernel around them (bf16 tables; quantized ones through the dequantising
// GroupGemm's plain pass, group_gemm_quant.cu); and the clamped SwiGLU alone for the per-expert
// dense path.
#include <algorithm>

#include "cuda_common.h"
#include "expertd/cuda_quant.h"

namespace expertd::cuda {
namespace {

// The f32 contract (the emulator's clampedSwigluF32): g = min(gate, limit), u = clamp(up, +-limit),
// h = (u + 1) * (g / (1 + e^(-alpha g))), each operation rounded to f32 once (expf as the
// device has it).
__device__ __forceinline__ float clamped_swiglu(float gate, float up, float alpha, float limit) {
  const float g = fminf(gate, limit);
  const float u = fminf(fmaxf(up, -limit), limit);
  const float glu = __fdiv_rn(g, __fadd_rn(1.0f, expf(__fmul_rn(-alpha, g))));
  return __fmul_rn(__fadd_rn(u, 1.0f), glu);
}

// The expert of row r: the e with offsets[e] <= r < offsets[e + 1], or -1 past offsets[E].
__device__ int expert_of_row(const int32_t* offsets, int num_experts, int r) {
  if (r < offsets[0] || r >= offsets[num_experts]) return -1;
  int lo = 0, hi = num_experts - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= r) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// One block per row (grid-stride): h [r, :I] bf16 = act(gu [r, :I] + bias_e[:I], gu [r, I:] + bias_e[I:]).
// weights: the table's pointers (bf16 or quantized), read for the empty-slot test only.
__global__ void biased_swiglu_kernel(const float* gu, const int32_t* offsets,
                                     const void* const* weights, int num_experts,
                                     const float* bias, int rows, int inter, float alpha,
                                     float limit, uint16_t* h) {
  __shared__ int s_e;
  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    __syncthreads();
    if (threadIdx.x == 0) s_e = expert_of_row(offsets, num_experts, r);
    __syncthreads();
    const int e = s_e;
    // NOTE: the empty-slot contract of group_gemm_ffn: rows of an expert without weights (and rows
    // past offsets[E]) keep their contents.
    if (e < 0 || weights[e] == nullptr) continue;
    const float* row = gu + static_cast<size_t>(r) * 2 * inter;
    const float* b = bias + static_cast<size_t>(e) * 2 * inter;
    for (int i = threadIdx.x; i < inter; i += blockDim.x) {
      const float g = __fadd_rn(row[i], b[i]), u = __fadd_rn(row[inter + i], b[inter + i]);
      h[static_cast<size_t>(r) * inter + i] = f32_to_bf16_bits(clamped_swiglu(g, u, alpha, limit));
    }
  }
}

// y [r, :] += bias_e [:] for the rows of every expert with weights.
__global__ void expert_bias_add_kernel(float* y, const int32_t* offsets,
                                       const void* const* weights, int num_experts,
                                       const float* bias, int rows, int n) {
  __shared__ int s_e;
  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    __syncthreads();
    if (threadIdx.x == 0) s_e = expert_of_row(offsets, num_experts, r);
    __syncthreads();
    const int e = s_e;
    if (e < 0 || weights[e] == nullptr) continue;
    float* row = y + static_cast<size_t>(r) * n;
    const float* b = bias + static_cast<size_t>(e) * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) row[i] = __fadd_rn(row[i], b[i]);
  }
}

__global__ void clamped_swiglu_kernel(const float* gu, int tokens, int inter, float alpha,
                                      float limit, float* out) {
  const size_t n = static_cast<size_t>(tokens) * inter;
  for (size_t u = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; u < n;
       u += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t t = u / inter, i = u % inter;
    out[u] = clamped_swiglu(gu[t * 2 * inter + i], gu[t * 2 * inter + inter + i], alpha, limit);
  }
}

unsigned row_blocks(int rows) { return static_cast<unsigned>(std::min(rows, 1 << 16)); }

// The bias + clamped-SwiGLU kernel and the down bias kernel around two plain passes `pass`.
template <typename Pass>
void biased_ffn(const int32_t* offsets, const void* const* gate_up, const void* const* down,
                int num_experts, int rows, int hidden, int inter, const float* gate_up_bias,
                const float* down_bias, float alpha, float limit, float* gu_scratch,
                uint16_t* h_scratch, float* y, Stream s, Pass pass) {
  pass(true);
  biased_swiglu_kernel<<<row_blocks(rows), 128, 0, s>>>(gu_scratch, offsets, gate_up, num_experts,
                                                        gate_up_bias, rows, inter, alpha, limit,
                                                        h_scratch);
  EXPERTD_CUDA_LAUNCH_CHECK();
  pass(false);
  expert_bias_add_kernel<<<row_blocks(rows), 128, 0, s>>>(y, offsets, down, num_experts, down_bias,
                                                          rows, hidden);
  EXPERTD_CUDA_LAUNCH_CHECK();
}

}  // namespace

void group_gemm_biased_ffn(const uint16_t* x, const int32_t* offsets,
                           const uint16_t* const* gate_up, const uint16_t* const* down,
                           int num_experts, int rows, int hidden, int inter,
                           const float* gate_up_bias, const float* down_bias, float alpha,
                           float limit, float* gu_scratch, uint16_t* h_scratch, float* y,
                           Stream s) {
  ensure_alive();
  if (rows <= 0) return;
  s = or_default(s);
  biased_ffn(offsets, reinterpret_cast<const void* const*>(gate_up),
             reinterpret_cast<const void* const*>(down), num_experts, rows, hidden, inter,
             gate_up_bias, down_bias, alpha, limit, gu_scratch, h_scratch, y, s, [&](bool gu) {
               GroupGemmParams g;
               g.x = gu ? x : h_scratch;
               g.offsets = offsets;
               g.weights = gu ? gate_up : down;
               g.num_experts = num_experts;
               g.rows = rows;
               g.n = gu ? 2 * inter : hidden;
               g.k = gu ? hidden : inter;
               g.out = gu ? gu_scratch : y;
               group_gemm(g, s);
             });
}

void group_gemm_biased_quant_ffn(const uint16_t* x, const int32_t* offsets,
                                 const uint8_t* const* gate_up, const uint8_t* const* down,
                                 int num_experts, int rows, int hidden, int inter,
                                 const QuantLayout& layout, const float* gate_up_bias,
                                 const float* down_bias, float alpha, float limit,
                                 float* gu_scratch, uint16_t* h_scratch, float* y, Stream s) {
  ensure_alive();
  const std::string why = quant_layout_error(layout, hidden, inter);
  EXPERTD_CHECK(why.empty(), ErrorCode::InvalidArg, "group_gemm_quant: " + why);
  if (rows <= 0) return;
  s = or_default(s);
  biased_ffn(offsets, reinterpret_cast<const void* const*>(gate_up),
             reinterpret_cast<const void* const*>(down), num_experts, rows, hidden, inter,
             gate_up_bias, down_bias, alpha, limit, gu_scratch, h_scratch, y, s, [&](bool gu) {
               if (gu)
                 group_gemm_quant_plain(x, offsets, gate_up, num_experts, rows, 2 * inter, hidden,
                                        true, layout, gu_scratch, GemmTile::Auto, s);
               else
                 group_gemm_quant_plain(h_scratch, offsets, down, num_experts, rows, hidden, inter,
                                        false, layout, y, GemmTile::Auto, s);
             });
}

void clamped_swiglu(const float* gu, int tokens, int inter, float alpha, float limit, float* out,
                    Stream s) {
  ensure_alive();
  const size_t n = static_cast<size_t>(tokens) * inter;
  if (n == 0) return;
  clamped_swiglu_kernel<<<std::min<unsigned>(blocks_for(n, 256), 65535 * 8), 256, 0, or_default(s)>>>(gu, tokens, inter, alpha,
                                                                         limit, out);
  EXPERTD_CUDA_LAUNCH_CHECK();
}

}  // namespace expertd::cuda
