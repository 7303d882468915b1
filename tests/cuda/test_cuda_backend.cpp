// The CUDA backend against the CPU backend, op by op, on random data (llama.cpp's test-backend-ops): inputs are
// uploaded, the op runs on the GPU, the result comes back and is compared with the CPU backend's on the same host
// data. Every weight dtype (f32, bf16, f16, FP8 E4M3 with block scales), strided rows (ldx/ldy beyond the width) and
// WeightView::at sub-views, every router kind, moe_experts with and without taps, attention with GQA, windows,
// Dk ≠ Dv and q_pos0 > 0, the device's memory (resident copies, the Buf pool), and solve_spd (fp64: 1e-10).
//
// Tolerances: fp32 results agree within 1e-5 × max|CPU result| of the call, element by element (the GPU sums dot
// products in another order: ≈ 1 ulp·√n apart); copies, adds, scaling, clamping, row scaling and widened rows are
// exact; routing picks EQUAL ids, and weights agree within 1e-6 relative (exp is rounded once on both sides). Each
// test skips, saying so, where there is no GPU. moe_experts lives in test_cuda_moe.cpp.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <numeric>

#include "kernels/device.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/router_kinds.h"
#include "tests/typed_weight.h"

namespace moedit {
namespace {

using namespace test;  // gpu(), up(), down(), expect_near_scaled, randn, TypedWeight

const Backend& cpu() { return cpu_backend(); }

constexpr ops::WType kTypes[] = {ops::WType::F32, ops::WType::BF16, ops::WType::F16, ops::WType::F8E4M3};
const char* type_name(ops::WType t) {
  return t == ops::WType::F32 ? "f32" : t == ops::WType::BF16 ? "bf16" : t == ops::WType::F16 ? "f16" : "fp8";
}

TEST(CudaBackend, DeviceMemoryResidentCopiesAndPool) {
  MOEDIT_REQUIRE_GPU();
  const Backend& be = gpu();
  EXPECT_FALSE(be.host_memory());
  EXPECT_EQ(be.name(), "cuda:0");
  EXPECT_EQ(&backend_named("cuda"), &be);
  EXPECT_EQ(&backend_named("cuda:0"), &be);
  EXPECT_THROW(backend_named("cuda:4096"), std::runtime_error);
  EXPECT_THROW(backend_named("gpu"), std::invalid_argument);

  // Raw memory: 256-byte aligned; a round trip through it.
  void* p = be.allocate(1000);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % 256, 0u);
  const auto x = randn(250, 1);
  std::vector<float> back(250);
  be.to_device(p, x.data(), 1000);
  be.to_host(back.data(), p, 1000);
  EXPECT_EQ(back, x);
  be.deallocate(p, 1000);

  // Resident copies: uploaded once, a range inside one served from it, forget() (anywhere inside) drops it.
  std::vector<float> host = randn(1024, 2);
  const float* d = static_cast<const float*>(be.resident(host.data(), 4096));
  EXPECT_EQ(be.resident(host.data(), 4096), d);
  EXPECT_EQ(be.resident(host.data() + 100, 400), d + 100);
  host[5] = 42.f;
  float v = 0;
  be.to_host(&v, d + 5, 4);
  EXPECT_NE(v, 42.f);  // the copy holds what was uploaded
  be.forget(host.data() + 7);
  const float* d2 = static_cast<const float*>(be.resident(host.data(), 4096));
  be.to_host(&v, d2 + 5, 4);
  EXPECT_EQ(v, 42.f);
  be.forget(host.data());

  // The Buf pool: a dropped buffer goes back to its size class and serves the next request of that class.
  void* first = nullptr;
  {
    Buf a(be, 5000);
    first = a.as<void>();
    EXPECT_EQ(reinterpret_cast<uintptr_t>(first) % 256, 0u);
  }
  const size_t cached = be.pool().cached();
  ASSERT_EQ(BufferPool::size_class(4700), BufferPool::size_class(5000));
  EXPECT_GE(cached, BufferPool::size_class(5000));
  Buf b(be, 4700);
  EXPECT_EQ(b.as<void>(), first);
  EXPECT_EQ(be.pool().cached(), cached - BufferPool::size_class(5000));
  Buf moved = std::move(b);
  EXPECT_EQ(b.as<void>(), nullptr);
  EXPECT_EQ(moved.as<void>(), first);
}

TEST(CudaBackend, ElementwiseOps) {
  MOEDIT_REQUIRE_GPU();
  const int rows = 37, cols = 53;
  const size_t ldx = 61, ldy = 70;
  const auto x = randn(rows * ldx, 3), y0 = randn(rows * ldy, 4);
  std::vector<float> yc = y0;
  cpu().copy2d(x.data(), ldx, yc.data(), ldy, rows, cols);
  Buf dx = up(x), dy = up(y0);
  gpu().copy2d(dx.as<float>(), ldx, dy.as<float>(), ldy, rows, cols);
  EXPECT_EQ(down<float>(dy, y0.size()), yc) << "copy2d (the gaps between rows untouched)";
  std::vector<int> pick;  // every third row backwards, with skipped (−1) rows between
  for (int i = rows - 1; i >= 0; i -= 3) pick.insert(pick.end(), {i, -1});
  std::vector<float> zc = y0;
  cpu().copy_rows(x.data(), ldx, pick.data(), int(pick.size()), zc.data(), ldy, cols);
  Buf dz = up(y0), dpick = up(pick);
  gpu().copy_rows(dx.as<float>(), ldx, dpick.as<int>(), int(pick.size()), dz.as<float>(), ldy, cols);
  EXPECT_EQ(down<float>(dz, y0.size()), zc) << "copy_rows (skipped rows and gaps untouched)";

  const size_t n = 10007;
  const auto a = randn(n, 5, 3.f), b = randn(n, 6);
  auto on_both = [&](const char* what, auto&& op, bool exact) {
    std::vector<float> c = a;
    op(cpu(), c.data());
    Buf d = up(a);
    op(gpu(), d.as<float>());
    if (exact) EXPECT_EQ(down<float>(d, n), c) << what;
    else expect_near_scaled(down<float>(d, n), c, 1e-6, what);
  };
  Buf db = up(b);
  on_both(
      "add", [&](const Backend& be, float* p) { be.add(p, be.host_memory() ? b.data() : db.as<float>(), n); }, true);
  on_both("scale", [&](const Backend& be, float* p) { be.scale(p, n, 0.37f); }, true);
  on_both("clamp", [&](const Backend& be, float* p) { be.clamp(p, n, 1.5f); }, true);
  on_both("sigmoid", [&](const Backend& be, float* p) { be.sigmoid(p, n); }, false);

  const auto g = randn(size_t(rows), 7);
  Buf dg = up(g);
  std::vector<float> yr = randn(size_t(rows) * cols, 8);
  Buf dyr = up(yr);
  cpu().scale_rows(yr.data(), rows, cols, g.data());
  gpu().scale_rows(dyr.as<float>(), rows, cols, dg.as<float>());
  EXPECT_EQ(down<float>(dyr, yr.size()), yr) << "scale_rows";
}

TEST(CudaBackend, GatherRowsEveryTypeAndSubview) {
  MOEDIT_REQUIRE_GPU();
  for (ops::WType t : kTypes) {
    const TypedWeight table(50, 40, t, 9);
    const std::vector<int> ids = {3, 0, 44, 3, 17, 44};
    Buf dids = up(ids);
    for (auto [r0, c0, H] : {std::tuple{0, 0, 40}, {5, 3, 29}}) {  // the whole table; rows 5.., columns 3.. of it
      std::vector<float> want(ids.size() * H);
      cpu().gather_rows(table.view.at(r0, c0), ids.data(), int(ids.size()), H, want.data());
      Buf y(gpu(), sizeof(float) * want.size());
      gpu().gather_rows(table.on(gpu()).at(r0, c0), dids.as<int>(), int(ids.size()), H, y.as<float>());
      EXPECT_EQ(down<float>(y, want.size()), want) << type_name(t) << " at (" << r0 << ", " << c0 << ")";
    }
  }
}

TEST(CudaBackend, LinearEveryTypeStridedWithSubviews) {
  MOEDIT_REQUIRE_GPU();
  for (ops::WType t : kTypes)
    for (auto [n, in, out] : {std::tuple{1, 7, 5}, {3, 64, 33}, {13, 100, 300}, {40, 256, 129}, {100, 96, 70},
                              {64, 33, 64}}) {
      // W is a sub-view: rows 6.., columns 5.. of a larger matrix (for FP8, off the 4 × 8 block grid).
      const TypedWeight big(out + 9, in + 13, t, size_t(11 + n));
      const size_t ldx = size_t(in) + 3, ldy = size_t(out) + 5;  // strided rows
      const auto X = randn(size_t(n) * ldx, 12), bias = randn(size_t(out), 13);
      const std::vector<float> Y0(size_t(n) * ldy, -1.f / 64);  // the gaps between rows must stay as they are
      Buf dX = up(X), dbias = up(bias);
      for (bool with_bias : {true, false}) {
        std::vector<float> want = Y0;
        cpu().linear(X.data(), ldx, n, in, big.view.at(6, 5), out, want.data(), ldy, with_bias ? bias.data() : nullptr);
        Buf dY = up(Y0);
        gpu().linear(dX.as<float>(), ldx, n, in, big.on(gpu()).at(6, 5), out, dY.as<float>(), ldy,
                     with_bias ? dbias.as<float>() : nullptr);
        expect_near_scaled(down<float>(dY, Y0.size()), want, 1e-5,
                           std::string("linear ") + type_name(t) + " " + std::to_string(n) + "x" + std::to_string(in) +
                               "x" + std::to_string(out) + (with_bias ? " +bias" : ""));
      }
    }
}

// Like the CPU's, the CUDA Linear computes a row the same way whatever else the call holds (tall tiles for many rows,
// short ones for few): bit for bit.
TEST(CudaBackend, LinearIsBatchInvariant) {
  MOEDIT_REQUIRE_GPU();
  const int n = 100, in = 203, out = 150;
  const TypedWeight W(out, in, ops::WType::BF16, 21);
  expect_linear_batch_invariant(W.on(gpu()), out, randn(size_t(n) * in, 22), n, in);
}

// Key statistics on the device: gram's lower triangle of Kᵀ·K in fp64 against the CPU's (partial tiles, strided rows,
// no rows, accumulation over calls), the upper triangle untouched.
TEST(CudaBackend, GramMatchesTheCpu) {
  MOEDIT_REQUIRE_GPU();
  for (auto [cols, n1, n2] : {std::tuple{70, 300, 17}, {1, 5, 0}, {33, 0, 40}, {96, 1, 64}}) {
    const size_t ld = size_t(cols) + 3;
    const auto K1 = randn(size_t(std::max(n1, 1)) * ld, 81), K2 = randn(size_t(std::max(n2, 1)) * ld, 82);
    const std::vector<double> C0(size_t(cols) * cols, -7.0);
    std::vector<double> want = C0;
    cpu().gram(K1.data(), n1, cols, ld, want.data(), false);
    cpu().gram(K2.data(), n2, cols, ld, want.data(), true);
    Buf dK1 = up(K1), dK2 = up(K2), dC = up(C0);
    gpu().gram(dK1.as<float>(), n1, cols, ld, dC.as<double>(), false);
    gpu().gram(dK2.as<float>(), n2, cols, ld, dC.as<double>(), true);
    const auto got = down<double>(dC, C0.size());
    for (int i = 0; i < cols; ++i)
      for (int j = 0; j < cols; ++j) {
        const size_t at = size_t(i) * cols + size_t(j);
        if (j > i) {
          EXPECT_EQ(got[at], -7.0) << cols << " cols: upper " << i << "," << j;
          continue;
        }
        double mag = 0;
        for (auto [K, n] : {std::pair{&K1, n1}, {&K2, n2}})
          for (int r = 0; r < n; ++r)
            mag += std::abs(double((*K)[size_t(r) * ld + size_t(i)]) * (*K)[size_t(r) * ld + size_t(j)]);
        EXPECT_NEAR(got[at], want[at], 1e-14 * mag) << cols << " cols: " << i << "," << j;
      }
  }
}

// solve_spd (cuSOLVER's potrf/potrs, or the host where the machine has no cuSOLVER: the test says which) against the
// CPU's Cholesky: one and several right-hand sides, a size beyond one panel; an indefinite matrix is refused.
TEST(CudaBackend, SolveSpdMatchesTheCpu) {
  MOEDIT_REQUIRE_GPU();
  std::printf("solve_spd runs on %s\n", cuda_solver().c_str());
  for (auto [n, m] : {std::pair{1, 1}, {37, 1}, {600, 4}}) {
    const auto [A, B] = random_spd_system(n, m, 92 + uint64_t(n));
    const std::optional<Eigen::MatrixXd> want = solve_spd(cpu(), A, B), got = solve_spd(gpu(), A, B);
    ASSERT_TRUE(want && got) << n;
    EXPECT_LE((*got - *want).norm(), 1e-10 * want->norm()) << n;
  }
  Eigen::MatrixXd indefinite = Eigen::MatrixXd::Identity(40, 40), b = Eigen::MatrixXd::Ones(40, 2);
  indefinite(20, 20) = -1;
  EXPECT_FALSE(solve_spd(gpu(), indefinite, b));
}

TEST(CudaBackend, RmsNormRopeSiluMul) {
  MOEDIT_REQUIRE_GPU();
  {  // RMSNorm in place (x and y alias), rows longer than a block
    const int rows = 7, dim = 300;
    auto x = randn(size_t(rows) * dim, 31);
    const auto w = randn(size_t(dim), 32);
    Buf dx = up(x), dw = up(w);
    cpu().rmsnorm(x.data(), w.data(), x.data(), rows, dim, 1e-6f);
    gpu().rmsnorm(dx.as<float>(), dw.as<float>(), dx.as<float>(), rows, dim, 1e-6f);
    expect_near_scaled(down<float>(dx, x.size()), x, 1e-5, "rmsnorm");
  }
  {  // RoPE: 3 heads of 16 dims with 4 floats after them in each row, rotary dims 10, large positions, scaled
    const int rows = 5, H = 3, D = 16, row_stride = H * D + 4, rot = 10;
    std::vector<float> inv_freq(size_t(rot / 2));
    for (int i = 0; i < rot / 2; ++i) inv_freq[size_t(i)] = float(std::pow(10000.0, -2.0 * i / rot));
    const std::vector<int> pos = {0, 1, 7, 100, 4095};
    auto x = randn(size_t(rows) * row_stride, 33);
    Buf dx = up(x), dpos = up(pos), dfreq = up(inv_freq);
    cpu().rope(x.data(), rows, row_stride, H, D, rot, pos.data(), inv_freq.data(), 1.3f);
    gpu().rope(dx.as<float>(), rows, row_stride, H, D, rot, dpos.as<int>(), dfreq.as<float>(), 1.3f);
    expect_near_scaled(down<float>(dx, x.size()), x, 1e-5, "rope");
  }
  {  // SwiGLU
    const int rows = 9, I = 300;
    const auto gu = randn(size_t(rows) * 2 * I, 34, 2.f);
    std::vector<float> key(size_t(rows) * I);
    cpu().silu_mul(gu.data(), rows, I, key.data());
    Buf dgu = up(gu), dkey(gpu(), sizeof(float) * key.size());
    gpu().silu_mul(dgu.as<float>(), rows, I, dkey.as<float>());
    expect_near_scaled(down<float>(dkey, key.size()), key, 1e-5, "silu_mul");
  }
}

TEST(CudaBackend, AttentionGqaWindowMlaAndOffset) {
  MOEDIT_REQUIRE_GPU();
  for (const AttnCase& c : attention_cases()) {
    const auto& s = c.s;
    const int qs = s.Hq * s.Dk + 3, ks = s.Hkv * s.Dk + 1, vs = s.Hkv * s.Dv + 2, os = s.Hq * s.Dv + 5;
    const auto q = randn(size_t(c.n_q) * qs, 41), k = randn(size_t(c.n_k) * ks, 42), v = randn(size_t(c.n_k) * vs, 43);
    std::vector<float> want(size_t(c.n_q) * os, -1.f / 64);  // the gaps between rows must stay as they are
    Buf dq = up(q), dk = up(k), dv = up(v), dout = up(want);
    cpu().attention(q.data(), c.n_q, qs, c.q_pos0, k.data(), ks, v.data(), vs, c.n_k, s, want.data(), os);
    gpu().attention(dq.as<float>(), c.n_q, qs, c.q_pos0, dk.as<float>(), ks, dv.as<float>(), vs, c.n_k, s,
                    dout.as<float>(), os);
    expect_near_scaled(down<float>(dout, want.size()), want, 1e-5, std::string("attention: ") + c.name);
  }
}

TEST(CudaBackend, RouteEveryRouterKind) {
  MOEDIT_REQUIRE_GPU();
  const int N = 300;
  for (const auto& [name, sp, with_bias] : router_kinds()) {
    const auto z = randn(size_t(N) * sp.E, 51, 2.f), bias = randn(size_t(sp.E), 52, 0.3f);
    std::vector<int> ids(size_t(N) * sp.k);
    std::vector<float> w(ids.size());
    cpu().route(z.data(), N, sp, with_bias ? bias.data() : nullptr, ids.data(), w.data());
    Buf dz = up(z), dbias = up(bias), dids(gpu(), sizeof(int) * ids.size()), dw(gpu(), sizeof(float) * w.size());
    gpu().route(dz.as<float>(), N, sp, with_bias ? dbias.as<float>() : nullptr, dids.as<int>(), dw.as<float>());
    const auto gids = down<int>(dids, ids.size());
    const auto gw = down<float>(dw, w.size());
    for (size_t i = 0; i < ids.size(); ++i) {
      ASSERT_EQ(gids[i], ids[i]) << name << ": token " << i / size_t(sp.k) << " slot " << i % size_t(sp.k);
      ASSERT_LE(std::abs(double(gw[i]) - w[i]), 1e-6 * std::abs(double(w[i])) + 1e-12)
          << name << ": token " << i / size_t(sp.k) << " slot " << i % size_t(sp.k) << " cuda " << gw[i] << " cpu "
          << w[i];
    }
  }
}

}  // namespace
}  // namespace moedit
