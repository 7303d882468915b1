// Causal tracing from text to files: the text path (subject lookup through offsets), JSON/SVG/HTML outputs, dataset
// mode over CounterFact records, and the `trace` CLI.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "io/errors.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"
#include "test_util.h"
#include "trace_util.h"
#include "tracing/trace.h"

namespace moedit {
namespace {

using namespace trace_test;
using trace::Kind;

// -------------------------------------------------------------------------------------------- text path

TEST(Trace, TextPathLocatesTheSubjectThroughOffsets) {
  const OneThread one_thread;
  auto m = fixture_model("qwen2_moe");
  const Tokenizer tok = char_tokenizer();
  EXPECT_EQ(trace::locate_subject(tok, "Paris is in France", "is in"), (std::pair<int, int>{6, 11}));
  try {
    trace::locate_subject(tok, "Paris is in France", "Spain");
    FAIL() << "expected InputError";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("'Spain' is not in the prompt"), std::string::npos) << e.what();
  }
  trace::TraceOptions o;
  o.samples = 3;
  o.kinds = {Kind::Resid, Kind::Expert};
  const trace::TraceReport r = trace::trace_fact(*m, tok, {"Rome is in", "Rome", "Italy", "", ""}, o);
  EXPECT_EQ(r.subject_begin, 0);
  EXPECT_EQ(r.subject_end, 4);
  EXPECT_EQ(r.answer, int(' '));  // " Italy": a space is prepended, its first (character) token is ' '
  EXPECT_EQ(r.answer_source, "target");
  EXPECT_EQ(r.tokens[0], "R");
  EXPECT_NE(r.noise_source.find("CounterFact"), std::string::npos) << r.noise_source;
  const trace::TraceReport r2 = trace::trace_fact(*m, tok, {"Rome is in ", "Rome", "Italy", "", ""}, o);
  EXPECT_EQ(r2.answer, int('I'));
  EXPECT_THROW(trace::trace_fact(*m, tok, {"Rome is in", "Paris", "", "", ""}, o), InputError);
  // Expert kind defaults to the last subject token and the last token.
  EXPECT_EQ(r.find(Kind::Expert)->rows, (std::vector<int>{3, 9}));
}

// ------------------------------------------------------------------------------------------------ outputs

TEST(Trace, OutputsJsonSvgAndSelfContainedHtml) {
  const OneThread one_thread;
  auto m = fixture_model("qwen2_moe");
  const Tokenizer tok = char_tokenizer();
  trace::TraceOptions o;
  o.samples = 3;
  const trace::TraceReport r = trace::trace_fact(*m, tok, {"Bob <lives> in", "Bob", "", "", ""}, o);
  test::TempDir tmp;
  const auto files = trace::write_trace_outputs(r, tmp.path.string());
  for (const char* f : {"trace_resid.json", "trace_attn.json", "trace_moe.json", "trace_expert.json",
                        "trace_shared.json", "trace_resid.svg", "trace_attn.svg", "trace_moe.svg", "trace_shared.svg",
                        "trace_expert.svg", "trace_expert_dominant.svg", "trace_report.html"})
    EXPECT_TRUE(std::filesystem::exists(tmp.path / f)) << f;
  EXPECT_EQ(files.size(), 12u);
  const nlohmann::json j = nlohmann::json::parse(test::read_file(tmp / "trace_moe.json"));
  for (const char* key : {"scores", "low_score", "high_score", "input_tokens", "subject_range", "answer", "window",
                          "kind", "input_ids", "noise", "rows"})
    EXPECT_TRUE(j.contains(key)) << key;
  EXPECT_EQ(j["kind"], "moe");
  EXPECT_EQ(j["window"], 10);
  EXPECT_EQ(j["scores"].size(), r.ids.size());
  EXPECT_EQ(j["scores"][0].size(), size_t(m->config().n_layers));
  EXPECT_EQ(j["subject_range"], nlohmann::json({0, 3}));
  EXPECT_DOUBLE_EQ(j["low_score"].get<double>(), r.low_score);
  const nlohmann::json js = nlohmann::json::parse(test::read_file(tmp / "trace_shared.json"));
  EXPECT_TRUE(js["scores"][0][2].is_null());  // layer 2 is dense: no shared expert
  const nlohmann::json je = nlohmann::json::parse(test::read_file(tmp / "trace_expert.json"));
  EXPECT_EQ(je["experts"].size(), 2u * 3u * 3u);  // 2 tokens × 3 MoE layers × top-3
  EXPECT_EQ(je["dominant"].size(), 2u);
  const std::string resid = test::read_file(tmp / "trace_resid.svg");
  EXPECT_NE(resid.find("<svg"), std::string::npos);
  EXPECT_NE(resid.find(">B*</text>"), std::string::npos);  // subject tokens starred
  EXPECT_NE(resid.find("&lt;"), std::string::npos);        // escaped
  EXPECT_NE(resid.find("Impact of restoring state"), std::string::npos);
  EXPECT_NE(test::read_file(tmp / "trace_moe.svg").find("#00441b"), std::string::npos);   // Greens top (colour bar)
  EXPECT_NE(test::read_file(tmp / "trace_attn.svg").find("#67000d"), std::string::npos);  // Reds
  EXPECT_NE(resid.find("#3f007d"), std::string::npos);                                     // Purples
  const std::string html = test::read_file(tmp / "trace_report.html");
  size_t svgs = 0;
  for (size_t p = html.find("<svg"); p != std::string::npos; p = html.find("<svg", p + 1)) ++svgs;
  EXPECT_EQ(svgs, 6u);
  EXPECT_EQ(html.find("<script"), std::string::npos);
  EXPECT_EQ(html.find("src="), std::string::npos);
  EXPECT_NE(html.find("href=\"trace_expert.json\""), std::string::npos);
  // report_json (the --json output) holds every kind.
  EXPECT_EQ(trace::report_json(r)["kinds"].size(), 5u);
}

// ---------------------------------------------------------------------------------------------- dataset mode

TEST(Trace, DatasetModeAveragesRomesSixTokenGroups) {
  const OneThread one_thread;
  auto m = fixture_model("qwen2_moe");
  const Tokenizer tok = char_tokenizer();
  test::TempDir tmp;
  const nlohmann::json data = nlohmann::json::array(
      {{{"case_id", 7},
        {"requested_rewrite",
         {{"prompt", "{} is from"}, {"subject", "Ann Lee"}, {"target_true", {{"str", "Oslo"}}},
          {"target_new", {{"str", "Rome"}}}}}},
       {{"case_id", 9},
        {"requested_rewrite",
         {{"prompt", "Home of {}:"}, {"subject", "Bo"}, {"target_true", {{"str", "Y"}}},
          {"target_new", {{"str", "Z"}}}}}},
       {{"case_id", 11},
        {"requested_rewrite",
         {{"prompt", "{} plays"}, {"subject", "absent subject?"}, {"target_true", {{"str", "x"}}}}}}});
  test::write_file(tmp / "cf.json", data.dump());
  trace::TraceOptions o;
  o.samples = 2;
  o.kinds = {Kind::Resid, Kind::Moe, Kind::Expert, Kind::Shared};
  trace::DatasetOptions d;
  d.out_dir = tmp / "out";
  d.only_correct = false;
  d.plots = 1;
  const trace::DatasetSummary s = trace::trace_dataset(*m, tok, tmp / "cf.json", o, d);
  EXPECT_EQ(s.facts, 3);
  EXPECT_EQ(s.traced, 3);  // "{} plays" with subject "absent subject?" still contains it: formatted from the record
  const nlohmann::json& j = s.json;
  // Recompute the last-token and last-subject-token averages from the per-fact files.
  double low = 0;
  std::vector<nlohmann::json> facts;
  for (const char* id : {"7", "9", "11"}) {
    facts.push_back(nlohmann::json::parse(test::read_file(tmp / ("out/cases/" + std::string(id) + "_resid.json"))));
    low += facts.back()["low_score"].get<double>() / 3;
  }
  EXPECT_NEAR(j["avg_low_score"].get<double>(), low, 1e-12);
  for (int l = 0; l < m->config().n_layers; ++l) {
    double last = 0, last_subj = 0;
    for (const auto& f : facts) {
      const int S = int(f["input_ids"].size()), e = f["subject_range"][1];
      last += f["scores"][S - 1][l].get<double>() / 3;
      last_subj += f["scores"][e - 1][l].get<double>() / 3;
    }
    EXPECT_NEAR(j["kinds"]["resid"]["groups"]["last"]["aie"][l].get<double>(), last - low, 1e-12);
    EXPECT_NEAR(j["kinds"]["resid"]["groups"]["last_subject"]["aie"][l].get<double>(), last_subj - low, 1e-12);
  }
  for (const char* g : {"first_subject", "middle_subject", "last_subject", "first_subsequent", "further", "last"})
    EXPECT_TRUE(j["kinds"]["moe"]["groups"].contains(g)) << g;
  // "Bo" has no middle tokens, "Ann Lee" has 5: middle-subject counts per layer = 5.
  EXPECT_EQ(j["kinds"]["resid"]["groups"]["middle_subject"]["n"][0], 5 + 0 + 13);
  ASSERT_EQ(j["expert_last_subject"].size(), 3u);  // three MoE layers
  EXPECT_EQ(j["expert_last_subject"][0]["rank_aie"].size(), 3u);
  EXPECT_TRUE(j["expert_last_subject"][0]["shared_aie"].is_number());
  EXPECT_TRUE(std::filesystem::exists(tmp / "out/summary.json"));
  EXPECT_TRUE(std::filesystem::exists(tmp / "out/report.html"));
  EXPECT_TRUE(std::filesystem::exists(tmp / "out/summary_resid.svg"));
  EXPECT_TRUE(std::filesystem::exists(tmp / "out/cases/7/trace_report.html"));
  EXPECT_FALSE(std::filesystem::exists(tmp / "out/cases/9/trace_report.html"));  // plots = 1
  // Resume: a second run re-reads the cases and gives the same summary.
  const trace::DatasetSummary s2 = trace::trace_dataset(*m, tok, tmp / "cf.json", o, d);
  EXPECT_EQ(s2.json["kinds"], j["kinds"]);
}

// ------------------------------------------------------------------------------------------------------ CLI

TEST(TraceCli, IdsModeJsonAndNoiseFileCrossCheck) {
  const std::string model = test::fixture("models/qwen2_moe");
  const nlohmann::json ref = nlohmann::json::parse(test::read_file(test::fixture("trace/qwen2_moe/reference.json")));
  std::string ids;
  for (int id : ref["ids"]) ids += (ids.empty() ? "" : ",") + std::to_string(id);
  const std::string range = std::to_string(ref["subject_range"][0].get<int>()) + ":" +
                            std::to_string(ref["subject_range"][1].get<int>());
  auto r = test::run_cli("trace " + model + " --ids " + ids + " --subject-range " + range + " --window " +
                         std::to_string(ref["window"].get<int>()) + " --kinds resid,expert --noise-file " +
                         test::fixture("trace/qwen2_moe/noise.safetensors") + " --json --threads 1");
  ASSERT_EQ(r.code, 0) << r.err;
  const nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["kinds"].size(), 2u);
  double err = 0;
  for (size_t t = 0; t < ref["kinds"]["resid"].size(); ++t)
    for (size_t l = 0; l < ref["kinds"]["resid"][t].size(); ++l)
      err = std::max(err, std::abs(j["kinds"]["resid"]["scores"][t][l].get<double>() -
                                   ref["kinds"]["resid"][t][l].get<double>()));
  EXPECT_LE(err, 1e-5);
  EXPECT_EQ(j["answer"]["id"], ref["answer"]);

  test::TempDir tmp;
  r = test::run_cli("trace " + model + " --ids " + ids + " --subject-range " + range + " --samples 2 --threads 1 --out " +
                    tmp.path.string());
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("answer"), std::string::npos);
  EXPECT_TRUE(std::filesystem::exists(tmp / "trace_report.html"));
  EXPECT_EQ(r.err.find("\r"), std::string::npos);  // no progress bar when stderr is not a TTY

  r = test::run_cli("trace " + model + " --ids " + ids + " --subject-range " + range +
                    " --samples 2 --threads 1 --kinds resid,moe --tokens subject_last,last --json");
  ASSERT_EQ(r.code, 0) << r.err;
  const nlohmann::json jt = nlohmann::json::parse(r.out);
  EXPECT_EQ(jt["kinds"]["moe"]["rows"], nlohmann::json({ref["subject_range"][1].get<int>() - 1,
                                                         int(ref["ids"].size()) - 1}));
}

TEST(TraceCli, BadInputExitsWithTwo) {
  const std::string model = test::fixture("models/qwen2_moe");
  for (const std::string args :
       {"--ids 1,2,3", "--ids 1,2,3 --subject-range 2:9", "--ids 1,2,3 --subject-range a:b",
        "--ids 1,2,3 --subject-range 0:1 --kinds nope", "--ids 1,2,3 --subject-range 0:1 --noise q",
        "--prompt 'Rome is' --subject Rome",  // fixture has no tokenizer.json
        "--ids 1,2,3 --subject-range 0:1 --noise-file /nonexistent.safetensors",
        "--dataset /nonexistent.json --out /tmp/x", "--ids 1,2,3 --subject-range 0:1 --prompt x"}) {
    const auto r = test::run_cli("trace " + model + " " + args);
    EXPECT_EQ(r.code, 2) << args << "\n" << r.err;
    EXPECT_NE(r.err.find("error"), std::string::npos) << args;
  }
  const auto r = test::run_cli("trace " + test::fixture("models/qwen3_moe") + " --ids 1,2,3 --subject-range 0:1 --kinds shared");
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("no shared expert"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace moedit
