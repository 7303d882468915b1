// Host EMULATION of cuda_bf16.h for tests/cuda/emu/run.sh: the bf16 type as its bits (never on a real build's path).
#pragma once
#include <cstdint>
struct __nv_bfloat16 {
  uint16_t bits;
};
