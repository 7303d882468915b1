// FP8 E4M3 weights with block scales: dequantised a block of rows at a time, never as a whole copy.
#include "kernels/cpu/fp8.h"

#include <omp.h>

#include <algorithm>
#include <vector>

#include "kernels/half.h"

namespace moedit::ops {

void widen_row_f8(const WeightView& W, int64_t r, int64_t c0, int64_t n, float* out) {
  const uint8_t* p = static_cast<const uint8_t*>(W.data) + size_t(r) * W.ld + size_t(c0);
  const int64_t bc = W.scales.bc, first = W.scales.c0 + c0;  // column of the scaled matrix
  for (int64_t i = 0; i < n;) {
    const int64_t end = std::min(n, i + bc - (first + i) % bc);  // to the end of this scale block
    const float s = W.scales.at(r, c0 + i);
    for (; i < end; ++i) out[i] = f8e4m3_to_f32(p[i]) * s;
  }
}

void linear_f8(const float* X, size_t ldx, int n, int in, const WeightView& W, int out, float* Y, size_t ldy,
               const float* bias) {
  // Rows per block: about 1 MiB of fp32 — small enough to stay in cache, large enough that the fp32 kernel splits it
  // across threads when n is large.
  const int rows = std::max(1, int((1 << 18) / std::max(in, 1)));
  thread_local std::vector<float> scratch;
  scratch.resize(size_t(std::min(rows, out)) * size_t(in));
  for (int c0 = 0; c0 < out; c0 += rows) {
    const int nc = std::min(rows, out - c0);
    for (int c = 0; c < nc; ++c) widen_row_f8(W, c0 + c, 0, in, scratch.data() + size_t(c) * in);
    linear(X, ldx, n, in, WeightView(scratch.data(), size_t(in)), nc, Y + c0, ldy, bias ? bias + c0 : nullptr);
  }
}

}  // namespace moedit::ops
