// CUDA backend core: device queries, the error check and device-lost flag, the caching device
// allocator, pinned host memory, streams, events and copies.
#include <algorithm>
#include <atomic>
#include <map>
#include <mutex>
#include <set>
#include <tuple>
#include <vector>

#include "cuda_common.h"

namespace expertd {

namespace {
std::atomic<bool> g_device_lost{false};
}

int cuda_device_count() { return cuda_runtime_status().device_count; }

CudaRuntimeStatus cuda_runtime_status() {
  CudaRuntimeStatus st;
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // no driver / no device: not an error for the caller, but said
    st.error = std::string(cudaGetErrorName(err)) + " (" + cudaGetErrorString(err) + ")";
    n = 0;
  }
  st.device_count = n;
  if (cudaDriverGetVersion(&st.driver_version) != cudaSuccess) st.driver_version = 0;
  if (cudaRuntimeGetVersion(&st.runtime_version) != cudaSuccess) st.runtime_version = 0;
  cudaGetLastError();
  return st;
}

bool cuda_device_lost() { return g_device_lost.load(); }

namespace cuda {

bool is_sticky(cudaError_t err) {
  switch (err) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorAssert:
    case cudaErrorLaunchTimeout:
    case cudaErrorECCUncorrectable:
    case cudaErrorContextIsDestroyed:
      return true;
    default:
      return false;
  }
}

void raise_cuda(cudaError_t err, const char* stmt, const char* file, int line) {
  if (is_sticky(err)) g_device_lost.store(true);
  cudaGetLastError();  // clear a non-sticky error so the next call starts clean
  std::string msg = std::string(cudaGetErrorName(err)) + " (" + cudaGetErrorString(err) +
                    ") in " + stmt + " at " + file + ":" + std::to_string(line);
  if (is_sticky(err)) msg += "; the CUDA device is lost (restart the process)";
  const ErrorCode code = err == cudaErrorMemoryAllocation ? ErrorCode::OutOfMemory : ErrorCode::Cuda;
  throw Error(code, msg);
}

void ensure_alive() {
  if (g_device_lost.load())
    fail(ErrorCode::Cuda, "the CUDA device is lost after an earlier fault (restart the process)");
}

DeviceInfo device_info(int device) {
  cudaDeviceProp prop{};
  EXPERTD_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  DeviceInfo d;
  d.name = prop.name;
  d.cc_major = prop.major;
  d.cc_minor = prop.minor;
  d.sm_count = prop.multiProcessorCount;
  d.total_bytes = prop.totalGlobalMem;
  d.l2_bytes = static_cast<size_t>(prop.l2CacheSize);
  d.smem_per_block_optin = prop.sharedMemPerBlockOptin;
  return d;
}

void set_device(int device) { EXPERTD_CUDA_CHECK(cudaSetDevice(device)); }
int current_device() {
  int d = 0;
  EXPERTD_CUDA_CHECK(cudaGetDevice(&d));
  return d;
}
void device_synchronize() {
  ensure_alive();
  EXPERTD_CUDA_CHECK(cudaDeviceSynchronize());
}
void mem_info(size_t* free_bytes, size_t* total_bytes) {
  EXPERTD_CUDA_CHECK(cudaMemGetInfo(free_bytes, total_bytes));
}

// ---------------------------------------------------------------------------------------------
// Caching allocator.
namespace {

constexpr size_t kMinBlock = 512;

// 8 classes per power of two above 4 KiB (<= 12.5% waste), 512-byte steps below.
size_t size_class(size_t bytes) {
  if (bytes <= kMinBlock) return kMinBlock;
  size_t step = kMinBlock;
  if (bytes > 4096) {
    size_t top = size_t{1} << (63 - __builtin_clzll(static_cast<unsigned long long>(bytes)));
    step = std::max(kMinBlock, top / 8);
  }
  return (bytes + step - 1) / step * step;
}

struct Allocator {
  std::mutex mu;
  // (device, stream, class bytes) -> free blocks. stream nullptr: free for any stream.
  std::map<std::tuple<int, Stream, size_t>, std::vector<void*>> free_lists;
  std::set<Stream> live_streams;
  AllocatorStats stats;
  std::vector<Stream> default_streams;  // per device

  void note_peak() {
    stats.peak_bytes = std::max(stats.peak_bytes, stats.allocated_bytes + stats.cached_bytes);
  }

  // Takes a cached block of exactly `cls` bytes for (device, stream), else nullptr. mu held.
  void* take(int device, Stream s, size_t cls) {
    for (Stream key : {s, static_cast<Stream>(nullptr)}) {
      auto it = free_lists.find({device, key, cls});
      if (it != free_lists.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        stats.cached_bytes -= cls;
        stats.allocated_bytes += cls;
        ++stats.cache_hits;
        return p;
      }
    }
    return nullptr;
  }

  // Frees every cached block of `device` (-1: all). mu held; the device is synchronized first
  // because a cached block may still be in use by work queued before its free.
  void release_cache(int device) {
    int prev = -1;
    cudaGetDevice(&prev);
    for (auto it = free_lists.begin(); it != free_lists.end();) {
      const int d = std::get<0>(it->first);
      if (device >= 0 && d != device) {
        ++it;
        continue;
      }
      cudaSetDevice(d);
      cudaDeviceSynchronize();
      for (void* p : it->second) {
        cudaFree(p);
        stats.cached_bytes -= std::get<2>(it->first);
      }
      it = free_lists.erase(it);
    }
    if (prev >= 0) cudaSetDevice(prev);
    cudaGetLastError();
  }
};

Allocator& allocator() {
  static Allocator* a = new Allocator();  // NOTE: leaked on purpose: outlives every handle
  return *a;
}

}  // namespace

std::shared_ptr<DeviceMem> device_alloc(size_t bytes, Stream stream) {
  ensure_alive();
  Allocator& a = allocator();
  const int device = current_device();
  const size_t cls = size_class(bytes);
  void* p = nullptr;
  {
    std::lock_guard<std::mutex> lock(a.mu);
    p = a.take(device, stream, cls);
    if (!p) {
      cudaError_t err = cudaMalloc(&p, cls);
      if (err == cudaErrorMemoryAllocation) {
        cudaGetLastError();
        a.release_cache(device);
        err = cudaMalloc(&p, cls);
      }
      if (err != cudaSuccess) {
        if (err == cudaErrorMemoryAllocation) {
          cudaGetLastError();
          size_t free_b = 0, total_b = 0;
          cudaMemGetInfo(&free_b, &total_b);
          fail(ErrorCode::OutOfMemory,
               "CUDA out of memory allocating " + std::to_string(bytes) + " bytes on device " +
                   std::to_string(device) + " (" + std::to_string(free_b) + " of " +
                   std::to_string(total_b) + " bytes free)");
        }
        raise_cuda(err, "cudaMalloc(&p, cls)", __FILE__, __LINE__);
      }
      a.stats.allocated_bytes += cls;
      ++a.stats.device_mallocs;
      a.note_peak();
    }
  }
  auto m = std::make_shared<DeviceMem>();
  m->ptr = p;
  m->size = bytes;
  m->capacity = cls;
  m->device = device;
  m->stream = stream;
  return m;
}

DeviceMem::~DeviceMem() {
  if (!ptr) return;
  Allocator& a = allocator();
  std::lock_guard<std::mutex> lock(a.mu);
  Stream key = a.live_streams.count(stream) ? stream : nullptr;
  a.free_lists[{device, key, capacity}].push_back(ptr);
  a.stats.allocated_bytes -= capacity;
  a.stats.cached_bytes += capacity;
}

AllocatorStats allocator_stats() {
  Allocator& a = allocator();
  std::lock_guard<std::mutex> lock(a.mu);
  return a.stats;
}

void empty_cache() {
  Allocator& a = allocator();
  std::lock_guard<std::mutex> lock(a.mu);
  a.release_cache(-1);
}

void* pinned_alloc(size_t bytes) {
  ensure_alive();
  void* p = nullptr;
  cudaError_t err = cudaHostAlloc(&p, std::max<size_t>(bytes, 1), cudaHostAllocPortable);
  if (err == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    fail(ErrorCode::OutOfMemory, "cudaHostAlloc could not pin " + std::to_string(bytes) +
                                     " bytes of host memory");
  }
  if (err != cudaSuccess) raise_cuda(err, "cudaHostAlloc(&p, bytes, cudaHostAllocPortable)", __FILE__, __LINE__);
  return p;
}

void pinned_free(void* p) noexcept {
  if (p && cudaFreeHost(p) != cudaSuccess) cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------
// Streams and events.
Stream default_stream() {
  Allocator& a = allocator();
  const int device = current_device();
  std::lock_guard<std::mutex> lock(a.mu);
  if (a.default_streams.size() <= static_cast<size_t>(device))
    a.default_streams.resize(device + 1, nullptr);
  if (!a.default_streams[device]) {
    cudaStream_t s = nullptr;
    EXPERTD_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    a.default_streams[device] = s;
    a.live_streams.insert(s);
  }
  return a.default_streams[device];
}

Stream stream_create(int priority) {
  ensure_alive();
  cudaStream_t s = nullptr;
  EXPERTD_CUDA_CHECK(cudaStreamCreateWithPriority(&s, cudaStreamNonBlocking, priority));
  Allocator& a = allocator();
  std::lock_guard<std::mutex> lock(a.mu);
  a.live_streams.insert(s);
  return s;
}

void stream_destroy(Stream s) noexcept {
  if (!s) return;
  cudaStreamSynchronize(s);
  {
    Allocator& a = allocator();
    std::lock_guard<std::mutex> lock(a.mu);
    a.live_streams.erase(s);
    // Its blocks are idle now (synchronized): hand them to every stream.
    for (auto it = a.free_lists.begin(); it != a.free_lists.end();) {
      if (std::get<1>(it->first) != s) {
        ++it;
        continue;
      }
      auto& dst = a.free_lists[{std::get<0>(it->first), nullptr, std::get<2>(it->first)}];
      dst.insert(dst.end(), it->second.begin(), it->second.end());
      it = a.free_lists.erase(it);
    }
  }
  cudaStreamDestroy(s);
  cudaGetLastError();
}

void stream_synchronize(Stream s) {
  ensure_alive();
  EXPERTD_CUDA_CHECK(cudaStreamSynchronize(or_default(s)));
}

bool stream_query(Stream s) {
  ensure_alive();
  cudaError_t err = cudaStreamQuery(or_default(s));
  if (err == cudaErrorNotReady) {
    cudaGetLastError();
    return false;
  }
  EXPERTD_CUDA_CHECK(err);
  return true;
}

void stream_wait_event(Stream s, Event e) {
  EXPERTD_CUDA_CHECK(cudaStreamWaitEvent(or_default(s), e, 0));
}

void stream_priority_range(int* least, int* greatest) {
  EXPERTD_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(least, greatest));
}

Event event_create(bool timing) {
  ensure_alive();
  cudaEvent_t e = nullptr;
  EXPERTD_CUDA_CHECK(cudaEventCreateWithFlags(&e, timing ? cudaEventDefault : cudaEventDisableTiming));
  return e;
}

void event_destroy(Event e) noexcept {
  if (e && cudaEventDestroy(e) != cudaSuccess) cudaGetLastError();
}

void event_record(Event e, Stream s) { EXPERTD_CUDA_CHECK(cudaEventRecord(e, or_default(s))); }
void event_synchronize(Event e) {
  ensure_alive();
  EXPERTD_CUDA_CHECK(cudaEventSynchronize(e));
}
bool event_query(Event e) {
  cudaError_t err = cudaEventQuery(e);
  if (err == cudaErrorNotReady) {
    cudaGetLastError();
    return false;
  }
  EXPERTD_CUDA_CHECK(err);
  return true;
}
float event_elapsed_ms(Event start, Event end) {
  float ms = 0.0f;
  EXPERTD_CUDA_CHECK(cudaEventElapsedTime(&ms, start, end));
  return ms;
}

void memcpy_h2d(void* dst, const void* src, size_t bytes, Stream s) {
  ensure_alive();
  if (bytes) EXPERTD_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, or_default(s)));
}
void memcpy_d2h(void* dst, const void* src, size_t bytes, Stream s) {
  ensure_alive();
  if (bytes) EXPERTD_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, or_default(s)));
}
void memcpy_d2d(void* dst, const void* src, size_t bytes, Stream s) {
  ensure_alive();
  if (bytes) EXPERTD_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, or_default(s)));
}
void memset_async(void* dst, int byte, size_t bytes, Stream s) {
  ensure_alive();
  if (bytes) EXPERTD_CUDA_CHECK(cudaMemsetAsync(dst, byte, bytes, or_default(s)));
}

}  // namespace cuda
}  // namespace expertd
