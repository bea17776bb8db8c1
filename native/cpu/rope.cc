// Rotary position embedding (rotate-half and interleaved, partial rotary), rounded like HF:
// angle = f32(pos * inv_freq[i]), cos/sin of that f32 angle, times attn_scale, then
// x*cos -/+ x'*sin with each product rounded.
#include <cmath>
#include <cstring>
#include <vector>

#include "expertd/ops.h"
#include "parallel_rows.h"

namespace expertd {

// NOTE: interleaved mode writes each rotated pair back in place, (2i, 2i+1) (GPT-J / vLLM
// is_neox_style=False). HF's DeepSeek apply_rotary_pos_emb_interleave instead de-interleaves
// the rotary dims ([evens | odds]) before rotating; q and k are permuted alike there, so
// q . k and therefore attention are the same either way.
void rope(float* x, int tokens, int heads, int row_stride, int head_stride, int offset,
          const int32_t* positions, const float* inv_freq, int rot_dim, float attn_scale,
          bool interleaved) {
  const int half = rot_dim / 2;
  parallel_rows(static_cast<size_t>(tokens), static_cast<size_t>(heads) * rot_dim,
                [&](size_t t0, size_t t1) {
    // Per thread, the last position's cos and sin with what they were computed from: a decode
    // step asks for the same ones twice per layer (q and k) in every layer, and each is a double
    // cos and sin per rotary pair.
    struct Memo {
      std::vector<float> cs;        // [2][half] cos then sin, grow-only
      std::vector<float> inv_freq;  // the frequencies they were computed with
      float pos = 0.0f, attn_scale = 0.0f;
      int half = -1;
    };
    thread_local Memo m;
    if (m.cs.size() < static_cast<size_t>(rot_dim)) m.cs.resize(rot_dim);
    float* cosv = m.cs.data();
    float* sinv = m.cs.data() + half;
    for (size_t t = t0; t < t1; ++t) {
      const float pos = static_cast<float>(positions[t]);
      const bool same = m.half == half && m.pos == pos && m.attn_scale == attn_scale &&
                        std::memcmp(m.inv_freq.data(), inv_freq, sizeof(float) * half) == 0;
      if (!same) {
        for (int i = 0; i < half; ++i) {
          const float angle = pos * inv_freq[i];
          cosv[i] = static_cast<float>(std::cos(static_cast<double>(angle))) * attn_scale;
          sinv[i] = static_cast<float>(std::sin(static_cast<double>(angle))) * attn_scale;
        }
        m.inv_freq.assign(inv_freq, inv_freq + half);
        m.pos = pos;
        m.attn_scale = attn_scale;
        m.half = half;
      }
      float* row = x + t * static_cast<size_t>(row_stride) + offset;
      for (int hd = 0; hd < heads; ++hd) {
        float* v = row + static_cast<size_t>(hd) * head_stride;
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
    }
  });
}

}  // namespace expertd
