// Token triggers of chosen experts (after Hu & Li 2026, "What Gets Activated: Uncovering Domain and Driver
// Experts"): over a set of sequences, for expert e of MoE layer l ("active" on a token: e is in its top-k set):
//
//   count(v)        tokens with id v on which the expert is active
//   lift(v)         P(v | active) / P(v) = (count(v) / active) / (occurrences(v) / tokens)   (> 1: v triggers it)
//   rate at position p        active tokens at absolute position p / tokens at p (positions ≥ max_pos pooled in
//                             the last bin; a position is the token's index in its sequence, 0 = first)
//   rate at relative position active / tokens in each of rel_bins equal bins of index / length
//
// The top tokens are ranked by count (then lift), among tokens seen at least min_occurrences times.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "tracing/interventions.h"
#include "tracing/routing.h"

namespace moedit {

struct TriggerToken {
  int32_t id = 0;
  int64_t count = 0, occurrences = 0;
  double lift = 0;
};

struct ExpertTriggers {
  int layer = 0, expert = 0;
  int64_t active = 0, tokens = 0;
  std::vector<TriggerToken> top;
  std::vector<int64_t> tokens_at, active_at;    // [max_pos] by absolute position
  std::vector<int64_t> tokens_rel, active_rel;  // [rel_bins] by relative position
  double rate_at(size_t p) const { return tokens_at[p] ? double(active_at[p]) / double(tokens_at[p]) : 0.0; }
  double rate_rel(size_t b) const { return tokens_rel[b] ? double(active_rel[b]) / double(tokens_rel[b]) : 0.0; }
};

struct TriggerOptions {
  int top = 20, min_occurrences = 3, max_pos = 32, rel_bins = 10;
  RoutingOptions routing;
};

// InputError when an expert is not in a MoE layer's range.
std::vector<ExpertTriggers> expert_triggers(const Model& m, const std::vector<std::vector<int32_t>>& seqs,
                                            const std::vector<ExpertRef>& experts, const TriggerOptions& opt = {});

// Each expert's top-activating contexts (for labelling experts elsewhere, e.g. by an LLM): over every MoE layer and
// expert, the n tokens with the largest routing weight for it, each with its sequence, position and weight; ties
// keep the earlier token.
struct ExpertExample {
  int seq = 0, pos = 0;
  float weight = 0;
};
struct ExpertExamples {
  int layer = 0, expert = 0;
  int64_t active = 0;
  std::vector<ExpertExample> top;             // by weight descending
  std::vector<std::pair<int32_t, int64_t>> keywords;  // the tokens it is active on most (id, count)
};
std::vector<ExpertExamples> expert_examples(const Model& m, const std::vector<std::vector<int32_t>>& seqs, int n,
                                            int n_keywords = 10, const RoutingOptions& routing = {});

// JSON (pieces: token id → text, may be empty) and an SVG heatmap of the rate by absolute position.
nlohmann::json triggers_json(const std::vector<ExpertTriggers>& t, const std::vector<std::string>& pieces);
std::string triggers_svg(const std::vector<ExpertTriggers>& t, const std::string& title);

}  // namespace moedit
