// Error type shared by every native layer: kernels throw expertd::Error, the addon turns it into
// a JS error with a `code` (E_INVALID_ARG, E_OOM, E_CUDA, E_NCCL, E_COMM, E_DISPOSED, E_IO,
// E_UNSUPPORTED). Nothing aborts.
#pragma once
#include <stdexcept>
#include <string>

namespace expertd {

enum class ErrorCode { InvalidArg, Range, OutOfMemory, Cuda, Nccl, Disposed, Io, Internal, Comm, Unsupported };

inline const char* error_code_name(ErrorCode c) {
  switch (c) {
    case ErrorCode::InvalidArg: return "E_INVALID_ARG";
    case ErrorCode::Range: return "E_INVALID_ARG";
    case ErrorCode::OutOfMemory: return "E_OOM";
    case ErrorCode::Cuda: return "E_CUDA";
    case ErrorCode::Nccl: return "E_NCCL";
    case ErrorCode::Disposed: return "E_DISPOSED";
    case ErrorCode::Io: return "E_IO";
    case ErrorCode::Comm: return "E_COMM";
    case ErrorCode::Unsupported: return "E_UNSUPPORTED";
    default: return "E_INTERNAL";
  }
}

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& msg) : std::runtime_error(msg), code_(code) {}
  ErrorCode code() const { return code_; }

 private:
  ErrorCode code_;
};

[[noreturn]] inline void fail(ErrorCode code, const std::string& msg) { throw Error(code, msg); }

}  // namespace expertd

// Checks an internal invariant or a caller contract; reports the statement, file and line.
#define EXPERTD_CHECK(cond, code, msg)                                                          \
  do {                                                                                          \
    if (!(cond))                                                                                \
      ::expertd::fail((code), std::string(msg) + " (" #cond " at " __FILE__ ":" +              \
                                  std::to_string(__LINE__) + ")");                              \
  } while (0)
