// The gradient ops (see kernels/grad_ops.h).
#include "kernels/grad_ops.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace moedit::grad {

namespace {

template <class T>
using MapT = Eigen::Map<MatT<T>>;
template <class T>
using CMapT = Eigen::Map<const MatT<T>>;
using Stride = Eigen::OuterStride<>;
template <class T>
using SMapT = Eigen::Map<MatT<T>, 0, Stride>;
template <class T>
using CSMapT = Eigen::Map<const MatT<T>, 0, Stride>;

int threads_for(double flops) { return (omp_in_parallel() || flops < 4e6) ? 1 : ops::num_threads(); }

}  // namespace

// ---- linear -----------------------------------------------------------------------------------------------------

template <class T>
void linear(const T* X, int n, int in, const float* W, int out, T* Y, const float* b) {
  if constexpr (std::is_same_v<T, float>) {
    ops::linear(X, n, in, W, out, Y, b);
  } else {
    CMapMatR w(W, out, in);
    CMapT<T> x(X, n, in);
    MapT<T> y(Y, n, out);
    y.noalias() = x * w.template cast<T>().transpose();
    if (b)
      for (int r = 0; r < n; ++r)
        for (int c = 0; c < out; ++c) y(r, c) += T(b[c]);
  }
}

template <class T>
void linear_backward(const T* dY, int n, int in, const float* W, int out, T* dX, bool accumulate, const T* X,
                     T* dW, T* db) {
  CMapT<T> dy(dY, n, out);
  if (dX) {
    if constexpr (std::is_same_v<T, float>) {
      // dX = dY·W, split over column blocks of W (= of dX) so each thread streams its own slice of W.
      const int nt = threads_for(2.0 * n * in * out);
      const int block = nt == 1 ? in : std::max(64, ((in + nt * 4 - 1) / (nt * 4) + 15) / 16 * 16);
      const int nblocks = (in + block - 1) / block;
#pragma omp parallel for schedule(dynamic) num_threads(nt) if (nt > 1)
      for (int bk = 0; bk < nblocks; ++bk) {
        const int c0 = bk * block, c1 = std::min(in, c0 + block);
        Eigen::Map<const MatR, 0, Stride> w(W + c0, out, c1 - c0, Stride(in));
        SMapT<T> dx(dX + c0, n, c1 - c0, Stride(in));
        if (accumulate)
          dx.noalias() += dy * w;
        else
          dx.noalias() = dy * w;
      }
    } else {
      CMapMatR w(W, out, in);
      MapT<T> dx(dX, n, in);
      if (accumulate)
        dx.noalias() += dy * w.template cast<T>();
      else
        dx.noalias() = dy * w.template cast<T>();
    }
  }
  if (dW) {
    CMapT<T> x(X, n, in);
    MapT<T>(dW, out, in).noalias() += dy.transpose() * x;
  }
  if (db)
    for (int r = 0; r < n; ++r)
      for (int c = 0; c < out; ++c) db[c] += dy(r, c);
}

// ---- RMSNorm ----------------------------------------------------------------------------------------------------

template <class T>
void rmsnorm(const T* x, const float* w, T* y, int rows, int dim, float eps) {
  if constexpr (std::is_same_v<T, float>) {
    ops::rmsnorm(x, w, y, rows, dim, eps);
  } else {
    for (int r = 0; r < rows; ++r) {
      const T* xr = x + size_t(r) * dim;
      T* yr = y + size_t(r) * dim;
      T ss = 0;
      for (int i = 0; i < dim; ++i) ss += xr[i] * xr[i];
      const T inv = T(1) / std::sqrt(ss / T(dim) + T(eps));
      for (int i = 0; i < dim; ++i) yr[i] = T(w[i]) * (xr[i] * inv);
    }
  }
}

template <class T>
void rmsnorm_backward(const T* x, const float* w, const T* dy, T* dx, int rows, int dim, float eps, bool accumulate,
                      T* dw) {
  // y_i = w_i·x_i·r, r = (Σx²/n + eps)^-½:  dx_j = r·w_j·dy_j − x_j·r³/n · Σ_i w_i·dy_i·x_i.
  for (int r = 0; r < rows; ++r) {
    const T* xr = x + size_t(r) * dim;
    const T* g = dy + size_t(r) * dim;
    T* o = dx + size_t(r) * dim;
    T ss = 0, dot = 0;
    for (int i = 0; i < dim; ++i) {
      ss += xr[i] * xr[i];
      dot += T(w[i]) * g[i] * xr[i];
    }
    const T inv = T(1) / std::sqrt(ss / T(dim) + T(eps));
    const T c = dot * inv * inv * inv / T(dim);
    for (int i = 0; i < dim; ++i) {
      const T v = inv * T(w[i]) * g[i] - xr[i] * c;
      o[i] = accumulate ? o[i] + v : v;
    }
    if (dw)
      for (int i = 0; i < dim; ++i) dw[i] += g[i] * xr[i] * inv;
  }
}

// ---- RoPE -------------------------------------------------------------------------------------------------------

template <class T>
void rope(T* x, int rows, int row_stride, int n_heads, int head_stride, int rot_dim, const int* pos,
          const float* inv_freq, bool transpose, float scaling) {
  if constexpr (std::is_same_v<T, float>) {
    if (!transpose) {
      ops::rope_neox(x, rows, row_stride, n_heads, head_stride, rot_dim, pos, inv_freq, scaling);
      return;
    }
  }
  const int half = rot_dim / 2;
  std::vector<float> cs(static_cast<size_t>(half) * 2);
  for (int r = 0; r < rows; ++r) {
    for (int i = 0; i < half; ++i) {
      const float ang = float(pos[r]) * inv_freq[i];  // as ops::rope_neox
      cs[2 * size_t(i)] = std::cos(ang) * scaling;
      cs[2 * size_t(i) + 1] = std::sin(ang) * scaling;
    }
    for (int h = 0; h < n_heads; ++h) {
      T* v = x + size_t(r) * row_stride + size_t(h) * head_stride;
      for (int i = 0; i < half; ++i) {
        const T a = v[i], b = v[i + half], c = T(cs[2 * size_t(i)]);
        const T s = transpose ? -T(cs[2 * size_t(i) + 1]) : T(cs[2 * size_t(i) + 1]);
        v[i] = a * c - b * s;
        v[i + half] = b * c + a * s;
      }
    }
  }
}

// ---- softmax, SwiGLU --------------------------------------------------------------------------------------------

template <class T>
void softmax(T* x, int n) {
  ops::softmax_row(x, n);
}

template <class T>
void softmax_backward(const T* p, const T* dp, int n, T* dz) {
  ops::softmax_row_backward(p, dp, n, dz);
}

template <class T>
void swiglu(const T* gu, int rows, int I, T* key) {
  if constexpr (std::is_same_v<T, float>) {
    ops::silu_mul(gu, rows, I, key);
  } else {
    for (int r = 0; r < rows; ++r) {
      const T* g = gu + size_t(r) * 2 * I;
      for (int i = 0; i < I; ++i) key[size_t(r) * I + i] = g[i] * sigmoid_t(g[i]) * g[I + i];
    }
  }
}

template <class T>
void swiglu_backward(const T* gu, const T* dkey, int rows, int I, T* dgu) {
  // k = silu(g)·u: dg = dk·u·σ(g)(1 + g(1 − σ(g))), du = dk·silu(g).
  for (int r = 0; r < rows; ++r) {
    const T* g = gu + size_t(r) * 2 * I;
    const T* dk = dkey + size_t(r) * I;
    T* o = dgu + size_t(r) * 2 * I;
    using A = Eigen::Array<T, Eigen::Dynamic, 1>;
    Eigen::Map<const A> ga(g, I), ua(g + I, I), dka(dk, I);
    const A sg = T(1) / (T(1) + (-ga).exp());  // σ(g), vectorised
    Eigen::Map<A>(o, I) = dka * ua * sg * (T(1) + ga * (T(1) - sg));
    Eigen::Map<A>(o + I, I) = dka * ga * sg;
  }
}

// ---- attention --------------------------------------------------------------------------------------------------

template <class T>
void attention(const T* q, int n_q, int q_stride, int q_pos0, const T* k, int k_stride, const T* v, int v_stride,
               int n_k, const ops::AttnShape& s, T* out, int out_stride, T* probs) {
  const int group = s.Hq / s.Hkv;
  const bool par = !omp_in_parallel() && double(n_q) * n_k * s.Hq * s.Dk > 2e5;
#pragma omp parallel for schedule(dynamic) if (par)
  for (int h = 0; h < s.Hq; ++h) {
    const int g = h / group;
    CSMapT<T> qh(q + size_t(h) * s.Dk, n_q, s.Dk, Stride(q_stride));
    CSMapT<T> kh(k + size_t(g) * s.Dk, n_k, s.Dk, Stride(k_stride));
    CSMapT<T> vh(v + size_t(g) * s.Dv, n_k, s.Dv, Stride(v_stride));
    MapT<T> P(probs + size_t(h) * n_q * n_k, n_q, n_k);
    P.noalias() = (qh * kh.transpose()) * T(s.scale);
    for (int i = 0; i < n_q; ++i) {
      const int p = q_pos0 + i;
      T* row = P.data() + size_t(i) * n_k;
      for (int j = 0; j < n_k; ++j)
        if (j > p || (s.window > 0 && j <= p - s.window)) row[j] = -std::numeric_limits<T>::infinity();
      softmax(row, n_k);
    }
    SMapT<T> oh(out + size_t(h) * s.Dv, n_q, s.Dv, Stride(out_stride));
    oh.noalias() = P * vh;
  }
}

template <class T>
void attention_backward(const T* q, int n_q, int q_stride, const T* k, int k_stride, const T* v, int v_stride,
                        int n_k, const ops::AttnShape& s, const T* probs, const T* dout, int dout_stride, T* dq,
                        T* dk, T* dv) {
  // Per head: dP = dO·Vᵀ, dS = P ⊙ (dP − rowsum(dP ⊙ P)), dQ = scale·dS·K, dK += scale·dSᵀ·Q, dV += Pᵀ·dO.
  // Heads of one kv group write the same dK/dV columns, so the loop is serial over heads (sizes are small).
  const int group = s.Hq / s.Hkv;
  for (int h = 0; h < s.Hq; ++h) {
    const int g = h / group;
    CSMapT<T> qh(q + size_t(h) * s.Dk, n_q, s.Dk, Stride(q_stride));
    CSMapT<T> kh(k + size_t(g) * s.Dk, n_k, s.Dk, Stride(k_stride));
    CSMapT<T> vh(v + size_t(g) * s.Dv, n_k, s.Dv, Stride(v_stride));
    CMapT<T> P(probs + size_t(h) * n_q * n_k, n_q, n_k);
    CSMapT<T> doh(dout + size_t(h) * s.Dv, n_q, s.Dv, Stride(dout_stride));
    MatT<T> dP = doh * vh.transpose();
    for (int i = 0; i < n_q; ++i) {
      T acc = 0;
      for (int j = 0; j < n_k; ++j) acc += dP(i, j) * P(i, j);
      for (int j = 0; j < n_k; ++j) dP(i, j) = P(i, j) * (dP(i, j) - acc) * T(s.scale);
    }
    SMapT<T> dqh(dq + size_t(h) * s.Dk, n_q, s.Dk, Stride(q_stride));
    SMapT<T> dkh(dk + size_t(g) * s.Dk, n_k, s.Dk, Stride(k_stride));
    SMapT<T> dvh(dv + size_t(g) * s.Dv, n_k, s.Dv, Stride(v_stride));
    dqh.noalias() = dP * kh;
    dkh.noalias() += dP.transpose() * qh;
    dvh.noalias() += P.transpose() * doh;
  }
}

template <class T>
void log_softmax(const T* x, int n, T* out) {
  using A = Eigen::Array<T, Eigen::Dynamic, 1>;
  Eigen::Map<const A> xa(x, n);
  const T m = xa.maxCoeff();
  const T lse = m + std::log((xa - m).exp().sum());  // vectorised exp
  Eigen::Map<A>(out, n) = xa - lse;
}

// ---- instantiations ---------------------------------------------------------------------------------------------

#define MOEDIT_GRAD_OPS_INSTANTIATE(T)                                                                              \
  template void linear<T>(const T*, int, int, const float*, int, T*, const float*);                                \
  template void linear_backward<T>(const T*, int, int, const float*, int, T*, bool, const T*, T*, T*);            \
  template void rmsnorm<T>(const T*, const float*, T*, int, int, float);                                          \
  template void rmsnorm_backward<T>(const T*, const float*, const T*, T*, int, int, float, bool, T*);             \
  template void rope<T>(T*, int, int, int, int, int, const int*, const float*, bool, float);                     \
  template void softmax<T>(T*, int);                                                                              \
  template void softmax_backward<T>(const T*, const T*, int, T*);                                                 \
  template void swiglu<T>(const T*, int, int, T*);                                                                \
  template void swiglu_backward<T>(const T*, const T*, int, int, T*);                                             \
  template void attention<T>(const T*, int, int, int, const T*, int, const T*, int, int, const ops::AttnShape&,   \
                             T*, int, T*);                                                                        \
  template void attention_backward<T>(const T*, int, int, const T*, int, const T*, int, int,                      \
                                      const ops::AttnShape&, const T*, const T*, int, T*, T*, T*);                \
  template void log_softmax<T>(const T*, int, T*);

MOEDIT_GRAD_OPS_INSTANTIATE(float)
MOEDIT_GRAD_OPS_INSTANTIATE(double)

}  // namespace moedit::grad
