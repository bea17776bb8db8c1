// Weight packing into the 16-row blocked layout (see ops.h).
#include "expertd/ops.h"
#include "expertd/errors.h"

namespace expertd {

std::shared_ptr<PackedWeight> alloc_packed_weight(DType, WeightKind, int, int) { fail(ErrorCode::Internal, "not implemented"); }
void pack_weight(PackedWeight&, const void*, DType) { fail(ErrorCode::Internal, "not implemented"); }
void pack_gate_up(PackedWeight&, const void*, const void*, DType) { fail(ErrorCode::Internal, "not implemented"); }
float packed_weight_at(const PackedWeight&, int, int) { fail(ErrorCode::Internal, "not implemented"); }
}  // namespace expertd
