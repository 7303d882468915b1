// Issue 20 k-sparse probes: F1 by hand, the mean-difference ranking, a planted feature neuron recovered exactly,
// the features file and the bundled feature builder, and the activations the probes read.
#include <gtest/gtest.h>

#include <random>

#include "io/errors.h"
#include "test_util.h"
#include "tracing/probe.h"
#include "tracing/probe_features.h"

namespace moedit {
namespace {

TEST(Probe, F1ByHand) {
  // tp 2, fp 1, fn 1 → 2·2 / (4 + 1 + 1)
  EXPECT_DOUBLE_EQ(f1_score({1, 1, 0, 0, 1}, {1, 0, 1, 0, 1}), 4.0 / 6.0);
  EXPECT_DOUBLE_EQ(f1_score({1, 0}, {1, 0}), 1.0);
  EXPECT_DOUBLE_EQ(f1_score({0, 0}, {0, 0}), 0.0);
  EXPECT_DOUBLE_EQ(f1_score({1, 1, 1, 0}, {0, 0, 0, 1}), 0.0);
}

TEST(Probe, MeanDifferenceRanking) {
  MatR x(4, 3);
  x << 1, 5, 0,  //
      1, 3, 2,   //
      0, 1, 0,   //
      0, 1, 1;
  // y = 1 on rows 0, 1: |mean diff| = 1, 3, 0.5
  EXPECT_EQ(rank_by_mean_difference(x, {1, 1, 0, 0}), (std::vector<int>{1, 0, 2}));
  // Only rows 0 and 2 used: 1, 4, 0
  EXPECT_EQ(rank_by_mean_difference(x, {1, 1, 0, 0}, {1, 0, 1, 0}), (std::vector<int>{1, 0, 2}));
}

TEST(Probe, RecoversAPlantedFeatureNeuron) {
  std::mt19937 rng(3);
  std::normal_distribution<float> g(0, 1);
  std::bernoulli_distribution coin(0.3);
  const int n = 500, d = 80, planted = 37;
  MatR x(n, d);
  std::vector<uint8_t> y(n), test(n);
  for (int r = 0; r < n; ++r) {
    y[size_t(r)] = coin(rng);
    test[size_t(r)] = r % 5 == 0;
    for (int j = 0; j < d; ++j) x(r, j) = g(rng);
    x(r, planted) = y[size_t(r)];  // this neuron is the feature
  }
  const auto res = k_sparse_probes(x, y, test, {1, 2, 4, 128});
  ASSERT_EQ(res.size(), 3u);  // k = 128 > d skipped
  EXPECT_EQ(res[0].k, 1);
  EXPECT_EQ(res[0].neurons, (std::vector<int>{planted}));
  EXPECT_DOUBLE_EQ(res[0].f1, 1.0);
  EXPECT_EQ(res[1].neurons[0], planted);
  EXPECT_EQ(res[1].neurons.size(), 2u);
  EXPECT_GT(res[0].test_pos, 0);
  // Without the planted neuron no probe is perfect.
  for (int r = 0; r < n; ++r) x(r, planted) = g(rng);
  EXPECT_LT(k_sparse_probes(x, y, test, {1})[0].f1, 0.9);
}

TEST(Probe, LogisticFitsASeparableThreshold) {
  Eigen::MatrixXd x(6, 1);
  x << -3, -2, -1, 1, 2, 3;
  const Logistic m = fit_logistic(x, {0, 0, 0, 1, 1, 1});
  Eigen::MatrixXd t(2, 1);
  t << -0.5, 0.5;
  EXPECT_EQ(m.predict(t), (std::vector<uint8_t>{0, 1}));
  EXPECT_GT(m.w[0], 0);
}

TEST(Probe, FeaturesFileRoundTripAndErrors) {
  test::TempDir d;
  FeatureSet s;
  s.features = {"digit"};
  s.texts.push_back({{1, 2, 3}, "a 1 b", {{"digit", {0, 1, 0}}}});
  test::write_file(d / "f.json", features_json(s));
  const FeatureSet back = load_features(d / "f.json");
  EXPECT_EQ(back.texts[0].ids, (std::vector<int32_t>{1, 2, 3}));
  EXPECT_EQ(back.texts[0].labels.at("digit"), (std::vector<uint8_t>{0, 1, 0}));
  test::write_file(d / "g.json", R"({"features": ["digit"], "texts": [{"ids": [1, 2, 3], "labels": {"digit": [0, 1]}}]})");
  try {
    load_features(d / "g.json");
    FAIL() << "no error";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("field 'texts[0].labels.digit' has 2 labels for 3 ids"), std::string::npos) << e.what();
  }
}

TEST(Probe, BundledFeatureBuilderLabelsTokens) {
  const Tokenizer tok = Tokenizer::from_file(test::source_dir() + "/models/moedit-demo/tokenizer.json");
  CounterFactRecord r;
  r.prompt = "{} was born in";
  r.subject = "Albert Einstein";
  r.target_true = "Ulm";
  const FeatureSet s = build_probe_features(tok, {"It cost 42 dollars (in 1990). Then it fell."}, {r});
  ASSERT_EQ(s.texts.size(), 2u);
  const auto& w = s.texts[0];
  auto tokens_where = [&](const FeatureText& t, const std::string& f) {
    std::string out;
    for (size_t i = 0; i < t.ids.size(); ++i)
      if (t.labels.at(f)[i]) out += "[" + tok.decode({t.ids[i]}) + "]";
    return out;
  };
  const std::string digits = tokens_where(w, "digit");
  EXPECT_NE(digits.find("4"), std::string::npos) << digits;
  EXPECT_NE(digits.find("9"), std::string::npos) << digits;
  EXPECT_NE(tokens_where(w, "closing_bracket").find(")"), std::string::npos);
  const std::string starts = tokens_where(w, "sentence_start");
  EXPECT_NE(starts.find("It"), std::string::npos) << starts;
  EXPECT_NE(starts.find("[ The"), std::string::npos) << starts;  // "Then" is " The" + "n" in this vocabulary
  EXPECT_EQ(tokens_where(w, "subject"), "");
  const std::string subj = tokens_where(s.texts[1], "subject");
  EXPECT_NE(subj.find("Al"), std::string::npos) << subj;
  EXPECT_EQ(subj.find("born"), std::string::npos) << subj;
}

TEST(Probe, ShippedFeatureSetLoads) {
  const FeatureSet s = load_features(test::source_dir() + "/datasets/data/probe/features_demo.json");
  EXPECT_EQ(s.features, (std::vector<std::string>{"digit", "sentence_start", "subject", "closing_bracket"}));
  ASSERT_EQ(s.texts.size(), 250u);
  int subject = 0;
  for (const auto& t : s.texts)
    for (uint8_t v : t.labels.at("subject")) subject += v;
  EXPECT_GT(subject, 150);  // every CounterFact text has its subject marked
}

TEST(Probe, LayerActivationsCoverEveryRoutedToken) {
  const auto m = Model::load(test::fixture("models/qwen2_moe"));
  const ModelConfig& c = m->config();
  int layer = -1;
  for (int l = 0; l < c.n_layers && layer < 0; ++l)
    if (c.is_moe(l)) layer = l;
  ASSERT_GE(layer, 0);
  const std::vector<std::vector<int32_t>> texts = {{1, 5, 7, 2}, {3, 4}, {9, 8, 6}};
  const LayerActivations a = layer_activations(*m, texts, layer, 5);  // batches {t0}, {t1, t2}
  EXPECT_EQ(a.tokens, 9);
  size_t rows = 0;
  std::vector<int> per_token(9, 0);
  for (int e = 0; e < c.n_experts; ++e) {
    EXPECT_EQ(size_t(a.expert[size_t(e)].rows()), a.expert_rows[size_t(e)].size());
    rows += a.expert_rows[size_t(e)].size();
    for (int g : a.expert_rows[size_t(e)]) ++per_token[size_t(g)];
  }
  EXPECT_EQ(rows, size_t(9 * c.top_k));
  for (int n : per_token) EXPECT_EQ(n, c.top_k);
  // The same tokens in one batch give the same activations (global indices follow the texts).
  const LayerActivations b = layer_activations(*m, texts, layer, 4096);
  for (int e = 0; e < c.n_experts; ++e) {
    ASSERT_EQ(b.expert_rows[size_t(e)], a.expert_rows[size_t(e)]);
    if (a.expert[size_t(e)].rows() == 0) continue;  // an expert no token chose
    EXPECT_LT((b.expert[size_t(e)] - a.expert[size_t(e)]).cwiseAbs().maxCoeff() + 0.f, 1e-5f);
  }
  if (c.shared_width > 0) {
    EXPECT_EQ(a.shared.rows(), 9);
  }
}

}  // namespace
}  // namespace moedit
