// Rotary position embedding (rotate-half and interleaved, partial rotary).
#include "expertd/ops.h"
#include "expertd/errors.h"

namespace expertd {

void rope(float*, int, int, int, int, int, const int32_t*, const float*, int, float, bool) { fail(ErrorCode::Internal, "not implemented"); }
}  // namespace expertd
