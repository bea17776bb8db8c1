// Embedding gather and dtype conversions.
#include "expertd/ops.h"
#include "expertd/errors.h"

namespace expertd {

void embedding(const void*, DType, int, int, const int32_t*, int, float*) { fail(ErrorCode::Internal, "not implemented"); }
void convert(const void*, DType, void*, DType, size_t) { fail(ErrorCode::Internal, "not implemented"); }
void dequant_fp8_block(const uint8_t*, const float*, int, int, int, int, uint16_t*) { fail(ErrorCode::Internal, "not implemented"); }
}  // namespace expertd
