// Routing analysis (tracing/routing*, tracing/interventions) and the `route` / `experts` commands, on the HF fixture
// checkpoints: top-k sets, entropies and KL against values computed here from the reference outputs HF transformers
// produced (reference.safetensors), overlaps and domain scores against hand-computed numbers, masking and boosting.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "datasets/counterfact.h"
#include "io/errors.h"
#include "model/generate.h"
#include "model/model.h"
#include "io/safetensors.h"
#include "tokenizer/tokenizer.h"
#include "test_util.h"
#include "tracing/interventions.h"
#include "tracing/routing.h"
#include "tracing/routing_profile.h"

namespace moedit {
namespace {

using json = nlohmann::json;

const char* kAll[] = {"mixtral_gqa", "mixtral_fused", "qwen2_moe", "qwen2_moe_fused_norm", "qwen3_moe",
                      "qwen3_moe_nonorm", "olmoe", "olmoe_clip", "granitemoe"};

struct Fixture {
  std::string dir;
  std::shared_ptr<Model> model;
  std::unique_ptr<SafeTensorsFile> ref;
  std::vector<std::vector<int32_t>> seqs;
  explicit Fixture(const std::string& name) : dir(test::fixture("models/" + name)) {
    model = Model::load(dir);
    ref = std::make_unique<SafeTensorsFile>(dir + "/reference.safetensors");
    const int n = std::stoi(ref->metadata().at("n_seqs"));
    for (int b = 0; b < n; ++b) {
      auto f = ref->get("input_ids." + std::to_string(b)).to_f32();
      seqs.emplace_back(f.begin(), f.end());
    }
  }
  const ModelConfig& cfg() const { return model->config(); }
  // Reference [L, S, X] tensor of sequence b as a matrix [L·S, X].
  MatR mat(const std::string& what, int b) const {
    const auto& t = ref->get(what + "." + std::to_string(b));
    const int64_t rows = int64_t(cfg().n_layers) * int64_t(seqs[size_t(b)].size());
    MatR m(rows, t.numel() / rows);
    t.to_f32(m.data());
    return m;
  }
};

// Full softmax of one row of reference router logits, in double.
std::vector<double> softmax_d(const float* z, int E) {
  double mx = -1e300;
  for (int e = 0; e < E; ++e) mx = std::max(mx, double(z[e]));
  std::vector<double> p(static_cast<size_t>(E));
  double s = 0;
  for (int e = 0; e < E; ++e) s += (p[size_t(e)] = std::exp(double(z[e]) - mx));
  for (auto& v : p) v /= s;
  return p;
}

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

// A byte-level BPE tokenizer over printable ASCII with no merges: one token per character, id = code − 32 (space is
// 'Ġ'), so token positions can be worked out by hand. Fits the fixtures' 128-token vocabularies.
std::string char_tokenizer_json() {
  json vocab = json::object();
  for (int ch = 33; ch < 127; ++ch) vocab[std::string(1, char(ch))] = ch - 32;
  vocab["\xC4\xA0"] = 0;  // U+0120 'Ġ' = the byte-level image of ' '
  json j = {{"version", "1.0"},
            {"truncation", nullptr},
            {"padding", nullptr},
            {"added_tokens", json::array()},
            {"normalizer", nullptr},
            {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true},
                               {"use_regex", true}}},
            {"post_processor", nullptr},
            {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true},
                         {"use_regex", true}}},
            {"model", {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr},
                       {"continuing_subword_prefix", nullptr}, {"end_of_word_suffix", nullptr},
                       {"fuse_unk", false}, {"byte_fallback", false}, {"ignore_merges", false},
                       {"vocab", vocab}, {"merges", json::array()}}}};
  return j.dump();
}

const char* kMiniCounterFact = R"([
 {"case_id": 7, "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
  "target_new": {"str": "English"}, "target_true": {"str": "French"}},
  "paraphrase_prompts": ["So it goes. Danielle Darrieux, a native", "Danielle Darrieux spoke"]},
 {"case_id": 9, "requested_rewrite": {"prompt": "{} plays the", "subject": "Ed Roe",
  "target_new": {"str": "piano"}, "target_true": {"str": "guitar"}},
  "paraphrase_prompts": ["Who knows? ed roe plays"]}
])";

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

// ---- the CLI ------------------------------------------------------------------------------------------------------

std::string fx(const std::string& name) { return test::fixture("models/" + name); }

std::string join_ids(const std::vector<int32_t>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i) s += ',';
    s += std::to_string(ids[i]);
  }
  return s;
}

TEST(RouteCli, IdsJsonMatchesTheLibrary) {
  Fixture f("qwen2_moe");
  const auto r = capture_routing(*f.model, {f.seqs[0], f.seqs[1]});
  const std::string ids0 = join_ids(f.seqs[0]), ids1 = join_ids(f.seqs[1]);
  const auto res = test::run_cli("route " + fx("qwen2_moe") + " --ids " + ids0 + " --paraphrase-ids " + ids1 + " --json");
  ASSERT_EQ(res.code, 0) << res.err;
  const json j = json::parse(res.out);
  EXPECT_EQ(j["moe_layers"], json({0, 1, 3}));
  const json& tok3 = j["sequences"][0]["tokens"][3]["layers"][1];  // token 3, layer 1
  EXPECT_EQ(tok3["layer"], 1);
  EXPECT_EQ(tok3["experts"][0].get<int>(), r[0].experts[1](3, 0));
  EXPECT_EQ(tok3["dominant"].get<int>(), r[0].experts[1](3, 0));
  EXPECT_NEAR(tok3["entropy"].get<double>(), router_entropy(r[0].probs[1].row(3).data(), 8), 1e-6);
  const auto last = compare_tokens(r[0], 8, r[1], 4, f.cfg());
  const json& cj = j["consistency"][0]["last"]["layers"];
  ASSERT_EQ(cj.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(cj[i]["shared"].get<int>(), last[i].topk.shared);
    EXPECT_NEAR(cj[i]["sym_kl"].get<double>(), last[i].sym_kl, 1e-6);
  }
  // The table form runs too.
  const auto t = test::run_cli("route " + fx("qwen2_moe") + " --ids " + ids0);
  ASSERT_EQ(t.code, 0) << t.err;
  EXPECT_NE(t.out.find("layer 3 (top-3 of 8"), std::string::npos) << t.out;
}

TEST(RouteCli, BadInterventionsExitTwoNamingTheFlag) {
  const std::string m = fx("qwen2_moe");
  for (const auto& [args, flag] : std::vector<std::pair<std::string, std::string>>{
           {"route " + m + " --ids 1,2 --mask 9:0", "--mask"},
           {"route " + m + " --ids 1,2 --mask 2:0", "--mask"},
           {"route " + m + " --ids 1,2 --mask 1:x", "--mask"},
           {"route " + m + " --ids 1,2 --boost 1:8=3", "--boost"},
           {"logits " + m + " --ids 1,2 --boost 1:3", "--boost"},
           {"generate " + m + " --ids 1,2 --mask 0:99", "--mask"},
           {"experts " + m + " --ids 1,2 --boost-mode times", "--boost-mode"}}) {
    const auto r = test::run_cli(args);
    EXPECT_EQ(r.code, 2) << args << "\n" << r.err;
    EXPECT_NE(r.err.find(flag), std::string::npos) << args << "\n" << r.err;
  }
  const auto r = test::run_cli("route " + m + " --prompt hello");
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("tokenizer.json"), std::string::npos) << r.err;
}

TEST(RouteCli, LogitsAndGenerateTakeMaskAndBoost) {
  const std::string m = fx("mixtral_gqa");  // top-2 of 6
  auto r = test::run_cli("logits " + m + " --ids 5,17,3,88,42 --mask 0:0,0:1 --mask 1:2 --json");
  ASSERT_EQ(r.code, 0) << r.err;
  json j = json::parse(r.out);
  for (const auto& lj : j["routing"])
    for (const auto& ids : lj["expert_ids"])
      for (int e : ids) {
        if (lj["layer"] == 0) EXPECT_TRUE(e != 0 && e != 1);
        if (lj["layer"] == 1) EXPECT_NE(e, 2);
      }
  r = test::run_cli("logits " + m + " --ids 5,17,3 --boost 1:4=1000 --json");
  ASSERT_EQ(r.code, 0) << r.err;
  j = json::parse(r.out);
  for (const auto& lj : j["routing"])
    if (lj["layer"] == 1)
      for (const auto& ids : lj["expert_ids"]) EXPECT_EQ(ids[0].get<int>(), 4);
  const auto g0 = test::run_cli("generate " + m + " --ids 5,17,3 -n 6 --json");
  const auto g1 = test::run_cli("generate " + m + " --ids 5,17,3 -n 6 --json --boost 0:3=50 --boost-mode add");
  ASSERT_EQ(g0.code, 0) << g0.err;
  ASSERT_EQ(g1.code, 0) << g1.err;
  // Same as the library with the same intervention.
  Fixture f("mixtral_gqa");
  InterventionSpec s;
  s.boost = {{0, 3, 50.f}};
  Hooks h;
  install_interventions(s, f.cfg(), h);
  GenerateOptions go;
  go.max_new_tokens = 6;
  go.hooks = &h;
  EXPECT_EQ(json::parse(g1.out)["ids"].get<std::vector<int32_t>>(), generate(*f.model, {5, 17, 3}, go));
}

TEST(ExpertsCli, ProfileFormatsAndDomains) {
  test::TempDir tmp;
  Fixture f("qwen3_moe");
  std::string lines;
  for (const auto& s : f.seqs) {
    lines += join_ids(s) + "\n";
  }
  test::write_file(tmp / "all.ids", lines);
  test::write_file(tmp / "two.ids", lines.substr(0, lines.find('\n') + 1));
  const ActivationProfile p = activation_profile(*f.model, f.seqs);
  auto r = test::run_cli("experts " + fx("qwen3_moe") + " --corpus " + (tmp / "all.ids") + " --json");
  ASSERT_EQ(r.code, 0) << r.err;
  json j = json::parse(r.out);
  EXPECT_EQ(j["tokens"].get<int>(), 27);
  EXPECT_NEAR(j["frequency"][1][3].get<double>(), p.frequency()(1, 3), 1e-12);
  r = test::run_cli("experts " + fx("qwen3_moe") + " --corpus " + (tmp / "all.ids") + " --format npy --out " +
                    (tmp / "p.npy"));
  ASSERT_EQ(r.code, 0) << r.err;
  const std::string npy = test::read_file(tmp / "p.npy");
  ASSERT_GE(npy.size(), 128u);
  EXPECT_EQ(npy.substr(0, 6), "\x93NUMPY");
  const size_t hlen = size_t(uint8_t(npy[8])) | size_t(uint8_t(npy[9])) << 8;
  EXPECT_EQ((10 + hlen) % 64, 0u);
  EXPECT_NE(npy.find("'shape': (2, 8)"), std::string::npos);  // MoE layers 1, 2 of 3 (layer 0 dense)
  ASSERT_EQ(npy.size(), 10 + hlen + 2 * 8 * 4);
  float v;
  std::memcpy(&v, npy.data() + 10 + hlen + (1 * 8 + 5) * 4, 4);
  EXPECT_FLOAT_EQ(v, float(p.frequency()(1, 5)));
  r = test::run_cli("experts " + fx("qwen3_moe") + " --corpus " + (tmp / "all.ids") + " --format csv");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, p.to_csv());
  r = test::run_cli("experts " + fx("qwen3_moe") + " --domain a=" + (tmp / "all.ids") + " --domain b=" +
                    (tmp / "two.ids") + " --json");
  ASSERT_EQ(r.code, 0) << r.err;
  j = json::parse(r.out);
  EXPECT_EQ(j["domains"], json({"a", "b"}));
  EXPECT_EQ(j["tokens"], json({27, 9}));
  EXPECT_EQ(j["all"].size(), 16u);
  r = test::run_cli("experts " + fx("qwen3_moe") + " --compare " + (tmp / "all.ids") + " " + (tmp / "two.ids"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("Experts used more by"), std::string::npos);
  r = test::run_cli("experts " + fx("qwen3_moe") + " --drivers " + (tmp / "two.ids") + " --layers 1 --json");
  ASSERT_EQ(r.code, 0) << r.err;
  j = json::parse(r.out);
  EXPECT_EQ(j["experts"].size(), 8u);
  EXPECT_EQ(j["tokens"].get<int>(), 9);
  r = test::run_cli("experts " + fx("qwen3_moe") + " --domain a=" + (tmp / "all.ids"));
  EXPECT_EQ(r.code, 2);
  r = test::run_cli("experts " + fx("qwen3_moe") + " --ids 1,2 --format npy");
  EXPECT_EQ(r.code, 2);
}

TEST(RouteCli, DatasetModeWithATokenizer) {
  // A model folder = a fixture's weights + the character tokenizer; CounterFact = the two records above.
  test::TempDir tmp;
  std::filesystem::create_directories(tmp / "m");
  for (const char* file : {"config.json", "model.safetensors"})
    std::filesystem::copy_file(fx("qwen2_moe") + "/" + file, tmp / ("m/" + std::string(file)));
  test::write_file(tmp / "m/tokenizer.json", char_tokenizer_json());
  test::write_file(tmp / "cf.json", kMiniCounterFact);
  const auto r = test::run_cli("route " + (tmp / "m") + " --counterfact --dataset " + (tmp / "cf.json") + " --svg " +
                               (tmp / "c.svg") + " --json --cases 3");
  ASSERT_EQ(r.code, 0) << r.err;
  const json j = json::parse(r.out);
  EXPECT_EQ(j["n_pairs"], 3);
  EXPECT_EQ(j["subject_missing"], 1);
  EXPECT_EQ(j["most_different"].size(), 3u);
  // Same numbers as the library.
  auto m = Model::load(tmp / "m");
  const Tokenizer tok = Tokenizer::from_file(tmp / "m/tokenizer.json");
  const ConsistencyReport rep = paraphrase_consistency(*m, counterfact_pairs(load_counterfact(tmp / "cf.json"), tok));
  for (int w = 0; w < 2; ++w)
    for (size_t i = 0; i < rep.layers.size(); ++i) {
      const json& lj = j["positions"][where_name(Where(w))]["per_layer"][i];
      EXPECT_EQ(lj["consistent"].get<int>(), rep.tally[w].consistent[i]);
      EXPECT_NEAR(lj["mean_sym_kl"].get<double>(), rep.tally[w].mean_sym_kl(i), 1e-9);
    }
  EXPECT_EQ(test::read_file(tmp / "c.svg").rfind("<svg", 0), 0u);
  // Text mode with --subject and a paraphrase.
  const auto t = test::run_cli("route " + (tmp / "m") +
                               " --prompt 'Ed Roe plays the' --paraphrase 'Who knows? Ed Roe plays' --subject 'Ed Roe'");
  ASSERT_EQ(t.code, 0) << t.err;
  EXPECT_NE(t.out.find("subject's last token (prompt pos 5 vs paraphrase pos 16)"), std::string::npos) << t.out;
  const auto bad = test::run_cli("route " + (tmp / "m") + " --prompt 'Ed Roe plays' --subject 'Bob'");
  EXPECT_EQ(bad.code, 2);
  EXPECT_NE(bad.err.find("not found"), std::string::npos);
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
