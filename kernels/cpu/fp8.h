// FP8 E4M3 weights with block scales (kernels/ops.h WType::F8E4M3), for ops.cpp: widening and Linear.
#pragma once
#include "kernels/ops.h"

namespace moedit::ops {

// n elements of row r of W from column c0, dequantised: fp8 · block scale, one fp32 rounding.
void widen_row_f8(const WeightView& W, int64_t r, int64_t c0, int64_t n, float* out);

// linear() for FP8 weights: blocks of W's rows are dequantised into per-thread scratch and run through the fp32
// kernel. Columns are independent in that kernel (a column's sequence of operations does not depend on which block
// it is in), so the result equals linear() on a dequantised copy of W bit for bit, without ever holding one.
void linear_f8(const float* X, size_t ldx, int n, int in, const WeightView& W, int out, float* Y, size_t ldy,
               const float* bias);

}  // namespace moedit::ops
