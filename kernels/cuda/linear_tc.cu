// Linear on tensor cores (--precision bf16): Y[n, out] = bf16(X)·bf16(W)ᵀ (+ bias), fp32 accumulation, for weights
// stored in 16 or 8 bits. Both operands are rounded to bf16 (round to nearest even) as they are staged in shared
// memory: activations from fp32; bf16 weights as they are; f16 weights and FP8 weights times their block scale
// widened exactly, then rounded. The MMAs (WMMA m16n16k16, bf16 × bf16 → fp32) see exact bf16 products; only their
// fp32 sums round. The bias is added in fp32 after the last MMA.
//
// Tiles of BM rows × BN columns, TK = 32 deep per stage (two 16-deep MMA steps); 8 warps, each holding FPW 16 × 16
// accumulator fragments side by side. Every output element is the same sequence of 16-deep MMA steps in order of k
// from 0 (the zero-padded tail adds exact zeros) whatever the tile shape, the rows sharing the call or the group a
// row is in: batch invariant, like the fp32 path (linear.cu).
//
// Known limits: WMMA, not Hopper's warpgroup MMA; operands staged through registers (no asynchronous copies, no
// double buffering); one fp32 staging tile for the epilogue.
#include <cuda_bf16.h>
#include <mma.h>

#include "kernels/cuda/check.h"
#include "kernels/cuda/device.cuh"
#include "kernels/cuda/launch.h"

namespace moedit::cuda {

namespace {

namespace wmma = nvcuda::wmma;

constexpr int TK = 32;     // k per stage
constexpr int KP = TK + 8; // a staged row, in bf16 elements: a multiple of 8 (WMMA's ldm) and of 32 bytes apart
constexpr int NT = 256;    // threads per block (8 warps)

// Big for many rows (64 × 64: 4 × 4 fragments, two per warp), Small for few (16 × 128: one row of 8, one per warp).
// Their BM are linear.cu's, so a grouping made for one serves both (grouped_tile_rows).
struct Big {
  static constexpr int BM = 64, BN = 64;
};
struct Small {
  static constexpr int BM = 16, BN = 128;
};
template <class S>
constexpr int fpw = (S::BM / 16) * (S::BN / 16) / (NT / 32);  // fragments per warp

template <class S>
struct TcSmem {
  alignas(32) uint16_t x[S::BM][KP];        // bf16 bits of the X tile, row-major (WMMA's A)
  alignas(32) uint16_t w[S::BN][KP];        // bf16 bits of the W tile: row c is column c of Wᵀ (B, column-major)
  alignas(32) float y[S::BM][S::BN + 4];    // the accumulators, for the bounds-checked epilogue
};

// W's element (r, c) as bf16 bits: bf16 weights as stored, the others widened exactly and then rounded.
template <int T>
__device__ __forceinline__ uint16_t weight_bf16(const DevWeight& W, int64_t r, int64_t c) {
  if constexpr (T == kBF16) return __ldg(static_cast<const unsigned short*>(W.data) + size_t(r) * W.ld + size_t(c));
  else return bf16_round(widen<T>(W, r, c));
}

// Rows [row0, row0 + BM) × columns [col0, col0 + BN) of Y (rows < n and columns < out are written).
template <int T, class S>
__device__ __forceinline__ void tc_tile(TcSmem<S>& sm, const float* __restrict__ X, size_t ldx, int n, int in,
                                        const DevWeight& W, int out, float* __restrict__ Y, size_t ldy,
                                        const float* __restrict__ bias, int row0, int col0) {
  constexpr int BM = S::BM, BN = S::BN, F = fpw<S>, FC = BN / 16;
  static_assert(BM * TK % NT == 0 && BN * TK % NT == 0, "every thread stages the same number of elements");
  const int tid = int(threadIdx.x), warp = tid / 32;
  const int fr = warp * F / FC, fc = warp * F % FC;  // this warp's fragment row, its first fragment column

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[F];
#pragma unroll
  for (int j = 0; j < F; ++j) wmma::fill_fragment(acc[j], 0.f);

  for (int k0 = 0; k0 < in; k0 += TK) {
    // Stage: consecutive threads take consecutive k of one row (contiguous in memory for X and W alike).
#pragma unroll
    for (int s = 0; s < BM * TK / NT; ++s) {
      const int e = tid + s * NT, m = e / TK, kk = e % TK, r = row0 + m, k = k0 + kk;
      sm.x[m][kk] = (r < n && k < in) ? bf16_round(__ldg(X + size_t(r) * ldx + size_t(k))) : uint16_t(0);
    }
#pragma unroll
    for (int s = 0; s < BN * TK / NT; ++s) {
      const int e = tid + s * NT, c = e / TK, kk = e % TK, col = col0 + c, k = k0 + kk;
      sm.w[c][kk] = (col < out && k < in) ? weight_bf16<T>(W, col, k) : uint16_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < TK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
      wmma::load_matrix_sync(a, reinterpret_cast<const __nv_bfloat16*>(&sm.x[fr * 16][kk]), KP);
#pragma unroll
      for (int j = 0; j < F; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b;
        wmma::load_matrix_sync(b, reinterpret_cast<const __nv_bfloat16*>(&sm.w[(fc + j) * 16][kk]), KP);
        wmma::mma_sync(acc[j], a, b, acc[j]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < F; ++j)
    wmma::store_matrix_sync(&sm.y[fr * 16][(fc + j) * 16], acc[j], BN + 4, wmma::mem_row_major);
  __syncthreads();
  for (int e = tid; e < BM * BN; e += NT) {
    const int m = e / BN, c = e % BN, r = row0 + m, col = col0 + c;
    if (r < n && col < out) Y[size_t(r) * ldy + size_t(col)] = bias ? sm.y[m][c] + bias[col] : sm.y[m][c];
  }
}

// grid (column tiles, row tiles).
template <int T, class S>
__global__ void __launch_bounds__(NT) tc_linear_kernel(const float* __restrict__ X, size_t ldx, int n, int in,
                                                       DevWeight W, int out, float* __restrict__ Y, size_t ldy,
                                                       const float* __restrict__ bias) {
  __shared__ TcSmem<S> sm;
  tc_tile<T, S>(sm, X, ldx, n, in, W, out, Y, ldy, bias, int(blockIdx.y) * S::BM, int(blockIdx.x) * S::BN);
}

// grid (column tiles, max_tiles), as linear.cu's grouped kernel; groups with fp32 weights are left to that kernel
// (their blocks do nothing).
template <class S>
__global__ void __launch_bounds__(NT) tc_grouped_kernel(const float* __restrict__ X, size_t ldx, int in,
                                                        const DevWeight* __restrict__ Ws, int out,
                                                        float* __restrict__ Y, size_t ldy,
                                                        const int* __restrict__ start,
                                                        const int* __restrict__ tile_start, int E) {
  __shared__ TcSmem<S> sm;
  const TileGroup g = tile_group(int(blockIdx.y), start, tile_start, E, S::BM);
  if (g.e < 0) return;
  const DevWeight W = Ws[g.e];
  with_wkind(W.type, [&](auto t) {
    constexpr int T = decltype(t)::value;
    if constexpr (T != kF32)
      tc_tile<T, S>(sm, X + size_t(g.s0) * ldx, ldx, g.n, in, W, out, Y + size_t(g.s0) * ldy, ldy, nullptr, g.row0,
                    int(blockIdx.x) * S::BN);
  });
}

template <class S>
void launch_tc_linear(const float* X, size_t ldx, int n, int in, const DevWeight& W, int out, float* Y, size_t ldy,
                      const float* bias, cudaStream_t st) {
  const unsigned row_tiles = unsigned((n + S::BM - 1) / S::BM);
  if (row_tiles > 65535u) throw std::runtime_error("cuda linear: " + std::to_string(n) + " rows is too many");
  const dim3 grid(unsigned((out + S::BN - 1) / S::BN), row_tiles);
  if (W.type == kF32) throw std::logic_error("cuda linear_bf16: fp32 weights take the fp32 path");
  with_wkind(W.type, [&](auto t) {
    constexpr int T = decltype(t)::value;
    if constexpr (T != kF32) tc_linear_kernel<T, S><<<grid, NT, 0, st>>>(X, ldx, n, in, W, out, Y, ldy, bias);
  });
  MOEDIT_CUDA_LAUNCHED();
}

}  // namespace

void linear_bf16(const float* X, size_t ldx, int n, int in, const DevWeight& W, int out, float* Y, size_t ldy,
                 const float* bias, cudaStream_t st) {
  if (n <= 0 || out <= 0) return;
  if (n >= 48) launch_tc_linear<Big>(X, ldx, n, in, W, out, Y, ldy, bias, st);
  else launch_tc_linear<Small>(X, ldx, n, in, W, out, Y, ldy, bias, st);
}

void grouped_linear_bf16(const float* X, size_t ldx, int in, const DevWeight* W, int out, float* Y, size_t ldy,
                         const int* start, const int* tile_start, int E, int tile_rows, int max_tiles,
                         cudaStream_t st) {
  if (max_tiles <= 0 || out <= 0 || E <= 0) return;
  if (max_tiles > 65535)
    throw std::runtime_error("cuda grouped linear: " + std::to_string(max_tiles) + " row tiles is too many");
  if (tile_rows == Big::BM) {
    const dim3 grid(unsigned((out + Big::BN - 1) / Big::BN), unsigned(max_tiles));
    tc_grouped_kernel<Big><<<grid, NT, 0, st>>>(X, ldx, in, W, out, Y, ldy, start, tile_start, E);
  } else if (tile_rows == Small::BM) {
    const dim3 grid(unsigned((out + Small::BN - 1) / Small::BN), unsigned(max_tiles));
    tc_grouped_kernel<Small><<<grid, NT, 0, st>>>(X, ldx, in, W, out, Y, ldy, start, tile_start, E);
  } else {
    throw std::logic_error("cuda grouped linear: tile_rows " + std::to_string(tile_rows) + " is not a tile shape");
  }
  MOEDIT_CUDA_LAUNCHED();
}

}  // namespace moedit::cuda
