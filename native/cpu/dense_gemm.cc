// DenseGemm: Y = X * W^T over packed weights.
#include "expertd/ops.h"
#include "expertd/errors.h"

namespace expertd {

void dense_gemm(const float*, int, const PackedWeight&, float*, const float*, bool, bool) { fail(ErrorCode::Internal, "not implemented"); }
}  // namespace expertd
