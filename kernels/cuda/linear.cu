// Linear on typed weights: Y[n, out] = X[n, in]·Wᵀ (+ bias), and its backward dX (+)= dY·W (the same tiles, W staged
// transposed), fp32 accumulation, weights widened to fp32 as they are staged in shared memory (bf16, f16 and FP8
// widen exactly, so a typed product equals the product with the widened copy). Shared-memory tiles of BM rows × BN
// columns, BK = 16 deep; each thread keeps TM × TN outputs in registers.
//
// Every output element is one thread's sequence fmaf(x[k], w[k], acc) in order of k from 0 (the zero-padded tail
// of the last BK step adds exact zeros), then the bias: the same sequence whatever the tile shape, the rows sharing
// the call or the group a row is in — the CUDA backend is batch invariant like the CPU one (kernels/ops.h), though
// its sums are ordered differently from the CPU's eight-lane sums (≈ 1 ulp·√in apart).
//
// Known limits: plain fp32 FMA (no tensor cores: --precision bf16 uses them, linear_tc.cu), no double buffering:
// about 10–20 % of the fp32 peak for large products; a product of a few rows reads W once per BN-column block but
// leaves most SMs idle when out is small.
#include "kernels/cuda/check.h"
#include "kernels/cuda/device.cuh"
#include "kernels/cuda/launch.h"

namespace moedit::cuda {

namespace {

constexpr int BK = 16;

// Tile shapes: Big for many rows (64 × 64, 4 × 4 per thread), Small for few (16 × 64, 1 × 4 per thread); both 256
// threads.
struct Big {
  static constexpr int BM = 64, BN = 64, TM = 4, TN = 4;
};
struct Small {
  static constexpr int BM = 16, BN = 64, TM = 1, TN = 4;
};
template <class S>
constexpr int threads_of = (S::BM / S::TM) * (S::BN / S::TN);

template <class S>
struct Smem {
  float x[BK][S::BM + 4];  // X tile, k-major (a thread's TM rows are read as broadcasts)
  float w[BK][S::BN + 4];  // widened W tile, k-major (consecutive threads read consecutive columns)
};

// Rows [row0, row0 + BM) × columns [col0, col0 + BN) of Y (rows < n and columns < out are written): Y = X·Wᵀ (+ bias)
// with X [n, in], W [out, in]; with Tr, Y (+)= X·W, X [n, in] and W [in, out] (linear_backward: in is the weight's
// row count, out its column count).
template <int T, class S, bool Tr = false>
__device__ __forceinline__ void gemm_tile(Smem<S>& sm, const float* __restrict__ X, size_t ldx, int n, int in,
                                          const DevWeight& W, int out, float* __restrict__ Y, size_t ldy,
                                          const float* __restrict__ bias, int row0, int col0,
                                          bool accumulate = false) {
  constexpr int BM = S::BM, BN = S::BN, TM = S::TM, TN = S::TN, NT = threads_of<S>;
  constexpr int RS = BM / TM, CS = BN / TN;  // a thread's rows are RS apart, its columns CS apart
  static_assert(BM * BK % NT == 0 && BN * BK % NT == 0, "every thread stages the same number of elements");
  const int tid = threadIdx.x, tr = tid / CS, tc = tid % CS;
  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;

  for (int k0 = 0; k0 < in; k0 += BK) {
    // Stage: consecutive threads take consecutive k of one row (contiguous in memory for X and W alike).
#pragma unroll
    for (int s = 0; s < BM * BK / NT; ++s) {
      const int e = tid + s * NT, m = e / BK, kk = e % BK, r = row0 + m, k = k0 + kk;
      sm.x[kk][m] = (r < n && k < in) ? __ldg(X + size_t(r) * ldx + size_t(k)) : 0.f;
    }
#pragma unroll
    for (int s = 0; s < BN * BK / NT; ++s) {  // contiguous in W: k (rows of W) or, with Tr, columns
      const int e = tid + s * NT, c = Tr ? e % BN : e / BK, kk = Tr ? e / BN : e % BK, col = col0 + c, k = k0 + kk;
      sm.w[kk][c] = (col < out && k < in) ? (Tr ? widen<T>(W, k, col) : widen<T>(W, col, k)) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      float xv[TM], wv[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) xv[i] = sm.x[kk][tr + i * RS];
#pragma unroll
      for (int j = 0; j < TN; ++j) wv[j] = sm.w[kk][tc + j * CS];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(xv[i], wv[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int r = row0 + tr + i * RS;
    if (r >= n) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int c = col0 + tc + j * CS;
      if (c >= out) continue;
      float& y = Y[size_t(r) * ldy + size_t(c)];
      y = accumulate ? y + acc[i][j] : bias ? acc[i][j] + bias[c] : acc[i][j];
    }
  }
}

// grid (column tiles, row tiles).
template <int T, class S, bool Tr>
__global__ void __launch_bounds__(threads_of<S>) linear_kernel(const float* __restrict__ X, size_t ldx, int n, int in,
                                                               DevWeight W, int out, float* __restrict__ Y,
                                                               size_t ldy, const float* __restrict__ bias,
                                                               bool accumulate) {
  __shared__ Smem<S> sm;
  gemm_tile<T, S, Tr>(sm, X, ldx, n, in, W, out, Y, ldy, bias, int(blockIdx.y) * S::BM, int(blockIdx.x) * S::BN,
                      accumulate);
}

// grid (column tiles, max_tiles): row tile y = blockIdx.y is group e's where tile_start[e] ≤ y < tile_start[e+1].
// Groups may hold different weight types (an edited expert's fp32 copy among bf16 ones): the block branches on its
// group's type. f32_only: groups of other types are left to the tensor-core kernel (--precision bf16, linear_tc.cu).
// Tr: Y (+)= X·W per group (grouped_linear_backward).
template <class S, bool Tr = false>
__global__ void __launch_bounds__(threads_of<S>) grouped_kernel(const float* __restrict__ X, size_t ldx, int in,
                                                                const DevWeight* __restrict__ Ws, int out,
                                                                float* __restrict__ Y, size_t ldy,
                                                                const int* __restrict__ start,
                                                                const int* __restrict__ tile_start, int E,
                                                                bool f32_only, bool accumulate = false) {
  __shared__ Smem<S> sm;
  const TileGroup g = tile_group(int(blockIdx.y), start, tile_start, E, S::BM);
  if (g.e < 0) return;
  const DevWeight W = Ws[g.e];
  if (f32_only && W.type != kF32) return;
  with_wkind(W.type, [&](auto t) {
    constexpr int T = decltype(t)::value;
    gemm_tile<T, S, Tr>(sm, X + size_t(g.s0) * ldx, ldx, g.n, in, W, out, Y + size_t(g.s0) * ldy, ldy, nullptr,
                        g.row0, int(blockIdx.x) * S::BN, accumulate);
  });
}

template <class S, bool Tr>
void launch_linear(const float* X, size_t ldx, int n, int in, const DevWeight& W, int out, float* Y, size_t ldy,
                   const float* bias, bool accumulate, cudaStream_t st) {
  const unsigned row_tiles = unsigned((n + S::BM - 1) / S::BM);
  if (row_tiles > 65535u) throw std::runtime_error("cuda linear: " + std::to_string(n) + " rows is too many");
  const dim3 grid(unsigned((out + S::BN - 1) / S::BN), row_tiles);
  constexpr unsigned nt = threads_of<S>;
  with_wkind(W.type, [&](auto t) {
    constexpr int T = decltype(t)::value;
    linear_kernel<T, S, Tr><<<grid, nt, 0, st>>>(X, ldx, n, in, W, out, Y, ldy, bias, accumulate);
  });
  MOEDIT_CUDA_LAUNCHED();
}

}  // namespace

void linear(const float* X, size_t ldx, int n, int in, const DevWeight& W, int out, float* Y, size_t ldy,
            const float* bias, cudaStream_t st) {
  if (n <= 0 || out <= 0) return;
  if (n >= 48) launch_linear<Big, false>(X, ldx, n, in, W, out, Y, ldy, bias, false, st);
  else launch_linear<Small, false>(X, ldx, n, in, W, out, Y, ldy, bias, false, st);
}

void linear_backward(const float* dY, size_t lddy, int n, int out, const DevWeight& W, int in, float* dX,
                     size_t lddx, bool accumulate, cudaStream_t st) {
  if (n <= 0 || in <= 0) return;  // out = 0: an empty sum, dX = 0 (or unchanged)
  if (n >= 48) launch_linear<Big, true>(dY, lddy, n, out, W, in, dX, lddx, nullptr, accumulate, st);
  else launch_linear<Small, true>(dY, lddy, n, out, W, in, dX, lddx, nullptr, accumulate, st);
}

int grouped_tile_rows(int P, int E) {
  const int groups = P < E ? P : E;
  return groups > 0 && P / groups >= 48 ? Big::BM : Small::BM;
}

namespace {

// The grouped launch of either direction: grid (column tiles of `cols`, max_tiles) of the tile shape tile_rows.
template <bool Tr>
void launch_grouped(const float* X, size_t ldx, int K, const DevWeight* W, int cols, float* Y, size_t ldy,
                    const int* start, const int* tile_start, int E, int tile_rows, int max_tiles, bool f32_only,
                    bool accumulate, cudaStream_t st) {
  if (max_tiles <= 0 || cols <= 0 || E <= 0) return;
  if (max_tiles > 65535)
    throw std::runtime_error("cuda grouped linear: " + std::to_string(max_tiles) + " row tiles is too many");
  auto go = [&](auto shape) {
    using S = decltype(shape);
    const dim3 grid(unsigned((cols + S::BN - 1) / S::BN), unsigned(max_tiles));
    grouped_kernel<S, Tr><<<grid, threads_of<S>, 0, st>>>(X, ldx, K, W, cols, Y, ldy, start, tile_start, E, f32_only,
                                                           accumulate);
  };
  if (tile_rows == Big::BM) go(Big{});
  else if (tile_rows == Small::BM) go(Small{});
  else throw std::logic_error("cuda grouped linear: tile_rows " + std::to_string(tile_rows) + " is not a tile shape");
  MOEDIT_CUDA_LAUNCHED();
}

}  // namespace

void grouped_linear(const float* X, size_t ldx, int in, const DevWeight* W, int out, float* Y, size_t ldy,
                    const int* start, const int* tile_start, int E, int tile_rows, int max_tiles, cudaStream_t st,
                    bool f32_only) {
  launch_grouped<false>(X, ldx, in, W, out, Y, ldy, start, tile_start, E, tile_rows, max_tiles, f32_only, false, st);
}

void grouped_linear_backward(const float* dY, size_t lddy, int out, const DevWeight* W, int in, float* dX,
                             size_t lddx, const int* start, const int* tile_start, int E, int tile_rows,
                             int max_tiles, bool accumulate, cudaStream_t st) {
  launch_grouped<true>(dY, lddy, out, W, in, dX, lddx, start, tile_start, E, tile_rows, max_tiles, false, accumulate,
                       st);
}

}  // namespace moedit::cuda
