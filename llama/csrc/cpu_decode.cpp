// One decoder block for one step of decoding, as one op: B rows of one new token each. The math of
// llama.model.TransformerBlock (Meta's), in fp32, with each linear layer read once through
// kernels.h. A step then costs one call a layer instead of about thirty PyTorch ops, whose
// dispatch, allocation and thread start-up cost more than the arithmetic on small models.
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
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = x + b * D;
    double ss = 0.0;
    for (int64_t k = 0; k < D; ++k) ss += (double)xb[k] * xb[k];
    const float r = (float)(1.0 / std::sqrt(ss / D + eps));
    for (int64_t k = 0; k < D; ++k) out[b * D + k] = xb[k] * r * get(w, k);
  }
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
void rotate(float* x, int64_t B, int64_t heads, int64_t d, const float* cos, const float* sin, bool per_row) {
  for (int64_t b = 0; b < B; ++b) {
    const float* c = cos + (per_row ? b * d : 0);
    const float* s = sin + (per_row ? b * d : 0);
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

// Write k, v (B, kv_heads * d) at each row's position of the caches (maxB, kv_heads, T, d), then
// attend: out (B, heads * d) from q (B, heads * d) over positions 0..pos[b] of row b.
template <typename C>
void attend(const float* q, const float* k, const float* v, int64_t B, int64_t heads, int64_t kv_heads,
            int64_t d, C* ck, C* cv, int64_t T, const int64_t* pos, float* out) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < kv_heads; ++g)
      for (int64_t j = 0; j < d; ++j) {
        const int64_t at = ((b * kv_heads + g) * T + pos[b]) * d + j;
        ck[at] = static_cast<C>(k[(b * kv_heads + g) * d + j]);
        cv[at] = static_cast<C>(v[(b * kv_heads + g) * d + j]);
      }
  const int64_t rep = heads / kv_heads;
  const float scale = 1.0f / std::sqrt((float)d);
  at::parallel_for(0, B * heads, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> p(T), acc(d);
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t b = i / heads, h = i % heads, n = pos[b] + 1;
      const float* qi = q + i * d;
      const C* kb = ck + (b * kv_heads + h / rep) * T * d;
      const C* vb = cv + (b * kv_heads + h / rep) * T * d;
      float top = -INFINITY, total = 0.f;
      for (int64_t t = 0; t < n; ++t) top = std::max(top, p[t] = dot(qi, kb + t * d, d) * scale);
      int64_t t = 0;
      vf sum = vzero();
      for (; t + W <= n; t += W) {
        const vf e = vexp(vadd(vload(p.data() + t), vset1(-top)));
        vstore(p.data() + t, e);
        sum = vadd(sum, e);
      }
      total = vsum(sum);
      for (; t < n; ++t) total += p[t] = std::exp(p[t] - top);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < n; ++t) {
        const float pt = p[t] / total;
        const C* vt = vb + t * d;
        int64_t j = 0;
        for (; j + W <= d; j += W) vstore(acc.data() + j, vfma(vset1(pt), load_w(vt + j), vload(acc.data() + j)));
        for (; j < d; ++j) acc[j] += pt * get(vt, j);
      }
      std::copy(acc.begin(), acc.end(), out + i * d);
    }
  });
}

void attend(const float* q, const float* k, const float* v, int64_t B, int64_t heads, int64_t kv_heads,
            int64_t d, at::Tensor& ck, at::Tensor& cv, const int64_t* pos, float* out) {
  const int64_t T = ck.size(2);
  switch (ck.scalar_type()) {
    case at::kFloat:
      attend(q, k, v, B, heads, kv_heads, d, ck.data_ptr<float>(), cv.data_ptr<float>(), T, pos, out); break;
    case at::kHalf:
      attend(q, k, v, B, heads, kv_heads, d, ck.data_ptr<at::Half>(), cv.data_ptr<at::Half>(), T, pos, out); break;
    case at::kBFloat16:
      attend(q, k, v, B, heads, kv_heads, d, ck.data_ptr<at::BFloat16>(), cv.data_ptr<at::BFloat16>(), T, pos,
             out);
      break;
    default: TORCH_CHECK(false, "unsupported cache dtype ", ck.scalar_type());
  }
}

// The residual stream is held in the model's dtype, as PyTorch's block holds it: h += y, rounded.
void add_rounded(float* h, const float* y, int64_t n, at::ScalarType dtype) {
  for (int64_t i = 0; i < n; ++i) {
    const float t = h[i] + y[i];
    h[i] = dtype == at::kHalf ? static_cast<float>(at::Half(t))
         : dtype == at::kBFloat16 ? static_cast<float>(at::BFloat16(t)) : t;
  }
}

// a = silu(a) * c = a / (1 + e^-a) * c
void silu_mul(float* a, const float* c, int64_t n) {
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const vf x = vload(a + i);
    vstore(a + i, vmul(vdiv(x, vadd(vset1(1.0f), vexp(vmul(x, vset1(-1.0f))))), vload(c + i)));
  }
  for (; i < n; ++i) a[i] = a[i] / (1.0f + std::exp(-a[i])) * c[i];
}

Weight weight_of(const std::vector<at::Tensor>& t, int64_t kind, int64_t group, int i) {
  const at::Tensor& w = t[3 * i];
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "linear ", i, ": weight must be a contiguous matrix");
  int64_t N = w.size(0), K = w.size(1);
  if (kind == INT4) K *= 2;
  if (kind == ATEN_INT4) N = t[3 * i + 1].size(1), K = t[3 * i + 1].size(0) * group;
  if (kind == INT4) check_int4(K, group);
  if (kind == INT4X8) K *= 2, check_int4x8(N, K, w, t[3 * i + 1]);
  return Weight{kind, N, K, group, w, t[3 * i + 1].contiguous(), t[3 * i + 2].contiguous()};
}

}  // namespace

// x (B, 1, dim) -> (B, 1, dim), x's dtype. weights: (weight, scales, zeros) of wq, wk, wv, wo, w1,
// w2, w3 (empty tensors where a layer has none), of kinds (kernels.h) and group sizes; caches
// (maxB, kv_heads, T, head_dim) written at pos (B,); cos, sin (1 or B rows of head_dim, any leading shape).
at::Tensor block_decode(const at::Tensor& x, const std::vector<at::Tensor>& weights, at::IntArrayRef kinds,
                        at::IntArrayRef groups, const at::Tensor& attention_norm, const at::Tensor& ffn_norm,
                        double eps, at::Tensor& cache_k, at::Tensor& cache_v, const at::Tensor& pos,
                        const at::Tensor& cos, const at::Tensor& sin, int64_t n_heads) {
  TORCH_CHECK(weights.size() == 3 * LINEARS && kinds.size() == LINEARS && groups.size() == LINEARS,
              "block_decode takes 7 linear layers");
  const int64_t B = x.size(0), dim = x.size(-1), d = cache_k.size(3), kv_heads = cache_k.size(1);
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1, "block_decode takes one token a row");
  TORCH_CHECK(cache_k.is_contiguous() && cache_v.is_contiguous() && B <= cache_k.size(0), "bad caches");
  TORCH_CHECK(pos.scalar_type() == at::kLong && pos.numel() == B, "pos must be int64 (B,)");
  Weight L[LINEARS];
  for (int i = 0; i < LINEARS; ++i) L[i] = weight_of(weights, kinds[i], groups[i], i);
  const int64_t hidden = L[4].N;
  at::Tensor posc = pos.contiguous();
  const int64_t* p = posc.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(p[b] >= 0 && p[b] < cache_k.size(2), "position out of the cache");
  at::Tensor cf = cos.to(at::kFloat).reshape({-1, d}).contiguous(), sf = sin.to(at::kFloat).reshape({-1, d}).contiguous();

  std::vector<float> h(B * dim), xn(B * dim), q(B * n_heads * d), k(B * kv_heads * d), v(B * kv_heads * d),
      att(B * n_heads * d), y(B * dim), a(B * hidden), c(B * hidden);
  at::Tensor xf = x.reshape({B, dim}).to(at::kFloat).contiguous();
  std::copy(xf.data_ptr<float>(), xf.data_ptr<float>() + B * dim, h.begin());

  rms_norm(h.data(), B, dim, attention_norm, eps, xn.data());
  apply(L[0], xn.data(), B, q.data());
  apply(L[1], xn.data(), B, k.data());
  apply(L[2], xn.data(), B, v.data());
  const bool per_row = cf.size(0) > 1;
  rotate(q.data(), B, n_heads, d, cf.data_ptr<float>(), sf.data_ptr<float>(), per_row);
  rotate(k.data(), B, kv_heads, d, cf.data_ptr<float>(), sf.data_ptr<float>(), per_row);
  attend(q.data(), k.data(), v.data(), B, n_heads, kv_heads, d, cache_k, cache_v, p, att.data());
  apply(L[3], att.data(), B, y.data());
  add_rounded(h.data(), y.data(), B * dim, x.scalar_type());

  rms_norm(h.data(), B, dim, ffn_norm, eps, xn.data());
  apply(L[4], xn.data(), B, a.data());
  apply(L[6], xn.data(), B, c.data());
  silu_mul(a.data(), c.data(), B * hidden);
  apply(L[5], a.data(), B, y.data());
  add_rounded(h.data(), y.data(), B * dim, x.scalar_type());
  return at::from_blob(h.data(), {B, 1, dim}, at::kFloat).to(x.scalar_type(), false, true);
}

TORCH_LIBRARY_FRAGMENT(llama_cpu, m) {
  m.def("block_decode(Tensor x, Tensor[] weights, int[] kinds, int[] groups, Tensor attention_norm, "
        "Tensor ffn_norm, float eps, Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor pos, Tensor cos, "
        "Tensor sin, int n_heads) -> Tensor");
}
TORCH_LIBRARY_IMPL(llama_cpu, CPU, m) { m.impl("block_decode", &block_decode); }
