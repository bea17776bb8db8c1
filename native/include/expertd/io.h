// File mapping and positioned reads for checkpoint loading and the offloader's slow tier.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace expertd {

struct MappedFile {
  void* data = nullptr;
  size_t size = 0;
};

// Maps a whole file read-only (E_IO with the path and errno text on failure).
MappedFile map_file(const std::string& path);
void unmap_file(MappedFile& m);
// Drops the mapping's resident pages from this process (MADV_DONTNEED: a later read faults them
// back in from the file, or from the page cache). Only for map_file's mappings: on anonymous memory
// the same call would zero it.
void drop_file_pages(const MappedFile& m);
// Reads exactly `length` bytes at `offset` of `path` into dst with pread (real I/O, no mapping).
void read_file_range(const std::string& path, uint64_t offset, void* dst, size_t length);

}  // namespace expertd
