// The backward ops of the seam other than Linear's (linear.cu): RMSNorm, SwiGLU and causal attention, in fp32 (the
// precision setting does not apply: gradients are summed in fp32). Each output element is written by one thread
// with its sums in a fixed order, so the ops are deterministic (no atomics).
//
// Attention recomputes its probabilities: one block per (query row, head) computes the visible keys' scores, their
// softmax P (max, exp, sum in key order) and dS = P ⊙ (dO·Vᵀ − rowsum(P ⊙ dO·Vᵀ))·scale into scratch rows, and dQ; a
// second kernel, a block per (key row, kv head), sums dK and dV over its group's query heads and the query rows.
// Known limits: the scratch holds P and dS for every (head, query, key): 2·Hq·n_q·n_k floats — sized for v*'s short
// prompts, not for long-context training.
#include <math_constants.h>

#include "kernels/cuda/check.h"
#include "kernels/cuda/device.cuh"
#include "kernels/cuda/launch.h"

namespace moedit::cuda {

namespace {

constexpr unsigned kThreads = 256, kAttnThreads = 128;

// Block per row: dx_j (=, +=) r·w_j·dy_j − x_j·r³/dim·Σ_i w_i·dy_i·x_i with r = 1/sqrt(mean(x²) + eps). dx may
// alias dy (every dy of the row is read before the first write, and each element's by the thread that writes it).
__global__ void rmsnorm_backward_kernel(const float* __restrict__ x, const float* __restrict__ w, const float* dy,
                                        float* dx, int dim, float eps, bool accumulate) {
  __shared__ float sh[32];
  const size_t row = size_t(blockIdx.x) * dim;
  float ss = 0.f, dot = 0.f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    const float xi = x[row + i];
    ss = fmaf(xi, xi, ss);
    dot = fmaf(w[i] * dy[row + i], xi, dot);
  }
  ss = block_sum(ss, sh);
  dot = block_sum(dot, sh);
  const float inv = 1.f / sqrtf(ss / float(dim) + eps);
  const float c = dot * inv * inv * inv / float(dim);
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    const float v = inv * w[i] * dy[row + i] - x[row + i] * c;
    dx[row + i] = accumulate ? dx[row + i] + v : v;
  }
}

// Element (r, i < I): ∂g = dk·u·σ(g)·(1 + g·(1 − σ(g))), ∂u = dk·silu(g).
__global__ void silu_mul_backward_kernel(const float* __restrict__ gu, const float* __restrict__ dkey, int rows,
                                         int I, float* __restrict__ dgu) {
  const size_t n = size_t(rows) * I;
  for (size_t j = blockIdx.x * size_t(blockDim.x) + threadIdx.x; j < n; j += size_t(gridDim.x) * blockDim.x) {
    const size_t r = j / size_t(I), i = j % size_t(I), g0 = r * 2 * size_t(I);
    const float g = gu[g0 + i], u = gu[g0 + I + i], dk = dkey[j], s = sigmoid_ref(g);
    dgu[g0 + i] = dk * u * s * (1.f + g * (1.f - s));
    dgu[g0 + I + i] = dk * g * s;
  }
}

// grid (n_q, Hq). P, dS: [Hq, n_q, n_k] scratch rows (zeros outside the visible keys); dq [n_q, q_stride] (=).
__global__ void __launch_bounds__(kAttnThreads)
    attention_dq_kernel(const float* __restrict__ q, int q_stride, int q_pos0, const float* __restrict__ k,
                        int k_stride, const float* __restrict__ v, int v_stride, int n_k, DevAttn s,
                        const float* __restrict__ dout, int dout_stride, float* __restrict__ dq,
                        float* __restrict__ P, float* __restrict__ dS) {
  __shared__ float sh[32];
  const int i = blockIdx.x, h = blockIdx.y, n_q = gridDim.x, g = h / (s.Hq / s.Hkv), tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32, nwarps = kAttnThreads / 32;
  const int pos = q_pos0 + i;
  const int hi = min(n_k, pos + 1), lo = s.window > 0 ? max(0, pos - s.window + 1) : 0;
  float* p = P + (size_t(h) * n_q + i) * n_k;
  float* ds = dS + (size_t(h) * n_q + i) * n_k;
  const float* qi = q + size_t(i) * q_stride + size_t(h) * s.Dk;
  const float* doi = dout + size_t(i) * dout_stride + size_t(h) * s.Dv;
  const float* kg = k + size_t(g) * s.Dk;
  const float* vg = v + size_t(g) * s.Dv;
  for (int j = tid; j < n_k; j += kAttnThreads)
    if (j < lo || j >= hi) p[j] = ds[j] = 0.f;
  // Scores and dP = dO·v_j: a warp per key, lanes over the head dims, a fixed shuffle tree.
  for (int j = lo + warp; j < hi; j += nwarps) {
    float sc = 0.f, dp = 0.f;
    for (int c = lane; c < s.Dk; c += 32) sc = fmaf(qi[c], kg[size_t(j) * k_stride + c], sc);
    for (int c = lane; c < s.Dv; c += 32) dp = fmaf(doi[c], vg[size_t(j) * v_stride + c], dp);
    for (int o = 16; o > 0; o >>= 1) {
      sc += __shfl_xor_sync(0xffffffffu, sc, o);
      dp += __shfl_xor_sync(0xffffffffu, dp, o);
    }
    if (lane == 0) {
      p[j] = sc * s.scale;
      ds[j] = dp;
    }
  }
  __syncthreads();
  float m = -CUDART_INF_F;
  for (int j = lo + tid; j < hi; j += kAttnThreads) m = fmaxf(m, p[j]);
  m = block_reduce<true>(m, sh);
  float l = 0.f;
  for (int j = lo + tid; j < hi; j += kAttnThreads) {
    p[j] = exp_ref(p[j] - m);
    l += p[j];
  }
  l = block_sum(l, sh);
  float acc = 0.f;
  for (int j = lo + tid; j < hi; j += kAttnThreads) {
    p[j] = p[j] / l;
    acc = fmaf(p[j], ds[j], acc);
  }
  acc = block_sum(acc, sh);
  for (int j = lo + tid; j < hi; j += kAttnThreads) ds[j] = p[j] * (ds[j] - acc) * s.scale;
  __syncthreads();
  for (int c = tid; c < s.Dk; c += kAttnThreads) {
    float d = 0.f;
    for (int j = lo; j < hi; ++j) d = fmaf(ds[j], kg[size_t(j) * k_stride + c], d);
    dq[size_t(i) * q_stride + size_t(h) * s.Dk + c] = d;
  }
}

// grid (n_k, Hkv): dk[j] += Σ_{h in the group, i} dS[h, i, j]·q[i, h]; dv[j] += Σ P[h, i, j]·dout[i, h].
__global__ void __launch_bounds__(kAttnThreads)
    attention_dkv_kernel(const float* __restrict__ q, int q_stride, int n_q, DevAttn s,
                         const float* __restrict__ dout, int dout_stride, const float* __restrict__ P,
                         const float* __restrict__ dS, float* __restrict__ dk, int k_stride, float* __restrict__ dv,
                         int v_stride) {
  const int j = blockIdx.x, g = blockIdx.y, n_k = gridDim.x, group = s.Hq / s.Hkv;
  // out[j, g's D columns] += Σ_{h, i} W[h, i, j]·X[i, h's D columns]
  auto sum_group = [&](const float* __restrict__ W, const float* __restrict__ X, int ldx, int D, float* out, int ldo) {
    for (int c = threadIdx.x; c < D; c += kAttnThreads) {
      float d = 0.f;
      for (int h = g * group; h < (g + 1) * group; ++h)
        for (int i = 0; i < n_q; ++i)
          d = fmaf(W[(size_t(h) * n_q + i) * n_k + j], X[size_t(i) * ldx + size_t(h) * D + c], d);
      out[size_t(j) * ldo + size_t(g) * D + c] += d;
    }
  };
  sum_group(dS, q, q_stride, s.Dk, dk, k_stride);
  sum_group(P, dout, dout_stride, s.Dv, dv, v_stride);
}

}  // namespace

void rmsnorm_backward(const float* x, const float* w, const float* dy, float* dx, int rows, int dim, float eps,
                      bool accumulate, cudaStream_t st) {
  if (rows <= 0 || dim <= 0) return;
  rmsnorm_backward_kernel<<<unsigned(rows), kThreads, 0, st>>>(x, w, dy, dx, dim, eps, accumulate);
  MOEDIT_CUDA_LAUNCHED();
}

void silu_mul_backward(const float* gu, const float* dkey, int rows, int I, float* dgu, cudaStream_t st) {
  if (rows <= 0 || I <= 0) return;
  silu_mul_backward_kernel<<<blocks_for(size_t(rows) * I, kThreads), kThreads, 0, st>>>(gu, dkey, rows, I, dgu);
  MOEDIT_CUDA_LAUNCHED();
}

size_t attention_backward_scratch(int n_q, int n_k, const DevAttn& s) {
  return 2 * size_t(s.Hq) * size_t(n_q) * size_t(n_k > 0 ? n_k : 0);
}

void attention_backward(const float* q, int n_q, int q_stride, int q_pos0, const float* k, int k_stride,
                        const float* v, int v_stride, int n_k, const DevAttn& s, const float* dout, int dout_stride,
                        float* dq, float* dk, float* dv, float* scratch, cudaStream_t st) {
  if (n_q <= 0 || s.Hq <= 0) return;
  if (s.Hkv <= 0 || s.Hq % s.Hkv != 0)
    throw std::invalid_argument("cuda attention backward: Hq " + std::to_string(s.Hq) +
                                " is not a multiple of Hkv " + std::to_string(s.Hkv));
  if (s.Hq > 65535 || n_k > 2147483647 / 2) throw std::invalid_argument("cuda attention backward: too large");
  float* P = scratch;
  float* dS = scratch + size_t(s.Hq) * n_q * size_t(n_k > 0 ? n_k : 0);
  attention_dq_kernel<<<dim3(unsigned(n_q), unsigned(s.Hq)), kAttnThreads, 0, st>>>(
      q, q_stride, q_pos0, k, k_stride, v, v_stride, n_k, s, dout, dout_stride, dq, P, dS);
  MOEDIT_CUDA_LAUNCHED();
  if (n_k <= 0) return;
  attention_dkv_kernel<<<dim3(unsigned(n_k), unsigned(s.Hkv)), kAttnThreads, 0, st>>>(
      q, q_stride, n_q, s, dout, dout_stride, P, dS, dk, k_stride, dv, v_stride);
  MOEDIT_CUDA_LAUNCHED();
}

}  // namespace moedit::cuda
