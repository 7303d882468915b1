// Facts traced together (Tracer::together, trace_ids_together, dataset --together): shared clean and corrupted
// forwards, one K/V cache, restorations of several facts in one batch — and every score bit for bit what each
// fact traced alone gives, on every fixture family, every kind, any packing; bad facts named or skipped.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "io/errors.h"
#include "model/model.h"
#include "test_util.h"
#include "trace_util.h"
#include "tracing/trace.h"

namespace moedit {
namespace {

using namespace trace_test;
using trace::Kind;

// Same value, or both NaN.
void expect_same(double a, double b, const std::string& what) {
  if (std::isnan(a) || std::isnan(b))
    EXPECT_TRUE(std::isnan(a) && std::isnan(b)) << what;
  else
    EXPECT_EQ(a, b) << what;
}

// Every number of two reports of one fact, bit for bit; the restoration stats too.
void expect_same_report(const trace::TraceReport& a, const trace::TraceReport& b, const std::string& what) {
  EXPECT_EQ(a.answer, b.answer) << what;
  EXPECT_EQ(a.high_score, b.high_score) << what;
  EXPECT_EQ(a.low_score, b.low_score) << what;
  EXPECT_EQ(a.ids, b.ids) << what;
  ASSERT_EQ(a.kinds.size(), b.kinds.size()) << what;
  for (size_t k = 0; k < a.kinds.size(); ++k) {
    const trace::KindResult &x = a.kinds[k], &y = b.kinds[k];
    const std::string w = what + " " + trace::kind_name(x.kind);
    EXPECT_EQ(x.kind, y.kind) << w;
    EXPECT_EQ(x.rows, y.rows) << w;
    ASSERT_EQ(x.scores.size(), y.scores.size()) << w;
    for (size_t r = 0; r < x.scores.size(); ++r)
      for (size_t l = 0; l < x.scores[r].size(); ++l)
        expect_same(x.scores[r][l], y.scores[r][l], w + " row " + std::to_string(r) + " layer " + std::to_string(l));
    EXPECT_EQ(x.dominant, y.dominant) << w;
    ASSERT_EQ(x.experts.size(), y.experts.size()) << w;
    for (size_t i = 0; i < x.experts.size(); ++i) {
      EXPECT_EQ(x.experts[i].expert, y.experts[i].expert) << w;
      EXPECT_EQ(x.experts[i].weight, y.experts[i].weight) << w;
      EXPECT_EQ(x.experts[i].score, y.experts[i].score) << w << " expert " << i;
    }
    ASSERT_EQ(x.shared_experts.size(), y.shared_experts.size()) << w;
    for (size_t i = 0; i < x.shared_experts.size(); ++i)
      EXPECT_EQ(x.shared_experts[i].score, y.shared_experts[i].score) << w << " shared expert " << i;
  }
  EXPECT_EQ(a.stats.restorations, b.stats.restorations) << what;
  EXPECT_EQ(a.stats.computed, b.stats.computed) << what;
  EXPECT_EQ(a.stats.shared_prefixes, b.stats.shared_prefixes) << what;
  EXPECT_EQ(a.stats.rows, b.stats.rows) << what;
  EXPECT_NEAR(a.stats.flops, b.stats.flops, 1e-9 * b.stats.flops) << what;
  EXPECT_NEAR(a.stats.setup_flops, b.stats.setup_flops, 1e-9 * b.stats.setup_flops) << what;
}

// Three facts of different lengths and subjects; the second measures a given target.
std::vector<trace::TraceInput> three_facts(const Model& m) {
  std::vector<trace::TraceInput> in(3);
  const int V = m.config().vocab_size;
  const int lens[3] = {9, 6, 11}, begin[3] = {1, 0, 4}, end[3] = {4, 2, 7};
  for (int f = 0; f < 3; ++f) {
    for (int i = 0; i < lens[f]; ++i) in[size_t(f)].ids.push_back(int32_t((5 + 29 * i + 13 * f + i * i * (f + 1)) % V));
    in[size_t(f)].subject_begin = begin[f];
    in[size_t(f)].subject_end = end[f];
    in[size_t(f)].id = "f" + std::to_string(f);
  }
  in[1].target = 3 % V;
  return in;
}

TEST(TraceTogether, EveryScoreEqualsTracingEachFactAlone) {
  const OneThread one_thread;
  for (const char* fx : {"granitemoe", "mixtral_fused", "mixtral_gqa", "olmoe", "olmoe_clip", "qwen2_moe",
                         "qwen2_moe_fused_norm", "qwen3_moe", "qwen3_moe_nonorm", "deepseek_v1", "deepseek_v2"}) {
    auto m = fixture_model(fx);
    const std::vector<trace::TraceInput> in = three_facts(*m);
    trace::TraceOptions o;
    o.samples = 3;
    o.window = 2;
    o.expert_all_tokens = std::string(fx) == "olmoe";
    // Packed rows: several facts per batch with mixed start layers, and one batch for everything.
    for (int batch_rows : {60, 100000}) {
      o.batch_rows = batch_rows;
      const std::vector<trace::TraceReport> together = trace::trace_ids_together(*m, in, o);
      ASSERT_EQ(together.size(), in.size());
      for (size_t f = 0; f < in.size(); ++f) {
        const trace::TraceReport alone = trace::trace_ids(*m, in[f], o);
        expect_same_report(together[f], alone, std::string(fx) + " fact " + std::to_string(f) + " batch_rows " +
                                                   std::to_string(batch_rows));
        EXPECT_EQ(together[f].stats.traced_together, 3);
        EXPECT_EQ(alone.stats.traced_together, 1);
      }
      if (batch_rows == 100000) {  // one batch per stage holds all three facts
        EXPECT_LE(together[0].stats.batches, 2) << fx;
      }
    }
  }
}

TEST(TraceTogether, NaiveModeAndPruningOffToo) {
  const OneThread one_thread;
  auto m = fixture_model("qwen2_moe");
  const std::vector<trace::TraceInput> in = three_facts(*m);
  trace::TraceOptions o;
  o.samples = 2;
  o.window = 3;
  o.batch_rows = 80;
  for (int mode = 0; mode < 2; ++mode) {
    o.naive = mode == 0;
    o.prune = mode == 0;
    const std::vector<trace::TraceReport> together = trace::trace_ids_together(*m, in, o);
    for (size_t f = 0; f < in.size(); ++f)
      expect_same_report(together[f], trace::trace_ids(*m, in[f], o),
                         std::string(o.naive ? "naive" : "no pruning") + " fact " + std::to_string(f));
  }
}

TEST(TraceTogether, ABadFactIsNamedOrSkipped) {
  const OneThread one_thread;
  auto m = fixture_model("olmoe");
  std::vector<trace::TraceInput> in = three_facts(*m);
  in[1].subject_end = 40;  // outside the prompt
  trace::TraceOptions o;
  o.samples = 2;
  o.kinds = {Kind::Resid, Kind::Expert};
  try {
    trace::trace_ids_together(*m, in, o);
    ADD_FAILURE() << "no InputError";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("fact f1: subject token range"), std::string::npos) << e.what();
  }
  std::vector<std::string> errors;
  const std::vector<trace::TraceReport> r = trace::trace_ids_together(*m, in, o, &errors);
  ASSERT_EQ(errors.size(), 3u);
  EXPECT_TRUE(errors[0].empty());
  EXPECT_NE(errors[1].find("subject token range"), std::string::npos);
  EXPECT_TRUE(errors[2].empty());
  EXPECT_TRUE(r[1].kinds.empty());
  for (size_t f : {size_t(0), size_t(2)}) {
    expect_same_report(r[f], trace::trace_ids(*m, in[f], o), "fact " + std::to_string(f));
    EXPECT_EQ(r[f].stats.traced_together, 2);
  }
  // Tracers made together need one sample count.
  const int H = m->config().hidden;
  std::vector<trace::Tracer::Prompt> ps(2);
  for (int f = 0; f < 2; ++f) {
    ps[size_t(f)].ids = in[0].ids;
    ps[size_t(f)].subject_begin = 1;
    ps[size_t(f)].subject_end = 3;
    ps[size_t(f)].noise.assign(size_t(2 + f), MatR::Zero(2, H));
  }
  EXPECT_THROW(trace::Tracer::together(*m, ps, false), InputError);
}

TEST(TraceTogether, DatasetSummaryDoesNotDependOnHowManyFactsRunTogether) {
  const OneThread one_thread;
  auto m = fixture_model("deepseek_v2");
  const Tokenizer tok = char_tokenizer();
  test::TempDir tmp;
  nlohmann::json data = nlohmann::json::array();
  const char* facts[][3] = {{"{} is from", "Ann Lee", "Oslo"},     {"Home of {}:", "Bo", "Y"},
                            {"{} speaks", "Carla", "F"},           {"Where {} works, ", "Dee", "Q"},
                            {"{} was born in", "Ed Fox Jr", "Lima"}};
  for (int i = 0; i < 5; ++i)
    data.push_back({{"case_id", i},
                    {"requested_rewrite",
                     {{"prompt", facts[i][0]}, {"subject", facts[i][1]}, {"target_true", {{"str", facts[i][2]}}}}}});
  data.push_back({{"case_id", 5}, {"requested_rewrite", {{"prompt", "{} x"}, {"subject", ""}, {"target_true", {{"str", "y"}}}}}});
  test::write_file(tmp / "cf.json", data.dump());
  trace::TraceOptions o;
  o.samples = 2;
  o.window = 2;
  trace::DatasetOptions d;
  d.only_correct = false;
  d.plots = 0;
  std::vector<nlohmann::json> runs;
  for (int together : {1, 2, 8}) {
    d.together = together;
    d.out_dir = tmp / ("out" + std::to_string(together));
    const trace::DatasetSummary s = trace::trace_dataset(*m, tok, tmp / "cf.json", o, d);
    EXPECT_EQ(s.traced, 5) << together;
    EXPECT_EQ(s.skipped, 1) << together;  // the empty subject
    runs.push_back(s.json);
    // Per-fact scores equal too.
    for (int i = 0; i < 5; ++i) {
      const auto a = nlohmann::json::parse(test::read_file(tmp / ("out1/cases/" + std::to_string(i) + "_expert.json")));
      const auto b = nlohmann::json::parse(
          test::read_file(d.out_dir + "/cases/" + std::to_string(i) + "_expert.json"));
      EXPECT_EQ(a["scores"], b["scores"]) << together << " fact " << i;
      EXPECT_EQ(a["experts"], b["experts"]) << together << " fact " << i;
    }
  }
  for (size_t r = 1; r < runs.size(); ++r) {
    EXPECT_EQ(runs[r]["kinds"], runs[0]["kinds"]);
    EXPECT_EQ(runs[r]["expert_last_subject"], runs[0]["expert_last_subject"]);
    EXPECT_EQ(runs[r]["expert_last_token"], runs[0]["expert_last_token"]);
    EXPECT_EQ(runs[r]["skipped"], runs[0]["skipped"]);
    EXPECT_EQ(runs[r]["avg_low_score"], runs[0]["avg_low_score"]);
  }
}

}  // namespace
}  // namespace moedit
