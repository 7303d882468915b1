// CPU kernels: batch-invariant dot-product tiles (AVX2 + FMA, or the same arithmetic lane by lane; packed AVX-512
// tiles for more rows) for Linear and the attention scores, OpenMP across column blocks.
#include <omp.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <new>
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

#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define MOEDIT_PACKED_TILES 1
// Packed tiles (AVX-512): one zmm register holds the eight lane sums of TWO outputs, Y[r, c+j] in lanes 0–7 and
// Y[r, c+j+4] in lanes 8–15, so a tile of 6 rows by 8 columns keeps its 48 outputs in 24 registers and issues 24 FMAs
// per k-step for 10 loads (dot_tile: 12 FMAs of half the width for 7). Every lane still does fma(x[k], w[k], lane)
// in order of k; the reduction adds the same lanes in the same tree (with shuffles, below), then come the k tail in
// order and the bias. So an output is bit for bit what dot_tile gives, and rows may take either path by count alone.
//
// A tile's 8 W rows are first packed, widened to fp32 (exact), into a small per-thread buffer: k-step s holds four
// 16-float pairs [W[c+j][8s, 8s+8) | W[c+j+4][8s, 8s+8)], j < 4; then each tail column k ≥ in8 holds
// [W[c..c+8)[k] | W[c..c+8)[k]]. Rows past the matrix are zeros; their outputs are never stored.
struct PackBuf {
  float* p = nullptr;
  size_t cap = 0;
  ~PackBuf() { std::free(p); }
  float* get(size_t n) {
    if (n > cap) {
      std::free(p);
      cap = (n + 15) / 16 * 16;  // whole 64-byte lines
      p = static_cast<float*>(std::aligned_alloc(64, cap * sizeof(float)));
      if (!p) throw std::bad_alloc();
    }
    return p;
  }
};
inline size_t packed_size(int in) { return size_t(in & ~7) * 8 + size_t(in & 7) * 16; }

// Rows [c, c + nc) of W (nc ≤ 8) into P.
template <class WT>
void pack8(const WT* W, size_t ldw, int in, int nc, float* P) {
  const int in8 = in & ~7;
  const WT* w[8];
  for (int c = 0; c < 8; ++c) w[c] = W + size_t(std::min(c, nc - 1)) * ldw;
  for (int k = 0; k < in8; k += 8, P += 64)
    for (int j = 0; j < 4; ++j) {
      const __m256 a = j < nc ? lanes_load(w[j] + k) : _mm256_setzero_ps();
      const __m256 b = j + 4 < nc ? lanes_load(w[j + 4] + k) : _mm256_setzero_ps();
      _mm512_store_ps(P + 16 * j, _mm512_insertf32x8(_mm512_castps256_ps512(a), b, 1));
    }
  for (int k = in8; k < in; ++k, P += 16)
    for (int c = 0; c < 8; ++c) P[c] = P[c + 8] = c < nc ? wf(w[c][k]) : 0.f;
}

// The all-lanes masked forms below compile to the plain instructions; they spare GCC 12's -Wuninitialized false alarm
// on the unmasked intrinsics' undefined pass-through operand.
constexpr __mmask16 kAll = 0xffff;
// [v | v].
inline __m512 bcast8(__m256 v) { return _mm512_maskz_broadcast_f32x8(kAll, v); }
// The reduction works on 128-bit quarters of four lanes. hsum adds adjacent lanes of a and b in every quarter:
// [a0+a1, a2+a3, b0+b1, b2+b3].
inline __m512 hsum(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x88), _mm512_shuffle_ps(a, b, 0xdd));
}
// One row's registers [c+j | c+j+4], j < 4, → quarters [q0 of c..c+4 | q1 of c..c+4 | q0 of c+4..c+8 | q1 of
// c+4..c+8], where q0 = (l0+l1)+(l2+l3) and q1 = (l4+l5)+(l6+l7) of each output's lanes.
inline __m512 row_halves(__m512 a0, __m512 a1, __m512 a2, __m512 a3) { return hsum(hsum(a0, a1), hsum(a2, a3)); }
// Two rows' halves → [row a: q0+q1 of c..c+8 | row b: q0+q1 of c..c+8].
inline __m512 rows_final(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_maskz_shuffle_f32x4(kAll, a, b, 0x88), _mm512_maskz_shuffle_f32x4(kAll, a, b, 0xdd));
}

// Rows r < R (R ≤ 6) of X by the 8 packed columns P: Y[r, 0..nc) (+ bias). With Fetch, 8 W rows of a later tile
// (`next`, rows `ldn` bytes apart, `es` bytes an element) are brought towards the core while this tile runs, a line
// of each row as k passes it: once a model's weights outgrow the caches they stream from memory, and the packing
// would otherwise wait for every line.
template <int R, bool Fetch>
void packed_tile(const float* X, size_t ldx, const float* P, int in, int nc, float* Y, size_t ldy, const float* bias,
                 const char* next, size_t ldn, int es) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  const int in8 = in & ~7;
  const float* p = P;
  for (int k = 0; k < in8; k += 8, p += 64) {
    if (Fetch && (size_t(k) * es & 63) == 0)
      for (int c = 0; c < 8; ++c) __builtin_prefetch(next + c * ldn + size_t(k) * es, 0, 2);  // to L2
    const __m512 w0 = _mm512_load_ps(p), w1 = _mm512_load_ps(p + 16), w2 = _mm512_load_ps(p + 32),
                 w3 = _mm512_load_ps(p + 48);
    for (int r = 0; r < R; ++r) {
      const __m512 x = bcast8(_mm256_loadu_ps(X + r * ldx + k));
      acc[r][0] = _mm512_fmadd_ps(x, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(x, w1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(x, w2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(x, w3, acc[r][3]);
    }
  }
  const __mmask8 live = __mmask8((1u << nc) - 1);
  const __m512 b = bias ? bcast8(_mm256_maskz_loadu_ps(live, bias)) : _mm512_setzero_ps();
#pragma GCC unroll 6  // acc stays in registers only if every index is a constant
  for (int r = 0; r < R; r += 2) {
    const int r1 = r + 1 < R ? r + 1 : r;  // an odd last row is paired with itself
    // [row r: c..c+8 | row r1: c..c+8], each ((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7)).
    __m512 s = rows_final(row_halves(acc[r][0], acc[r][1], acc[r][2], acc[r][3]),
                          row_halves(acc[r1][0], acc[r1][1], acc[r1][2], acc[r1][3]));
    for (int k = in8; k < in; ++k) {
      const __m512 x = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(X[r * ldx + k]), _mm512_set1_ps(X[r1 * ldx + k]));
      s = _mm512_fmadd_ps(x, _mm512_load_ps(p + 16 * (k - in8)), s);
    }
    if (bias) s = _mm512_add_ps(s, b);
    _mm512_mask_storeu_ps(Y + r * ldy, live, s);
    if (r1 != r) _mm256_mask_storeu_ps(Y + r1 * ldy, live, _mm512_maskz_extractf32x8_ps(__mmask8(0xff), s, 1));
  }
}

using PackedFn = void (*)(const float*, size_t, const float*, int, int, float*, size_t, const float*, const char*,
                          size_t, int);
// packed_tiles[fetch][rows - 1]
constexpr PackedFn packed_tiles[2][6] = {
    {&packed_tile<1, false>, &packed_tile<2, false>, &packed_tile<3, false>, &packed_tile<4, false>,
     &packed_tile<5, false>, &packed_tile<6, false>},
    {&packed_tile<1, true>, &packed_tile<2, true>, &packed_tile<3, true>, &packed_tile<4, true>,
     &packed_tile<5, true>, &packed_tile<6, true>}};
// Fewer rows than this take dot_tile (packing 8 W rows costs about as much as a few rows' products).
constexpr int kPackedMinRows = 4;
// The tile whose W rows are fetched ahead: this many 8-column tiles on (measured on weights streamed from memory).
constexpr int kFetchAhead = 2;

// The panel rows [p0, p1) of columns [c0, c1), through packed tiles.
template <class WT>
void packed_columns(const float* X, size_t ldx, int p0, int p1, int in, const WT* W, size_t ldw, float* Y,
                    size_t ldy, const float* bias, int c0, int c1) {
  thread_local PackBuf buf;
  float* P = buf.get(packed_size(in));
  for (int c = c0; c < c1; c += 8) {
    const int nc = std::min(8, c1 - c);
    pack8(W + size_t(c) * ldw, ldw, in, nc, P);
    const int ahead = c + 8 * kFetchAhead;
    const char* next = ahead + 8 <= c1 ? reinterpret_cast<const char*>(W + size_t(ahead) * ldw) : nullptr;
    for (int r = p0; r < p1; r += 6)  // the first row tile fetches
      packed_tiles[next && r == p0][std::min(6, p1 - r) - 1](X + size_t(r) * ldx, ldx, P, in, nc,
                                                             Y + size_t(r) * ldy + c, ldy, bias ? bias + c : nullptr,
                                                             next, ldw * sizeof(WT), int(sizeof(WT)));
  }
}
#endif

// Columns [c0, c1) of Y = X·Wᵀ (+ bias), all n rows; rows of X, W and Y are ldx, ldw and ldy floats apart. Rows in
// panels whose slice of X fits in L2; per panel, column tiles outer (a tile's W rows stay in L1 while the panel's rows
// pass them). A single row takes 8 columns at a time (fewer loads per FMA); more rows take 4 columns by up to 3 rows,
// or, with AVX-512 and enough rows, packed 8-column tiles by up to 6 rows.
template <class WT>
void linear_columns(const float* X, size_t ldx, int n, int in, const WT* W, size_t ldw, float* Y, size_t ldy,
                    const float* bias, int c0, int c1) {
  const int panel = std::max(6, int((256 * 1024) / (sizeof(float) * size_t(in))) / 6 * 6);
  for (int p0 = 0; p0 < n; p0 += panel) {
    const int p1 = std::min(n, p0 + panel);
#ifdef MOEDIT_PACKED_TILES
    if (p1 - p0 >= kPackedMinRows) {
      packed_columns(X, ldx, p0, p1, in, W, ldw, Y, ldy, bias, c0, c1);
      continue;
    }
#endif
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
    // The exponentials scalar on purpose, through libm's expf as silu() does: Eigen's vectorised exp peels to the
    // destination's alignment, so one element's result would depend on its row's address — and a token's activations
    // on how it is batched (cached vs naive traces differ). The divisions and products round each element on its own,
    // so they run vectorised over a block of exponentials: g / (1 + e) · u, bit for bit silu(g) · u.
    float* o = out + size_t(r) * I;
    constexpr int B = 64;
    float e[B];
    for (int i0 = 0; i0 < I; i0 += B) {
      const int m = std::min(B, I - i0);
      for (int i = 0; i < m; ++i) e[i] = std::exp(-g[i0 + i]);
      for (int i = 0; i < m; ++i) o[i0 + i] = g[i0 + i] / (1.f + e[i]) * u[i0 + i];
    }
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
