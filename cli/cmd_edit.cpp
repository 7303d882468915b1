// moedit edit MODEL --subject S --prompt "{} is in" --target-new T [--target dominant|routed|shared|L:E]
//              [--layer L|auto] [--requests FILE] [--save DIR] [--json]
// ROME's rank-one edit on the experts of one MoE layer (editor/rome.h), with a report of what changed.
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/editor_flags.h"
#include "datasets/counterfact.h"
#include "editor/keystats.h"
#include "editor/rome.h"
#include "editor/save.h"
#include "io/errors.h"
#include "model/model.h"
#include "model/routing_drift.h"
#include "tokenizer/tokenizer.h"
#include "tracing/trace.h"

namespace moedit::cli {

namespace {

struct EditArgs {
  std::string model, subject, prompt, target_new, target_true, requests, target = "dominant", layer = "auto";
  std::vector<std::string> paraphrases, neighbors;
  std::string save, save_dtype = "checkpoint";
  bool json = false, overwrite = false, independent = false, quiet = false;
  int limit = -1;
  int drift_tokens = 512;
  EditorFlags editor;
};

nlohmann::json drift_json(const RoutingDrift& d) {
  return {{"cells", d.cells}, {"changed_share", d.changed_share}, {"mean_kl", d.mean_kl}};
}

// The prompts routing drift is measured on besides a request's neighbourhood prompts: the first `tokens` tokens of
// the bundled WikiText-2 test split, in windows of 128.
std::vector<std::vector<int32_t>> drift_corpus(const Tokenizer& tok, int tokens) {
  if (tokens <= 0) return {};
  std::ifstream f(bundled_wikitext_path(), std::ios::binary);
  if (!f) throw InputError(bundled_wikitext_path() + ": cannot open the WikiText-2 sample for routing drift");
  std::stringstream ss;
  ss << f.rdbuf();
  return corpus_windows(tok, ss.str(), 128, tokens);
}

// --layer auto: the MoE layer whose MoE block has the largest indirect effect at the subject's last token.
int auto_layer(const Model& m, const Tokenizer& tok, const EditRequest& req, double* embedding_std,
               nlohmann::json* info) {
  const std::vector<double> effects = moe_layer_effects(m, tok, req, embedding_std);
  const int best = best_effect_layer(effects);
  if (info) *info = {{"layer", best}, {"indirect_effect", effects[size_t(best)]}};
  return best;
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

void run_edit(const EditArgs& a) {
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
  for (const auto& r : reqs) normalized_prompt(r);  // every request validated before any work

  EditOptions opt = editor_options(a.editor);
  opt.target = parse_edit_target(a.target);
  bool auto_l = false;
  if (a.layer == "auto")
    auto_l = opt.target.kind != TargetKind::Expert;  // an explicit L:E names its layer
  else
    opt.layer = parse_layer_index(a.layer);

  require_input(a.save_dtype == "checkpoint" || a.save_dtype == "f32",
                "--save-dtype '" + a.save_dtype + "': expected checkpoint or f32");

  auto m = load_model(a.model);
  const ModelConfig& c = m->config();
  if (opt.layer >= 0 || opt.target.kind == TargetKind::Expert) {
    const int l = opt.target.kind == TargetKind::Expert ? opt.target.layer : opt.layer;
    require_input(l >= 0 && l < c.n_layers,
                  "layer " + std::to_string(l) + " is out of range [0, " + std::to_string(c.n_layers) + ")");
    require_input(c.is_moe(l), "layer " + std::to_string(l) + " is a dense layer (no experts to edit); choose an MoE layer");
    if (opt.target.kind == TargetKind::Expert)
      require_input(opt.target.expert < c.n_experts, "expert " + std::to_string(opt.target.expert) +
                                                         " does not exist: layer " + std::to_string(l) + " has " +
                                                         std::to_string(c.n_experts) + " experts");
  }
  const Tokenizer tok = Tokenizer::from_file(a.model);
  KeyStatsOptions so = key_stats_options(a.editor);
  const bool tty = ::isatty(2);
  if (tty && !a.quiet)
    so.progress = [](int64_t done, int64_t total) {
      std::fprintf(stderr, "\rkey statistics: %lld / %lld tokens", static_cast<long long>(done),
                   static_cast<long long>(total));
      if (done >= total) std::fprintf(stderr, "\n");
    };
  KeyStatsCache stats(*m, tok, so);
  std::set<std::pair<int, int>> warned;
  std::set<int> announced;
  opt.moments = [&stats, &a, &warned, &announced, n_shared = m->config().n_shared_experts](int layer, int expert) {
    auto s = stats.get(layer, expert);
    if (!a.quiet && !stats.loaded_from_disk(layer) && announced.insert(layer).second)
      std::fprintf(stderr, "moedit: computed key statistics for layer %d over %lld corpus tokens (cached in %s)\n",
                   layer, static_cast<long long>(stats.corpus_tokens(layer)), stats.layer_dir(layer).c_str());
    if (s->count < 2 * s->mom2.rows() && warned.insert({layer, expert}).second)
      std::fprintf(stderr,
                   "moedit: warning: layer %d expert %s saw %lld corpus tokens, fewer than 2x its key size (%lld); "
                   "its statistics are poorly conditioned (larger corpus or --ridge)\n",
                   layer, expert_label(expert, n_shared).c_str(),
                   static_cast<long long>(s->count), static_cast<long long>(s->mom2.rows()));
    return s;
  };

  nlohmann::json out;
  out["model"] = a.model;
  out["target"] = a.target;
  out["independent"] = a.independent;
  out["edits"] = nlohmann::json::array();
  std::vector<std::string> templates;
  std::vector<EditResult> applied;
  const auto wiki = drift_corpus(tok, a.drift_tokens);
  const RouterSnapshot wiki_original = wiki.empty() ? RouterSnapshot{} : snapshot_routers(*m, wiki);
  RouterSnapshot wiki_before = wiki_original;
  double embedding_std = -1;
  int n_true = 0, es = 0, ps_n = 0, ns_n = 0;
  double ps = 0, ns = 0;
  for (size_t i = 0; i < reqs.size(); ++i) {
    const EditRequest& req = reqs[i];
    EditOptions o = opt;
    nlohmann::json auto_info;
    if (auto_l) o.layer = auto_layer(*m, tok, req, &embedding_std, &auto_info);
    const int layer = o.target.kind == TargetKind::Expert ? o.target.layer : o.layer;
    const bool has_true = !req.target_true.empty();
    // Before: the same prompts on the current model.
    EditResult probe;
    probe.layer = layer;
    const EditReport pre = report_edit(*m, tok, req, probe);
    std::vector<std::vector<int32_t>> neigh;
    for (const auto& p : req.neighbors) neigh.push_back(tok.encode_ids(p, true));
    const RouterSnapshot neigh_before = neigh.empty() ? RouterSnapshot{} : snapshot_routers(*m, neigh);
    EditResult r = apply_edit(*m, tok, req, o, &templates);
    const EditReport rep = report_edit(*m, tok, req, r);
    // Routing drift of this edit: the routers before and after it, on the neighbourhood prompts and WikiText-2.
    nlohmann::json drift = nlohmann::json::object();
    std::string drift_line;
    auto measure = [&](const char* name, const char* label, const std::vector<std::vector<int32_t>>& seqs,
                       const RouterSnapshot& before, RouterSnapshot* keep) {
      if (seqs.empty()) return;
      RouterSnapshot after = snapshot_routers(*m, seqs);
      const RoutingDrift d = routing_drift(before, after);
      drift[name] = drift_json(d);
      char b[160];
      std::snprintf(b, sizeof b, "%s%s %.1f%% of (token, layer) top-k sets changed, router KL %.2g",
                    drift_line.empty() ? "" : "; ", label, 100 * d.changed_share, d.mean_kl);
      drift_line += b;
      if (keep) *keep = std::move(after);
    };
    measure("neighborhood", "neighbourhood", neigh, neigh_before, nullptr);
    RouterSnapshot wiki_after;
    measure("wikitext", "WikiText-2", wiki, wiki_before, &wiki_after);
    nlohmann::json j;
    j["case_id"] = req.case_id;
    j["request"] = {{"prompt", req.prompt}, {"subject", req.subject}, {"target_new", req.target_new},
                    {"target_true", req.target_true}};
    if (auto_l) j["auto_layer"] = auto_info;
    j["edit"] = edit_json(r);
    j["pre"] = pre.to_json(has_true);
    j["report"] = rep.to_json(has_true);
    j["routing_drift"] = drift;
    if (has_true) {
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
    if (!a.json) {
      std::printf("[%zu/%zu]%s %s → %s  layer %d, %s:", i + 1, reqs.size(),
                  req.case_id.empty() ? "" : (" case " + req.case_id).c_str(), req.subject.c_str(),
                  req.target_new.c_str(), r.layer, target_name(r.target).c_str());
      for (const auto& u : r.updates) {
        const std::string who = (is_shared_expert(u.expert) ? "" : "E") + expert_label(u.expert, r.n_shared_experts);
        std::printf(" %s(w=%.3f)", who.c_str(), u.weight);
      }
      std::printf("  v*: loss %.3f → %.3f in %d steps, %.2fs; templates routed %.0f%%\n", r.vstar.loss.front(),
                  r.vstar.loss.back(), r.vstar.updates, r.seconds, 100 * r.template_route_share);
      print_score("rewrite", rep.rewrite, has_true, false);
      for (const auto& p : rep.paraphrases) print_score("paraphrase", p, has_true, false);
      for (const auto& p : rep.neighbors) print_score("neighbor", p, has_true, true);
      if (!drift_line.empty()) std::printf("  routing drift: %s\n", drift_line.c_str());
    }
    out["edits"].push_back(std::move(j));
    if (a.independent) {
      revert(*m, r);
    } else {
      applied.push_back(std::move(r));
      if (!wiki.empty()) wiki_before = std::move(wiki_after);  // the next edit starts from this model
    }
  }
  if (n_true > 0) {
    // A rate over no prompts is absent (null / "—"), never 0.
    auto rate = [](double hits, int n) { return n ? nlohmann::json(hits / n) : nlohmann::json(nullptr); };
    auto pct = [](double hits, int n) {
      char b[32];
      std::snprintf(b, sizeof b, "%.1f%%", 100 * hits / n);
      return n ? std::string(b) : std::string("— (none given)");
    };
    out["summary"] = {{"requests", n_true},
                      {"efficacy", double(es) / n_true},
                      {"paraphrase", rate(ps, ps_n)},
                      {"neighborhood", rate(ns, ns_n)}};
    if (!a.json)
      std::printf("summary over %d requests: efficacy %s, paraphrase %s, neighborhood %s\n", n_true,
                  pct(es, n_true).c_str(), pct(ps, ps_n).c_str(), pct(ns, ns_n).c_str());
  }
  if (!wiki.empty() && !a.independent && reqs.size() > 1) {  // every edit together: unedited vs final model
    const RoutingDrift d = routing_drift(wiki_original, wiki_before);
    out["routing_drift_wikitext"] = drift_json(d);
    if (!a.json)
      std::printf("routing drift of all %zu edits on the WikiText-2 sample: %.1f%% of (token, layer) routings changed, "
                  "mean router KL %.2g\n", reqs.size(), 100 * d.changed_share, d.mean_kl);
  }
  out["templates"] = templates;
  if (!a.save.empty()) {
    require_input(!a.independent, "--save with --independent would save the unedited model");
    const auto edited = edited_experts(applied);
    const bool f32 = a.save_dtype == "f32";
    const SaveReport sr = save_edited_checkpoint(*m, a.model, a.save, edited, {a.overwrite, f32});
    // What a reload computes: the edited tensors in their stored dtype.
    const auto dtypes = f32 ? std::vector<std::string>{"F32"} : round_to_checkpoint_dtype(*m, a.model, edited);
    out["saved"] = {{"path", a.save}, {"edited_tensor_dtypes", dtypes},
                    {"delta_rounding", sr.rounding_ratio()}};
    for (const SavedTensor& t : sr.tensors)
      out["saved"]["tensors"].push_back(
          {{"name", t.name}, {"dtype", t.dtype}, {"max_abs_delta", t.max_delta}, {"max_abs_rounding", t.max_rounding}});
    bool rounded = false;
    for (const auto& d : dtypes) rounded |= d != "F32";
    if (rounded && !applied.empty() && !reqs.empty()) {  // the last request, as the saved model answers it
      const EditReport rep = report_edit(*m, tok, reqs.back(), applied.back());
      out["saved"]["last_rewrite_after_rounding"] = rep.to_json(!reqs.back().target_true.empty())["rewrite"];
    }
    if (!a.json) {
      std::printf("saved the edited checkpoint to %s (%zu edited tensor%s, %s)\n", a.save.c_str(), sr.tensors.size(),
                  sr.tensors.size() == 1 ? "" : "s", f32 ? "written as F32" : "in their stored dtype");
      if (rounded)
        std::printf("rounding of the update by %s: max |dW_written - dW| / max |dW| = %.3g (--save-dtype f32 keeps "
                    "dW exact)\n", dtypes.size() == 1 ? dtypes[0].c_str() : "the stored dtypes", sr.rounding_ratio());
    }
  }
  if (a.json) std::printf("%s\n", out.dump().c_str());
}

void register_edit(CLI::App& app) {
  static EditArgs a;
  auto* cmd = add_model_command(app, "edit", "ROME rank-one edit of the experts of one MoE layer", a.model);
  cmd->add_option("--subject", a.subject, "The subject whose fact is rewritten");
  cmd->add_option("--prompt", a.prompt, "Prompt with {} where the subject goes, e.g. \"{} is located in\"");
  cmd->add_option("--target-new", a.target_new, "The new object");
  cmd->add_option("--target-true", a.target_true, "The current object (report: P(new) vs P(true))");
  cmd->add_option("--paraphrase", a.paraphrases, "Paraphrase prompt(s) to score (repeatable)");
  cmd->add_option("--neighbor", a.neighbors, "Neighbourhood prompt(s) to score (repeatable)");
  cmd->add_option("--requests", a.requests,
                  "JSON list of CounterFact records or requested_rewrite objects, applied in sequence");
  cmd->add_option("--limit", a.limit, "Only the first N requests");
  cmd->add_flag("--independent", a.independent, "Edit each request from the unedited model (revert after each)");
  cmd->add_option("--target", a.target, "dominant | routed | shared | LAYER:EXPERT")->capture_default_str();
  cmd->add_option("--layer", a.layer, "MoE layer to edit, or auto (largest MoE indirect effect in a causal trace)")
      ->capture_default_str();
  add_editor_flags(cmd, a.editor);
  cmd->add_option("--save", a.save, "Write the edited model as a Hugging Face checkpoint folder");
  cmd->add_flag("--overwrite", a.overwrite, "Replace an existing --save folder");
  cmd->add_option("--save-dtype", a.save_dtype,
                  "checkpoint: edited tensors in their stored dtype (the rounding of dW is reported) | f32: as F32")
      ->capture_default_str();
  cmd->add_option("--drift-tokens", a.drift_tokens,
                  "Routing drift is measured on the neighbourhood prompts and on this many WikiText-2 tokens (0: only "
                  "the neighbourhood prompts)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_flag("--quiet", a.quiet, "No progress messages");
  add_json_flag(cmd, a.json);
  cmd->callback([] { run_edit(a); });
}

}  // namespace

MOEDIT_COMMAND(60, register_edit)

}  // namespace moedit::cli
