// The block backward over the backend's ops (model/seam_backward.h, what v* runs where the weights are) on the GPU
// against the same code on the CPU backend (which tests/test_seam_backward.cpp holds to the taped backward in
// float64): every gradient model (every family, MLA with and without q_lora, shared experts with and without a gate,
// a dense first layer), layers 1.. continuing a constant prefix, with no router edit and under steering with a
// norm-preserving boost and a mask. Prefix K/V and logits within 1e-5, the input gradient within 1e-4 of the largest
// |value| (fp32 sums in another order through two layers and back). Skips, saying so, where there is no GPU.
#include <gtest/gtest.h>

#include "model/seam_backward.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/gradient_models.h"

namespace moedit {
namespace {

std::vector<float> flat(const MatR& m) { return {m.data(), m.data() + m.size()}; }

struct StackRun {
  std::vector<float> kv, logits, dx;
};

// Layers 1.. over 4 + 3 tokens after a prefix of 2 + 3, on the model's backend.
StackRun run_stack(const Model& m) {
  const ModelConfig& c = m.config();
  const int first = 1;
  const std::vector<int> np = {2, 3}, na = {4, 3}, rows = {1, 3, 4, 6};
  grad::SeamStack pre(m, first), st(m, first);
  pre.forward(test::random_mat(5, c.hidden, 42).cast<float>(), layout_from_lengths(np, {0, 0}));
  const grad::PrefixKV<float> kv = pre.kv();
  StackRun r;
  for (int l = first; l < c.n_layers; ++l)
    for (int s = 0; s < 2; ++s)
      for (const MatR* x : {&kv.k[size_t(l)][size_t(s)], &kv.v[size_t(l)][size_t(s)]})
        r.kv.insert(r.kv.end(), x->data(), x->data() + x->size());
  st.forward(test::random_mat(7, c.hidden, 43).cast<float>(), layout_from_lengths(na, np), &kv);
  r.logits = flat(st.logits(rows));
  r.dx = flat(st.backward(test::random_mat(int(rows.size()), c.vocab_size, 44).cast<float>()));
  return r;
}

class CudaSeam : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaSeam, StackWithAPrefixMatchesTheCpu) {
  MOEDIT_REQUIRE_GPU();
  for (const auto& [fam, c] : test::gradient_configs()) {
    if (fam != GetParam()) continue;
    Model m(c, random_weights(c, 81, 0.3f));
    // No edit, and steering with a norm-preserving boost and a mask (the edit's backward runs on the host).
    const std::vector<InterventionSpec> edits = {InterventionSpec(), test::router_edit_specs(c)[3]};
    for (const InterventionSpec& e : edits) {
      m.set_router_edit(e.steer.layers.empty() ? nullptr : router_edit(e, c));
      const std::string what = fam + (e.steer.layers.empty() ? "" : " edit " + describe(e));
      m.set_backend(cpu_backend());
      const StackRun want = run_stack(m);
      m.set_backend(test::gpu());
      const StackRun got = run_stack(m);
      test::expect_near_scaled(got.kv, want.kv, 1e-5, what + " prefix K/V");
      test::expect_near_scaled(got.logits, want.logits, 1e-5, what + " logits");
      test::expect_near_scaled(got.dx, want.dx, 1e-4, what + " input gradient");
    }
  }
}

std::vector<std::string> families() {
  std::vector<std::string> v;
  for (const auto& [fam, c] : test::gradient_configs()) v.push_back(fam);
  return v;
}

INSTANTIATE_TEST_SUITE_P(Families, CudaSeam, ::testing::ValuesIn(families()),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace moedit
