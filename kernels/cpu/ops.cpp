// CPU kernels: Eigen for the GEMMs (single-threaded inside, EIGEN_DONT_PARALLELIZE), OpenMP across blocks.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "kernels/ops.h"

namespace moedit::ops {

namespace {
int g_threads = 0;  // 0 = omp default

using Stride = Eigen::OuterStride<>;
using CStridedMat = Eigen::Map<const MatR, 0, Stride>;
using StridedMat = Eigen::Map<MatR, 0, Stride>;
}  // namespace

int num_threads() { return g_threads > 0 ? g_threads : omp_get_max_threads(); }
void set_num_threads(int n) { g_threads = n; }

void linear(const float* X, int n, int in, const float* W, int out, float* Y, const float* bias) {
  // Y = X·Wᵀ. Split the output columns (W's rows) into blocks, one GEMM per block, so each thread streams its
  // own slice of W — the weights dominate memory traffic for the small n of decoding.
  const double flops = 2.0 * n * in * out;
  const int nt = (omp_in_parallel() || flops < 4e6) ? 1 : num_threads();
  const int block = nt == 1 ? out : std::max(64, ((out + nt * 4 - 1) / (nt * 4) + 15) / 16 * 16);
  const int nblocks = (out + block - 1) / block;
  CMapMatR x(X, n, in);
#pragma omp parallel for schedule(dynamic) num_threads(nt) if (nt > 1)
  for (int b = 0; b < nblocks; ++b) {
    const int c0 = b * block, c1 = std::min(out, c0 + block);
    CMapMatR w(W + size_t(c0) * in, c1 - c0, in);
    StridedMat y(Y + c0, n, c1 - c0, Stride(out));
    y.noalias() = x * w.transpose();
    if (bias)
      for (int r = 0; r < n; ++r)
        for (int c = c0; c < c1; ++c) Y[size_t(r) * out + c] += bias[c];
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
    // Keys visible to the last query bound the work: [lo, hi).
    const int last_pos = q_pos0 + n_q - 1;
    const int hi = std::min(n_k, last_pos + 1);
    CStridedMat qh(q + size_t(h) * s.Dk, n_q, s.Dk, Stride(q_stride));
    CStridedMat kh(k + size_t(g) * s.Dk, hi, s.Dk, Stride(k_stride));
    CStridedMat vh(v + size_t(g) * s.Dv, hi, s.Dv, Stride(v_stride));
    MatR sc = (qh * kh.transpose()) * s.scale;  // [n_q, hi]
    for (int i = 0; i < n_q; ++i) {
      const int p = q_pos0 + i;
      float* row = sc.data() + size_t(i) * hi;
      for (int j = 0; j < hi; ++j)
        if (j > p || (s.window > 0 && j <= p - s.window)) row[j] = -std::numeric_limits<float>::infinity();
      softmax_inplace(row, hi);
    }
    StridedMat oh(out + size_t(h) * s.Dv, n_q, s.Dv, Stride(out_stride));
    oh.noalias() = sc * vh;
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
