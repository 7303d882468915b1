// Every op of every backend against a scalar reference in double, in every weight dtype (the model is llama.cpp's
// test-backend-ops): linear, rmsnorm, rope, attention, silu_mul, route (every router kind) and moe_experts (with
// taps that read and change keys and outputs). Tolerances are error bounds scaled to the magnitude of the terms;
// the CPU backend's batch invariance is checked bit for bit. A CUDA backend, when built and a GPU is present, joins
// the list and is held to the same references.
#include <gtest/gtest.h>

#include <Eigen/Cholesky>
#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "kernels/backend.h"
#include "kernels/half.h"
#include "tests/typed_weight.h"
#include "test_util.h"

namespace moedit {
namespace {

std::vector<const Backend*> backends() { return {&cpu_backend()}; }

using test::randn;

using test::TypedWeight;  // tests/typed_weight.h

constexpr ops::WType kTypes[] = {ops::WType::F32, ops::WType::BF16, ops::WType::F16, ops::WType::F8E4M3};
const char* type_name(ops::WType t) {
  return t == ops::WType::F32 ? "f32" : t == ops::WType::BF16 ? "bf16" : t == ops::WType::F16 ? "f16" : "fp8";
}

// |fp32 sum of n products − exact| ≤ γ·Σ|terms| with γ = n·2⁻²⁴ (any order; FMA only tightens it), plus slack.
double dot_bound(int n, double abs_sum) { return (n + 2) * 6e-8 * abs_sum + 1e-30; }

TEST(BackendOps, Linear) {
  for (const Backend* be : backends())
    for (ops::WType t : kTypes)
      for (auto [n, in, out] : {std::tuple{1, 7, 5}, {3, 64, 33}, {13, 100, 300}, {40, 256, 129}}) {
        const TypedWeight W(out, in, t, 11);
        const size_t ldx = size_t(in) + 3, ldy = size_t(out) + 5;  // strided rows
        const auto X = randn(size_t(n) * ldx, 12), b = randn(size_t(out), 13);
        std::vector<float> Y(size_t(n) * ldy, -7.f);
        be->linear(X.data(), ldx, n, in, W.view, out, Y.data(), ldy, b.data());
        for (int r = 0; r < n; ++r)
          for (int c = 0; c < out; ++c) {
            double ref = b[size_t(c)], mag = std::abs(b[size_t(c)]);
            for (int i = 0; i < in; ++i) {
              const double p = double(X[size_t(r) * ldx + i]) * W.value[size_t(c) * in + i];
              ref += p;
              mag += std::abs(p);
            }
            ASSERT_NEAR(Y[size_t(r) * ldy + c], ref, dot_bound(in + 1, mag))
                << be->name() << " " << type_name(t) << " " << n << "x" << in << "x" << out;
          }
        for (int r = 0; r < n; ++r)  // the gaps between strided rows are untouched
          for (size_t c = size_t(out); c < ldy; ++c) ASSERT_EQ(Y[size_t(r) * ldy + c], -7.f);
      }
}

TEST(BackendOps, RmsNormRopeSiluMul) {
  for (const Backend* be : backends()) {
    const int rows = 5, dim = 48;
    const auto x = randn(size_t(rows) * dim, 21), w = randn(size_t(dim), 22);
    std::vector<float> y(x.size());
    be->rmsnorm(x.data(), w.data(), y.data(), rows, dim, 1e-6f);
    for (int r = 0; r < rows; ++r) {
      double ss = 0;
      for (int i = 0; i < dim; ++i) ss += double(x[size_t(r * dim + i)]) * x[size_t(r * dim + i)];
      const double inv = 1.0 / std::sqrt(ss / dim + 1e-6);
      for (int i = 0; i < dim; ++i)
        ASSERT_NEAR(y[size_t(r * dim + i)], w[size_t(i)] * x[size_t(r * dim + i)] * inv,
                    2e-6 * std::abs(w[size_t(i)] * x[size_t(r * dim + i)] * inv) + 1e-7);
    }

    // RoPE: 2 heads of 8 dims, rotary dims 6 (pairs (i, i + 3)), positions 0, 3, 17.
    const int H = 2, D = 8, rot = 6;
    std::vector<float> inv_freq(size_t(rot / 2));
    for (int i = 0; i < rot / 2; ++i) inv_freq[size_t(i)] = float(std::pow(10000.0, -2.0 * i / rot));
    const std::vector<int> pos = {0, 3, 17};
    auto q = randn(size_t(3) * H * D, 23);
    const auto q0 = q;
    be->rope(q.data(), 3, H * D, H, D, rot, pos.data(), inv_freq.data(), 1.5f);
    for (int r = 0; r < 3; ++r)
      for (int h = 0; h < H; ++h) {
        const float* a = q0.data() + size_t(r * H * D + h * D);
        const float* b = q.data() + size_t(r * H * D + h * D);
        for (int i = 0; i < rot / 2; ++i) {
          const double ang = double(pos[size_t(r)]) * inv_freq[size_t(i)];
          const double c = std::cos(ang) * 1.5, s = std::sin(ang) * 1.5;
          ASSERT_NEAR(b[i], a[i] * c - a[i + rot / 2] * s, 1e-4);
          ASSERT_NEAR(b[i + rot / 2], a[i + rot / 2] * c + a[i] * s, 1e-4);
        }
        for (int i = rot; i < D; ++i) ASSERT_EQ(b[i], a[i]);  // beyond the rotary dims: untouched
      }

    const int I = 9;
    const auto gu = randn(size_t(rows) * 2 * I, 24);
    std::vector<float> key(size_t(rows) * I);
    be->silu_mul(gu.data(), rows, I, key.data());
    for (int r = 0; r < rows; ++r)
      for (int i = 0; i < I; ++i) {
        const double g = gu[size_t(r * 2 * I + i)], u = gu[size_t(r * 2 * I + I + i)];
        ASSERT_NEAR(key[size_t(r * I + i)], g / (1 + std::exp(-g)) * u, 1e-6 * (1 + std::abs(g * u)));
      }
  }
}

TEST(BackendOps, AttentionCausalGqaWindowAndOffset) {
  for (const Backend* be : backends())
    for (int window : {0, 3}) {
      const ops::AttnShape s{4, 2, 8, 6, 0.3f, window};
      const int n_k = 9, n_q = 4, p0 = n_k - n_q;  // queries are the last 4 of 9 positions
      const int qs = s.Hq * s.Dk, ks = s.Hkv * s.Dk, vs = s.Hkv * s.Dv, os = s.Hq * s.Dv;
      const auto q = randn(size_t(n_q) * qs, 31), k = randn(size_t(n_k) * ks, 32), v = randn(size_t(n_k) * vs, 33);
      std::vector<float> o(size_t(n_q) * os);
      be->attention(q.data(), n_q, qs, p0, k.data(), ks, v.data(), vs, n_k, s, o.data(), os);
      for (int i = 0; i < n_q; ++i)
        for (int h = 0; h < s.Hq; ++h) {
          const int g = h / (s.Hq / s.Hkv), p = p0 + i;
          std::vector<double> sc;
          std::vector<int> keys;
          for (int j = 0; j <= p; ++j) {
            if (window > 0 && p - window >= j) continue;
            double d = 0;
            for (int c = 0; c < s.Dk; ++c) d += double(q[size_t(i * qs + h * s.Dk + c)]) * k[size_t(j * ks + g * s.Dk + c)];
            sc.push_back(d * s.scale);
            keys.push_back(j);
          }
          const double m = *std::max_element(sc.begin(), sc.end());
          double z = 0;
          for (double& x : sc) z += (x = std::exp(x - m));
          for (int c = 0; c < s.Dv; ++c) {
            double ref = 0;
            for (size_t j = 0; j < keys.size(); ++j) ref += sc[j] / z * v[size_t(keys[j] * vs + g * s.Dv + c)];
            ASSERT_NEAR(o[size_t(i * os + h * s.Dv + c)], ref, 2e-5) << be->name() << " window " << window;
          }
        }
    }
}

// The routing of one token in double, from the definitions (RouteSpec's comments).
void route_reference(const ops::RouteSpec& s, const float* z, const float* bias, std::vector<int>& ids,
                     std::vector<double>& w) {
  const int E = s.E, k = s.k;
  std::vector<double> p(z, z + E), sel;
  auto top = [&](const std::vector<double>& x) {
    std::vector<int> o(static_cast<size_t>(E));
    std::iota(o.begin(), o.end(), 0);
    std::stable_sort(o.begin(), o.end(), [&](int a, int b) { return x[size_t(a)] > x[size_t(b)]; });
    return std::vector<int>(o.begin(), o.begin() + k);
  };
  if (s.score == ops::RouteSpec::Score::TopKThenSoftmax) {
    ids = top(p);
    double m = -INFINITY, zs = 0;
    for (int e : ids) m = std::max(m, p[size_t(e)]);
    for (int e : ids) zs += std::exp(p[size_t(e)] - m);
    w.clear();
    for (int e : ids) w.push_back(std::exp(p[size_t(e)] - m) / zs * (s.scale ? s.scaling : 1.0));
    return;
  }
  if (s.score == ops::RouteSpec::Score::Softmax) {
    const double m = *std::max_element(p.begin(), p.end());
    double zs = 0;
    for (double& x : p) zs += (x = std::exp(x - m));
    for (double& x : p) x /= zs;
  } else {
    for (double& x : p) x = 1 / (1 + std::exp(-x));
  }
  sel = p;
  if (bias)
    for (int e = 0; e < E; ++e) sel[size_t(e)] += bias[e];
  if (s.groups != ops::RouteSpec::Groups::None) {
    const int per = E / s.n_group;
    std::vector<double> gs;
    for (int g = 0; g < s.n_group; ++g) {
      std::vector<double> v(sel.begin() + g * per, sel.begin() + (g + 1) * per);
      std::sort(v.rbegin(), v.rend());
      gs.push_back(s.groups == ops::RouteSpec::Groups::MaxScore ? v[0] : v[0] + v[1]);
    }
    std::vector<int> go(static_cast<size_t>(s.n_group));
    std::iota(go.begin(), go.end(), 0);
    std::stable_sort(go.begin(), go.end(), [&](int a, int b) { return gs[size_t(a)] > gs[size_t(b)]; });
    for (int r = s.topk_group; r < s.n_group; ++r)
      for (int e = go[size_t(r)] * per; e < (go[size_t(r)] + 1) * per; ++e)
        sel[size_t(e)] = s.groups == ops::RouteSpec::Groups::MaxScore ? 0.0 : -INFINITY;
  }
  ids = top(sel);
  w.clear();
  double sum = s.renorm_eps;
  for (int e : ids) sum += p[size_t(e)];
  for (int e : ids) w.push_back(p[size_t(e)] / (s.renorm ? sum : 1.0) * (s.scale ? s.scaling : 1.0));
}

TEST(BackendOps, RouteEveryRouterKind) {
  using S = ops::RouteSpec;
  std::vector<std::pair<const char*, S>> kinds;
  S s;
  s.E = 16;
  s.k = 4;
  kinds.push_back({"softmax", s});
  s.renorm = true;
  kinds.push_back({"softmax+renorm", s});
  s.renorm = false;
  s.scale = true;
  s.scaling = 2.5f;
  kinds.push_back({"softmax+scale", s});
  S g = S();
  g.E = 16;
  g.k = 3;
  g.score = S::Score::TopKThenSoftmax;
  kinds.push_back({"topk-softmax", g});
  S v2 = s;
  v2.groups = S::Groups::MaxScore;
  v2.n_group = 4;
  v2.topk_group = 2;
  kinds.push_back({"softmax+groups(max)", v2});
  S v3 = v2;
  v3.score = S::Score::Sigmoid;
  v3.groups = S::Groups::TopTwoSum;
  v3.renorm = true;
  v3.renorm_eps = 1e-20;
  kinds.push_back({"sigmoid+bias+groups(top2)", v3});
  const int N = 37;
  const auto z = randn(size_t(N) * 16, 41, 2.f), bias = randn(16, 42, 0.3f);
  for (const Backend* be : backends())
    for (const auto& [name, spec] : kinds) {
      const float* b = spec.score == S::Score::Sigmoid ? bias.data() : nullptr;
      std::vector<int> ids(size_t(N) * spec.k);
      std::vector<float> w(size_t(N) * spec.k);
      be->route(z.data(), N, spec, b, ids.data(), w.data());
      for (int t = 0; t < N; ++t) {
        std::vector<int> rid;
        std::vector<double> rw;
        route_reference(spec, z.data() + size_t(t) * 16, b, rid, rw);
        for (int j = 0; j < spec.k; ++j) {
          ASSERT_EQ(ids[size_t(t * spec.k + j)], rid[size_t(j)]) << be->name() << " " << name << " token " << t;
          ASSERT_NEAR(w[size_t(t * spec.k + j)], rw[size_t(j)], 1e-6 * (1 + rw[size_t(j)])) << name;
        }
      }
    }
}

TEST(BackendOps, MoeExpertsWithTaps) {
  const int E = 6, I = 20, H = 24, N = 11, k = 2;
  for (const Backend* be : backends())
    for (ops::WType t : kTypes) {
      const test::TypedBank bank(E, I, H, [t](int, int) { return t; }, 100);
      std::vector<ops::WeightView> views;
      const ExpertsView ex = bank.on(*be, views);
      const auto a = randn(size_t(N) * H, 51);
      std::vector<int> ids(size_t(N) * k);
      std::vector<float> w(size_t(N) * k);
      std::mt19937_64 rng(52);
      for (int tk = 0; tk < N; ++tk) {  // two distinct experts per token (expert 5 never chosen), random weights
        ids[size_t(tk * k)] = int(rng() % 5);
        ids[size_t(tk * k + 1)] = (ids[size_t(tk * k)] + 1 + int(rng() % 4)) % 5;
        w[size_t(tk * k)] = 0.7f;
        w[size_t(tk * k + 1)] = 0.25f;
      }
      // Taps: record which tokens each expert saw; double every key of expert 1; zero expert 3's output.
      std::vector<std::vector<int>> seen(static_cast<size_t>(E));
      MoeTaps taps;
      taps.key = [&](int e, MapMatR rows, const std::vector<int>& tokens) {
        EXPECT_EQ(rows.cols(), I);
        seen[size_t(e)] = tokens;
        if (e == 1) rows *= 2.f;
      };
      taps.out = [&](int e, MapMatR rows, const std::vector<int>&) {
        EXPECT_EQ(rows.cols(), H);
        if (e == 3) rows.setZero();
      };
      std::vector<float> y(size_t(N) * H), plain(size_t(N) * H);
      be->moe_experts(a.data(), N, ex, ids.data(), w.data(), k, y.data(), &taps);
      be->moe_experts(a.data(), N, ex, ids.data(), w.data(), k, plain.data(), nullptr);
      for (int e = 0; e < E; ++e) {
        std::vector<int> want;
        for (int tk = 0; tk < N; ++tk)
          for (int j = 0; j < k; ++j)
            if (ids[size_t(tk * k + j)] == e) want.push_back(tk);
        EXPECT_EQ(seen[size_t(e)], want) << "expert " << e;
      }
      for (int tk = 0; tk < N; ++tk)
        for (int h = 0; h < H; ++h) {
          double ref = 0, ref_plain = 0, mag = 0;
          for (int j = 0; j < k; ++j) {
            const int e = ids[size_t(tk * k + j)];
            double o = 0, err = 0;  // err: a bound on the fp32 error of this expert's output element
            for (int i = 0; i < I; ++i) {
              double g = 0, u = 0, gm = 0, um = 0;
              for (int c = 0; c < H; ++c) {
                const double x = a[size_t(tk * H + c)];
                g += x * bank.gate(e).value[size_t(i * H + c)];
                u += x * bank.up(e).value[size_t(i * H + c)];
                gm += std::abs(x * bank.gate(e).value[size_t(i * H + c)]);
                um += std::abs(x * bank.up(e).value[size_t(i * H + c)]);
              }
              const double sg = 1 / (1 + std::exp(-g)), kv = g * sg * u;
              // key error: through the gate and up dot products, plus a few ulp for silu's exp and the products
              const double ek = std::abs(u * (sg + g * sg * (1 - sg))) * dot_bound(H, gm) +
                                std::abs(g * sg) * dot_bound(H, um) + 5e-7 * std::abs(kv);
              const double d = bank.down(e).value[size_t(h * I + i)];
              o += kv * d;
              err += std::abs(d) * ek + dot_bound(I, std::abs(kv * d));
            }
            mag += err * (e == 1 ? 2 : 1) + 1e-7 * std::abs(o);
            o *= w[size_t(tk * k + j)];
            ref_plain += o;
            ref += e == 3 ? 0.0 : e == 1 ? 2 * o : o;
          }
          ASSERT_NEAR(plain[size_t(tk * H + h)], ref_plain, mag) << be->name() << " " << type_name(t);
          ASSERT_NEAR(y[size_t(tk * H + h)], ref, mag) << be->name() << " " << type_name(t) << " tapped";
        }
    }
}

// Batch invariance of the MoE step: a token's output is bit for bit the same whatever other tokens share the call.
TEST(BackendOps, MoeExpertsIsBatchInvariant) {
  const int E = 8, I = 16, H = 32, N = 9, k = 3;
  std::vector<TypedWeight> ws;
  for (int i = 0; i < 3 * E; ++i) ws.emplace_back(i < 2 * E ? I : H, i < 2 * E ? H : I, ops::WType::BF16, 400 + i);
  std::vector<ops::WeightView> views;
  for (auto& w : ws) views.push_back(w.view);
  const ExpertsView ex{E, I, H, views.data(), views.data() + E, views.data() + 2 * E};
  const auto a = randn(size_t(N) * H, 61), z = randn(size_t(N) * E, 62);
  ops::RouteSpec spec;
  spec.E = E;
  spec.k = k;
  spec.renorm = true;
  for (const Backend* be : backends()) {
    std::vector<int> ids(size_t(N) * k);
    std::vector<float> w(size_t(N) * k), y(size_t(N) * H);
    be->route(z.data(), N, spec, nullptr, ids.data(), w.data());
    be->moe_experts(a.data(), N, ex, ids.data(), w.data(), k, y.data());
    for (int t = 0; t < N; ++t) {
      std::vector<float> one(static_cast<size_t>(H));
      be->moe_experts(a.data() + size_t(t) * H, 1, ex, ids.data() + size_t(t) * k, w.data() + size_t(t) * k, k,
                      one.data());
      for (int h = 0; h < H; ++h) ASSERT_EQ(one[size_t(h)], y[size_t(t * H + h)]) << be->name() << " token " << t;
    }
  }
}

// gram: the lower triangle of Kᵀ·K in fp64 (strided rows), accumulated over calls; the upper triangle untouched.
TEST(BackendOps, GramIsTheLowerTriangleOfKtKInFp64) {
  const int cols = 45;
  const size_t ld = 50;
  const auto K1 = randn(size_t(37) * ld, 71), K2 = randn(size_t(5) * ld, 72);
  std::vector<double> C(size_t(cols) * cols, -7.0);
  cpu_backend().gram(K1.data(), 37, cols, ld, C.data(), false);
  cpu_backend().gram(K2.data(), 5, cols, ld, C.data(), true);
  for (int i = 0; i < cols; ++i)
    for (int j = 0; j < cols; ++j) {
      const double got = C[size_t(i) * cols + size_t(j)];
      if (j > i) {
        EXPECT_EQ(got, -7.0) << i << "," << j;
        continue;
      }
      double want = 0, mag = 0;
      for (const auto* K : {&K1, &K2})
        for (size_t r = 0; r < K->size() / ld; ++r) {
          const double p = double((*K)[r * ld + size_t(i)]) * double((*K)[r * ld + size_t(j)]);
          want += p;
          mag += std::abs(p);
        }
      EXPECT_NEAR(got, want, 1e-14 * mag) << i << "," << j;
    }
}

TEST(BackendOps, WorkspaceKeepsEarlierPiecesWhenItGrows) {
  Workspace ws;
  float* a = ws.take(10);
  std::fill(a, a + 10, 3.f);
  float* b = ws.take(1 << 20);  // outgrows the first block
  b[0] = 1.f;
  EXPECT_EQ(a[9], 3.f);  // still valid until reset
  EXPECT_EQ(reinterpret_cast<uintptr_t>(b) % 64, 0u);
  ws.reset();
  const size_t cap = ws.capacity();
  EXPECT_GE(cap, size_t(1 << 20));
  float* c = ws.take(1 << 20);  // fits now: the same block, no growth
  EXPECT_EQ(ws.capacity(), cap);
  EXPECT_EQ(c, b);  // b opened the new block; after the reset the next piece starts there again

}

// The Buf pool's size classes (256 B steps to 4 KiB, then 8 per power of two: at most 12.5 % over) and reuse: a
// dropped Buf serves the next request of its class. (The cached buffers are handed back at the end: the pool must be
// empty when the CPU backend is destroyed at exit.)
TEST(BackendOps, BufferPoolSizeClassesAndReuse) {
  EXPECT_EQ(BufferPool::size_class(1), 256u);
  EXPECT_EQ(BufferPool::size_class(256), 256u);
  EXPECT_EQ(BufferPool::size_class(257), 512u);
  EXPECT_EQ(BufferPool::size_class(4096), 4096u);
  EXPECT_EQ(BufferPool::size_class(4097), 4608u);
  EXPECT_EQ(BufferPool::size_class(size_t(1) << 20), size_t(1) << 20);
  for (size_t b = 1, prev = 0; b < (size_t(1) << 26); b += b / 7 + 1) {
    const size_t c = BufferPool::size_class(b);
    EXPECT_GE(c, b);
    EXPECT_GE(c, prev);  // monotone
    EXPECT_EQ(c % 256, 0u);
    if (b > 4096) {
      EXPECT_LE(double(c), 1.125 * double(b)) << b;
    }
    EXPECT_EQ(BufferPool::size_class(c), c);  // a class is its own class
    prev = c;
  }
  const Backend& be = cpu_backend();
  void* first = nullptr;
  {
    Buf a(be, 5000);
    first = a.as<void>();
    EXPECT_EQ(reinterpret_cast<uintptr_t>(first) % 256, 0u);
  }
  const size_t cached = be.pool().cached();
  EXPECT_GE(cached, BufferPool::size_class(5000));
  {
    Buf b(be, 4700);  // the same class
    EXPECT_EQ(b.as<void>(), first);
    EXPECT_EQ(be.pool().cached(), cached - BufferPool::size_class(5000));
  }
  be.pool().trim();
  EXPECT_EQ(be.pool().cached(), 0u);
}


// The elementwise ops the block runs between the big ones: exact where IEEE arithmetic is (copy, add, scale, clamp,
// row scaling, the embedding gather of widened typed rows), sigmoid to 2 ulp of its double value.
TEST(BackendOps, ElementwiseOpsAndGather) {
  for (const Backend* be : backends()) {
    const int rows = 6, cols = 13;
    const size_t ldx = 17, ldy = 20;
    const auto x = randn(size_t(rows) * ldx, 31, 2.f);
    std::vector<float> y(size_t(rows) * ldy, -3.f);
    be->copy2d(x.data(), ldx, y.data(), ldy, rows, cols);
    for (int r = 0; r < rows; ++r)
      for (size_t c = 0; c < ldy; ++c)
        ASSERT_EQ(y[size_t(r) * ldy + c], c < size_t(cols) ? x[size_t(r) * ldx + c] : -3.f) << be->name();
    // copy_rows: y row i = x row rows[i] (repeats, any order), −1 rows and the gaps untouched.
    const std::vector<int> pick = {4, -1, 0, 4, 5, -1, 2};
    std::vector<float> z(pick.size() * ldy, -3.f);
    be->copy_rows(x.data(), ldx, pick.data(), int(pick.size()), z.data(), ldy, cols);
    for (size_t i = 0; i < pick.size(); ++i)
      for (size_t c = 0; c < ldy; ++c)
        ASSERT_EQ(z[i * ldy + c], pick[i] >= 0 && c < size_t(cols) ? x[size_t(pick[i]) * ldx + c] : -3.f) << i;

    const size_t n = 1000;
    const auto a = randn(n, 32, 3.f), b = randn(n, 33, 3.f);
    std::vector<float> v = a;
    be->add(v.data(), b.data(), n);
    for (size_t i = 0; i < n; ++i) ASSERT_EQ(v[i], a[i] + b[i]);
    v = a;
    be->scale(v.data(), n, -0.37f);
    for (size_t i = 0; i < n; ++i) ASSERT_EQ(v[i], a[i] * -0.37f);
    v = a;
    be->clamp(v.data(), n, 2.5f);
    for (size_t i = 0; i < n; ++i) ASSERT_EQ(v[i], std::min(std::max(a[i], -2.5f), 2.5f));
    v = a;
    be->sigmoid(v.data(), n);
    for (size_t i = 0; i < n; ++i) {
      const double ref = 1.0 / (1.0 + std::exp(-double(a[i])));
      ASSERT_NEAR(v[i], ref, 2.5e-7 * ref) << a[i];
    }
    v = a;  // [100, 10] rows scaled by g
    be->scale_rows(v.data(), 100, 10, b.data());
    for (size_t i = 0; i < n; ++i) ASSERT_EQ(v[i], a[i] * b[i / 10]);

    for (ops::WType t : kTypes) {  // rows 5, 0, 5, 8 of a typed [9, 24] table
      const TypedWeight table(9, 24, t, 34);
      const std::vector<int> ids = {5, 0, 5, 8};
      std::vector<float> e(ids.size() * 24);
      be->gather_rows(table.view, ids.data(), int(ids.size()), 24, e.data());
      for (size_t i = 0; i < ids.size(); ++i)
        for (int c = 0; c < 24; ++c)
          ASSERT_EQ(e[i * 24 + size_t(c)], table.value[size_t(ids[i]) * 24 + size_t(c)]) << type_name(t);
    }
  }
}

// solve_spd: A·X = B for a random SPD A (m right-hand sides) against Eigen's pivoted LDLT in fp64, in place and
// through the host-matrix helper; an indefinite A is refused (false / nullopt), not solved.
TEST(BackendOps, SolveSpdIsACholeskySolve) {
  const Backend& be = cpu_backend();
  for (auto [n, m] : {std::pair{1, 1}, {37, 1}, {120, 5}}) {
    const auto [A, B] = test::random_spd_system(n, m, 91 + uint64_t(n));
    const Eigen::MatrixXd want = A.ldlt().solve(B);
    const std::optional<Eigen::MatrixXd> got = solve_spd(be, A, B);
    ASSERT_TRUE(got) << n;
    EXPECT_LE((*got - want).norm(), 1e-10 * want.norm()) << n;
    EXPECT_LE((A * *got - B).norm(), 1e-10 * B.norm()) << n;
    Eigen::MatrixXd a = A, x = B;  // the op itself, in place
    ASSERT_TRUE(be.solve_spd(a.data(), n, x.data(), m));
    EXPECT_EQ(x, *got);
  }
  Eigen::MatrixXd indefinite = Eigen::MatrixXd::Identity(4, 4), b = Eigen::MatrixXd::Ones(4, 1);
  indefinite(2, 2) = -1;
  EXPECT_FALSE(solve_spd(be, indefinite, b));
  EXPECT_FALSE(be.solve_spd(indefinite.data(), 4, b.data(), 1));
}

}  // namespace
}  // namespace moedit
