// DenseGemm: cuBLASLt (libcublasLt.so.13/.12 loaded with dlopen at first use, never linked, found
// by cuda_libs.cc: $EXPERTD_CUBLASLT_SO, the pip wheels' nvidia/cu13/lib, the loader path) with a
// bias epilogue and beta = 1 for accumulate, and the in-house tensor-core kernel as fallback.
#include <dlfcn.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <tuple>

#include "cuda_common.h"

namespace expertd::cuda {
namespace {

// The few cuBLASLt types and constants used here (values from cublasLt.h, stable since 11.x).
using cublasStatus_t = int;
using cublasLtHandle_t = void*;
using cublasLtMatmulDesc_t = void*;
using cublasLtMatrixLayout_t = void*;
using cublasLtMatmulPreference_t = void*;
struct cublasLtMatmulAlgo_t {
  uint64_t data[8];
};
struct cublasLtMatmulHeuristicResult_t {
  cublasLtMatmulAlgo_t algo;
  size_t workspaceSize;
  cublasStatus_t state;
  float wavesCount;
  int reserved[4];
};
constexpr int CUBLAS_STATUS_SUCCESS = 0;
constexpr int CUBLAS_COMPUTE_32F = 68;
constexpr int CUDA_R_32F_ = 0;
constexpr int CUDA_R_16BF_ = 14;
constexpr int CUBLAS_OP_N = 0;
constexpr int CUBLAS_OP_T = 1;
constexpr int CUBLASLT_MATMUL_DESC_TRANSA = 3;
constexpr int CUBLASLT_MATMUL_DESC_TRANSB = 4;
constexpr int CUBLASLT_MATMUL_DESC_EPILOGUE = 7;
constexpr int CUBLASLT_MATMUL_DESC_BIAS_POINTER = 8;
constexpr uint32_t CUBLASLT_EPILOGUE_DEFAULT = 1;
constexpr uint32_t CUBLASLT_EPILOGUE_BIAS = 4;
constexpr int CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES = 1;
constexpr int CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES = 5;  // B, C, D: 6, 7, 8 (uint32_t)
constexpr size_t kWorkspaceBytes = size_t{32} << 20;

struct Lt {
  void* lib = nullptr;
  std::string path;
  cublasStatus_t (*create)(cublasLtHandle_t*) = nullptr;
  cublasStatus_t (*desc_create)(cublasLtMatmulDesc_t*, int, int) = nullptr;
  cublasStatus_t (*desc_destroy)(cublasLtMatmulDesc_t) = nullptr;
  cublasStatus_t (*desc_set)(cublasLtMatmulDesc_t, int, const void*, size_t) = nullptr;
  cublasStatus_t (*layout_create)(cublasLtMatrixLayout_t*, int, uint64_t, uint64_t, int64_t) = nullptr;
  cublasStatus_t (*layout_destroy)(cublasLtMatrixLayout_t) = nullptr;
  cublasStatus_t (*pref_create)(cublasLtMatmulPreference_t*) = nullptr;
  cublasStatus_t (*pref_destroy)(cublasLtMatmulPreference_t) = nullptr;
  cublasStatus_t (*pref_set)(cublasLtMatmulPreference_t, int, const void*, size_t) = nullptr;
  cublasStatus_t (*heuristic)(cublasLtHandle_t, cublasLtMatmulDesc_t, cublasLtMatrixLayout_t,
                              cublasLtMatrixLayout_t, cublasLtMatrixLayout_t,
                              cublasLtMatrixLayout_t, cublasLtMatmulPreference_t, int,
                              cublasLtMatmulHeuristicResult_t*, int*) = nullptr;
  cublasStatus_t (*matmul)(cublasLtHandle_t, cublasLtMatmulDesc_t, const void*, const void*,
                           cublasLtMatrixLayout_t, const void*, cublasLtMatrixLayout_t,
                           const void*, const void*, cublasLtMatrixLayout_t, void*,
                           cublasLtMatrixLayout_t, const cublasLtMatmulAlgo_t*, void*, size_t,
                           cudaStream_t) = nullptr;
  const char* (*status_string)(cublasStatus_t) = nullptr;  // optional
};

template <typename F>
bool bind(void* lib, const char* name, F& fn) {
  fn = reinterpret_cast<F>(dlsym(lib, name));
  return fn != nullptr;
}

const Lt* load_lt() {
  static std::once_flag once;
  static Lt lt;
  static bool ok = false;
  std::call_once(once, [] {
    const LoadedLibrary& found = cublaslt_load();
    if (!found.handle) return;
    lt.lib = found.handle;
    lt.path = found.path;
    ok = bind(lt.lib, "cublasLtCreate", lt.create) &&
         bind(lt.lib, "cublasLtMatmulDescCreate", lt.desc_create) &&
         bind(lt.lib, "cublasLtMatmulDescDestroy", lt.desc_destroy) &&
         bind(lt.lib, "cublasLtMatmulDescSetAttribute", lt.desc_set) &&
         bind(lt.lib, "cublasLtMatrixLayoutCreate", lt.layout_create) &&
         bind(lt.lib, "cublasLtMatrixLayoutDestroy", lt.layout_destroy) &&
         bind(lt.lib, "cublasLtMatmulPreferenceCreate", lt.pref_create) &&
         bind(lt.lib, "cublasLtMatmulPreferenceDestroy", lt.pref_destroy) &&
         bind(lt.lib, "cublasLtMatmulPreferenceSetAttribute", lt.pref_set) &&
         bind(lt.lib, "cublasLtMatmulAlgoGetHeuristic", lt.heuristic) &&
         bind(lt.lib, "cublasLtMatmul", lt.matmul);
    bind(lt.lib, "cublasLtGetStatusString", lt.status_string);
  });
  return ok ? &lt : nullptr;
}

[[noreturn]] void raise_cublas(const Lt& lt, cublasStatus_t st, const char* stmt, const char* file,
                               int line) {
  std::string name = lt.status_string ? lt.status_string(st) : "CUBLAS_STATUS_" + std::to_string(st);
  fail(ErrorCode::Cuda, "cuBLASLt " + name + " in " + stmt + " at " + file + ":" + std::to_string(line));
}

#define EXPERTD_CUBLAS_CHECK(lt, stmt)                                                \
  do {                                                                                \
    cublasStatus_t expertd_st_ = (stmt);                                              \
    if (expertd_st_ != CUBLAS_STATUS_SUCCESS)                                         \
      raise_cublas((lt), expertd_st_, #stmt, __FILE__, __LINE__);                     \
  } while (0)

// One handle per (thread, device): handles are cheap, and this keeps calls from two engine
// workers independent.
cublasLtHandle_t handle_for(const Lt& lt, int device) {
  thread_local std::map<int, cublasLtHandle_t> handles;
  auto it = handles.find(device);
  if (it != handles.end()) return it->second;
  cublasLtHandle_t h = nullptr;
  EXPERTD_CUBLAS_CHECK(lt, lt.create(&h));
  handles[device] = h;
  return h;
}

// The largest power of two, up to 256, that divides p's address. cuBLASLt's heuristic assumes
// 256-byte aligned operands unless told otherwise, and an algorithm picked for that may not run
// on less aligned ones; the binding guarantees 16.
uint32_t alignment_of(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  uint32_t align = 256;
  while (align > 1 && a % align) align >>= 1;
  return align;
}

// Descriptors and the chosen algorithm per (shape, operand alignment), built once (heuristics
// cost tens of us).
struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  size_t workspace = 0;
};

const Plan& plan_for(const Lt& lt, cublasLtHandle_t h, int device, int m, int n, int k,
                     bool bias, uint32_t align) {
  using Key = std::tuple<int, int, int, int, bool, uint32_t>;
  thread_local std::map<Key, Plan> plans;
  const Key key{device, m, n, k, bias, align};
  auto it = plans.find(key);
  if (it != plans.end()) return it->second;
  // Row-major Y[m, n] = X[m, k] W[n, k]^T is column-major Y^T[n, m] = W^T(op T on W as k x n)
  // times X^T (k x m): A = W (k x n, ld k, transposed), B = X (k x m, ld k), D = Y^T (n x m, ld n).
  Plan p;
  EXPERTD_CUBLAS_CHECK(lt, lt.desc_create(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F_));
  const int32_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  EXPERTD_CUBLAS_CHECK(lt, lt.desc_set(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  EXPERTD_CUBLAS_CHECK(lt, lt.desc_set(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  const uint32_t epi = bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
  EXPERTD_CUBLAS_CHECK(lt, lt.desc_set(p.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
  EXPERTD_CUBLAS_CHECK(lt, lt.layout_create(&p.a, CUDA_R_16BF_, k, n, k));
  EXPERTD_CUBLAS_CHECK(lt, lt.layout_create(&p.b, CUDA_R_16BF_, k, m, k));
  EXPERTD_CUBLAS_CHECK(lt, lt.layout_create(&p.c, CUDA_R_32F_, n, m, n));
  cublasLtMatmulPreference_t pref = nullptr;
  EXPERTD_CUBLAS_CHECK(lt, lt.pref_create(&pref));
  const uint64_t ws = kWorkspaceBytes;
  EXPERTD_CUBLAS_CHECK(lt, lt.pref_set(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  for (int attr = CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES; attr <= CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES + 3; ++attr)
    EXPERTD_CUBLAS_CHECK(lt, lt.pref_set(pref, attr, &align, sizeof(align)));
  if (bias) {
    // The heuristic looks at the bias pointer's alignment only: a fake address of that alignment.
    const void* fake = reinterpret_cast<const void*>(uintptr_t{align});
    EXPERTD_CUBLAS_CHECK(lt, lt.desc_set(p.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &fake, sizeof(fake)));
  }
  cublasLtMatmulHeuristicResult_t res{};
  int found = 0;
  cublasStatus_t st = lt.heuristic(h, p.desc, p.a, p.b, p.c, p.c, pref, 1, &res, &found);
  lt.pref_destroy(pref);
  if (st != CUBLAS_STATUS_SUCCESS || found == 0) {
    lt.desc_destroy(p.desc);
    lt.layout_destroy(p.a);
    lt.layout_destroy(p.b);
    lt.layout_destroy(p.c);
    fail(ErrorCode::Cuda, "cuBLASLt has no algorithm for m=" + std::to_string(m) + " n=" +
                              std::to_string(n) + " k=" + std::to_string(k));
  }
  p.algo = res.algo;
  p.workspace = res.workspaceSize;
  return plans.emplace(key, p).first->second;
}

void lt_gemm(const Lt& lt, const uint16_t* x, int m, const uint16_t* w, int n, int k, float* y,
             const float* bias, bool accumulate, Stream s) {
  const int device = current_device();
  cublasLtHandle_t h = handle_for(lt, device);
  const uint32_t align = std::min({alignment_of(x), alignment_of(w), alignment_of(y),
                                   bias ? alignment_of(bias) : 256u});
  const Plan& p = plan_for(lt, h, device, m, n, k, bias != nullptr, align);
  if (bias)
    EXPERTD_CUBLAS_CHECK(lt, lt.desc_set(p.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
  std::shared_ptr<DeviceMem> ws;
  if (p.workspace) ws = device_alloc(p.workspace, s);  // cached: no cudaMalloc after the first
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  EXPERTD_CUBLAS_CHECK(lt, lt.matmul(h, p.desc, &alpha, w, p.a, x, p.b, &beta, y, p.c, y, p.c,
                                     &p.algo, ws ? ws->ptr : nullptr, p.workspace, s));
}

}  // namespace

bool cublaslt_available() { return load_lt() != nullptr; }
std::string cublaslt_library() {
  const Lt* lt = load_lt();
  return lt ? lt->path : std::string();
}

DenseBackend dense_gemm(const uint16_t* x, int m, const uint16_t* w, int n, int k, float* y,
                        const float* bias, bool accumulate, DenseBackend backend, Stream s) {
  ensure_alive();
  s = or_default(s);
  if (m <= 0 || n <= 0) return backend == DenseBackend::CublasLt ? backend : DenseBackend::Kernel;
  const Lt* lt = load_lt();
  if (backend == DenseBackend::CublasLt && !lt) {
    std::string tried;
    for (const std::string& t : cublaslt_load().tried) tried += (tried.empty() ? "" : "; ") + t;
    fail(ErrorCode::Cuda, "cuBLASLt was requested but libcublasLt.so.13/.12 could not be loaded "
                          "(tried " + tried + "; install the CUDA math libraries or set EXPERTD_CUBLASLT_SO)");
  }
  if (backend != DenseBackend::Kernel && lt) {
    lt_gemm(*lt, x, m, w, n, k, y, bias, accumulate, s);
    return DenseBackend::CublasLt;
  }
  dense_gemm_kernel(x, m, w, n, k, y, bias, accumulate, s);
  return DenseBackend::Kernel;
}

}  // namespace expertd::cuda
