// The device side of moe_experts (CudaBackend::moe_experts in moe.cpp drives it): grouping the (token, slot) pairs
// by expert without the host, gathering each group's rows, scaling each output row by its routing weight, and the
// per-token combine in ascending expert id. Integer counts only (no float atomics): deterministic.
//
// Grouping, for P = N·k pairs (pair p = t·k + j is slot j of token t):
//   moe_count_scan  one block: per-expert counts in shared memory, then start[E+1] and tile_start[E+1];
//   moe_scatter     one block per expert e: walks the pairs in order, a block-wide prefix sum of "ids[p] == e" gives
//                   each pair its row start[e] + (pairs of e before it) — stable, tokens ascending within e.
#include "kernels/cuda/check.h"
#include "kernels/cuda/device.cuh"
#include "kernels/cuda/launch.h"

namespace moedit::cuda {

namespace {

constexpr int kScanThreads = 1024, kScatterThreads = 256, kMaxK = 64;

// shared: E ints.
__global__ void __launch_bounds__(kScanThreads)
    moe_count_scan(const int* __restrict__ ids, int P, int E, int tile_rows, int* __restrict__ start,
                   int* __restrict__ tile_start, int* __restrict__ pos) {
  extern __shared__ int cnt[];
  for (int e = threadIdx.x; e < E; e += blockDim.x) cnt[e] = 0;
  __syncthreads();
  for (int p = threadIdx.x; p < P; p += blockDim.x) {
    const int e = ids[p];
    if (e >= 0 && e < E) atomicAdd(&cnt[e], 1);
    else pos[p] = -1;  // contributes nothing
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int s = 0, ts = 0;
    for (int e = 0; e < E; ++e) {
      start[e] = s;
      tile_start[e] = ts;
      s += cnt[e];
      ts += (cnt[e] + tile_rows - 1) / tile_rows;
    }
    start[E] = s;
    tile_start[E] = ts;
  }
}

// grid E blocks of kScatterThreads.
__global__ void __launch_bounds__(kScatterThreads)
    moe_scatter(const int* __restrict__ ids, int P, int k, const int* __restrict__ start, int* __restrict__ tok,
                int* __restrict__ pair, int* __restrict__ pos) {
  __shared__ int warp_count[kScatterThreads / 32];
  const int e = blockIdx.x, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (start[e + 1] == start[e]) return;  // no pair chose e (uniform over the block)
  int base = start[e];
  for (int p0 = 0; p0 < P; p0 += kScatterThreads) {
    const int p = p0 + threadIdx.x;
    const bool mine = p < P && ids[p] == e;
    const unsigned ballot = __ballot_sync(0xffffffffu, mine);
    if (lane == 0) warp_count[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, total = 0;
    for (int w = 0; w < kScatterThreads / 32; ++w) {
      before += w < warp ? warp_count[w] : 0;
      total += warp_count[w];
    }
    if (mine) {
      const int r = base + before + __popc(ballot & ((1u << lane) - 1u));
      tok[r] = p / k;
      pair[r] = p;
      pos[p] = r;
    }
    base += total;
    __syncthreads();  // warp_count is rewritten next round
  }
}

// xg[r, :] = a[tok[r], :] for r < start[E]: grid (P, column blocks).
__global__ void moe_gather_kernel(const float* __restrict__ a, int H, const int* __restrict__ tok,
                                  const int* __restrict__ start, int E, float* __restrict__ xg) {
  const int r = blockIdx.x, c = blockIdx.y * blockDim.x + threadIdx.x;
  if (r < start[E] && c < H) xg[size_t(r) * H + c] = a[size_t(tok[r]) * H + c];
}

// out[r, :] *= w[pair[r]] for r < start[E]: grid (P, column blocks).
__global__ void moe_scale_kernel(float* __restrict__ out, int H, const int* __restrict__ pair,
                                 const float* __restrict__ w, const int* __restrict__ start, int E) {
  const int r = blockIdx.x, c = blockIdx.y * blockDim.x + threadIdx.x;
  if (r >= start[E] || c >= H) return;
  out[size_t(r) * H + c] *= w[pair[r]];
}

// Block per (token t, column block): the token's rows ordered by (expert id, slot), summed from 0 in that order.
__global__ void moe_combine_kernel(const float* __restrict__ out, int H, const int* __restrict__ ids,
                                   const int* __restrict__ pos, int k, float* __restrict__ y) {
  __shared__ int rows[kMaxK];
  const int t = blockIdx.x, c = blockIdx.y * blockDim.x + threadIdx.x;
  if (threadIdx.x == 0) {  // insertion sort of the k slots by (id, slot)
    int key[kMaxK];
    for (int j = 0; j < k; ++j) {
      const int e = ids[size_t(t) * k + j], r = pos[size_t(t) * k + j];
      int q = j;
      while (q > 0 && key[q - 1] > e) {  // equal ids keep slot order
        key[q] = key[q - 1];
        rows[q] = rows[q - 1];
        --q;
      }
      key[q] = e;
      rows[q] = r;
    }
  }
  __syncthreads();
  if (c >= H) return;
  float s = 0.f;
  for (int j = 0; j < k; ++j)
    if (rows[j] >= 0) s += out[size_t(rows[j]) * H + c];
  y[size_t(t) * H + c] = s;
}

// A warp per row r < start[E] (grid-stride): d[pair[r]] = a[r]·b[r], lanes over the columns, a fixed shuffle tree.
__global__ void moe_row_dot_kernel(const float* __restrict__ a, const float* __restrict__ b, int H,
                                   const int* __restrict__ pair, const int* __restrict__ start, int E,
                                   float* __restrict__ d) {
  const size_t warps = size_t(gridDim.x) * blockDim.x / 32, lane = threadIdx.x % 32, rows = size_t(start[E]);
  for (size_t r = (blockIdx.x * size_t(blockDim.x) + threadIdx.x) / 32; r < rows; r += warps) {  // whole warps
    float s = 0.f;
    for (size_t c = lane; c < size_t(H); c += 32) s = fmaf(a[r * H + c], b[r * H + c], s);
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) d[pair[r]] = s;
  }
}

constexpr unsigned kColThreads = 256;
dim3 row_grid(int rows, int H) { return dim3(unsigned(rows), (unsigned(H) + kColThreads - 1) / kColThreads); }

}  // namespace

void moe_group(const int* ids, int P, int k, int E, int tile_rows, int* start, int* tile_start, int* tok, int* pair,
               int* pos, cudaStream_t st) {
  if (E <= 0 || E > 12 * 1024) throw std::invalid_argument("cuda moe: " + std::to_string(E) + " experts");
  moe_count_scan<<<1, kScanThreads, sizeof(int) * size_t(E), st>>>(ids, P, E, tile_rows, start, tile_start, pos);
  MOEDIT_CUDA_LAUNCHED();
  if (P <= 0) return;
  moe_scatter<<<unsigned(E), kScatterThreads, 0, st>>>(ids, P, k, start, tok, pair, pos);
  MOEDIT_CUDA_LAUNCHED();
}

void moe_gather(const float* a, int H, const int* tok, const int* start, int E, int P, float* xg, cudaStream_t st) {
  if (P <= 0 || H <= 0) return;
  moe_gather_kernel<<<row_grid(P, H), kColThreads, 0, st>>>(a, H, tok, start, E, xg);
  MOEDIT_CUDA_LAUNCHED();
}

void moe_scale_rows(float* out, int H, const int* pair, const float* w, const int* start, int E, int P,
                    cudaStream_t st) {
  if (P <= 0 || H <= 0) return;
  moe_scale_kernel<<<row_grid(P, H), kColThreads, 0, st>>>(out, H, pair, w, start, E);
  MOEDIT_CUDA_LAUNCHED();
}

void moe_row_dot(const float* a, const float* b, int H, const int* pair, const int* start, int E, int P, float* d,
                 cudaStream_t st) {
  if (P <= 0) return;
  moe_row_dot_kernel<<<blocks_for(size_t(P) * 32, kColThreads), kColThreads, 0, st>>>(a, b, H, pair, start, E, d);
  MOEDIT_CUDA_LAUNCHED();
}

void moe_combine(const float* out, int H, const int* ids, const int* pos, int N, int k, float* y, cudaStream_t st) {
  if (N <= 0 || H <= 0) return;
  if (k <= 0 || k > kMaxK) throw std::invalid_argument("cuda moe: top-" + std::to_string(k) + " routing");
  moe_combine_kernel<<<row_grid(N, H), kColThreads, 0, st>>>(out, H, ids, pos, k, y);
  MOEDIT_CUDA_LAUNCHED();
}

}  // namespace moedit::cuda
