// Attention over the paged KV cache (prefill and decode, GQA, sliding window, MLA dims).
#include "expertd/ops.h"
#include "expertd/errors.h"

namespace expertd {

void paged_attention(const float*, const float*, const float*, const int32_t*, const int32_t*, const AttentionParams&, float*) { fail(ErrorCode::Internal, "not implemented"); }
void kv_cache_write(const float*, const float*, int, const int32_t*, float*, float*, int, int, int, int) { fail(ErrorCode::Internal, "not implemented"); }
}  // namespace expertd
