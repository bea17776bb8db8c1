// Rotary position embedding (rotate-half and interleaved, partial rotary), rounded like HF:
// angle = f32(pos * inv_freq[i]), cos/sin of that f32 angle, times attn_scale, then
// x*cos -/+ x'*sin with each product rounded.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "expertd/ops.h"
#include "parallel_rows.h"

namespace expertd {

namespace {

// The cos and sin of every position a model asks for, computed once per process (vLLM's and HF's
// cos_sin_cache): a layer's q and k and every layer after it ask for the same positions, and each
// row is `half` double cos and sin (a 512-token prefill of a 20-layer model computed them 40 times,
// 15 of its ~600 ms on AMD Zen 4; a batched decode step, one position per sequence, as often).
// A table per (inv_freq, attn_scale): rows of [cos x half | sin x half] in chunks of kChunkRows
// positions, made when a position in them is first asked for and kept (never moved, so a reader
// holds a chunk without the lock). Positions past kMaxPositions, and frequency sets past the
// kMaxTables-th, are computed per call as before; the values are the same either way.
constexpr int kChunkRows = 64;
constexpr int kMaxPositions = 1 << 19;
constexpr int kMaxChunks = kMaxPositions / kChunkRows;
constexpr int kMaxTables = 8;

void cos_sin_row(float pos, const float* inv_freq, int half, float attn_scale, float* row) {
  for (int i = 0; i < half; ++i) {
    const float angle = pos * inv_freq[i];
    row[i] = static_cast<float>(std::cos(static_cast<double>(angle))) * attn_scale;
    row[half + i] = static_cast<float>(std::sin(static_cast<double>(angle))) * attn_scale;
  }
}

struct RopeTable {
  std::vector<float> inv_freq;
  float attn_scale = 0.0f;
  std::unique_ptr<std::unique_ptr<float[]>[]> chunks{new std::unique_ptr<float[]>[kMaxChunks]};

  bool matches(const float* f, int half, float scale) const {
    return static_cast<int>(inv_freq.size()) == half && std::memcmp(&attn_scale, &scale, sizeof scale) == 0 &&
           std::memcmp(inv_freq.data(), f, sizeof(float) * half) == 0;
  }
  // The chunk of position pos, made if missing (the caller holds the lock).
  const float* chunk(int pos) {
    std::unique_ptr<float[]>& c = chunks[pos / kChunkRows];
    if (!c) {
      const int half = static_cast<int>(inv_freq.size()), p0 = pos / kChunkRows * kChunkRows;
      c.reset(new float[static_cast<size_t>(kChunkRows) * 2 * half]);
      for (int r = 0; r < kChunkRows; ++r)
        cos_sin_row(static_cast<float>(p0 + r), inv_freq.data(), half, attn_scale, c.get() + static_cast<size_t>(r) * 2 * half);
    }
    return c.get();
  }
};

std::mutex g_tables_mu;
std::vector<std::unique_ptr<RopeTable>>& tables() {
  static std::vector<std::unique_ptr<RopeTable>> t;
  return t;
}

// The cos/sin row of each token (rows[t]; nullptr where the token's position is computed per
// call: past the table's end, or every position of a frequency set without a table).
void table_rows(const int32_t* positions, int tokens, const float* inv_freq, int half, float attn_scale,
                const float** rows) {
  std::lock_guard<std::mutex> lock(g_tables_mu);
  RopeTable* tab = nullptr;
  for (auto& t : tables())
    if (t->matches(inv_freq, half, attn_scale)) tab = t.get();
  if (!tab) {
    if (static_cast<int>(tables().size()) >= kMaxTables) {
      std::fill(rows, rows + tokens, nullptr);
      return;
    }
    tables().push_back(std::make_unique<RopeTable>());
    tab = tables().back().get();
    tab->inv_freq.assign(inv_freq, inv_freq + half);
    tab->attn_scale = attn_scale;
  }
  for (int t = 0; t < tokens; ++t) {
    const int pos = positions[t];
    rows[t] = pos < kMaxPositions ? tab->chunk(pos) + static_cast<size_t>(pos % kChunkRows) * 2 * half : nullptr;
  }
}

// One head's rotary dims v in place by the row's cos and sin (restrict: the loops vectorize).
inline void rotate(float* __restrict v, const float* __restrict cosv, const float* __restrict sinv, int half,
                   bool interleaved) {
  if (interleaved) {
    for (int i = 0; i < half; ++i) {
      const float a = v[2 * i], b = v[2 * i + 1];
      v[2 * i] = a * cosv[i] - b * sinv[i];
      v[2 * i + 1] = b * cosv[i] + a * sinv[i];
    }
  } else {
    for (int i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * cosv[i] - b * sinv[i];
      v[i + half] = b * cosv[i] + a * sinv[i];
    }
  }
}

}  // namespace

// NOTE: interleaved mode writes each rotated pair back in place, (2i, 2i+1) (GPT-J / vLLM
// is_neox_style=False). HF's DeepSeek apply_rotary_pos_emb_interleave instead de-interleaves
// the rotary dims ([evens | odds]) before rotating; q and k are permuted alike there, so
// q . k and therefore attention are the same either way.
void rope(float* x, int tokens, int heads, int row_stride, int head_stride, int offset,
          const int32_t* positions, const float* inv_freq, int rot_dim, float attn_scale,
          bool interleaved) {
  if (tokens <= 0) return;
  const int half = rot_dim / 2;
  thread_local std::vector<const float*> tl_rows;
  if (tl_rows.size() < static_cast<size_t>(tokens)) tl_rows.resize(tokens);
  const float** rows = tl_rows.data();
  table_rows(positions, tokens, inv_freq, half, attn_scale, rows);
  parallel_rows(static_cast<size_t>(tokens), static_cast<size_t>(heads) * rot_dim,
                [&](size_t t0, size_t t1) {
    thread_local std::vector<float> own;  // a row computed here (no table, or past its end)
    if (own.size() < static_cast<size_t>(rot_dim)) own.resize(rot_dim);
    for (size_t t = t0; t < t1; ++t) {
      const float* cs = rows[t];
      if (!cs) {
        cos_sin_row(static_cast<float>(positions[t]), inv_freq, half, attn_scale, own.data());
        cs = own.data();
      }
      float* row = x + t * static_cast<size_t>(row_stride) + offset;
      for (int hd = 0; hd < heads; ++hd) rotate(row + static_cast<size_t>(hd) * head_stride, cs, cs + half, half, interleaved);
    }
  });
}

}  // namespace expertd
