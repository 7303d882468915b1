// CounterFact-style evaluation (eval/): each metric against hand-computed values (fixed strings, known
// probabilities, the demo model's own logits), dataset readers and their errors, and the run driver end to end:
// resume after an interrupted run and merged shards give the summary of one uninterrupted run.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "datasets/eval_records.h"
#include "editor/rome.h"
#include "eval/counterfact_eval.h"
#include "eval/run.h"
#include "eval/summary.h"
#include "eval/text_metrics.h"
#include "io/errors.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"
#include "eval_util.h"
#include "test_util.h"

namespace moedit {
namespace {
using json = nlohmann::json;
using test::TempDir;

std::string demo_dir() { return test::source_dir() + "/models/moedit-demo"; }
std::string bundled_cf() { return test::source_dir() + "/datasets/data/counterfact/counterfact_preknown.json"; }

// ---- text metrics ------------------------------------------------------------------------------------------------

TEST(EvalText, WordTokenizeFollowsTreebankRules) {
  using V = std::vector<std::string>;
  EXPECT_EQ(eval::word_tokenize("Hello, world! It's a test."), (V{"Hello", ",", "world", "!", "It", "'s", "a", "test", "."}));
  EXPECT_EQ(eval::word_tokenize("I don't know (really)."), (V{"I", "do", "n't", "know", "(", "really", ")", "."}));
  EXPECT_EQ(eval::word_tokenize("\"Quote\" costs $5, 1,000 units"),
            (V{"``", "Quote", "''", "costs", "$", "5", ",", "1,000", "units"}));
  EXPECT_EQ(eval::word_tokenize("The U.S. is big. Mr. Smith came"), (V{"The", "U.S.", "is", "big", ".", "Mr.", "Smith", "came"}));
  EXPECT_TRUE(eval::word_tokenize("  \n ").empty());
}

TEST(EvalText, NgramEntropyMatchesHandComputedValues) {
  // "a b a b": bigrams ab, ba, ab → H2 = log2 3 − 2/3; trigrams aba, bab → H3 = 1; (2/3·H2 + 4/3·H3) / 2.
  const double h2 = std::log2(3.0) - 2.0 / 3.0;
  EXPECT_NEAR(eval::ngram_entropy("a b a b"), (2.0 / 3.0 * h2 + 4.0 / 3.0 * 1.0) / 2, 1e-12);
  // "a b c d": three distinct bigrams, two distinct trigrams.
  EXPECT_NEAR(eval::ngram_entropy("a b c d"), (2.0 / 3.0 * std::log2(3.0) + 4.0 / 3.0) / 2, 1e-12);
  EXPECT_EQ(eval::ngram_entropy("one"), 0.0);
  EXPECT_EQ(eval::ngram_entropy("x x x x x"), 0.0);  // one bigram, one trigram
  // The list form is the arithmetic mean.
  EXPECT_NEAR(eval::ngram_entropy(std::vector<std::string>{"a b a b", "one"}), eval::ngram_entropy("a b a b") / 2, 1e-12);
}

TEST(EvalText, TfIdfCosineMatchesSklearnDefaults) {
  const eval::TfIdf v({"The cat sat", "the dog"});
  EXPECT_EQ(v.vocabulary_size(), 4u);  // the, cat, sat, dog
  const double idf_cat = std::log(3.0 / 2.0) + 1, idf_the = std::log(3.0 / 3.0) + 1;
  // "cat" → (cat: 1); "the cat" → (the: idf_the, cat: idf_cat) / norm.
  EXPECT_NEAR(v.similarity("cat", "the cat"), idf_cat / std::hypot(idf_the, idf_cat), 1e-12);
  EXPECT_NEAR(v.similarity("a cat!", "CAT"), 1.0, 1e-12);  // "a" is one character: not a token
  EXPECT_TRUE(std::isnan(v.similarity("zebra", "cat")));   // no known term
  EXPECT_EQ(eval::harmonic_mean({50, 100, 100}), 75.0);
  EXPECT_EQ(eval::harmonic_mean({0, 100, 100}), 0.0);
}

// ---- aggregation on known probabilities --------------------------------------------------------------------------

json probs(double nll_new, double nll_true) { return {{"target_new", nll_new}, {"target_true", nll_true}}; }

TEST(EvalSummary, RomeAggregationOnKnownProbabilities) {
  json c0 = {{"case_id", 0},
             {"time", 1.0},
             {"post",
              {{"rewrite_prompts_probs", {probs(0.1, 2.0)}},
               {"paraphrase_prompts_probs", {probs(0.5, 1.0), probs(3.0, 1.0)}},
               {"neighborhood_prompts_probs", {probs(2.0, 1.0), probs(1.0, 2.0)}},
               {"rewrite_prompts_correct", {true}},
               {"ngram_entropy", 5.0}}}};
  json c1 = {{"case_id", 1},
             {"time", 3.0},
             {"post",
              {{"rewrite_prompts_probs", {probs(2.0, 1.0)}},
               {"paraphrase_prompts_probs", {probs(0.2, 0.3)}},
               {"neighborhood_prompts_probs", {probs(4.0, 1.0)}},
               {"rewrite_prompts_correct", {false}},
               {"ngram_entropy", 6.0}}}};
  const json s = eval::summarize({c0, c1});
  EXPECT_EQ(s["num_cases"], 2);
  // ES: case values 1, 0 → mean 50, std 50.  PS: 0.5, 1 → 75 ± 25.  NS: 0.5, 1 → 75 ± 25.
  EXPECT_EQ(s["post_rewrite_success"], json::array({50.0, 50.0}));
  EXPECT_EQ(s["post_paraphrase_success"], json::array({75.0, 25.0}));
  EXPECT_EQ(s["post_neighborhood_success"], json::array({75.0, 25.0}));
  EXPECT_EQ(s["post_rewrite_acc"], json::array({50.0, 50.0}));
  // EM: mean of e^-new − e^-true, ×100, rounded to 2 decimals.
  const double em0 = std::exp(-0.1) - std::exp(-2.0), em1 = std::exp(-2.0) - std::exp(-1.0);
  EXPECT_NEAR(s["post_rewrite_diff"][0].get<double>(), std::round((em0 + em1) / 2 * 1e4) / 100, 1e-9);
  const double nm0 = ((std::exp(-1.0) - std::exp(-2.0)) + (std::exp(-2.0) - std::exp(-1.0))) / 2;
  const double nm1 = std::exp(-1.0) - std::exp(-4.0);
  EXPECT_NEAR(s["post_neighborhood_diff"][0].get<double>(), std::round((nm0 + nm1) / 2 * 1e4) / 100, 1e-9);
  EXPECT_EQ(s["post_ngram_entropy"], json::array({550.0, 50.0}));  // ×100, as ROME
  EXPECT_EQ(s["time"], json::array({2.0, 1.0}));                     // not scaled
  EXPECT_NEAR(s["post_score"][0].get<double>(), 3.0 / (1 / 50.0 + 2 / 75.0), 1e-9);
  EXPECT_TRUE(s["post_score"][1].is_null());
  EXPECT_FALSE(s.contains("pre_score"));
}

// ---- scoring on the demo model against its own logits -------------------------------------------------------------

TEST(EvalScoring, TeacherForcedNllAndArgmaxMatchTheLogits) {
  auto m = Model::load(demo_dir());
  const Tokenizer tok = Tokenizer::from_file(demo_dir());
  const auto prompt = tok.encode_ids("The mother tongue of Danielle Darrieux is", true);
  const auto target = tok.encode_ids(" French language", false);
  ASSERT_GE(target.size(), 2u);
  const auto sc = eval::score_targets(*m, {{prompt, target, -1}, {prompt, tok.encode_ids(" English", false), 2}}, 1);
  // Reference: the full sequence through the model, log-softmax in double.
  std::vector<int32_t> seq = prompt;
  seq.insert(seq.end(), target.begin(), target.end());
  const ForwardOutput f = m->forward({seq});
  double nll = 0;
  std::vector<uint8_t> correct;
  for (size_t j = 0; j < target.size(); ++j) {
    const auto row = f.logits.row(long(prompt.size() + j) - 1).cast<double>();
    const double lse = std::log((row.array() - row.maxCoeff()).exp().sum()) + row.maxCoeff();
    nll += lse - row[target[j]];
    Eigen::Index best;
    row.maxCoeff(&best);
    correct.push_back(best == target[j]);
  }
  EXPECT_NEAR(sc[0].nll, nll / double(target.size()), 1e-5);
  EXPECT_EQ(sc[0].correct, correct);
  EXPECT_TRUE(sc[0].experts.empty());
  ASSERT_EQ(int(sc[1].experts.size()), m->config().top_k);  // routing at layer 1, prompt token 2
  EXPECT_EQ(sc[1].experts[0], f.routing[1].ids(2, 0));

  // ROME's perplexity: exp(−Σ_{i≥1} log p(x_i) / |x|).
  const auto ids = tok.encode_ids("Paris is the capital of France", true);
  const auto s = eval::score_targets(*m, {{{ids[0]}, std::vector<int32_t>(ids.begin() + 1, ids.end()), -1}})[0];
  EXPECT_NEAR(eval::perplexity(*m, tok, "Paris is the capital of France"),
              std::exp(s.nll * double(ids.size() - 1) / double(ids.size())), 1e-9);
}

// Generation decodes the prompts in groups on separate threads: the texts depend neither on the thread count nor on
// which prompts share a batch.
TEST(EvalScoring, GenerationDoesNotDependOnTheThreadCount) {
  auto m = Model::load(demo_dir());
  const Tokenizer tok = Tokenizer::from_file(demo_dir());
  std::vector<std::string> prompts;
  for (const char* p : {"Danielle Darrieux", "The capital of France is", "Toko Yasuda plays", "Autonomous", "Apple",
                        "In 1990,", "The Eiffel Tower is in"})
    prompts.push_back(p);
  ASSERT_GT(prompts.size(), eval::kGenerationGroup);  // two groups
  eval::GenerationOptions g;
  g.max_out_len = 30;
  ops::set_num_threads(1);
  const auto one = eval::generate_texts(*m, tok, prompts, g, 7);
  ops::set_num_threads(2);
  const auto two = eval::generate_texts(*m, tok, prompts, g, 7);
  ops::set_num_threads(0);
  EXPECT_EQ(one, two);
  // Nor on the batch (batch-invariant kernels): the first prompt alone, or the first two, give the same texts (the
  // sampler's seed is per case and prompt index).
  EXPECT_EQ(eval::generate_texts(*m, tok, {prompts[0]}, g, 7)[0], one[0]);
  const std::vector<std::string> first_two(one.begin(), one.begin() + 2);
  EXPECT_EQ(eval::generate_texts(*m, tok, {prompts[0], prompts[1]}, g, 7), first_two);
  for (size_t i = 0; i < prompts.size(); ++i) {
    EXPECT_EQ(one[i].rfind(prompts[i], 0), 0u) << one[i];
    EXPECT_GT(one[i].size(), prompts[i].size() + 10) << one[i];
  }
}

TEST(EvalScoring, CaseMetricsAgreeWithTheEditorReport) {
  auto m = Model::load(demo_dir());
  const Tokenizer tok = Tokenizer::from_file(demo_dir());
  const auto recs = load_eval_records(bundled_cf());
  const EvalRecord& r = recs[0];
  eval::CaseMetricsOptions o;
  o.layer = 1;
  const auto cm = eval::case_metrics(*m, tok, r, o);
  // editor/rome.h score_prompts is an independent implementation of ROME's scoring.
  std::vector<std::string> prompts = {r.rewrite_prompt()};
  prompts.insert(prompts.end(), r.paraphrase_prompts.begin(), r.paraphrase_prompts.end());
  prompts.insert(prompts.end(), r.neighborhood_prompts.begin(), r.neighborhood_prompts.end());
  const auto ref = score_prompts(*m, tok, prompts, r.subject, r.target_new, r.target_true, 1, {});
  auto check = [&](const char* key, size_t first, size_t n) {
    ASSERT_EQ(cm.values[key].size(), n) << key;
    for (size_t i = 0; i < n; ++i) {
      EXPECT_NEAR(cm.values[key][i]["target_new"].get<double>(), ref[first + i].nll_new, 1e-5) << key << i;
      EXPECT_NEAR(cm.values[key][i]["target_true"].get<double>(), ref[first + i].nll_true, 1e-5) << key << i;
    }
  };
  check("rewrite_prompts_probs", 0, 1);
  check("paraphrase_prompts_probs", 1, r.paraphrase_prompts.size());
  check("neighborhood_prompts_probs", 1 + r.paraphrase_prompts.size(), r.neighborhood_prompts.size());
  EXPECT_EQ(cm.values["attribute_prompts_probs"].size(), r.attribute_prompts.size());
  EXPECT_EQ(cm.values["neighborhood_prompts_correct"].size(), r.neighborhood_prompts.size());
  ASSERT_EQ(cm.paraphrase_experts.size(), r.paraphrase_prompts.size());
  for (size_t j = 0; j < r.paraphrase_prompts.size(); ++j) {
    EXPECT_EQ(cm.paraphrase_experts[j], ref[1 + j].experts) << j;
    EXPECT_EQ(cm.paraphrase_success[j], ref[1 + j].nll_true > ref[1 + j].nll_new ? 1.0 : 0.0);
  }
  EXPECT_FALSE(cm.values.contains("ngram_entropy"));  // no generation asked

  // Generation: seeded, so pre-style repeats give identical texts; one text per prompt, prompt included.
  o.generation = true;
  o.gen.max_out_len = 24;
  const auto g1 = eval::case_metrics(*m, tok, r, o), g2 = eval::case_metrics(*m, tok, r, o);
  ASSERT_EQ(g1.values["text"].size(), r.generation_prompts.size());
  EXPECT_EQ(g1.values["text"], g2.values["text"]);
  EXPECT_EQ(g1.values["text"][0].get<std::string>().rfind(r.generation_prompts[0], 0), 0u);
  std::vector<std::string> texts = g1.values["text"];
  EXPECT_DOUBLE_EQ(g1.values["ngram_entropy"].get<double>(), eval::ngram_entropy(texts));
}

// ---- readers -----------------------------------------------------------------------------------------------------

TEST(EvalReaders, ZsreAndEasyEditRecords) {
  TempDir tmp;
  test::write_file(tmp / "zsre.json", R"([{"subject": "Paris", "src": "Which country is Paris in?", "pred": "x",
      "rephrase": "Paris is in which country?", "alt": "Italy", "answers": ["France"],
      "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare", "cond": "x"}])");
  const auto z = load_eval_records(tmp / "zsre.json");
  ASSERT_EQ(z.size(), 1u);
  EXPECT_TRUE(z[0].token_accuracy);
  EXPECT_EQ(z[0].prompt, "Which country is {} in?");
  EXPECT_EQ(z[0].target_new, "France");
  EXPECT_EQ(z[0].locality_prompt, "nq question: who wrote hamlet?");
  EXPECT_EQ(z[0].locality_answer, "Shakespeare");
  EXPECT_EQ(z[0].paraphrase_prompts, std::vector<std::string>{"Paris is in which country?"});

  test::write_file(tmp / "ee.json", R"([{"prompt": "The capital of France is", "subject": "France",
      "target_new": "Lyon", "ground_truth": "Paris", "rephrase_prompt": "France's capital is",
      "locality_prompt": "The capital of Spain is", "locality_ground_truth": "Madrid"}])");
  const auto e = load_eval_records(tmp / "ee.json");
  ASSERT_EQ(e.size(), 1u);
  EXPECT_EQ(e[0].prompt, "The capital of {} is");
  EXPECT_EQ(e[0].target_true, "Paris");
  EXPECT_EQ(e[0].locality_answer, "Madrid");

  // Token accuracy on the demo model: flat per-token lists, as ROME's zsRE evaluation.
  auto m = Model::load(demo_dir());
  const Tokenizer tok = Tokenizer::from_file(demo_dir());
  eval::CaseMetricsOptions o;
  o.layer = 1;
  const auto cm = eval::case_metrics(*m, tok, e[0], o);
  EXPECT_EQ(cm.values["rewrite_prompts_correct"].size(), tok.encode_ids(" Lyon", false).size());
  EXPECT_EQ(cm.values["neighborhood_prompts_correct"].size(), tok.encode_ids(" Madrid", false).size());
  EXPECT_FALSE(cm.values.contains("rewrite_prompts_probs"));
}

TEST(EvalReaders, MalformedRecordsNameFileRecordAndField) {
  TempDir tmp;
  auto expect_error = [&](const std::string& text, const std::string& field, const char* fmt = "auto") {
    test::write_file(tmp / "bad.json", text);
    try {
      load_eval_records(tmp / "bad.json", parse_dataset_format(fmt));
      ADD_FAILURE() << "no error for " << text;
    } catch (const InputError& err) {
      const std::string msg = err.what();
      EXPECT_NE(msg.find(tmp / "bad.json"), std::string::npos) << msg;
      EXPECT_NE(msg.find("record 1"), std::string::npos) << msg;
      EXPECT_NE(msg.find(field), std::string::npos) << msg;
    }
  };
  const std::string z0 = R"({"subject": "A", "src": "A is?", "rephrase": "r A", "answers": ["x"], "loc": "q", "loc_ans": "y"})";
  expect_error("[" + z0 + R"(, {"subject": "B", "src": "B is?", "rephrase": "r", "answers": ["x"], "loc": "q"}])", "loc_ans");
  expect_error("[" + z0 + R"(, {"subject": "B", "src": "C is?", "rephrase": "r", "answers": [], "loc": "q", "loc_ans": "y"}])",
               "src");
  const std::string e0 = R"({"prompt": "A is", "subject": "A", "target_new": "x"})";
  expect_error("[" + e0 + R"(, {"prompt": "A is", "subject": "A", "target_new": 3}])", "target_new", "easyedit");
  expect_error("[" + e0 + R"(, {"prompt": "A is", "subject": "A", "target_new": "x", "locality_prompt": "q"}])",
               "locality_ground_truth", "easyedit");
  expect_error(R"([{"case_id": 4, "requested_rewrite": {"prompt": "{} is", "subject": "A", "target_new": {"str": "x"},
      "target_true": {"str": "y"}}}, {"case_id": 4, "requested_rewrite": {"prompt": "{} is", "subject": "A",
      "target_new": {"str": "x"}, "target_true": {"str": "y"}}}])",
               "case_id");

  // The CLI: exit 2 and the same message.
  test::write_file(tmp / "bad.json", "[" + z0 + R"(, {"subject": "B", "src": "B is?", "answers": ["x"], "loc": "q", "loc_ans": "y"}])");
  const auto r = test::run_cli("eval " + demo_dir() + " --dataset " + (tmp / "bad.json") + " --layer 1 --out " + (tmp / "o"));
  EXPECT_EQ(r.code, 2) << r.err;
  EXPECT_NE(r.err.find("record 1"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("rephrase"), std::string::npos) << r.err;
}

// ---- the run driver ----------------------------------------------------------------------------------------------

// Fast settings (tests/eval_util.h).
std::string run_args(const std::string& out, const std::string& extra = "") { return test::fast_eval_args(out, extra); }
using test::summary_without_time;

TEST(EvalRun, LayerAutoEditsTheLayerWithTheLargestMeanMoeEffect) {
  TempDir tmp;
  const auto r = test::run_cli("eval " + demo_dir() + " --dataset " + bundled_cf() +
                               " --layer auto --auto-layer-cases 3 --limit 1 --no-mom2 --steps 2 --generation-interval 0"
                               " --quiet --out " + (tmp / "o"));
  ASSERT_EQ(r.code, 0) << r.err;
  const json s = json::parse(test::read_file(tmp / "o/settings.json"));
  EXPECT_EQ(s["layer"], "auto");
  const json& a = s["layer_auto"];
  EXPECT_EQ(a["cases"], 3);
  const auto mean = a["mean_indirect_effect"].get<std::vector<double>>();
  ASSERT_EQ(mean.size(), 4u);  // the demo model: 4 MoE layers, each scored
  for (const double v : mean) EXPECT_TRUE(std::isfinite(v));
  const int best = int(std::max_element(mean.begin(), mean.end()) - mean.begin());
  EXPECT_EQ(a["layer"], best);
  const json c0 = json::parse(test::read_file(eval::case_path(tmp / "o", load_eval_records(bundled_cf())[0].case_id)));
  EXPECT_EQ(c0["moe"]["layer"], best);  // the edit used that layer
}

TEST(EvalRun, ResumeAfterInterruptionAndMergedShardsEqualOneRun) {
  TempDir tmp;
  const auto full = test::run_cli(run_args(tmp / "full", "--limit 3"));
  ASSERT_EQ(full.code, 0) << full.err;
  const json ref = summary_without_time(tmp / "full");
  EXPECT_EQ(ref["num_cases"], 3);
  EXPECT_TRUE(ref.contains("post_rewrite_success"));
  EXPECT_TRUE(ref.contains("post_ngram_entropy"));
  EXPECT_TRUE(ref.contains("post_score"));
  EXPECT_FALSE(ref.contains("post_reference_score"));  // no snippets: absent, never faked
  EXPECT_TRUE(std::filesystem::exists(tmp / "full/summary.md"));
  EXPECT_TRUE(std::filesystem::exists(tmp / "full/distributions.svg"));
  const json c0 = json::parse(test::read_file(eval::case_path(tmp / "full", load_eval_records(bundled_cf())[0].case_id)));
  for (const char* k : {"case_id", "requested_rewrite", "time", "pre", "post", "moe"}) EXPECT_TRUE(c0.contains(k)) << k;

  // An interrupted run: two finished cases, a half-written temporary file and no summary.
  const std::string part = tmp / "part";
  std::filesystem::create_directories(part + "/cases");
  std::filesystem::copy_file(tmp / "full/settings.json", part + "/settings.json");
  const auto recs = load_eval_records(bundled_cf());
  for (const size_t i : {0, 2})
    std::filesystem::copy_file(eval::case_path(tmp / "full", recs[i].case_id), eval::case_path(part, recs[i].case_id));
  test::write_file(eval::case_path(part, recs[1].case_id) + ".tmp.99999", "{\"case_id\": 1, \"pre\": {");
  const auto again = test::run_cli(run_args(part, "--limit 3"));
  EXPECT_EQ(again.code, 2) << "an existing run needs --resume";
  const auto resumed = test::run_cli(run_args(part, "--limit 3 --resume"));
  ASSERT_EQ(resumed.code, 0) << resumed.err;
  EXPECT_EQ(summary_without_time(part), ref);
  const auto other = test::run_cli(run_args(part, "--limit 3 --resume --steps 5"));
  EXPECT_EQ(other.code, 2) << "resuming with other settings must fail";

  for (const char* s : {"0/2", "1/2"}) {
    const auto r = test::run_cli(run_args(tmp / ("shard" + std::string(1, s[0])), std::string("--limit 3 --shard ") + s));
    ASSERT_EQ(r.code, 0) << r.err;
  }
  EXPECT_EQ(json::parse(test::read_file(tmp / "shard0/summary.json"))["num_cases"], 2);  // records 0 and 2
  EXPECT_EQ(json::parse(test::read_file(tmp / "shard1/summary.json"))["num_cases"], 1);
  const auto merged = test::run_cli("eval merge " + (tmp / "shard0") + " " + (tmp / "shard1") + " --out " + (tmp / "merged"));
  ASSERT_EQ(merged.code, 0) << merged.err;
  EXPECT_EQ(summary_without_time(tmp / "merged"), ref);
  const auto mismatch = test::run_cli("eval merge " + (tmp / "shard0") + " " + (tmp / "other") + " --out " + (tmp / "m2"));
  EXPECT_EQ(mismatch.code, 2);
}

TEST(EvalRun, SequentialEditsAccumulateAndAreRevertedAtTheEnd) {
  TempDir tmp;
  auto m = Model::load(demo_dir());
  const Tokenizer tok = Tokenizer::from_file(demo_dir());
  const std::vector<Weight> before = m->weights().layers[3].ffn.experts.down;
  const auto recs = load_eval_records(bundled_cf());
  eval::RunOptions o;
  o.out_dir = tmp / "seq";
  o.limit = 3;
  o.sequential_every = 2;
  o.generation_interval = 0;
  o.edit.layer = 3;
  o.edit.mom2_adjustment = false;
  o.edit.v.steps = 2;
  o.settings = {{"test", "sequential"}};
  const auto res = eval::run_eval(*m, tok, recs, o);
  EXPECT_EQ(res.evaluated, 3);
  ASSERT_EQ(res.summary["sequential"].size(), 3u);  // the clean model, after 2 and after 3 edits
  EXPECT_EQ(res.summary["sequential"][0]["edits"], 0);
  EXPECT_EQ(res.summary["sequential"][1]["edits"], 2);
  EXPECT_EQ(res.summary["sequential"][2]["num_cases"], 3);
  for (const auto& p : res.summary["sequential"]) EXPECT_TRUE(p.contains("perplexity_wikitext")) << p.dump();
  EXPECT_TRUE(res.summary["sequential"][2]["routing_drift"].contains("wikitext"));
  EXPECT_TRUE(std::filesystem::exists(tmp / "seq/sequential/curve.svg"));
  EXPECT_TRUE(std::filesystem::exists(tmp / "seq/sequential/after_3.json"));
  EXPECT_TRUE(m->weights().layers[3].ffn.experts.down == before);  // every edit reverted, bit for bit
}

}  // namespace
}  // namespace moedit
