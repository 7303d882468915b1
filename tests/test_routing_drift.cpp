// Routing drift (model/routing_drift.h): the metric against hand-computed values, and on a model whose layer-0
// experts change — the routers of layer 0 cannot move, later ones may.
#include <gtest/gtest.h>

#include <cmath>

#include "model/routing_drift.h"
#include "test_util.h"

namespace moedit {
namespace {

TEST(RoutingDrift, HandComputedValues) {
  // Two MoE layers (1 and 3), E = 3, k = 2, two tokens each.
  RouterSnapshot b, a;
  b.layers = a.layers = {1, 3};
  b.sets = {{{0, 1}, {1, 2}}, {{0, 2}, {0, 1}}};
  a.sets = {{{0, 1}, {0, 2}}, {{0, 2}, {0, 1}}};  // one cell of four changed (layer 1, token 1)
  MatR p(2, 3), q(2, 3);
  p << 0.5f, 0.25f, 0.25f, 0.2f, 0.4f, 0.4f;
  q << 0.5f, 0.25f, 0.25f, 0.4f, 0.2f, 0.4f;
  b.probs = {p, p};
  a.probs = {q, p};
  const RoutingDrift d = routing_drift(b, a);
  EXPECT_EQ(d.cells, 4);
  EXPECT_DOUBLE_EQ(d.changed_share, 0.25);
  // KL of layer 1, token 1: 0.2·ln(0.2/0.4) + 0.4·ln(0.4/0.2) = 0.2·ln 2; every other cell 0.
  EXPECT_NEAR(d.mean_kl, 0.2 * std::log(2.0) / 4, 1e-7);
  const RoutingDrift late = routing_drift(b, a, 2);  // layer 3 only
  EXPECT_EQ(late.cells, 2);
  EXPECT_EQ(late.changed_share, 0.0);
  EXPECT_EQ(late.mean_kl, 0.0);
  RouterSnapshot other = a;
  other.layers = {1, 2};
  EXPECT_THROW(routing_drift(b, other), std::invalid_argument);
}

TEST(RoutingDrift, AnEditMovesOnlyTheRoutersAfterIt) {
  for (const char* fam : test::kFamilies) {
    const ModelConfig c = test::tiny_config(fam);
    Model m(c, random_weights(c, 11, 0.3f));
    const std::vector<std::vector<int32_t>> seqs = {{5, 17, 3, 88, 42, 7}, {9, 2, 60}};
    const RouterSnapshot before = snapshot_routers(m, seqs);
    ASSERT_FALSE(before.layers.empty());
    EXPECT_EQ(routing_drift(before, snapshot_routers(m, seqs)).changed_share, 0.0);  // same model: none
    const VecF sums = before.probs[0].rowwise().sum();  // every router distribution sums to 1
    for (Eigen::Index t = 0; t < sums.size(); ++t) EXPECT_NEAR(sums[t], 1.f, 1e-5) << fam;
    // A large change to every expert of the first MoE layer.
    const int first = before.layers[0];
    for (auto& w : m.mutable_weights().layers[size_t(first)].ffn.experts.down) {
      float* p = w.mutable_f32();
      for (int64_t i = 0; i < w.size(); ++i) p[i] = -3.f * p[i] + 0.05f;
    }
    const RouterSnapshot after = snapshot_routers(m, seqs);
    const RoutingDrift at_first = routing_drift(before, after, 0), later = routing_drift(before, after, first + 1);
    EXPECT_EQ(at_first.cells - later.cells, int64_t(before.sets[0].size()));  // layer `first`'s cells
    // The first MoE layer's routers read an unchanged input: no cell of it moved, so all drift is later.
    EXPECT_DOUBLE_EQ(at_first.changed_share * double(at_first.cells), later.changed_share * double(later.cells)) << fam;
    EXPECT_NEAR(at_first.mean_kl * double(at_first.cells), later.mean_kl * double(later.cells), 1e-9) << fam;
    if (before.layers.size() > 1) {
      EXPECT_GT(later.mean_kl, 0.0) << fam;
    }
  }
}

}  // namespace
}  // namespace moedit
