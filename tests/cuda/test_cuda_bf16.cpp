// --precision bf16 on the GPU (kernels/cuda/linear_tc.cu): what the tensor-core products must compute, and what the
// whole model keeps of the fp32 answer.
//
// - Rounding, exactly: activations and weights on grids whose bf16 roundings (many of them ties) and every partial
//   sum are exact in fp32, so the result is one number whatever order or rounding the MMAs sum in: the GPU must
//   give Σ bf16(x)·bf16(w) (+ bias) bit for bit, for bf16, f16 and FP8-with-block-scales weights, both tile shapes,
//   strided rows and sub-views. Truncating instead of rounding to nearest even, or rounding one operand only, fail.
// - Random data: within in·2⁻²³·Σ|bf16(x)·bf16(w)| of the exact sum of the rounded operands (the bound of any fp32
//   summation of exact products, truncating or not); fp32 weights take the fp32 path, bit for bit.
// - Batch invariance (a row alone = the row among 100) and the MoE step: moe_experts in bf16 equals, bit for bit, the
//   same experts run one by one through the bf16 Linear (mixed types: an fp32 expert among 16- and 8-bit ones).
// - The demo model (bf16 weights) over the rewrite prompt of every bundled CounterFact record: the same top-1 token
//   as the CPU's fp32 forward on ≥ 99 % of positions (issue 22).
// Every test skips, saying so, where there is no GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>

#include "datasets/counterfact.h"
#include "kernels/half.h"
#include "model/model.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/typed_weight.h"
#include "tokenizer/tokenizer.h"

namespace moedit {
namespace {

using namespace test;  // gpu(), up(), down(), expect_near_scaled, randn, TypedWeight
using W = ops::WType;

// The GPU in bf16 for one scope (the backend outlives the test: every test leaves it in fp32).
struct Bf16Scope {
  Bf16Scope() { gpu().set_precision(Precision::bf16); }
  ~Bf16Scope() { gpu().set_precision(Precision::fp32); }
};

float round_bf16(float x) { return bf16_to_f32(f32_to_bf16(x)); }

// A weight [rows, cols] of type t whose values lie on the grid of 2⁻⁹ in [−1, 1] (FP8: E4M3 values in [1/2, 2)
// times a block scale of 129/256, a 12-bit product): their bf16 roundings are multiples of 2⁻⁹, many of them ties.
TypedWeight grid_weight(int rows, int cols, W t, uint64_t seed) {
  TypedWeight w(rows, cols, t, seed);
  std::mt19937_64 rng(seed);
  for (size_t i = 0; i < w.value.size(); ++i) {
    if (t == W::F8E4M3) {
      const uint8_t b = uint8_t((rng() & 0x80) | ((6 + rng() % 2) << 3) | (rng() & 7));
      w.bytes[i] = b;
      continue;
    }
    const float v = float(int(rng() % 1025) - 512) / 512.f;
    const uint16_t h = t == W::BF16 ? f32_to_bf16(v) : f32_to_f16(v);
    std::memcpy(w.bytes.data() + 2 * i, &h, 2);
    w.value[i] = t == W::BF16 ? bf16_to_f32(h) : f16_to_f32(h);
  }
  if (t == W::F8E4M3) {
    for (float& s : w.scales) s = 129.f / 256.f;
    for (size_t i = 0; i < w.value.size(); ++i) w.value[i] = f8e4m3_to_f32(w.bytes[i]) * (129.f / 256.f);
  }
  return w;
}

// Y = bf16(X)·bf16(W[r0.., c0..])ᵀ + bias, summed in double (rows of X ldx apart, of Y ldy apart; the gaps kept).
std::vector<float> rounded_product(const std::vector<float>& X, size_t ldx, int n, int in, const TypedWeight& w,
                                   int r0, int c0, int out, const std::vector<float>* bias, std::vector<float> Y,
                                   size_t ldy, std::vector<double>* magnitude = nullptr) {
  if (magnitude) magnitude->assign(Y.size(), 0.);
  for (int r = 0; r < n; ++r)
    for (int c = 0; c < out; ++c) {
      double s = 0, m = 0;
      for (int k = 0; k < in; ++k) {
        const double p = double(round_bf16(X[size_t(r) * ldx + size_t(k)])) *
                         double(round_bf16(w.value[size_t(r0 + c) * size_t(w.cols) + size_t(c0 + k)]));
        s += p;
        m += std::abs(p);
      }
      if (bias) s += (*bias)[size_t(c)];
      Y[size_t(r) * ldy + size_t(c)] = float(s);
      if (magnitude) (*magnitude)[size_t(r) * ldy + size_t(c)] = m;
    }
  return Y;
}

struct Shape {
  int n, in, out;
};
constexpr Shape kShapes[] = {{3, 40, 70}, {64, 40, 70}, {50, 17, 130}, {1, 33, 129}};

TEST(CudaBf16, LinearRoundsBothOperandsToNearestEvenAndSumsExactly) {
  MOEDIT_REQUIRE_GPU();
  const Bf16Scope bf16;
  for (W t : {W::BF16, W::F16, W::F8E4M3})
    for (const Shape& s : kShapes) {
      const TypedWeight big = grid_weight(s.out + 9, s.in + 13, t, uint64_t(31 + s.n));
      const size_t ldx = size_t(s.in) + 3, ldy = size_t(s.out) + 5;
      std::mt19937_64 rng(uint64_t(41 + s.in));
      std::vector<float> X(size_t(s.n) * ldx), bias(size_t(s.out));
      for (float& x : X) x = float(int(rng() % 1025) - 512) / 1024.f;  // multiples of 2⁻¹⁰ in [−1/2, 1/2]
      for (float& b : bias) b = float(int(rng() % 257) - 128) / 1024.f;
      const std::vector<float> Y0(size_t(s.n) * ldy, -1.f / 64);
      Buf dX = up(X), dbias = up(bias);
      for (bool with_bias : {true, false}) {
        const auto want = rounded_product(X, ldx, s.n, s.in, big, 6, 5, s.out, with_bias ? &bias : nullptr, Y0, ldy);
        Buf dY = up(Y0);
        gpu().linear(dX.as<float>(), ldx, s.n, s.in, big.on(gpu()).at(6, 5), s.out, dY.as<float>(), ldy,
                     with_bias ? dbias.as<float>() : nullptr);
        const auto got = down<float>(dY, Y0.size());
        size_t bad = 0, first = 0;
        for (size_t i = 0; i < got.size(); ++i)
          if (std::bit_cast<uint32_t>(got[i]) != std::bit_cast<uint32_t>(want[i]) && !bad++) first = i;
        EXPECT_EQ(bad, 0u) << "bf16 linear, " << int(t) << "-type weights, " << s.n << "x" << s.in << "x" << s.out
                           << (with_bias ? " +bias" : "") << ": first difference at " << first << ": cuda "
                           << got[first] << ", exact " << want[first];
      }
    }
}

TEST(CudaBf16, LinearOnRandomDataIsTheRoundedProductWithinFp32Summation) {
  MOEDIT_REQUIRE_GPU();
  for (W t : {W::F32, W::BF16, W::F16, W::F8E4M3})
    for (const Shape& s : {Shape{5, 300, 90}, Shape{100, 256, 129}, Shape{48, 1000, 40}}) {
      const TypedWeight w(s.out, s.in, t, uint64_t(51 + s.n));
      const auto X = randn(size_t(s.n) * s.in, uint64_t(52 + s.n)), bias = randn(size_t(s.out), 53);
      Buf dX = up(X), dbias = up(bias), dY(gpu(), sizeof(float) * size_t(s.n) * s.out);
      const ops::WeightView v = w.on(gpu());
      const std::string what = "bf16 linear, " + std::to_string(int(t)) + "-type weights, " + std::to_string(s.n) +
                               "x" + std::to_string(s.in) + "x" + std::to_string(s.out);
      if (t == W::F32) {  // fp32 weights are multiplied in fp32: the fp32 path's result, bit for bit
        gpu().linear(dX.as<float>(), size_t(s.in), s.n, s.in, v, s.out, dY.as<float>(), size_t(s.out),
                     dbias.as<float>());
        const auto fp32 = down<float>(dY, size_t(s.n) * s.out);
        const Bf16Scope bf16;
        gpu().linear(dX.as<float>(), size_t(s.in), s.n, s.in, v, s.out, dY.as<float>(), size_t(s.out),
                     dbias.as<float>());
        EXPECT_EQ(down<float>(dY, fp32.size()), fp32) << what;
        continue;
      }
      const Bf16Scope bf16;
      std::vector<double> mag;
      const auto want = rounded_product(X, size_t(s.in), s.n, s.in, w, 0, 0, s.out, &bias,
                                        std::vector<float>(size_t(s.n) * s.out), size_t(s.out), &mag);
      gpu().linear(dX.as<float>(), size_t(s.in), s.n, s.in, v, s.out, dY.as<float>(), size_t(s.out),
                   dbias.as<float>());
      const auto got = down<float>(dY, want.size());
      size_t bad = 0, first = 0;
      for (size_t i = 0; i < got.size(); ++i) {
        const double bound = double(s.in + 1) * std::ldexp(1.0, -23) * (mag[i] + std::abs(double(bias[i % s.out])));
        if (!(std::abs(double(got[i]) - double(want[i])) <= bound) && !bad++) first = i;
      }
      EXPECT_EQ(bad, 0u) << what << ": first at " << first << ": cuda " << got[first] << ", rounded product "
                         << want[first] << " (Σ|x·w| " << mag[first] << ")";
    }
}

TEST(CudaBf16, LinearIsBatchInvariant) {
  MOEDIT_REQUIRE_GPU();
  const Bf16Scope bf16;
  const int n = 100, in = 203, out = 150;
  const TypedWeight w(out, in, W::BF16, 61);
  expect_linear_batch_invariant(w.on(gpu()), out, randn(size_t(n) * in, 62), n, in);
}

// moe_experts in bf16 = each active expert's rows through the bf16 Linear (gate, up), SwiGLU, Linear (down), times
// the routing weight, summed per token in ascending expert id from 0 — bit for bit.
TEST(CudaBf16, MoeExpertsAreTheExpertsThroughTheBf16Linear) {
  MOEDIT_REQUIRE_GPU();
  const Bf16Scope bf16;
  const int E = 6, I = 64, H = 80;
  std::vector<TypedWeight> gate, upw, dn;
  for (int e = 0; e < E; ++e) {
    const W t = e == 5 ? W::F8E4M3 : e == 4 ? W::F16 : W::BF16;
    gate.emplace_back(I, H, t, uint64_t(700 + e), 0.3f);
    upw.emplace_back(I, H, t, uint64_t(720 + e), 0.3f);
    dn.emplace_back(H, I, e == 2 ? W::F32 : t, uint64_t(740 + e), 0.3f);  // expert 2's down: an edited fp32 copy
  }
  std::vector<ops::WeightView> views;
  for (const auto* bank : {&gate, &upw, &dn})
    for (const auto& t : *bank) views.push_back(t.on(gpu()));
  const ExpertsView ex{E, I, H, views.data(), views.data() + E, views.data() + 2 * E};
  for (auto [N, k] : {std::pair{300, 4}, {5, 2}, {1, 3}}) {
    std::mt19937_64 rng{uint64_t(N)};
    std::vector<int> ids;
    std::vector<float> w;
    for (int t = 0; t < N; ++t) {
      std::vector<int> perm{0, 1, 2, 3, 4, 5};
      std::shuffle(perm.begin(), perm.end(), rng);
      for (int j = 0; j < k; ++j) {
        ids.push_back(perm[size_t(j)]);
        w.push_back(0.05f + float(rng() % 950) / 1000.f);
      }
    }
    const auto a = randn(size_t(N) * H, uint64_t(N) + 1);
    Buf da = up(a), dids = up(ids), dw = up(w), dy(gpu(), sizeof(float) * size_t(N) * H);
    gpu().moe_experts(da.as<float>(), N, ex, dids.as<int>(), dw.as<float>(), k, dy.as<float>());
    const auto got = down<float>(dy, size_t(N) * H);

    std::vector<float> want(size_t(N) * H, 0.f);
    for (int e = 0; e < E; ++e) {
      std::vector<int> tok;
      std::vector<float> rows, g;
      for (int t = 0; t < N; ++t)
        for (int j = 0; j < k; ++j)
          if (ids[size_t(t) * k + j] == e) {
            tok.push_back(t);
            rows.insert(rows.end(), a.begin() + long(t) * H, a.begin() + long(t + 1) * H);
            g.push_back(w[size_t(t) * k + j]);
          }
      const int n = int(tok.size());
      if (!n) continue;
      Buf x = up(rows), gu(gpu(), sizeof(float) * n * 2 * I), key(gpu(), sizeof(float) * n * I),
          out(gpu(), sizeof(float) * n * H), dg = up(g);
      gpu().linear(x.as<float>(), H, n, H, views[size_t(e)], I, gu.as<float>(), 2 * size_t(I));
      gpu().linear(x.as<float>(), H, n, H, views[size_t(E + e)], I, gu.as<float>() + I, 2 * size_t(I));
      gpu().silu_mul(gu.as<float>(), n, I, key.as<float>());
      gpu().linear(key.as<float>(), I, n, I, views[size_t(2 * E + e)], H, out.as<float>(), H);
      gpu().scale_rows(out.as<float>(), n, H, dg.as<float>());
      const auto o = down<float>(out, size_t(n) * H);
      for (int r = 0; r < n; ++r)
        for (int h = 0; h < H; ++h) want[size_t(tok[size_t(r)]) * H + h] += o[size_t(r) * H + h];
    }
    EXPECT_EQ(got, want) << N << " tokens, top-" << k;
  }
}

// Experts held in fp32 (every expert edited, an fp32 checkpoint) run on the fp32 kernel in bf16 too: bit for bit.
TEST(CudaBf16, MoeOfFp32ExpertsIsTheFp32Path) {
  MOEDIT_REQUIRE_GPU();
  const int E = 4, I = 32, H = 48, N = 60, k = 2;
  std::vector<TypedWeight> ws;
  for (int m = 0; m < 3 * E; ++m) ws.emplace_back(m < 2 * E ? I : H, m < 2 * E ? H : I, W::F32, uint64_t(800 + m));
  std::vector<ops::WeightView> views;
  for (const auto& t : ws) views.push_back(t.on(gpu()));
  const ExpertsView ex{E, I, H, views.data(), views.data() + E, views.data() + 2 * E};
  std::vector<int> ids;
  std::vector<float> w;
  for (int t = 0; t < N; ++t) {
    ids.insert(ids.end(), {t % E, (t + 1 + t / E) % E == t % E ? (t + 2) % E : (t + 1 + t / E) % E});
    w.insert(w.end(), {0.7f, 0.3f});
  }
  const auto a = randn(size_t(N) * H, 90);
  Buf da = up(a), dids = up(ids), dw = up(w), dy(gpu(), sizeof(float) * size_t(N) * H);
  gpu().moe_experts(da.as<float>(), N, ex, dids.as<int>(), dw.as<float>(), k, dy.as<float>());
  const auto fp32 = down<float>(dy, size_t(N) * H);
  const Bf16Scope bf16;
  gpu().moe_experts(da.as<float>(), N, ex, dids.as<int>(), dw.as<float>(), k, dy.as<float>());
  EXPECT_EQ(down<float>(dy, fp32.size()), fp32);
}

TEST(CudaBf16, DemoModelKeepsTheTop1TokenOnCounterFactPrompts) {
  MOEDIT_REQUIRE_GPU();
  const std::string dir = std::string(MOEDIT_SOURCE_DIR) + "/models/moedit-demo";
  const auto m = Model::load(dir);
  const Tokenizer tok = Tokenizer::from_file(dir + "/tokenizer.json");
  std::vector<std::vector<int32_t>> seqs;
  for (const auto& r : load_counterfact(bundled_counterfact_path())) seqs.push_back(tok.encode_ids(r.rewrite_prompt()));
  size_t same = 0, positions = 0, routes_same = 0, routes = 0;
  for (size_t b = 0; b < seqs.size(); b += 64) {
    const std::vector<std::vector<int32_t>> batch(seqs.begin() + long(b),
                                                  seqs.begin() + long(std::min(seqs.size(), b + 64)));
    m->set_backend(cpu_backend());
    const ForwardOutput cpu = m->forward(batch);
    m->set_backend(gpu());
    ForwardOutput gpu_out;
    {
      const Bf16Scope bf16;
      gpu_out = m->forward(batch);
    }
    for (Eigen::Index r = 0; r < cpu.logits.rows(); ++r) {
      Eigen::Index a = 0, c = 0;
      gpu_out.logits.row(r).maxCoeff(&a);
      cpu.logits.row(r).maxCoeff(&c);
      same += a == c;
      ++positions;
    }
    for (size_t l = 0; l < cpu.routing.size(); ++l)
      for (Eigen::Index i = 0; i < cpu.routing[l].ids.size(); ++i) {
        routes_same += cpu.routing[l].ids.data()[i] == gpu_out.routing[l].ids.data()[i];
        ++routes;
      }
  }
  const double agree = double(same) / double(positions);
  EXPECT_GE(agree, 0.99) << same << " of " << positions << " positions";
  std::printf("  [bf16] bf16 vs fp32 on the demo model: top-1 token equal on %zu of %zu positions (%.2f %%); expert "
              "choices equal in %zu of %zu (token, slot, layer) entries\n",
              same, positions, 100 * agree, routes_same, routes);
}

}  // namespace
}  // namespace moedit
