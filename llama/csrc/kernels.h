// The CPU matrix-vector kernels shared by cpu_linear.cpp (one linear layer an op) and
// cpu_decode.cpp (a whole decoder block an op): y = x W^T with W stored as fp32, fp16, bf16,
// int8 (per-row scales) or int4 (group-wise), for the few-token inputs of decoding. Each weight is
// read once per call and converted in registers; the arithmetic is fp32. Built by llama/kernels.py
// with -DLLAMA_AVX512 (16-wide) or without it (AVX2, 8-wide).
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <atomic>
#include <type_traits>
#include <cmath>
#include <cstring>
#include <vector>

namespace llama_kernels {

// Software prefetch. With each vector of row r of a tile of rows, the kernels request the same place
// in row r of the first tile at least PF bytes ahead. Measured on 110M-shape fp32 matrices read
// from memory (2 cores): no prefetch 10 GB/s, PF 2 KB 15, 8 KB 19, 16 KB 19; a tile ahead against
// 8 KB ahead in the row, alternated: faster in 8 of 9 pairs (13.1-16.4 GB/s against 10.0-13.1).
// Requesting each chunk's first 8 KB in a burst before computing made whole steps slower
// (alternated, 10 runs each: 110M q4_0 9.18 against 8.78 ms a step, f32 33.1 against 31.8).
constexpr int64_t PF = 8192;

inline float hsum256(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

#if defined(LLAMA_AVX512)
constexpr int W = 16;
using vf = __m512;
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vf a) { _mm512_storeu_ps(p, a); }
inline vf vset1(float v) { return _mm512_set1_ps(v); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
inline float vsum(vf a) { return _mm512_reduce_add_ps(a); }
inline vf load_w(const float* p) { return _mm512_loadu_ps(p); }
inline vf load_w(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
inline vf load_w(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline vf load_w(const int8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))); }
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
inline vf vfloor(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
inline vf vpow2(vf n) {  // 2^n for whole n in the normal range, built in the exponent bits
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
#else
constexpr int W = 8;
using vf = __m256;
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vf a) { _mm256_storeu_ps(p, a); }
inline vf vset1(float v) { return _mm256_set1_ps(v); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
inline float vsum(vf a) { return hsum256(a); }
inline vf load_w(const float* p) { return _mm256_loadu_ps(p); }
inline vf load_w(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
inline vf load_w(const at::BFloat16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline vf load_w(const int8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p))); }
inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
inline vf vfloor(vf a) { return _mm256_floor_ps(a); }
inline vf vpow2(vf n) {  // 2^n for whole n in the normal range, built in the exponent bits
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
#endif

// e^x of each lane, with Cephes' single-precision method: x = n ln 2 + r (ln 2 split in two parts,
// so r is exact), e^r = 1 + r + r^2 (a polynomial of degree 5 in r), then times 2^n. Relative error
// 1.2e-7 at most (measured against float64 over -87..88); below about -87.7 it gives 0, and x is
// clamped at 88.38, where e^x leaves the floats (2.4e38, never inf).
inline vf vexp(vf x) {
  x = vmin(vmax(x, vset1(-88.3762626647949f)), vset1(88.3762626647949f));
  const vf n = vfloor(vfma(x, vset1(1.44269504088896341f), vset1(0.5f)));
  const vf r = vfma(n, vset1(2.12194440e-4f), vfma(n, vset1(-0.693359375f), x));
  vf p = vset1(1.9875691500e-4f);
  p = vfma(p, r, vset1(1.3981999507e-3f));
  p = vfma(p, r, vset1(8.3334519073e-3f));
  p = vfma(p, r, vset1(4.1665795894e-2f));
  p = vfma(p, r, vset1(1.6666665459e-1f));
  p = vfma(p, r, vset1(5.0000001201e-1f));
  p = vfma(vmul(p, r), r, vadd(r, vset1(1.0f)));
  return vmul(p, vpow2(n));
}

// f(begin, end) over [0, n) in chunks that the threads take as they finish the previous one, so that
// a thread slowed by another process (or an interrupt) holds up only its current chunk instead of
// half of the matrix (a quarter at most with 2 threads). Chunks shrink as the work does (OpenMP's
// "guided"): each is the remaining work over twice the threads, down to at most max_chunk items and
// at least 8 a thread. Every chunk restarts a thread's stream of reads, whose first rows nothing
// prefetched: alternated in one process, 30 rounds of 12 blocks of the 110M shape, against chunks
// all of the smallest size: f32 18.7 against 21.5 ms, q4_0 5.08 against 5.64 (one half a thread:
// 18.8 and 5.05); whole decoding steps, 8 alternated runs: f32 26.6 against 29.8, q4_0 7.5 against 8.2.
template <typename F>
void parallel_chunks(int64_t n, int64_t max_chunk, const F& f) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  if (threads <= 1) return f(0, n);
  const int64_t smallest = std::max<int64_t>(1, std::min(max_chunk, n / (8 * threads)));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    int64_t b = next.load();
    while (b < n) {
      const int64_t e = std::min(n, b + std::max(smallest, (n - b) / (2 * threads)));
      if (next.compare_exchange_weak(b, e)) {  // else b is reloaded: another thread took it
        f(b, e);
        b = next.load();
      }
    }
  });
}

// Rows ahead of row r of a tile of R that the one-token kernels prefetch: whole tiles, at least PF bytes.
inline int64_t rows_ahead(int64_t R, int64_t row_bytes) { return R * ((PF + R * row_bytes - 1) / (R * row_bytes)); }

// Row tiles a chunk at most: about 64 KB of weights.
inline int64_t tiles_per_chunk(int64_t tile_bytes) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(tile_bytes, 1)); }

inline float to_float(float v) { return v; }
inline float to_float(at::Half v) { return static_cast<float>(v); }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(int8_t v) { return static_cast<float>(v); }

// y[m, n] = scale[n] * sum_k w[n, k] x[m, k] for R rows n0.. and MT inputs m0..
// With fewer than 4 sums a tile (one row of fp16, bf16 or int8 weights against 1-3 tokens), each sum
// would be one chain of dependent multiply-adds (4 cycles each on AMD's Zen 3: at most 4 bytes of
// fp16 a cycle for one token), so the tile sums even and odd vectors apart (A = 2 banks).
template <typename T, int R, int MT>
inline void dense_tile(const T* w, int64_t K, const float* x, int64_t n0, int64_t m0,
                       const float* scale, float* y, int64_t N) {
  constexpr int A = R * MT < 4 ? 2 : 1;
  vf acc[A][R][MT];
  for (int a = 0; a < A; ++a)
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MT; ++m) acc[a][r][m] = vzero();
  const int64_t kv = K / W * W, ahead = rows_ahead(R, K * sizeof(T));
  // One vector of every row and token at k into bank a.
  const auto step = [&](int64_t k, int a) __attribute__((always_inline)) {
    vf xv[MT];
    for (int m = 0; m < MT; ++m) xv[m] = vload(x + (m0 + m) * K + k);
    for (int r = 0; r < R; ++r) {
      _mm_prefetch((const char*)(w + (n0 + ahead + r) * K + k), _MM_HINT_T0);
      vf wv = load_w(w + (n0 + r) * K + k);
      for (int m = 0; m < MT; ++m) acc[a][r][m] = vfma(wv, xv[m], acc[a][r][m]);
    }
  };
  int64_t k = 0;
  if constexpr (A == 2)
    for (; k + 2 * W <= kv; k += 2 * W) step(k, 0), step(k + W, 1);
  for (; k < kv; k += W) step(k, 0);
  for (int r = 0; r < R; ++r) {
    const T* wr = w + (n0 + r) * K;
    const float s = scale ? scale[n0 + r] : 1.0f;
    for (int m = 0; m < MT; ++m) {
      const float* xr = x + (m0 + m) * K;
      vf total = acc[0][r][m];
      for (int a = 1; a < A; ++a) total = vadd(total, acc[a][r][m]);
      float t = vsum(total);
      for (int64_t j = kv; j < K; ++j) t += to_float(wr[j]) * xr[j];
      y[(m0 + m) * N + n0 + r] = t * s;
    }
  }
}

template <typename T, int R>
inline void dense_rows(const T* w, int64_t K, const float* x, int64_t M, int64_t n0, const float* scale,
                       float* y, int64_t N) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) dense_tile<T, R, 4>(w, K, x, n0, m, scale, y, N);
  switch (M - m) {
    case 3: dense_tile<T, R, 3>(w, K, x, n0, m, scale, y, N); break;
    case 2: dense_tile<T, R, 2>(w, K, x, n0, m, scale, y, N); break;
    case 1: dense_tile<T, R, 1>(w, K, x, n0, m, scale, y, N); break;
  }
}

template <typename T, int R>
void dense_r(const T* w, int64_t N, int64_t K, const float* x, int64_t M, const float* scale, float* y) {
  parallel_chunks((N + R - 1) / R, tiles_per_chunk(R * K * sizeof(T)), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      int64_t n0 = i * R;
      if (n0 + R <= N) dense_rows<T, R>(w, K, x, M, n0, scale, y, N);
      else for (int64_t n = n0; n < N; ++n) dense_rows<T, 1>(w, K, x, M, n, scale, y, N);
    }
  });
}


// Many tokens (prefill): tiles of GR weight rows by GT tokens. The GR weight vectors of a step stay
// in registers and each token vector meets all of them, so 3 x 4 fills AVX2's 16 registers (12
// accumulators). A chunk's weight tiles (at most about 96 KB) meet the tokens a block at a time
// (about 256 KB of them), both kept in the core's L2, and a tile stays in L1 while it meets a block.
// Measured at 128 tokens (2 cores, AVX2, GFLOP/s, two runs), against PyTorch's F.linear: fp32 about
// MKL's speed on the 110M shapes (768x768: 94 and 88 against 103 and 92), above it on larger ones
// (2048x5632: 95 and 97 against 72 and 58); fp16 104-149 and bf16 87-130 against 10-24.
constexpr int GR = 3, GT = 4;

template <typename T, int R, int MT>
inline void gemm_tile(const T* w, int64_t K, const float* x, int64_t n0, int64_t m0, const float* scale, float* y,
                      int64_t N) {
  vf acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = vzero();
  const T* wr = w + n0 * K;
  const float* xr = x + m0 * K;
  const int64_t kv = K / W * W;
  for (int64_t k = 0; k < kv; k += W) {
    vf wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load_w(wr + r * K + k);
    for (int m = 0; m < MT; ++m) {
      const vf xv = vload(xr + m * K + k);
      for (int r = 0; r < R; ++r) acc[r][m] = vfma(wv[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) {
      float t = vsum(acc[r][m]);
      for (int64_t k = kv; k < K; ++k) t += to_float(wr[r * K + k]) * xr[m * K + k];
      y[(m0 + m) * N + n0 + r] = t * (scale ? scale[n0 + r] : 1.0f);
    }
}

template <typename T, int R>
inline void gemm_rows(const T* w, int64_t K, const float* x, int64_t m_lo, int64_t m_hi, int64_t n0,
                      const float* scale, float* y, int64_t N) {
  int64_t m = m_lo;
  for (; m + GT <= m_hi; m += GT) gemm_tile<T, R, GT>(w, K, x, n0, m, scale, y, N);
  for (; m < m_hi; ++m) gemm_tile<T, R, 1>(w, K, x, n0, m, scale, y, N);
}

template <typename T>
void gemm(const T* w, int64_t N, int64_t K, const float* x, int64_t M, const float* scale, float* y) {
  const int64_t block = std::max<int64_t>(GT, 262144 / (K * 4) / GT * GT);
  const int64_t tiles = (N + GR - 1) / GR;
  parallel_chunks(tiles, std::max<int64_t>(1, 98304 / (GR * K * (int64_t)sizeof(T))), [&](int64_t b, int64_t e) {
    for (int64_t m = 0; m < M; m += block)
      for (int64_t i = b; i < e; ++i) {
        const int64_t n0 = i * GR, m_hi = std::min(M, m + block);
        if (n0 + GR <= N) gemm_rows<T, GR>(w, K, x, m, m_hi, n0, scale, y, N);
        else for (int64_t n = n0; n < N; ++n) gemm_rows<T, 1>(w, K, x, m, m_hi, n, scale, y, N);
      }
  });
}

// Tokens from which the tiles above take over: below, the weights stream from memory once for all
// tokens and the one-token tiles read them faster.
constexpr int64_t GEMM_MIN_TOKENS = 17;

// Rows a tile: 4 for fp32; 1 for weights converted as they are read (fp16, bf16, int8), which
// stream faster one row at a time (alternated, 2 cores, one token, 110M-shape matrices from memory:
// fp16 2048x768 195 us against 237, 32000x768 3.24 ms against 4.01; fp32 the same or 4-8% slower).
template <typename T>
void dense(const T* w, int64_t N, int64_t K, const float* x, int64_t M, const float* scale, float* y) {
  if (M >= GEMM_MIN_TOKENS) return gemm(w, N, K, x, M, scale, y);
  dense_r<T, std::is_same_v<T, float> ? 4 : 1>(w, N, K, x, M, scale, y);
}

// int4: w[n, k] = (q[n, k] - 8) * scale[n, g] + zero[n, g] (zero 0 when there are no zeros), g = k / G.
// Bytes hold blocks of 64 values: byte j of block b = q[64 b + j] | q[64 b + 32 + j] << 4, so a
// block's low nibbles are its first 32 values and its high nibbles the last 32. G is 32 (a block
// holds two groups) or a multiple of 64.
constexpr int64_t BLOCK = 64;

// x is quantized to int8 in blocks of 32 as llama.cpp's q8_0 does (d = max|x| / 127, kept at fp16
// precision; q = x / d rounded to nearest), and each block of 4-bit weights meets it in integer
// multiply-adds (AVX2 maddubs: 32 products an instruction) instead of every weight becoming a float.
// The weights' offset of 8 is taken off in integers too, so a block's (q - 8) . xq is exact, as
// llama.cpp's is: 8 * xq, summed in the lanes the products are summed in, is computed once per x
// row (`eight`). Per weight row, the factors scale * d of all its blocks are computed first, 8 or
// 16 at a time; zeros (llama.quantize's int4) add sum_b zero_b d_b sum(xq)_b at the end.
// Measured (2 cores, AVX2, one token, group 32, fp16 scales, no zeros) against float products of x:
// 32000x768 1.20 ms -> 0.81, 2048x768 106 us -> 60, 768x2048 115 -> 66, 768x768 55 -> 26.
struct Q8Rows {
  int64_t K, nb;
  std::vector<int8_t> q;       // (M, K)
  std::vector<float> d, qsum;  // (M, K / 32)
  std::vector<int32_t> eight;  // (M, K / 32, 8): lane i of block b = 8 * (q[4i] + ... + q[4i + 3])

  Q8Rows(const float* x, int64_t M, int64_t K) : K(K), nb(K / 32), q(M * K), d(M * nb), qsum(M * nb), eight(M * K / 4) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t b = 0; b < M * nb; ++b) {
      const float* xb = x + b * 32;
      __m256 v[4], m = _mm256_setzero_ps();
      for (int i = 0; i < 4; ++i) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i] = _mm256_loadu_ps(xb + 8 * i)));
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
      const float db = amax / 127.f;
      const __m256 id = _mm256_set1_ps(db != 0.f ? 127.f / amax : 0.f);
      __m256i r[4], sum = _mm256_setzero_si256();
      for (int i = 0; i < 4; ++i) {
        r[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        sum = _mm256_add_epi32(sum, r[i]);
      }
      // int32 -> int8 with saturating packs, which interleave 128-bit lanes; the permute undoes that.
      const __m256i p = _mm256_permutevar8x32_epi32(
          _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3])),
          _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256((__m256i*)(q.data() + b * 32), p);
      _mm256_storeu_si256((__m256i*)(eight.data() + b * 8),
                          _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(8), p), ones));
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
      d[b] = static_cast<float>(at::Half(db));
      qsum[b] = (float)_mm_cvtsi128_si32(s4);
    }
  }
};

// f (K / 32) = the scale of each block of 32 of a weight row times x row m's d; returns the zeros'
// term sum_b zero_b d_b qsum_b (0 without zeros).
template <typename S>
inline float block_factors(const S* sr, const S* zr, int64_t G, const Q8Rows& X, int64_t m, float* f) {
  const int64_t nb = X.nb;
  const float* xd = X.d.data() + m * nb;
  const float* xqs = X.qsum.data() + m * nb;
  int64_t b = 0;
  vf off = vzero();
  if (G == 32) {
    for (; b + W <= nb; b += W) {
      vstore(f + b, vmul(load_w(sr + b), vload(xd + b)));
      if (zr) off = vfma(vmul(load_w(zr + b), vload(xd + b)), vload(xqs + b), off);
    }
  }
  float o = vsum(off);
  for (; b < nb; ++b) {
    const int64_t g = b * 32 / G;
    f[b] = to_float(sr[g]) * xd[b];
    if (zr) o += to_float(zr[g]) * xd[b] * xqs[b];
  }
  return o;
}

// (q - 8) . xq of the two blocks of 32 at kb of one weight row (qlo, qhi: its 64 values there, from
// split_nibbles) with x row m, as two vectors of 8 int32 lanes.
inline void split_nibbles(__m256i bytes, __m256i& qlo, __m256i& qhi) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  qlo = _mm256_and_si256(bytes, low4);
  qhi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
}

inline void int4_block_q8(__m256i qlo, __m256i qhi, const Q8Rows& X, int64_t m, int64_t kb, __m256& plo, __m256& phi) {
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* xm = X.q.data() + m * X.K + kb;
  const int32_t* e = X.eight.data() + (m * X.K + kb) / 4;
  const __m256i ilo = _mm256_madd_epi16(_mm256_maddubs_epi16(qlo, _mm256_loadu_si256((const __m256i*)xm)), ones);
  const __m256i ihi = _mm256_madd_epi16(_mm256_maddubs_epi16(qhi, _mm256_loadu_si256((const __m256i*)(xm + 32))), ones);
  plo = _mm256_cvtepi32_ps(_mm256_sub_epi32(ilo, _mm256_loadu_si256((const __m256i*)e)));
  phi = _mm256_cvtepi32_ps(_mm256_sub_epi32(ihi, _mm256_loadu_si256((const __m256i*)(e + 8))));
}

// One token, R weight rows a tile (1: see int4_product). Each row sums into 4 accumulators (the
// low and high halves of even and odd blocks): with one, the row is a chain of dependent
// multiply-adds, 2 a block, each waiting for the last (4 cycles on AMD's Zen 3). Measured from
// cache, one core, alternated: 512x768 14.4 against 13.6 GB/s with one, 256x2048 18.0 against 13.6.
template <typename S, int R>
inline void int4_q8_rows(const uint8_t* w, int64_t G, const Q8Rows& X, int64_t n0, const S* scale, const S* zero,
                         float* f, float* y) {
  const int64_t K = X.K, groups = K / G, nb = X.nb, ahead = rows_ahead(R, K / 2);
  __m256 acc[R][4];
  float off[R];
  for (int r = 0; r < R; ++r) {
    for (int a = 0; a < 4; ++a) acc[r][a] = _mm256_setzero_ps();
    off[r] = block_factors(scale + (n0 + r) * groups, zero ? zero + (n0 + r) * groups : nullptr, G, X, 0, f + r * nb);
  }
  auto block = [&](int r, int64_t kb, __m256& lo, __m256& hi) {
    const uint8_t* wb = w + (n0 + r) * (K / 2) + kb / 2;
    _mm_prefetch((const char*)(wb + ahead * K / 2), _MM_HINT_T0);
    __m256i qlo, qhi;
    __m256 plo, phi;
    split_nibbles(_mm256_loadu_si256((const __m256i*)wb), qlo, qhi);
    int4_block_q8(qlo, qhi, X, 0, kb, plo, phi);
    lo = _mm256_fmadd_ps(plo, _mm256_broadcast_ss(f + r * nb + kb / 32), lo);
    hi = _mm256_fmadd_ps(phi, _mm256_broadcast_ss(f + r * nb + kb / 32 + 1), hi);
  };
  int64_t kb = 0;
  for (; kb + 2 * BLOCK <= K; kb += 2 * BLOCK) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      block(r, kb, acc[r][0], acc[r][1]);
      block(r, kb + BLOCK, acc[r][2], acc[r][3]);
    }
  }
  if (kb < K)
    for (int r = 0; r < R; ++r) block(r, kb, acc[r][0], acc[r][1]);
  for (int r = 0; r < R; ++r)
    y[n0 + r] = hsum256(_mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), _mm256_add_ps(acc[r][2], acc[r][3]))) + off[r];
}

// Several tokens: one weight row at a time against up to 4 x rows (the row stays in L1 for the next
// 4). Measured against float products of x, which this replaced (2 cores, fp16 scales, group 32):
// 2048x768 8 tokens 668 us -> 260, 128 tokens 11.3 ms -> 4.4; 32000x768 8 tokens 7.65 ms -> 4.00.
template <typename S, int MT>
inline void int4_q8_tokens(const uint8_t* w, int64_t G, const Q8Rows& X, int64_t n, int64_t m0, const S* scale,
                           const S* zero, float* f, float* y, int64_t N) {
  const int64_t K = X.K, groups = K / G, nb = X.nb, ahead = rows_ahead(1, K / 2);
  __m256 acc[MT];
  float off[MT];
  for (int m = 0; m < MT; ++m) {
    acc[m] = _mm256_setzero_ps();
    off[m] = block_factors(scale + n * groups, zero ? zero + n * groups : nullptr, G, X, m0 + m, f + m * nb);
  }
  const uint8_t* wr = w + n * (K / 2);
  for (int64_t kb = 0; kb < K; kb += BLOCK) {
    _mm_prefetch((const char*)(wr + ahead * K / 2 + kb / 2), _MM_HINT_T0);
    __m256i qlo, qhi;
    split_nibbles(_mm256_loadu_si256((const __m256i*)(wr + kb / 2)), qlo, qhi);
#pragma GCC unroll 4
    for (int m = 0; m < MT; ++m) {
      __m256 plo, phi;
      int4_block_q8(qlo, qhi, X, m0 + m, kb, plo, phi);
      acc[m] = _mm256_fmadd_ps(plo, _mm256_broadcast_ss(f + m * nb + kb / 32), acc[m]);
      acc[m] = _mm256_fmadd_ps(phi, _mm256_broadcast_ss(f + m * nb + kb / 32 + 1), acc[m]);
    }
  }
  for (int m = 0; m < MT; ++m) y[(m0 + m) * N + n] = hsum256(acc[m]) + off[m];
}

template <typename S>
void int4_product(const uint8_t* w, int64_t N, int64_t K, int64_t G, const float* x, int64_t M, const S* scale,
                  const S* zero, float* y) {
  const Q8Rows X(x, M, K);
  const int64_t nb = K / 32;
  if (M == 1) {
    constexpr int R = 1;  // 1.1B-shape Q4_0 decode, alternated: 19.8 and 18.7 tok/s against 14.4 and 17.1 with 4
    parallel_chunks((N + R - 1) / R, tiles_per_chunk(R * K / 2), [&](int64_t b, int64_t e) {
      std::vector<float> f(R * nb);
      for (int64_t i = b; i < e; ++i) {
        const int64_t n0 = i * R;
        if (n0 + R <= N) int4_q8_rows<S, R>(w, G, X, n0, scale, zero, f.data(), y);
        else for (int64_t n = n0; n < N; ++n) int4_q8_rows<S, 1>(w, G, X, n, scale, zero, f.data(), y);
      }
    });
    return;
  }
  parallel_chunks(N, tiles_per_chunk(K / 2), [&](int64_t b, int64_t e) {
    std::vector<float> f(4 * nb);
    for (int64_t n = b; n < e; ++n) {
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) int4_q8_tokens<S, 4>(w, G, X, n, m, scale, zero, f.data(), y, N);
      switch (M - m) {
        case 3: int4_q8_tokens<S, 3>(w, G, X, n, m, scale, zero, f.data(), y, N); break;
        case 2: int4_q8_tokens<S, 2>(w, G, X, n, m, scale, zero, f.data(), y, N); break;
        case 1: int4_q8_tokens<S, 1>(w, G, X, n, m, scale, zero, f.data(), y, N); break;
      }
    }
  });
}

// Q4_0 (group 32, fp16 scales, no zeros) with rows interleaved by 8, so that one vector holds one
// int32 sum for each of 8 rows: the integer products of a block meet its 8 scales in one multiply-add
// and each row needs no horizontal sum. Rows 8g..8g+7, block b of 32 values: 128 bytes, 4 chunks of
// 32; chunk c holds at bytes 4r..4r+3 row r's values 32b+8c+0..3 (low nibbles) and 32b+8c+4..7
// (high nibbles) (kernels.pack_int4_rows8). Scales (N / 8, K / 32, 8). Per chunk, maddubs multiplies
// each row's 4 values by the same 4 bytes of x, broadcast; the int16 sums of a block stay below
// 4 * 2 * 2 * 15 * 127 = 30480. Measured from cache (one core, 512x768): 17.9 GB/s against 10.0
// for the one-row kernel above.
// y[t] (8 floats, t < MT) = the 8 rows of group wg against tokens m0..m0+MT-1 of X. Each 32-byte
// chunk is unpacked once for all MT tokens; each token's sums keep the one-token order (two banks,
// even and odd blocks), so a row's result does not depend on the tokens beside it.
template <int MT>
inline void int4x8_group(const uint8_t* wg, const at::Half* sg, const Q8Rows& X, int64_t m0, float* const* y) {
  const int64_t nb = X.nb;
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const int8_t* xq[MT];
  const float *xd[MT], *xs[MT];
  for (int t = 0; t < MT; ++t)
    xq[t] = X.q.data() + (m0 + t) * X.K, xd[t] = X.d.data() + (m0 + t) * nb, xs[t] = X.qsum.data() + (m0 + t) * nb;
  __m256 acc[MT][2];
  for (int t = 0; t < MT; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wb = wg + b * 128;
    _mm_prefetch((const char*)(wb + PF), _MM_HINT_T0);
    _mm_prefetch((const char*)(wb + PF + 64), _MM_HINT_T0);
    __m256i s16[MT];
    for (int t = 0; t < MT; ++t) s16[t] = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const __m256i bytes = _mm256_loadu_si256((const __m256i*)(wb + 32 * c));
      const __m256i lo = _mm256_and_si256(bytes, low4), hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
      for (int t = 0; t < MT; ++t) {
        int32_t xl, xh;
        std::memcpy(&xl, xq[t] + b * 32 + 8 * c, 4);
        std::memcpy(&xh, xq[t] + b * 32 + 8 * c + 4, 4);
        s16[t] = _mm256_add_epi16(s16[t], _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(xl)),
                                                           _mm256_maddubs_epi16(hi, _mm256_set1_epi32(xh))));
      }
    }
    const __m256 sc = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(sg + b * 8)));
    for (int t = 0; t < MT; ++t) {
      // (q - 8) . xq of each row: the offset's 8 * sum(xq) is the same for all 8.
      const __m256i s32 = _mm256_sub_epi32(_mm256_madd_epi16(s16[t], ones), _mm256_set1_epi32(8 * (int32_t)xs[t][b]));
      acc[t][b & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), _mm256_mul_ps(sc, _mm256_set1_ps(xd[t][b])), acc[t][b & 1]);
    }
  }
  for (int t = 0; t < MT; ++t) _mm256_storeu_ps(y[t], _mm256_add_ps(acc[t][0], acc[t][1]));
}

// y (M, N) = x W^T for int4x8 weights: each group of 8 rows stays in L1 while it meets every token.
inline void int4x8_product(const uint8_t* w, int64_t N, int64_t K, const float* x, int64_t M, const at::Half* scales,
                           float* y) {
  constexpr int MT = 3;  // tokens a pass over a chunk: 3 keep all sums and accumulators in registers
  const Q8Rows X(x, M, K);
  const int64_t nb = K / 32;
  parallel_chunks(N / 8, tiles_per_chunk(8 * K / 2), [&](int64_t b, int64_t e) {
    for (int64_t g = b; g < e; ++g) {
      const uint8_t* wg = w + g * nb * 128;
      const at::Half* sg = scales + g * nb * 8;
      float* rows[MT];
      int64_t m = 0;
      for (; m + MT <= M; m += MT) {
        for (int t = 0; t < MT; ++t) rows[t] = y + (m + t) * N + g * 8;
        int4x8_group<MT>(wg, sg, X, m, rows);
      }
      for (; m < M; ++m) {
        rows[0] = y + m * N + g * 8;
        int4x8_group<1>(wg, sg, X, m, rows);
      }
    }
  });
}

// One token, int8 weights (per-row scales): x as q8_0 blocks too, so that a block of 32 weights costs
// one integer multiply-add chain (maddubs takes unsigned times signed: |w| times x with w's sign)
// instead of 32 conversions to float. K % 32 == 0.
template <int R>
inline void int8_q8_rows(const int8_t* w, int64_t K, const int8_t* xq, const float* xd, int64_t n0,
                         const float* scale, float* y) {
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t ahead = rows_ahead(R, K);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < K / 32; ++b) {
    const __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + b * 32));
    const __m256 d = _mm256_broadcast_ss(xd + b);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const int8_t* wr = w + (n0 + r) * K + b * 32;
      _mm_prefetch((const char*)(wr + ahead * K), _MM_HINT_T0);
      const __m256i wv = _mm256_loadu_si256((const __m256i*)wr);
      const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), d, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[n0 + r] = hsum256(acc[r]) * scale[n0 + r];
}

// One row a tile: alternated against 4 (2 cores, from memory), 2048x768 92 us against 125, 32000x768
// 1.66 ms against 2.50.
inline void int8_q8_product(const int8_t* w, int64_t N, int64_t K, const float* x, const float* scale, float* y) {
  constexpr int R = 1;
  const Q8Rows X(x, 1, K);
  parallel_chunks((N + R - 1) / R, tiles_per_chunk(R * K), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t n0 = i * R;
      if (n0 + R <= N) int8_q8_rows<R>(w, K, X.q.data(), X.d.data(), n0, scale, y);
      else for (int64_t n = n0; n < N; ++n) int8_q8_rows<1>(w, K, X.q.data(), X.d.data(), n, scale, y);
    }
  });
}

inline at::Tensor flat_input(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.size(-1) == K, "input has ", x.size(-1), " features, the weight expects ", K);
  return x.reshape({-1, K}).to(at::kFloat).contiguous();  // (M, K)
}

inline at::Tensor shaped_output(const at::Tensor& y, const at::Tensor& x, int64_t N) {
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  return y.to(x.scalar_type()).view(sizes);  // (..., N)
}

// One linear layer's weights as the ops receive them. kind: DENSE (fp32/fp16/bf16 w), INT8 (int8 w,
// fp32 per-row scales), INT4 (w packed as above; scales and zeros (N, K / G), zeros may be empty),
// ATEN_INT4 (PyTorch's int4pack layout; scales (K / G, N, 2) pairs of scale and zero) or INT4X8
// (int4x8_group's layout, fp16 scales).
enum Kind : int64_t { DENSE = 0, INT8 = 1, INT4 = 2, ATEN_INT4 = 3, INT4X8 = 4 };

struct Weight {
  int64_t kind, N, K, G;
  at::Tensor w, scales, zeros;
};

inline void check_int4(int64_t K, int64_t G) {
  TORCH_CHECK(K % BLOCK == 0 && K % G == 0 && (G == 32 || G % BLOCK == 0),
              "int4 needs in_features % 64 == 0 and a group size of 32 or a multiple of 64 dividing it; got ",
              K, " and ", G);
}

inline void check_int4x8(int64_t N, int64_t K, const at::Tensor& w, const at::Tensor& scales) {
  TORCH_CHECK(N % 8 == 0 && K % 32 == 0, "int4x8 needs out_features % 8 == 0 and in_features % 32 == 0; got ", N,
              " and ", K);
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous(), "weight must be contiguous uint8");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.numel() == N * (K / 32),
              "int4x8 scales must be contiguous fp16 of shape (", N / 8, ", ", K / 32, ", 8)");
}

template <typename S>
const S* zeros_of(const at::Tensor& zeros) { return zeros.numel() ? zeros.data_ptr<S>() : nullptr; }

inline void int4_apply(const Weight& L, const float* x, int64_t M, float* y) {
  const uint8_t* w = L.w.data_ptr<uint8_t>();
  switch (L.scales.scalar_type()) {
    case at::kFloat:
      int4_product(w, L.N, L.K, L.G, x, M, L.scales.data_ptr<float>(), zeros_of<float>(L.zeros), y); break;
    case at::kHalf:
      int4_product(w, L.N, L.K, L.G, x, M, L.scales.data_ptr<at::Half>(), zeros_of<at::Half>(L.zeros), y); break;
    case at::kBFloat16:
      int4_product(w, L.N, L.K, L.G, x, M, L.scales.data_ptr<at::BFloat16>(), zeros_of<at::BFloat16>(L.zeros), y);
      break;
    default: TORCH_CHECK(false, "unsupported scales dtype ", L.scales.scalar_type());
  }
}

// y (M, N) = x (M, K) W^T, both fp32 and contiguous.
inline void apply(const Weight& L, const float* x, int64_t M, float* y) {
  const int64_t N = L.N, K = L.K;
  switch (L.kind) {
    case DENSE:
      switch (L.w.scalar_type()) {
        case at::kFloat: dense(L.w.data_ptr<float>(), N, K, x, M, nullptr, y); return;
        case at::kHalf: dense(L.w.data_ptr<at::Half>(), N, K, x, M, nullptr, y); return;
        case at::kBFloat16: dense(L.w.data_ptr<at::BFloat16>(), N, K, x, M, nullptr, y); return;
        default: TORCH_CHECK(false, "unsupported weight dtype ", L.w.scalar_type());
      }
    case INT8:
      if (M == 1 && K % 32 == 0) return int8_q8_product(L.w.data_ptr<int8_t>(), N, K, x, L.scales.data_ptr<float>(), y);
      return dense(L.w.data_ptr<int8_t>(), N, K, x, M, L.scales.data_ptr<float>(), y);
    case INT4: int4_apply(L, x, M, y); return;
    case INT4X8:
      return int4x8_product(L.w.data_ptr<uint8_t>(), N, K, x, M, L.scales.data_ptr<at::Half>(), y);
    case ATEN_INT4: {
      at::Tensor xt = at::from_blob(const_cast<float*>(x), {M, K}, at::kFloat).to(L.scales.scalar_type());
      at::Tensor out = at::_weight_int4pack_mm_for_cpu(xt, L.w, L.G, L.scales);  // (M, N)
      at::from_blob(y, {M, N}, at::kFloat).copy_(out);
      return;
    }
    default: TORCH_CHECK(false, "unknown weight kind ", L.kind);
  }
}
}  // namespace llama_kernels
