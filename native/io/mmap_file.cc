// Read-only file mapping and positioned reads (see io.h).
#include "expertd/io.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "expertd/errors.h"

namespace expertd {

MappedFile map_file(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(ErrorCode::Io, "cannot open " + path + ": " + std::strerror(errno));
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    fail(ErrorCode::Io, "cannot stat " + path + ": " + std::strerror(err));
  }
  MappedFile m;
  m.size = static_cast<size_t>(st.st_size);
  if (m.size > 0) {
    void* p = ::mmap(nullptr, m.size, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
      int err = errno;
      ::close(fd);
      fail(ErrorCode::Io, "cannot map " + path + ": " + std::strerror(err));
    }
    m.data = p;
  }
  ::close(fd);
  return m;
}

void unmap_file(MappedFile& m) {
  if (m.data) ::munmap(m.data, m.size);
  m.data = nullptr;
  m.size = 0;
}

void drop_file_pages(const MappedFile& m) {
  if (m.data && m.size > 0) ::madvise(m.data, m.size, MADV_DONTNEED);  // advisory: an error changes nothing
}

void read_file_range(const std::string& path, uint64_t offset, void* dst, size_t length) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(ErrorCode::Io, "cannot open " + path + ": " + std::strerror(errno));
  size_t done = 0;
  while (done < length) {
    ssize_t r = ::pread(fd, static_cast<char*>(dst) + done, length - done,
                        static_cast<off_t>(offset + done));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      int err = r < 0 ? errno : 0;
      ::close(fd);
      fail(ErrorCode::Io, "short read of " + path + " at " + std::to_string(offset + done) +
                              (err ? std::string(": ") + std::strerror(err) : ": end of file"));
    }
    done += static_cast<size_t>(r);
  }
  ::close(fd);
}

}  // namespace expertd
