// Token triggers (tracing/expert_triggers.h): counts, lift and position rates against the routing of separate
// forwards, and the CLI.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <nlohmann/json.hpp>

#include "io/errors.h"
#include "model/model.h"
#include "test_util.h"
#include "tracing/expert_triggers.h"

namespace moedit {
namespace {

TEST(ExpertTriggers, CountsLiftAndPositionsFromTheRouting) {
  const ModelConfig c = test::tiny_config("mixtral");
  Model m(c, random_weights(c, 9, 0.3f));
  const std::vector<std::vector<int32_t>> seqs = {{5, 17, 5, 88, 5, 7, 9}, {9, 5, 60}, {5, 5, 17, 36}};
  TriggerOptions o;
  o.min_occurrences = 1;
  o.max_pos = 4;
  o.rel_bins = 2;
  o.top = 100;
  const std::vector<ExpertRef> experts = {{0, 1}, {1, 3}};
  const auto ts = expert_triggers(m, seqs, experts, o);
  ASSERT_EQ(ts.size(), 2u);
  int64_t tokens = 0;
  std::map<int32_t, int64_t> occ;
  for (const auto& s : seqs) {
    tokens += int64_t(s.size());
    for (int32_t id : s) ++occ[id];
  }
  for (size_t x = 0; x < experts.size(); ++x) {
    const ExpertTriggers& t = ts[x];
    std::map<int32_t, int64_t> count;
    int64_t active = 0;
    std::vector<int64_t> at(4, 0), n_at(4, 0), rel(2, 0), n_rel(2, 0);
    for (const auto& s : seqs) {
      const ForwardOutput f = m.forward({s});
      const auto& ids = f.routing[size_t(experts[x].layer)].ids;
      for (int p = 0; p < int(s.size()); ++p) {
        bool on = false;
        for (int j = 0; j < c.top_k; ++j) on |= ids(p, j) == experts[x].expert;
        const size_t ab = size_t(std::min(p, 3)), rb = size_t(p * 2 / int(s.size()));
        ++n_at[ab];
        ++n_rel[rb];
        if (on) {
          ++active;
          ++at[ab];
          ++rel[rb];
          ++count[s[size_t(p)]];
        }
      }
    }
    EXPECT_EQ(t.active, active);
    EXPECT_EQ(t.tokens, tokens);
    EXPECT_EQ(t.tokens_at, n_at);
    EXPECT_EQ(t.active_at, at);
    EXPECT_EQ(t.tokens_rel, n_rel);
    EXPECT_EQ(t.active_rel, rel);
    ASSERT_EQ(t.top.size(), count.size());
    for (size_t i = 0; i < t.top.size(); ++i) {
      const TriggerToken& k = t.top[i];
      EXPECT_EQ(k.count, count[k.id]);
      EXPECT_EQ(k.occurrences, occ[k.id]);
      EXPECT_DOUBLE_EQ(k.lift, (double(k.count) / double(active)) / (double(occ[k.id]) / double(tokens)));
      if (i) {
        EXPECT_GE(t.top[i - 1].count, k.count);  // ranked by count
      }
    }
  }
  EXPECT_THROW(expert_triggers(m, seqs, {{0, c.n_experts}}, o), InputError);
}

TEST(ExpertTriggers, TopActivatingExamples) {
  const ModelConfig c = test::tiny_config("qwen2_moe");
  Model m(c, random_weights(c, 10, 0.3f));
  const std::vector<std::vector<int32_t>> seqs = {{5, 17, 5, 88, 5, 7, 9}, {9, 5, 60}};
  const auto xs = expert_examples(m, seqs, 3, 2);
  const std::vector<int> layers = moe_layers(c);
  ASSERT_EQ(xs.size(), layers.size() * size_t(c.n_experts));
  for (const auto& x : xs) {
    // Every (token, weight) of this expert from separate forwards; the top 3 by weight, earlier first on ties.
    std::vector<ExpertExample> all;
    for (size_t s = 0; s < seqs.size(); ++s) {
      const ForwardOutput f = m.forward({seqs[s]});
      const LayerRouting& r = f.routing[size_t(x.layer)];
      for (int p = 0; p < int(seqs[s].size()); ++p)
        for (int j = 0; j < c.top_k; ++j)
          if (r.ids(p, j) == x.expert) all.push_back({int(s), p, r.weights(p, j)});
    }
    EXPECT_EQ(x.active, int64_t(all.size()));
    std::stable_sort(all.begin(), all.end(), [](const auto& a, const auto& b) { return a.weight > b.weight; });
    ASSERT_EQ(x.top.size(), std::min<size_t>(3, all.size()));
    for (size_t i = 0; i < x.top.size(); ++i) {
      EXPECT_EQ(x.top[i].seq, all[i].seq);
      EXPECT_EQ(x.top[i].pos, all[i].pos);
      EXPECT_EQ(x.top[i].weight, all[i].weight);
    }
    EXPECT_LE(x.keywords.size(), 2u);
  }
}

TEST(ExpertTriggers, Cli) {
  test::TempDir tmp;
  const auto r = test::run_cli("experts --text \"The capital of France is Paris and the capital of Italy is Rome\" "
                               "--triggers 0:7,3:2 --json --svg " + (tmp / "t.svg"));
  ASSERT_EQ(r.code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  ASSERT_EQ(j["experts"].size(), 2u);
  EXPECT_EQ(j["experts"][1]["layer"], 3);
  EXPECT_TRUE(std::filesystem::exists(tmp / "t.svg"));
  const auto ex = test::run_cli("experts --text \"The capital of France is Paris\" --examples 2 --out " + (tmp / "e.jsonl"));
  ASSERT_EQ(ex.code, 0) << ex.err;
  const std::string lines = test::read_file(tmp / "e.jsonl");
  EXPECT_EQ(std::count(lines.begin(), lines.end(), '\n'), 4 * 8);  // the demo model: 4 MoE layers × 8 experts
  const auto first = nlohmann::json::parse(lines.substr(0, lines.find('\n')));
  EXPECT_TRUE(first.contains("examples") && first.contains("keywords"));
  const auto bad = test::run_cli("experts --triggers 0:1");
  EXPECT_EQ(bad.code, 2);
  EXPECT_NE(bad.err.find("--triggers needs"), std::string::npos) << bad.err;
}

}  // namespace
}  // namespace moedit
