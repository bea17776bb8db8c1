// The one ordering every top-k in expertd uses: larger value first, ties to the lower index, NaN
// after everything (so a NaN row still yields valid, deterministic ids). A strict total order.
#pragma once
#include <cstdint>

namespace expertd {

inline bool rank_before(float va, int32_t ia, float vb, int32_t ib) {
  const bool na = va != va, nb = vb != vb;
  if (na || nb) return na == nb ? ia < ib : nb;
  if (va != vb) return va > vb;
  return ia < ib;
}

}  // namespace expertd
