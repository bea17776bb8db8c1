// The per-(sequence, head) Gated DeltaNet kernels, included by deltanet.cc once per ISA (portable,
// and AVX-512 under a target pragma) so both paths run the same algorithm. Not a public header.
// Expects: namespace already opened by the includer, and DN_AVX512 defined to 0 or 1.

// ---- vector helpers over n floats (n is any length; the AVX-512 forms mask the tail)

#if DN_AVX512
inline __mmask16 tail_mask(int n) { return static_cast<__mmask16>((1u << n) - 1); }

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

// y = a * y
inline void scal(float* y, float a, int n) {
  const __m512 av = _mm512_set1_ps(a);
  int i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_mul_ps(av, _mm512_loadu_ps(y + i)));
  if (i < n) {
    const __mmask16 m = tail_mask(n - i);
    _mm512_mask_storeu_ps(y + i, m, _mm512_mul_ps(av, _mm512_maskz_loadu_ps(m, y + i)));
  }
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
inline void scal(float* y, float a, int n) {
  for (int i = 0; i < n; ++i) y[i] *= a;
}
#endif

// dst = src * rsqrt(sum(src^2) + 1e-6) (when l2) * scale, as HF's l2norm then the q scaling.
inline void load_head(const float* src, int n, bool l2, float scale, float* dst) {
  float inv = 1.0f;
  if (l2) {
    double ss = 0.0;
    for (int i = 0; i < n; ++i) ss += static_cast<double>(src[i]) * src[i];
    inv = 1.0f / std::sqrt(static_cast<float>(ss) + 1e-6f);
  }
  for (int i = 0; i < n; ++i) {
    float x = l2 ? src[i] * inv : src[i];
    dst[i] = x * scale;
  }
}

// The recurrent step (decode) of one head: S [dk, dv] in place, out [dv].
//   S *= e^g;  delta = (v - k^T S) * beta;  S += k delta^T;  out = q^T S
inline void head_step(const float* q_row, const float* k_row, const float* v_row, float g,
                      float beta, const DeltaRuleParams& p, float qscale, float* S, float* out,
                      DeltaScratch& ws) {
  const int dk = p.dk, dv = p.dv;
  float* qn = ws.get(DeltaScratch::Q, dk);
  float* kn = ws.get(DeltaScratch::K, dk);
  float* acc = ws.get(DeltaScratch::U, dv);
  load_head(q_row, dk, p.l2norm_qk, qscale, qn);
  load_head(k_row, dk, p.l2norm_qk, 1.0f, kn);
  const float eg = std::exp(g);
  for (int e = 0; e < dv; ++e) acc[e] = 0.0f;
  for (int d = 0; d < dk; ++d) {
    float* row = S + static_cast<size_t>(d) * dv;
    scal(row, eg, dv);
    axpy(acc, kn[d], row, dv);
  }
  for (int e = 0; e < dv; ++e) acc[e] = (v_row[e] - acc[e]) * beta;  // delta
  for (int e = 0; e < dv; ++e) out[e] = 0.0f;
  for (int d = 0; d < dk; ++d) {
    float* row = S + static_cast<size_t>(d) * dv;
    axpy(row, kn[d], acc, dv);
    axpy(out, qn[d], row, dv);
  }
}

// The chunkwise algorithm (HF torch_chunk_gated_delta_rule) for T tokens of one head. Per chunk
// of n tokens with cumulative log decay G_i and L = I + tril(beta_i k_i.k_j e^(G_i - G_j), -1):
//   U = L^-1 (beta v),  W = L^-1 (beta e^G k)          (forward substitution, the UT transform)
//   V' = U - W S
//   out_i = e^(G_i) q_i^T S + sum_(j<=i) (q_i.k_j) e^(G_i - G_j) V'_j
//   S = e^(G_n) S + sum_i e^(G_n - G_i) k_i V'_i^T
// Rows of q/k/v/g/beta/out are those of token 0 of the run; out rows are hv * dv apart.
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
    // Forward substitution: row i of U and W from the rows before it.
    for (int i = 0; i < n; ++i) {
      float* ui = U + static_cast<size_t>(i) * dv;
      float* wi = W + static_cast<size_t>(i) * dk;
      const float* vi = v + static_cast<size_t>(c0 + i) * p.v_stride + static_cast<size_t>(h) * dv;
      const float* ki = kn + static_cast<size_t>(i) * dk;
      const float bw = B[i] * std::exp(G[i]);
      for (int e = 0; e < dv; ++e) ui[e] = vi[e] * B[i];
      for (int d = 0; d < dk; ++d) wi[d] = ki[d] * bw;
      for (int j = 0; j < i; ++j) {
        const float a = -A[static_cast<size_t>(i) * C + j];
        axpy(ui, a, U + static_cast<size_t>(j) * dv, dv);
        axpy(wi, a, W + static_cast<size_t>(j) * dk, dk);
      }
    }
    // V' = U - W S (into U); out_i = (e^(G_i) q_i)^T S + sum_(j<=i) P_ij V'_j.
    for (int i = 0; i < n; ++i) {
      float* ui = U + static_cast<size_t>(i) * dv;
      const float* wi = W + static_cast<size_t>(i) * dk;
      const float* qi = qn + static_cast<size_t>(i) * dk;
      float* oi = out + static_cast<size_t>(c0 + i) * out_stride + static_cast<size_t>(h) * dv;
      const float eq = std::exp(G[i]);
      for (int e = 0; e < dv; ++e) oi[e] = 0.0f;
      for (int d = 0; d < dk; ++d) {
        const float* srow = S + static_cast<size_t>(d) * dv;
        axpy(ui, -wi[d], srow, dv);
        axpy(oi, qi[d] * eq, srow, dv);
      }
      for (int j = 0; j <= i; ++j)
        axpy(oi, P[static_cast<size_t>(i) * C + j], U + static_cast<size_t>(j) * dv, dv);
    }
    // S = e^(G_n) S + sum_i (e^(G_n - G_i) k_i) V'_i^T
    const float glast = G[n - 1];
    const float eg = std::exp(glast);
    for (int i = 0; i < n; ++i) B[i] = std::exp(glast - G[i]);
    for (int d = 0; d < dk; ++d) {
      float* srow = S + static_cast<size_t>(d) * dv;
      scal(srow, eg, dv);
      for (int i = 0; i < n; ++i)
        axpy(srow, kn[static_cast<size_t>(i) * dk + d] * B[i], U + static_cast<size_t>(i) * dv, dv);
    }
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
