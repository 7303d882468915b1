// The CUDA backend's backward ops against the CPU backend's (which tests/test_backend_backward.cpp holds to the
// gradient ops in double): linear_backward in every weight dtype with strided rows, FP8 sub-views off the block grid,
// accumulation and both tile shapes; rmsnorm_backward (rows longer than a block, dx aliasing dy); silu_mul_backward;
// attention_backward on the forward test's shapes (GQA, windows, Dk ≠ Dv, q_pos0 > 0, 300 keys, one decoded query, a
// query that sees no key; strided rows); route_backward for every router kind; RoPE at negated positions (its
// backward); clamp's and a sigmoid gate's backward, fill. Tolerance: 1e-5 × max|CPU result|, element by element (fp32 sums in another order), as the forward
// ops'. The precision setting does not reach the backward ops: bf16 gives the same bits. Each test skips, saying so,
// where there is no GPU.
#include <gtest/gtest.h>

#include <cmath>

#include "tests/cuda/cuda_test_util.h"
#include "tests/router_kinds.h"
#include "tests/typed_weight.h"

namespace moedit {
namespace {

using namespace test;  // gpu(), up(), down(), expect_near_scaled, randn, TypedWeight

const Backend& cpu() { return cpu_backend(); }

constexpr ops::WType kTypes[] = {ops::WType::F32, ops::WType::BF16, ops::WType::F16, ops::WType::F8E4M3};

TEST(CudaBackward, LinearBackwardEveryTypeStridedSubviewsAccumulate) {
  MOEDIT_REQUIRE_GPU();
  for (ops::WType t : kTypes)
    for (auto [n, out, in] : {std::tuple{1, 5, 7}, {3, 64, 33}, {13, 300, 100}, {50, 129, 256}, {100, 70, 96}})
      for (bool acc : {false, true}) {
        const TypedWeight big(out + 9, in + 13, t, size_t(17 + n));  // W: rows 6.., columns 5.. (off FP8's grid)
        const size_t lddy = size_t(out) + 3, lddx = size_t(in) + 5;
        const auto dY = randn(size_t(n) * lddy, 18);
        std::vector<float> want = randn(size_t(n) * lddx, 19);
        Buf ddY = up(dY), ddX = up(want);
        cpu().linear_backward(dY.data(), lddy, n, out, big.view.at(6, 5), in, want.data(), lddx, acc);
        gpu().linear_backward(ddY.as<float>(), lddy, n, out, big.on(gpu()).at(6, 5), in, ddX.as<float>(), lddx, acc);
        expect_near_scaled(down<float>(ddX, want.size()), want, 1e-5,
                           "linear_backward " + std::to_string(int(t)) + " " + std::to_string(n) + "x" +
                               std::to_string(out) + "x" + std::to_string(in) + (acc ? " +=" : ""));
      }
}

// The backward ops are fp32 whatever the precision: with bf16 set, the same bits as with fp32.
TEST(CudaBackward, LinearBackwardIgnoresThePrecision) {
  MOEDIT_REQUIRE_GPU();
  const int n = 60, out = 90, in = 70;
  const TypedWeight W(out, in, ops::WType::BF16, 23);
  const auto dY = randn(size_t(n) * out, 24);
  Buf ddY = up(dY), a(gpu(), sizeof(float) * size_t(n) * in), b(gpu(), sizeof(float) * size_t(n) * in);
  gpu().linear_backward(ddY.as<float>(), size_t(out), n, out, W.on(gpu()), in, a.as<float>(), size_t(in), false);
  gpu().set_precision(Precision::bf16);
  gpu().linear_backward(ddY.as<float>(), size_t(out), n, out, W.on(gpu()), in, b.as<float>(), size_t(in), false);
  gpu().set_precision(Precision::fp32);
  EXPECT_EQ(down<float>(a, size_t(n) * in), down<float>(b, size_t(n) * in));
}

TEST(CudaBackward, RmsNormSiluMulAndRope) {
  MOEDIT_REQUIRE_GPU();
  for (bool acc : {false, true}) {  // rows longer than a block; dx aliases dy
    const int rows = 7, dim = 300;
    const auto x = randn(size_t(rows) * dim, 31), w = randn(size_t(dim), 32);
    auto dy = randn(size_t(rows) * dim, 33);
    Buf dx_ = up(x), dw = up(w), ddy = up(dy);
    cpu().rmsnorm_backward(x.data(), w.data(), dy.data(), dy.data(), rows, dim, 1e-6f, acc);
    gpu().rmsnorm_backward(dx_.as<float>(), dw.as<float>(), ddy.as<float>(), ddy.as<float>(), rows, dim, 1e-6f, acc);
    expect_near_scaled(down<float>(ddy, dy.size()), dy, 1e-5, acc ? "rmsnorm_backward +=" : "rmsnorm_backward");
  }
  {
    const int rows = 9, I = 300;
    const auto gu = randn(size_t(rows) * 2 * I, 34, 2.f), dk = randn(size_t(rows) * I, 35);
    std::vector<float> want(gu.size());
    cpu().silu_mul_backward(gu.data(), dk.data(), rows, I, want.data());
    Buf dgu = up(gu), ddk = up(dk), dout(gpu(), sizeof(float) * want.size());
    gpu().silu_mul_backward(dgu.as<float>(), ddk.as<float>(), rows, I, dout.as<float>());
    expect_near_scaled(down<float>(dout, want.size()), want, 1e-5, "silu_mul_backward");
  }
  {  // RoPE's backward: the forward at negated positions
    const int rows = 5, H = 3, D = 16, row_stride = H * D + 4, rot = 10;
    std::vector<float> inv_freq(size_t(rot / 2));
    for (int i = 0; i < rot / 2; ++i) inv_freq[size_t(i)] = float(std::pow(10000.0, -2.0 * i / rot));
    const std::vector<int> neg = {0, -1, -7, -100, -4095};
    auto x = randn(size_t(rows) * row_stride, 36);
    Buf dx = up(x), dpos = up(neg), dfreq = up(inv_freq);
    cpu().rope(x.data(), rows, row_stride, H, D, rot, neg.data(), inv_freq.data(), 1.3f);
    gpu().rope(dx.as<float>(), rows, row_stride, H, D, rot, dpos.as<int>(), dfreq.as<float>(), 1.3f);
    expect_near_scaled(down<float>(dx, x.size()), x, 1e-5, "rope at negated positions");
  }
}

// clamp's backward and fill: the same bits as the CPU; the sigmoid gate's backward (a warp per row) within 1e-5.
TEST(CudaBackward, ClampSigmoidGateAndFill) {
  MOEDIT_REQUIRE_GPU();
  std::vector<float> x = randn(5000, 91, 2.f), dx = randn(5000, 92);
  x[0] = 0.9f, x[1] = -0.9f, x[2] = 0.90001f;
  Buf gx = up(x), gdx = up(dx);
  cpu().clamp_backward(dx.data(), x.data(), dx.size(), 0.9f);
  gpu().clamp_backward(gdx.as<float>(), gx.as<float>(), dx.size(), 0.9f);
  EXPECT_EQ(down<float>(gdx, dx.size()), dx);

  for (auto [rows, cols] : {std::pair{1, 1}, {7, 300}, {300, 33}}) {
    const auto dy = randn(size_t(rows) * cols, 93), y = randn(size_t(rows) * cols, 94);
    std::vector<float> g = randn(size_t(rows), 95), want(static_cast<size_t>(rows));
    for (float& v : g) v = 1.f / (1.f + std::exp(-v));
    cpu().sigmoid_gate_backward(dy.data(), y.data(), g.data(), rows, cols, want.data());
    Buf gdy = up(dy), gy = up(y), gg = up(g), gds(gpu(), sizeof(float) * size_t(rows));
    gpu().sigmoid_gate_backward(gdy.as<float>(), gy.as<float>(), gg.as<float>(), rows, cols, gds.as<float>());
    expect_near_scaled(down<float>(gds, size_t(rows)), want, 1e-5, "sigmoid_gate_backward " + std::to_string(rows));
  }

  std::vector<float> f(3000, 1.f);
  Buf gf = up(f);
  cpu().fill(f.data() + 1, 2998, -2.5f);
  gpu().fill(gf.as<float>() + 1, 2998, -2.5f);
  EXPECT_EQ(down<float>(gf, f.size()), f);
}

TEST(CudaBackward, RouteBackwardEveryRouterKind) {
  MOEDIT_REQUIRE_GPU();
  const int N = 300;
  for (const auto& [name, sp, with_bias] : router_kinds()) {
    const auto z = randn(size_t(N) * sp.E, 51, 2.f), bias = randn(size_t(sp.E), 52, 0.3f);
    const auto dw = randn(size_t(N) * sp.k, 53);
    std::vector<int> ids(size_t(N) * sp.k);
    std::vector<float> w(ids.size()), want(size_t(N) * sp.E);
    cpu().route(z.data(), N, sp, with_bias ? bias.data() : nullptr, ids.data(), w.data());
    cpu().route_backward(z.data(), N, sp, ids.data(), dw.data(), want.data());
    Buf gz = up(z), gids = up(ids), gdw = up(dw), gdz(gpu(), sizeof(float) * want.size());
    gpu().route_backward(gz.as<float>(), N, sp, gids.as<int>(), gdw.as<float>(), gdz.as<float>());
    expect_near_scaled(down<float>(gdz, want.size()), want, 1e-5, "route_backward " + name);
  }
}

TEST(CudaBackward, AttentionGqaWindowMlaAndOffset) {
  MOEDIT_REQUIRE_GPU();
  for (const AttnCase& c : attention_cases()) {
    const auto& s = c.s;
    const int qs = s.Hq * s.Dk + 3, ks = s.Hkv * s.Dk + 1, vs = s.Hkv * s.Dv + 2, os = s.Hq * s.Dv + 5;
    const auto q = randn(size_t(c.n_q) * qs, 41), k = randn(size_t(c.n_k) * ks, 42), v = randn(size_t(c.n_k) * vs, 43);
    const auto dout = randn(size_t(c.n_q) * os, 44);
    std::vector<float> dq = randn(size_t(c.n_q) * qs, 45), dk = randn(size_t(c.n_k) * ks, 46),
                       dv = randn(size_t(c.n_k) * vs, 47);
    Buf gq = up(q), gk = up(k), gv = up(v), gdout = up(dout), gdq = up(dq), gdk = up(dk), gdv = up(dv);
    cpu().attention_backward(q.data(), c.n_q, qs, c.q_pos0, k.data(), ks, v.data(), vs, c.n_k, s, dout.data(), os,
                             dq.data(), dk.data(), dv.data());
    gpu().attention_backward(gq.as<float>(), c.n_q, qs, c.q_pos0, gk.as<float>(), ks, gv.as<float>(), vs, c.n_k, s,
                             gdout.as<float>(), os, gdq.as<float>(), gdk.as<float>(), gdv.as<float>());
    const std::string what = std::string("attention_backward: ") + c.name;
    // dq is written for the rows' head columns only: the gaps keep their values on both sides.
    expect_near_scaled(down<float>(gdq, dq.size()), dq, 1e-5, what + " dq");
    expect_near_scaled(down<float>(gdk, dk.size()), dk, 1e-5, what + " dk");
    expect_near_scaled(down<float>(gdv, dv.size()), dv, 1e-5, what + " dv");
  }
}

}  // namespace
}  // namespace moedit
