// Host EMULATION of the WMMA API (mma.h) for tests/cuda/emu/run.sh (never on a real build's include path). A
// fragment's layout across the warp is opaque, so every emulated thread holds the whole 16 × 16 tile: loads read all
// of it, mma_sync computes all of it (each element c + Σ_k a·b in order of k, in fp32: bf16 products are exact), and
// stores write it from lane 0 only (the other lanes' copies are equal).
#pragma once
#include <bit>
#include <cstdint>

#include "cuda_bf16.h"
#include "cuda_runtime.h"

namespace nvcuda::wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulation has the m16n16k16 shape only");
  float v[16 * 16];  // (row, column) of the tile at v[row·16 + column]; A is M × K, B is K × N
};

inline float bf16_value(__nv_bfloat16 b) { return std::bit_cast<float>(uint32_t(b.bits) << 16); }

template <class T>
void fill_fragment(fragment<accumulator, 16, 16, 16, T>& f, T x) {
  for (float& e : f.v) e = float(x);
}
inline void load_matrix_sync(fragment<matrix_a, 16, 16, 16, __nv_bfloat16, row_major>& f, const __nv_bfloat16* p,
                             unsigned ldm) {
  for (int i = 0; i < 16; ++i)
    for (int k = 0; k < 16; ++k) f.v[i * 16 + k] = bf16_value(p[size_t(i) * ldm + size_t(k)]);
}
inline void load_matrix_sync(fragment<matrix_b, 16, 16, 16, __nv_bfloat16, col_major>& f, const __nv_bfloat16* p,
                             unsigned ldm) {
  for (int k = 0; k < 16; ++k)
    for (int j = 0; j < 16; ++j) f.v[k * 16 + j] = bf16_value(p[size_t(j) * ldm + size_t(k)]);
}
template <class LA, class LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, __nv_bfloat16, LA>& a,
              const fragment<matrix_b, 16, 16, 16, __nv_bfloat16, LB>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  float r[16 * 16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.v[i * 16 + j];
      for (int k = 0; k < 16; ++k) s += a.v[i * 16 + k] * b.v[k * 16 + j];
      r[i * 16 + j] = s;
    }
  for (int e = 0; e < 256; ++e) d.v[e] = r[e];
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t l) {
  if (::emu::linear_tid() % 32 != 0) return;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j)
      (l == mem_row_major ? p[size_t(i) * ldm + size_t(j)] : p[size_t(j) * ldm + size_t(i)]) = f.v[i * 16 + j];
}
}  // namespace nvcuda::wmma
