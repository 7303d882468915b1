// Expert activation profiles, profile comparison, domain experts, driver experts and corpus loading
// (tracing/routing_profile) against counts from the HF reference outputs, hand-computed scores and full forwards.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "io/errors.h"
#include "model/config.h"
#include "model/model.h"
#include "routing_util.h"
#include "tokenizer/tokenizer.h"
#include "test_util.h"
#include "tracing/interventions.h"
#include "tracing/routing.h"
#include "tracing/routing_profile.h"

namespace moedit {
namespace {

using namespace routing_test;

// ---- activation profiles, comparison, domain experts ------------------------------------------------------------

TEST(Profiles, FrequencyIsCountOverTokens) {
  Fixture f("qwen3_moe");  // top-4 of 8, 3 layers, layer 0 dense
  const ModelConfig& c = f.cfg();
  const ActivationProfile p = activation_profile(*f.model, f.seqs);
  EXPECT_EQ(p.layers, moe_layers(c));
  EXPECT_EQ(p.tokens, 9 + 5 + 13);
  Eigen::MatrixXd want = Eigen::MatrixXd::Zero(long(p.layers.size()), c.n_experts);
  for (int b = 0; b < 3; ++b) {
    const int S = int(f.seqs[size_t(b)].size());
    const MatR ids = f.mat("expert_ids", b);
    for (size_t i = 0; i < p.layers.size(); ++i)
      for (int t = 0; t < S; ++t)
        for (int j = 0; j < c.top_k; ++j) want(long(i), int(ids(p.layers[i] * S + t, j))) += 1;
  }
  EXPECT_EQ(p.counts, want);
  const Eigen::MatrixXd fr = p.frequency(), ld = p.load();
  for (long i = 0; i < fr.rows(); ++i) {
    EXPECT_NEAR(fr.row(i).sum(), c.top_k, 1e-12);
    EXPECT_NEAR(ld.row(i).sum(), 1.0, 1e-12);
    for (int e = 0; e < c.n_experts; ++e) EXPECT_DOUBLE_EQ(fr(i, e), want(i, e) / 27.0);
  }
  // A corpus profile is the sum of its texts' profiles.
  ActivationProfile sum = ActivationProfile::empty_for(c);
  for (const auto& s : f.seqs) sum.add(activation_profile(*f.model, {s}));
  EXPECT_EQ(sum.counts, p.counts);
  EXPECT_EQ(sum.tokens, p.tokens);
  // CSV header and first row.
  const std::string csv = p.to_csv();
  EXPECT_EQ(csv.substr(0, csv.find('\n')), "layer,e0,e1,e2,e3,e4,e5,e6,e7");
  EXPECT_EQ(csv.substr(csv.find('\n') + 1, 2), "1,");
}

TEST(Profiles, ComparisonAndDomainScoresByHand) {
  ModelConfig cfg = parse_config({{"model_type", "mixtral"}, {"vocab_size", 16}, {"hidden_size", 8},
                                  {"num_hidden_layers", 1}, {"num_attention_heads", 2}, {"num_key_value_heads", 2},
                                  {"intermediate_size", 8},
                                  {"num_local_experts", 3}, {"num_experts_per_tok", 1}},
                                 "mini.json");
  ActivationProfile a = ActivationProfile::empty_for(cfg), b = ActivationProfile::empty_for(cfg);
  a.tokens = 100;
  b.tokens = 50;
  a.counts.row(0) << 40, 50, 10;  // rates .4 .5 .1
  b.counts.row(0) << 5, 20, 25;   // rates .1 .4 .5
  const ProfileComparison cmp = compare_profiles(a, b, "A", "B");
  ASSERT_EQ(cmp.experts.size(), 3u);
  EXPECT_EQ(cmp.experts[0].expert, 0);  // +0.3
  EXPECT_NEAR(cmp.experts[0].diff, 0.3, 1e-12);
  EXPECT_NEAR(cmp.experts[0].log2_ratio, std::log2(0.4001 / 0.1001), 1e-12);
  EXPECT_EQ(cmp.more_in(false, 5).size(), 1u);
  EXPECT_EQ(cmp.more_in(false, 5)[0].expert, 2);  // −0.4
  EXPECT_EQ(cmp.more_in(true, 5).size(), 2u);

  const DomainAnalysis d = domain_experts({"A", "B"}, {a, b}, 0.2, 0.0);
  ASSERT_EQ(d.experts.size(), 3u);
  auto find = [&](int e) {
    for (const auto& s : d.experts)
      if (s.expert == e) return s;
    return DomainExpertScore{};
  };
  // Expert 0: rates .4/.1 → shares .8/.2; H = −(.8 ln .8 + .2 ln .2) = 0.5004024; certainty 1 − H/ln 2 = 0.2780719;
  // score .8 · 0.2780719 = 0.2224575 ≥ 0.2: strong for A.
  const auto e0 = find(0);
  EXPECT_EQ(e0.domain, 0);
  EXPECT_NEAR(e0.share[0], 0.8, 1e-12);
  EXPECT_NEAR(e0.entropy, 0.5004024, 1e-6);
  EXPECT_NEAR(e0.certainty, 0.2780719, 1e-6);
  EXPECT_NEAR(e0.score, 0.2224575, 1e-6);
  EXPECT_TRUE(e0.strong);
  // Expert 1: .5/.4 → .5556/.4444, nearly even: weak.
  const auto e1 = find(1);
  EXPECT_NEAR(e1.share[0], 5.0 / 9.0, 1e-12);
  EXPECT_LT(e1.score, 0.01);
  EXPECT_FALSE(e1.strong);
  // Expert 2: .1/.5 → 1/6, 5/6: H = 0.4505612, certainty 0.3499776, score 0.2916480: strong for B.
  const auto e2 = find(2);
  EXPECT_EQ(e2.domain, 1);
  EXPECT_NEAR(e2.score, (5.0 / 6.0) * (1 - (-(1 / 6.0) * std::log(1 / 6.0) - (5 / 6.0) * std::log(5 / 6.0)) /
                                               std::log(2.0)),
              1e-12);
  EXPECT_NEAR(e2.score, 0.2916480, 1e-6);
  EXPECT_EQ(d.experts[0].expert, 2);  // ranked by score
  EXPECT_EQ(d.strong_for(0).size(), 1u);
  EXPECT_EQ(d.strong_for(1).size(), 1u);
  // min_rate filters weakly used experts.
  EXPECT_EQ(domain_experts({"A", "B"}, {a, b}, 0.2, 0.45).strong_for(0).size(), 0u);
}

// ---- driver experts ---------------------------------------------------------------------------------------------

TEST(Drivers, KLMatchesAFullPerturbedForward) {
  Fixture f("qwen2_moe");
  const ModelConfig& c = f.cfg();
  DriverOptions o;
  o.max_batch_tokens = 16;  // two batches
  o.layers = {3, 1};        // resumes from the cached residual at layers 1 and 3 (layer 2 is dense)
  const DriverAnalysis d = driver_experts(*f.model, f.seqs, o);
  EXPECT_EQ(d.tokens, 27);
  EXPECT_EQ(d.experts.size(), size_t(2 * c.n_experts));
  for (size_t i = 1; i < d.experts.size(); ++i) EXPECT_GE(d.experts[i - 1].mean_kl, d.experts[i].mean_kl);
  // Recompute the top driver and one other expert the naive way: full forward with a mask hook, KL per position.
  const MatR clean = f.model->forward(f.seqs).logits;
  for (size_t pick : {size_t(0), size_t(5)}) {
    const DriverExpert& de = d.experts[pick];
    InterventionSpec s;
    s.mask = {{de.layer, de.expert}};
    Hooks h;
    install_interventions(s, c, h);
    ForwardOptions fo;
    fo.hooks = &h;
    const MatR pert = f.model->forward(f.seqs, fo).logits;
    double sum = 0, mx = 0;
    for (int t = 0; t < int(clean.rows()); ++t) {
      const auto p = softmax_d(clean.row(t).data(), int(clean.cols()));
      const auto q = softmax_d(pert.row(t).data(), int(pert.cols()));
      double kl = 0;
      for (size_t v = 0; v < p.size(); ++v) kl += p[v] * std::log(p[v] / q[v]);
      sum += kl;
      mx = std::max(mx, kl);
    }
    EXPECT_NEAR(de.mean_kl, sum / 27, 1e-4 * std::max(1e-3, sum / 27)) << "layer " << de.layer << " e " << de.expert;
    EXPECT_NEAR(de.max_kl, mx, 1e-4 * std::max(1e-3, mx));
  }
  EXPECT_GT(d.experts[0].mean_kl, 0.0);
  // Activation rates are the clean profile's frequencies.
  const ActivationProfile p = activation_profile(*f.model, f.seqs);
  for (const auto& de : d.experts) {
    const long row = long(std::find(p.layers.begin(), p.layers.end(), de.layer) - p.layers.begin());
    EXPECT_DOUBLE_EQ(de.activation_rate, p.frequency()(row, de.expert));
  }
}

TEST(Drivers, TopKThenSoftmaxUnusedExpertHasNoEffect) {
  // GraniteMoE's weights depend only on the selected logits: masking an expert no token selects changes nothing.
  Fixture f("granitemoe");
  DriverOptions o;
  const DriverAnalysis d = driver_experts(*f.model, f.seqs, o);
  int unused = 0;
  for (const auto& de : d.experts)
    if (de.activation_rate == 0.0) {
      ++unused;
      EXPECT_LT(de.mean_kl, 1e-9);
    } else {
      EXPECT_GT(de.mean_kl, 0.0);
    }
  // Scale 1 is the identity.
  o.kind = Perturbation::Scale;
  o.scale = 1.f;
  for (const auto& de : driver_experts(*f.model, f.seqs, o).experts) EXPECT_LT(de.mean_kl, 1e-9);
  (void)unused;
}

// ---- corpora ------------------------------------------------------------------------------------------------------

TEST(Corpus, IdsFilesChunkAndLimit) {
  test::TempDir tmp;
  test::write_file(tmp / "a.ids", "1,2,3,4,5\n\n 6, 7 \n8\n");
  CorpusOptions o;
  o.max_seq_len = 2;
  auto s = load_corpus(tmp / "a.ids", nullptr, o);
  EXPECT_EQ(s, (std::vector<std::vector<int32_t>>{{1, 2}, {3, 4}, {5}, {6, 7}, {8}}));
  o.max_tokens = 4;
  s = load_corpus(tmp / "a.ids", nullptr, o);
  EXPECT_EQ(s, (std::vector<std::vector<int32_t>>{{1, 2}, {3, 4}}));
  o = {};
  o.max_docs = 2;
  EXPECT_EQ(load_corpus(tmp / "a.ids", nullptr, o).size(), 2u);
  test::write_file(tmp / "bad.ids", "1,x\n");
  EXPECT_THROW(load_corpus(tmp / "bad.ids", nullptr, {}), InputError);
  test::write_file(tmp / "t.txt", "hello\n");
  EXPECT_THROW(load_corpus(tmp / "t.txt", nullptr, {}), InputError);  // text needs a tokenizer
  test::write_file(tmp / "empty.ids", "\n\n");
  EXPECT_THROW(load_corpus(tmp / "empty.ids", nullptr, {}), InputError);
  const Tokenizer tok = Tokenizer::from_json(char_tokenizer_json());
  test::write_file(tmp / "t.jsonl", "{\"text\": \"ab c\"}\n\"d\"\n");
  EXPECT_EQ(load_corpus(tmp / "t.jsonl", &tok, {}),
            (std::vector<std::vector<int32_t>>{{'a' - 32, 'b' - 32, 0, 'c' - 32}, {'d' - 32}}));
  test::write_file(tmp / "cf.json", kMiniCounterFact);
  EXPECT_EQ(load_corpus(tmp / "cf.json", &tok, {}).size(), 2u);  // two rewrite prompts, no neighborhood prompts
}

}  // namespace
}  // namespace moedit
