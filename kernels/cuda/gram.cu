// Key statistics on the device (Backend::gram): C [cols, cols] (+)= Kᵀ·K in fp64 for fp32 rows K [n, cols], the
// lower triangle only. Each block owns one 32 × 32 tile of the lower triangle (tiles numbered row by row: tile t is
// (bi, bj) with bi(bi+1)/2 ≤ t, bj = t − bi(bi+1)/2), stages RK rows of both column panels in shared memory as
// doubles, and each of its 256 threads sums 2 × 2 elements over the rows in order with fp64 FMAs (fp32 products are
// exact in fp64), then adds them to C once. No atomics: every element has one owner, so the result is deterministic.
//
// Known limits: fp64 FMA on the CUDA cores (no fp64 tensor-core MMA); a panel is read once per tile of its row.
#include "kernels/cuda/check.h"
#include "kernels/cuda/device.cuh"
#include "kernels/cuda/launch.h"

namespace moedit::cuda {

namespace {

constexpr int T = 32, RK = 16, NT = 256;

__global__ void __launch_bounds__(NT) gram_kernel(const float* __restrict__ K, int n, int cols, size_t ld,
                                                  double* __restrict__ C, bool accumulate) {
  __shared__ double a[RK][T + 1], b[RK][T + 1];
  const long long t = blockIdx.x;
  long long bi = (long long)((sqrt(8.0 * double(t) + 1.0) - 1.0) / 2.0);
  while (bi * (bi + 1) / 2 > t) --bi;
  while ((bi + 1) * (bi + 2) / 2 <= t) ++bi;
  const int r0 = int(bi) * T, c0 = int(t - bi * (bi + 1) / 2) * T;
  const int tid = int(threadIdx.x), ti = tid / (T / 2) * 2, tj = tid % (T / 2) * 2;
  double acc[2][2] = {{0, 0}, {0, 0}};
  for (int k0 = 0; k0 < n; k0 += RK) {
#pragma unroll
    for (int s = 0; s < RK * T / NT; ++s) {
      const int e = tid + s * NT, rr = e / T, cc = e % T, row = k0 + rr;
      const float* kr = K + size_t(row) * ld;
      a[rr][cc] = row < n && r0 + cc < cols ? double(__ldg(kr + r0 + cc)) : 0.0;
      b[rr][cc] = row < n && c0 + cc < cols ? double(__ldg(kr + c0 + cc)) : 0.0;
    }
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < RK; ++rr)
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) acc[i][j] = fma(a[rr][ti + i], b[rr][tj + j], acc[i][j]);
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int row = r0 + ti + i, col = c0 + tj + j;
      if (row < cols && col <= row) {
        double* c = C + size_t(row) * size_t(cols) + size_t(col);
        *c = accumulate ? *c + acc[i][j] : acc[i][j];
      }
    }
}

}  // namespace

void gram(const float* K, int n, int cols, size_t ld, double* C, bool accumulate, cudaStream_t st) {
  if (cols <= 0) return;
  const long long tiles = (cols + T - 1) / T, blocks = tiles * (tiles + 1) / 2;
  if (blocks > 0x7fffffffLL) throw std::runtime_error("cuda gram: " + std::to_string(cols) + " columns is too many");
  gram_kernel<<<unsigned(blocks), NT, 0, st>>>(K, n < 0 ? 0 : n, cols, ld, C, accumulate);
  MOEDIT_CUDA_LAUNCHED();
}

}  // namespace moedit::cuda
