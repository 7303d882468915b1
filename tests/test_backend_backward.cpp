// The backward ops of the backend seam (kernels/backend.h) against the gradient ops of kernels/grad_ops.h run in
// double (those are checked against central finite differences in tests/test_backward.cpp): linear_backward in every
// weight dtype with strided rows, sub-views and accumulation; rmsnorm_backward and silu_mul_backward; attention_backward
// with GQA, a sliding window, Dk ≠ Dv, a query offset and strided rows; route_backward for every router kind;
// moe_experts_backward (mixed weight dtypes,
// an unchosen expert, accumulation) against the experts' forward and backward composed in double; RoPE's backward as
// the forward at negated positions; clamp's and a sigmoid gate's backward, fill. Tolerances: fp32 sums against the double result, scaled by the magnitude of the terms or of the result.
// tests/cuda/test_cuda_backend.cpp holds the CUDA backend's ops to the CPU's.
#include <gtest/gtest.h>

#include <cmath>

#include "kernels/backend.h"
#include "kernels/grad_ops.h"
#include "tests/router_kinds.h"
#include "tests/typed_weight.h"
#include "test_util.h"

namespace moedit {
namespace {

using test::randn;
using test::TypedWeight;

constexpr ops::WType kTypes[] = {ops::WType::F32, ops::WType::BF16, ops::WType::F16, ops::WType::F8E4M3};

std::vector<double> wide(const std::vector<float>& x) { return {x.begin(), x.end()}; }

// Every element of got within tol·max|want| of want.
void expect_near_scaled(const std::vector<float>& got, const std::vector<double>& want, double tol,
                        const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double scale = 0;
  for (double x : want) scale = std::max(scale, std::abs(x));
  ASSERT_GT(scale, 0) << what << ": an all-zero result would make the check vacuous";
  for (size_t i = 0; i < got.size(); ++i)
    ASSERT_NEAR(got[i], want[i], tol * scale) << what << " element " << i;
}

// dX (+)= dY·W: rows of dY, dX strided, W a sub-view (rows from 1, columns from 2) or the whole matrix.
TEST(BackendBackward, LinearBackwardEveryTypeStridedSubviewsAccumulate) {
  const Backend& be = cpu_backend();
  for (ops::WType t : kTypes)
    for (auto [n, out, in] : {std::tuple{1, 5, 7}, {3, 33, 64}, {13, 300, 100}, {50, 129, 256}})
      for (bool sub : {false, true})
        for (bool acc : {false, true}) {
          const int r0 = sub ? 1 : 0, c0 = sub ? 2 : 0;
          const TypedWeight W(out + r0 + 1, in + c0 + 3 * int(sub), t, 41);
          const ops::WeightView view = sub ? W.view.at(r0, c0) : W.view;
          const size_t lddy = size_t(out) + 3, lddx = size_t(in) + 5;
          const auto dY = randn(size_t(n) * lddy, 42);
          auto dX = randn(size_t(n) * lddx, 43);
          const auto before = dX;
          be.linear_backward(dY.data(), lddy, n, out, view, in, dX.data(), lddx, acc);
          for (int r = 0; r < n; ++r) {
            for (int c = 0; c < in; ++c) {
              double want = acc ? before[size_t(r) * lddx + c] : 0.0, mag = std::abs(want);
              for (int o = 0; o < out; ++o) {
                const double p = double(dY[size_t(r) * lddy + o]) * W.value[size_t(o + r0) * W.cols + c + c0];
                want += p;
                mag += std::abs(p);
              }
              ASSERT_NEAR(dX[size_t(r) * lddx + c], want, (out + 2) * 6e-8 * mag + 1e-30)
                  << int(t) << " " << n << "x" << out << "x" << in << " sub " << sub << " acc " << acc;
            }
            for (size_t c = size_t(in); c < lddx; ++c) ASSERT_EQ(dX[size_t(r) * lddx + c], before[size_t(r) * lddx + c]);
          }
        }
}

TEST(BackendBackward, RmsNormAndSiluMul) {
  const Backend& be = cpu_backend();
  const int rows = 5, dim = 48, I = 9;
  const auto x = randn(size_t(rows) * dim, 51), w = randn(size_t(dim), 52), dy = randn(size_t(rows) * dim, 53);
  for (bool acc : {false, true}) {
    auto dx = randn(size_t(rows) * dim, 54);
    auto want = wide(dx);
    const auto xd = wide(x), dyd = wide(dy);
    be.rmsnorm_backward(x.data(), w.data(), dy.data(), dx.data(), rows, dim, 1e-6f, acc);
    grad::rmsnorm_backward(xd.data(), w.data(), dyd.data(), want.data(), rows, dim, 1e-6f, acc);
    expect_near_scaled(dx, want, 1e-6, acc ? "rmsnorm_backward +=" : "rmsnorm_backward");
  }
  const auto gu = randn(size_t(rows) * 2 * I, 55, 2.f), dk = randn(size_t(rows) * I, 56);
  std::vector<float> dgu(gu.size());
  std::vector<double> want(gu.size());
  be.silu_mul_backward(gu.data(), dk.data(), rows, I, dgu.data());
  grad::swiglu_backward(wide(gu).data(), wide(dk).data(), rows, I, want.data());
  expect_near_scaled(dgu, want, 1e-6, "silu_mul_backward");
}

TEST(BackendBackward, AttentionGqaWindowMlaShapesAndOffset) {
  const Backend& be = cpu_backend();
  for (int window : {0, 3}) {
    const ops::AttnShape s{4, 2, 8, 6, 0.3f, window};
    const int n_k = 9, n_q = 4, p0 = n_k - n_q;
    const int qs = s.Hq * s.Dk + 3, ks = s.Hkv * s.Dk + 1, vs = s.Hkv * s.Dv + 2, os = s.Hq * s.Dv + 4;
    const auto q = randn(size_t(n_q) * qs, 61), k = randn(size_t(n_k) * ks, 62), v = randn(size_t(n_k) * vs, 63);
    const auto dout = randn(size_t(n_q) * os, 64);
    std::vector<float> dq(size_t(n_q) * qs, 0.f);
    auto dk = randn(size_t(n_k) * ks, 65), dv = randn(size_t(n_k) * vs, 66);
    auto wdk = wide(dk), wdv = wide(dv);
    std::vector<double> wdq(dq.size(), 0.0), probs(size_t(s.Hq) * n_q * n_k), out(size_t(n_q) * s.Hq * s.Dv);
    be.attention_backward(q.data(), n_q, qs, p0, k.data(), ks, v.data(), vs, n_k, s, dout.data(), os, dq.data(),
                          dk.data(), dv.data());
    const auto qd = wide(q), kd = wide(k), vd = wide(v), dod = wide(dout);
    grad::attention(qd.data(), n_q, qs, p0, kd.data(), ks, vd.data(), vs, n_k, s, out.data(), s.Hq * s.Dv,
                    probs.data());
    grad::attention_backward(qd.data(), n_q, qs, kd.data(), ks, vd.data(), vs, n_k, s, probs.data(), dod.data(), os,
                             wdq.data(), wdk.data(), wdv.data());
    const std::string w = " window " + std::to_string(window);
    expect_near_scaled(dq, wdq, 1e-5, "dq" + w);
    expect_near_scaled(dk, wdk, 1e-5, "dk" + w);
    expect_near_scaled(dv, wdv, 1e-5, "dv" + w);
  }
}

// route_backward for every router kind against route_row_backward in double, the selection the forward made.
TEST(BackendBackward, RouteBackwardEveryRouterKind) {
  const int N = 37;
  for (const auto& [name, sp, with_bias] : test::router_kinds()) {
    const auto z = randn(size_t(N) * sp.E, 91, 2.f), bias = randn(size_t(sp.E), 92, 0.3f);
    const auto dw = randn(size_t(N) * sp.k, 93);
    std::vector<int> ids(size_t(N) * sp.k);
    std::vector<float> w(ids.size()), dz(size_t(N) * sp.E, -7.f);
    cpu_backend().route(z.data(), N, sp, with_bias ? bias.data() : nullptr, ids.data(), w.data());
    cpu_backend().route_backward(z.data(), N, sp, ids.data(), dw.data(), dz.data());
    std::vector<double> want(dz.size());
    const auto zd = wide(z), dwd = wide(dw);
    for (int t = 0; t < N; ++t)
      ops::route_row_backward(sp, zd.data() + size_t(t) * sp.E, ids.data() + size_t(t) * sp.k,
                              dwd.data() + size_t(t) * sp.k, want.data() + size_t(t) * sp.E);
    expect_near_scaled(dz, want, 1e-5, "route_backward " + name);
  }
}

// moe_experts_backward against each (token, slot) pair's expert run forward and backward in double: da = Σ_j w·Jᵀdy,
// dw = dy·E(a). Experts of every dtype in one bank, expert 5 never chosen, ties of one expert in two slots excluded.
TEST(BackendBackward, MoeExpertsBackwardIsTheExpertsGradient) {
  const Backend& be = cpu_backend();
  const int E = 6, I = 20, H = 24, N = 11, k = 2;
  const test::TypedBank bank(E, I, H, [](int e, int) { return kTypes[e % 4]; }, 100);
  std::vector<ops::WeightView> views;
  const ExpertsView ex = bank.on(be, views);
  const auto a = randn(size_t(N) * H, 81), dy = randn(size_t(N) * H, 82), w = randn(size_t(N) * k, 83);
  std::vector<int> ids(size_t(N) * k);
  for (int t = 0; t < N; ++t) {  // two distinct experts of 0..4 per token
    ids[size_t(t * k)] = (3 * t) % 5;
    ids[size_t(t * k + 1)] = (3 * t + 1 + t % 4) % 5;
  }
  // The reference in double.
  std::vector<double> want_da(size_t(N) * H, 0.0), want_dw(size_t(N) * k);
  for (int t = 0; t < N; ++t)
    for (int j = 0; j < k; ++j) {
      const int e = ids[size_t(t * k + j)];
      const auto x = wide(std::vector<float>(a.begin() + t * H, a.begin() + (t + 1) * H));
      const auto d = wide(std::vector<float>(dy.begin() + t * H, dy.begin() + (t + 1) * H));
      const size_t Iz = static_cast<size_t>(I), Hz = static_cast<size_t>(H);
      std::vector<double> gu(2 * Iz), key(Iz), y(Hz), dyw(Hz), dkey(Iz), dgu(2 * Iz), dx(Hz, 0.0);
      const auto &G = bank.gate(e).value, &U = bank.up(e).value, &D = bank.down(e).value;
      grad::linear(x.data(), 1, H, G.data(), I, gu.data());
      grad::linear(x.data(), 1, H, U.data(), I, gu.data() + I);
      grad::swiglu(gu.data(), 1, I, key.data());
      grad::linear(key.data(), 1, I, D.data(), H, y.data());
      double s = 0;
      for (int h = 0; h < H; ++h) {
        s += d[size_t(h)] * y[size_t(h)];
        dyw[size_t(h)] = double(w[size_t(t * k + j)]) * d[size_t(h)];
      }
      want_dw[size_t(t * k + j)] = s;
      grad::linear_backward(dyw.data(), 1, I, D.data(), H, dkey.data(), false);
      grad::swiglu_backward(gu.data(), dkey.data(), 1, I, dgu.data());
      grad::linear_backward(dgu.data(), 1, H, G.data(), I, dx.data(), true);
      grad::linear_backward(dgu.data() + I, 1, H, U.data(), I, dx.data(), true);
      for (int h = 0; h < H; ++h) want_da[size_t(t) * H + h] += dx[size_t(h)];
    }
  for (bool acc : {false, true}) {
    auto da = randn(size_t(N) * H, 84);
    std::vector<float> dw(size_t(N) * k, -7.f);
    std::vector<double> want = want_da;
    if (acc)
      for (size_t i = 0; i < da.size(); ++i) want[i] += da[i];
    be.moe_experts_backward(a.data(), N, ex, ids.data(), w.data(), k, dy.data(), da.data(), dw.data(), acc);
    expect_near_scaled(da, want, 1e-5, acc ? "da +=" : "da");
    expect_near_scaled(dw, want_dw, 1e-5, "dw");
  }
}

// The transposed rotation is the rotation at −pos: on the CPU bit for bit grad::rope's transpose in fp32.
TEST(BackendBackward, RopeAtNegatedPositionsIsTheTransposedRotation) {
  const int rows = 4, H = 3, D = 8, rot = 6;
  std::vector<float> inv_freq(size_t(rot / 2));
  for (int i = 0; i < rot / 2; ++i) inv_freq[size_t(i)] = float(std::pow(10000.0, -2.0 * i / rot));
  const std::vector<int> pos = {0, 3, 17, 1000}, neg = {0, -3, -17, -1000};
  const auto x = randn(size_t(rows) * H * D, 71);
  auto got = x, want = x;
  cpu_backend().rope(got.data(), rows, H * D, H, D, rot, neg.data(), inv_freq.data(), 1.25f);
  grad::rope(want.data(), rows, H * D, H, D, rot, pos.data(), inv_freq.data(), true, 1.25f);
  EXPECT_EQ(got, want);
  EXPECT_NE(got, x);
}

// clamp's backward zeroes the gradient where x lies outside [−c, c] (the bounds themselves pass); the sigmoid gate's
// backward against the formula in double; fill.
TEST(BackendBackward, ClampSigmoidGateAndFill) {
  const Backend& be = cpu_backend();
  std::vector<float> x = randn(1000, 81, 2.f), dx = randn(1000, 82);
  x[0] = 0.9f, x[1] = -0.9f, x[2] = 0.90001f;
  std::vector<float> got = dx;
  be.clamp_backward(got.data(), x.data(), got.size(), 0.9f);
  for (size_t i = 0; i < x.size(); ++i) EXPECT_EQ(got[i], std::abs(x[i]) <= 0.9f ? dx[i] : 0.f) << i;
  EXPECT_EQ(got[0], dx[0]);
  EXPECT_EQ(got[2], 0.f);

  const int rows = 7, cols = 300;
  const auto dy = randn(size_t(rows) * cols, 83), y = randn(size_t(rows) * cols, 84), s = randn(size_t(rows), 85);
  std::vector<float> g(static_cast<size_t>(rows)), ds(static_cast<size_t>(rows));
  std::vector<double> want(static_cast<size_t>(rows));
  for (int r = 0; r < rows; ++r) {
    g[size_t(r)] = 1.f / (1.f + std::exp(-s[size_t(r)]));
    double dot = 0;
    for (int c = 0; c < cols; ++c) dot += double(dy[size_t(r) * cols + c]) * y[size_t(r) * cols + c];
    want[size_t(r)] = dot * g[size_t(r)] * (1.0 - g[size_t(r)]);
  }
  be.sigmoid_gate_backward(dy.data(), y.data(), g.data(), rows, cols, ds.data());
  expect_near_scaled(ds, want, 1e-5, "sigmoid_gate_backward");

  std::vector<float> f(33, 1.f);
  be.fill(f.data() + 1, 31, -2.5f);
  EXPECT_EQ(f.front(), 1.f);
  EXPECT_EQ(f.back(), 1.f);
  for (size_t i = 1; i < 32; ++i) EXPECT_EQ(f[i], -2.5f);
}

}  // namespace
}  // namespace moedit
