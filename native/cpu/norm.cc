// RMSNorm with fused residual add.
#include "expertd/ops.h"
#include "expertd/errors.h"

namespace expertd {

void rms_norm(const float*, int, int, const float*, float, float*, float*) { fail(ErrorCode::Internal, "not implemented"); }
}  // namespace expertd
