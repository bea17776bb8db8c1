// Routing: gate logits to expert ids, weights and counts, with the semantics of HF transformers'
// routers (Mixtral/Qwen softmax top-k, DeepSeek-V2 group_limited_greedy, DeepSeek-V3 noaux_tc).
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "expertd/errors.h"
#include "expertd/ops.h"
#include "parallel_rows.h"
#include "rank_order.h"

namespace expertd {

namespace {

// Per-thread scratch, grown once to the largest E seen (no allocation at steady state).
struct RouteScratch {
  std::vector<float> score;   // [E] unbiased scores (the weights)
  std::vector<float> choice;  // [E] scores used to choose (score + bias)
  std::vector<uint8_t> keep;  // [E] 1 if the expert's group survived
  std::vector<float> group;   // [n_group] group scores
  std::vector<float> gbest_v;    // [n_group] best groups (scores)
  std::vector<int32_t> gbest_i;  // [n_group] best groups (indices)
};

RouteScratch& scratch_for(int e, int n_group) {
  thread_local RouteScratch s;
  if (s.score.size() < static_cast<size_t>(e)) {
    s.score.resize(e);
    s.choice.resize(e);
    s.keep.resize(e);
  }
  if (s.group.size() < static_cast<size_t>(n_group)) {
    s.group.resize(n_group);
    s.gbest_v.resize(n_group);
    s.gbest_i.resize(n_group);
  }
  return s;
}

// Inserts (v, i) into the descending list best[0..n) of capacity cap (ties: lower index first;
// the caller visits indices in ascending order, so an equal later value never displaces).
inline void insert_top(float v, int32_t i, float* best_v, int32_t* best_i, int& n, int cap) {
  if (n == cap && !rank_before(v, i, best_v[n - 1], best_i[n - 1])) return;
  int pos = n < cap ? n++ : cap - 1;
  while (pos > 0 && rank_before(v, i, best_v[pos - 1], best_i[pos - 1])) {
    best_v[pos] = best_v[pos - 1];
    best_i[pos] = best_i[pos - 1];
    --pos;
  }
  best_v[pos] = v;
  best_i[pos] = i;
}

void route_token(const float* logits, const RoutingParams& p, int32_t* ids, float* weights) {
  const int e = p.num_experts;
  const int k = p.top_k;
  RouteScratch& s = scratch_for(e, p.n_group);
  float* score = s.score.data();
  float* choice = s.choice.data();

  if (p.scoring == Scoring::Softmax) {
    // HF: F.softmax(logits, dim=-1, dtype=float32), max-subtracted.
    float mx = -std::numeric_limits<float>::infinity();
    for (int i = 0; i < e; ++i) mx = logits[i] > mx ? logits[i] : mx;
    double sum = 0.0;
    for (int i = 0; i < e; ++i) {
      score[i] = std::exp(logits[i] - mx);
      sum += score[i];
    }
    const float inv = static_cast<float>(1.0 / sum);
    for (int i = 0; i < e; ++i) score[i] *= inv;
  } else {
    for (int i = 0; i < e; ++i) score[i] = 1.0f / (1.0f + std::exp(-logits[i]));
  }
  if (p.bias) {
    for (int i = 0; i < e; ++i) choice[i] = score[i] + p.bias[i];
  } else {
    std::memcpy(choice, score, sizeof(float) * e);
  }

  // Group-limited selection: only experts of the topk_group best groups may be chosen.
  const uint8_t* keep = nullptr;
  if (p.n_group > 1 && p.topk_group < p.n_group) {
    const int gs = e / p.n_group;
    float* group = s.group.data();
    for (int g = 0; g < p.n_group; ++g) {
      const float* c = choice + static_cast<size_t>(g) * gs;
      if (p.group_score == GroupScore::Max) {
        float m = c[0];
        for (int i = 1; i < gs; ++i) m = rank_before(c[i], i, m, 0) ? c[i] : m;
        group[g] = m;
      } else {  // sum of the two best (validated: gs >= 2)
        float b[2];
        int32_t bi[2];
        int n = 0;
        for (int i = 0; i < gs; ++i) insert_top(c[i], i, b, bi, n, 2);
        group[g] = b[0] + b[1];
      }
    }
    float* gv = s.gbest_v.data();
    int32_t* gi = s.gbest_i.data();
    int n = 0;
    for (int g = 0; g < p.n_group; ++g) insert_top(group[g], g, gv, gi, n, p.topk_group);
    std::memset(s.keep.data(), 0, e);
    for (int j = 0; j < n; ++j) std::memset(s.keep.data() + static_cast<size_t>(gi[j]) * gs, 1, gs);
    keep = s.keep.data();
  }

  // Top-k by choice score. ids/weights double as the sorted insertion list (values in weights
  // hold choice scores until the end).
  int n = 0;
  for (int i = 0; i < e; ++i) {
    if (keep && !keep[i]) continue;
    insert_top(choice[i], i, weights, ids, n, k);
  }
  // NOTE: n == k here: the addon checks k <= topk_group * E / n_group.
  double sum = 0.0;
  for (int j = 0; j < k; ++j) {
    weights[j] = score[ids[j]];
    sum += weights[j];
  }
  if (p.renormalize) {
    const float denom = static_cast<float>(sum) + 1e-20f;
    for (int j = 0; j < k; ++j) weights[j] /= denom;
  }
  if (p.scale != 1.0f)
    for (int j = 0; j < k; ++j) weights[j] *= p.scale;
}

}  // namespace

void route(const float* logits, const RoutingParams& p, int32_t* ids, float* weights,
           int32_t* counts) {
  const size_t e = static_cast<size_t>(p.num_experts);
  const size_t k = static_cast<size_t>(p.top_k);
  parallel_rows(static_cast<size_t>(p.tokens), e * 4, [&](size_t t0, size_t t1) {
    for (size_t t = t0; t < t1; ++t) route_token(logits + t * e, p, ids + t * k, weights + t * k);
  });
  std::memset(counts, 0, sizeof(int32_t) * e);
  const size_t n = static_cast<size_t>(p.tokens) * k;
  for (size_t i = 0; i < n; ++i) ++counts[ids[i]];
}

}  // namespace expertd
