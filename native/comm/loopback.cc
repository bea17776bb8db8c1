// Loopback comm: in-process ranks (worker threads) exchanging through shared memory. For tests
// and one-process simulation of expert parallelism; never for traffic between machines.
#include "expertd/comm.h"
#include "expertd/errors.h"

namespace expertd {

std::shared_ptr<Comm> loopback_join(const std::string&, int, int, int) {
  fail(ErrorCode::Internal, "not implemented");
}

}  // namespace expertd
