// The decoder blocks as one op: B rows of S new tokens each (S = 1 a decoding step; S > 1 a
// prefill). The math of llama.model.TransformerBlock (Meta's), in fp32, with each linear layer read
// once through kernels.h. A step or a prefill then costs one call instead of about thirty PyTorch
// ops a block, whose dispatch, allocation and thread start-up cost more than the arithmetic on
// small models.
#include "kernels.h"

using namespace llama_kernels;

namespace {

constexpr int LINEARS = 7;  // wq, wk, wv, wo, w1, w2, w3

inline float get(const float* p, int64_t i) { return p[i]; }
inline float get(const at::Half* p, int64_t i) { return static_cast<float>(p[i]); }
inline float get(const at::BFloat16* p, int64_t i) { return static_cast<float>(p[i]); }

// out (B, D) = x * rsqrt(mean(x^2) + eps) * w
template <typename T>
void rms_norm(const float* x, int64_t B, int64_t D, const T* w, double eps, float* out) {
  at::parallel_for(0, B, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const float* xb = x + b * D;
      double ss = 0.0;
      for (int64_t k = 0; k < D; ++k) ss += (double)xb[k] * xb[k];
      const float r = (float)(1.0 / std::sqrt(ss / D + eps));
      for (int64_t k = 0; k < D; ++k) out[b * D + k] = xb[k] * r * get(w, k);
    }
  });
}

void rms_norm(const float* x, int64_t B, int64_t D, const at::Tensor& w, double eps, float* out) {
  switch (w.scalar_type()) {
    case at::kFloat: rms_norm(x, B, D, w.data_ptr<float>(), eps, out); break;
    case at::kHalf: rms_norm(x, B, D, w.data_ptr<at::Half>(), eps, out); break;
    case at::kBFloat16: rms_norm(x, B, D, w.data_ptr<at::BFloat16>(), eps, out); break;
    default: TORCH_CHECK(false, "unsupported norm dtype ", w.scalar_type());
  }
}

// Rotate interleaved pairs of each head of x (B, heads * d) in place: out = x cos + swap(x) sin,
// where swap exchanges the members of each pair and sin is signed (-sin, +sin) (llama.model.rope_tables).
// cos, sin: (B, d), one row for each row of x.
void rotate(float* x, int64_t B, int64_t heads, int64_t d, const float* cos, const float* sin) {
  for (int64_t b = 0; b < B; ++b) {
    const float* c = cos + b * d;
    const float* s = sin + b * d;
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + (b * heads + h) * d;
      for (int64_t j = 0; j < d; j += 2) {
        const float x0 = v[j], x1 = v[j + 1];
        v[j] = x0 * c[j] + x1 * s[j];
        v[j + 1] = x1 * c[j + 1] + x0 * s[j + 1];
      }
    }
  }
}

template <typename C>
inline float dot(const float* q, const C* k, int64_t d) {
  int64_t j = 0;
  float t = 0.f;
  if (d >= W) {
    vf acc = vzero();
    for (; j + W <= d; j += W) acc = vfma(vload(q + j), load_w(k + j), acc);
    t = vsum(acc);
  }
  for (; j < d; ++j) t += q[j] * get(k, j);
  return t;
}

// out[i] = the sum of a[i]'s lanes, for 8 vectors at once.
inline void hsum8(const vf* a, float* out) {
#if defined(LLAMA_AVX512)
  __m256 h[8];
  for (int i = 0; i < 8; ++i) h[i] = _mm256_add_ps(_mm512_castps512_ps256(a[i]), _mm512_extractf32x8_ps(a[i], 1));
#else
  const __m256* h = a;
#endif
  // g0 = a0..a3's sums of lanes 0-3, then of lanes 4-7; g1 likewise for a4..a7
  const __m256 g0 = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
  const __m256 g1 = _mm256_hadd_ps(_mm256_hadd_ps(h[4], h[5]), _mm256_hadd_ps(h[6], h[7]));
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(g0, g1, 0x20), _mm256_permute2f128_ps(g0, g1, 0x31)));
}

// p[i][t] = q_i . k[t] * scale for t < n (keys d apart), Q queries and 8 / Q keys a pass: each key
// vector read serves all Q, and the 8 sums of a pass are reduced together.
template <typename C, int Q>
inline void scores(const float* const* q, const C* k, int64_t n, int64_t d, float scale, float* p, int64_t T) {
  constexpr int KT = 8 / Q;
  const int64_t dv = d / W * W;
  int64_t t = 0;
  for (; t + KT <= n; t += KT) {
    vf a[8];
    for (int u = 0; u < 8; ++u) a[u] = vzero();
    for (int64_t j = 0; j < dv; j += W)
      for (int i = 0; i < Q; ++i) {
        const vf qv = vload(q[i] + j);
        for (int u = 0; u < KT; ++u) a[i * KT + u] = vfma(qv, load_w(k + (t + u) * d + j), a[i * KT + u]);
      }
    float sums[8];
    hsum8(a, sums);
    for (int i = 0; i < Q; ++i)
      for (int u = 0; u < KT; ++u) {
        float sum = sums[i * KT + u];
        for (int64_t j = dv; j < d; ++j) sum += q[i][j] * get(k + (t + u) * d, j);
        p[i * T + t + u] = sum * scale;
      }
  }
  for (; t < n; ++t)
    for (int i = 0; i < Q; ++i) p[i * T + t] = dot(q[i], k + t * d, d) * scale;
}

// p[0..n) = softmax(p[0..n)), in place.
inline void softmax(float* p, int64_t n) {
  const int64_t nv = n / W * W;
  vf most = vset1(-INFINITY);
  for (int64_t t = 0; t < nv; t += W) most = vmax(most, vload(p + t));
  float top = -INFINITY;
  for (int64_t t = nv; t < n; ++t) top = std::max(top, p[t]);
  if (nv) {
    alignas(64) float lanes[W];
    vstore(lanes, most);
    for (int i = 0; i < W; ++i) top = std::max(top, lanes[i]);
  }
  int64_t t = 0;
  vf sum = vzero();
  for (; t + W <= n; t += W) {
    const vf e = vexp(vadd(vload(p + t), vset1(-top)));
    vstore(p + t, e);
    sum = vadd(sum, e);
  }
  float total = vsum(sum);
  for (; t < n; ++t) total += p[t] = std::exp(p[t] - top);
  const float inv = 1.0f / total;
  for (t = 0; t < nv; t += W) vstore(p + t, vmul(vload(p + t), vset1(inv)));
  for (; t < n; ++t) p[t] *= inv;
}

// out[i][j..j + V W) = sum over t < n of p[i][t] v[t][j..] (values d apart) for Q rows: Q * V sums
// held in registers, each value vector read serving all Q.
template <typename C, int Q, int V>
inline void weighted_slice(const float* p, int64_t T, const C* v, int64_t n, int64_t d, int64_t j, float* const* out) {
  vf a[Q][V];
  for (int i = 0; i < Q; ++i)
    for (int u = 0; u < V; ++u) a[i][u] = vzero();
  for (int64_t t = 0; t < n; ++t) {
    vf vv[V];
    for (int u = 0; u < V; ++u) vv[u] = load_w(v + t * d + j + u * W);
    for (int i = 0; i < Q; ++i) {
      const vf pt = vset1(p[i * T + t]);
      for (int u = 0; u < V; ++u) a[i][u] = vfma(pt, vv[u], a[i][u]);
    }
  }
  for (int i = 0; i < Q; ++i)
    for (int u = 0; u < V; ++u) vstore(out[i] + j + u * W, a[i][u]);
}

// Attention of Q query rows of one head at once (row i over keys 0..n[i]-1 of the head's cache
// rows k, v), so that each key and value read from the cache serves all Q: a prefill's 4
// neighbouring tokens, or one decoding row. Weights past a row's own keys are 0. p: (Q, T) scratch.
template <typename C, int Q>
void attend_rows(const float* const* q, const int64_t* n, const C* k, const C* v, int64_t d, float scale, float* p,
                 int64_t T, float* const* out) {
  int64_t most = 0;
  for (int i = 0; i < Q; ++i) most = std::max(most, n[i]);
  scores<C, Q>(q, k, most, d, scale, p, T);
  for (int i = 0; i < Q; ++i) {
    softmax(p + i * T, n[i]);
    std::fill(p + i * T + n[i], p + i * T + most, 0.f);
  }
  constexpr int V = 8 / Q;  // Q * V = 8 sums in registers, enough to hide the multiply-adds' latency
  int64_t j = 0;
  for (; j + V * W <= d; j += V * W) weighted_slice<C, Q, V>(p, T, v, most, d, j, out);
  for (; j + W <= d; j += W) weighted_slice<C, Q, 1>(p, T, v, most, d, j, out);
  for (; j < d; ++j)
    for (int i = 0; i < Q; ++i) {
      float sum = 0.f;
      for (int64_t t = 0; t < most; ++t) sum += p[i * T + t] * get(v + t * d, j);
      out[i][j] = sum;
    }
}

// Write k, v (B, kv_heads * d) at each row's position of the caches (maxB, kv_heads, T, d), then
// attend: out (B, heads * d) from q (B, heads * d) over positions 0..pos[b] of row b. Row b is in
// the cache's row b / S: a prefill's rows (S tokens of one cache row) are all written before any
// attends, so each token sees itself and those before it. A prefill's tokens attend 4 at a time
// (attend_rows). The threads take (tokens, head) items as they finish, since a prefill's later
// tokens attend to more positions.
template <typename C>
void attend(const float* q, const float* k, const float* v, int64_t B, int64_t S, int64_t heads, int64_t kv_heads,
            int64_t d, C* ck, C* cv, int64_t T, const int64_t* pos, float* out) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < kv_heads; ++g)
      for (int64_t j = 0; j < d; ++j) {
        const int64_t at = ((b / S * kv_heads + g) * T + pos[b]) * d + j;
        ck[at] = static_cast<C>(k[(b * kv_heads + g) * d + j]);
        cv[at] = static_cast<C>(v[(b * kv_heads + g) * d + j]);
      }
  constexpr int Q = 4;
  const int64_t rep = heads / kv_heads, tiles = (S + Q - 1) / Q;  // tiles of Q tokens a cache row
  const float scale = 1.0f / std::sqrt((float)d);
  parallel_chunks(B / S * tiles * heads, 8, [&](int64_t lo, int64_t hi) {
    std::vector<float> p(Q * T);
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t h = item % heads, tile = item / heads % tiles, slot = item / heads / tiles;
      const int64_t b0 = slot * S + tile * Q, rows = std::min<int64_t>(Q, S - tile * Q);
      const int64_t cache_row = (slot * kv_heads + h / rep) * T * d;
      const float* qs[Q];
      float* outs[Q];
      int64_t n[Q];
      for (int64_t i = 0; i < rows; ++i)
        qs[i] = q + ((b0 + i) * heads + h) * d, outs[i] = out + ((b0 + i) * heads + h) * d, n[i] = pos[b0 + i] + 1;
      if (rows == Q) attend_rows<C, Q>(qs, n, ck + cache_row, cv + cache_row, d, scale, p.data(), T, outs);
      else
        for (int64_t i = 0; i < rows; ++i)
          attend_rows<C, 1>(qs + i, n + i, ck + cache_row, cv + cache_row, d, scale, p.data(), T, outs + i);
    }
  });
}

void attend(const float* q, const float* k, const float* v, int64_t B, int64_t S, int64_t heads, int64_t kv_heads,
            int64_t d, const at::Tensor& ck, const at::Tensor& cv, const int64_t* pos, float* out) {
  const int64_t T = ck.size(2);
  switch (ck.scalar_type()) {
    case at::kFloat:
      attend(q, k, v, B, S, heads, kv_heads, d, ck.data_ptr<float>(), cv.data_ptr<float>(), T, pos, out); break;
    case at::kHalf:
      attend(q, k, v, B, S, heads, kv_heads, d, ck.data_ptr<at::Half>(), cv.data_ptr<at::Half>(), T, pos, out);
      break;
    case at::kBFloat16:
      attend(q, k, v, B, S, heads, kv_heads, d, ck.data_ptr<at::BFloat16>(), cv.data_ptr<at::BFloat16>(), T, pos,
             out);
      break;
    default: TORCH_CHECK(false, "unsupported cache dtype ", ck.scalar_type());
  }
}

inline float rounded(float v, at::ScalarType dtype) {
  return dtype == at::kHalf ? static_cast<float>(at::Half(v))
       : dtype == at::kBFloat16 ? static_cast<float>(at::BFloat16(v)) : v;
}

// The residual stream is held in the model's dtype, as PyTorch's block holds it: h += y, rounded.
void add_rounded(float* h, const float* y, int64_t n, at::ScalarType dtype) {
  at::parallel_for(0, n, 16384, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) h[i] = rounded(h[i] + y[i], dtype);
  });
}

// a = silu(a) * c = a / (1 + e^-a) * c
void silu_mul(float* a, const float* c, int64_t n) {
  at::parallel_for(0, (n + W - 1) / W, 1024, [&](int64_t lo, int64_t hi) {
    int64_t i = lo * W;
    const int64_t end = std::min(n, hi * W);
    for (; i + W <= end; i += W) {
      const vf x = vload(a + i);
      vstore(a + i, vmul(vdiv(x, vadd(vset1(1.0f), vexp(vmul(x, vset1(-1.0f))))), vload(c + i)));
    }
    for (; i < end; ++i) a[i] = a[i] / (1.0f + std::exp(-a[i])) * c[i];
  });
}

Weight weight_of(const std::vector<at::Tensor>& t, int64_t kind, int64_t group, int64_t i) {
  const at::Tensor& w = t[3 * i];
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "linear ", i, ": weight must be a contiguous matrix");
  int64_t N = w.size(0), K = w.size(1);
  if (kind == INT4) K *= 2;
  if (kind == ATEN_INT4) N = t[3 * i + 1].size(1), K = t[3 * i + 1].size(0) * group;
  if (kind == INT4) check_int4(K, group);
  if (kind == INT4X8) K *= 2, check_int4x8(N, K, w, t[3 * i + 1]);
  return Weight{kind, N, K, group, w, t[3 * i + 1].contiguous(), t[3 * i + 2].contiguous()};
}

// The working vectors of a call: B rows (S tokens of each cache row) of the residual stream h and of
// each intermediate.
struct Step {
  int64_t B, S, dim, heads, kv_heads, d, hidden;
  const int64_t* pos;           // (B,): each row's position
  std::vector<float> cos, sin;  // (B, d): each row's rotary row
  at::ScalarType dtype;         // the residual stream's
  std::vector<float> h, xn, q, k, v, att, y, a, c;
};

// One decoder block (Meta's TransformerBlock) on s.h, in place: L = wq, wk, wv, wo, w1, w2, w3.
void block(Step& s, const Weight* L, const at::Tensor& attention_norm, double attention_eps,
           const at::Tensor& ffn_norm, double ffn_eps, const at::Tensor& cache_k, const at::Tensor& cache_v) {
  const int64_t B = s.B;
  rms_norm(s.h.data(), B, s.dim, attention_norm, attention_eps, s.xn.data());
  apply(L[0], s.xn.data(), B, s.q.data());
  apply(L[1], s.xn.data(), B, s.k.data());
  apply(L[2], s.xn.data(), B, s.v.data());
  rotate(s.q.data(), B, s.heads, s.d, s.cos.data(), s.sin.data());
  rotate(s.k.data(), B, s.kv_heads, s.d, s.cos.data(), s.sin.data());
  attend(s.q.data(), s.k.data(), s.v.data(), B, s.S, s.heads, s.kv_heads, s.d, cache_k, cache_v, s.pos, s.att.data());
  apply(L[3], s.att.data(), B, s.y.data());
  add_rounded(s.h.data(), s.y.data(), B * s.dim, s.dtype);

  rms_norm(s.h.data(), B, s.dim, ffn_norm, ffn_eps, s.xn.data());
  apply(L[4], s.xn.data(), B, s.a.data());
  apply(L[6], s.xn.data(), B, s.c.data());
  silu_mul(s.a.data(), s.c.data(), B * s.hidden);
  apply(L[5], s.a.data(), B, s.y.data());
  add_rounded(s.h.data(), s.y.data(), B * s.dim, s.dtype);
}

// The blocks' weights, checked, and a Step for B rows of dim, S a cache row, at positions pos, its
// vectors sized.
std::vector<Weight> blocks_of(Step& s, int64_t B, int64_t S, int64_t dim, const std::vector<at::Tensor>& weights,
                              at::IntArrayRef kinds, at::IntArrayRef groups, const std::vector<at::Tensor>& norms,
                              at::ArrayRef<double> eps, at::TensorList cache_k, at::TensorList cache_v,
                              const at::Tensor& pos, int64_t n_heads) {
  const int64_t n = (int64_t)cache_k.size();
  TORCH_CHECK(n > 0 && (int64_t)cache_v.size() == n && (int64_t)weights.size() == 3 * LINEARS * n &&
              (int64_t)kinds.size() == LINEARS * n && (int64_t)groups.size() == LINEARS * n &&
              (int64_t)norms.size() == 2 * n && (int64_t)eps.size() == 2 * n,
              "decoding takes 7 linear layers, 2 norms and 2 caches a block");
  std::vector<Weight> L(LINEARS * n);
  for (int64_t i = 0; i < LINEARS * n; ++i) L[i] = weight_of(weights, kinds[i], groups[i], i);
  for (int64_t l = 0; l < n; ++l)
    TORCH_CHECK(cache_k[l].is_contiguous() && cache_v[l].is_contiguous() && cache_k[l].dim() == 4 &&
                cache_k[l].sizes() == cache_v[l].sizes() && cache_k[l].sizes() == cache_k[0].sizes() &&
                B / S <= cache_k[l].size(0), "bad caches");
  TORCH_CHECK(pos.scalar_type() == at::kLong && pos.is_contiguous() && pos.numel() == B, "pos must be (B,)");
  s.B = B, s.S = S, s.dim = dim, s.heads = n_heads, s.kv_heads = cache_k[0].size(1), s.d = cache_k[0].size(3);
  s.hidden = L[4].N, s.pos = pos.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(s.pos[b] >= 0 && s.pos[b] < cache_k[0].size(2), "position out of the cache");
  for (auto* v : {&s.h, &s.xn, &s.y}) v->resize(B * dim);
  for (auto* v : {&s.q, &s.att}) v->resize(B * n_heads * s.d);
  for (auto* v : {&s.k, &s.v}) v->resize(B * s.kv_heads * s.d);
  for (auto* v : {&s.a, &s.c}) v->resize(B * s.hidden);
  return L;
}

void run_blocks(Step& s, const std::vector<Weight>& L, const std::vector<at::Tensor>& norms, at::ArrayRef<double> eps,
                at::TensorList cache_k, at::TensorList cache_v) {
  for (size_t l = 0; l < cache_k.size(); ++l)
    block(s, &L[LINEARS * l], norms[2 * l], eps[2 * l], norms[2 * l + 1], eps[2 * l + 1], cache_k[l], cache_v[l]);
}

// Elements lo..lo+n of a floating-point tensor t, to fp32.
void floats(const at::Tensor& t, int64_t lo, int64_t n, float* out) {
  switch (t.scalar_type()) {
    case at::kFloat: for (int64_t i = 0; i < n; ++i) out[i] = t.data_ptr<float>()[lo + i]; break;
    case at::kHalf: for (int64_t i = 0; i < n; ++i) out[i] = get(t.data_ptr<at::Half>(), lo + i); break;
    case at::kBFloat16: for (int64_t i = 0; i < n; ++i) out[i] = get(t.data_ptr<at::BFloat16>(), lo + i); break;
    default: TORCH_CHECK(false, "unsupported dtype ", t.scalar_type());
  }
}

// Rows of tokens of an embedding table into h (B, dim), rounded to dtype: a float table (V, dim), or
// (group > 0) llama.quant_layers.Int4Embedding's int4 pairs (V, dim / 2), scales and zeros (V, dim / group).
void embed(const int64_t* tokens, int64_t B, int64_t dim, const std::vector<at::Tensor>& table, int64_t group,
           at::ScalarType dtype, float* h) {
  const at::Tensor& w = table[0];
  const int64_t V = w.size(0), groups = group ? dim / group : 0;
  TORCH_CHECK(w.is_contiguous() && (group ? w.size(1) * 2 : w.size(1)) == dim, "bad embedding table");
  std::vector<float> sc(groups), zs(groups);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t t = tokens[b];
    TORCH_CHECK(t >= 0 && t < V, "token ", t, " outside the embedding table of ", V);
    float* out = h + b * dim;
    if (group == 0) {
      floats(w, t * dim, dim, out);
    } else {
      const uint8_t* q = w.data_ptr<uint8_t>() + t * dim / 2;
      floats(table[1], t * groups, groups, sc.data());
      const bool zeros = table[2].numel() > 0;
      if (zeros) floats(table[2], t * groups, groups, zs.data());
      for (int64_t k = 0; k < dim; ++k) {
        const int v = (k & 1) ? q[k / 2] >> 4 : q[k / 2] & 15;
        const float x = (float)(v - 8) * sc[k / group];
        out[k] = zeros ? x + zs[k / group] : x;
      }
    }
    for (int64_t k = 0; k < dim; ++k) out[k] = rounded(out[k], dtype);
  }
}

}  // namespace

// x (B, S, dim) -> (B, S, dim), x's dtype: n consecutive decoder blocks for S new tokens of each of B
// rows. weights: (weight, scales, zeros) of each block's wq, wk, wv, wo, w1, w2, w3 (empty tensors
// where a layer has none), 21 a block, of kinds (kernels.h) and group sizes (7 a block); norms and
// eps: each block's attention_norm and ffn_norm; caches (maxB, kv_heads, T, head_dim), one a block,
// written at pos (B, S) (integers, each token's position); cos, sin (head_dim wide: one row for all
// tokens, one a token position (S), or one a token (B * S), any leading shape). The stream goes from
// block to block in fp32, rounded to x's dtype after each addition as PyTorch's blocks hold it, so one
// call of n blocks equals n calls of one.
at::Tensor decode_layers(const at::Tensor& x, const std::vector<at::Tensor>& weights, at::IntArrayRef kinds,
                         at::IntArrayRef groups, const std::vector<at::Tensor>& norms, at::ArrayRef<double> eps,
                         at::TensorList cache_k, at::TensorList cache_v, const at::Tensor& pos,
                         const at::Tensor& cos, const at::Tensor& sin, int64_t n_heads) {
  TORCH_CHECK(x.dim() == 3, "decode_layers takes x of shape (B, S, dim)");
  const int64_t S = x.size(1), rows = x.size(0) * S, dim = x.size(-1);
  Step s;
  at::Tensor posc = pos.reshape({-1}).to(at::kLong).contiguous();  // (B * S,)
  const std::vector<Weight> L =
      blocks_of(s, rows, S, dim, weights, kinds, groups, norms, eps, cache_k, cache_v, posc, n_heads);
  s.dtype = x.scalar_type();
  at::Tensor cf = cos.to(at::kFloat).reshape({-1, s.d}).contiguous();  // (1, S or B * S, d)
  at::Tensor sf = sin.to(at::kFloat).reshape({-1, s.d}).contiguous();
  const int64_t R = cf.size(0);
  TORCH_CHECK(sf.size(0) == R && (R == 1 || R == S || R == rows), "cos and sin need 1, S or B * S rows");
  s.cos.resize(rows * s.d), s.sin.resize(rows * s.d);
  for (int64_t b = 0; b < rows; ++b) {  // row b's rotary row: b % R is 0, its position's, or its own
    floats(cf, b % R * s.d, s.d, s.cos.data() + b * s.d);
    floats(sf, b % R * s.d, s.d, s.sin.data() + b * s.d);
  }
  at::Tensor xf = x.reshape({rows, dim}).to(at::kFloat).contiguous();  // (B * S, dim)
  std::copy(xf.data_ptr<float>(), xf.data_ptr<float>() + rows * dim, s.h.begin());
  run_blocks(s, L, norms, eps, cache_k, cache_v);
  return at::from_blob(s.h.data(), x.sizes(), at::kFloat).to(x.scalar_type(), false, true);
}

// A whole Transformer forward: tokens (B, S) at pos (B, S) -> logits (len(logits_rows), vocab) fp32
// of the tokens logits_rows (indices into the B * S tokens, row-major). embedding: (weight, scales,
// zeros) of the table (see embed); the blocks as for decode_layers; rope (2, T, head_dim): the
// model's cos and signed sin tables; norm, norm_eps and output (weight, scales, zeros, of output_kind
// and output_group): the final norm and projection. dtype: the residual stream's.
at::Tensor decode_step(const at::Tensor& tokens, const std::vector<at::Tensor>& embedding, int64_t embedding_group,
                       const std::vector<at::Tensor>& weights, at::IntArrayRef kinds, at::IntArrayRef groups,
                       const std::vector<at::Tensor>& norms, at::ArrayRef<double> eps, at::TensorList cache_k,
                       at::TensorList cache_v, const at::Tensor& pos, const at::Tensor& rope, int64_t n_heads,
                       const at::Tensor& norm, double norm_eps, const std::vector<at::Tensor>& output,
                       int64_t output_kind, int64_t output_group, at::ScalarType dtype,
                       const at::Tensor& logits_rows) {
  TORCH_CHECK(!at::isFloatingType(tokens.scalar_type()) && tokens.dim() == 2, "tokens must be integers (B, S)");
  TORCH_CHECK(embedding.size() == 3 && output.size() == 3, "embedding and output are (weight, scales, zeros)");
  const at::Tensor tok = tokens.reshape({-1}).to(at::kLong).contiguous();  // (B * S,)
  const int64_t S = tokens.size(1), rows = tok.size(0), dim = norm.numel();
  Step s;
  at::Tensor posc = pos.reshape({-1}).to(at::kLong).contiguous();  // (B * S,)
  const std::vector<Weight> L =
      blocks_of(s, rows, S, dim, weights, kinds, groups, norms, eps, cache_k, cache_v, posc, n_heads);
  s.dtype = dtype;
  TORCH_CHECK(rope.dim() == 3 && rope.size(0) == 2 && rope.size(2) == s.d && rope.is_contiguous(), "bad rope tables");
  const int64_t T = rope.size(1), d = s.d;
  s.cos.resize(rows * d), s.sin.resize(rows * d);
  for (int64_t b = 0; b < rows; ++b) {
    TORCH_CHECK(s.pos[b] < T, "position out of the rope tables");
    floats(rope, s.pos[b] * d, d, s.cos.data() + b * d);
    floats(rope, (T + s.pos[b]) * d, d, s.sin.data() + b * d);
  }
  const at::Tensor picked = logits_rows.reshape({-1}).to(at::kLong).contiguous();  // (n,)
  const int64_t n = picked.numel();
  TORCH_CHECK(n <= rows, "more logits rows than tokens");
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(picked.data_ptr<int64_t>()[i] >= 0 && picked.data_ptr<int64_t>()[i] < rows, "logits row out of range");
  embed(tok.data_ptr<int64_t>(), rows, dim, embedding, embedding_group, dtype, s.h.data());
  run_blocks(s, L, norms, eps, cache_k, cache_v);
  const Weight head = weight_of(output, output_kind, output_group, 0);
  TORCH_CHECK(head.K == dim, "the output layer takes ", head.K, " features, not ", dim);
  for (int64_t i = 0; i < n; ++i)  // (n, dim): the picked rows
    std::copy_n(s.h.data() + picked.data_ptr<int64_t>()[i] * dim, dim, s.y.data() + i * dim);
  rms_norm(s.y.data(), n, dim, norm, norm_eps, s.xn.data());
  at::Tensor logits = at::empty({n, head.N}, at::kFloat);
  apply(head, s.xn.data(), n, logits.data_ptr<float>());
  return logits;
}

TORCH_LIBRARY_FRAGMENT(llama_cpu, m) {
  m.def("decode_layers(Tensor x, Tensor[] weights, int[] kinds, int[] groups, Tensor[] norms, float[] eps, "
        "Tensor(a!)[] cache_k, Tensor(b!)[] cache_v, Tensor pos, Tensor cos, Tensor sin, int n_heads) -> Tensor");
  m.def("decode_step(Tensor tokens, Tensor[] embedding, int embedding_group, Tensor[] weights, int[] kinds, "
        "int[] groups, Tensor[] norms, float[] eps, Tensor(a!)[] cache_k, Tensor(b!)[] cache_v, Tensor pos, "
        "Tensor rope, int n_heads, Tensor norm, float norm_eps, Tensor[] output, int output_kind, "
        "int output_group, ScalarType dtype, Tensor logits_rows) -> Tensor");
}
TORCH_LIBRARY_IMPL(llama_cpu, CPU, m) {
  m.impl("decode_layers", &decode_layers);
  m.impl("decode_step", &decode_step);
}
