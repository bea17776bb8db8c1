// Host memory for packed weights, on 2 MiB pages where the kernel lends them.
//
// A decode step streams every weight it reads once from DRAM; on 4 KiB pages that is one TLB miss
// per page per stream, and under a hypervisor each miss walks two page tables. Weights therefore
// come from 2 MiB-aligned mappings advised MADV_HUGEPAGE (transparent huge pages in "madvise"
// mode, the common default): one mapping per weight of kWeightDedicatedBytes or more, and
// kWeightChunkBytes chunks shared by the smaller ones (an MoE's experts are each a few hundred KiB,
// with their scales a second, smaller allocation).
//
// A chunk hands out its bytes in order and does not reuse a freed range; it is unmapped when its
// last weight is freed (the chunk being filled is rewound instead). A model's weights are made at
// load and freed together, so the chunks come and go with the model; a weight that outlives its
// neighbours holds at most its chunk.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace expertd {

constexpr size_t kWeightChunkBytes = size_t{32} << 20;
constexpr size_t kWeightDedicatedBytes = size_t{8} << 20;

/** bytes of zeroed host memory, 64-byte aligned; throws expertd::Error (OutOfMemory) on failure. */
std::shared_ptr<uint8_t> alloc_weight_bytes(size_t bytes, const char* what);

/** What the weight allocator holds now (for tests and metrics). */
struct WeightMemoryStats {
  size_t chunks = 0;           // shared chunks mapped
  size_t dedicated = 0;        // dedicated mappings
  size_t mapped_bytes = 0;     // bytes mapped (chunks + dedicated)
  size_t live_bytes = 0;       // bytes handed out and not yet freed
  size_t live_allocations = 0;
  bool huge_pages = false;     // madvise(MADV_HUGEPAGE) accepted at least once
};
WeightMemoryStats weight_memory_stats();

}  // namespace expertd
