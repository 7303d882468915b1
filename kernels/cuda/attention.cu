// Causal attention of one sequence (ops::attention's semantics): GQA (query head h reads kv head h / (Hq/Hkv)),
// Dk ≠ Dv (MLA), a sliding window, queries at absolute positions q_pos0 + i. One block per (query row, head) walks
// the visible keys [lo, hi) in chunks of 64 with an online softmax in fp32: scores q·k·scale (a warp per key,
// lanes over Dk, a fixed shuffle tree), then per chunk the running max m, the rescaled sum l and the rescaled
// output o[Dv] (a thread per output dimension, keys in order). out = o / l; a query that sees no key gets zeros (as
// the CPU's all-masked softmax).
//
// Known limits: each block reads its keys and values once per query (no reuse across the queries of a kv head, no
// tensor cores): fine for decoding and traces of short prompts, slow for long prefills.
#include <math_constants.h>

#include "kernels/cuda/check.h"
#include "kernels/cuda/device.cuh"
#include "kernels/cuda/launch.h"

namespace moedit::cuda {

namespace {

constexpr int kThreads = 128, kChunk = 64;

// grid (n_q, Hq); shared: q [Dk] ‖ p [kChunk] ‖ o [Dv].
__global__ void __launch_bounds__(kThreads)
    attention_kernel(const float* __restrict__ q, int q_stride, int q_pos0, const float* __restrict__ k,
                     int k_stride, const float* __restrict__ v, int v_stride, int n_k, DevAttn s,
                     float* __restrict__ out, int out_stride) {
  extern __shared__ float sh[];
  float* qs = sh;
  float* ps = qs + s.Dk;
  float* os = ps + kChunk;
  const int i = blockIdx.x, h = blockIdx.y, g = h / (s.Hq / s.Hkv), tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32, nwarps = kThreads / 32;
  const int pos = q_pos0 + i;
  const int hi = min(n_k, pos + 1), lo = s.window > 0 ? max(0, pos - s.window + 1) : 0;

  for (int c = tid; c < s.Dk; c += kThreads) qs[c] = q[size_t(i) * q_stride + size_t(h) * s.Dk + c];
  for (int d = tid; d < s.Dv; d += kThreads) os[d] = 0.f;
  __syncthreads();

  const float* kg = k + size_t(g) * s.Dk;
  const float* vg = v + size_t(g) * s.Dv;
  float m = -CUDART_INF_F, l = 0.f;
  for (int j0 = lo; j0 < hi; j0 += kChunk) {
    const int cn = min(kChunk, hi - j0);
    // Scores of the chunk's keys.
    for (int jj = warp; jj < cn; jj += nwarps) {
      const float* kj = kg + size_t(j0 + jj) * k_stride;
      float dot = 0.f;
      for (int c = lane; c < s.Dk; c += 32) dot = fmaf(qs[c], kj[c], dot);
      for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
      if (lane == 0) ps[jj] = dot * s.scale;
    }
    __syncthreads();
    // Every thread finds the same chunk max (in key order), then the chunk's probabilities and their sum.
    float cm = -CUDART_INF_F;
    for (int jj = 0; jj < cn; ++jj) cm = fmaxf(cm, ps[jj]);
    const float m_new = fmaxf(m, cm);
    const float corr = exp_ref(m - m_new);  // 0 for the first chunk (m = −inf)
    __syncthreads();
    if (tid < cn) ps[tid] = exp_ref(ps[tid] - m_new);
    __syncthreads();
    float csum = 0.f;
    for (int jj = 0; jj < cn; ++jj) csum += ps[jj];
    l = l * corr + csum;
    for (int d = tid; d < s.Dv; d += kThreads) {
      float acc = os[d] * corr;
      for (int jj = 0; jj < cn; ++jj) acc = fmaf(ps[jj], vg[size_t(j0 + jj) * v_stride + d], acc);
      os[d] = acc;
    }
    m = m_new;
    __syncthreads();
  }
  float* o = out + size_t(i) * out_stride + size_t(h) * s.Dv;
  for (int d = tid; d < s.Dv; d += kThreads) o[d] = hi > lo ? os[d] / l : 0.f;
}

}  // namespace

void attention(const float* q, int n_q, int q_stride, int q_pos0, const float* k, int k_stride, const float* v,
               int v_stride, int n_k, const DevAttn& s, float* out, int out_stride, cudaStream_t st) {
  if (n_q <= 0 || s.Hq <= 0) return;
  if (s.Hkv <= 0 || s.Hq % s.Hkv != 0)
    throw std::invalid_argument("cuda attention: Hq " + std::to_string(s.Hq) + " is not a multiple of Hkv " +
                                std::to_string(s.Hkv));
  if (s.Hq > 65535) throw std::invalid_argument("cuda attention: too many heads");
  const size_t smem = sizeof(float) * (size_t(s.Dk) + kChunk + size_t(s.Dv));
  if (smem > 48 * 1024) throw std::invalid_argument("cuda attention: head dims Dk + Dv too large for one block");
  const dim3 grid(unsigned(n_q), unsigned(s.Hq));
  attention_kernel<<<grid, kThreads, smem, st>>>(q, q_stride, q_pos0, k, k_stride, v, v_stride, n_k, s, out,
                                                 out_stride);
  MOEDIT_CUDA_LAUNCHED();
}

}  // namespace moedit::cuda
