// The gradient ops of the model's blocks, op by op: the forward and backward of Linear, RMSNorm, RoPE, softmax,
// SwiGLU and causal attention on row-major buffers, templated on the scalar (float: the CPU backend's backward ops and
// v*; double: the finite-difference tests). The taped block backward (model/backward.h) composes them; the CPU
// backend's backward ops (kernels/backend.h) are their float instances, and a device backend is tested against those.
#pragma once
#include <Eigen/Dense>

#include "kernels/ops.h"
#include "kernels/route.h"

namespace moedit {

template <class T>
using MatT = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using VecT = Eigen::Matrix<T, Eigen::Dynamic, 1>;

namespace grad {

// ---- op level (row-major buffers; W is a float [out, in] weight, y = x·Wᵀ + b) ---------------------------------

// Y[n, out] = X[n, in]·Wᵀ (+ b).
template <class T>
void linear(const T* X, int n, int in, const float* W, int out, T* Y, const float* b = nullptr);
// dX[n, in] = dY[n, out]·W (+= when accumulate). dW[out, in] += dYᵀ·X and db[out] += Σ_rows dY when non-null
// (X is then required).
template <class T>
void linear_backward(const T* dY, int n, int in, const float* W, int out, T* dX, bool accumulate,
                     const T* X = nullptr, T* dW = nullptr, T* db = nullptr);
// y = w ⊙ x·rsqrt(mean(x²) + eps), per row.
template <class T>
void rmsnorm(const T* x, const float* w, T* y, int rows, int dim, float eps);
// dx (= or +=) from dy; dw[dim] += Σ_rows dy ⊙ x·r when non-null.
template <class T>
void rmsnorm_backward(const T* x, const float* w, const T* dy, T* dx, int rows, int dim, float eps,
                      bool accumulate, T* dw = nullptr);

// Rotate-half RoPE in place (ops::rope_neox layout and angles, cos/sin computed in fp32 as the forward does);
// transpose = true applies the transposed rotation (the backward: rotation by −angle); cos/sin scaled by scaling.
template <class T>
void rope(T* x, int rows, int row_stride, int n_heads, int head_stride, int rot_dim, const int* pos,
          const float* inv_freq, bool transpose, float scaling = 1.f);

// Softmax in place (ops::softmax_inplace semantics, -inf → 0) and its backward dz = p ⊙ (dp − Σ p·dp).
template <class T>
void softmax(T* x, int n);
template <class T>
void softmax_backward(const T* p, const T* dp, int n, T* dz);

// key[r, i] = silu(gu[r, i])·gu[r, I + i] for gate‖up rows [rows, 2I]; backward gives dgu [rows, 2I].
template <class T>
void swiglu(const T* gu, int rows, int I, T* key);
template <class T>
void swiglu_backward(const T* gu, const T* dkey, int rows, int I, T* dgu);

// Causal attention of one sequence, ops::attention semantics, recording probs [Hq, n_q, n_k] (masked entries 0).
template <class T>
void attention(const T* q, int n_q, int q_stride, int q_pos0, const T* k, int k_stride, const T* v, int v_stride,
               int n_k, const ops::AttnShape& s, T* out, int out_stride, T* probs);
// Backward: dq [n_q, q_stride] (=), dk [n_k, k_stride] (+=), dv [n_k, v_stride] (+=) from dout.
template <class T>
void attention_backward(const T* q, int n_q, int q_stride, const T* k, int k_stride, const T* v, int v_stride,
                        int n_k, const ops::AttnShape& s, const T* probs, const T* dout, int dout_stride, T* dq,
                        T* dk, T* dv);

// log-softmax of a row.
template <class T>
void log_softmax(const T* x, int n, T* out);

template <class T>
inline T sigmoid_t(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

}  // namespace grad
}  // namespace moedit
