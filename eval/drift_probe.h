// How far an edit moves the routers, and the model's perplexity on WikiText-2 (issue 18): a DriftProbe takes the
// routers' view of a fixed set of prompts on the model as it is when the probe is made, and `measure` compares a
// later state of the model on the same prompts (model/routing_drift.h: the share of (token, MoE layer) cells whose
// top-k set changed and the mean router KL). Used by `moedit edit` (every edit or batch) and `moedit eval` (every
// case, batch and sequential curve point).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "model/model.h"
#include "model/routing_drift.h"
#include "tokenizer/tokenizer.h"

namespace moedit::eval {

using Sequences = std::vector<std::vector<int32_t>>;

// The first `tokens` tokens of the bundled WikiText-2 test split in windows of 128 tokens (empty for tokens ≤ 0).
Sequences wikitext_windows(const Tokenizer& tok, int tokens);

// exp(Σ −log p / #predicted tokens) over the windows (token t predicted from tokens < t of its window).
double windows_perplexity(const Model& m, const Sequences& windows);

class DriftProbe {
 public:
  DriftProbe() = default;
  DriftProbe(const Model& m, Sequences prompts);  // the routers' view now
  bool empty() const { return prompts_.empty(); }
  RoutingDrift measure(const Model& m) const;      // the same prompts on the model as it is now
  const Sequences& prompts() const { return prompts_; }

 private:
  Sequences prompts_;
  RouterSnapshot before_;
};

nlohmann::json drift_json(const RoutingDrift& d);  // {"cells", "changed_share", "mean_kl"}
std::string drift_text(const char* label, const RoutingDrift& d);  // "label x% of (token, layer) top-k sets changed, …"

}  // namespace moedit::eval
