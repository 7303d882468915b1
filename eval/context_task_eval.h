// The context-dependent QA task (datasets/context_task.h) on a model: tokenization, the task score, and the
// context-faithful experts of Router Lens (Bai et al., EMNLP 2025; issue 19).
//
// Prompt and answer: prompt = encode(context + " " + question) with the tokenizer's special tokens, answer =
// encode(" " + answer) without them (the form eval/counterfact_eval.h scores CounterFact targets in).
//
// Task score, per example:
//   exact match   greedy decoding (argmax, lowest id on ties) of as many tokens as the gold answer has, stopping
//                 early at the tokenizer's EOS, gives exactly the gold answer's tokens (token-level EM; the paper
//                 compares normalised strings of a free generation — with single-sentence answers both agree
//                 whenever the model stops after the answer).
//   p(first)      the probability of the gold answer's first token after the prompt (softmax of the logits).
//   EM (%) and mean p(first) over the examples.
//
// Context-faithful (CE) experts: RouterLens's exp_act_count runs every training example as one sequence (prompt
// followed by the answer) and counts, per MoE layer, how many tokens select each expert into their top-k (here the
// experts the router actually selected: for softmax→top-k routers the k largest logits, RouterLens's argsort); the K
// most-activated experts of each layer (count descending, ties to the lower id) are the CE experts of the
// router-tuned model, the OE experts the same count's top-K on the untuned (base) model.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "datasets/context_task.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"
#include "tracing/interventions.h"
#include "tracing/routing_profile.h"

namespace moedit::eval {

struct TaskItem {
  int case_id = -1;
  std::vector<int32_t> prompt;        // [P] context + " " + question
  std::vector<int32_t> answer;        // [A >= 1] " " + answer
  int ctx_begin = 0, ctx_end = 0;     // the context's tokens: prompt[ctx_begin, ctx_end)
  int ans_begin = -1, ans_end = -1;   // the answer's last occurrence inside the context, prompt[ans_begin, ans_end);
                                      // -1 when the context does not contain the answer string
  // prompt ‖ answer: the sequence the expert counts run on.
  std::vector<int32_t> full() const;
};

// Tokenizes the examples; `source` (the file) names them in errors (a prompt or answer of no tokens, a context
// that no token covers).
std::vector<TaskItem> tokenize_task(const std::vector<ContextExample>& examples, const Tokenizer& tok,
                                    const std::string& source);
// InputError naming `source`, the example and the field unless every context contains its answer.
void require_answer_in_context(const std::vector<TaskItem>& items, const std::string& source);

struct TaskScore {
  std::vector<uint8_t> exact;                   // per example: greedy answer == gold answer
  std::vector<double> first_prob;               // per example: p(gold answer's first token | prompt)
  std::vector<std::vector<int32_t>> predicted;  // per example: the greedy tokens
  double em() const;                            // % of examples
  double mean_first_prob() const;
  nlohmann::json summary() const;               // {"examples", "exact_match", "em", "p_first"}
  std::string line() const;                     // "EM 12.33% (27/219), mean p(first answer token) 0.1234"
  // Per example: [{"case_id", "exact", "p_first", "prediction" (the greedy tokens decoded)}].
  nlohmann::json examples_json(const std::vector<TaskItem>& items, const Tokenizer& tok) const;
};
// `hooks` (e.g. installed masks) run in every forward; eos_token_id < 0: never stop early.
TaskScore score_task(const Model& m, const std::vector<TaskItem>& items, const Hooks* hooks = nullptr,
                     int eos_token_id = -1, int batch_tokens = 4096);

// Expert activation counts on the items' full sequences (prompt ‖ answer), every token.
ActivationProfile count_task_experts(const Model& m, const std::vector<TaskItem>& items, const RoutingOptions& ro);
// Per MoE layer of the profile (p.layers order): the K experts of the highest counts (ties: lower id first).
std::vector<std::vector<int>> most_activated(const ActivationProfile& p, int K);

// The CE file (`moedit experts --context-faithful --out CE.json`):
//   {"format": "moedit-context-faithful-experts/1", "model", "data", "examples", "tokens", "top", "top_k",
//    "layers": [l, ...], "ce": {"l": [e, ...]}, "counts": {"l": [count of expert 0, ...]},
//    with a base model also "base", "base_tokens", "oe": {"l": [e, ...]}, "base_counts", "shared": {"l": |CE ∩ OE|}}
nlohmann::json context_faithful_json(const ActivationProfile& tuned, const ActivationProfile* base, int K);
// Its table: per MoE layer the CE experts with their counts (and OE, shared with a base).
std::string context_faithful_table(const nlohmann::json& ce);
// The expert set `which` ("ce" or "oe") of a CE file as mask entries; InputError naming the file and the field.
std::vector<ExpertRef> read_expert_set(const std::string& path, const std::string& which);

}  // namespace moedit::eval
