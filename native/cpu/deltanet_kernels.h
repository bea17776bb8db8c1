// The per-(sequence, head) Gated DeltaNet kernels, included by deltanet.cc once per ISA (portable,
// and AVX-512 under a target pragma) so both paths run the same algorithm; the AVX-512 form
// register-blocks the products with the [dk, dv] state. Not a public header: the includer opens
// the namespace and defines DN_AVX512 and DN_AVX2 to 0 or 1 (DN_AVX2: the portable algorithm
// with AVX2 dot products, compiled for AVX2 + FMA).

// ---- vector helpers over n floats (n is any length; the AVX-512 forms mask the tail)

#if DN_AVX512
inline __mmask16 tail_mask(int n) {
  return n >= 16 ? static_cast<__mmask16>(0xffff) : n <= 0 ? static_cast<__mmask16>(0)
                                                            : static_cast<__mmask16>((1u << n) - 1);
}

inline float dot(const float* a, const float* b, int n) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int i = 0;
  for (; i + 32 <= n; i += 32) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
  }
  for (; i + 16 <= n; i += 16)
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
  if (i < n) {
    const __mmask16 m = tail_mask(n - i);
    acc1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

// y += a * x
inline void axpy(float* y, float a, const float* x, int n) {
  const __m512 av = _mm512_set1_ps(a);
  int i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  if (i < n) {
    const __mmask16 m = tail_mask(n - i);
    _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(m, x + i),
                                                    _mm512_maskz_loadu_ps(m, y + i)));
  }
}

// x / (1 + e^-x), 16 lanes (simd_exp.h's exp, ~1 ulp)
inline __m512 silu16(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(x, _mm512_add_ps(one, exp512_ps(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}
#elif DN_AVX2
// 8-lane chains (i mod 16 < 8 and >= 8), then the tail one by one.
inline float dot(const float* a, const float* b, int n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  const __m256 s8 = _mm256_add_ps(acc0, acc1);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  float acc = _mm_cvtss_f32(s);
  for (; i < n; ++i) acc = std::fma(a[i], b[i], acc);
  return acc;
}
#else
inline float dot(const float* a, const float* b, int n) {
  float acc = 0.0f;
  for (int i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}
#endif
#if !DN_AVX512
// (Under the AVX2 target the compiler vectorizes it.)
inline void axpy(float* y, float a, const float* x, int n) {
  for (int i = 0; i < n; ++i) y[i] += a * x[i];
}
#endif

// y += sum_(j < m) c[j] * X[j] (rows of X ld apart, n long); the sum stays in registers (one
// store per element instead of one per term).
#if DN_AVX512
inline void combine_rows(float* y, const float* c, int c_step, const float* X, size_t ld, int m,
                         int n) {
  for (int e0 = 0; e0 < n; e0 += 64) {
    __mmask16 mk[4];
    __m512 acc[4];
    for (int u = 0; u < 4; ++u) {
      mk[u] = tail_mask(n - e0 - 16 * u);
      acc[u] = _mm512_maskz_loadu_ps(mk[u], y + e0 + 16 * u);
    }
    for (int j = 0; j < m; ++j) {
      const __m512 cj = _mm512_set1_ps(c[static_cast<size_t>(j) * c_step]);
      const float* xr = X + j * ld + e0;
      for (int u = 0; u < 4; ++u) acc[u] = _mm512_fmadd_ps(cj, _mm512_maskz_loadu_ps(mk[u], xr + 16 * u), acc[u]);
    }
    for (int u = 0; u < 4; ++u) _mm512_mask_storeu_ps(y + e0 + 16 * u, mk[u], acc[u]);
  }
}
#else
inline void combine_rows(float* y, const float* c, int c_step, const float* X, size_t ld, int m,
                         int n) {
  for (int j = 0; j < m; ++j) axpy(y, c[static_cast<size_t>(j) * c_step], X + j * ld, n);
}
#endif

inline float silu1(float x) { return x / (1.0f + std::exp(-x)); }

// dst = src * rsqrt(sum(src^2) + 1e-6) (when l2) * scale, as HF's l2norm then the q scaling.
inline void load_head(const float* src, int n, bool l2, float scale, float* dst) {
  float inv = 1.0f;
  if (l2) {
#if DN_AVX512
    const float ss = dot(src, src, n);
#else
    double ss = 0.0;
    for (int i = 0; i < n; ++i) ss += static_cast<double>(src[i]) * src[i];
#endif
    inv = 1.0f / std::sqrt(static_cast<float>(ss) + 1e-6f);
  }
  for (int i = 0; i < n; ++i) {
    float x = l2 ? src[i] * inv : src[i];
    dst[i] = x * scale;
  }
}

// ---- the recurrent step (decode) of one head: S [dk, dv] in place, out [dv].
//   kv = e^g (k^T S);  delta = (v - kv) * beta;  S = e^g S + k delta^T;  out = q^T S
// Two passes over S (read, then read-modify-write): the step is bound by the state's bytes.
inline void head_step(const float* q_row, const float* k_row, const float* v_row, float g,
                      float beta, const DeltaRuleParams& p, float qscale, float* S, float* out,
                      DeltaScratch& ws) {
  const int dk = p.dk, dv = p.dv;
  float* qn = ws.get(DeltaScratch::Q, dk);
  float* kn = ws.get(DeltaScratch::K, dk);
  float* delta = ws.get(DeltaScratch::U, dv);
  load_head(q_row, dk, p.l2norm_qk, qscale, qn);
  load_head(k_row, dk, p.l2norm_qk, 1.0f, kn);
  const float eg = std::exp(g);
#if DN_AVX512
  const __m512 egv = _mm512_set1_ps(eg), bv = _mm512_set1_ps(beta);
  for (int e0 = 0; e0 < dv; e0 += 64) {
    __mmask16 m[4];
    __m512 acc[4];
    for (int j = 0; j < 4; ++j) {
      m[j] = tail_mask(dv - e0 - 16 * j);
      acc[j] = _mm512_setzero_ps();
    }
    for (int d = 0; d < dk; ++d) {
      const float* row = S + static_cast<size_t>(d) * dv + e0;
      const __m512 kd = _mm512_set1_ps(kn[d]);
      for (int j = 0; j < 4; ++j)
        acc[j] = _mm512_fmadd_ps(kd, _mm512_maskz_loadu_ps(m[j], row + 16 * j), acc[j]);
    }
    for (int j = 0; j < 4; ++j) {
      const __m512 vv = _mm512_maskz_loadu_ps(m[j], v_row + e0 + 16 * j);
      const __m512 dl = _mm512_mul_ps(_mm512_sub_ps(vv, _mm512_mul_ps(egv, acc[j])), bv);
      _mm512_mask_storeu_ps(delta + e0 + 16 * j, m[j], dl);
    }
  }
  for (int e0 = 0; e0 < dv; e0 += 64) {
    __mmask16 m[4];
    __m512 dl[4], o[4];
    for (int j = 0; j < 4; ++j) {
      m[j] = tail_mask(dv - e0 - 16 * j);
      dl[j] = _mm512_maskz_loadu_ps(m[j], delta + e0 + 16 * j);
      o[j] = _mm512_setzero_ps();
    }
    for (int d = 0; d < dk; ++d) {
      float* row = S + static_cast<size_t>(d) * dv + e0;
      const __m512 kd = _mm512_set1_ps(kn[d]), qd = _mm512_set1_ps(qn[d]);
      for (int j = 0; j < 4; ++j) {
        const __m512 s = _mm512_fmadd_ps(kd, dl[j], _mm512_mul_ps(egv, _mm512_maskz_loadu_ps(m[j], row + 16 * j)));
        _mm512_mask_storeu_ps(row + 16 * j, m[j], s);
        o[j] = _mm512_fmadd_ps(qd, s, o[j]);
      }
    }
    for (int j = 0; j < 4; ++j) _mm512_mask_storeu_ps(out + e0 + 16 * j, m[j], o[j]);
  }
#else
  for (int e = 0; e < dv; ++e) delta[e] = 0.0f;
  for (int d = 0; d < dk; ++d) axpy(delta, kn[d], S + static_cast<size_t>(d) * dv, dv);
  for (int e = 0; e < dv; ++e) delta[e] = (v_row[e] - eg * delta[e]) * beta;
  for (int e = 0; e < dv; ++e) out[e] = 0.0f;
  for (int d = 0; d < dk; ++d) {
    float* row = S + static_cast<size_t>(d) * dv;
    const float kd = kn[d], qd = qn[d];
    for (int e = 0; e < dv; ++e) {
      const float s = eg * row[e] + kd * delta[e];
      row[e] = s;
      out[e] += qd * s;
    }
  }
#endif
}

// ---- the chunk's products as small GEMMs on one register-tiled micro-kernel:
//   C[i][j] = (acc ? cscale C[i][j] : 0) -+ sum_(p < kk_i) A[i][p] B[p][j]
// over tiles of 6 rows x 64 columns (24 accumulators; per p: 4 vector loads of B, 6 broadcasts of
// A, 24 FMAs). `lower_k`: A is lower-triangular (entries right of the diagonal are zero), so a
// tile of rows [i0, i0 + 6) stops at p = i0 + 6. `lower_n`: only columns j <= i are wanted, so a
// tile stops at column i0 + 6 (the columns past i in it are computed and left for the caller to
// ignore). Each element sums its terms in p order whatever the tiling, so the bits do not depend
// on the shape around it.
constexpr int kTileRows = 6;
constexpr int kTileCols = 64;

#if DN_AVX512
// The accumulators are named variables, not an array: GCC keeps an array of __m512 on the stack
// and spills it every iteration.
#define DN_EACH(X) \
  X(0, 0) X(0, 1) X(0, 2) X(0, 3) X(1, 0) X(1, 1) X(1, 2) X(1, 3) X(2, 0) X(2, 1) X(2, 2) X(2, 3) \
  X(3, 0) X(3, 1) X(3, 2) X(3, 3) X(4, 0) X(4, 1) X(4, 2) X(4, 3) X(5, 0) X(5, 1) X(5, 2) X(5, 3)
template <int MR, int NV, bool NEG>
inline void gemm_tile(const float* A, size_t lda, const float* B, size_t ldb, float* C, size_t ldc,
                      int kk, int nc, bool acc_c, float cscale) {
  const __mmask16 m0 = tail_mask(nc), m1 = tail_mask(nc - 16), m2 = tail_mask(nc - 32),
                  m3 = tail_mask(nc - 48);
#define DN_DECL(r, v) __m512 c##r##v = _mm512_setzero_ps();
  DN_EACH(DN_DECL)
#undef DN_DECL
  if (acc_c) {
    const __m512 cs = _mm512_set1_ps(cscale);
    const bool scale = cscale != 1.0f;
#define DN_LOAD(r, v)                                                       \
    if (MR > r && NV > v) {                                                 \
      c##r##v = _mm512_maskz_loadu_ps(m##v, C + r * ldc + 16 * v);          \
      if (scale) c##r##v = _mm512_mul_ps(cs, c##r##v);                      \
    }
    DN_EACH(DN_LOAD)
#undef DN_LOAD
  }
  const float* a = A;
  const float* bp = B;
  for (int p = 0; p < kk; ++p, ++a, bp += ldb) {
    const __m512 b0 = _mm512_maskz_loadu_ps(m0, bp);
    const __m512 b1 = NV > 1 ? _mm512_maskz_loadu_ps(m1, bp + 16) : b0;
    const __m512 b2 = NV > 2 ? _mm512_maskz_loadu_ps(m2, bp + 32) : b0;
    const __m512 b3 = NV > 3 ? _mm512_maskz_loadu_ps(m3, bp + 48) : b0;
#define DN_FMA(r, v)                                                                    \
    if (MR > r && NV > v)                                                               \
      c##r##v = NEG ? _mm512_fnmadd_ps(a##r, b##v, c##r##v) : _mm512_fmadd_ps(a##r, b##v, c##r##v);
    const __m512 a0 = _mm512_set1_ps(a[0]);
    const __m512 a1 = MR > 1 ? _mm512_set1_ps(a[lda]) : a0;
    const __m512 a2 = MR > 2 ? _mm512_set1_ps(a[2 * lda]) : a0;
    const __m512 a3 = MR > 3 ? _mm512_set1_ps(a[3 * lda]) : a0;
    const __m512 a4 = MR > 4 ? _mm512_set1_ps(a[4 * lda]) : a0;
    const __m512 a5 = MR > 5 ? _mm512_set1_ps(a[5 * lda]) : a0;
    DN_EACH(DN_FMA)
#undef DN_FMA
  }
#define DN_STORE(r, v) \
  if (MR > r && NV > v) _mm512_mask_storeu_ps(C + r * ldc + 16 * v, m##v, c##r##v);
  DN_EACH(DN_STORE)
#undef DN_STORE
}
#undef DN_EACH

template <int MR, bool NEG>
inline void gemm_tile_nv(int nv, const float* A, size_t lda, const float* B, size_t ldb, float* C,
                         size_t ldc, int kk, int nc, bool acc_c, float cscale) {
  switch (nv) {
    case 1: gemm_tile<MR, 1, NEG>(A, lda, B, ldb, C, ldc, kk, nc, acc_c, cscale); break;
    case 2: gemm_tile<MR, 2, NEG>(A, lda, B, ldb, C, ldc, kk, nc, acc_c, cscale); break;
    case 3: gemm_tile<MR, 3, NEG>(A, lda, B, ldb, C, ldc, kk, nc, acc_c, cscale); break;
    default: gemm_tile<MR, 4, NEG>(A, lda, B, ldb, C, ldc, kk, nc, acc_c, cscale); break;
  }
}

template <bool NEG>
inline void gemm_rows(int mr, int nv, const float* A, size_t lda, const float* B, size_t ldb,
                      float* C, size_t ldc, int kk, int nc, bool acc_c, float cscale) {
  switch (mr) {
    case 1: gemm_tile_nv<1, NEG>(nv, A, lda, B, ldb, C, ldc, kk, nc, acc_c, cscale); break;
    case 2: gemm_tile_nv<2, NEG>(nv, A, lda, B, ldb, C, ldc, kk, nc, acc_c, cscale); break;
    case 3: gemm_tile_nv<3, NEG>(nv, A, lda, B, ldb, C, ldc, kk, nc, acc_c, cscale); break;
    case 4: gemm_tile_nv<4, NEG>(nv, A, lda, B, ldb, C, ldc, kk, nc, acc_c, cscale); break;
    case 5: gemm_tile_nv<5, NEG>(nv, A, lda, B, ldb, C, ldc, kk, nc, acc_c, cscale); break;
    default: gemm_tile_nv<6, NEG>(nv, A, lda, B, ldb, C, ldc, kk, nc, acc_c, cscale); break;
  }
}
#endif

struct GemmShape {
  bool lower_k = false;
  bool lower_n = false;
  bool acc_c = false;
  float cscale = 1.0f;
};

// C [m, n] (ldc) = (acc_c ? cscale C : 0) -+ A [m, kk] (lda) B [kk, n] (ldb); see above.
template <bool NEG>
inline void small_gemm(int m, int n, int kk, const float* A, size_t lda, const float* B, size_t ldb,
                       float* C, size_t ldc, const GemmShape& s) {
#if DN_AVX512
  // Column panels outside: a panel of B (kk x 64 floats) stays in L1 across the row tiles.
  for (int j0 = 0; j0 < n; j0 += kTileCols) {
    for (int i0 = 0; i0 < m; i0 += kTileRows) {
      const int mr = std::min(kTileRows, m - i0);
      const int k1 = s.lower_k ? std::min(kk, i0 + mr) : kk;
      const int n1 = s.lower_n ? std::min(n, i0 + mr) : n;
      if (j0 >= n1) continue;
      const int nc = std::min(kTileCols, n1 - j0);
      gemm_rows<NEG>(mr, (nc + 15) / 16, A + static_cast<size_t>(i0) * lda, lda, B + j0, ldb,
                     C + static_cast<size_t>(i0) * ldc + j0, ldc, k1, nc, s.acc_c, s.cscale);
    }
  }
#else
  for (int i = 0; i < m; ++i) {
    const int k1 = s.lower_k ? std::min(kk, (i / kTileRows + 1) * kTileRows) : kk;
    const int n1 = s.lower_n ? std::min(n, (i / kTileRows + 1) * kTileRows) : n;
    float* ci = C + static_cast<size_t>(i) * ldc;
    for (int j = 0; j < n1; ++j) {
      float acc = s.acc_c ? (s.cscale == 1.0f ? ci[j] : s.cscale * ci[j]) : 0.0f;
      for (int p = 0; p < k1; ++p) {
        const float t = A[static_cast<size_t>(i) * lda + p] * B[static_cast<size_t>(p) * ldb + j];
        acc = NEG ? acc - t : acc + t;
      }
      ci[j] = acc;
    }
  }
#endif
}

// The decay masks on a row of K K^T and Q K^T, for every j < n (zeros where not wanted, so that
// the triangular products may read them):
//   A[i][j] = -beta_i (k_i.k_j) e^(G_i - G_j) for j < i, else 0 (the negated strict lower part of L)
//   P[i][j] = (q_i.k_j) e^(G_i - G_j) for j <= i, else 0
inline void decay_masks(const float* G, const float* B, int n, int C, float* A, float* P) {
  for (int i = 0; i < n; ++i) {
    float* ai = A + static_cast<size_t>(i) * C;
    float* pi = P + static_cast<size_t>(i) * C;
#if DN_AVX512
    const __m512 gi = _mm512_set1_ps(G[i]), nbi = _mm512_set1_ps(-B[i]);
    for (int j = 0; j < n; j += 16) {
      const __mmask16 m = tail_mask(n - j);
      const __mmask16 le = static_cast<__mmask16>(m & tail_mask(i + 1 - j));  // j <= i
      const __mmask16 lt = static_cast<__mmask16>(m & tail_mask(i - j));      // j < i
      // exp of masked lanes is never used: G_i - G_j > 0 there may overflow.
      const __m512 dec = exp512_ps(_mm512_maskz_sub_ps(le, gi, _mm512_maskz_loadu_ps(le, G + j)));
      _mm512_mask_storeu_ps(ai + j, m, _mm512_maskz_mul_ps(lt, _mm512_mul_ps(nbi, _mm512_maskz_loadu_ps(m, ai + j)), dec));
      _mm512_mask_storeu_ps(pi + j, m, _mm512_maskz_mul_ps(le, _mm512_maskz_loadu_ps(m, pi + j), dec));
    }
#else
    for (int j = 0; j < n; ++j) {
      const float dec = j <= i ? std::exp(G[i] - G[j]) : 0.0f;
      ai[j] = j < i ? (-B[i] * ai[j]) * dec : 0.0f;
      pi[j] = j <= i ? pi[j] * dec : 0.0f;
    }
#endif
  }
}

// T = (I - A)^-1 for the strictly lower A of decay_masks (T lower, unit diagonal; rows C apart,
// zeros right of the diagonal up to n): T_i = e_i + sum_(j < i) A_ij T_j, row by row.
inline void unit_lower_inverse(const float* A, int n, int C, float* T) {
  for (int i = 0; i < n; ++i) {
    float* ti = T + static_cast<size_t>(i) * C;
    for (int j = 0; j < n; ++j) ti[j] = 0.0f;
    combine_rows(ti, A + static_cast<size_t>(i) * C, 1, T, C, i, i);
    ti[i] = 1.0f;
  }
}

constexpr int kPrefetchTokens = 6;

inline void prefetch_row(const float* row, int n) {
  for (int i = 0; i < n; i += 16) __builtin_prefetch(row + i);
}

// ---- the chunkwise algorithm (HF torch_chunk_gated_delta_rule) for T tokens of one head. Per
// chunk of n tokens with cumulative log decay G_i and L = I + tril(beta_i k_i.k_j e^(G_i - G_j), -1):
//   T = L^-1;  [W | U] = T [beta e^G k | beta v]      (the UT transform)
//   V' = U - W S
//   out_i = e^(G_i) q_i^T S + sum_(j<=i) (q_i.k_j) e^(G_i - G_j) V'_j
//   S = e^(G_n) S + sum_i e^(G_n - G_i) k_i V'_i^T
// every product a small_gemm. q/k/v/g/beta/out point at the run's token 0; out rows are hv * dv
// apart.
inline void head_chunked(const float* q, const float* k, const float* v, const float* g,
                         const float* beta, int tokens, int h, const DeltaRuleParams& p,
                         float qscale, float* S, float* out, DeltaScratch& ws) {
  const int dk = p.dk, dv = p.dv, hv = p.hv, C = p.chunk;
  const int kh = h / (p.hv / p.hk);
  const size_t out_stride = static_cast<size_t>(hv) * dv;
  const size_t wu_ld = static_cast<size_t>(dk) + dv;  // rows of [W | U] and of [beta e^G k | beta v]
  float* qn = ws.get(DeltaScratch::Q, static_cast<size_t>(C) * dk);
  float* kn = ws.get(DeltaScratch::K, static_cast<size_t>(C) * dk);
  float* Y = ws.get(DeltaScratch::W, static_cast<size_t>(C) * wu_ld);
  float* WU = ws.get(DeltaScratch::U, static_cast<size_t>(C) * wu_ld);
  float* A = ws.get(DeltaScratch::A, static_cast<size_t>(C) * C);
  float* P = ws.get(DeltaScratch::P, static_cast<size_t>(C) * C);
  float* KdT = ws.get(DeltaScratch::KT, static_cast<size_t>(dk) * C);
  float* KnT = ws.get(DeltaScratch::KN, static_cast<size_t>(dk) * C);
  float* Tm = ws.get(DeltaScratch::TI, static_cast<size_t>(C) * C);
  float* G = ws.get(DeltaScratch::G, static_cast<size_t>(C) * 2);
  float* B = G + C;
  for (int c0 = 0; c0 < tokens; c0 += C) {
    const int n = std::min(C, tokens - c0);
    float gsum = 0.0f;
    for (int i = 0; i < n; ++i) {
      const size_t t = static_cast<size_t>(c0 + i);
      // Token rows are a whole mixed-qkv row apart (tens of KiB): the hardware prefetcher does
      // not follow them, so fetch the q/k/v of a few tokens ahead (the v rows for the UT step).
      if (i + kPrefetchTokens < n) {
        const size_t ta = t + kPrefetchTokens;
        prefetch_row(q + ta * p.q_stride + static_cast<size_t>(kh) * dk, dk);
        prefetch_row(k + ta * p.k_stride + static_cast<size_t>(kh) * dk, dk);
        prefetch_row(v + ta * p.v_stride + static_cast<size_t>(h) * dv, dv);
      }
      float* ki = kn + static_cast<size_t>(i) * dk;
      load_head(q + t * p.q_stride + static_cast<size_t>(kh) * dk, dk, p.l2norm_qk, qscale,
                qn + static_cast<size_t>(i) * dk);
      load_head(k + t * p.k_stride + static_cast<size_t>(kh) * dk, dk, p.l2norm_qk, 1.0f, ki);
      gsum += g[t * hv + h];
      G[i] = gsum;
      B[i] = beta[t * hv + h];
      for (int d = 0; d < dk; ++d) KnT[static_cast<size_t>(d) * C + i] = ki[d];
    }
    // K K^T and Q K^T (lower parts), then the decays: A = -(L - I), P.
    const GemmShape tri_n{false, true, false, 1.0f};
    small_gemm<false>(n, n, dk, kn, dk, KnT, C, A, C, tri_n);
    small_gemm<false>(n, n, dk, qn, dk, KnT, C, P, C, tri_n);
    decay_masks(G, B, n, C, A, P);
    unit_lower_inverse(A, n, C, Tm);
    // [W | U] = T [beta e^G k | beta v]
    for (int i = 0; i < n; ++i) {
      float* yi = Y + i * wu_ld;
      const float* ki = kn + static_cast<size_t>(i) * dk;
      const float* vi = v + static_cast<size_t>(c0 + i) * p.v_stride + static_cast<size_t>(h) * dv;
      const float bw = B[i] * std::exp(G[i]);
      for (int d = 0; d < dk; ++d) yi[d] = ki[d] * bw;
      for (int e = 0; e < dv; ++e) yi[dk + e] = vi[e] * B[i];
    }
    small_gemm<false>(n, static_cast<int>(wu_ld), n, Tm, C, Y, wu_ld, WU, wu_ld, GemmShape{true, false, false, 1.0f});
    float* U = WU + dk;
    // V' = U - W S (into U); Qd = e^(G_i) q_i (in place: P is done with q); O = Qd S + P V'.
    small_gemm<true>(n, dv, dk, WU, wu_ld, S, dv, U, wu_ld, GemmShape{false, false, true, 1.0f});
    for (int i = 0; i < n; ++i) {
      const float eq = std::exp(G[i]);
      float* qi = qn + static_cast<size_t>(i) * dk;
      for (int d = 0; d < dk; ++d) qi[d] *= eq;
    }
    float* o0 = out + static_cast<size_t>(c0) * out_stride + static_cast<size_t>(h) * dv;
    small_gemm<false>(n, dv, dk, qn, dk, S, dv, o0, out_stride, GemmShape{});
    small_gemm<false>(n, dv, n, P, C, U, wu_ld, o0, out_stride, GemmShape{true, false, true, 1.0f});
    // S = e^(G_n) S + KdT V', with the decayed keys transposed [dk][n].
    const float glast = G[n - 1];
    float* dec = ws.get(DeltaScratch::DEC, static_cast<size_t>(C));
    for (int i = 0; i < n; ++i) dec[i] = std::exp(glast - G[i]);
    for (int d = 0; d < dk; ++d) {
      const float* src = KnT + static_cast<size_t>(d) * C;
      float* dst = KdT + static_cast<size_t>(d) * C;
      for (int i = 0; i < n; ++i) dst[i] = src[i] * dec[i];
    }
    small_gemm<false>(dk, dv, n, KdT, C, U, wu_ld, S, dv, GemmShape{false, false, true, std::exp(glast)});
  }
}

// One (sequence, head) of T tokens: the recurrent step when T == 1, the chunkwise algorithm else.
inline void head_run(const float* q, const float* k, const float* v, const float* g,
                     const float* beta, int tokens, int h, const DeltaRuleParams& p, float* S,
                     float* out, DeltaScratch& ws) {
  const float qscale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(p.dk)));
  if (tokens == 1) {
    const int kh = h / (p.hv / p.hk);
    head_step(q + static_cast<size_t>(kh) * p.dk, k + static_cast<size_t>(kh) * p.dk,
              v + static_cast<size_t>(h) * p.dv, g[h], beta[h], p, qscale, S,
              out + static_cast<size_t>(h) * p.dv, ws);
    return;
  }
  head_chunked(q, k, v, g, beta, tokens, h, p, qscale, S, out, ws);
}

// ---- causal conv: channels [c0, c0 + nc) (nc <= 16) of one sequence over T tokens; state rows
// [K-1] per channel. Per channel: bias first, then the taps oldest to newest.
inline void conv_block(const float* x, int tokens, int channels, int c0, int nc, const float* w,
                       const float* bias, int kernel, float* state, bool act, float* out) {
  const int ks = kernel - 1;
#if DN_AVX512
  const __mmask16 m = tail_mask(nc);
  // Taps and state transposed to [tap][channel], lanes past nc zero. NOTE: only the `kernel` rows
  // in use are written: zero-filling all 64 cost more than a decode step's conv itself.
  float wt[64][16];
  float st[64][16];
  for (int j = 0; j < kernel; ++j)
    for (int c = 0; c < 16; ++c) wt[j][c] = c < nc ? w[static_cast<size_t>(c0 + c) * kernel + j] : 0.0f;
  for (int j = 0; j < ks; ++j)
    for (int c = 0; c < 16; ++c) st[j][c] = c < nc ? state[static_cast<size_t>(c0 + c) * ks + j] : 0.0f;
  const __m512 bv = bias ? _mm512_maskz_loadu_ps(m, bias + c0) : _mm512_setzero_ps();
  if (kernel == 4) {
    // Qwen3-Next's width: taps and history in named registers (same sums, same order as below).
    const __m512 w0 = _mm512_loadu_ps(wt[0]), w1 = _mm512_loadu_ps(wt[1]), w2 = _mm512_loadu_ps(wt[2]),
                 w3 = _mm512_loadu_ps(wt[3]);
    __m512 h0 = _mm512_loadu_ps(st[0]), h1 = _mm512_loadu_ps(st[1]), h2 = _mm512_loadu_ps(st[2]);
    for (int t = 0; t < tokens; ++t) {
      const size_t at = static_cast<size_t>(t) * channels + c0;
      // rows are a whole [channels] apart: fetch ahead (the hardware prefetcher does not)
      if (t + 8 < tokens) __builtin_prefetch(x + at + 8 * static_cast<size_t>(channels));
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + at);  // read before out: out may alias x
      __m512 acc = _mm512_fmadd_ps(w0, h0, bv);
      acc = _mm512_fmadd_ps(w1, h1, acc);
      acc = _mm512_fmadd_ps(w2, h2, acc);
      acc = _mm512_fmadd_ps(w3, xv, acc);
      h0 = h1;
      h1 = h2;
      h2 = xv;
      _mm512_mask_storeu_ps(out + at, m, act ? silu16(acc) : acc);
    }
    _mm512_storeu_ps(st[0], h0);
    _mm512_storeu_ps(st[1], h1);
    _mm512_storeu_ps(st[2], h2);
    for (int c = 0; c < nc; ++c)
      for (int j = 0; j < ks; ++j) state[static_cast<size_t>(c0 + c) * ks + j] = st[j][c];
    return;
  }
  __m512 hist[64];
  for (int j = 0; j < ks; ++j) hist[j] = _mm512_loadu_ps(st[j]);
  for (int t = 0; t < tokens; ++t) {
    const size_t at = static_cast<size_t>(t) * channels + c0;
    const __m512 xv = _mm512_maskz_loadu_ps(m, x + at);  // read before out: out may alias x
    __m512 acc = bv;
    for (int j = 0; j < ks; ++j) acc = _mm512_fmadd_ps(_mm512_loadu_ps(wt[j]), hist[j], acc);
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(wt[ks]), xv, acc);
    for (int j = 0; j + 1 < ks; ++j) hist[j] = hist[j + 1];
    if (ks > 0) hist[ks - 1] = xv;
    _mm512_mask_storeu_ps(out + at, m, act ? silu16(acc) : acc);
  }
  for (int j = 0; j < ks; ++j) _mm512_storeu_ps(st[j], hist[j]);
  for (int c = 0; c < nc; ++c)
    for (int j = 0; j < ks; ++j) state[static_cast<size_t>(c0 + c) * ks + j] = st[j][c];
#else
  for (int c = c0; c < c0 + nc; ++c) {
    const float* wc = w + static_cast<size_t>(c) * kernel;
    float* sc = state + static_cast<size_t>(c) * ks;
    float hist[64];
    for (int j = 0; j < ks; ++j) hist[j] = sc[j];
    const float b = bias ? bias[c] : 0.0f;
    for (int t = 0; t < tokens; ++t) {
      const size_t at = static_cast<size_t>(t) * channels + c;
      const float xv = x[at];  // read before out[at] is written: out may alias x
      float acc = b;
      for (int j = 0; j < ks; ++j) acc += wc[j] * hist[j];
      acc += wc[ks] * xv;
      for (int j = 0; j + 1 < ks; ++j) hist[j] = hist[j + 1];
      if (ks > 0) hist[ks - 1] = xv;
      out[at] = act ? silu1(acc) : acc;
    }
    for (int j = 0; j < ks; ++j) sc[j] = hist[j];
  }
#endif
}

// ---- gated RMSNorm of one row: out = (w * (x * r)) * SiLU(z), r = rsqrt(mean(x^2) + eps); the
// sum of squares in double (its order differs between the two paths: both far inside f32).
inline void gated_norm_row(const float* x, const float* z, const float* w, float eps, int dim,
                           float* out) {
#if DN_AVX512
  // the squares summed in double, 8 lanes x 2 accumulators (a scalar chain of dependent double
  // adds took as long as the rest of the row)
  __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
  for (int i = 0; i < dim; i += 16) {
    const __m512 xv = _mm512_maskz_loadu_ps(tail_mask(dim - i), x + i);
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(xv));
    const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(xv), 1)));
    s0 = _mm512_fmadd_pd(lo, lo, s0);
    s1 = _mm512_fmadd_pd(hi, hi, s1);
  }
  const double ss = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
#else
  double ss = 0.0;
  for (int i = 0; i < dim; ++i) ss += static_cast<double>(x[i]) * x[i];
#endif
  const float r = 1.0f / std::sqrt(static_cast<float>(ss / dim) + eps);
#if DN_AVX512
  const __m512 rv = _mm512_set1_ps(r);
  for (int i = 0; i < dim; i += 16) {
    const __mmask16 m = tail_mask(dim - i);
    const __m512 xn = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), rv);
    const __m512 y = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, w + i), xn);
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(y, silu16(_mm512_maskz_loadu_ps(m, z + i))));
  }
#else
  for (int i = 0; i < dim; ++i) out[i] = (w[i] * (x[i] * r)) * silu1(z[i]);
#endif
}
