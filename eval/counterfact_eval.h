// One case's "pre" / "post" metrics, exactly as ROME's experiments/py/eval_utils_counterfact.py and
// eval_utils_zsre.py compute them (spec/rome.md §4.2, §4.4), on the model as it stands.
//
// Scoring is teacher forced: the input is encode(prompt) (with the tokenizer's special tokens, as ROME's
// tok(prefix)) followed by the target's ids encode(" " + target) (no special tokens); the logit row at
// |prompt| + j − 1 predicts target token j. ROME tokenizes f"{prefix} {target}" in one piece but scores the ids of
// tok(" " + target) at the same rows; the two inputs coincide whenever the tokenizer splits before the space
// (byte-level BPE with a whitespace pre-tokenizer, as all supported families), and this form never depends on it.
//
// CounterFact records (keys as ROME/MEMIT write them):
//   {rewrite,paraphrase,neighborhood,attribute}_prompts_probs: [{target_new: NLL, target_true: NLL}], NLL = mean
//       over the target's tokens of −log p (natural log);
//   {rewrite,paraphrase,neighborhood}_prompts_correct (MEMIT): every target token is the teacher-forced argmax —
//       target_new for rewrite and paraphrase prompts, target_true for neighbourhood prompts;
//   with generation: text (ROME's generate_fast: top-k 5 sampling, one sample per generation prompt, every prompt
//       continued to max_out_len − (longest prompt) new tokens, as its left-padded batch does, no stop at EOS;
//       all prompts decode as one batch with a KV cache, each with its own std::mt19937_64; decoded without
//       special tokens, NFKD, "\n\n" → " "), ngram_entropy (eval/text_metrics.h);
//   with snippets: reference_score (TF-IDF cosine of the joined texts and the joined snippets of
//       (relation_id, target_new.id); absent when there are none), essence_score (perplexity of the joined
//       snippets about the subject, first 100 tokens, exp(−Σ log p / N) with N counting the first token; absent
//       when there are none).
// Token-accuracy records (zsRE, EasyEdit): rewrite_prompts_correct / paraphrase_prompts_correct /
//   neighborhood_prompts_correct are ROME's flat per-token lists: target token j counts when it is the argmax
//   after prompt + target[:j] (target_new on the rewrite and paraphrase prompts, the locality answer on the
//   locality question).
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "datasets/attribute_snippets.h"
#include "datasets/eval_records.h"
#include "eval/text_metrics.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"

namespace moedit::eval {

// ---- teacher-forced scoring ----------------------------------------------------------------------------------

struct TargetQuery {
  std::vector<int32_t> prompt, target;  // target non-empty
  int route_token = -1;                 // ≥ 0: report the experts chosen at this prompt position
};
struct TargetScore {
  double nll = 0;                       // mean over target tokens of −log p
  std::vector<uint8_t> correct;         // per target token: the argmax (lowest id on ties) equals it
  std::vector<int> experts;             // top-k at the routing layer at route_token (top-k order)
  bool all_correct() const;
  double accuracy() const;              // mean of correct
};
// Runs the queries as packed batches of at most `batch_tokens` tokens; routing read at `route_layer` (−1: none);
// `hooks` (e.g. installed steering) run in every forward.
std::vector<TargetScore> score_targets(const Model& m, const std::vector<TargetQuery>& queries, int route_layer = -1,
                                       int batch_tokens = 4096, const Hooks* hooks = nullptr);

// ---- per-case metrics ---------------------------------------------------------------------------------------------

struct GenerationOptions {
  int max_out_len = 100;  // total length, prompt included (ROME's max_out_len)
  int top_k = 5;
  uint64_t seed = 1;      // prompt j of case c samples with seed mix(seed, c, j): the same in pre and post
};

struct CaseMetricsOptions {
  int layer = -1;                             // routing layer of the MoE extras (the edited layer)
  bool generation = false;                    // run generation (and the snippet scores, when snippets are given)
  GenerationOptions gen;
  const AttributeSnippets* snippets = nullptr;
  const TfIdf* tfidf = nullptr;               // required with snippets
};

struct CaseMetrics {
  nlohmann::json values;                      // the "pre" / "post" dictionary
  std::vector<double> paraphrase_success;     // per paraphrase prompt: success (0/1) or token accuracy
  std::vector<std::vector<int>> paraphrase_experts;  // top-k at `layer` at the subject's last token; empty: not found
};
CaseMetrics case_metrics(const Model& m, const Tokenizer& tok, const EvalRecord& rec, const CaseMetricsOptions& opt);

// Prompts decoded together in one batch (their groups run on separate threads). Only speed depends on it: 5 (two
// groups for CounterFact's 10 generation prompts) measured fastest on 2 threads, ahead of one group of 10.
constexpr size_t kGenerationGroup = 5;
// ROME's generate_fast as described above; returns the texts (prompt included).
std::vector<std::string> generate_texts(const Model& m, const Tokenizer& tok, const std::vector<std::string>& prompts,
                                        const GenerationOptions& opt, int case_id);
// ROME's util/perplexity.py on the first max_tokens tokens of text.
double perplexity(const Model& m, const Tokenizer& tok, const std::string& text, int max_tokens = 100,
                  const Hooks* hooks = nullptr);

}  // namespace moedit::eval
