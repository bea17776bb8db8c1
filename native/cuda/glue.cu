// Glue for the device engine: a reference-precision f32 GEMM on CUDA cores (routers, gates, odd
// shapes), y += x, the sigmoid-gated add of Qwen2-MoE's shared expert, OLMoE's clamp, Qwen3-Next's
// sigmoid output gate and Gated DeltaNet step/decay gates, strided 2-D copies and a row-range copy
// whose bounds are read on the device (the engine's expert offsets).
//
// Roundings (the contract test/cuda.test.ts checks against float64 references):
//   gemm_f32:  per output, p_k = f32(x[r,k] * w[c,k]) (bf16 w widened exactly), the p_k summed in
//              double (lane-strided partial sums, then a butterfly: the order differs from a
//              sequential sum only at double precision), then in double
//              s = accumulate ? y : 0;  s += bias[c] (if any);  s += sum;  y = f32(s) (one rounding)
//   add:       y = f32(y + x)
//   gated_add: g = 1 / (1 + exp(-gate[t])) in double; out = f32(out + g * y) in double (one
//              rounding: the CPU engine's own arithmetic in JS numbers)
//   clamp:     x > limit -> limit, x < -limit -> -limit, NaN kept
//   sigmoid_mul: x = f32(x * (1 / (1 + exp(-gate)))) in double (Qwen3-Next's attention output gate)
//   delta_gates: beta = f32(1 / (1 + exp(-b))) in double; g = f32(negA * softplus(f32(a + dt_bias)))
//              with softplus(v) = v > 20 ? v : log1p(exp(v)) in double (the CPU engine's arithmetic)
#include <algorithm>

#include "cuda_common.h"

namespace expertd::cuda {
namespace {

constexpr int kGemmCols = 4;    // outputs of one row per warp (x read once for all four)
constexpr int kGemmWarps = 8;   // warps per block

__device__ __forceinline__ float w_as_f32(const float* w, size_t i) { return w[i]; }
__device__ __forceinline__ float w_as_f32(const uint16_t* w, size_t i) {
  return bf16_bits_to_f32(w[i]);
}

__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Warp task u = (row r, column group g): outputs y[r, 4g .. 4g+3] (fewer at the right edge).
template <typename W>
__global__ void gemm_f32_kernel(const float* __restrict__ x, int m, const W* __restrict__ w, int n,
                                int k, float* __restrict__ y, const float* __restrict__ bias,
                                int accumulate) {
  const int lane = threadIdx.x & 31;
  const size_t groups = (static_cast<size_t>(n) + kGemmCols - 1) / kGemmCols;
  const size_t tasks = static_cast<size_t>(m) * groups;
  const size_t warps = static_cast<size_t>(gridDim.x) * (blockDim.x >> 5);
  for (size_t u = static_cast<size_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
       u < tasks; u += warps) {
    const size_t r = u / groups;
    const int c0 = static_cast<int>(u % groups) * kGemmCols;
    const int cols = min(kGemmCols, n - c0);
    const float* xr = x + r * k;
    const W* wr = w + static_cast<size_t>(c0) * k;
    double acc[kGemmCols] = {};
    for (int i = lane; i < k; i += 32) {
      const float xv = xr[i];
#pragma unroll
      for (int j = 0; j < kGemmCols; ++j)
        if (j < cols) acc[j] += static_cast<double>(__fmul_rn(xv, w_as_f32(wr, static_cast<size_t>(j) * k + i)));
    }
#pragma unroll
    for (int j = 0; j < kGemmCols; ++j) acc[j] = warp_sum_f64(acc[j]);
    if (lane < cols) {
      // Select this lane's sum without dynamic indexing (keeps acc in registers).
      double sum = acc[0];
#pragma unroll
      for (int j = 1; j < kGemmCols; ++j)
        if (lane == j) sum = acc[j];
      const size_t o = r * n + c0 + lane;
      double s = accumulate ? static_cast<double>(y[o]) : 0.0;
      if (bias) s += static_cast<double>(bias[c0 + lane]);
      s += sum;
      y[o] = static_cast<float>(s);
    }
  }
}

__global__ void add_kernel(float* __restrict__ y, const float* __restrict__ x, size_t n) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    y[i] = __fadd_rn(y[i], x[i]);
}

// Rows by blocks (grid-stride), columns by threads: one sigmoid per row and thread.
__global__ void gated_add_kernel(float* __restrict__ out, const float* __restrict__ y,
                                 const float* __restrict__ gate, int t, int h) {
  for (int r = blockIdx.x; r < t; r += gridDim.x) {
    const double g = 1.0 / (1.0 + exp(-static_cast<double>(gate[r])));
    const size_t base = static_cast<size_t>(r) * h;
    for (int i = threadIdx.x; i < h; i += blockDim.x)
      out[base + i] = static_cast<float>(static_cast<double>(out[base + i]) + g * static_cast<double>(y[base + i]));
  }
}

__global__ void clamp_kernel(float* x, size_t n, float limit) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const float v = x[i];
    if (v > limit) x[i] = limit;
    else if (v < -limit) x[i] = -limit;
  }
}

__global__ void sigmoid_mul_kernel(float* __restrict__ x, const float* __restrict__ gate, size_t n) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    x[i] = static_cast<float>(static_cast<double>(x[i]) * (1.0 / (1.0 + exp(-static_cast<double>(gate[i])))));
}

// Thread per (token, value head); ba rows are [b (hv) | a (hv)].
__global__ void delta_gates_kernel(const float* __restrict__ ba, int t, int hv,
                                   const float* __restrict__ neg_a, const float* __restrict__ dt_bias,
                                   float* __restrict__ g, float* __restrict__ beta) {
  const size_t n = static_cast<size_t>(t) * hv;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t r = i / hv;
    const int h = static_cast<int>(i % hv);
    const float* row = ba + r * 2 * hv;
    beta[i] = static_cast<float>(1.0 / (1.0 + exp(-static_cast<double>(row[h]))));
    const double v = static_cast<double>(__fadd_rn(row[hv + h], dt_bias[h]));
    const double sp = v > 20.0 ? v : log1p(exp(v));
    g[i] = static_cast<float>(static_cast<double>(neg_a[h]) * sp);
  }
}

// Words [r0 * words_per_row, r1 * words_per_row) with r0 = offsets[lo], r1 = offsets[hi] clamped
// to [0, max_rows] (the offsets live on the device; a bad pair copies nothing, never out of range).
template <typename Word>
__global__ void copy_row_range_kernel(Word* __restrict__ dst, const Word* __restrict__ src,
                                      const int32_t* __restrict__ offsets, int lo, int hi,
                                      size_t words_per_row, int max_rows) {
  const int r0 = max(0, min(offsets[lo], max_rows));
  const int r1 = max(0, min(offsets[hi], max_rows));
  if (r1 <= r0) return;
  const size_t end = static_cast<size_t>(r1) * words_per_row;
  for (size_t i = static_cast<size_t>(r0) * words_per_row + blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x;
       i < end; i += static_cast<size_t>(gridDim.x) * blockDim.x)
    dst[i] = src[i];
}

unsigned grid_stride_blocks(size_t n) {
  return static_cast<unsigned>(std::min<size_t>(std::max<size_t>(blocks_for(n, 256), 1), 65535 * 8));
}

template <typename Word>
void launch_copy_rows(void* dst, const void* src, const int32_t* offsets, int lo, int hi,
                      size_t row_bytes, int max_rows, Stream s) {
  const size_t wpr = row_bytes / sizeof(Word);
  copy_row_range_kernel<Word><<<grid_stride_blocks(wpr * max_rows), 256, 0, or_default(s)>>>(
      static_cast<Word*>(dst), static_cast<const Word*>(src), offsets, lo, hi, wpr, max_rows);
  EXPERTD_CUDA_LAUNCH_CHECK();
}

}  // namespace

void gemm_f32(const float* x, int m, const void* w, DType w_dtype, int n, int k, float* y,
              const float* bias, bool accumulate, Stream s) {
  ensure_alive();
  if (m <= 0 || n <= 0) return;
  if (w_dtype != DType::F32 && w_dtype != DType::BF16)
    fail(ErrorCode::InvalidArg, "gemm_f32: w must be f32 or bf16");
  const size_t tasks = static_cast<size_t>(m) * ((n + kGemmCols - 1) / kGemmCols);
  const unsigned blocks = static_cast<unsigned>(
      std::min<size_t>((tasks + kGemmWarps - 1) / kGemmWarps, size_t{1} << 20));
  if (w_dtype == DType::F32)
    gemm_f32_kernel<float><<<blocks, 32 * kGemmWarps, 0, or_default(s)>>>(
        x, m, static_cast<const float*>(w), n, k, y, bias, accumulate ? 1 : 0);
  else
    gemm_f32_kernel<uint16_t><<<blocks, 32 * kGemmWarps, 0, or_default(s)>>>(
        x, m, static_cast<const uint16_t*>(w), n, k, y, bias, accumulate ? 1 : 0);
  EXPERTD_CUDA_LAUNCH_CHECK();
}

void add(float* y, const float* x, size_t n, Stream s) {
  ensure_alive();
  if (n == 0) return;
  add_kernel<<<grid_stride_blocks(n), 256, 0, or_default(s)>>>(y, x, n);
  EXPERTD_CUDA_LAUNCH_CHECK();
}

void gated_add(float* out, const float* y, const float* gate, int t, int h, Stream s) {
  ensure_alive();
  if (t <= 0 || h <= 0) return;
  const unsigned threads = static_cast<unsigned>(std::min(256, std::max(32, (h + 31) / 32 * 32)));
  gated_add_kernel<<<static_cast<unsigned>(std::min(t, 65535 * 8)), threads, 0, or_default(s)>>>(
      out, y, gate, t, h);
  EXPERTD_CUDA_LAUNCH_CHECK();
}

void clamp(float* x, size_t n, float limit, Stream s) {
  ensure_alive();
  if (n == 0) return;
  clamp_kernel<<<grid_stride_blocks(n), 256, 0, or_default(s)>>>(x, n, limit);
  EXPERTD_CUDA_LAUNCH_CHECK();
}

void sigmoid_mul(float* x, const float* gate, size_t n, Stream s) {
  ensure_alive();
  if (n == 0) return;
  sigmoid_mul_kernel<<<grid_stride_blocks(n), 256, 0, or_default(s)>>>(x, gate, n);
  EXPERTD_CUDA_LAUNCH_CHECK();
}

void delta_gates(const float* ba, int t, int hv, const float* neg_a, const float* dt_bias, float* g,
                 float* beta, Stream s) {
  ensure_alive();
  if (t <= 0 || hv <= 0) return;
  delta_gates_kernel<<<grid_stride_blocks(static_cast<size_t>(t) * hv), 256, 0, or_default(s)>>>(
      ba, t, hv, neg_a, dt_bias, g, beta);
  EXPERTD_CUDA_LAUNCH_CHECK();
}

void copy_2d(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width_bytes,
             size_t rows, Stream s) {
  ensure_alive();
  if (width_bytes == 0 || rows == 0) return;
  EXPERTD_CUDA_CHECK(cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width_bytes, rows,
                                       cudaMemcpyDeviceToDevice, or_default(s)));
}

void copy_row_range(void* dst, const void* src, const int32_t* offsets, int lo, int hi,
                    size_t row_bytes, int max_rows, Stream s) {
  ensure_alive();
  if (row_bytes == 0 || max_rows <= 0) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) | row_bytes;
  if (a % 16 == 0)
    launch_copy_rows<uint4>(dst, src, offsets, lo, hi, row_bytes, max_rows, s);
  else if (a % 4 == 0)
    launch_copy_rows<uint32_t>(dst, src, offsets, lo, hi, row_bytes, max_rows, s);
  else
    launch_copy_rows<uint8_t>(dst, src, offsets, lo, hi, row_bytes, max_rows, s);
}

}  // namespace expertd::cuda
