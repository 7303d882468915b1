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

// A bank of E SwiGLU experts of typed weights: gate and up [I, H], down [H, I]; matrix m (0 gate, 1 up, 2 down) of
// expert e stored as type(e, m), with seed seed + 100·m + e.
struct TypedBank {
  int E, I, H;
  std::vector<TypedWeight> w;  // gate [E] ‖ up [E] ‖ down [E]
  template <class TypeOf>
  TypedBank(int E_, int I_, int H_, TypeOf type, uint64_t seed, float sd = 0.5f) : E(E_), I(I_), H(H_) {
    w.reserve(3 * size_t(E));
    for (int m = 0; m < 3; ++m)
      for (int e = 0; e < E; ++e) w.emplace_back(m < 2 ? I : H, m < 2 ? H : I, type(e, m), seed + 100 * m + e, sd);
  }
  const TypedWeight& gate(int e) const { return w[size_t(e)]; }
  const TypedWeight& up(int e) const { return w[size_t(E + e)]; }
  const TypedWeight& down(int e) const { return w[size_t(2 * E + e)]; }
  // The views in be's memory and the ExpertsView over them (views must outlive the call).
  ExpertsView on(const Backend& be, std::vector<ops::WeightView>& views) const {
    views.clear();
    for (const auto& t : w) views.push_back(t.on(be));
    return ExpertsView{E, I, H, views.data(), views.data() + E, views.data() + 2 * E};
  }
};

}  // namespace moedit::test
