// A random weight matrix stored as each type linear() reads (f32, bf16, f16, FP8 E4M3 with 4 × 8 block scales), the
// values it widens to, and its view in a backend's memory — for the op tests of every backend.
#pragma once
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/backend.h"
#include "kernels/half.h"
#include "tests/test_util.h"

namespace moedit::test {

struct TypedWeight {
  int rows = 0, cols = 0;
  ops::WType type = ops::WType::F32;
  std::vector<uint8_t> bytes;   // the stored elements, row-major [rows, cols]
  std::vector<float> scales;    // FP8: [ceil(rows/4), ceil(cols/8)]
  std::vector<float> value;     // what each element widens to [rows, cols]
  ops::WeightView view;         // host memory

  TypedWeight(int rows_, int cols_, ops::WType t, uint64_t seed, float sd = 0.5f)
      : rows(rows_), cols(cols_), type(t) {
    value = randn(size_t(rows) * cols, seed, sd);
    bytes.resize(value.size() * ops::wtype_size(t));
    if (t == ops::WType::F8E4M3) {  // random E4M3 values in [1/8, 4) of either sign, block scales around 1/4
      std::mt19937_64 rng(seed);
      const int br = 4, bc = 8, sr = (rows + br - 1) / br, sc = (cols + bc - 1) / bc;
      scales.resize(size_t(sr) * sc);
      for (auto& x : scales) x = 0.125f + float(rng() % 1000) / 4000.f;
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c) {
          const uint8_t b = uint8_t((rng() & 0x80) | ((4 + rng() % 5) << 3) | (rng() & 7));
          bytes[size_t(r) * cols + c] = b;
          value[size_t(r) * cols + c] = f8e4m3_to_f32(b) * scales[size_t(r / br) * sc + size_t(c / bc)];
        }
      view = ops::WeightView(bytes.data(), t, size_t(cols), {scales.data(), size_t(sc), br, bc, 0, 0});
      return;
    }
    for (size_t i = 0; i < value.size(); ++i) {
      if (t == ops::WType::F32) {
        std::memcpy(bytes.data() + 4 * i, &value[i], 4);
        continue;
      }
      const uint16_t h = t == ops::WType::BF16 ? f32_to_bf16(value[i]) : f32_to_f16(value[i]);
      value[i] = t == ops::WType::BF16 ? bf16_to_f32(h) : f16_to_f32(h);
      std::memcpy(bytes.data() + 2 * i, &h, 2);
    }
    view = ops::WeightView(bytes.data(), t, size_t(cols));
  }
  TypedWeight(TypedWeight&&) = default;
  TypedWeight(const TypedWeight&) = delete;
  TypedWeight& operator=(const TypedWeight&) = delete;
  ~TypedWeight() {
    if (uploaded_) {  // the host buffers go: a later allocation at the same address must not find this copy
      uploaded_->forget(bytes.data());
      if (!scales.empty()) uploaded_->forget(scales.data());
    }
  }

  // The view in be's memory (resident copies of the elements and the scales; the host view on the CPU).
  ops::WeightView on(const Backend& be) const {
    if (be.host_memory()) return view;
    uploaded_ = &be;
    ops::WeightView v = view;
    v.data = be.resident(bytes.data(), bytes.size());
    if (!scales.empty())
      v.scales.data = static_cast<const float*>(be.resident(scales.data(), sizeof(float) * scales.size()));
    return v;
  }

 private:
  mutable const Backend* uploaded_ = nullptr;
};

}  // namespace moedit::test
