// Tier 1: each op against a scalar reference, tolerance scaled to magnitude; and batch invariance, bit for bit.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "kernels/half.h"
#include "kernels/ops.h"
#include "io/safetensors.h"
#include "test_util.h"

namespace moedit {
namespace {

using test::randn;

TEST(Kernels, LinearMatchesScalarLoop) {
  for (auto [n, in, out] : {std::tuple{1, 7, 5}, {13, 64, 300}, {64, 256, 1031}}) {
    auto X = randn(size_t(n) * in, 1), W = randn(size_t(out) * in, 2), b = randn(size_t(out), 3);
    std::vector<float> Y(size_t(n) * out);
    ops::linear(X.data(), n, in, W.data(), out, Y.data(), b.data());
    for (int r = 0; r < n; ++r)
      for (int c = 0; c < out; ++c) {
        double ref = b[size_t(c)];
        for (int i = 0; i < in; ++i) ref += double(X[size_t(r * in + i)]) * W[size_t(c * in + i)];
        ASSERT_NEAR(Y[size_t(r * out + c)], ref, 1e-5 * std::sqrt(double(in)) * 4) << n << "x" << in << "x" << out;
      }
  }
}

// Batch invariance: a row's output is bit for bit the same whether it is computed alone, with any number of other
// rows, from another address (misaligned), or with the columns split among threads.
TEST(Kernels, LinearIsBatchInvariant) {
  for (auto [n, in, out] : {std::tuple{11, 37, 29}, {7, 128, 4096}, {40, 256, 515}}) {
    auto X = randn(size_t(n) * in, 4), W = randn(size_t(out) * in, 5), b = randn(size_t(out), 6);
    std::vector<float> all(size_t(n) * out);
    ops::set_num_threads(1);
    ops::linear(X.data(), n, in, W.data(), out, all.data(), b.data());
    for (int threads : {1, 2}) {
      ops::set_num_threads(threads);
      std::vector<float> par(size_t(n) * out);
      ops::linear(X.data(), n, in, W.data(), out, par.data(), b.data());
      EXPECT_EQ(par, all) << n << "x" << in << "x" << out << ", " << threads << " threads";
      for (int r0 = 0; r0 < n; r0 += 3)
        for (int len : {1, 2, 5}) {
          if (r0 + len > n) continue;
          std::vector<float> x(size_t(len) * in + 1), y(size_t(len) * out);  // +1: start one float in (misaligned)
          std::copy(X.begin() + long(r0) * in, X.begin() + long(r0 + len) * in, x.begin() + 1);
          ops::linear(x.data() + 1, len, in, W.data(), out, y.data(), b.data());
          EXPECT_TRUE(std::equal(y.begin(), y.end(), all.begin() + long(r0) * out))
              << n << "x" << in << "x" << out << ": rows " << r0 << "+" << len << ", " << threads << " threads";
        }
    }
    ops::set_num_threads(0);
  }
}

// ops::linear's contract, bit for bit (==, no tolerance): every output is eight FMA lane sums over k ≡ l (mod 8) in
// order of k, reduced as ((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7)), then the k tail in order with FMAs, then + bias — for
// every weight type, whatever the row count (1–3 rows take the small tiles, more the packed AVX-512 ones where the
// build has them, a panel's last few rows the small ones again), the tile a column falls in (out not a multiple of
// any tile width), the strides and the thread count. The reference is that sequence, one element at a time.
float linear_sequence(const float* x, const float* w, int in, const float* bias) {
  float l[8] = {};
  const int in8 = in & ~7;
  for (int k = 0; k < in8; ++k) l[k % 8] = std::fma(x[k], w[k], l[k % 8]);
  float s = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
  for (int k = in8; k < in; ++k) s = std::fma(x[k], w[k], s);
  return bias ? s + *bias : s;
}

TEST(Kernels, LinearIsBitExactToItsScalarSequence) {
  struct Shape {
    int n, in, out;
  };
  std::vector<Shape> shapes;
  for (int n = 1; n <= 7; ++n)
    for (int in : {5, 8, 37, 64}) shapes.push_back({n, in, n % 2 ? 29 : 13});
  // Packed tiles with a k tail; several row panels (in 1024: 60 rows a panel, the last one 2 rows, so small tiles);
  // enough work for two threads to split the columns.
  for (Shape s : {Shape{12, 256, 67}, {40, 67, 515}, {122, 1024, 67}, {130, 1027, 200}}) shapes.push_back(s);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (ops::WType t : {ops::WType::F32, ops::WType::BF16, ops::WType::F16})
    for (const Shape& sh : shapes) {
      const int n = sh.n, in = sh.in, out = sh.out;
      const size_t ldx = size_t(in) + 3, ldw = size_t(in) + 2, ldy = size_t(out) + 5;  // strided rows
      // Padding is NaN: a kernel that read past a row would poison its output.
      std::vector<float> X = randn(size_t(n) * ldx, 21), Wf = randn(size_t(out) * ldw, 22, 0.5f);
      const std::vector<float> b = randn(size_t(out), 23);
      for (int r = 0; r < n; ++r) std::fill_n(X.begin() + long(r * ldx) + in, ldx - size_t(in), nan);
      std::vector<uint16_t> half(Wf.size());
      for (size_t i = 0; i < Wf.size(); ++i) {
        if (i % ldw >= size_t(in)) Wf[i] = nan;
        half[i] = t == ops::WType::BF16 ? f32_to_bf16(Wf[i]) : f32_to_f16(Wf[i]);
      }
      const ops::WeightView W = t == ops::WType::F32 ? ops::WeightView(Wf.data(), ldw) : ops::WeightView(half.data(), t, ldw);
      std::vector<float> w(size_t(out) * in);  // the weights as the kernel sees them (widening is exact)
      for (int c = 0; c < out; ++c) ops::widen_row(W, c, 0, in, w.data() + size_t(c) * in);
      for (const float* bias : {b.data(), static_cast<const float*>(nullptr)}) {
        std::vector<float> ref(size_t(n) * ldy, -7.f);
        for (int r = 0; r < n; ++r)
          for (int c = 0; c < out; ++c)
            ref[size_t(r) * ldy + c] =
                linear_sequence(X.data() + size_t(r) * ldx, w.data() + size_t(c) * in, in, bias ? bias + c : nullptr);
        for (int threads : {1, 2}) {
          ops::set_num_threads(threads);
          std::vector<float> Y(size_t(n) * ldy, -7.f);  // the padding must stay as it is
          ops::linear(X.data(), ldx, n, in, W, out, Y.data(), ldy, bias);
          ASSERT_EQ(std::memcmp(Y.data(), ref.data(), sizeof(float) * Y.size()), 0)
              << "type " << int(t) << ", " << n << "x" << in << "x" << out << (bias ? ", bias" : "") << ", "
              << threads << " threads";
        }
      }
    }
  ops::set_num_threads(0);
}

// silu_mul is silu(g)·u element by element, bit for bit, at any row width and address.
TEST(Kernels, SiluMulIsSiluTimesUp) {
  for (int I : {1, 63, 64, 100, 300}) {
    const int rows = 3;
    std::vector<float> gu = randn(size_t(rows) * 2 * I + 1, 24, 4.f), out(size_t(rows) * I + 1);
    gu[1] = 100.f;  // exp underflows / overflows at the ends
    if (I > 2) gu[2] = -100.f;
    for (int off : {0, 1}) {
      ops::silu_mul(gu.data() + off, rows, I, out.data() + off);
      for (int r = 0; r < rows; ++r)
        for (int i = 0; i < I; ++i) {
          const float* g = gu.data() + off + size_t(r) * 2 * I;
          const float want = ops::silu(g[i]) * g[I + i], got = out[size_t(off) + size_t(r) * I + i];
          ASSERT_EQ(std::memcmp(&want, &got, sizeof(float)), 0) << "I " << I << ", row " << r << ", " << i;
        }
    }
  }
}

TEST(Kernels, RmsNormMatchesFormula) {
  const int rows = 3, dim = 10;
  auto x = randn(rows * dim, 4, 3.f), w = randn(dim, 5);
  std::vector<float> y(rows * dim);
  ops::rmsnorm(x.data(), w.data(), y.data(), rows, dim, 1e-6f);
  for (int r = 0; r < rows; ++r) {
    double ss = 0;
    for (int i = 0; i < dim; ++i) ss += double(x[size_t(r * dim + i)]) * x[size_t(r * dim + i)];
    const double inv = 1.0 / std::sqrt(ss / dim + 1e-6);
    for (int i = 0; i < dim; ++i) EXPECT_NEAR(y[size_t(r * dim + i)], w[size_t(i)] * x[size_t(r * dim + i)] * inv, 1e-5);
  }
}

TEST(Kernels, RopeRotatesHalfPairs) {
  const int D = 8, heads = 2;
  auto x = randn(heads * D, 6);
  auto ref = x;
  std::vector<float> inv(D / 2);
  for (int i = 0; i < D / 2; ++i) inv[size_t(i)] = 1.f / std::pow(10000.f, float(2 * i) / D);
  const int pos = 5;
  ops::rope_neox(x.data(), 1, heads * D, heads, D, D, &pos, inv.data());
  for (int h = 0; h < heads; ++h)
    for (int i = 0; i < D / 2; ++i) {
      const double a = ref[size_t(h * D + i)], b = ref[size_t(h * D + i + D / 2)], th = pos * double(inv[size_t(i)]);
      EXPECT_NEAR(x[size_t(h * D + i)], a * std::cos(th) - b * std::sin(th), 1e-5);
      EXPECT_NEAR(x[size_t(h * D + i + D / 2)], b * std::cos(th) + a * std::sin(th), 1e-5);
    }
}

TEST(Kernels, AttentionMatchesNaiveCausalGqaWithWindow) {
  const int n = 6, Hq = 4, Hkv = 2, D = 4, window = 3;
  auto q = randn(n * Hq * D, 7), k = randn(n * Hkv * D, 8), v = randn(n * Hkv * D, 9);
  for (int win : {0, window}) {
    ops::AttnShape s{Hq, Hkv, D, D, 0.5f, win};
    std::vector<float> out(n * Hq * D);
    ops::attention(q.data(), n, Hq * D, 0, k.data(), Hkv * D, v.data(), Hkv * D, n, s, out.data(), Hq * D);
    for (int h = 0; h < Hq; ++h) {
      const int g = h / (Hq / Hkv);
      for (int i = 0; i < n; ++i) {
        std::vector<double> sc;
        double mx = -1e300;
        for (int j = 0; j <= i; ++j) {
          double d = 0;
          for (int c = 0; c < D; ++c) d += double(q[size_t(i * Hq * D + h * D + c)]) * k[size_t(j * Hkv * D + g * D + c)];
          d *= 0.5;
          if (win > 0 && j <= i - win) d = -INFINITY;
          sc.push_back(d);
          mx = std::max(mx, d);
        }
        double z = 0;
        for (auto& x : sc) z += (x = std::exp(x - mx));
        for (int c = 0; c < D; ++c) {
          double o = 0;
          for (int j = 0; j <= i; ++j) o += sc[size_t(j)] / z * v[size_t(j * Hkv * D + g * D + c)];
          EXPECT_NEAR(out[size_t(i * Hq * D + h * D + c)], o, 1e-5) << "win " << win;
        }
      }
    }
  }
}

// Each query's output is the same computed with all queries or alone at its position (the KV-cached decode).
TEST(Kernels, AttentionIsBatchInvariant) {
  const int n = 9, Hq = 4, Hkv = 2, D = 20;
  auto q = randn(n * Hq * D, 10), k = randn(n * Hkv * D, 11), v = randn(n * Hkv * D, 12);
  for (int win : {0, 4}) {
    const ops::AttnShape s{Hq, Hkv, D, D, 0.3f, win};
    std::vector<float> all(n * Hq * D), one(Hq * D);
    ops::attention(q.data(), n, Hq * D, 0, k.data(), Hkv * D, v.data(), Hkv * D, n, s, all.data(), Hq * D);
    for (int i = 0; i < n; ++i) {
      ops::attention(q.data() + i * Hq * D, 1, Hq * D, i, k.data(), Hkv * D, v.data(), Hkv * D, i + 1, s, one.data(),
                     Hq * D);
      EXPECT_TRUE(std::equal(one.begin(), one.end(), all.begin() + i * Hq * D)) << "query " << i << ", window " << win;
    }
  }
}

TEST(Kernels, TopkBreaksTiesByLowerIndex) {
  const float x[] = {0.1f, 0.5f, 0.3f, 0.5f, 0.2f};
  int idx[3];
  ops::topk(x, 5, 3, idx);
  EXPECT_EQ(idx[0], 1);
  EXPECT_EQ(idx[1], 3);
  EXPECT_EQ(idx[2], 2);
}

TEST(Kernels, SoftmaxHandlesMaskedEntries) {
  float x[] = {1.f, -INFINITY, 1.f};
  ops::softmax_inplace(x, 3);
  EXPECT_FLOAT_EQ(x[0], 0.5f);
  EXPECT_FLOAT_EQ(x[1], 0.f);
  EXPECT_FLOAT_EQ(x[2], 0.5f);
}

TEST(Kernels, HalfPrecisionConversions) {
  // bf16: widening is exact; narrowing rounds to nearest even.
  EXPECT_EQ(bf16_to_f32(0x3f80), 1.f);
  EXPECT_EQ(f32_to_bf16(1.f), 0x3f80);
  EXPECT_EQ(f32_to_bf16(1.00390625f), 0x3f80);  // halfway 1 + 2^-8 → even (1.0)
  EXPECT_EQ(f32_to_bf16(1.01171875f), 0x3f82);  // halfway 1 + 3·2^-8 → even
  // f16: normal, subnormal, overflow, round trip of every finite value.
  EXPECT_EQ(f16_to_f32(0x3c00), 1.f);
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.f, -24));
  EXPECT_EQ(f16_to_f32(0x7bff), 65504.f);
  EXPECT_TRUE(std::isinf(f16_to_f32(0x7c00)));
  EXPECT_EQ(f32_to_f16(65520.f), 0x7c00);
  for (uint32_t h = 0; h < 0x10000; ++h) {
    if ((h & 0x7c00) == 0x7c00) continue;  // inf / nan
    ASSERT_EQ(f32_to_f16(f16_to_f32(uint16_t(h))), uint16_t(h)) << h;
  }
  // fp8 e4m3: max finite 448, NaN pattern, subnormal.
  EXPECT_EQ(f8e4m3_to_f32(0x7e), 448.f);
  EXPECT_TRUE(std::isnan(f8e4m3_to_f32(0x7f)));
  EXPECT_EQ(f8e4m3_to_f32(0x01), std::ldexp(1.f, -9));
}

}  // namespace
}  // namespace moedit
