// Narrow float formats ↔ fp32: bf16 and f16 (both widen exactly), FP8 E4M3 (widens exactly), and the rounding
// conversions back (round to nearest even). Used by the weight loader, the checkpoint writer and the kernels that
// widen typed weights in registers.
#pragma once
#include <cstdint>

namespace moedit {

float bf16_to_f32(uint16_t v);
float f16_to_f32(uint16_t v);
uint16_t f32_to_bf16(float f);
uint16_t f32_to_f16(float f);
float f8e4m3_to_f32(uint8_t v);

}  // namespace moedit
