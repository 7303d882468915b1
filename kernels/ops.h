// Compute kernels: the one op interface the model layer calls. CPU implementations live in kernels/cpu/ (Eigen +
// OpenMP); CUDA ones will sit beside them in kernels/cuda/. Nothing here knows about models.
//
// Conventions: activations are row-major float matrices [rows, features]; Linear weights are row-major
// [out_features, in_features] and y = x·Wᵀ (+ b), as in PyTorch's nn.Linear.
#pragma once
#include <Eigen/Core>
#include <cstdint>
#include <vector>

namespace moedit {

using MatR = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using VecF = Eigen::VectorXf;
using MapMatR = Eigen::Map<MatR>;
using CMapMatR = Eigen::Map<const MatR>;

namespace ops {

// Batch invariance: every op computes a row's (a token's) result by the same sequence of float operations whatever
// the other rows of the call, its row's address, the tile covering it or the thread count — a sequence's logits are
// bit for bit the same alone, in a batch, or decoded through a KV cache, and a prefix-cached causal trace equals the
// naive one. Keep it so: no vectorised reductions or transcendentals whose rounding depends on alignment or size.

// Number of OpenMP threads ops may use (default: all). Ops called inside a parallel region run serially.
int num_threads();
void set_num_threads(int n);

// Storage type of a weight matrix that linear() reads in place. bf16 and f16 are widened to fp32 in registers; both
// conversions are exact, so a product with bf16 weights is bit for bit the product with those weights widened first.
// FP8 E4M3 carries block scales (DeepSeek-V3's weight_scale_inv): element (r, c) is fp8(W[r, c]) · scale[r / br,
// c / bc] rounded once to fp32 — the value a dequantised copy holds, so products equal those of the copy bit for bit.
enum class WType : uint8_t { F32, BF16, F16, F8E4M3 };
size_t wtype_size(WType t);

// Block scales of an FP8 weight: scale [ceil(rows/br), ceil(cols/bc)] fp32, ld floats between rows; (r0, c0) is
// where the view starts in the scaled matrix (a view of rows r0.. and columns c0.. of it keeps the block grid).
struct BlockScales {
  const float* data = nullptr;
  size_t ld = 0;
  int32_t br = 0, bc = 0;
  int64_t r0 = 0, c0 = 0;
  float at(int64_t r, int64_t c) const { return data[size_t((r0 + r) / br) * ld + size_t((c0 + c) / bc)]; }
};

// A row-major weight matrix read in place (a view into a mapped checkpoint or an fp32 buffer): row c starts at
// element c·ld of data. Elements are naturally aligned (2 bytes for bf16/f16, 4 for f32).
struct WeightView {
  const void* data = nullptr;
  WType type = WType::F32;
  size_t ld = 0;        // elements between rows
  BlockScales scales;   // FP8 only
  WeightView() = default;
  WeightView(const float* p, size_t ld_) : data(p), type(WType::F32), ld(ld_) {}
  WeightView(const void* p, WType t, size_t ld_) : data(p), type(t), ld(ld_) {}
  WeightView(const void* p, WType t, size_t ld_, BlockScales s) : data(p), type(t), ld(ld_), scales(s) {}
  // The view starting at row r and column c.
  WeightView at(int64_t r, int64_t c = 0) const {
    WeightView v{static_cast<const uint8_t*>(data) + (size_t(r) * ld + size_t(c)) * wtype_size(type), type, ld, scales};
    v.scales.r0 += r;
    v.scales.c0 += c;
    return v;
  }
};
// Element (r, c) of W, widened to fp32; widen_row writes n elements of row r from column c0.
float widen(const WeightView& W, int64_t r, int64_t c);
void widen_row(const WeightView& W, int64_t r, int64_t c0, int64_t n, float* out);

// Y[n, out] = X[n, in] · W[out, in]ᵀ (+ bias[out]). Parallel over output-column blocks when the product is large.
// Each element: eight FMA lane sums over k ≡ l (mod 8) in order of k, a fixed reduction tree, the k tail, the bias —
// the same sequence for every weight type (weights are widened as they are loaded).
void linear(const float* X, int n, int in, const float* W, int out, float* Y, const float* bias = nullptr);
// The same on strided rows and typed weights: row r of X at X + r·ldx, row c of W at W.ld elements apart, row r of Y
// at Y + r·ldy (column slices of larger matrices, read in place).
void linear(const float* X, size_t ldx, int n, int in, const WeightView& W, int out, float* Y, size_t ldy,
            const float* bias = nullptr);
inline void linear(const float* X, size_t ldx, int n, int in, const float* W, size_t ldw, int out, float* Y,
                   size_t ldy, const float* bias = nullptr) {
  linear(X, ldx, n, in, WeightView(W, ldw), out, Y, ldy, bias);
}

// y = w ⊙ (x · rsqrt(mean(x²) + eps)) for each of `rows` rows of length dim (x and y may alias).
void rmsnorm(const float* x, const float* w, float* y, int rows, int dim, float eps);

// RoPE, rotate-half (NeoX) layout, in place: for each row r (a token) and each of n_heads heads (head h starts at
// x + r*row_stride + h*head_stride), rotates dims [0, rot_dim) with pairs (i, i + rot_dim/2) by angle
// pos[r]·inv_freq[i]; cos/sin scaled by attn_scaling.
void rope_neox(float* x, int rows, int row_stride, int n_heads, int head_stride, int rot_dim, const int* pos,
               const float* inv_freq, float attn_scaling = 1.f);

// Numerically stable softmax over n entries in place (entries equal to -inf get probability 0).
void softmax_inplace(float* x, int n);

// out[r, i] = silu(gu[r, i]) * gu[r, I + i] for a [rows, 2I] gate‖up block.
void silu_mul(const float* gu, int rows, int I, float* out);

// Causal attention for one sequence. q: [n_q, q_stride] with query head h at column h*Dk; query row i sits at
// absolute position q_pos0 + i. k: [n_k, k_stride] (key head g at g*Dk), v: [n_k, v_stride] (g*Dv); key j is at
// position j. Query head h uses kv head h / (Hq/Hkv). Key j is visible to query at position p iff j <= p and
// (window <= 0 or p - window < j). Scores = q·k·scale (linear's dot products), softmax in fp32, out[i, h*Dv ...] =
// P·v summed over keys in order.
struct AttnShape {
  int Hq, Hkv, Dk, Dv;
  float scale;
  int window;  // 0 = none
};
void attention(const float* q, int n_q, int q_stride, int q_pos0, const float* k, int k_stride, const float* v,
               int v_stride, int n_k, const AttnShape& s, float* out, int out_stride);

// Indices of the k largest values of x[0..n) in descending order; ties: lower index first.
void topk(const float* x, int n, int k, int* idx);

inline float silu(float x) { return x / (1.f + std::exp(-x)); }
inline float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }

}  // namespace ops
}  // namespace moedit
