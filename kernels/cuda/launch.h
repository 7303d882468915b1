// The kernels of the CUDA backend, as plain host functions that enqueue work on a stream (kernels/cuda/*.cu). Only
// plain types cross this header, so the .cu files never see Eigen or backend.h; CudaBackend (backend.cpp) converts
// the seam's types (ops::WeightView, ops::RouteSpec, ops::AttnShape) into these. Every pointer is device memory
// unless a comment says otherwise; shapes are [rows, columns] of row-major float matrices. Every launcher checks its
// launch (check.h) and returns without waiting for the kernel.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace moedit::cuda {

// A typed weight matrix read in place (ops::WeightView): element (r, c) at data + (r·ld + c)·size, widened to fp32
// in registers; FP8 E4M3 times its block scale scales[((r0 + r)/br)·sld + (c0 + c)/bc], one fp32 rounding.
enum WKind : int32_t { kF32 = 0, kBF16 = 1, kF16 = 2, kF8 = 3 };  // the order of ops::WType
struct DevWeight {
  const void* data = nullptr;
  size_t ld = 0;
  const float* scales = nullptr;  // FP8 only
  size_t sld = 0;
  int64_t r0 = 0, c0 = 0;
  int32_t br = 1, bc = 1;
  int32_t type = kF32;
};

// ---- elementwise.cu -------------------------------------------------------------------------------------------
void copy2d(const float* x, size_t ldx, float* y, size_t ldy, int rows, int cols, cudaStream_t st);
void copy_rows(const float* x, size_t ldx, const int* rows, int n, float* y, size_t ldy, int cols, cudaStream_t st);
void add(float* y, const float* x, size_t n, cudaStream_t st);
void scale(float* x, size_t n, float s, cudaStream_t st);
void clamp(float* x, size_t n, float c, cudaStream_t st);
void sigmoid(float* x, size_t n, cudaStream_t st);
void scale_rows(float* y, int rows, int cols, const float* g, cudaStream_t st);
void fill(float* x, size_t n, float v, cudaStream_t st);
// dx[i] = 0 where x[i] lies outside [−c, c] (clamp's backward).
void clamp_backward(float* dx, const float* x, size_t n, float c, cudaStream_t st);
// ds[r] = (Σ_c dy[r, c]·y[r, c])·g[r]·(1 − g[r]) (a sigmoid row gate's backward): a warp per row.
void sigmoid_gate_backward(const float* dy, const float* y, const float* g, int rows, int cols, float* ds,
                           cudaStream_t st);
void gather_rows(const DevWeight& table, const int* ids, int n, int H, float* y, cudaStream_t st);
void silu_mul(const float* gu, int rows, int I, float* key, cudaStream_t st);
void rmsnorm(const float* x, const float* w, float* y, int rows, int dim, float eps, cudaStream_t st);
void rope_neox(float* x, int rows, int row_stride, int n_heads, int head_stride, int rot_dim, const int* pos,
               const float* inv_freq, float attn_scaling, cudaStream_t st);

// ---- linear.cu ------------------------------------------------------------------------------------------------
// Y[n, out] = X[n, in]·Wᵀ (+ bias[out]); rows of X and Y ldx, ldy floats apart.
void linear(const float* X, size_t ldx, int n, int in, const DevWeight& W, int out, float* Y, size_t ldy,
            const float* bias, cudaStream_t st);
// The rows a grouped product tiles by, for P rows over E groups (many rows per group: tall tiles).
int grouped_tile_rows(int P, int E);
// Group e (rows start[e] .. start[e+1] of X and Y): Y[rows, out] = X[rows, in]·W[e]ᵀ, for every group in one launch.
// W [E] descriptors and start [E+1], tile_start [E+1] (prefix sums of ceil(rows/tile_rows)) in device memory;
// max_tiles bounds tile_start[E] (the grid's height).
// f32_only: only the groups whose weights are fp32 (grouped_linear_bf16 takes the others).
void grouped_linear(const float* X, size_t ldx, int in, const DevWeight* W, int out, float* Y, size_t ldy,
                    const int* start, const int* tile_start, int E, int tile_rows, int max_tiles, cudaStream_t st,
                    bool f32_only = false);

// dX[n, in] (= or += when accumulate) dY[n, out]·W for W [out, in]: the backward of linear's X, fp32 in either
// precision (the same tiles and per-element fmaf order).
void linear_backward(const float* dY, size_t lddy, int n, int out, const DevWeight& W, int in, float* dX,
                     size_t lddx, bool accumulate, cudaStream_t st);

// Group e: dX[rows, in] (= or +=) dY[rows, out]·W[e] (W[e] [out, in]); the grouping as grouped_linear's. fp32.
void grouped_linear_backward(const float* dY, size_t lddy, int out, const DevWeight* W, int in, float* dX,
                             size_t lddx, const int* start, const int* tile_start, int E, int tile_rows,
                             int max_tiles, bool accumulate, cudaStream_t st);

// ---- linear_tc.cu: --precision bf16 -----------------------------------------------------------------------------
// As linear and grouped_linear for weights stored in 16 or 8 bits (not fp32), on tensor cores: X and W rounded to
// bf16 (nearest even), products exact, fp32 sums; bias added in fp32. grouped_linear_bf16 skips fp32 groups.
void linear_bf16(const float* X, size_t ldx, int n, int in, const DevWeight& W, int out, float* Y, size_t ldy,
                 const float* bias, cudaStream_t st);
void grouped_linear_bf16(const float* X, size_t ldx, int in, const DevWeight* W, int out, float* Y, size_t ldy,
                         const int* start, const int* tile_start, int E, int tile_rows, int max_tiles,
                         cudaStream_t st);

// ---- gram.cu ----------------------------------------------------------------------------------------------------
// C [cols, cols] (fp64) = (accumulate ? C : 0) + Kᵀ·K for K [n, cols] (rows ld floats apart); lower triangle only.
void gram(const float* K, int n, int cols, size_t ld, double* C, bool accumulate, cudaStream_t st);

// ---- attention.cu ---------------------------------------------------------------------------------------------
struct DevAttn {
  int Hq, Hkv, Dk, Dv;
  float scale;
  int window;
};
void attention(const float* q, int n_q, int q_stride, int q_pos0, const float* k, int k_stride, const float* v,
               int v_stride, int n_k, const DevAttn& s, float* out, int out_stride, cudaStream_t st);

// ---- backward.cu: the backward ops (Backend's), fp32 ------------------------------------------------------------
// dx (= or +=) of rmsnorm from dy (dx may alias dy); dgu [rows, 2I] of silu_mul from dkey [rows, I].
void rmsnorm_backward(const float* x, const float* w, const float* dy, float* dx, int rows, int dim, float eps,
                      bool accumulate, cudaStream_t st);
void silu_mul_backward(const float* gu, const float* dkey, int rows, int I, float* dgu, cudaStream_t st);
// dq (=), dk and dv (+=) of attention from dout; scratch: attention_backward_scratch(n_q, n_k, s) floats.
size_t attention_backward_scratch(int n_q, int n_k, const DevAttn& s);
void attention_backward(const float* q, int n_q, int q_stride, int q_pos0, const float* k, int k_stride,
                        const float* v, int v_stride, int n_k, const DevAttn& s, const float* dout, int dout_stride,
                        float* dq, float* dk, float* dv, float* scratch, cudaStream_t st);

// ---- route.cu -------------------------------------------------------------------------------------------------
// ops::RouteSpec as plain data (renorm_eps already rounded to fp32, as route_row<float> adds it).
struct DevRoute {
  int32_t score = 0;   // 0 softmax, 1 sigmoid, 2 top-k then softmax
  int32_t groups = 0;  // 0 none, 1 max score, 2 top-two sum
  int32_t E = 0, k = 0, n_group = 1, topk_group = 1;
  int32_t renorm = 0, scale = 0;
  float renorm_eps = 0.f, scaling = 1.f;
};
// ids [N, k], w [N, k] from z [N, E]; bias [E] or null; scratch: 2·N·E + N·n_group floats.
void route(const float* z, int N, const DevRoute& s, const float* bias, int* ids, float* w, float* scratch,
           cudaStream_t st);

// dz [N, E] from dw [N, k] for the ids route chose (route_row_backward<float>); scratch: 2·N·E floats.
void route_backward(const float* z, int N, const DevRoute& s, const int* ids, const float* dw, float* dz,
                    float* scratch, cudaStream_t st);

// ---- moe.cu ---------------------------------------------------------------------------------------------------
// Groups the P = N·k (token, slot) pairs ids [P] by expert, stably (pairs ascending within an expert): start [E+1],
// tile_start [E+1] (row tiles of tile_rows), and for row r of the grouped order tok[r] (its token), pair[r] (its
// pair); pos [P] is the row of each pair (−1 for an id outside [0, E), which then contributes nothing).
void moe_group(const int* ids, int P, int k, int E, int tile_rows, int* start, int* tile_start, int* tok, int* pair,
               int* pos, cudaStream_t st);
// xg[r, :H] = a[tok[r], :H] for the grouped rows r < start[E] (of at most P).
void moe_gather(const float* a, int H, const int* tok, const int* start, int E, int P, float* xg, cudaStream_t st);
// out[r, :H] *= w[pair[r]] for the rows r < start[E].
void moe_scale_rows(float* out, int H, const int* pair, const float* w, const int* start, int E, int P,
                    cudaStream_t st);
// d[pair[r]] = Σ_c a[r, c]·b[r, c] over H columns (a fixed order) for the rows r < start[E]; pairs with no row keep d.
void moe_row_dot(const float* a, const float* b, int H, const int* pair, const int* start, int E, int P, float* d,
                 cudaStream_t st);
// y[t, :H] = Σ out[pos[t·k + j], :H] over the slots j of token t in ascending (expert id, slot), from 0.
void moe_combine(const float* out, int H, const int* ids, const int* pos, int N, int k, float* y, cudaStream_t st);

}  // namespace moedit::cuda
