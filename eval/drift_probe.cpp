#include "eval/drift_probe.h"

#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "datasets/counterfact.h"
#include "editor/keystats.h"
#include "eval/counterfact_eval.h"
#include "io/errors.h"

namespace moedit::eval {

Sequences wikitext_windows(const Tokenizer& tok, int tokens) {
  if (tokens <= 0) return {};
  std::ifstream f(bundled_wikitext_path(), std::ios::binary);
  if (!f) throw InputError(bundled_wikitext_path() + ": cannot open the WikiText-2 sample");
  std::stringstream ss;
  ss << f.rdbuf();
  return corpus_windows(tok, ss.str(), 128, tokens);
}

double windows_perplexity(const Model& m, const Sequences& windows) {
  std::vector<TargetQuery> qs;
  for (const auto& w : windows)
    if (w.size() >= 2) qs.push_back({{w[0]}, std::vector<int32_t>(w.begin() + 1, w.end()), -1});
  require_input(!qs.empty(), "perplexity: no window of two or more tokens");
  double nll = 0, n = 0;
  const auto scores = score_targets(m, qs);
  for (size_t i = 0; i < qs.size(); ++i) {
    nll += scores[i].nll * double(qs[i].target.size());  // score_targets gives the mean over the window's targets
    n += double(qs[i].target.size());
  }
  return std::exp(nll / n);
}

DriftProbe::DriftProbe(const Model& m, Sequences prompts) : prompts_(std::move(prompts)) {
  if (!prompts_.empty()) before_ = snapshot_routers(m, prompts_);
}

RoutingDrift DriftProbe::measure(const Model& m) const {
  if (prompts_.empty()) return {};
  return routing_drift(before_, snapshot_routers(m, prompts_));
}

nlohmann::json drift_json(const RoutingDrift& d) {
  return {{"cells", d.cells}, {"changed_share", d.changed_share}, {"mean_kl", d.mean_kl}};
}

std::string drift_text(const char* label, const RoutingDrift& d) {
  char b[160];
  std::snprintf(b, sizeof b, "%s %.1f%% of (token, layer) top-k sets changed, router KL %.2g", label,
                100 * d.changed_share, d.mean_kl);
  return b;
}

}  // namespace moedit::eval
