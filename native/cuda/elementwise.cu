// Elementwise and row ops on the device (f32 activations): RMSNorm (+residual), RoPE (rotate-half,
// interleaved, partial, offset), SiLU*mul, embedding gather, softmax/log-softmax, top-n, dtype
// conversion. Roundings follow native/cpu's versions (sums in double, products not fused).
#include <algorithm>

#include "cuda_common.h"

namespace expertd::cuda {
namespace {

// Block-wide sum of a double (blockDim.x a multiple of 32, <= 1024). All threads get the result.
__device__ double block_sum(double v, double* sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();  // sh may still be read by a previous call
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  double r = 0.0;
  for (int w = 0; w < warps; ++w) r += sh[w];
  return r;
}

__device__ float block_max(float v, float* sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  float r = -INFINITY;
  for (int w = 0; w < warps; ++w) r = fmaxf(r, sh[w]);
  return r;
}

__global__ void rms_norm_kernel(const float* x, int dim, const float* w, float eps, float* out,
                                float* residual) {
  __shared__ double sh[32];
  const size_t row = blockIdx.x;
  const float* xr = x + row * dim;
  float* rr = residual ? residual + row * dim : nullptr;
  double ss = 0.0;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    float v = xr[i];
    if (rr) {
      v = __fadd_rn(rr[i], v);
      rr[i] = v;
    }
    ss += static_cast<double>(v) * v;
  }
  ss = block_sum(ss, sh);
  const float var = static_cast<float>(ss / dim);
  const float r = 1.0f / sqrtf(var + eps);
  const float* src = rr ? rr : xr;
  float* o = out + row * dim;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = __fmul_rn(w[i], __fmul_rn(src[i], r));
}

// One block per token: cos/sin of the f32 angle computed in double (as the CPU), then every head.
__global__ void rope_kernel(float* x, int heads, int row_stride, int head_stride, int offset,
                            const int32_t* positions, const float* inv_freq, int half,
                            float attn_scale, int interleaved) {
  extern __shared__ float cs[];  // [2][half]
  const int t = blockIdx.x;
  const float pos = static_cast<float>(positions[t]);
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float angle = __fmul_rn(pos, inv_freq[i]);
    cs[i] = __fmul_rn(static_cast<float>(cos(static_cast<double>(angle))), attn_scale);
    cs[half + i] = __fmul_rn(static_cast<float>(sin(static_cast<double>(angle))), attn_scale);
  }
  __syncthreads();
  float* row = x + static_cast<size_t>(t) * row_stride + offset;
  for (int u = threadIdx.x; u < heads * half; u += blockDim.x) {
    const int hd = u / half, i = u % half;
    float* v = row + static_cast<size_t>(hd) * head_stride;
    const int ia = interleaved ? 2 * i : i, ib = interleaved ? 2 * i + 1 : i + half;
    const float a = v[ia], b = v[ib], c = cs[i], s = cs[half + i];
    v[ia] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    v[ib] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
  }
}

__global__ void silu_mul_kernel(const float* gu, int tokens, int inter, float* out) {
  const size_t n = static_cast<size_t>(tokens) * inter;
  for (size_t u = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; u < n;
       u += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t t = u / inter, i = u % inter;
    const float g = gu[t * 2 * inter + i], up = gu[t * 2 * inter + inter + i];
    out[u] = __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), up);
  }
}

__device__ __forceinline__ float load_as_f32(const void* p, size_t i, int dtype) {
  if (dtype == static_cast<int>(DType::F32)) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  if (dtype == static_cast<int>(DType::BF16)) return bf16_bits_to_f32(h);
  return __half2float(__ushort_as_half(h));
}

__global__ void embedding_kernel(const void* table, int dtype, int vocab, int h,
                                 const int32_t* ids, float* out) {
  const int t = blockIdx.x;
  const int id = ids[t];
  float* o = out + static_cast<size_t>(t) * h;
  const bool ok = id >= 0 && id < vocab;  // ids live on the device: a bad one poisons its row
  for (int c = threadIdx.x; c < h; c += blockDim.x)
    o[c] = ok ? load_as_f32(table, static_cast<size_t>(id) * h + c, dtype) : __int_as_float(0x7fc00000);
}

__global__ void softmax_kernel(const float* x, int cols, float* out, int log) {
  __shared__ double shd[32];
  __shared__ float shf[32];
  const size_t row = blockIdx.x;
  const float* xr = x + row * cols;
  float* o = out + row * cols;
  float mx = -INFINITY;
  for (int i = threadIdx.x; i < cols; i += blockDim.x) mx = fmaxf(mx, xr[i]);
  mx = block_max(mx, shf);
  double s = 0.0;
  for (int i = threadIdx.x; i < cols; i += blockDim.x) {
    const float e = expf(xr[i] - mx);
    if (!log) o[i] = e;
    s += e;
  }
  s = block_sum(s, shd);
  if (log) {
    const float lse = static_cast<float>(::log(s));
    for (int i = threadIdx.x; i < cols; i += blockDim.x) o[i] = (xr[i] - mx) - lse;
  } else {
    const float inv = static_cast<float>(1.0 / s);
    for (int i = threadIdx.x; i < cols; i += blockDim.x) o[i] *= inv;
  }
}

// n rounds of a block argmax; round j takes the best element ranked after round j-1's pick (a
// strict total order, so nothing needs marking).
__global__ void top_n_kernel(const float* x, int cols, int n, int32_t* ids, float* vals) {
  __shared__ float sv[32];
  __shared__ int si[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const size_t row = blockIdx.x;
  const float* xr = x + row * cols;
  float pv = 0.0f;
  int pi = -1;
  for (int j = 0; j < n; ++j) {
    float bv = 0.0f;
    int bi = -1;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
      const float v = xr[i];
      if (pi >= 0 && !rank_before(pv, pi, v, i)) continue;
      if (bi < 0 || rank_before(v, i, bv, bi)) bv = v, bi = i;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (oi >= 0 && (bi < 0 || rank_before(ov, oi, bv, bi))) bv = ov, bi = oi;
    }
    __syncthreads();
    if (lane == 0) sv[warp] = bv, si[warp] = bi;
    __syncthreads();
    bv = 0.0f;
    bi = -1;
    for (int w = 0; w < warps; ++w)
      if (si[w] >= 0 && (bi < 0 || rank_before(sv[w], si[w], bv, bi))) bv = sv[w], bi = si[w];
    if (threadIdx.x == 0) {
      ids[row * n + j] = bi;
      vals[row * n + j] = bv;
    }
    pv = bv;
    pi = bi;
  }
}

__device__ __forceinline__ uint16_t f32_to_f16_bits(float f) {
  if (f != f) return static_cast<uint16_t>(((__float_as_uint(f) >> 16) & 0x8000u) | 0x7e00u);
  return __half_as_ushort(__float2half_rn(f));
}

__global__ void convert_kernel(const void* src, int sd, void* dst, int dd, size_t n) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const float v = load_as_f32(src, i, sd);
    if (dd == static_cast<int>(DType::F32))
      static_cast<float*>(dst)[i] = v;
    else if (dd == static_cast<int>(DType::BF16))
      static_cast<uint16_t*>(dst)[i] = f32_to_bf16_bits(v);
    else
      static_cast<uint16_t*>(dst)[i] = f32_to_f16_bits(v);
  }
}

unsigned grid_stride_blocks(size_t n) {
  return static_cast<unsigned>(std::min<size_t>(blocks_for(n, 256), 65535 * 8));
}

int row_threads(int cols) { return std::min(1024, std::max(32, (cols + 31) / 32 * 32)); }

}  // namespace

void rms_norm(const float* x, int rows, int dim, const float* w, float eps, float* out,
              float* residual, Stream s) {
  ensure_alive();
  if (rows <= 0 || dim <= 0) return;
  rms_norm_kernel<<<rows, std::min(1024, row_threads(dim / 4)), 0, or_default(s)>>>(x, dim, w, eps, out, residual);
  EXPERTD_CUDA_LAUNCH_CHECK();
}

void rope(float* x, int tokens, int heads, int row_stride, int head_stride, int offset,
          const int32_t* positions, const float* inv_freq, int rot_dim, float attn_scale,
          bool interleaved, Stream s) {
  ensure_alive();
  const int half = rot_dim / 2;
  if (tokens <= 0 || heads <= 0 || half <= 0) return;
  EXPERTD_CHECK(rot_dim <= 4096, ErrorCode::InvalidArg,
                "rope: rot_dim " + std::to_string(rot_dim) + " > 4096 (cos/sin live in shared memory)");
  EXPERTD_CHECK(heads == 1 || head_stride >= rot_dim, ErrorCode::InvalidArg,
                "rope: heads overlap (head_stride < rot_dim)");
  rope_kernel<<<tokens, std::min(256, row_threads(heads * half)), sizeof(float) * 2 * half,
                or_default(s)>>>(x, heads, row_stride, head_stride, offset, positions, inv_freq,
                                 half, attn_scale, interleaved ? 1 : 0);
  EXPERTD_CUDA_LAUNCH_CHECK();
}

void silu_mul(const float* gu, int tokens, int inter, float* out, Stream s) {
  ensure_alive();
  const size_t n = static_cast<size_t>(tokens) * inter;
  if (n == 0) return;
  silu_mul_kernel<<<grid_stride_blocks(n), 256, 0, or_default(s)>>>(gu, tokens, inter, out);
  EXPERTD_CUDA_LAUNCH_CHECK();
}

void embedding(const void* table, DType dtype, int vocab, int h, const int32_t* ids, int tokens,
               float* out, Stream s) {
  ensure_alive();
  if (tokens <= 0 || h <= 0) return;
  embedding_kernel<<<tokens, std::min(256, row_threads(h)), 0, or_default(s)>>>(
      table, static_cast<int>(dtype), vocab, h, ids, out);
  EXPERTD_CUDA_LAUNCH_CHECK();
}

void softmax_rows(const float* x, int rows, int cols, float* out, bool log, Stream s) {
  ensure_alive();
  if (rows <= 0 || cols <= 0) return;
  softmax_kernel<<<rows, row_threads(cols / 8), 0, or_default(s)>>>(x, cols, out, log ? 1 : 0);
  EXPERTD_CUDA_LAUNCH_CHECK();
}

void top_n(const float* x, int rows, int cols, int n, int32_t* ids, float* vals, Stream s) {
  ensure_alive();
  if (rows <= 0 || n <= 0) return;
  top_n_kernel<<<rows, row_threads(cols / 8), 0, or_default(s)>>>(x, cols, n, ids, vals);
  EXPERTD_CUDA_LAUNCH_CHECK();
}

void convert(const void* src, DType src_dtype, void* dst, DType dst_dtype, size_t n, Stream s) {
  ensure_alive();
  if (n == 0) return;
  convert_kernel<<<grid_stride_blocks(n), 256, 0, or_default(s)>>>(
      src, static_cast<int>(src_dtype), dst, static_cast<int>(dst_dtype), n);
  EXPERTD_CUDA_LAUNCH_CHECK();
}

}  // namespace expertd::cuda
