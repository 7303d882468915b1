// The block backward over the backend's ops (model/seam_backward.h) on the CPU backend: every layer of every family,
// under every kind of standing router edit, against the taped backward in float64 (model/backward.h, itself held to
// finite differences by test_backward.cpp); its forward is Model::forward's bit for bit; the stack with a constant
// prefix against the taped stack in float64.
#include <gtest/gtest.h>

#include "gradient_models.h"
#include "model/backward.h"
#include "model/seam_backward.h"
#include "test_util.h"

namespace moedit {
namespace {

using MatD = MatT<double>;
using test::for_each_gradient_model;
using test::random_mat;

// The float result against the float64 one: max |got − want| / max |want|.
double rel_err(const MatR& got, const MatD& want) {
  return (got.cast<double>() - want).cwiseAbs().maxCoeff() / std::max(want.cwiseAbs().maxCoeff(), 1e-300);
}

// fp32 against the float64 reference: the forward to 1e-5 of its scale, the input gradient to 1e-4.
constexpr double kFwdTol = 1e-5, kGradTol = 1e-4;

// Block l's forward and input gradient of Σ R ⊙ out at X, both ways; returns {forward error, gradient error}.
std::pair<double, double> block_errors(const Model& m, int l, const MatD& X, const MatD& R) {
  const TokenLayout lay = layout_from_lengths({6, 3}, {0, 0});
  MatD y = X, d_ref = R;
  grad::BlockTape<double> tp;
  grad::block_forward(m, l, y, lay, static_cast<const grad::PrefixKV<double>*>(nullptr), tp);
  grad::block_backward(m, l, tp, d_ref);
  MatR yf = X.cast<float>(), d = R.cast<float>();
  grad::SeamTape st;
  grad::seam_block_forward(m, l, yf, lay, nullptr, st);
  grad::seam_block_backward(m, l, st, d);
  return {rel_err(yf, y), rel_err(d, d_ref)};
}

TEST(SeamBackward, EveryBlockOfEveryFamilyMatchesTheTapedBackward) {
  test::SerialOps serial;
  for_each_gradient_model(61, [&](const std::string& fam, const ModelConfig& c, Model& m) {
    const MatD X = random_mat(9, c.hidden, 62), R = random_mat(9, c.hidden, 63);
    for (int l = 0; l < c.n_layers; ++l) {
      const auto [fwd, grad] = block_errors(m, l, X, R);
      EXPECT_LE(fwd, kFwdTol) << fam << " layer " << l;
      EXPECT_LE(grad, kGradTol) << fam << " layer " << l;
    }
  });
}

TEST(SeamBackward, RouterEditsOfEveryKind) {
  test::SerialOps serial;
  for_each_gradient_model(71, [&](const std::string& fam, const ModelConfig& c, Model& m) {
    const MatD X = random_mat(9, c.hidden, 72), R = random_mat(9, c.hidden, 73);
    for (const InterventionSpec& spec : test::router_edit_specs(c)) {
      m.set_router_edit(router_edit(spec, c));
      for (int l = 0; l < c.n_layers; ++l) {
        if (!c.is_moe(l)) continue;
        const auto [fwd, grad] = block_errors(m, l, X, R);
        EXPECT_LE(fwd, kFwdTol) << fam << " layer " << l << " edit " << describe(spec);
        EXPECT_LE(grad, kGradTol) << fam << " layer " << l << " edit " << describe(spec);
      }
    }
    m.set_router_edit(nullptr);
  });
}

// From the embeddings, the stack's residual stream is Model::forward's bit for bit (the same block code, no tape
// arithmetic) and its logits equal Model::forward's to rounding.
TEST(SeamStack, ForwardIsModelForward) {
  test::SerialOps serial;
  for_each_gradient_model(31, [&](const std::string& fam, const ModelConfig& c, Model& m) {
    const std::vector<std::vector<int32_t>> seqs = {{5, 17, 3, 58, 42, 7, 7, 1}, {9, 2, 33, 34, 35}};
    const ForwardOutput ref = m.forward(seqs);
    const TokenLayout lay = make_layout(seqs, nullptr);
    std::vector<int32_t> flat;
    for (const auto& s : seqs) flat.insert(flat.end(), s.begin(), s.end());
    grad::SeamStack st(m, 0);
    st.forward(m.embed(flat, lay, nullptr), lay);
    EXPECT_TRUE(st.hidden() == ref.hidden) << fam;
    std::vector<int> rows(lay.seq.size());
    for (size_t i = 0; i < rows.size(); ++i) rows[i] = int(i);
    const MatR lg = st.logits(rows);
    EXPECT_LE((lg - ref.logits).cwiseAbs().maxCoeff(), 1e-6f * ref.logits.cwiseAbs().maxCoeff()) << fam;
  });
}

// Layers 1.. over 4 + 3 tokens continuing a constant prefix of 2 + 3 (K/V from the stack's own kv()): K/V, logits of
// four rows and the input gradient of Σ R ⊙ logits against the taped stack in float64; the prefix's device rows
// against its host rows uploaded.
TEST(SeamStack, WithAPrefixMatchesTheTapedStack) {
  test::SerialOps serial;
  for_each_gradient_model(41, [&](const std::string& fam, const ModelConfig& c, Model& m) {
    const int first = 1;
    const std::vector<int> np = {2, 3}, na = {4, 3}, rows = {1, 3, 4, 6};
    const MatD P = random_mat(5, c.hidden, 42), X = random_mat(7, c.hidden, 43);
    const MatD R = random_mat(int(rows.size()), c.vocab_size, 44);
    const TokenLayout pre_lay = layout_from_lengths(np, {0, 0}), lay = layout_from_lengths(na, np);

    grad::TapedStack<double> pre_ref(m, first), ref(m, first);
    pre_ref.forward(P, pre_lay);
    const grad::PrefixKV<double> kv_ref = pre_ref.kv();
    ref.forward(X, lay, &kv_ref);
    const MatD lg_ref = ref.logits(rows), dx_ref = ref.backward(R);

    grad::SeamStack pre(m, first), st(m, first);
    pre.forward(P.cast<float>(), pre_lay);
    const grad::PrefixKV<float> kv = pre.kv();
    for (int l = first; l < c.n_layers; ++l)
      for (int s = 0; s < 2; ++s) {
        EXPECT_LE(rel_err(kv.k[size_t(l)][size_t(s)], kv_ref.k[size_t(l)][size_t(s)]), kFwdTol) << fam;
        EXPECT_LE(rel_err(kv.v[size_t(l)][size_t(s)], kv_ref.v[size_t(l)][size_t(s)]), kFwdTol) << fam;
      }
    st.forward(X.cast<float>(), lay, &kv);
    const MatR lg = st.logits(rows);
    EXPECT_LE(rel_err(lg, lg_ref), kFwdTol) << fam;
    EXPECT_LE(rel_err(st.backward(R.cast<float>()), dx_ref), kGradTol) << fam;
    // The prefix read from the backend's memory (kv.dev) or uploaded from its host rows: the same logits.
    ASSERT_TRUE(kv.dev) << fam;
    grad::PrefixKV<float> host_only = kv;
    host_only.dev.reset();
    grad::SeamStack up(m, first);
    up.forward(X.cast<float>(), lay, &host_only);
    EXPECT_TRUE(up.logits(rows) == lg) << fam;
  });
}

}  // namespace
}  // namespace moedit
