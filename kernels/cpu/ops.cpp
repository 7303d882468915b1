// CPU kernels: batch-invariant dot-product tiles (AVX2 + FMA, or the same arithmetic lane by lane) for Linear and the
// attention scores, OpenMP across column blocks.
#include <omp.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "kernels/cpu/fp8.h"
#include "kernels/half.h"
#include "kernels/ops.h"

namespace moedit::ops {

namespace {
int g_threads = 0;  // 0 = omp default
}  // namespace

int num_threads() { return g_threads > 0 ? g_threads : omp_get_max_threads(); }
void set_num_threads(int n) { g_threads = n; }

namespace {

// Batch-invariant dot products. Every output element Y[r, c] is computed by one fixed sequence of operations that
// depends only on row r of X, row c of W and `in`: eight lane sums over k ≡ l (mod 8), accumulated with FMAs in order
// of k; reduced as ((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7)); then the k tail in order (FMAs); then the bias. So a token's
// activations do not depend on how many rows share the call, where its row sits in memory, which tile shape covers
// it or how columns are split among threads: a causal trace with a prefix cache equals the naive trace exactly, and
// a prompt scores the same alone or in a batch. Both operands are read in place (row-major, contiguous along k): no
// packing, which is what made Eigen's GEMM slow for the few-row products of decoding.
// Weight element types: fp32, or 16-bit patterns widened to fp32 as they are loaded.
struct Bf16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};
inline float wf(float w) { return w; }
inline float wf(Bf16 w) { return bf16_to_f32(w.bits); }
inline float wf(F16 w) { return f16_to_f32(w.bits); }

#if defined(__AVX2__) && defined(__FMA__)
using Lanes = __m256;  // eight partial sums
using Quad = __m128;   // four finished outputs
inline Lanes lanes_zero() { return _mm256_setzero_ps(); }
inline Lanes lanes_load(const float* p) { return _mm256_loadu_ps(p); }
// Eight weights widened to fp32 (exact): bf16 is the high half of an fp32, f16 converts in hardware.
inline Lanes lanes_load(const Bf16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#if defined(__F16C__)
inline Lanes lanes_load(const F16* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
#else
inline Lanes lanes_load(const F16* p) {
  alignas(32) float v[8];
  for (int l = 0; l < 8; ++l) v[l] = f16_to_f32(p[l].bits);
  return _mm256_load_ps(v);
}
#endif
inline Lanes lanes_fma(Lanes a, Lanes b, Lanes c) { return _mm256_fmadd_ps(a, b, c); }
// The four sums of a, b, c, d in the order above (hadd pairs adjacent lanes within each 128-bit half).
inline Quad reduce4(Lanes a, Lanes b, Lanes c, Lanes d) {
  const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));  // [a0123 b0123 c0123 d0123 | a4567 ...]
  return _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
}
template <class WT>
inline Quad quad_fma(float x, const WT* w0, const WT* w1, const WT* w2, const WT* w3, int k, Quad s) {
  return _mm_fmadd_ps(_mm_set1_ps(x), _mm_setr_ps(wf(w0[k]), wf(w1[k]), wf(w2[k]), wf(w3[k])), s);
}
inline void quad_store(Quad q, const float* bias, int nc, float* y) {
  alignas(16) float v[4];
  _mm_store_ps(v, q);
  for (int c = 0; c < nc; ++c) y[c] = bias ? v[c] + bias[c] : v[c];
}
inline void quad_store4(Quad q, const float* bias, float* y) {
  _mm_storeu_ps(y, bias ? _mm_add_ps(q, _mm_loadu_ps(bias)) : q);
}
#else  // the same arithmetic, one lane at a time
struct Lanes {
  float v[8];
};
struct Quad {
  float v[4];
};
inline Lanes lanes_zero() { return Lanes{}; }
template <class WT>
inline Lanes lanes_load(const WT* p) {
  Lanes r;
  for (int l = 0; l < 8; ++l) r.v[l] = wf(p[l]);
  return r;
}
inline Lanes lanes_fma(Lanes a, Lanes b, Lanes c) {
  for (int l = 0; l < 8; ++l) c.v[l] = std::fma(a.v[l], b.v[l], c.v[l]);
  return c;
}
inline float lanes_sum(const Lanes& a) {
  const float* l = a.v;
  return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}
inline Quad reduce4(Lanes a, Lanes b, Lanes c, Lanes d) {
  return {{lanes_sum(a), lanes_sum(b), lanes_sum(c), lanes_sum(d)}};
}
template <class WT>
inline Quad quad_fma(float x, const WT* w0, const WT* w1, const WT* w2, const WT* w3, int k, Quad s) {
  return {{std::fma(x, wf(w0[k]), s.v[0]), std::fma(x, wf(w1[k]), s.v[1]), std::fma(x, wf(w2[k]), s.v[2]),
           std::fma(x, wf(w3[k]), s.v[3])}};
}
inline void quad_store(Quad q, const float* bias, int nc, float* y) {
  for (int c = 0; c < nc; ++c) y[c] = bias ? q.v[c] + bias[c] : q.v[c];
}
inline void quad_store4(Quad q, const float* bias, float* y) { quad_store(q, bias, 4, y); }
#endif

// Y[r, c] for the tile r < R, c < 4·C: rows of X from X (stride ldx), W rows from W (stride ldw), outputs to Y
// (stride ldy). Full: all 4·C columns are real; otherwise only the first nc (< 4·C) are read and written. `next` (may
// be null) is the W row after the tile's, prefetched while the tile runs.
template <class WT, int R, int C, bool Full>
void dot_tile(const float* X, size_t ldx, const WT* W, size_t ldw, int in, int nc, float* Y, size_t ldy,
              const float* bias, const WT* next) {
  constexpr int N = 4 * C;
  const WT* w[N];
  for (int c = 0; c < N; ++c) w[c] = W + size_t(Full ? c : std::min(c, nc - 1)) * ldw;  // padding re-reads a real row
  Lanes acc[R][N];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < N; ++c) acc[r][c] = lanes_zero();
  const int in8 = in & ~7;
  for (int k = 0; k < in8; k += 8) {
    if (next && (k & 15) == 0)
      for (int c = 0; c < N; ++c) __builtin_prefetch(next + size_t(c) * ldw + k);
    for (int r = 0; r < R; ++r) {
      const Lanes x = lanes_load(X + r * ldx + k);
      for (int c = 0; c < N; ++c) acc[r][c] = lanes_fma(x, lanes_load(w[c] + k), acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < C; ++q) {
      const int c = 4 * q;
      if (!Full && c >= nc) break;
      Quad s = reduce4(acc[r][c], acc[r][c + 1], acc[r][c + 2], acc[r][c + 3]);
      for (int k = in8; k < in; ++k) s = quad_fma(X[r * ldx + k], w[c], w[c + 1], w[c + 2], w[c + 3], k, s);
      if (Full)
        quad_store4(s, bias ? bias + c : nullptr, Y + r * ldy + c);
      else
        quad_store(s, bias ? bias + c : nullptr, std::min(4, nc - c), Y + r * ldy + c);
    }
}

template <class WT>
struct Tiles {
  using Fn = void (*)(const float*, size_t, const WT*, size_t, int, int, float*, size_t, const float*, const WT*);
  // tile[rows - 1][full]: up to 3 rows by 4 columns; row[full]: 1 row by 8 columns.
  static constexpr Fn tile[3][2] = {{&dot_tile<WT, 1, 1, false>, &dot_tile<WT, 1, 1, true>},
                                    {&dot_tile<WT, 2, 1, false>, &dot_tile<WT, 2, 1, true>},
                                    {&dot_tile<WT, 3, 1, false>, &dot_tile<WT, 3, 1, true>}};
  static constexpr Fn row[2] = {&dot_tile<WT, 1, 2, false>, &dot_tile<WT, 1, 2, true>};
};

// Columns [c0, c1) of Y = X·Wᵀ (+ bias), all n rows; rows of X, W and Y are ldx, ldw and ldy floats apart. Rows in
// panels whose slice of X fits in L2; per panel, column tiles outer (a tile's W rows stay in L1 while the panel's rows
// pass them). A single row takes 8 columns at a time (fewer loads per FMA); more rows take 4 columns by up to 3 rows.
template <class WT>
void linear_columns(const float* X, size_t ldx, int n, int in, const WT* W, size_t ldw, float* Y, size_t ldy,
                    const float* bias, int c0, int c1) {
  const int panel = std::max(3, int((256 * 1024) / (sizeof(float) * size_t(in))) / 3 * 3);
  for (int p0 = 0; p0 < n; p0 += panel) {
    const int p1 = std::min(n, p0 + panel);
    const int tile_cols = p1 - p0 == 1 ? 8 : 4;
    for (int c = c0; c < c1; c += tile_cols) {
      const int nc = std::min(tile_cols, c1 - c);
      const bool full = nc == tile_cols;
      const WT* next = c + 2 * tile_cols <= c1 ? W + size_t(c + tile_cols) * ldw : nullptr;
      for (int r = p0; r < p1; r += 3) {
        const int nr = std::min(3, p1 - r);
        const auto f = tile_cols == 8 ? Tiles<WT>::row[full] : Tiles<WT>::tile[nr - 1][full];
        f(X + size_t(r) * ldx, ldx, W + size_t(c) * ldw, ldw, in, nc, Y + size_t(r) * ldy + c, ldy,
          bias ? bias + c : nullptr, r == p0 ? next : nullptr);
      }
    }
  }
}

}  // namespace

void linear(const float* X, int n, int in, const float* W, int out, float* Y, const float* bias) {
  linear(X, size_t(in), n, in, W, size_t(in), out, Y, size_t(out), bias);
}

namespace {
template <class WT>
void linear_typed(const float* X, size_t ldx, int n, int in, const WT* W, size_t ldw, int out, float* Y, size_t ldy,
                  const float* bias) {
  // Y = X·Wᵀ. With enough work, split the output columns (W's rows) into blocks, one per task, so each thread streams
  // its own slice of W — the weights dominate memory traffic for the small n of decoding. Small products run here
  // directly (an OpenMP region, even a one-thread one, costs about as much as a one-row expert product).
  const double flops = 2.0 * n * in * out;
  const int nt = (omp_in_parallel() || flops < 4e6) ? 1 : num_threads();
  if (nt == 1) return linear_columns(X, ldx, n, in, W, ldw, Y, ldy, bias, 0, out);
  const int block = std::max(64, ((out + nt * 4 - 1) / (nt * 4) + 7) / 8 * 8);
  const int nblocks = (out + block - 1) / block;
#pragma omp parallel for schedule(dynamic) num_threads(nt)
  for (int b = 0; b < nblocks; ++b) {
    const int c0 = b * block, c1 = std::min(out, c0 + block);
    linear_columns(X, ldx, n, in, W, ldw, Y, ldy, bias, c0, c1);
  }
}
}  // namespace

size_t wtype_size(WType t) { return t == WType::F32 ? 4 : t == WType::F8E4M3 ? 1 : 2; }

float widen(const WeightView& W, int64_t r, int64_t c) {
  const void* p = W.at(r, c).data;
  switch (W.type) {
    case WType::F32: return *static_cast<const float*>(p);
    case WType::BF16: return bf16_to_f32(*static_cast<const uint16_t*>(p));
    case WType::F16: return f16_to_f32(*static_cast<const uint16_t*>(p));
    case WType::F8E4M3: return f8e4m3_to_f32(*static_cast<const uint8_t*>(p)) * W.scales.at(r, c);
  }
  return 0.f;
}

void widen_row(const WeightView& W, int64_t r, int64_t c0, int64_t n, float* out) {
  const void* p = W.at(r, c0).data;
  switch (W.type) {
    case WType::F32: std::copy_n(static_cast<const float*>(p), n, out); return;
    case WType::BF16:
      for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
      return;
    case WType::F16:
      for (int64_t i = 0; i < n; ++i) out[i] = f16_to_f32(static_cast<const uint16_t*>(p)[i]);
      return;
    case WType::F8E4M3: widen_row_f8(W, r, c0, n, out); return;
  }
}

void linear(const float* X, size_t ldx, int n, int in, const WeightView& W, int out, float* Y, size_t ldy,
            const float* bias) {
  switch (W.type) {
    case WType::F32: return linear_typed(X, ldx, n, in, static_cast<const float*>(W.data), W.ld, out, Y, ldy, bias);
    case WType::BF16: return linear_typed(X, ldx, n, in, static_cast<const Bf16*>(W.data), W.ld, out, Y, ldy, bias);
    case WType::F16: return linear_typed(X, ldx, n, in, static_cast<const F16*>(W.data), W.ld, out, Y, ldy, bias);
    case WType::F8E4M3: return linear_f8(X, ldx, n, in, W, out, Y, ldy, bias);
  }
}

void rmsnorm(const float* x, const float* w, float* y, int rows, int dim, float eps) {
#pragma omp parallel for schedule(static) if (rows * dim > 65536 && !omp_in_parallel())
  for (int r = 0; r < rows; ++r) {
    const float* xr = x + size_t(r) * dim;
    float* yr = y + size_t(r) * dim;
    float ss = 0.f;
    for (int i = 0; i < dim; ++i) ss += xr[i] * xr[i];
    const float inv = 1.f / std::sqrt(ss / float(dim) + eps);
    for (int i = 0; i < dim; ++i) yr[i] = w[i] * (xr[i] * inv);
  }
}

void rope_neox(float* x, int rows, int row_stride, int n_heads, int head_stride, int rot_dim, const int* pos,
               const float* inv_freq, float attn_scaling) {
  const int half = rot_dim / 2;
  std::vector<float> cs(size_t(half) * 2);
  for (int r = 0; r < rows; ++r) {
    for (int i = 0; i < half; ++i) {
      const float ang = float(pos[r]) * inv_freq[i];  // fp32 product, as HF
      cs[2 * i] = std::cos(ang) * attn_scaling;
      cs[2 * i + 1] = std::sin(ang) * attn_scaling;
    }
    for (int h = 0; h < n_heads; ++h) {
      float* v = x + size_t(r) * row_stride + size_t(h) * head_stride;
      for (int i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half], c = cs[2 * i], s = cs[2 * i + 1];
        v[i] = a * c - b * s;
        v[i + half] = b * c + a * s;
      }
    }
  }
}

void softmax_inplace(float* x, int n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int i = 0; i < n; ++i) m = std::max(m, x[i]);
  if (m == -std::numeric_limits<float>::infinity()) {  // everything masked: HF would give NaN; keep zeros
    std::fill(x, x + n, 0.f);
    return;
  }
  float s = 0.f;
  for (int i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - m);
    s += x[i];
  }
  const float inv = 1.f / s;
  for (int i = 0; i < n; ++i) x[i] *= inv;
}

void silu_mul(const float* gu, int rows, int I, float* out) {
  for (int r = 0; r < rows; ++r) {
    const float* g = gu + size_t(r) * 2 * I;
    const float* u = g + I;
    // Scalar on purpose: Eigen's vectorised exp peels to the destination's alignment, so one element's result would
    // depend on its row's address — and a token's activations on how it is batched (cached vs naive traces differ).
    float* o = out + size_t(r) * I;
    for (int i = 0; i < I; ++i) o[i] = silu(g[i]) * u[i];
  }
}

void attention(const float* q, int n_q, int q_stride, int q_pos0, const float* k, int k_stride, const float* v,
               int v_stride, int n_k, const AttnShape& s, float* out, int out_stride) {
  const int group = s.Hq / s.Hkv;
  const bool par = !omp_in_parallel() && double(n_q) * n_k * s.Hq * s.Dk > 2e5;
#pragma omp parallel for schedule(dynamic) if (par)
  for (int h = 0; h < s.Hq; ++h) {
    const int g = h / group;
    // Keys visible to the last query bound the work: [0, hi).
    const int last_pos = q_pos0 + n_q - 1;
    const int hi = std::min(n_k, last_pos + 1);
    // Like Linear, batch-invariant: a query's scores are the same dot products however many queries share the call
    // (a prefix-cached trace equals the naive one), and its output sums the visible keys' values in key order.
    MatR sc(n_q, hi);  // scores, then probabilities [n_q, hi]
    linear_columns(q + size_t(h) * s.Dk, size_t(q_stride), n_q, s.Dk, k + size_t(g) * s.Dk, size_t(k_stride),
                   sc.data(), size_t(hi), nullptr, 0, hi);
    for (int i = 0; i < n_q; ++i) {
      const int p = q_pos0 + i;
      float* row = sc.data() + size_t(i) * hi;
      for (int j = 0; j < hi; ++j)
        row[j] = (j > p || (s.window > 0 && j <= p - s.window)) ? -std::numeric_limits<float>::infinity()
                                                                : row[j] * s.scale;
      softmax_inplace(row, hi);
      float* o = out + size_t(i) * out_stride + size_t(h) * s.Dv;
      std::fill(o, o + s.Dv, 0.f);
      for (int j = 0; j < hi; ++j) {
        const float pj = row[j];
        if (pj == 0.f) continue;  // masked (or underflowed): adds exactly nothing
        const float* vj = v + size_t(j) * v_stride + size_t(g) * s.Dv;
        for (int d = 0; d < s.Dv; ++d) o[d] = std::fma(pj, vj[d], o[d]);
      }
    }
  }
}

void topk(const float* x, int n, int k, int* idx) {
  std::vector<int> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + k, order.end(), [x](int a, int b) {
    return x[a] > x[b] || (x[a] == x[b] && a < b);
  });
  std::copy(order.begin(), order.begin() + k, idx);
}

}  // namespace moedit::ops
