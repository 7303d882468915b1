// moe_experts on the GPU against the CPU backend: every weight dtype, experts of mixed dtypes (an edited expert's
// fp32 copy among bf16 ones), few and many rows per expert (both tile shapes of the grouped product), unused experts,
// and taps that read and rewrite the keys and the outputs (each backend's taps must see the same experts, tokens and
// rows); moe_experts_backward (da and dw, with and without accumulation) on the same banks. Tolerance: 1e-5 ×
// max|CPU result| per element (see test_cuda_backend.cpp).
#include <gtest/gtest.h>

#include <array>
#include <map>
#include <random>

#include "tests/cuda/cuda_test_util.h"
#include "tests/typed_weight.h"

namespace moedit {
namespace {

using namespace test;  // gpu(), up(), down(), expect_near_scaled, randn, TypedWeight

// E experts with gate/up [I, H] and down [H, I]; types[e] per expert and matrix (gate, up, down).
struct Bank : TypedBank {
  Bank(int E_, int I_, int H_, const std::vector<std::array<ops::WType, 3>>& types, uint64_t seed)
      : TypedBank(E_, I_, H_, [&](int e, int m) { return types[size_t(e)][size_t(m)]; }, seed, 0.3f) {}
};

// Routing: k distinct experts per token among the first `used` (the others never chosen), weights in (0.05, 1).
void random_routing(int N, int k, int used, uint64_t seed, std::vector<int>& ids, std::vector<float>& w) {
  std::mt19937_64 rng(seed);
  ids.assign(size_t(N) * k, 0);
  w.assign(ids.size(), 0.f);
  for (int t = 0; t < N; ++t)
    for (int j = 0; j < k; ++j) {
      int e;
      bool dup;
      do {
        e = int(rng() % uint64_t(used));
        dup = false;
        for (int q = 0; q < j; ++q) dup |= ids[size_t(t) * k + q] == e;
      } while (dup);
      ids[size_t(t) * k + j] = e;
      w[size_t(t) * k + j] = 0.05f + float(rng() % 950) / 1000.f;
    }
}

// What a backend's taps saw: per expert, its tokens and its key rows (as handed to the tap, before the change).
struct Seen {
  std::map<int, std::vector<int>> key_tokens, out_tokens;
  std::map<int, std::vector<float>> keys;
};
MoeTaps make_taps(Seen& seen) {
  MoeTaps taps;
  taps.key = [&seen](int e, MapMatR rows, const std::vector<int>& tokens) {
    seen.key_tokens[e] = tokens;
    seen.keys[e].assign(rows.data(), rows.data() + rows.size());
    if (e == 1) rows *= 2.f;  // rewrite expert 1's keys
  };
  taps.out = [&seen](int e, MapMatR rows, const std::vector<int>& tokens) {
    seen.out_tokens[e] = tokens;
    if (e == 3) rows.setZero();  // and drop expert 3's output
  };
  return taps;
}

// Runs moe_experts on both backends (with or without taps) and compares.
void compare(const Bank& bank, int N, int k, int used, uint64_t seed, bool with_taps, const std::string& what) {
  std::vector<int> ids;
  std::vector<float> w;
  random_routing(N, k, used, seed, ids, w);
  const auto a = randn(size_t(N) * bank.H, seed + 1);
  std::vector<ops::WeightView> hv, dv;
  Seen cs, gs;
  const MoeTaps ct = make_taps(cs), gt = make_taps(gs);

  std::vector<float> want(size_t(N) * bank.H);
  cpu_backend().moe_experts(a.data(), N, bank.on(cpu_backend(), hv), ids.data(), w.data(), k, want.data(),
                            with_taps ? &ct : nullptr);
  Buf da = up(a), dids = up(ids), dw = up(w), dy(gpu(), sizeof(float) * want.size());
  gpu().moe_experts(da.as<float>(), N, bank.on(gpu(), dv), dids.as<int>(), dw.as<float>(), k, dy.as<float>(),
                    with_taps ? &gt : nullptr);
  expect_near_scaled(down<float>(dy, want.size()), want, 1e-5, what + (with_taps ? " (tapped)" : ""));
  if (!with_taps) return;
  EXPECT_EQ(gs.key_tokens, cs.key_tokens) << what << ": the key taps saw other experts or tokens";
  EXPECT_EQ(gs.out_tokens, cs.out_tokens) << what << ": the output taps saw other experts or tokens";
  for (const auto& [e, rows] : cs.keys)
    expect_near_scaled(gs.keys[e], rows, 1e-5, what + ": keys of expert " + std::to_string(e));
}

TEST(CudaMoe, EveryWeightTypeWithAndWithoutTaps) {
  MOEDIT_REQUIRE_GPU();
  for (ops::WType t : {ops::WType::F32, ops::WType::BF16, ops::WType::F16, ops::WType::F8E4M3}) {
    const int E = 8, I = 40, H = 48;
    const Bank bank(E, I, H, std::vector<std::array<ops::WType, 3>>(size_t(E), {t, t, t}), 500);
    const std::string name = std::string("moe ") + (t == ops::WType::F32    ? "f32"
                                                    : t == ops::WType::BF16 ? "bf16"
                                                    : t == ops::WType::F16  ? "f16"
                                                                            : "fp8");
    for (bool taps : {false, true}) compare(bank, 37, 2, 6, 61, taps, name);  // experts 6, 7 unused
  }
}

TEST(CudaMoe, ManyRowsPerExpertAndMixedTypes) {
  MOEDIT_REQUIRE_GPU();
  using W = ops::WType;
  const int E = 6, I = 64, H = 80;
  std::vector<std::array<W, 3>> types(size_t(E), {W::BF16, W::BF16, W::BF16});
  types[2][2] = W::F32;  // an edited expert's down projection (fp32 copy)
  types[4][0] = W::F16;
  types[5] = {W::F8E4M3, W::F8E4M3, W::F8E4M3};
  const Bank bank(E, I, H, types, 700);
  for (bool taps : {false, true}) {
    compare(bank, 300, 4, 6, 71, taps, "moe 300 tokens top-4 of 6 (tall tiles)");
    compare(bank, 5, 2, 6, 72, taps, "moe 5 tokens top-2 of 6");
    compare(bank, 1, 3, 6, 73, taps, "moe one token (decoding)");
  }
}

// moe_experts_backward on both backends: da (= and +=) and dw.
void compare_backward(const Bank& bank, int N, int k, int used, uint64_t seed, const std::string& what) {
  std::vector<int> ids;
  std::vector<float> w;
  random_routing(N, k, used, seed, ids, w);
  const auto a = randn(size_t(N) * bank.H, seed + 1), dy = randn(size_t(N) * bank.H, seed + 2);
  std::vector<ops::WeightView> hv, dv;
  for (bool acc : {false, true}) {
    std::vector<float> da = randn(size_t(N) * bank.H, seed + 3), dw(size_t(N) * k);
    Buf ga = up(a), gids = up(ids), gw = up(w), gdy = up(dy), gda = up(da), gdw(gpu(), sizeof(float) * dw.size());
    cpu_backend().moe_experts_backward(a.data(), N, bank.on(cpu_backend(), hv), ids.data(), w.data(), k, dy.data(),
                                       da.data(), dw.data(), acc);
    gpu().moe_experts_backward(ga.as<float>(), N, bank.on(gpu(), dv), gids.as<int>(), gw.as<float>(), k,
                               gdy.as<float>(), gda.as<float>(), gdw.as<float>(), acc);
    expect_near_scaled(down<float>(gda, da.size()), da, 1e-5, what + (acc ? ": da +=" : ": da"));
    expect_near_scaled(down<float>(gdw, dw.size()), dw, 1e-5, what + ": dw");
  }
}

TEST(CudaMoe, BackwardMatchesTheCpu) {
  MOEDIT_REQUIRE_GPU();
  using W = ops::WType;
  const int E = 6, I = 40, H = 48;
  std::vector<std::array<W, 3>> types(size_t(E), {W::BF16, W::BF16, W::BF16});
  types[1] = {W::F32, W::F32, W::F32};
  types[2][2] = W::F32;
  types[4][0] = W::F16;
  types[5] = {W::F8E4M3, W::F8E4M3, W::F8E4M3};
  const Bank bank(E, I, H, types, 900);
  compare_backward(bank, 300, 2, 5, 81, "moe backward 300 tokens top-2 of 5 (tall tiles, expert 5 unused)");
  compare_backward(bank, 9, 3, 6, 82, "moe backward 9 tokens top-3 of 6");
  compare_backward(bank, 1, 2, 6, 83, "moe backward one token");
}

}  // namespace
}  // namespace moedit
