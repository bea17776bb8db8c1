// The per-(sequence, head) Gated DeltaNet kernels, included by deltanet.cc once per ISA (portable,
// and AVX-512 under a target pragma) so both paths run the same algorithm; the AVX-512 form
// register-blocks the products with the [dk, dv] state. Not a public header: the includer opens
// the namespace and defines DN_AVX512 to 0 or 1.

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
#else
inline float dot(const float* a, const float* b, int n) {
  float acc = 0.0f;
  for (int i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}
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

// ---- products of a chunk with the state

#if DN_AVX512
// For R rows i and columns [e0, e0 + 32): U_i -= W_i S and O_i = Qd_i S, reading S once.
template <int R>
inline void rows_state_block(float* U, const float* W, const float* Qd, float* O, size_t o_stride,
                             const float* S, int dk, int dv, int e0) {
  const __mmask16 m0 = tail_mask(dv - e0), m1 = tail_mask(dv - e0 - 16);
  __m512 u0[R], u1[R], o0[R], o1[R];
  for (int r = 0; r < R; ++r) {
    u0[r] = _mm512_maskz_loadu_ps(m0, U + static_cast<size_t>(r) * dv + e0);
    u1[r] = _mm512_maskz_loadu_ps(m1, U + static_cast<size_t>(r) * dv + e0 + 16);
    o0[r] = _mm512_setzero_ps();
    o1[r] = _mm512_setzero_ps();
  }
  for (int d = 0; d < dk; ++d) {
    const float* srow = S + static_cast<size_t>(d) * dv + e0;
    const __m512 s0 = _mm512_maskz_loadu_ps(m0, srow), s1 = _mm512_maskz_loadu_ps(m1, srow + 16);
    for (int r = 0; r < R; ++r) {
      const __m512 w = _mm512_set1_ps(W[static_cast<size_t>(r) * dk + d]);
      const __m512 q = _mm512_set1_ps(Qd[static_cast<size_t>(r) * dk + d]);
      u0[r] = _mm512_fnmadd_ps(w, s0, u0[r]);
      u1[r] = _mm512_fnmadd_ps(w, s1, u1[r]);
      o0[r] = _mm512_fmadd_ps(q, s0, o0[r]);
      o1[r] = _mm512_fmadd_ps(q, s1, o1[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(U + static_cast<size_t>(r) * dv + e0, m0, u0[r]);
    _mm512_mask_storeu_ps(U + static_cast<size_t>(r) * dv + e0 + 16, m1, u1[r]);
    _mm512_mask_storeu_ps(O + r * o_stride + e0, m0, o0[r]);
    _mm512_mask_storeu_ps(O + r * o_stride + e0 + 16, m1, o1[r]);
  }
}

// For R state rows d and columns [e0, e0 + 32): S_d = eg S_d + sum_i KdT[d][i] V'_i.
template <int R>
inline void state_update_block(float* S, const float* KdT, int ldk, const float* V, int n, int dv,
                               float eg, int e0) {
  const __mmask16 m0 = tail_mask(dv - e0), m1 = tail_mask(dv - e0 - 16);
  const __m512 egv = _mm512_set1_ps(eg);
  __m512 a0[R], a1[R];
  for (int r = 0; r < R; ++r) {
    a0[r] = _mm512_mul_ps(egv, _mm512_maskz_loadu_ps(m0, S + static_cast<size_t>(r) * dv + e0));
    a1[r] = _mm512_mul_ps(egv, _mm512_maskz_loadu_ps(m1, S + static_cast<size_t>(r) * dv + e0 + 16));
  }
  for (int i = 0; i < n; ++i) {
    const float* vrow = V + static_cast<size_t>(i) * dv + e0;
    const __m512 v0 = _mm512_maskz_loadu_ps(m0, vrow), v1 = _mm512_maskz_loadu_ps(m1, vrow + 16);
    for (int r = 0; r < R; ++r) {
      const __m512 kb = _mm512_set1_ps(KdT[static_cast<size_t>(r) * ldk + i]);
      a0[r] = _mm512_fmadd_ps(kb, v0, a0[r]);
      a1[r] = _mm512_fmadd_ps(kb, v1, a1[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(S + static_cast<size_t>(r) * dv + e0, m0, a0[r]);
    _mm512_mask_storeu_ps(S + static_cast<size_t>(r) * dv + e0 + 16, m1, a1[r]);
  }
}
#endif

// U_i -= W_i S and O_i = Qd_i S for i < n (O rows o_stride apart).
inline void rows_times_state(float* U, const float* W, const float* Qd, float* O, size_t o_stride,
                             int n, const float* S, int dk, int dv) {
#if DN_AVX512
  int i = 0;
  for (; i + 4 <= n; i += 4)
    for (int e0 = 0; e0 < dv; e0 += 32)
      rows_state_block<4>(U + static_cast<size_t>(i) * dv, W + static_cast<size_t>(i) * dk,
                          Qd + static_cast<size_t>(i) * dk, O + i * o_stride, o_stride, S, dk, dv, e0);
  for (; i < n; ++i)
    for (int e0 = 0; e0 < dv; e0 += 32)
      rows_state_block<1>(U + static_cast<size_t>(i) * dv, W + static_cast<size_t>(i) * dk,
                          Qd + static_cast<size_t>(i) * dk, O + i * o_stride, o_stride, S, dk, dv, e0);
#else
  for (int i = 0; i < n; ++i) {
    float* ui = U + static_cast<size_t>(i) * dv;
    float* oi = O + i * o_stride;
    for (int e = 0; e < dv; ++e) oi[e] = 0.0f;
    for (int d = 0; d < dk; ++d) {
      const float* srow = S + static_cast<size_t>(d) * dv;
      axpy(ui, -W[static_cast<size_t>(i) * dk + d], srow, dv);
      axpy(oi, Qd[static_cast<size_t>(i) * dk + d], srow, dv);
    }
  }
#endif
}

// S_d = eg S_d + sum_(i < n) KdT[d][i] V_i for every state row d.
inline void update_state(float* S, const float* KdT, int ldk, const float* V, int n, int dk, int dv,
                         float eg) {
#if DN_AVX512
  int d = 0;
  for (; d + 4 <= dk; d += 4)
    for (int e0 = 0; e0 < dv; e0 += 32)
      state_update_block<4>(S + static_cast<size_t>(d) * dv, KdT + static_cast<size_t>(d) * ldk, ldk,
                            V, n, dv, eg, e0);
  for (; d < dk; ++d)
    for (int e0 = 0; e0 < dv; e0 += 32)
      state_update_block<1>(S + static_cast<size_t>(d) * dv, KdT + static_cast<size_t>(d) * ldk, ldk,
                            V, n, dv, eg, e0);
#else
  for (int d = 0; d < dk; ++d) {
    float* srow = S + static_cast<size_t>(d) * dv;
    for (int e = 0; e < dv; ++e) srow[e] *= eg;
    for (int i = 0; i < n; ++i) axpy(srow, KdT[static_cast<size_t>(d) * ldk + i], V + static_cast<size_t>(i) * dv, dv);
  }
#endif
}

// A[i][j] = beta_i (k_i.k_j) e^(G_i - G_j) for j < i and P[i][j] = (q_i.k_j) e^(G_i - G_j) for
// j <= i (rows C apart); entries above are not written. KnT: scratch [dk][C].
inline void chunk_scores(const float* qn, const float* kn, const float* G, const float* B, int n,
                         int C, int dk, float* KnT, float* A, float* P) {
#if DN_AVX512
  // Rows of A and P as vectors over j: sum_d k_i[d] KnT[d][j], no horizontal sums.
  for (int i = 0; i < n; ++i)
    for (int d = 0; d < dk; ++d) KnT[static_cast<size_t>(d) * C + i] = kn[static_cast<size_t>(i) * dk + d];
  for (int i = 0; i < n; ++i) {
    const float* ki = kn + static_cast<size_t>(i) * dk;
    const float* qi = qn + static_cast<size_t>(i) * dk;
    const __m512 gi = _mm512_set1_ps(G[i]), bi = _mm512_set1_ps(B[i]);
    for (int j0 = 0; j0 <= i; j0 += 64) {
      __mmask16 m[4];
      __m512 a[4], pq[4];
      for (int u = 0; u < 4; ++u) {
        m[u] = tail_mask(i + 1 - j0 - 16 * u);  // j <= i
        a[u] = _mm512_setzero_ps();
        pq[u] = _mm512_setzero_ps();
      }
      for (int d = 0; d < dk; ++d) {
        const float* row = KnT + static_cast<size_t>(d) * C + j0;
        const __m512 kd = _mm512_set1_ps(ki[d]), qd = _mm512_set1_ps(qi[d]);
        for (int u = 0; u < 4; ++u) {
          if (!m[u]) break;
          const __m512 kj = _mm512_maskz_loadu_ps(m[u], row + 16 * u);
          a[u] = _mm512_fmadd_ps(kd, kj, a[u]);
          pq[u] = _mm512_fmadd_ps(qd, kj, pq[u]);
        }
      }
      for (int u = 0; u < 4; ++u) {
        if (!m[u]) break;
        const int j = j0 + 16 * u;
        const __m512 dec = exp512_ps(_mm512_sub_ps(gi, _mm512_maskz_loadu_ps(m[u], G + j)));
        const __mmask16 strict = static_cast<__mmask16>(m[u] & tail_mask(i - j));  // j < i
        _mm512_mask_storeu_ps(A + static_cast<size_t>(i) * C + j, strict,
                              _mm512_mul_ps(_mm512_mul_ps(bi, a[u]), dec));
        _mm512_mask_storeu_ps(P + static_cast<size_t>(i) * C + j, m[u], _mm512_mul_ps(pq[u], dec));
      }
    }
  }
#else
  (void)KnT;
  for (int i = 0; i < n; ++i) {
    const float* ki = kn + static_cast<size_t>(i) * dk;
    const float* qi = qn + static_cast<size_t>(i) * dk;
    for (int j = 0; j <= i; ++j) {
      const float* kj = kn + static_cast<size_t>(j) * dk;
      const float dec = std::exp(G[i] - G[j]);
      if (j < i) A[static_cast<size_t>(i) * C + j] = B[i] * dot(ki, kj, dk) * dec;
      P[static_cast<size_t>(i) * C + j] = dot(qi, kj, dk) * dec;
    }
  }
#endif
}

// ---- the chunkwise algorithm (HF torch_chunk_gated_delta_rule) for T tokens of one head. Per
// chunk of n tokens with cumulative log decay G_i and L = I + tril(beta_i k_i.k_j e^(G_i - G_j), -1):
//   U = L^-1 (beta v),  W = L^-1 (beta e^G k)          (forward substitution, the UT transform)
//   V' = U - W S
//   out_i = e^(G_i) q_i^T S + sum_(j<=i) (q_i.k_j) e^(G_i - G_j) V'_j
//   S = e^(G_n) S + sum_i e^(G_n - G_i) k_i V'_i^T
// q/k/v/g/beta/out point at the run's token 0; out rows are hv * dv apart.
inline void head_chunked(const float* q, const float* k, const float* v, const float* g,
                         const float* beta, int tokens, int h, const DeltaRuleParams& p,
                         float qscale, float* S, float* out, DeltaScratch& ws) {
  const int dk = p.dk, dv = p.dv, hv = p.hv, C = p.chunk;
  const int kh = h / (p.hv / p.hk);
  const size_t out_stride = static_cast<size_t>(hv) * dv;
  float* qn = ws.get(DeltaScratch::Q, static_cast<size_t>(C) * dk);
  float* kn = ws.get(DeltaScratch::K, static_cast<size_t>(C) * dk);
  float* W = ws.get(DeltaScratch::W, static_cast<size_t>(C) * dk);
  float* U = ws.get(DeltaScratch::U, static_cast<size_t>(C) * dv);
  float* A = ws.get(DeltaScratch::A, static_cast<size_t>(C) * C);
  float* P = ws.get(DeltaScratch::P, static_cast<size_t>(C) * C);
  float* KdT = ws.get(DeltaScratch::KT, static_cast<size_t>(dk) * C);
  float* G = ws.get(DeltaScratch::G, static_cast<size_t>(C) * 2);
  float* B = G + C;
  for (int c0 = 0; c0 < tokens; c0 += C) {
    const int n = std::min(C, tokens - c0);
    float gsum = 0.0f;
    for (int i = 0; i < n; ++i) {
      const size_t t = static_cast<size_t>(c0 + i);
      load_head(q + t * p.q_stride + static_cast<size_t>(kh) * dk, dk, p.l2norm_qk, qscale,
                qn + static_cast<size_t>(i) * dk);
      load_head(k + t * p.k_stride + static_cast<size_t>(kh) * dk, dk, p.l2norm_qk, 1.0f,
                kn + static_cast<size_t>(i) * dk);
      gsum += g[t * hv + h];
      G[i] = gsum;
      B[i] = beta[t * hv + h];
    }
    // A (strictly lower) and P = the decayed q.k (lower, diagonal included).
    chunk_scores(qn, kn, G, B, n, C, dk, ws.get(DeltaScratch::KN, static_cast<size_t>(dk) * C), A, P);
    // Forward substitution: row i of U and W from the rows before it.
    for (int i = 0; i < n; ++i) {
      float* ui = U + static_cast<size_t>(i) * dv;
      float* wi = W + static_cast<size_t>(i) * dk;
      const float* vi = v + static_cast<size_t>(c0 + i) * p.v_stride + static_cast<size_t>(h) * dv;
      const float* ki = kn + static_cast<size_t>(i) * dk;
      const float bw = B[i] * std::exp(G[i]);
      for (int e = 0; e < dv; ++e) ui[e] = vi[e] * B[i];
      for (int d = 0; d < dk; ++d) wi[d] = ki[d] * bw;
      float* ai = A + static_cast<size_t>(i) * C;
      for (int j = 0; j < i; ++j) ai[j] = -ai[j];
      combine_rows(ui, ai, 1, U, dv, i, dv);
      combine_rows(wi, ai, 1, W, dk, i, dk);
    }
    // Qd = e^(G_i) q_i (in place: P is done with q); then V' = U - W S (into U), O = Qd S.
    for (int i = 0; i < n; ++i) {
      const float eq = std::exp(G[i]);
      float* qi = qn + static_cast<size_t>(i) * dk;
      for (int d = 0; d < dk; ++d) qi[d] *= eq;
    }
    float* o0 = out + static_cast<size_t>(c0) * out_stride + static_cast<size_t>(h) * dv;
    rows_times_state(U, W, qn, o0, out_stride, n, S, dk, dv);
    // out_i += sum_(j<=i) P_ij V'_j
    for (int i = 0; i < n; ++i)
      combine_rows(o0 + i * out_stride, P + static_cast<size_t>(i) * C, 1, U, dv, i + 1, dv);
    // S = e^(G_n) S + sum_i (e^(G_n - G_i) k_i) V'_i^T, with the decayed keys transposed [dk][n].
    const float glast = G[n - 1];
    for (int i = 0; i < n; ++i) {
      const float dec = std::exp(glast - G[i]);
      const float* ki = kn + static_cast<size_t>(i) * dk;
      for (int d = 0; d < dk; ++d) KdT[static_cast<size_t>(d) * C + i] = ki[d] * dec;
    }
    update_state(S, KdT, C, U, n, dk, dv, std::exp(glast));
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
  float wt[64][16] = {};
  float st[64][16] = {};
  for (int c = 0; c < nc; ++c) {
    for (int j = 0; j < kernel; ++j) wt[j][c] = w[static_cast<size_t>(c0 + c) * kernel + j];
    for (int j = 0; j < ks; ++j) st[j][c] = state[static_cast<size_t>(c0 + c) * ks + j];
  }
  __m512 hist[64];
  for (int j = 0; j < ks; ++j) hist[j] = _mm512_loadu_ps(st[j]);
  const __m512 bv = bias ? _mm512_maskz_loadu_ps(m, bias + c0) : _mm512_setzero_ps();
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
// sum of squares in double.
inline void gated_norm_row(const float* x, const float* z, const float* w, float eps, int dim,
                           float* out) {
  double ss = 0.0;
  for (int i = 0; i < dim; ++i) ss += static_cast<double>(x[i]) * x[i];
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
