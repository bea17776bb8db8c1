// GroupGemm: the fused expert FFN over all experts of a layer.
#include "expertd/ops.h"
#include "expertd/errors.h"

namespace expertd {

void group_gemm_ffn(const float*, const int32_t*, int, const PackedWeight* const*, const PackedWeight* const*, int, int, float*, bool) { fail(ErrorCode::Internal, "not implemented"); }
}  // namespace expertd
