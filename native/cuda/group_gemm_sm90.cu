// GroupGemm FFN on Hopper (sm_90a): TMA loads into a 5-stage shared-memory ring (mbarriers), one
// producer warp, two consumer warpgroups issuing wgmma m64n128k16 (bf16 -> f32); the epilogues of
// group_gemm.cu. Used for prefill shapes after a one-time self-check against the mma.sync kernel.
// Three tile orders (GemmTile): sm90 (grid order), sm90-swizzle (group-M order within an expert)
// and sm90-persistent (one CTA per SM walking the group-M order, setmaxnreg).
#include <cuda.h>  // CUtensorMap and its enums only: the driver is reached through the runtime
#include <cudaTypedefs.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include "cuda_common.h"

// The kernel body exists only in the sm_90a pass; the sm_80 pass compiles an empty kernel, which
// the run-time probe below detects (it is never launched for work there).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define EXPERTD_SM90A 1
#endif

namespace expertd::cuda {
namespace {

// CTA tile: 128 rows (two consumer warpgroups of 64) x 128 weight rows x 64 deep (one 128-byte
// swizzle atom per row). gate_up: the 128 weight rows are 64 gate rows then the matching 64 up
// rows, so a thread holds gate and up of the same output column.
constexpr int kBM = 128, kBN = 128, kBK = 64, kStages = 5;
constexpr int kConsumerWarpgroups = 2;
constexpr int kThreads = (1 + kConsumerWarpgroups) * 128;
constexpr int kTileABytes = kBM * kBK * 2;
constexpr int kTileBBytes = kBN * kBK * 2;
constexpr int kStageBytes = kTileABytes + kTileBBytes;
// +1024: the dynamic shared memory base is rounded up to the 1024-byte swizzle atom.
constexpr int kSmemBytes = kStages * kStageBytes + 1024;
// Auto takes this path above this many rows per expert on average: group_gemm.cu's small-tile
// crossover. Measured on an H200 (2026-12-04, bench kernels --device cuda, Mixtral-8x7B and
// DeepSeek-V3 expert shapes): at 16 rows/expert the mma.sync decode tile is faster (0.81 vs 1.02 ms,
// 0.79 vs 0.82), and at every heavier load that auto gave the mma.sync 'large' tile, sm90-swizzle was
// 1.6-3.5x faster (256 rows 1.27 vs 4.39 ms, 4096 rows 20.1 vs 70.7, Zipf-skewed 64 avg 0.99 vs 1.62).
constexpr int kSm90RowsPerExpert = 16;
// Row tiles of one expert that take the column tiles together in the group-M orders.
[[maybe_unused]] constexpr int kGroupM = 8;
// Tile orders: blockIdx = (column tile, row tile); one 1-D id per (row tile, column tile) in group-M
// order; the same order walked by a persistent grid of one CTA per SM.
constexpr int kOrderGrid = 0, kOrderSwizzle = 1, kOrderPersistent = 2;

struct Sm90Args {
  const int32_t* offsets;          // [E + 1] device
  const uint16_t* const* weights;  // [E] device pointers (null: an expert without weights)
  const CUtensorMap* wmaps;        // [E] maps of this pass's weights (global memory)
  int num_experts;
  int rows;
  int n;  // output columns (gate_up: I)
  int k;
  int n_tiles;  // column tiles (of kBN / 2 for gate_up, kBN for down)
  void* out;   // gate_up: h [rows, n] bf16; down: y [rows, n] f32
  int* fault;  // set to 1 when a wait hangs (self-check); nullptr: trap instead
};

#ifdef EXPERTD_SM90A
// A wait that lasts this long (wall clock, %globaltimer) counts as hung: the kernel gives up
// instead of hanging the device. NOTE: the GPU is not time-sliced with other work during a run
// here; on a shared GPU a descheduled CTA could see a long wait and give up (a loud error, never
// a wrong result).
constexpr uint64_t kWaitLimitNs = 2000000000ull;

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t));
  return t;
}
__device__ __forceinline__ void mbar_init(uint32_t bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
// Waits for the phase of parity `parity` to complete; false when it has not after kWaitLimitNs
// (a bug: the caller leaves the kernel instead of hanging the device forever).
__device__ __forceinline__ bool mbar_wait(uint32_t bar, uint32_t parity) {
  uint64_t start = 0;
#pragma unroll 1
  for (unsigned tries = 0;; ++tries) {
    uint32_t done;
    asm volatile(
        "{\n.reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
    if (done) return true;
    if ((tries & 15) == 0) {  // try_wait itself suspends a while: read the clock now and then
      const uint64_t now = global_ns();
      if (start == 0) start = now;
      else if (now - start > kWaitLimitNs) return false;
    }
  }
}
__device__ __forceinline__ void hung(int* fault) {
  if (fault == nullptr) __trap();  // a loud, sticky error rather than a silent wrong result
  atomicExch(fault, 1);
}
// 2-D tile load: box at (c0 = column along K, c1 = row) into 128B-swizzled shared memory.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const void* map, uint32_t bar, int c0,
                                            int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
}

// wgmma shared-memory descriptor, K-major operand in 128-byte swizzle atoms (8 rows x 128 B):
// start address >> 4 in bits 0-13, leading offset unused for swizzled K-major (1 by convention),
// stride offset 1024 B (next 8-row group) in bits 32-45, layout type 1 (128B swizzle) in 62-63.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3ffff) >> 4) | (uint64_t{1} << 16) |
         (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accumulator registers across the asynchronous MMAs.
__device__ __forceinline__ void pin(float (&d)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// D[64 x 128] += A[64 x 16] * B[128 x 16]^T, both K-major in shared memory.
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p, 1, 1, 0, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),
        "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),
        "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]),
        "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),
        "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),
        "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]),
        "+f"(d[62]), "+f"(d[63])
      : "l"(da), "l"(db), "r"(1));
}

__device__ __forceinline__ float silu(float g) { return g / (1.0f + expf(-g)); }
#endif  // EXPERTD_SM90A

// A CTA's tile: expert e (-1: past the last tile), its rows [r0, r1) from r0, column tile nt.
struct TileCoord {
  int e, r0, r1, nt;
};

// Tile `id` of order ORDER, found by one warp (every lane gets the result). kOrderGrid: id is the
// row tile (numbered expert by expert, as group_gemm.cu) and nt is blockIdx.x. The group-M orders:
// ids run expert by expert over (row tile, column tile) pairs; within an expert, kGroupM row tiles
// take the column tiles together (m fastest), so a weight tile is read by kGroupM CTAs close in
// time (from L2 after the first) rather than once per row tile a wave apart.
template <int ORDER>
__device__ __forceinline__ TileCoord map_tile(const int32_t* offsets, int num_experts, int id,
                                              int n_tiles, int lane) {
  const int per_m = ORDER == kOrderGrid ? 1 : n_tiles;
  int base = 0;
  for (int e0 = 0; e0 < num_experts; e0 += 32) {
    const int ex = e0 + lane;
    int beg = 0, cnt = 0;
    if (ex < num_experts) {
      beg = offsets[ex];
      cnt = offsets[ex + 1] - beg;
    }
    const int mt = cnt > 0 ? (cnt + kBM - 1) / kBM : 0;
    const int units = mt * per_m;
    const int inc = warp_inclusive_scan(units, lane);
    const int excl = inc - units;
    const bool mine = units > 0 && id >= base + excl && id < base + inc;
    const unsigned who = __ballot_sync(0xffffffffu, mine);
    if (who != 0) {
      int m = 0, nt = 0;
      if (mine) {
        const int local = id - base - excl;
        if (ORDER == kOrderGrid) {
          m = local;
          nt = static_cast<int>(blockIdx.x);
        } else {
          const int span = kGroupM * n_tiles;
          const int g = local / span, first = g * kGroupM;
          const int gm = min(kGroupM, mt - first);
          const int within = local - g * span;
          m = first + within % gm;
          nt = within / gm;
        }
      }
      const int src = __ffs(static_cast<int>(who)) - 1;
      return TileCoord{__shfl_sync(0xffffffffu, ex, src), __shfl_sync(0xffffffffu, beg + m * kBM, src),
                       __shfl_sync(0xffffffffu, beg + cnt, src), __shfl_sync(0xffffffffu, nt, src)};
    }
    base += __shfl_sync(0xffffffffu, inc, 31);
    if (base > id) break;
  }
  return TileCoord{-1, 0, 0, 0};
}

// The CTA's tiles: one (kOrderGrid: blockIdx.y; kOrderSwizzle: blockIdx.x), or every
// gridDim.x-th id from blockIdx.x (kOrderPersistent: the static tile scheduler). Warpgroup 0:
// warp 0 lane 0 issues the TMA loads (its warp finds the tiles), the rest idle out. Warpgroups 1
// and 2: rows [64 (wg - 1), 64 wg) of each tile.
// NOTE: stage s is refilled only after all 8 consumer warps arrived on empty[s]; full[s] counts
// the stage's bytes (the whole boxes, out-of-bounds parts included: TMA zero-fills them). The ring
// runs on across tiles: the CTA's k-step g uses stage g % kStages, phase g / kStages.
// NOTE: the CTA's shared memory is freed when its last thread exits, so the producer waits for
// every bulk copy it issued before it leaves, on every path (a consumer that gave up may be gone).
template <bool GATE_UP, int ORDER>
__global__ void __launch_bounds__(kThreads, 1)
    group_gemm_sm90_kernel(const __grid_constant__ CUtensorMap xmap, const Sm90Args a) {
#ifdef EXPERTD_SM90A
  extern __shared__ uint8_t smem_raw[];
  __shared__ __align__(8) uint64_t full_bar[kStages];
  __shared__ __align__(8) uint64_t empty_bar[kStages];

  const int tid = threadIdx.x, lane = tid & 31;
  // Broadcast from lane 0 so that the compiler sees the role split as warp-uniform (otherwise it
  // serialises the wgmma of a divergent path, warning C7518).
  const int warp = __shfl_sync(0xffffffffu, tid >> 5, 0), wg = warp >> 2;
  const uint32_t smem_base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const int first_id = static_cast<int>(ORDER == kOrderGrid ? blockIdx.y : blockIdx.x);
  const int id_step = ORDER == kOrderPersistent ? static_cast<int>(gridDim.x) : 0;
  const int KT = (a.k + kBK - 1) / kBK;

  if (warp == 1 && lane == 0) {
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      mbar_init(smem_u32(&full_bar[s]), 1);
      mbar_init(smem_u32(&empty_bar[s]), kConsumerWarpgroups * 4);
    }
    // Make the initialised barriers visible to the async proxy (TMA complete_tx).
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  }
  __syncthreads();

  if (wg == 0) {
    // The producer needs few registers: hand them to the consumers (sm_90a register reallocation;
    // each warpgroup executes its own setmaxnreg, one branch of this if/else).
    if (ORDER == kOrderPersistent) asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (warp != 0) return;
    int it = 0;  // k-steps issued so far
    bool ok = true;
    for (int id = first_id;; id += id_step) {
      const TileCoord t = map_tile<ORDER>(a.offsets, a.num_experts, id, a.n_tiles, lane);
      if (t.e < 0) break;
      // An empty table slot: the expert's rows stay unwritten (the contract; see group_gemm.cu).
      if (t.r0 < t.r1 && a.weights[t.e] != nullptr) {
        if (lane == 0) {
          const CUtensorMap* wmap = a.wmaps + t.e;
          // The weight maps were written by the host (cudaMemcpy): the tensormap proxy must
          // acquire them before their use in this kernel.
          asm volatile("fence.proxy.tensormap::generic.acquire.sys [%0], 128;\n" ::"l"(
                           reinterpret_cast<uint64_t>(wmap))
                       : "memory");
          const int col0 = t.nt * (GATE_UP ? kBN / 2 : kBN);
          for (int kt = 0; kt < KT; ++kt, ++it) {
            const int s = it % kStages;
            if (it >= kStages && !mbar_wait(smem_u32(&empty_bar[s]), ((it / kStages) + 1) & 1)) {
              ok = false;
              break;
            }
            const uint32_t full = smem_u32(&full_bar[s]);
            const uint32_t sa = smem_base + s * kStageBytes, sb = sa + kTileABytes;
            mbar_arrive_expect_tx(full, kStageBytes);
            tma_load_2d(sa, &xmap, full, kt * kBK, t.r0);
            if (GATE_UP) {
              tma_load_2d(sb, wmap, full, kt * kBK, col0);                         // gate rows
              tma_load_2d(sb + kTileBBytes / 2, wmap, full, kt * kBK, a.n + col0);  // up rows
            } else {
              tma_load_2d(sb, wmap, full, kt * kBK, col0);
            }
          }
        }
        ok = __shfl_sync(0xffffffffu, ok ? 1 : 0, 0) != 0;
        it = __shfl_sync(0xffffffffu, it, 0);
        if (!ok) break;
      }
      if (id_step == 0) break;
    }
    if (lane == 0) {
      // Drain: the last kStages loads may still be in flight (earlier ones were consumed before
      // their stage was refilled). A copy that never lands can only be stopped by a trap.
      for (int g = it > kStages ? it - kStages : 0; g < it; ++g)
        if (!mbar_wait(smem_u32(&full_bar[g % kStages]), (g / kStages) & 1)) __trap();
      if (!ok) hung(a.fault);
    }
    return;
  }

  if (ORDER == kOrderPersistent) asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  const int cw = wg - 1;  // consumer warpgroup: rows [64 cw, 64 cw + 64) of the tile
  int it = 0;             // k-steps consumed so far
  for (int id = first_id;; id += id_step) {
    const TileCoord t = map_tile<ORDER>(a.offsets, a.num_experts, id, a.n_tiles, lane);
    if (t.e < 0) break;
    if (t.r0 < t.r1 && a.weights[t.e] != nullptr) {
      float acc[64];
#pragma unroll
      for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
      bool ok = true;
      for (int kt = 0; kt < KT; ++kt) {
        const int g = it + kt, s = g % kStages;
        if (!mbar_wait(smem_u32(&full_bar[s]), (g / kStages) & 1)) {
          ok = false;
          break;
        }
        const uint32_t sa = smem_base + s * kStageBytes + cw * (kTileABytes / 2);
        const uint32_t sb = smem_base + s * kStageBytes + kTileABytes;
        pin(acc);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kBK / 16; ++kk)  // 16 bf16 = 32 bytes along the swizzled row
          wgmma_m64n128k16(acc, smem_desc(sa + kk * 32), smem_desc(sb + kk * 32));
        wgmma_commit();
        // The group of step g-1 has finished reading its stage: hand it back to the producer.
        wgmma_wait<1>();
        pin(acc);
        if (kt > 0 && lane == 0) mbar_arrive(smem_u32(&empty_bar[(g - 1) % kStages]));
      }
      wgmma_wait<0>();
      pin(acc);
      if (!ok) {
        hung(a.fault);
        return;
      }
      if (lane == 0) mbar_arrive(smem_u32(&empty_bar[(it + KT - 1) % kStages]));
      it += KT;

      // Epilogue. acc[4j + c]: column 8j + 2 (lane % 4) + (c & 1), row (warp % 4) 16 + lane / 4
      // (+ 8 for c >= 2) of this warpgroup's 64 x 128 block.
      const int col0 = t.nt * (GATE_UP ? kBN / 2 : kBN);
      const int row_base = t.r0 + cw * 64 + (warp & 3) * 16 + (lane >> 2);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int gr = row_base + h * 8;
        if (gr >= t.r1) continue;
        if (GATE_UP) {
          uint16_t* out = static_cast<uint16_t*>(a.out) + static_cast<size_t>(gr) * a.n;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const int col = col0 + j * 8 + (lane & 3) * 2;
            if (col >= a.n) continue;
            const float v0 = silu(acc[4 * j + 2 * h]) * acc[4 * (j + 8) + 2 * h];
            const float v1 = silu(acc[4 * j + 2 * h + 1]) * acc[4 * (j + 8) + 2 * h + 1];
            const uint32_t packed = static_cast<uint32_t>(f32_to_bf16_bits(v0)) |
                                    (static_cast<uint32_t>(f32_to_bf16_bits(v1)) << 16);
            *reinterpret_cast<uint32_t*>(out + col) = packed;
          }
        } else {
          float* out = static_cast<float*>(a.out) + static_cast<size_t>(gr) * a.n;
#pragma unroll
          for (int j = 0; j < 16; ++j) {
            const int col = col0 + j * 8 + (lane & 3) * 2;
            if (col >= a.n) continue;
            *reinterpret_cast<float2*>(out + col) =
                make_float2(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
          }
        }
      }
    }
    if (id_step == 0) break;
  }
#endif  // EXPERTD_SM90A
}

// Writes 1 when the code running on this device came from the sm_90a pass (0: the sm_80 PTX was
// JIT-compiled, and group_gemm_sm90_kernel is empty there).
__global__ void sm90_probe_kernel(int* out) {
#ifdef EXPERTD_SM90A
  *out = 1;
#else
  *out = 0;
#endif
}

// ------------------------------------------------------------------------------ host side
PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault,
                                         &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      p = nullptr;
    cudaGetLastError();
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

// [rows, cols] bf16 row-major at ptr, boxes of kBK columns x box_rows rows, 128-byte swizzle,
// out-of-bounds elements read as zero.
void encode_2d(void* out, const void* ptr, uint64_t rows, uint64_t cols, uint32_t box_rows) {
  PFN_cuTensorMapEncodeTiled_v12000 fn = encode_fn();
  EXPERTD_CHECK(fn != nullptr, ErrorCode::Cuda, "group_gemm_sm90: cuTensorMapEncodeTiled not found");
  const cuuint64_t dims[2] = {cols, rows};
  const cuuint64_t strides[1] = {cols * 2};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(kBK), box_rows};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult r = fn(static_cast<CUtensorMap*>(out), CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2,
                        const_cast<void*>(ptr), dims, strides, box, elem_strides,
                        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                        CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  EXPERTD_CHECK(r == CUDA_SUCCESS, ErrorCode::Cuda,
                "group_gemm_sm90: cuTensorMapEncodeTiled failed (CUresult " + std::to_string(r) +
                    ", " + std::to_string(rows) + " x " + std::to_string(cols) + ")");
}

struct DeviceState {
  bool probed = false;
  Sm90State state = Sm90State::Unchecked;
  std::string reason;
};
std::mutex g_mu;
std::vector<DeviceState> g_states;  // by device ordinal

bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
}
bool env_disabled() { return env_flag("EXPERTD_DISABLE_SM90"); }
// Tile 'auto' takes the sm_90a kernels (after the self-check passed) unless EXPERTD_SM90=0: they
// have run on an H200 (2026-12-04: the self-check, every forced tile against float64, and
// compute-sanitizer memcheck clean). EXPERTD_DISABLE_SM90=1 turns forced tiles off too.
bool env_auto_enabled() {
  const char* v = std::getenv("EXPERTD_SM90");
  return v == nullptr || v[0] == '\0' || std::strcmp(v, "0") != 0;
}

// The static part of availability on device `dev` (compute capability, driver entry point, the
// sm_90a code in this build), found once. Caller holds g_mu.
DeviceState& probe(int dev) {
  if (static_cast<int>(g_states.size()) <= dev) g_states.resize(dev + 1);
  DeviceState& d = g_states[dev];
  if (d.probed) return d;
  d.probed = true;
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
    cudaGetLastError();
    d.state = Sm90State::Unavailable;
    d.reason = "cannot read the compute capability";
    return d;
  }
  if (major != 9 || minor != 0) {
    d.state = Sm90State::Unavailable;
    d.reason = "compute capability " + std::to_string(major) + "." + std::to_string(minor) +
               " (the sm_90a kernel needs 9.0)";
    return d;
  }
  if (encode_fn() == nullptr) {
    d.state = Sm90State::Unavailable;
    d.reason = "the driver has no cuTensorMapEncodeTiled";
    return d;
  }
  try {
    auto flag = device_alloc(sizeof(int), default_stream());
    Stream s = default_stream();
    sm90_probe_kernel<<<1, 1, 0, s>>>(static_cast<int*>(flag->ptr));
    EXPERTD_CUDA_LAUNCH_CHECK();
    int v = 0;
    memcpy_d2h(&v, flag->ptr, sizeof v, s);
    stream_synchronize(s);
    if (v != 1) {
      d.state = Sm90State::Unavailable;
      d.reason = "this build has no sm_90a code";
      return d;
    }
  } catch (const Error& e) {
    d.state = Sm90State::Unavailable;
    d.reason = std::string("probe failed: ") + e.what();
    return d;
  }
  d.state = Sm90State::Unchecked;
  return d;
}

int order_of(GemmTile tile) {
  return tile == GemmTile::Sm90Swizzle ? kOrderSwizzle
         : tile == GemmTile::Sm90Persistent ? kOrderPersistent
                                            : kOrderGrid;
}

template <bool GATE_UP, int ORDER>
void launch_order(const CUtensorMap& xmap, const Sm90Args& a, Stream s) {
  const long long m_tiles = (a.rows + kBM - 1) / kBM + std::min(a.num_experts, a.rows);
  EXPERTD_CUDA_CHECK(cudaFuncSetAttribute(group_gemm_sm90_kernel<GATE_UP, ORDER>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  dim3 grid;
  if (ORDER == kOrderGrid) {
    EXPERTD_CHECK(m_tiles <= 65535, ErrorCode::InvalidArg,
                  "group_gemm_sm90: too many row tiles (" + std::to_string(m_tiles) + "); split the call");
    grid = dim3(static_cast<unsigned>(a.n_tiles), static_cast<unsigned>(m_tiles));
  } else {
    const long long units = m_tiles * a.n_tiles;  // an upper bound: ids past the last tile leave
    EXPERTD_CHECK(units <= 0x7fffffffLL, ErrorCode::InvalidArg,
                  "group_gemm_sm90: too many tiles (" + std::to_string(units) + "); split the call");
    long long ctas = units;
    if (ORDER == kOrderPersistent) {
      int sms = 0;
      EXPERTD_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, current_device()));
      ctas = std::min<long long>(units, std::max(1, sms));
    }
    grid = dim3(static_cast<unsigned>(ctas));
  }
  group_gemm_sm90_kernel<GATE_UP, ORDER><<<grid, kThreads, kSmemBytes, s>>>(xmap, a);
  EXPERTD_CUDA_LAUNCH_CHECK();
}

template <bool GATE_UP>
void launch_sm90(const CUtensorMap& xmap, Sm90Args a, int order, Stream s) {
  const int cols_per_cta = GATE_UP ? kBN / 2 : kBN;
  a.n_tiles = (a.n + cols_per_cta - 1) / cols_per_cta;
  if (order == kOrderSwizzle) launch_order<GATE_UP, kOrderSwizzle>(xmap, a, s);
  else if (order == kOrderPersistent) launch_order<GATE_UP, kOrderPersistent>(xmap, a, s);
  else launch_order<GATE_UP, kOrderGrid>(xmap, a, s);
}

// Both passes on s. maps: [2E] device (gate_up maps then down maps).
void run_sm90(const uint16_t* x, const int32_t* offsets, const uint16_t* const* gate_up,
              const uint16_t* const* down, int num_experts, int rows, int hidden, int inter,
              uint16_t* h_scratch, float* y, const void* maps, int* fault, int order, Stream s) {
  EXPERTD_CHECK(reinterpret_cast<uintptr_t>(h_scratch) % 16 == 0, ErrorCode::InvalidArg,
                "group_gemm: x must be 16-byte aligned");  // hScratch is the down pass's x
  const CUtensorMap* m = static_cast<const CUtensorMap*>(maps);
  alignas(64) CUtensorMap xmap, hmap;
  encode_2d(&xmap, x, rows, hidden, kBM);
  encode_2d(&hmap, h_scratch, rows, inter, kBM);
  launch_sm90<true>(xmap, Sm90Args{offsets, gate_up, m, num_experts, rows, inter, hidden, 0, h_scratch, fault}, order, s);
  launch_sm90<false>(hmap, Sm90Args{offsets, down, m + num_experts, num_experts, rows, hidden, inter, 0, y, fault}, order, s);
}

uint32_t lcg_next(uint32_t& st) {
  st = st * 1664525u + 1013904223u;
  return st;
}
uint16_t bf16_bits(float f) {  // round to nearest even (finite inputs)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// Runs the mma.sync kernels and this one on a small skewed problem and compares y. Returns an
// empty string when they agree, else why not. Throws nothing but what a lost device throws.
std::string self_check(Stream s) {
  // 5 experts: none, one row, a whole tile, two tiles and a row, a part tile; the expert with
  // no rows has no weights. H and I leave partial K steps and partial column tiles.
  constexpr int E = 5, H = 200, I = 136;
  const int counts[E] = {0, 1, 128, 257, 40};
  std::vector<int32_t> offsets(E + 1, 0);
  for (int e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + counts[e];
  const int rows = offsets[E];
  uint32_t st = 0x5eed5eedu;
  auto uniform = [&](float lo, float hi) {
    return lo + (hi - lo) * static_cast<float>(lcg_next(st) >> 8) * (1.0f / 16777216.0f);
  };
  std::vector<uint16_t> x(static_cast<size_t>(rows) * H);
  for (auto& v : x) v = bf16_bits(uniform(-1.0f, 1.0f));
  std::vector<std::vector<uint16_t>> gu(E), dn(E);
  for (int e = 1; e < E; ++e) {
    gu[e].resize(2 * static_cast<size_t>(I) * H);
    dn[e].resize(static_cast<size_t>(H) * I);
    for (auto& v : gu[e]) v = bf16_bits(uniform(-0.2f, 0.2f));
    for (auto& v : dn[e]) v = bf16_bits(uniform(-0.2f, 0.2f));
  }
  try {
    auto upload = [&](const void* src, size_t bytes) {
      auto m = device_alloc(bytes, s);
      memcpy_h2d(m->ptr, src, bytes, s);
      return m;
    };
    std::vector<std::shared_ptr<DeviceMem>> keep;
    std::vector<const uint16_t*> ptrs(2 * E, nullptr);
    for (int e = 1; e < E; ++e) {
      keep.push_back(upload(gu[e].data(), gu[e].size() * 2));
      ptrs[e] = static_cast<const uint16_t*>(keep.back()->ptr);
      keep.push_back(upload(dn[e].data(), dn[e].size() * 2));
      ptrs[E + e] = static_cast<const uint16_t*>(keep.back()->ptr);
    }
    std::vector<ExpertMap> maps(2 * E);
    for (int i = 0; i < 2 * E; ++i)
      encode_expert_map(ptrs[i], i < E, H, I, &maps[i]);
    auto d_table = upload(ptrs.data(), ptrs.size() * sizeof(void*));
    auto d_maps = upload(maps.data(), maps.size() * sizeof(ExpertMap));
    auto d_x = upload(x.data(), x.size() * 2);
    auto d_off = upload(offsets.data(), offsets.size() * 4);
    const int zero = 0;
    auto d_fault = upload(&zero, sizeof zero);
    const size_t h_bytes = static_cast<size_t>(rows) * I * 2, y_bytes = static_cast<size_t>(rows) * H * 4;
    auto h_ref = device_alloc(h_bytes, s), h_new = device_alloc(h_bytes, s);
    auto y_ref = device_alloc(y_bytes, s), y_new = device_alloc(y_bytes, s);
    memset_async(y_ref->ptr, 0xff, y_bytes, s);  // NaN: unwritten outputs fail the comparison
    memset_async(y_new->ptr, 0xff, y_bytes, s);
    const auto* table = static_cast<const uint16_t* const*>(d_table->ptr);
    const auto* dx = static_cast<const uint16_t*>(d_x->ptr);
    const auto* doff = static_cast<const int32_t*>(d_off->ptr);
    group_gemm_ffn(dx, doff, table, table + E, E, rows, H, I, static_cast<uint16_t*>(h_ref->ptr),
                   static_cast<float*>(y_ref->ptr), GemmTile::Large, s, nullptr);
    run_sm90(dx, doff, table, table + E, E, rows, H, I, static_cast<uint16_t*>(h_new->ptr),
             static_cast<float*>(y_new->ptr), d_maps->ptr, static_cast<int*>(d_fault->ptr), kOrderGrid, s);
    std::vector<float> yr(static_cast<size_t>(rows) * H), yn(yr.size());
    int fault = 0;
    memcpy_d2h(yr.data(), y_ref->ptr, y_bytes, s);
    memcpy_d2h(yn.data(), y_new->ptr, y_bytes, s);
    memcpy_d2h(&fault, d_fault->ptr, sizeof fault, s);
    stream_synchronize(s);
    if (fault) return "self-check: an mbarrier wait hung (the kernel gave up)";
    double num = 0, den = 0;
    for (size_t i = 0; i < yr.size(); ++i) {
      if (!std::isfinite(yn[i])) return "self-check: y[" + std::to_string(i) + "] is not finite";
      if (!std::isfinite(yr[i])) return "self-check: the mma.sync reference y[" + std::to_string(i) + "] is not finite";
      num += (static_cast<double>(yn[i]) - yr[i]) * (static_cast<double>(yn[i]) - yr[i]);
      den += static_cast<double>(yr[i]) * yr[i];
    }
    const double rel = std::sqrt(num / std::max(den, 1e-300));
    if (!(rel < 1e-2)) return "self-check: relative L2 error " + std::to_string(rel) + " >= 1e-2";
    return "";
  } catch (const Error& e) {
    return std::string("self-check: ") + e.what();
  }
}

}  // namespace

void encode_expert_map(const uint16_t* weights, bool gate_up, int hidden, int inter, ExpertMap* out) {
  std::memset(out, 0, sizeof *out);
  if (weights == nullptr) return;  // an expert without weights: never read (the kernel returns)
  if (gate_up)
    encode_2d(out, weights, 2 * static_cast<uint64_t>(inter), hidden, kBN / 2);
  else
    encode_2d(out, weights, hidden, inter, kBN);
}

bool sm90_maps_wanted(bool forced) {
  if (env_disabled() || (!forced && !env_auto_enabled()) || cuda_device_count() == 0) return false;
  std::lock_guard<std::mutex> lock(g_mu);
  const DeviceState& d = probe(current_device());
  return d.state == Sm90State::Unchecked || d.state == Sm90State::Passed;
}

Sm90Status sm90_status() {
  if (env_disabled()) return {Sm90State::Unavailable, "EXPERTD_DISABLE_SM90 is set"};
  if (cuda_device_count() == 0) return {Sm90State::Unavailable, "no CUDA device"};
  std::lock_guard<std::mutex> lock(g_mu);
  const DeviceState& d = probe(current_device());
  return {d.state, d.reason};
}

Sm90Status sm90_self_check() {
  if (env_disabled()) return {Sm90State::Unavailable, "EXPERTD_DISABLE_SM90 is set"};
  if (cuda_device_count() == 0) return {Sm90State::Unavailable, "no CUDA device"};
  ensure_alive();
  std::lock_guard<std::mutex> lock(g_mu);
  DeviceState& d = probe(current_device());
  if (d.state == Sm90State::Unchecked) {
    // NOTE: the check runs under the lock, so concurrent first callers wait for its verdict.
    const std::string why = self_check(default_stream());
    d.state = why.empty() ? Sm90State::Passed : Sm90State::Failed;
    d.reason = why;
    ensure_alive();  // a sticky fault in the check: the device is lost for every path
  }
  return {d.state, d.reason};
}

const char* gemm_tile_name(GemmTile tile) {
  switch (tile) {
    case GemmTile::Auto: return "auto";
    case GemmTile::Small: return "small";
    case GemmTile::Large: return "large";
    case GemmTile::Sm90: return "sm90";
    case GemmTile::Sm90Swizzle: return "sm90-swizzle";
    case GemmTile::Sm90Persistent: return "sm90-persistent";
  }
  return "?";
}

bool sm90_group_gemm_ffn(const uint16_t* x, const int32_t* offsets, const uint16_t* const* gate_up,
                         const uint16_t* const* down, int num_experts, int rows, int hidden,
                         int inter, uint16_t* h_scratch, float* y, GemmTile tile,
                         const void* expert_maps, Stream s) {
  const bool forced = is_sm90_tile(tile);
  if (tile != GemmTile::Auto && !forced) return false;
  if (tile == GemmTile::Auto && (expert_maps == nullptr || !env_auto_enabled() ||
                                 rows <= kSm90RowsPerExpert * std::max(1, num_experts) || env_disabled()))
    return false;
  ensure_alive();
  s = or_default(s);
  {
    std::unique_lock<std::mutex> lock(g_mu);
    const int dev = current_device();
    DeviceState& d = probe(dev);
    if (forced) {
      const std::string name = gemm_tile_name(tile);
      const Sm90Status st = env_disabled() ? Sm90Status{Sm90State::Unavailable, "EXPERTD_DISABLE_SM90 is set"}
                                           : Sm90Status{d.state, d.reason};
      EXPERTD_CHECK(st.state != Sm90State::Unavailable, ErrorCode::InvalidArg,
                    "group_gemm: tile '" + name + "' is unavailable here: " + st.reason);
      EXPERTD_CHECK(expert_maps != nullptr, ErrorCode::InvalidArg,
                    "group_gemm: tile '" + name + "' needs the experts' tensor maps");
    } else {
      if (d.state == Sm90State::Unchecked) {
        // NOTE: the check runs under the lock, so concurrent first callers wait for its verdict.
        const std::string why = self_check(s);
        d.state = why.empty() ? Sm90State::Passed : Sm90State::Failed;
        d.reason = why;
        ensure_alive();  // a sticky fault in the check: the device is lost for every path
      }
      if (d.state != Sm90State::Passed) return false;
    }
  }
  EXPERTD_CHECK(reinterpret_cast<uintptr_t>(x) % 16 == 0, ErrorCode::InvalidArg,
                "group_gemm: x must be 16-byte aligned");
  if (rows <= 0) return true;
  // Auto runs the group-M swizzled order: the fastest order at every load measured on the H200
  // (256 rows/expert 1.27 vs 1.47 ms grid order, 4096 rows 20.1 vs 24.4; persistent in between).
  run_sm90(x, offsets, gate_up, down, num_experts, rows, hidden, inter, h_scratch, y, expert_maps,
           nullptr, order_of(tile == GemmTile::Auto ? GemmTile::Sm90Swizzle : tile), s);
  return true;
}

}  // namespace expertd::cuda
