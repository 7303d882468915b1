// Routing on the device: one thread per token runs kernels/cpu/route.cpp's route_row<float> step for step —
// softmax (max, exp, sequential sum, one reciprocal) or sigmoid scores, the selection bias, group limits (MaxScore:
// losers' scores 0; TopTwoSum: −inf), top-k by descending score with ties to the lower index, renormalisation
// (Σ selected + eps), scaling; TopKThenSoftmax selects on the logits and softmaxes the k chosen. exp is evaluated
// in double and rounded once (device.cuh), so the weights match the CPU's to an ulp and the ids exactly (barring
// scores within an ulp of each other).
//
// route_backward: the same thread per token through route_row_backward<float>'s steps (the weights' gradient back
// through scaling, renormalisation and the softmax or sigmoid; the selection is held fixed).
//
// Known limits: a token's E scores live in global scratch and are scanned k times by one thread: fine for E ≤ 256
// and the batch sizes of a forward, not a throughput kernel.
#include <math_constants.h>

#include "kernels/cuda/check.h"
#include "kernels/cuda/device.cuh"
#include "kernels/cuda/launch.h"

namespace moedit::cuda {

namespace {

// softmax_row<float>: entries equal to −inf get 0; everything masked gives zeros.
__device__ void softmax_row(float* x, int n) {
  float m = -CUDART_INF_F;
  for (int i = 0; i < n; ++i) m = m < x[i] ? x[i] : m;  // std::max(m, x)
  if (m == -CUDART_INF_F) {
    for (int i = 0; i < n; ++i) x[i] = 0.f;
    return;
  }
  float s = 0.f;
  for (int i = 0; i < n; ++i) s += (x[i] = exp_ref(x[i] - m));
  const float inv = 1.f / s;
  for (int i = 0; i < n; ++i) x[i] *= inv;
}

// The k largest of x[n] in descending order, ties to the lower index (as partial_sort with that comparator).
__device__ void select_topk(const float* x, int n, int k, int* ids) {
  for (int j = 0; j < k; ++j) {
    int best = -1;
    float bv = 0.f;
    for (int e = 0; e < n; ++e) {
      bool taken = false;
      for (int q = 0; q < j; ++q) taken |= ids[q] == e;
      if (taken) continue;
      if (best < 0 || x[e] > bv) {
        best = e;
        bv = x[e];
      }
    }
    ids[j] = best;
  }
}

// Group limits on the selection scores x[E]; gs: n_group floats of scratch.
__device__ void limit_groups(const DevRoute& s, float* x, float* gs) {
  if (s.groups == 0) return;
  const int G = s.n_group, per = s.E / G;
  for (int g = 0; g < G; ++g) {
    const float* v = x + size_t(g) * per;
    if (s.groups == 1) {  // max_element: the first largest
      float a = v[0];
      for (int i = 1; i < per; ++i) a = a < v[i] ? v[i] : a;
      gs[g] = a;
    } else {  // the two largest
      float a = -CUDART_INF_F, b = a;
      for (int i = 0; i < per; ++i)
        if (v[i] > a) {
          b = a;
          a = v[i];
        } else if (v[i] > b) {
          b = v[i];
        }
      gs[g] = a + b;
    }
  }
  // A group survives iff fewer than topk_group groups precede it in (score descending, index ascending) order.
  const float masked = s.groups == 1 ? 0.f : -CUDART_INF_F;
  for (int g = 0; g < G; ++g) {
    int rank = 0;
    for (int o = 0; o < G; ++o) rank += gs[o] > gs[g] || (gs[o] == gs[g] && o < g);
    if (rank >= s.topk_group)
      for (int e = g * per; e < (g + 1) * per; ++e) x[e] = masked;
  }
}

// One thread per token t; p, sel: E floats of scratch each, gs: n_group.
__global__ void route_kernel(const float* __restrict__ z, int N, DevRoute s, const float* __restrict__ bias,
                             int* __restrict__ ids, float* __restrict__ w, float* scratch) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= N) return;
  const int E = s.E, k = s.k;
  const float* zt = z + size_t(t) * E;
  int* id = ids + size_t(t) * k;
  float* wt = w + size_t(t) * k;
  if (s.score == 2) {  // TopKThenSoftmax
    select_topk(zt, E, k, id);
    for (int j = 0; j < k; ++j) wt[j] = zt[id[j]];
    softmax_row(wt, k);
  } else {
    float* p = scratch + size_t(t) * E;
    float* sel = scratch + size_t(N) * E + size_t(t) * E;
    float* gs = scratch + 2 * size_t(N) * E + size_t(t) * s.n_group;
    for (int e = 0; e < E; ++e) p[e] = zt[e];
    if (s.score == 0) softmax_row(p, E);
    else
      for (int e = 0; e < E; ++e) p[e] = sigmoid_ref(p[e]);
    for (int e = 0; e < E; ++e) sel[e] = bias ? p[e] + bias[e] : p[e];
    limit_groups(s, sel, gs);
    select_topk(sel, E, k, id);
    for (int j = 0; j < k; ++j) wt[j] = p[id[j]];
    if (s.renorm) {
      float sum = 0.f;
      for (int j = 0; j < k; ++j) sum += wt[j];
      sum += s.renorm_eps;
      for (int j = 0; j < k; ++j) wt[j] /= sum;
    }
  }
  if (s.scale)
    for (int j = 0; j < k; ++j) wt[j] *= s.scaling;
}

// One thread per token t: route_row_backward<float> step for step; p, dp: E floats of scratch each.
__global__ void route_backward_kernel(const float* __restrict__ z, int N, DevRoute s, const int* __restrict__ ids,
                                      const float* __restrict__ dw_in, float* __restrict__ dz, float* scratch) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= N) return;
  const int E = s.E, k = s.k;
  const float* zt = z + size_t(t) * E;
  const int* id = ids + size_t(t) * k;
  const float* dw = dw_in + size_t(t) * k;
  float* d = dz + size_t(t) * E;
  float* p = scratch + size_t(t) * E;
  float* dp = scratch + size_t(N) * E + size_t(t) * E;
  const float sc = s.scale ? s.scaling : 1.f;
  for (int e = 0; e < E; ++e) d[e] = 0.f;
  if (s.score == 2) {  // TopKThenSoftmax: the softmax of the k chosen logits
    for (int j = 0; j < k; ++j) p[j] = zt[id[j]];
    softmax_row(p, k);
    float dot = 0.f;
    for (int j = 0; j < k; ++j) dot += p[j] * (dw[j] * sc);
    for (int j = 0; j < k; ++j) d[id[j]] = p[j] * (dw[j] * sc - dot);
    return;
  }
  for (int e = 0; e < E; ++e) {
    p[e] = zt[e];
    dp[e] = 0.f;
  }
  if (s.score == 0) softmax_row(p, E);
  else
    for (int e = 0; e < E; ++e) p[e] = sigmoid_ref(p[e]);
  if (s.renorm) {  // w_j = p_j / S, S = eps + Σ_sel p:  dp_i = dw_i/S − (Σ_j dw_j p_j)/S²
    float S = s.renorm_eps, dot = 0.f;
    for (int j = 0; j < k; ++j) {
      S += p[id[j]];
      dot += (dw[j] * sc) * p[id[j]];
    }
    for (int j = 0; j < k; ++j) dp[id[j]] = (dw[j] * sc) / S - dot / (S * S);
  } else {
    for (int j = 0; j < k; ++j) dp[id[j]] = dw[j] * sc;
  }
  if (s.score == 0) {
    float dot = 0.f;
    for (int e = 0; e < E; ++e) dot += p[e] * dp[e];
    for (int e = 0; e < E; ++e) d[e] = p[e] * (dp[e] - dot);
  } else {
    for (int e = 0; e < E; ++e) d[e] = dp[e] * p[e] * (1.f - p[e]);
  }
}

}  // namespace

void route_backward(const float* z, int N, const DevRoute& s, const int* ids, const float* dw, float* dz,
                    float* scratch, cudaStream_t st) {
  if (N <= 0) return;
  if (s.E <= 0 || s.k <= 0 || s.k > s.E)
    throw std::invalid_argument("cuda route backward: k = " + std::to_string(s.k) + " of E = " + std::to_string(s.E));
  constexpr unsigned nt = 128;
  route_backward_kernel<<<(unsigned(N) + nt - 1) / nt, nt, 0, st>>>(z, N, s, ids, dw, dz, scratch);
  MOEDIT_CUDA_LAUNCHED();
}

void route(const float* z, int N, const DevRoute& s, const float* bias, int* ids, float* w, float* scratch,
           cudaStream_t st) {
  if (N <= 0) return;
  if (s.E <= 0 || s.k <= 0 || s.k > s.E)
    throw std::invalid_argument("cuda route: k = " + std::to_string(s.k) + " of E = " + std::to_string(s.E));
  if (s.groups != 0 && (s.n_group <= 0 || s.E % s.n_group != 0 || s.topk_group < 1))
    throw std::invalid_argument("cuda route: E = " + std::to_string(s.E) + " in " + std::to_string(s.n_group) +
                                " groups");
  constexpr unsigned nt = 128;
  route_kernel<<<(unsigned(N) + nt - 1) / nt, nt, 0, st>>>(z, N, s, bias, ids, w, scratch);
  MOEDIT_CUDA_LAUNCHED();
}

}  // namespace moedit::cuda
