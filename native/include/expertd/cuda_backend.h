// The CUDA backend's C++ surface (full build only, EXPERTD_WITH_CUDA): device memory, streams,
// events and the op launchers. Plain C++: streams are forward-declared CUDA handles, device
// memory is raw pointers; no CUDA header is needed to include this file.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "expertd/comm.h"
#include "expertd/dtype.h"
#include "expertd/ops.h"
#include "expertd/sampling.h"

struct CUstream_st;  // == cudaStream_t's pointee
struct CUevent_st;   // == cudaEvent_t's pointee

namespace expertd {

// Devices visible to this process (0 when the driver or a GPU is missing; never throws).
int cuda_device_count();
// What the runtime said when it counted the devices, for capabilities(): error is empty when
// cudaGetDeviceCount succeeded, else "cudaErrorInsufficientDriver (CUDA driver version is
// insufficient for CUDA runtime version)" and the like; versions as CUDA encodes them
// (1000 * major + 10 * minor; driver 0: no driver). Never throws.
struct CudaRuntimeStatus {
  int device_count = 0;
  std::string error;
  int driver_version = 0;
  int runtime_version = 0;
};
CudaRuntimeStatus cuda_runtime_status();
// libnccl.so.2 (or $EXPERTD_NCCL_SO) can be loaded and has the entry points expertd uses.
bool nccl_available();

// A library loaded at run time (cuBLASLt, NCCL; cuda_libs.cc): handle and the file dlopen took
// (nullptr and "" when none would do), and every candidate in order with what happened to it
// ("<path>: loaded", "<path>: <dlerror>", "<path>: has no <symbol>"), for the log.
struct LoadedLibrary {
  void* handle = nullptr;
  std::string path;
  std::vector<std::string> tried;
};
// The candidates in order: $env_var; for each soname (newest first), the pip wheels' folders under
// every Python site folder (CUDA 13: nvidia/cu13/lib; CUDA 12: nvidia/<package>/lib); then the
// sonames themselves (the loader path).
std::vector<std::string> library_candidates(const char* env_var, const std::vector<std::string>& sonames);
// The first candidate that dlopens (RTLD_NOW | RTLD_LOCAL) and has every required symbol.
LoadedLibrary load_library(const char* env_var, const std::vector<std::string>& sonames,
                           const std::vector<std::string>& required_symbols);
// The loads of cuBLASLt (dense_gemm.cc) and NCCL (nccl.cc), done once on first use.
const LoadedLibrary& cublaslt_load();
const LoadedLibrary& nccl_load();
// A sticky CUDA error (illegal address, launch failure, ...) happened: the context is unusable
// until the process restarts. Every launcher refuses to run afterwards (E_CUDA).
bool cuda_device_lost();

namespace cuda {

using Stream = CUstream_st*;
using Event = CUevent_st*;

struct DeviceInfo {
  std::string name;
  int cc_major = 0, cc_minor = 0;
  int sm_count = 0;
  size_t total_bytes = 0;
  size_t l2_bytes = 0;
  size_t smem_per_block_optin = 0;
};
DeviceInfo device_info(int device);
void set_device(int device);
int current_device();
void device_synchronize();
void mem_info(size_t* free_bytes, size_t* total_bytes);

// ---------------------------------------------------------------------------------------------
// Caching device allocator: size classes (8 per power of two, >= 512 bytes) with free lists per
// (device, stream). cudaMalloc happens only when a class's list is empty; a failed cudaMalloc
// releases the cache and retries once before E_OOM.
// NOTE: a freed block is reused only by work on the stream it was allocated for (stream order
// keeps that safe); memory used on another stream must be kept alive by the caller until that
// stream is done with it (the PyTorch recordStream contract).
struct DeviceMem {
  void* ptr = nullptr;
  size_t size = 0;      // requested bytes
  size_t capacity = 0;  // class bytes
  int device = 0;
  Stream stream = nullptr;
  DeviceMem() = default;
  DeviceMem(const DeviceMem&) = delete;
  DeviceMem& operator=(const DeviceMem&) = delete;
  ~DeviceMem();  // returns the block to its free list
};
std::shared_ptr<DeviceMem> device_alloc(size_t bytes, Stream stream);

struct AllocatorStats {
  size_t allocated_bytes = 0;  // live blocks (class bytes)
  size_t cached_bytes = 0;     // free blocks held by the cache
  size_t peak_bytes = 0;       // peak of allocated + cached
  uint64_t device_mallocs = 0;
  uint64_t cache_hits = 0;
};
AllocatorStats allocator_stats();
// Frees every cached block (after a device synchronize).
void empty_cache();

// Page-locked host memory (cudaHostAlloc) for expert weights in host RAM: copies from it are truly
// asynchronous and run at full link speed.
void* pinned_alloc(size_t bytes);
void pinned_free(void* p) noexcept;

// The current device's default stream: non-blocking, created on first use, never destroyed.
Stream default_stream();
Stream stream_create(int priority);
// Synchronizes, then destroys; its cached blocks become free for every stream.
void stream_destroy(Stream s) noexcept;
void stream_synchronize(Stream s);
bool stream_query(Stream s);  // true when all its work is done
void stream_wait_event(Stream s, Event e);
void stream_priority_range(int* least, int* greatest);

Event event_create(bool timing);
void event_destroy(Event e) noexcept;
void event_record(Event e, Stream s);
void event_synchronize(Event e);
bool event_query(Event e);
float event_elapsed_ms(Event start, Event end);

// Asynchronous on `s` (pageable host memory makes the H2D/D2H copies synchronous: the host data
// may be reused at return).
void memcpy_h2d(void* dst, const void* src, size_t bytes, Stream s);
void memcpy_d2h(void* dst, const void* src, size_t bytes, Stream s);
void memcpy_d2d(void* dst, const void* src, size_t bytes, Stream s);
void memset_async(void* dst, int byte, size_t bytes, Stream s);

// ---------------------------------------------------------------------------------------------
// GEMMs (bf16 operands, f32 accumulate on tensor cores).
// Sm90: the wgmma + TMA kernels (group_gemm_ffn only, compute capability 9.0), forced; the
// Sm90Swizzle (group-M tile order within an expert) and Sm90Persistent (one CTA per SM, a static
// tile scheduler over the same order, setmaxnreg) variants are opt-in until measured on a GPU.
enum class GemmTile : int { Auto = 0, Small = 1, Large = 2, Sm90 = 3, Sm90Swizzle = 4, Sm90Persistent = 5 };
inline bool is_sm90_tile(GemmTile t) {
  return t == GemmTile::Sm90 || t == GemmTile::Sm90Swizzle || t == GemmTile::Sm90Persistent;
}
const char* gemm_tile_name(GemmTile tile);

// One launch over every expert: rows [offsets[e], offsets[e+1]) of x go through weights[e].
//   x       [rows, k] bf16 (device)
//   offsets [num_experts + 1] int32 (device); nullptr: one group of `rows` rows
//   weights [num_experts] device array of device pointers to W_e [n_rows_w, k] bf16 (row-major,
//           the HF layout); gate_up: W_e is [2n, k], gate rows first then up rows
//   gate_up: out = h [rows, n] bf16 = SiLU(x W_gate^T) * (x W_up^T)
//   else:    out = y [rows, n] f32 = x W^T (+ bias[n]) (+ y if accumulate)
// Experts with no rows may have null weights. k % 8 == 0 and n % 8 == 0 (16-byte rows).
struct GroupGemmParams {
  const uint16_t* x = nullptr;
  const int32_t* offsets = nullptr;
  const uint16_t* const* weights = nullptr;
  int num_experts = 1;
  int rows = 0;
  int n = 0;
  int k = 0;
  bool gate_up = false;
  void* out = nullptr;
  const float* bias = nullptr;
  bool accumulate = false;
  GemmTile tile = GemmTile::Auto;
};
void group_gemm(const GroupGemmParams& p, Stream s);
// The fused expert FFN: h = SiLU(x Wgu_gate^T) * (x Wgu_up^T) [rows, inter] bf16 (scratch, caller
// owned), then y = h Wdown^T [rows, hidden] f32. Two launches, each over all experts. An expert
// with a null weight pointer is skipped, and rows past offsets[num_experts] are never touched: those
// rows of h_scratch and y keep their contents. x and h_scratch 16-byte aligned, y 8-byte.
// expert_maps: [2E] ExpertMap in device memory (gate_up maps, then down maps; encode_expert_map)
// for the sm_90a kernels, or nullptr (mma.sync only). Auto uses sm_90a for prefill shapes
// (rows >= 128 per expert on average) once its self-check passed on the device.
void group_gemm_ffn(const uint16_t* x, const int32_t* offsets, const uint16_t* const* gate_up,
                    const uint16_t* const* down, int num_experts, int rows, int hidden, int inter,
                    uint16_t* h_scratch, float* y, GemmTile tile, Stream s,
                    const void* expert_maps = nullptr);

// gpt-oss's experts (biased_ffn.cu): gu [rows, 2I] f32 = x Wgu^T (plain pass), + gate_up_bias
// [E, 2I] ([gate (I) | up (I)] per expert), clamped SwiGLU -> h [rows, I] bf16, y [rows, hidden] f32
// = h Wdown^T + down_bias [E, hidden]. Same empty-slot contract as group_gemm_ffn (an expert with a
// null gate_up pointer leaves its rows of h and y as they were; so do rows past offsets[E]).
void group_gemm_biased_ffn(const uint16_t* x, const int32_t* offsets,
                           const uint16_t* const* gate_up, const uint16_t* const* down,
                           int num_experts, int rows, int hidden, int inter,
                           const float* gate_up_bias, const float* down_bias, float alpha,
                           float limit, float* gu_scratch, uint16_t* h_scratch, float* y,
                           Stream s);

// The sm_90a GroupGemm path (group_gemm_sm90.cu) on the current device. Unchecked: it could run
// and its one-time self-check (both kernels on a small problem, compared) has not run yet; Failed:
// the check disagreed or raised a CUDA error, and Auto keeps mma.sync for the process;
// Unavailable: not compute capability 9.0, no sm_90a code in the build, no device, or
// EXPERTD_DISABLE_SM90 set. reason says why for Failed and Unavailable.
enum class Sm90State : int { Unchecked = 0, Passed = 1, Failed = 2, Unavailable = 3 };
struct Sm90Status {
  Sm90State state = Sm90State::Unavailable;
  std::string reason;
};
Sm90Status sm90_status();
// Runs the one-time self-check now if it has not run on the current device (Unchecked), and
// returns the verdict: test and bench scripts call it before any forced sm90 tile, so that a
// broken kernel shows as 'failed' with a reason rather than as the first forced call's fault.
Sm90Status sm90_self_check();
// Whether expert maps are worth building on the current device (Unchecked or Passed): for a
// forced 'sm90' call, or for 'auto' (unless EXPERTD_SM90=0 opts out).
bool sm90_maps_wanted(bool forced);
// A TMA descriptor (CUtensorMap: 128 opaque bytes, 64-byte aligned) of one expert's weights:
// gate_up [2 inter, hidden] or down [hidden, inter] bf16 at `weights` (device). nullptr weights
// give an all-zero map, never read. Throws E_CUDA when the driver refuses the encoding.
struct alignas(64) ExpertMap {
  unsigned char bytes[128];
};
void encode_expert_map(const uint16_t* weights, bool gate_up, int hidden, int inter, ExpertMap* out);

enum class DenseBackend : int { Auto = 0, CublasLt = 1, Kernel = 2 };
// y [m, n] f32 (+)= x [m, k] bf16 * w [n, k]^T bf16 (+ bias [n] f32). Returns the backend used.
DenseBackend dense_gemm(const uint16_t* x, int m, const uint16_t* w, int n, int k, float* y,
                        const float* bias, bool accumulate, DenseBackend backend, Stream s);
// libcublasLt.so.13/.12 was found and loaded (tried once).
bool cublaslt_available();
std::string cublaslt_library();

// ---------------------------------------------------------------------------------------------
// Routing and permutation (device pointers; semantics of ops.h's CPU versions).
// p.bias is a device pointer. counts [E] are overwritten.
void route(const float* logits, const RoutingParams& p, int32_t* ids, float* weights,
           int32_t* counts, Stream s);
// x [T, H] f32 -> x_perm [T*k, H] (f32 or bf16, perm_dtype), perm_index [T*k], offsets [E+1].
// Stable like the CPU version: by expert, then token, then slot. An id outside 0..E-1 is skipped
// (perm_index -1, no row; offsets count the valid ids only).
void permute_rows(const float* x, int tokens, int h, const int32_t* ids, int top_k,
                  int num_experts, void* x_perm, DType perm_dtype, int32_t* perm_index,
                  int32_t* offsets, Stream s);
// Act-order experts: out [rows, h] bf16 = x [rows, h] bf16 (expert-contiguous by offsets [E+1]) with each
// row's columns in its expert's input order, out[r, j] = x[r, perm[e * h + j]] (perm [E, h], device);
// rows from offsets[E] on are copied. offsets null (E must be 1): every row in perm's order (a dense
// Linear's act-order input). out must not be x.
void gather_expert_columns(const uint16_t* x, const int32_t* offsets, int num_experts, int rows, int h,
                           const int32_t* perm, uint16_t* out, Stream s);
// A slot whose perm_index is outside 0..tokens*top_k-1 (permute's -1) adds nothing.
void unpermute_combine(const float* y_perm, const int32_t* perm_index, const float* weights,
                       int tokens, int top_k, int h, float* out, bool accumulate, Stream s);

// Elementwise and normalisation (f32 activations, as ops.h).
void rms_norm(const float* x, int rows, int dim, const float* w, float eps, float* out,
              float* residual, Stream s);
// rope: rot_dim <= 4096 (cos/sin in shared memory); heads == 1 or head_stride >= rot_dim (heads
// rotate in parallel).
void rope(float* x, int tokens, int heads, int row_stride, int head_stride, int offset,
          const int32_t* positions, const float* inv_freq, int rot_dim, float attn_scale,
          bool interleaved, Stream s);
void silu_mul(const float* gu, int tokens, int inter, float* out, Stream s);
// gpt-oss's clamped SwiGLU (biased_ffn.cu): out [t, I] = (clamp(up, +-limit) + 1) * g *
// sigmoid(alpha g), g = min(gate, limit), from gu [t, gate (I) | up (I)] f32.
void clamped_swiglu(const float* gu, int tokens, int inter, float alpha, float limit, float* out,
                    Stream s);
void embedding(const void* table, DType dtype, int vocab, int h, const int32_t* ids, int tokens,
               float* out, Stream s);
void softmax_rows(const float* x, int rows, int cols, float* out, bool log, Stream s);
// Gated DeltaNet (deltanet.cu), the batched forms of ops.h's: slots [num_seqs] and seq_starts
// [num_seqs + 1] live on the device (a slot outside 0..pool_slots-1 or a sequence outside the
// tokens traps); slots must be distinct. Dk <= kDeltaMaxDk. The delta rule runs a sequence of n >=
// p.chunk tokens chunkwise (floor(n / chunk) whole chunks, then the recurrence for the tail) when
// delta_chunked(p.chunk, p.dk), and every other token by the recurrence (decode steps, short
// sequences, chunk 1, or a chunk whose kernel would not fit kDeltaChunkSmemMax). longest: the
// longest sequence as the host knows it (p.tokens when it does not): the chunked kernel is launched
// only when longest >= p.chunk; an understated value runs the longer sequences by the recurrence.
constexpr int kDeltaMaxDk = 256;
// Shared memory the chunked kernel may use: under the 99 KiB a block may opt into on sm_86/sm_89
// (sm_80 allows 163 KiB, sm_90 227 KiB), so that whether a shape runs chunkwise does not depend on
// the device. chunk 64 fits Dk <= 139, chunk 32 any Dk <= 256; chunk >= 124 never fits.
constexpr size_t kDeltaChunkSmemMax = 96 * 1024;
// Bytes of the chunked kernel's shared memory: K [C][Dk+1], a block of Q rows [min(C,16)][Dk+1],
// A and P [C][C+1], the state tile [Dk][32], X and QS [C][32], partial sums [8][32], and g, G,
// beta, e^G and the end decays [C] (test/helpers/cuda-emu.ts deltaChunkSmemBytes says the same).
inline size_t delta_chunk_smem_bytes(int chunk, int dk) {
  const size_t c = static_cast<size_t>(chunk), d = static_cast<size_t>(dk);
  const size_t qr = c < 16 ? c : 16;
  return sizeof(float) * ((c + qr) * (d + 1) + c * (c + 1) + (d + 2 * c + 8) * 32 + 5 * c);
}
inline bool delta_chunked(int chunk, int dk) {
  return chunk >= 2 && delta_chunk_smem_bytes(chunk, dk) <= kDeltaChunkSmemMax;
}
void causal_conv1d_batch(const float* x, int tokens, int channels, const float* weight,
                         const float* bias, int kernel, float* state_pool, long long pool_slots,
                         const int32_t* slots, const int32_t* seq_starts, int num_seqs, bool silu,
                         float* out, Stream s);
void gated_delta_rule_batch(const float* q, const float* k, const float* v, const float* g,
                            const float* beta, float* state_pool, long long pool_slots,
                            const int32_t* slots, const int32_t* seq_starts, int num_seqs,
                            float* out, const DeltaRuleParams& p, int longest, Stream s);
void gated_rms_norm(const float* x, const float* z, const float* w, float eps, int rows, int dim,
                    float* out, Stream s);
void top_n(const float* x, int rows, int cols, int n, int32_t* ids, float* vals, Stream s);

// The batched sampler (sampling.cu) over logits [rows, vocab] f32 on the device, with the host
// arrays the addon checked (native/addon/sampling_args.h; see expertd/sampling.h for their
// meaning). One copy up, one kernel, one copy down: returns with out and rng filled.
struct SampleBatchHost {
  int rows = 0, vocab = 0;
  const double* params = nullptr;  // [rows, kSampleParamCols]
  uint32_t* rng = nullptr;         // [rows, 4] in/out
  const int32_t *bias_offsets = nullptr, *bias_ids = nullptr;
  const float* bias_values = nullptr;
  const int32_t *seen_offsets = nullptr, *seen_ids = nullptr;
  const int32_t *count_offsets = nullptr, *count_ids = nullptr, *count_values = nullptr;
  const int32_t* mask_rows = nullptr;  // [rows] or null
  const int32_t* masks = nullptr;      // [n_masks, ceil(vocab/32)]
  size_t n_bias = 0, n_seen = 0, n_counts = 0, n_masks = 0;
  SampleOut out;
};
void sample_batch(const float* logits, const SampleBatchHost& h, Stream s);
void convert(const void* src, DType src_dtype, void* dst, DType dst_dtype, size_t n, Stream s);

// Glue for the device engine (glue.cu; roundings in its header comment).
// y [m, n] f32 (+)= x [m, k] f32 * w [n, k]^T (f32 or bf16) (+ bias [n] f32): CUDA cores, f32
// products summed in double, any m, n, k (routers, gates).
void gemm_f32(const float* x, int m, const void* w, DType w_dtype, int n, int k, float* y,
              const float* bias, bool accumulate, Stream s);
// y [n] += x [n] (f32).
void add(float* y, const float* x, size_t n, Stream s);
// out [t, h] += sigmoid(gate [t]) * y [t, h] (f32; Qwen2-MoE's shared-expert gate).
void gated_add(float* out, const float* y, const float* gate, int t, int h, Stream s);
// x [n] clamped to [-limit, limit] in place (f32; NaN kept).
void clamp(float* x, size_t n, float limit, Stream s);
// x [n] *= sigmoid(gate [n]) in place (f32; Qwen3-Next's attention output gate).
void sigmoid_mul(float* x, const float* gate, size_t n, Stream s);
// Gated DeltaNet gates from ba [t, b (hv) | a (hv)] f32: beta [t, hv] = sigmoid(b), g [t, hv] =
// neg_a * softplus(a + dt_bias) (neg_a = -exp(A_log), both [hv] f32).
void delta_gates(const float* ba, int t, int hv, const float* neg_a, const float* dt_bias, float* g,
                 float* beta, Stream s);
// rows x width_bytes from src (src_pitch bytes between rows) to dst (dst_pitch): device to device.
void copy_2d(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width_bytes,
             size_t rows, Stream s);
// Rows [offsets[lo], offsets[hi]) of src to the same rows of dst (row_bytes each); offsets [>= hi+1]
// int32 is read on the device and the range clamped to [0, max_rows].
void copy_row_range(void* dst, const void* src, const int32_t* offsets, int lo, int hi,
                    size_t row_bytes, int max_rows, Stream s);

// fp8 KV scales travel by value in the kernels' arguments (host arrays, nothing to keep alive).
constexpr int kMaxScaleHeads = 256;
struct KvScales {
  float k[kMaxScaleHeads];
  float v[kMaxScaleHeads];
};

// Paged attention (f32, bf16 or fp8 cache as p.kv_dtype says, layouts of ops.h; p.k_scales /
// p.v_scales are host arrays, fp8 takes at most kMaxScaleHeads kv heads; p.sinks, when set, is a
// device array [heads] f32 that enters each row's denominator once, after the split-K merge). seq_info and
// block_tables are device arrays; total_tokens = rows of q and out; max_context >= every ctx_len
// (sizes the split-K grid): no key at or past min(max_context, max_blocks * block_size) is read,
// whatever ctx_len says.
void paged_attention(const float* q, const void* k_cache, const void* v_cache,
                     const int32_t* seq_info, const int32_t* block_tables,
                     const AttentionParams& p, int total_tokens, int max_context, float* out,
                     Stream s);
// Rounds as the CPU kv_cache_write (k_scales / v_scales: host arrays [kv_heads], fp8 only).
void kv_cache_write(const float* k, const float* v, int tokens, const int32_t* slots,
                    void* k_cache, void* v_cache, int kv_heads, int dk, int dv, int v_stride,
                    KvDtype dtype, const float* k_scales, const float* v_scales, Stream s);

}  // namespace cuda

// ---------------------------------------------------------------------------------------------
// NCCL (native/comm/nccl.cc; libnccl is dlopen'd). The unique id is 128 opaque bytes that rank 0
// creates and the rendezvous hands to every rank.
constexpr size_t kNcclUniqueIdBytes = 128;
void nccl_unique_id(uint8_t* out);
// Blocks until all world_size ranks have joined on the current device, at most timeout_ms (then
// E_COMM, the communicator aborted). timeout_ms also bounds every later collective of the group.
std::shared_ptr<Comm> nccl_join(const uint8_t* unique_id, int world_size, int rank, int timeout_ms);
// all2allv over device buffers enqueued on `s` without waiting (Comm::all2allv is the blocking
// form on the group's own stream); the group's watchdog aborts it past the timeout, and the next
// call raises E_COMM. comm must come from nccl_join.
void nccl_all2allv_async(Comm& comm, const void* send, const int64_t* send_bytes, void* recv,
                         const int64_t* recv_bytes, cuda::Stream s);

}  // namespace expertd
