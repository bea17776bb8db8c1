// Routing: gate logits to expert ids, weights and counts.
#include "expertd/ops.h"
#include "expertd/errors.h"

namespace expertd {

void route(const float*, const RoutingParams&, int32_t*, float*, int32_t*) { fail(ErrorCode::Internal, "not implemented"); }
}  // namespace expertd
