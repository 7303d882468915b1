// Elementwise and row-wise kernels of the CUDA backend: copies, residual adds, scaling, clamping, sigmoid, row
// scaling (the shared expert's gate), embedding rows from a typed table, SwiGLU, RMSNorm and NeoX RoPE. Each computes
// an element with the same operations as the CPU op in kernels/cpu/ (transcendentals through device.cuh), in fp32.
#include "kernels/cuda/check.h"
#include "kernels/cuda/device.cuh"
#include "kernels/cuda/launch.h"

namespace moedit::cuda {

namespace {

constexpr unsigned kThreads = 256;

// y[rows, cols] (ldy) = x[rows, cols] (ldx): one grid-stride loop over the rows·cols elements.
__global__ void copy2d_kernel(const float* __restrict__ x, size_t ldx, float* __restrict__ y, size_t ldy, int rows,
                              int cols) {
  const size_t n = size_t(rows) * size_t(cols);
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const size_t r = i / size_t(cols), c = i % size_t(cols);
    y[r * ldy + c] = x[r * ldx + c];
  }
}

// y[i, :cols] = x[rows[i], :cols] where rows[i] ≥ 0: grid (n, column blocks).
__global__ void copy_rows_kernel(const float* __restrict__ x, size_t ldx, const int* __restrict__ rows,
                                 float* __restrict__ y, size_t ldy, int cols) {
  const int i = blockIdx.x, c = blockIdx.y * blockDim.x + threadIdx.x, r = rows[i];
  if (r >= 0 && c < cols) y[size_t(i) * ldy + c] = x[size_t(r) * ldx + c];
}

__global__ void add_kernel(float* y, const float* x, size_t n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    y[i] += x[i];
}

__global__ void scale_kernel(float* x, size_t n, float s) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    x[i] *= s;
}

// min(max(x, −c), c) with std::max/std::min's comparisons (a NaN stays NaN).
__global__ void clamp_kernel(float* x, size_t n, float c) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    float v = x[i];
    v = v < -c ? -c : v;
    x[i] = c < v ? c : v;
  }
}

// x ← 1 / (1 + exp(−x)).
__global__ void sigmoid_kernel(float* x, size_t n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    x[i] = sigmoid_ref(x[i]);
}

// y[r, :cols] *= g[r]: grid-stride over the rows·cols elements.
__global__ void scale_rows_kernel(float* __restrict__ y, int rows, int cols, const float* __restrict__ g) {
  const size_t n = size_t(rows) * size_t(cols);
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    y[i] *= g[i / size_t(cols)];
}

__global__ void fill_kernel(float* x, size_t n, float v) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    x[i] = v;
}

__global__ void clamp_backward_kernel(float* __restrict__ dx, const float* __restrict__ x, size_t n, float c) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    if (x[i] < -c || x[i] > c) dx[i] = 0.f;
}

// A warp per row: ds[r] = (dy[r]·y[r])·g(1 − g).
__global__ void sigmoid_gate_backward_kernel(const float* __restrict__ dy, const float* __restrict__ y,
                                             const float* __restrict__ g, int rows, int cols, float* __restrict__ ds) {
  const size_t warps = size_t(gridDim.x) * blockDim.x / 32, lane = threadIdx.x % 32;
  for (size_t r = (blockIdx.x * size_t(blockDim.x) + threadIdx.x) / 32; r < size_t(rows); r += warps) {
    float s = 0.f;
    for (size_t c = lane; c < size_t(cols); c += 32) s = fmaf(dy[r * cols + c], y[r * cols + c], s);
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) ds[r] = s * g[r] * (1.f - g[r]);
  }
}

// y[i, :H] = row ids[i] of the table, widened: grid (n, column blocks).
template <int T>
__global__ void gather_rows_kernel(DevWeight table, const int* ids, int H, float* y) {
  const int i = blockIdx.x, c = blockIdx.y * blockDim.x + threadIdx.x;
  if (c < H) y[size_t(i) * H + c] = widen<T>(table, ids[i], c);
}

// key[r, i] = g / (1 + exp(−g)) · u for g = gu[r, i], u = gu[r, I + i] (ops::silu_mul's sequence).
__global__ void silu_mul_kernel(const float* __restrict__ gu, int rows, int I, float* __restrict__ key) {
  const size_t n = size_t(rows) * size_t(I);
  for (size_t j = blockIdx.x * size_t(blockDim.x) + threadIdx.x; j < n; j += size_t(gridDim.x) * blockDim.x) {
    const size_t r = j / size_t(I), i = j % size_t(I);
    const float g = gu[r * 2 * size_t(I) + i], u = gu[r * 2 * size_t(I) + size_t(I) + i];
    key[j] = g / (1.f + exp_ref(-g)) * u;
  }
}

// Block per row: y = w ⊙ x·(1/sqrt(mean(x²) + eps)); x and y may alias (each element is read before it is written,
// by the thread that writes it).
__global__ void rmsnorm_kernel(const float* x, const float* __restrict__ w, float* y, int dim, float eps) {
  __shared__ float sh[32];
  const float* xr = x + size_t(blockIdx.x) * dim;
  float* yr = y + size_t(blockIdx.x) * dim;
  float ss = 0.f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
  ss = block_sum(ss, sh);
  const float inv = 1.f / sqrtf(ss / float(dim) + eps);
  for (int i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = w[i] * (xr[i] * inv);
}

// One thread per (row, head, pair i < rot_dim/2): rotate (v[i], v[i + half]) by pos·inv_freq[i], cos and sin scaled.
__global__ void rope_kernel(float* x, int rows, int row_stride, int n_heads, int head_stride, int half,
                            const int* pos, const float* inv_freq, float attn_scaling) {
  const size_t n = size_t(rows) * n_heads * half;
  for (size_t j = blockIdx.x * size_t(blockDim.x) + threadIdx.x; j < n; j += size_t(gridDim.x) * blockDim.x) {
    const int i = int(j % size_t(half));
    const size_t rh = j / size_t(half);
    const int h = int(rh % size_t(n_heads)), r = int(rh / size_t(n_heads));
    const float ang = float(pos[r]) * inv_freq[i];  // the fp32 product, as HF
    const float c = float(cos(double(ang))) * attn_scaling, s = float(sin(double(ang))) * attn_scaling;
    float* v = x + size_t(r) * row_stride + size_t(h) * head_stride;
    const float a = v[i], b = v[i + half];
    v[i] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));  // no contraction into an FMA: two products, one difference
    v[i + half] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
  }
}

}  // namespace

void copy2d(const float* x, size_t ldx, float* y, size_t ldy, int rows, int cols, cudaStream_t st) {
  if (rows <= 0 || cols <= 0) return;
  copy2d_kernel<<<blocks_for(size_t(rows) * cols, kThreads), kThreads, 0, st>>>(x, ldx, y, ldy, rows, cols);
  MOEDIT_CUDA_LAUNCHED();
}

void copy_rows(const float* x, size_t ldx, const int* rows, int n, float* y, size_t ldy, int cols, cudaStream_t st) {
  if (n <= 0 || cols <= 0) return;
  const dim3 grid(unsigned(n), (unsigned(cols) + kThreads - 1) / kThreads);
  copy_rows_kernel<<<grid, kThreads, 0, st>>>(x, ldx, rows, y, ldy, cols);
  MOEDIT_CUDA_LAUNCHED();
}

void add(float* y, const float* x, size_t n, cudaStream_t st) {
  if (!n) return;
  add_kernel<<<blocks_for(n, kThreads), kThreads, 0, st>>>(y, x, n);
  MOEDIT_CUDA_LAUNCHED();
}

void scale(float* x, size_t n, float s, cudaStream_t st) {
  if (!n) return;
  scale_kernel<<<blocks_for(n, kThreads), kThreads, 0, st>>>(x, n, s);
  MOEDIT_CUDA_LAUNCHED();
}

void clamp(float* x, size_t n, float c, cudaStream_t st) {
  if (!n) return;
  clamp_kernel<<<blocks_for(n, kThreads), kThreads, 0, st>>>(x, n, c);
  MOEDIT_CUDA_LAUNCHED();
}

void sigmoid(float* x, size_t n, cudaStream_t st) {
  if (!n) return;
  sigmoid_kernel<<<blocks_for(n, kThreads), kThreads, 0, st>>>(x, n);
  MOEDIT_CUDA_LAUNCHED();
}

void scale_rows(float* y, int rows, int cols, const float* g, cudaStream_t st) {
  if (rows <= 0 || cols <= 0) return;
  scale_rows_kernel<<<blocks_for(size_t(rows) * cols, kThreads), kThreads, 0, st>>>(y, rows, cols, g);
  MOEDIT_CUDA_LAUNCHED();
}

void fill(float* x, size_t n, float v, cudaStream_t st) {
  if (!n) return;
  fill_kernel<<<blocks_for(n, kThreads), kThreads, 0, st>>>(x, n, v);
  MOEDIT_CUDA_LAUNCHED();
}

void clamp_backward(float* dx, const float* x, size_t n, float c, cudaStream_t st) {
  if (!n) return;
  clamp_backward_kernel<<<blocks_for(n, kThreads), kThreads, 0, st>>>(dx, x, n, c);
  MOEDIT_CUDA_LAUNCHED();
}

void sigmoid_gate_backward(const float* dy, const float* y, const float* g, int rows, int cols, float* ds,
                           cudaStream_t st) {
  if (rows <= 0) return;
  sigmoid_gate_backward_kernel<<<blocks_for(size_t(rows) * 32, kThreads), kThreads, 0, st>>>(dy, y, g, rows, cols,
                                                                                              ds);
  MOEDIT_CUDA_LAUNCHED();
}

void gather_rows(const DevWeight& table, const int* ids, int n, int H, float* y, cudaStream_t st) {
  if (n <= 0 || H <= 0) return;
  const dim3 grid(unsigned(n), (unsigned(H) + kThreads - 1) / kThreads);
  with_wkind(table.type, [&](auto t) {
    constexpr int T = decltype(t)::value;
    gather_rows_kernel<T><<<grid, kThreads, 0, st>>>(table, ids, H, y);
  });
  MOEDIT_CUDA_LAUNCHED();
}

void silu_mul(const float* gu, int rows, int I, float* key, cudaStream_t st) {
  if (rows <= 0 || I <= 0) return;
  silu_mul_kernel<<<blocks_for(size_t(rows) * I, kThreads), kThreads, 0, st>>>(gu, rows, I, key);
  MOEDIT_CUDA_LAUNCHED();
}

void rmsnorm(const float* x, const float* w, float* y, int rows, int dim, float eps, cudaStream_t st) {
  if (rows <= 0 || dim <= 0) return;
  rmsnorm_kernel<<<unsigned(rows), kThreads, 0, st>>>(x, w, y, dim, eps);
  MOEDIT_CUDA_LAUNCHED();
}

void rope_neox(float* x, int rows, int row_stride, int n_heads, int head_stride, int rot_dim, const int* pos,
               const float* inv_freq, float attn_scaling, cudaStream_t st) {
  const int half = rot_dim / 2;
  if (rows <= 0 || n_heads <= 0 || half <= 0) return;
  rope_kernel<<<blocks_for(size_t(rows) * n_heads * half, kThreads), kThreads, 0, st>>>(
      x, rows, row_stride, n_heads, head_stride, half, pos, inv_freq, attn_scaling);
  MOEDIT_CUDA_LAUNCHED();
}

}  // namespace moedit::cuda
