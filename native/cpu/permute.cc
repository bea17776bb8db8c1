// Permute token rows to expert-contiguous order and back with the weighted combine.
#include "expertd/ops.h"
#include "expertd/errors.h"

namespace expertd {

void permute_rows(const float*, int, int, const int32_t*, int, int, float*, int32_t*, int32_t*) { fail(ErrorCode::Internal, "not implemented"); }
void unpermute_combine(const float*, const int32_t*, const float*, int, int, int, float*, bool) { fail(ErrorCode::Internal, "not implemented"); }
}  // namespace expertd
