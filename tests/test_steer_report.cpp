// Issue 20 steering report: the keyword rate by hand, and the report's unsteered row on the demo model equals the
// plain model (generation and ROME's perplexity), while a strong steer changes the routed text.
#include <gtest/gtest.h>

#include <cmath>

#include "eval/counterfact_eval.h"
#include "eval/steer_report.h"
#include "model/generate.h"
#include "test_util.h"

namespace moedit {
namespace {

TEST(SteerReport, KeywordRateByHand) {
  // words: football, is, match | the, match ("a" is one character: not a word) → 3 keywords of 5 words
  EXPECT_DOUBLE_EQ(eval::keyword_rate({"Football is a match", "the MATCH"}, {"match", "Football"}), 0.6);
  EXPECT_DOUBLE_EQ(eval::keyword_rate({"nothing here"}, {"match"}), 0.0);
  EXPECT_TRUE(std::isnan(eval::keyword_rate({"!"}, {"match"})));
}

TEST(SteerReport, UnsteeredRowIsThePlainModel) {
  const std::string dir = test::source_dir() + "/models/moedit-demo";
  const auto m = Model::load(dir);
  const Tokenizer tok = Tokenizer::from_file(dir + "/tokenizer.json");
  const ModelConfig& c = m->config();
  Steering st;  // every expert 0 of every MoE layer
  for (int l = 0; l < c.n_layers; ++l)
    if (c.is_moe(l)) {
      st.layers.push_back(l);
      VecF v = VecF::Zero(c.n_experts);
      v[0] = 1;
      st.vector.push_back(v);
    }
  st.form = 3;
  eval::SteerReportOptions o;
  o.coefs = {0, 50};
  o.new_tokens = 6;
  o.top_k = 0;
  const std::string ref = "The city of Paris is the capital of France and its largest city by population.";
  const auto rows = eval::steer_report(*m, tok, st, {"The mother tongue of"}, {"french"}, {ref}, o);
  ASSERT_EQ(rows.size(), 2u);
  GenerateOptions g;
  g.max_new_tokens = 6;
  if (const auto eos = tok.eos_id()) g.eos_token_id = *eos;
  EXPECT_EQ(rows[0].generations[0], tok.decode(generate(*m, tok.encode_ids("The mother tongue of", true), g)));
  EXPECT_DOUBLE_EQ(rows[0].perplexity, eval::perplexity(*m, tok, ref, 100));
  EXPECT_DOUBLE_EQ(rows[0].keyword_rate, eval::keyword_rate(rows[0].generations, {"french"}));
  // c = 50 on expert 0 everywhere forces it into every top-k: the reference text is modelled differently.
  EXPECT_NE(rows[1].perplexity, rows[0].perplexity);
}

}  // namespace
}  // namespace moedit
