// Per-token routing (tracing/routing, tracing/interventions) on the HF fixture checkpoints: top-k sets, entropies and
// KL against values computed here from the reference outputs HF transformers produced (reference.safetensors),
// overlaps by hand, masking and boosting, and paraphrase consistency (CounterFact pairs, the bundled demo model).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "datasets/counterfact.h"
#include "io/errors.h"
#include "model/model.h"
#include "routing_util.h"
#include "tokenizer/tokenizer.h"
#include "test_util.h"
#include "tracing/interventions.h"
#include "tracing/routing.h"

namespace moedit {
namespace {

using json = nlohmann::json;
using namespace routing_test;

const char* kAll[] = {"mixtral_gqa", "mixtral_fused", "qwen2_moe", "qwen2_moe_fused_norm", "qwen3_moe",
                      "qwen3_moe_nonorm", "olmoe", "olmoe_clip", "granitemoe"};

std::set<int> set_of(const IdMat& ids, int t) { return {ids.row(t).data(), ids.row(t).data() + ids.cols()}; }

// ---- interventions: parsing and validation ---------------------------------------------------------------------

TEST(Interventions, ParsesSpecs) {
  const auto m = parse_mask_spec("1:3, 2:0");
  ASSERT_EQ(m.size(), 2u);
  EXPECT_EQ(m[0], (ExpertRef{1, 3}));
  EXPECT_EQ(m[1], (ExpertRef{2, 0}));
  const auto b = parse_boost_spec("0:5=2.5,3:1=-1e3");
  ASSERT_EQ(b.size(), 2u);
  EXPECT_EQ(b[0].layer, 0);
  EXPECT_EQ(b[0].expert, 5);
  EXPECT_FLOAT_EQ(b[0].c, 2.5f);
  EXPECT_FLOAT_EQ(b[1].c, -1000.f);
  EXPECT_EQ(parse_boost_mode("norm"), BoostMode::NormPreserving);
  EXPECT_EQ(parse_boost_mode("add"), BoostMode::Add);
}

TEST(Interventions, BadSpecsNameTheFlag) {
  for (const char* bad : {"", "1", "1-3", "a:1", "1:b", "1:3,", "-1:2", "1:2:3", "1:2.5"}) {
    try {
      parse_mask_spec(bad, "--mask");
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find("--mask"), std::string::npos) << e.what();
    }
  }
  for (const char* bad : {"1:2", "1:2=", "1:2=x", "1:2=1e99", "1:2=nan", "x:2=1"}) {
    try {
      parse_boost_spec(bad, "--boost");
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find("--boost"), std::string::npos) << e.what();
    }
  }
  EXPECT_THROW(parse_boost_mode("mul"), InputError);
}

TEST(Interventions, ValidatesAgainstTheModel) {
  Fixture f("qwen2_moe");  // 4 layers, layer 2 dense, 8 experts, top-3
  auto expect_bad = [&](InterventionSpec s, const std::string& flag, const std::string& what) {
    try {
      validate_interventions(s, f.cfg());
      ADD_FAILURE() << "accepted " << describe(s);
    } catch (const InputError& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(flag), std::string::npos) << msg;
      EXPECT_NE(msg.find(what), std::string::npos) << msg;
    }
  };
  InterventionSpec s;
  s.mask = {{4, 0}};
  expect_bad(s, "--mask", "layer 4 out of range");
  s.mask = {{1, 8}};
  expect_bad(s, "--mask", "expert 8 out of range");
  s.mask = {{2, 0}};
  expect_bad(s, "--mask", "dense");
  s.mask = {{1, 0}, {1, 1}, {1, 2}, {1, 3}, {1, 4}, {1, 5}};  // leaves 2 < top_k = 3
  expect_bad(s, "--mask", "fewer than top_k");
  s.mask = {{1, 0}};
  s.boost = {{1, 0, 1.f}};
  expect_bad(s, "--boost", "also given to --mask");
  s.mask.clear();
  s.boost = {{0, 9, 1.f}};
  expect_bad(s, "--boost", "expert 9 out of range");
  s.boost = {{1, 7, 1.f}};
  s.mask = {{1, 0}, {1, 1}, {1, 2}, {1, 3}, {1, 4}};  // leaves exactly 3: fine
  EXPECT_NO_THROW(validate_interventions(s, f.cfg()));
}

TEST(Interventions, LogitEditsByHand) {
  MatR z(2, 4);
  z << 1.f, -2.f, 3.f, 0.5f,   //
      -1.f, -0.5f, -3.f, -2.f;
  InterventionSpec s;
  s.boost = {{0, 1, 2.f}};
  s.boost_mode = BoostMode::NormPreserving;
  MatR a = z;
  apply_interventions(s, 0, a);
  // Row 0: z1 ← 0, max = 3, z1 ← 2·3 = 6. Row 1: z1 ← 0, max = 0 (the zeroed logit), z1 ← 0.
  EXPECT_FLOAT_EQ(a(0, 1), 6.f);
  EXPECT_FLOAT_EQ(a(1, 1), 0.f);
  EXPECT_FLOAT_EQ(a(0, 0), 1.f);
  s.boost_mode = BoostMode::Add;
  s.mask = {{0, 2}};
  a = z;
  apply_interventions(s, 0, a);
  EXPECT_FLOAT_EQ(a(0, 1), 0.f);    // −2 + 2
  EXPECT_FLOAT_EQ(a(1, 1), 1.5f);   // −0.5 + 2
  EXPECT_EQ(a(0, 2), -std::numeric_limits<float>::infinity());
  EXPECT_EQ(a(1, 2), -std::numeric_limits<float>::infinity());
  a = z;
  apply_interventions(s, 1, a);  // other layer: untouched
  EXPECT_EQ(a, z);
}

// Steering with a cluster vector v, forms 3–5, against hand-computed logits (m = the row's max before steering).
TEST(Interventions, SteeringFormsByHand) {
  MatR z(2, 4);
  z << 1.f, -2.f, 3.f, 0.5f,  //
      -1.f, -0.5f, -3.f, -2.f;
  InterventionSpec s;
  s.steer.layers = {0};
  s.steer.vector = {VecF(4)};
  s.steer.vector[0] << 0.f, 1.f, 0.5f, 0.f;
  s.steer.c = 2.f;
  auto run = [&](int form) {
    s.steer.form = form;
    MatR a = z;
    apply_interventions(s, 0, a);
    return a;
  };
  MatR a = run(3);  // z + c·v
  EXPECT_FLOAT_EQ(a(0, 1), 0.f);   // −2 + 2·1
  EXPECT_FLOAT_EQ(a(0, 2), 4.f);   // 3 + 2·0.5
  EXPECT_FLOAT_EQ(a(1, 1), 1.5f);  // −0.5 + 2
  EXPECT_FLOAT_EQ(a(0, 0), 1.f);
  a = run(4);  // z + m·c·v: m = 3 (row 0), −0.5 (row 1)
  EXPECT_FLOAT_EQ(a(0, 1), 4.f);     // −2 + 3·2·1
  EXPECT_FLOAT_EQ(a(0, 2), 6.f);     // 3 + 3·2·0.5
  EXPECT_FLOAT_EQ(a(1, 1), -1.5f);   // −0.5 + (−0.5)·2·1
  EXPECT_FLOAT_EQ(a(1, 2), -3.5f);   // −3 + (−0.5)·2·0.5
  a = run(5);  // Z_v(z) + m·c·v
  EXPECT_FLOAT_EQ(a(0, 1), 6.f);     // 0 + 3·2·1
  EXPECT_FLOAT_EQ(a(0, 2), 3.f);     // 0 + 3·2·0.5
  EXPECT_FLOAT_EQ(a(0, 3), 0.5f);    // v = 0: untouched
  EXPECT_FLOAT_EQ(a(1, 1), -1.f);    // 0 + (−0.5)·2·1
  MatR b = z;
  apply_interventions(s, 1, b);  // another layer: untouched
  EXPECT_EQ(b, z);
}

TEST(Interventions, SteeringFilesAreReadAndChecked) {
  test::TempDir tmp;
  test::write_file(tmp / "s.json", R"({"layers": [1], "vector": [[0.1, 0.5, 0.2, 0.9, 0.0, 0.3]]})");
  const Steering st = load_steering(tmp / "s.json", 0.3);  // binarised at 0.3
  ASSERT_EQ(st.layers, std::vector<int>{1});
  EXPECT_EQ(st.vector[0], (VecF(6) << 0, 1, 0, 1, 0, 1).finished());
  Fixture f("mixtral_gqa");  // 2 layers, 6 experts
  InterventionSpec s;
  s.steer = st;
  EXPECT_NO_THROW(validate_interventions(s, f.cfg()));
  s.steer.form = 6;
  EXPECT_THROW(validate_interventions(s, f.cfg()), InputError);
  test::write_file(tmp / "bad.json", R"({"layers": [1], "vector": [[0.1, 0.5]]})");
  s.steer = load_steering(tmp / "bad.json");
  try {
    validate_interventions(s, f.cfg());
    ADD_FAILURE() << "no error";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("has 2 entries, the model 6 experts"), std::string::npos) << e.what();
  }
  test::write_file(tmp / "bad2.json", R"({"layers": [1, 0], "vector": [[0.1]]})");
  EXPECT_THROW(load_steering(tmp / "bad2.json"), InputError);
}

// ---- the numbers ------------------------------------------------------------------------------------------------

TEST(RoutingMath, EntropyKLOverlapByHand) {
  const float p3[] = {0.5f, 0.25f, 0.25f};
  EXPECT_NEAR(router_entropy(p3, 3), 1.5 * std::log(2.0), 1e-7);  // 1.0397
  const float u[] = {0.25f, 0.25f, 0.25f, 0.25f};
  EXPECT_NEAR(router_entropy(u, 4), std::log(4.0), 1e-7);
  const float p[] = {0.5f, 0.5f}, q[] = {0.9f, 0.1f};
  // KL(p‖q) = .5 ln(.5/.9) + .5 ln(.5/.1) = 0.5108256; KL(q‖p) = .9 ln 1.8 + .1 ln .2 = 0.3680642.
  EXPECT_NEAR(kl_divergence(p, q, 2), 0.5108256, 1e-6);
  EXPECT_NEAR(kl_divergence(q, p, 2), 0.3680642, 1e-6);
  EXPECT_NEAR(symmetric_kl(p, q, 2), 0.8788898, 1e-6);
  EXPECT_EQ(symmetric_kl(p, p, 2), 0.0);
  const float z0[] = {1.f, 0.f};
  EXPECT_EQ(kl_divergence(p, z0, 2), std::numeric_limits<double>::infinity());
  EXPECT_NEAR(kl_divergence(z0, p, 2), std::log(2.0), 1e-7);  // 0·log 0 terms are 0

  const int a[] = {1, 2, 3, 4}, b[] = {4, 3, 2, 7}, c[] = {1, 2, 5, 6};
  TopKOverlap o = compare_topk(a, b, 4);
  EXPECT_EQ(o.shared, 3);
  EXPECT_DOUBLE_EQ(o.overlap, 0.75);
  EXPECT_DOUBLE_EQ(o.jaccard, 0.6);  // 3 / 5
  EXPECT_TRUE(o.consistent);         // 3 of 4
  o = compare_topk(a, c, 4);
  EXPECT_EQ(o.shared, 2);
  EXPECT_DOUBLE_EQ(o.overlap, 0.5);
  EXPECT_DOUBLE_EQ(o.jaccard, 2.0 / 6.0);
  EXPECT_FALSE(o.consistent);
  const int d[] = {7, 1}, e2[] = {1, 9};
  o = compare_topk(d, e2, 2);
  EXPECT_EQ(o.shared, 1);
  EXPECT_DOUBLE_EQ(o.jaccard, 1.0 / 3.0);
  EXPECT_TRUE(o.consistent);  // 1 of 2 = k − 1
}

// ---- capture on every fixture against the HF reference ------------------------------------------------------------

TEST(Routing, TopKSetsProbabilitiesAndEntropiesMatchReference) {
  for (const char* name : kAll) {
    Fixture f(name);
    const ModelConfig& c = f.cfg();
    RoutingOptions o;
    o.max_batch_tokens = 12;  // forces several forward calls (9 + 5 | 13)
    const auto routed = capture_routing(*f.model, f.seqs, o);
    ASSERT_EQ(routed.size(), f.seqs.size());
    for (int b = 0; b < int(f.seqs.size()); ++b) {
      const int S = int(f.seqs[size_t(b)].size());
      const MatR ids = f.mat("expert_ids", b), logits = f.mat("router_logits", b);
      const SequenceRouting& r = routed[size_t(b)];
      EXPECT_EQ(r.ids, f.seqs[size_t(b)]);
      for (int l = 0; l < c.n_layers; ++l) {
        if (!c.is_moe(l)) {
          EXPECT_EQ(r.experts[size_t(l)].rows(), 0) << name << " dense layer " << l;
          continue;
        }
        for (int t = 0; t < S; ++t) {
          std::set<int> want;
          for (int j = 0; j < c.top_k; ++j) want.insert(int(ids(l * S + t, j)));
          ASSERT_EQ(set_of(r.experts[size_t(l)], t), want) << name << " seq " << b << " layer " << l << " tok " << t;
          // Top-k order: weights descending; the dominant expert has the largest weight.
          for (int j = 1; j < c.top_k; ++j) EXPECT_GE(r.weights[size_t(l)](t, j - 1), r.weights[size_t(l)](t, j));
          const std::vector<double> p = softmax_d(logits.row(l * S + t).data(), c.n_experts);
          double h = 0;
          for (int e = 0; e < c.n_experts; ++e) {
            EXPECT_NEAR(r.probs[size_t(l)](t, e), p[size_t(e)], 2e-5) << name;
            h -= p[size_t(e)] * std::log(p[size_t(e)]);
          }
          EXPECT_NEAR(router_entropy(r.probs[size_t(l)].row(t).data(), c.n_experts), h, 5e-5) << name;
          // The dominant expert is the argmax of the full router distribution for every router kind.
          const int argmax = int(std::max_element(p.begin(), p.end()) - p.begin());
          EXPECT_EQ(r.experts[size_t(l)](t, 0), argmax) << name;
        }
      }
    }
  }
}

TEST(Routing, CompareTokensMatchesReferenceSetsAndKL) {
  for (const char* name : {"qwen3_moe", "granitemoe", "mixtral_gqa"}) {
    Fixture f(name);
    const ModelConfig& c = f.cfg();
    const auto r = capture_routing(*f.model, f.seqs);
    const int S0 = int(f.seqs[0].size()), S2 = int(f.seqs[2].size());
    const MatR ids0 = f.mat("expert_ids", 0), ids2 = f.mat("expert_ids", 2);
    const MatR z0 = f.mat("router_logits", 0), z2 = f.mat("router_logits", 2);
    for (auto [ta, tb] : {std::pair{S0 - 1, S2 - 1}, std::pair{3, 7}, std::pair{0, 0}}) {
      const auto comps = compare_tokens(r[0], ta, r[2], tb, c);
      ASSERT_EQ(comps.size(), moe_layers(c).size());
      for (const auto& lc : comps) {
        const int l = lc.layer;
        std::set<int> A, B;
        for (int j = 0; j < c.top_k; ++j) {
          A.insert(int(ids0(l * S0 + ta, j)));
          B.insert(int(ids2(l * S2 + tb, j)));
        }
        int shared = 0;
        for (int e : A) shared += int(B.count(e));
        EXPECT_EQ(lc.topk.shared, shared);
        EXPECT_DOUBLE_EQ(lc.topk.overlap, double(shared) / c.top_k);
        EXPECT_DOUBLE_EQ(lc.topk.jaccard, double(shared) / double(2 * c.top_k - shared));
        EXPECT_EQ(lc.topk.consistent, shared >= c.top_k - 1);
        const auto p = softmax_d(z0.row(l * S0 + ta).data(), c.n_experts);
        const auto q = softmax_d(z2.row(l * S2 + tb).data(), c.n_experts);
        double kl = 0;
        for (int e = 0; e < c.n_experts; ++e)
          kl += p[size_t(e)] * std::log(p[size_t(e)] / q[size_t(e)]) + q[size_t(e)] * std::log(q[size_t(e)] / p[size_t(e)]);
        EXPECT_NEAR(lc.sym_kl, kl, 1e-4 * std::max(1.0, kl)) << name << " layer " << l;
      }
    }
    // Identical tokens: fully consistent, zero divergence.
    for (const auto& lc : compare_tokens(r[1], 2, r[1], 2, c)) {
      EXPECT_EQ(lc.topk.shared, c.top_k);
      EXPECT_EQ(lc.sym_kl, 0.0);
    }
  }
}

// ---- masking and boosting ---------------------------------------------------------------------------------------

// Expert usage counts at layer l over the fixture's sequences.
std::vector<int> usage(const std::vector<SequenceRouting>& r, int l, int E) {
  std::vector<int> n(size_t(E), 0);
  for (const auto& s : r)
    for (int t = 0; t < s.n_tokens(); ++t)
      for (int j = 0; j < int(s.experts[size_t(l)].cols()); ++j) ++n[size_t(s.experts[size_t(l)](t, j))];
  return n;
}

TEST(Interventions, MaskRemovesTheExpertFromEveryToken) {
  for (const char* name : kAll) {
    Fixture f(name);
    const ModelConfig& c = f.cfg();
    const auto clean = capture_routing(*f.model, f.seqs);
    const std::vector<int> layers = moe_layers(c);
    const int l = layers[layers.size() / 2];
    const auto n = usage(clean, l, c.n_experts);
    const int busiest = int(std::max_element(n.begin(), n.end()) - n.begin());
    ASSERT_GT(n[size_t(busiest)], 0);
    InterventionSpec s;
    s.mask = {{l, busiest}};
    RoutingOptions o;
    o.interventions = &s;
    const auto masked = capture_routing(*f.model, f.seqs, o);
    EXPECT_EQ(usage(masked, l, c.n_experts)[size_t(busiest)], 0) << name;
    for (const auto& r : masked)
      for (int t = 0; t < r.n_tokens(); ++t) {
        EXPECT_EQ(r.probs[size_t(l)](t, busiest), 0.f);
        for (int j = 0; j < c.top_k; ++j) EXPECT_NE(r.experts[size_t(l)](t, j), busiest) << name;
      }
    // Layers below are untouched.
    for (size_t b = 0; b < clean.size(); ++b)
      for (int q : layers)
        if (q < l) EXPECT_EQ(masked[b].experts[size_t(q)], clean[b].experts[size_t(q)]) << name;
  }
}

TEST(Interventions, LargeBoostForcesTheExpertIn) {
  for (const char* name : kAll) {
    Fixture f(name);
    const ModelConfig& c = f.cfg();
    const auto clean = capture_routing(*f.model, f.seqs);
    const int l = moe_layers(c).front();
    const auto n = usage(clean, l, c.n_experts);
    const int rarest = int(std::min_element(n.begin(), n.end()) - n.begin());
    for (BoostMode mode : {BoostMode::Add, BoostMode::NormPreserving}) {
      InterventionSpec s;
      s.boost_mode = mode;
      s.boost = {{l, rarest, mode == BoostMode::Add ? 1000.f : 4.f}};
      RoutingOptions o;
      o.interventions = &s;
      const auto boosted = capture_routing(*f.model, f.seqs, o);
      for (const auto& r : boosted)
        for (int t = 0; t < r.n_tokens(); ++t) {
          const std::set<int> chosen = set_of(r.experts[size_t(l)], t);
          EXPECT_TRUE(chosen.count(rarest)) << name << " mode " << int(mode) << " token " << t;
          if (mode == BoostMode::Add) EXPECT_EQ(r.experts[size_t(l)](t, 0), rarest) << name;  // dominant
        }
    }
  }
}

TEST(Interventions, ForwardAndGenerateHonourThem) {
  Fixture f("olmoe");
  InterventionSpec s;
  s.mask = {{0, 1}, {0, 2}};
  Hooks h;
  install_interventions(s, f.cfg(), h);
  ForwardOptions o;
  o.hooks = &h;
  const ForwardOutput out = f.model->forward(f.seqs, o);
  for (int t = 0; t < int(out.routing[0].ids.rows()); ++t)
    for (int j = 0; j < f.cfg().top_k; ++j) {
      EXPECT_NE(out.routing[0].ids(t, j), 1);
      EXPECT_NE(out.routing[0].ids(t, j), 2);
    }
}

// ---- paraphrase consistency ---------------------------------------------------------------------------------------

TEST(Routing, ParaphraseConsistencyTalliesMatchPairwiseComparisons) {
  Fixture f("qwen2_moe");  // top-3 of 8; layers 0, 1, 3 MoE
  const ModelConfig& c = f.cfg();
  const auto r = capture_routing(*f.model, f.seqs);
  std::vector<ParaphrasePair> pairs;
  auto pair = [&](int case_id, int a, int b, int sa, int sb) {
    ParaphrasePair p;
    p.case_id = case_id;
    p.prompt_ids = f.seqs[size_t(a)];
    p.paraphrase_ids = f.seqs[size_t(b)];
    p.prompt_subject_last = sa;
    p.paraphrase_subject_last = sb;
    pairs.push_back(p);
  };
  pair(0, 0, 0, 4, 4);  // identical: everything consistent
  pair(1, 0, 2, 2, 6);
  pair(1, 0, 1, 3, -1);  // subject unknown in the paraphrase: last token only
  pair(2, 2, 1, 12, 0);
  ConsistencyOptions o;
  o.routing.max_batch_tokens = 10;
  o.top_cases = 2;
  const ConsistencyReport rep = paraphrase_consistency(*f.model, pairs, o);
  EXPECT_EQ(rep.layers, (std::vector<int>{0, 1, 3}));
  EXPECT_EQ(rep.n_pairs, 4);
  EXPECT_EQ(rep.subject_missing, 1);
  EXPECT_EQ(rep.tally[0].n_pairs, 3);
  EXPECT_EQ(rep.tally[1].n_pairs, 4);
  // Expected tallies from compare_tokens on the separately captured routing.
  const int idx[4][2] = {{0, 0}, {0, 2}, {0, 1}, {2, 1}};
  for (int w = 0; w < 2; ++w) {
    std::vector<int> n(3, 0), cons(3, 0);
    std::vector<double> ov(3, 0), kl(3, 0);
    int all = 0, cells = 0, cells_cons = 0;
    for (int q = 0; q < 4; ++q) {
      const SequenceRouting &A = r[size_t(idx[q][0])], &B = r[size_t(idx[q][1])];
      int ta = A.n_tokens() - 1, tb = B.n_tokens() - 1;
      if (w == 0) {
        if (pairs[size_t(q)].paraphrase_subject_last < 0) continue;
        ta = pairs[size_t(q)].prompt_subject_last;
        tb = pairs[size_t(q)].paraphrase_subject_last;
      }
      const auto comps = compare_tokens(A, ta, B, tb, c);
      bool every = true;
      for (size_t i = 0; i < comps.size(); ++i) {
        ++n[i];
        cons[i] += comps[i].topk.consistent;
        ov[i] += comps[i].topk.overlap;
        kl[i] += comps[i].sym_kl;
        every = every && comps[i].topk.consistent;
        ++cells;
        cells_cons += comps[i].topk.consistent;
      }
      all += every;
    }
    const ConsistencyTally& t = rep.tally[w];
    for (size_t i = 0; i < 3; ++i) {
      EXPECT_EQ(t.n[i], n[i]);
      EXPECT_EQ(t.consistent[i], cons[i]) << "position " << w << " layer " << rep.layers[i];
      EXPECT_NEAR(t.mean_overlap(i), ov[i] / n[i], 1e-12);
      EXPECT_NEAR(t.mean_sym_kl(i), kl[i] / n[i], 1e-4 * std::max(1.0, kl[i] / n[i]));
    }
    EXPECT_NEAR(t.overall_rate(), double(cells_cons) / cells, 1e-12);
    EXPECT_EQ(t.all_layers_consistent, all);
  }
  // The identical pair is the least different; the worst two are listed, worst first.
  ASSERT_EQ(rep.most_different.size(), 2u);
  EXPECT_LE(rep.most_different[0].mean_overlap, rep.most_different[1].mean_overlap);
  EXPECT_NE(rep.most_different[0].pair.case_id, 0);
  // JSON and SVG carry the same numbers.
  const json j = rep.to_json();
  EXPECT_EQ(j["positions"]["last"]["per_layer"][1]["consistent"].get<int>(), rep.tally[1].consistent[1]);
  EXPECT_DOUBLE_EQ(j["positions"]["subject_last"]["overall_rate"].get<double>(), rep.tally[0].overall_rate());
  const std::string svg = consistency_svg(rep, "test <chart>");
  EXPECT_EQ(svg.rfind("<svg", 0), 0u);
  EXPECT_NE(svg.find("test &lt;chart&gt;"), std::string::npos);
  EXPECT_NE(svg.find("</svg>"), std::string::npos);
}

TEST(Routing, CounterFactPairsFindTheSubjectsLastToken) {
  const Tokenizer tok = Tokenizer::from_json(char_tokenizer_json());
  ASSERT_EQ(tok.encode("The m").ids, (std::vector<int32_t>{'T' - 32, 'h' - 32, 'e' - 32, 0, 'm' - 32}));
  test::TempDir tmp;
  test::write_file(tmp / "cf.json", kMiniCounterFact);
  const auto pairs = counterfact_pairs(load_counterfact(tmp / "cf.json"), tok);
  ASSERT_EQ(pairs.size(), 3u);
  // "The mother tongue of " is 21 characters, the subject 17: its last token is 21 + 17 − 1 = 37.
  EXPECT_EQ(pairs[0].prompt_text, "The mother tongue of Danielle Darrieux is");
  EXPECT_EQ(pairs[0].prompt_subject_last, 37);
  EXPECT_EQ(pairs[0].paraphrase_subject_last, 12 + 17 - 1);  // "So it goes. " is 12 characters
  EXPECT_EQ(pairs[1].paraphrase_subject_last, 16);
  EXPECT_EQ(pairs[2].prompt_subject_last, 5);
  EXPECT_EQ(pairs[2].paraphrase_subject_last, -1);  // "ed roe": case differs, not found
  EXPECT_EQ(int(pairs[0].prompt_ids.size()), 41);
  EXPECT_EQ(pairs[1].case_id, 7);
  EXPECT_EQ(pairs[1].paraphrase, 1);
  EXPECT_EQ(counterfact_pairs(load_counterfact(tmp / "cf.json"), tok, 1).size(), 2u);
}

// ---- tier 3: the bundled demo model ------------------------------------------------------------------------------

TEST(RoutingDemo, ParaphrasesRouteThroughTheSameExpertsFarAboveChance) {
  const std::string dir = test::source_dir() + "/models/moedit-demo";
  if (!std::filesystem::exists(dir + "/tokenizer.json")) GTEST_SKIP() << "no demo model at " << dir;
  auto m = Model::load(dir);
  const Tokenizer tok = Tokenizer::from_file(dir + "/tokenizer.json");
  const auto pairs = counterfact_pairs(load_counterfact(bundled_counterfact_path()), tok, 100);
  ASSERT_EQ(pairs.size(), 200u);
  const ConsistencyReport rep = paraphrase_consistency(*m, pairs);
  EXPECT_EQ(rep.subject_missing, 0);  // every paraphrase contains its subject verbatim
  const int k = m->config().top_k, E = m->config().n_experts;
  // Chance for two independent uniform top-k sets: mean overlap k/E; P(≥ k−1 shared) = 1 − C(E−k,k)/C(E,k) for k = 2.
  ASSERT_EQ(k, 2);
  const double chance_consistent = 1.0 - double((E - 2) * (E - 3)) / double(E * (E - 1));
  for (int w = 0; w < 2; ++w) {
    const ConsistencyTally& t = rep.tally[w];
    EXPECT_GT(t.overall_rate(), std::max(0.85, chance_consistent + 0.3)) << where_name(Where(w));
    for (size_t i = 0; i < rep.layers.size(); ++i) EXPECT_GT(t.mean_overlap(i), 2.0 * k / E) << where_name(Where(w));
  }
}

}  // namespace
}  // namespace moedit
