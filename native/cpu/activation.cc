// SiLU(gate) * up.
#include "expertd/ops.h"
#include "expertd/errors.h"

namespace expertd {

void silu_mul(const float*, int, int, float*) { fail(ErrorCode::Internal, "not implemented"); }
}  // namespace expertd
