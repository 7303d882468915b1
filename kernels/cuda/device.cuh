// Device helpers shared by the .cu files: widening typed weight elements (exactly as kernels/half.cpp and
// kernels/cpu/fp8.cpp do on the host) and the transcendental functions, evaluated in double and rounded once to
// fp32 so that they agree with the host's libm (expf, cosf, sinf are all but correctly rounded) nearly bit for bit
// — routing then picks the same experts as the CPU, and softmax weights agree to an ulp or two.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kernels/cuda/launch.h"

namespace moedit::cuda {

__device__ __forceinline__ float bf16_bits(uint16_t v) { return __uint_as_float(uint32_t(v) << 16); }

// IEEE half → fp32 (exact), as f16_to_f32: subnormals renormalised, inf/NaN kept.
__device__ __forceinline__ float f16_bits(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    if (mant == 0) return __uint_as_float(sign);
    return (sign ? -1.f : 1.f) * float(mant) * 5.9604644775390625e-8f;  // mant·2⁻²⁴, exact
  }
  if (exp == 31) return __uint_as_float(sign | 0x7f800000u | mant << 13);
  return __uint_as_float(sign | (exp + 112u) << 23 | mant << 13);
}

// FP8 E4M3 → fp32 (exact), as f8e4m3_to_f32: S.EEEE.MMM, bias 7, no infinities, 0x7f/0xff NaN.
__device__ __forceinline__ float f8_bits(uint8_t v) {
  const uint32_t sign = uint32_t(v & 0x80u) << 24, exp = (v >> 3) & 0xfu, mant = v & 0x7u;
  if (exp == 0xf && mant == 0x7) return __uint_as_float(0x7fc00000u);
  if (exp == 0) return (sign ? -1.f : 1.f) * float(mant) * 0.001953125f;  // mant/8 · 2⁻⁶, exact
  return __uint_as_float(sign | (exp + 120u) << 23 | mant << 20);
}

// f(std::integral_constant<int, T>{}) for the weight kind T = type, so that kernels and launches take T as a template
// argument (f uses decltype(t)::value) and one switch serves them all.
// (Host and device: launches call it with host lambdas, kernels with device ones; nv_exec_check_disable lets each
// instantiation call what its side may.)
#pragma nv_exec_check_disable
template <class F>
__host__ __device__ __forceinline__ void with_wkind(int32_t type, F&& f) {
  switch (type) {
    case kF32: f(std::integral_constant<int, kF32>{}); break;
    case kBF16: f(std::integral_constant<int, kBF16>{}); break;
    case kF16: f(std::integral_constant<int, kF16>{}); break;
    default: f(std::integral_constant<int, kF8>{}); break;
  }
}

// Element (r, c) of W widened to fp32; T is the weight kind (a template argument, so the switch folds away).
template <int T>
__device__ __forceinline__ float widen(const DevWeight& W, int64_t r, int64_t c) {
  const size_t i = size_t(r) * W.ld + size_t(c);
  if constexpr (T == kF32) {
    return __ldg(static_cast<const float*>(W.data) + i);
  } else if constexpr (T == kBF16) {
    return bf16_bits(__ldg(static_cast<const unsigned short*>(W.data) + i));
  } else if constexpr (T == kF16) {
    return f16_bits(__ldg(static_cast<const unsigned short*>(W.data) + i));
  } else {
    const float s = __ldg(W.scales + size_t((W.r0 + r) / W.br) * W.sld + size_t((W.c0 + c) / W.bc));
    return f8_bits(__ldg(static_cast<const unsigned char*>(W.data) + i)) * s;
  }
}

// fp32 → bf16 bits, round to nearest even (NaN stays a quiet NaN), as f32_to_bf16 (kernels/half.cpp).
__device__ __forceinline__ uint16_t bf16_round(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// The group of row tile `tile` in a grouped product (launch.h, grouped_linear): e (−1 past the last tile), its first
// row s0, its rows n and the tile's first row within the group. Empty groups share their successor's tile_start.
struct TileGroup {
  int e, s0, n, row0;
};
__device__ __forceinline__ TileGroup tile_group(int tile, const int* __restrict__ start,
                                                const int* __restrict__ tile_start, int E, int tile_rows) {
  if (tile >= tile_start[E]) return {-1, 0, 0, 0};
  int lo = 0, hi = E;  // the last e with tile_start[e] ≤ tile
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (tile_start[mid] <= tile) lo = mid;
    else hi = mid;
  }
  return {lo, start[lo], start[lo + 1] - start[lo], (tile - tile_start[lo]) * tile_rows};
}

// The sum (max) of v over the block, every thread gets it: a shuffle tree per warp, then the warps in order (a fixed
// order: deterministic). sh: 32 floats of shared memory; every thread of the block must call it.
template <bool Max = false>
__device__ __forceinline__ float block_reduce(float v, float* sh) {
  for (int o = 16; o > 0; o >>= 1) {
    const float u = __shfl_xor_sync(0xffffffffu, v, o);
    v = Max ? fmaxf(v, u) : v + u;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = (blockDim.x + 31) / 32;
  __syncthreads();  // sh may still be read by an earlier call
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  float s = sh[0];
  for (int w = 1; w < nw; ++w) s = Max ? fmaxf(s, sh[w]) : s + sh[w];
  return s;
}
__device__ __forceinline__ float block_sum(float v, float* sh) { return block_reduce<false>(v, sh); }

// exp, sigmoid, cos, sin of an fp32 argument: the double result rounded once.
__device__ __forceinline__ float exp_ref(float x) { return float(exp(double(x))); }
__device__ __forceinline__ float sigmoid_ref(float x) { return 1.f / (1.f + exp_ref(-x)); }

// Launch geometry: blocks for n items of `per` each, capped for grid-stride loops.
inline unsigned blocks_for(size_t n, unsigned per, unsigned cap = 65535u * 4u) {
  const size_t b = (n + per - 1) / per;
  return unsigned(b < 1 ? 1 : b > cap ? cap : b);
}

}  // namespace moedit::cuda
