// Device helpers shared by the .cu files: widening typed weight elements (exactly as kernels/half.cpp and
// kernels/cpu/fp8.cpp do on the host) and the transcendental functions, evaluated in double and rounded once to
// fp32 so that they agree with the host's libm (expf, cosf, sinf are all but correctly rounded) nearly bit for bit
// — routing then picks the same experts as the CPU, and softmax weights agree to an ulp or two.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

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

// exp, sigmoid, cos, sin of an fp32 argument: the double result rounded once.
__device__ __forceinline__ float exp_ref(float x) { return float(exp(double(x))); }
__device__ __forceinline__ float sigmoid_ref(float x) { return 1.f / (1.f + exp_ref(-x)); }

// Launch geometry: blocks for n items of `per` each, capped for grid-stride loops.
inline unsigned blocks_for(size_t n, unsigned per, unsigned cap = 65535u * 4u) {
  const size_t b = (n + per - 1) / per;
  return unsigned(b < 1 ? 1 : b > cap ? cap : b);
}

}  // namespace moedit::cuda
