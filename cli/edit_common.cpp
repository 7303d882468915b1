// The shared parts of `moedit edit` (see cli/edit_common.h).
#include "cli/edit_common.h"

#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <set>
#include <sstream>

#include "datasets/counterfact.h"
#include "editor/save.h"
#include "io/errors.h"

namespace moedit::cli {

std::vector<EditRequest> edit_requests(const EditArgs& a) {
  std::vector<EditRequest> reqs;
  if (!a.requests.empty()) {
    require_input(a.subject.empty() && a.prompt.empty() && a.target_new.empty(),
                  "give either --requests or --subject/--prompt/--target-new, not both");
    reqs = load_requests(a.requests);
    if (a.limit >= 0 && int(reqs.size()) > a.limit) reqs.resize(size_t(a.limit));
  } else {
    require_input(!a.subject.empty(), "--subject is required (or --requests FILE)");
    require_input(!a.prompt.empty(), "--prompt is required (or --requests FILE)");
    EditRequest r{a.prompt, a.subject, a.target_new, a.target_true, a.paraphrases, a.neighbors, ""};
    require_input(!r.target_new.empty() && r.target_new.find_first_not_of(" \t") != std::string::npos,
                  "--target-new is empty");
    reqs.push_back(std::move(r));
  }
  for (size_t i = 0; i < reqs.size(); ++i) {  // every request validated before any work
    try {
      normalized_prompt(reqs[i]);
    } catch (const InputError& e) {
      if (a.requests.empty()) throw;
      throw InputError(a.requests + "[" + std::to_string(i) + "]: " + e.what());
    }
  }
  return reqs;
}

EditStats edit_stats(const Model& m, const Tokenizer& tok, const EditArgs& a) {
  KeyStatsOptions so = key_stats_options(a.editor);
  if (::isatty(2) && !a.quiet)
    so.progress = [](int64_t done, int64_t total) {
      std::fprintf(stderr, "\rkey statistics: %lld / %lld tokens", static_cast<long long>(done),
                   static_cast<long long>(total));
      if (done >= total) std::fprintf(stderr, "\n");
    };
  EditStats s;
  s.cache = std::make_unique<KeyStatsCache>(m, tok, so);
  auto warned = std::make_shared<std::set<std::pair<int, int>>>();
  auto announced = std::make_shared<std::set<int>>();
  s.moments = [stats = s.cache.get(), quiet = a.quiet, warned, announced,
               n_shared = m.config().n_shared_experts](int layer, int expert) {
    auto st = stats->get(layer, expert);
    if (!quiet && !stats->loaded_from_disk(layer) && announced->insert(layer).second)
      std::fprintf(stderr, "moedit: computed key statistics for layer %d over %lld corpus tokens (cached in %s)\n",
                   layer, static_cast<long long>(stats->corpus_tokens(layer)), stats->layer_dir(layer).c_str());
    if (st->count < 2 * st->mom2.rows() && warned->insert({layer, expert}).second)
      std::fprintf(stderr,
                   "moedit: warning: layer %d expert %s saw %lld corpus tokens, fewer than 2x its key size (%lld); "
                   "its statistics are poorly conditioned (larger corpus or --ridge)\n",
                   layer, expert_label(expert, n_shared).c_str(), static_cast<long long>(st->count),
                   static_cast<long long>(st->mom2.rows()));
    return st;
  };
  return s;
}

void print_score(const char* what, const PromptScore& s, bool has_true, bool neighbor) {
  std::printf("    %-10s P(new)=%-9.4g", what, s.p_new);
  if (has_true) {
    const bool ok = neighbor ? s.nll_true < s.nll_new : s.nll_new < s.nll_true;
    std::printf(" P(true)=%-9.4g %s", s.p_true, ok ? "ok " : "no ");
  }
  if (s.subject_last >= 0) std::printf(" routes-through-edited=%s", s.edited_hits > 0 ? "yes" : "no");
  std::printf("  %s\n", s.prompt.c_str());
}

void print_report(const EditReport& rep, bool has_true) {
  print_score("rewrite", rep.rewrite, has_true, false);
  for (const auto& p : rep.paraphrases) print_score("paraphrase", p, has_true, false);
  for (const auto& p : rep.neighbors) print_score("neighbor", p, has_true, true);
}

void EditTally::add(const EditRequest& req, const EditReport& rep) {
  if (req.target_true.empty()) return;
  ++n_true;
  es += rep.rewrite.nll_new < rep.rewrite.nll_true;
  if (!rep.paraphrases.empty()) {
    double s = 0;
    for (const auto& p : rep.paraphrases) s += p.nll_new < p.nll_true;
    ps += s / double(rep.paraphrases.size());
    ++ps_n;
  }
  if (!rep.neighbors.empty()) {
    double s = 0;
    for (const auto& p : rep.neighbors) s += p.nll_true < p.nll_new;
    ns += s / double(rep.neighbors.size());
    ++ns_n;
  }
}

nlohmann::json EditTally::summary(bool json) const {
  // A rate over no prompts is absent (null / "—"), never 0.
  auto rate = [](double hits, int n) { return n ? nlohmann::json(hits / n) : nlohmann::json(nullptr); };
  auto pct = [](double hits, int n) {
    char b[32];
    std::snprintf(b, sizeof b, "%.1f%%", 100 * hits / n);
    return n ? std::string(b) : std::string("— (none given)");
  };
  if (!json)
    std::printf("summary over %d requests: efficacy %s, paraphrase %s, neighborhood %s\n", n_true,
                pct(es, n_true).c_str(), pct(ps, ps_n).c_str(), pct(ns, ns_n).c_str());
  return {{"requests", n_true},
          {"efficacy", double(es) / n_true},
          {"paraphrase", rate(ps, ps_n)},
          {"neighborhood", rate(ns, ns_n)}};
}

nlohmann::json save_edits(Model& m, const EditArgs& a, const std::vector<std::pair<int, int>>& edited,
                          const std::function<nlohmann::json()>& last_rewrite) {
  require_input(!a.independent, "--save with --independent would save the unedited model");
  const bool f32 = a.save_dtype == "f32";
  const SaveReport sr = save_edited_checkpoint(m, a.model, a.save, edited, {a.overwrite, f32});
  // What a reload computes: the edited tensors in their stored dtype.
  const auto dtypes = f32 ? std::vector<std::string>{"F32"} : round_to_checkpoint_dtype(m, a.model, edited);
  nlohmann::json out = {{"path", a.save}, {"edited_tensor_dtypes", dtypes}, {"delta_rounding", sr.rounding_ratio()}};
  for (const SavedTensor& t : sr.tensors)
    out["tensors"].push_back(
        {{"name", t.name}, {"dtype", t.dtype}, {"max_abs_delta", t.max_delta}, {"max_abs_rounding", t.max_rounding}});
  bool rounded = false;
  for (const auto& d : dtypes) rounded |= d != "F32";
  if (rounded && last_rewrite) out["last_rewrite_after_rounding"] = last_rewrite();
  if (!a.json) {
    std::printf("saved the edited checkpoint to %s (%zu edited tensor%s, %s)\n", a.save.c_str(), sr.tensors.size(),
                sr.tensors.size() == 1 ? "" : "s", f32 ? "written as F32" : "in their stored dtype");
    if (rounded)
      std::printf("rounding of the update by %s: max |dW_written - dW| / max |dW| = %.3g (--save-dtype f32 keeps "
                  "dW exact)\n", dtypes.size() == 1 ? dtypes[0].c_str() : "the stored dtypes", sr.rounding_ratio());
  }
  return out;
}

}  // namespace moedit::cli
