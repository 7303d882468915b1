// Steering report (issue 20): how steering the routers with a cluster's expert vector E_c (tracing/interventions.h,
// forms 3–5) changes what the model writes and how well it still models ordinary text.
//
// For each coefficient c (c = 0 is the unsteered model): continuations of the prompts (model/generate.h, the same
// seed for every c, so only the steering differs; stopped at the tokenizer's EOS), the rate of the cluster's keywords among their words, and the
// perplexity (ROME's, eval/counterfact_eval.h) of reference texts (a WikiText-2 sample), averaged over the texts.
#pragma once
#include <string>
#include <vector>

#include "model/model.h"
#include "tokenizer/tokenizer.h"
#include "tracing/interventions.h"

namespace moedit::eval {

// Words of the texts (eval/text_metrics.h tfidf_tokens: lowercase, ≥ 2 word characters) that are keywords (compared
// lowercase), ÷ all their words; NaN when the texts hold no word.
double keyword_rate(const std::vector<std::string>& texts, const std::vector<std::string>& keywords);

struct SteerReportOptions {
  std::vector<double> coefs = {0, 0.5, 1, 2};
  int new_tokens = 40;
  int top_k = 5;          // sampling (0: greedy)
  uint64_t seed = 1;
  int ppl_tokens = 100;   // perplexity on each reference text's first tokens
};

struct SteerReportRow {
  double c = 0;
  double keyword_rate = 0;
  double perplexity = 0;                // mean over the reference texts
  std::vector<std::string> generations; // [prompts], continuation only
};

// `steer` holds the vector and form; its c is replaced by each coefficient in turn.
std::vector<SteerReportRow> steer_report(const Model& m, const Tokenizer& tok, const Steering& steer,
                                         const std::vector<std::string>& prompts,
                                         const std::vector<std::string>& keywords,
                                         const std::vector<std::string>& reference, const SteerReportOptions& opt);

}  // namespace moedit::eval
