// Host memory for packed weights on 2 MiB pages (see weight_memory.h).
#include "expertd/weight_memory.h"

#include <cstdlib>
#include <cstring>
#include <iterator>
#include <map>
#include <mutex>
#include <string>

#include "expertd/errors.h"

#if defined(__linux__)
#include <sys/mman.h>
#define EXPERTD_WEIGHT_MMAP 1
#else
#define EXPERTD_WEIGHT_MMAP 0
#endif

namespace expertd {

namespace {

constexpr size_t kAlign = 64;

size_t round_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

[[noreturn]] void out_of_memory(size_t bytes, const char* what) {
  fail(ErrorCode::OutOfMemory,
       "out of host memory for " + std::string(what) + " of " + std::to_string(bytes) + " bytes");
}

std::shared_ptr<uint8_t> heap_bytes(size_t n, size_t bytes, const char* what) {
  void* p = std::aligned_alloc(kAlign, n);
  if (!p) out_of_memory(bytes, what);
  std::memset(p, 0, n);
  return std::shared_ptr<uint8_t>(static_cast<uint8_t*>(p), [](uint8_t* q) { std::free(q); });
}

#if EXPERTD_WEIGHT_MMAP
constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kPage = 4096;

struct Chunk {
  size_t size = 0;  // mapped bytes
  size_t used = 0;  // bytes handed out (in order; freed ranges are not reused)
  size_t live = 0;  // allocations not yet freed
};

struct State {
  std::mutex mu;
  std::map<uintptr_t, Chunk> chunks;  // by base address
  uintptr_t current = 0;              // the chunk being filled (0: none)
  size_t dedicated = 0, dedicated_bytes = 0, live_bytes = 0, live_allocations = 0;
  bool huge_pages = false;
};

// Never destroyed: weights can be freed by finalizers that run after static destructors.
State& state() {
  static State* s = new State();
  return *s;
}

// `length` (a multiple of 4 KiB) of zeroed memory starting on a 2 MiB boundary, advised
// MADV_HUGEPAGE (refused where transparent huge pages are off: then plain pages); null on failure.
uint8_t* map_aligned(State& st, size_t length) {
  void* p = ::mmap(nullptr, length + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return nullptr;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const uintptr_t b = round_up(a, kHugePage);
  if (b > a) ::munmap(p, b - a);
  const uintptr_t end = a + length + kHugePage;
  if (end > b + length) ::munmap(reinterpret_cast<void*>(b + length), end - (b + length));
#if defined(MADV_HUGEPAGE)
  if (::madvise(reinterpret_cast<void*>(b), length, MADV_HUGEPAGE) == 0) st.huge_pages = true;
#endif
  return reinterpret_cast<uint8_t*>(b);
}

void free_dedicated(uint8_t* p, size_t length, size_t bytes) {
  State& st = state();
  {
    std::lock_guard<std::mutex> lk(st.mu);
    --st.dedicated;
    st.dedicated_bytes -= length;
    st.live_bytes -= bytes;
    --st.live_allocations;
  }
  ::munmap(p, length);
}

void free_shared(uint8_t* p, size_t bytes) {
  State& st = state();
  uintptr_t unmap = 0;
  size_t unmap_size = 0;
  {
    std::lock_guard<std::mutex> lk(st.mu);
    auto it = st.chunks.upper_bound(reinterpret_cast<uintptr_t>(p));
    if (it == st.chunks.begin()) return;  // not ours (cannot happen: the deleter is only ours)
    --it;
    st.live_bytes -= bytes;
    --st.live_allocations;
    if (--it->second.live > 0) return;
    // The chunk's last weight: unmap it (the one being filled too, so that a disposed model
    // leaves nothing mapped).
    unmap = it->first;
    unmap_size = it->second.size;
    if (st.current == unmap) st.current = 0;
    st.chunks.erase(it);
  }
  ::munmap(reinterpret_cast<void*>(unmap), unmap_size);
}
#endif

}  // namespace

std::shared_ptr<uint8_t> alloc_weight_bytes(size_t bytes, const char* what) {
  const size_t n = round_up(bytes > 0 ? bytes : 1, kAlign);
#if EXPERTD_WEIGHT_MMAP
  // EXPERTD_HUGE_PAGES=0: the C heap, as before (read per call, so that one process can hold both).
  const char* env = std::getenv("EXPERTD_HUGE_PAGES");
  if (env && std::strcmp(env, "0") == 0) return heap_bytes(n, bytes, what);
  State& st = state();
  if (n >= kWeightDedicatedBytes) {
    const size_t length = round_up(n, kPage);
    uint8_t* p = map_aligned(st, length);
    if (!p) out_of_memory(bytes, what);
    {
      std::lock_guard<std::mutex> lk(st.mu);
      ++st.dedicated;
      st.dedicated_bytes += length;
      st.live_bytes += n;
      ++st.live_allocations;
    }
    return std::shared_ptr<uint8_t>(p, [length, n](uint8_t* q) { free_dedicated(q, length, n); });
  }
  uint8_t* p = nullptr;
  {
    std::lock_guard<std::mutex> lk(st.mu);
    auto cur = st.current ? st.chunks.find(st.current) : st.chunks.end();
    if (cur == st.chunks.end() || cur->second.used + n > cur->second.size) {
      // A full chunk stays mapped while its weights live (the last one's free unmaps it).
      uint8_t* base = map_aligned(st, kWeightChunkBytes);
      if (!base) out_of_memory(bytes, what);
      cur = st.chunks.emplace(reinterpret_cast<uintptr_t>(base), Chunk{kWeightChunkBytes, 0, 0}).first;
      st.current = cur->first;
    }
    p = reinterpret_cast<uint8_t*>(cur->first + cur->second.used);
    cur->second.used += n;
    ++cur->second.live;
    st.live_bytes += n;
    ++st.live_allocations;
  }
  // Fresh chunk memory is zero already; a chunk is never rewound, so no range is handed out twice.
  return std::shared_ptr<uint8_t>(p, [n](uint8_t* q) { free_shared(q, n); });
#else
  return heap_bytes(n, bytes, what);
#endif
}

WeightMemoryStats weight_memory_stats() {
  WeightMemoryStats out;
#if EXPERTD_WEIGHT_MMAP
  State& st = state();
  std::lock_guard<std::mutex> lk(st.mu);
  out.chunks = st.chunks.size();
  out.dedicated = st.dedicated;
  out.mapped_bytes = st.chunks.size() * kWeightChunkBytes + st.dedicated_bytes;
  out.live_bytes = st.live_bytes;
  out.live_allocations = st.live_allocations;
  out.huge_pages = st.huge_pages;
#endif
  return out;
}

}  // namespace expertd
