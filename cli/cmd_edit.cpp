// moedit edit MODEL --subject S --prompt "{} is in" --target-new T [--target dominant|routed|shared|L:E]
//              [--layer L|auto] [--requests FILE] [--save DIR] [--json]
//              [--method rome|memit|alphaedit|moeedit --layers 1-3 --mom2-weight λ --nullspace-threshold t --l2 λ₂]
// ROME's rank-one edit on the experts of one MoE layer (editor/rome.h), one request after another, with a report of
// what changed; --method memit|alphaedit|moeedit edits the requests together over a layer range (cli/edit_batch.cpp).
#include <cstdio>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/edit_common.h"
#include "cli/editor_flags.h"
#include "editor/rome.h"
#include "eval/drift_probe.h"
#include "io/errors.h"
#include "model/model.h"
#include "model/routing_drift.h"
#include "tokenizer/tokenizer.h"

namespace moedit::cli {

namespace {

// --layer auto: the MoE layer whose MoE block has the largest indirect effect at the subject's last token.
int auto_layer(const Model& m, const Tokenizer& tok, const EditRequest& req, double* embedding_std,
               nlohmann::json* info) {
  const std::vector<double> effects = moe_layer_effects(m, tok, req, embedding_std);
  const int best = best_effect_layer(effects);
  if (info) *info = {{"layer", best}, {"indirect_effect", effects[size_t(best)]}};
  return best;
}

void run_edit(const EditArgs& a) {
  if (a.batch.batch()) return run_batch_edit(a);
  require_input(a.batch.layers.empty(), "--layers is for --method memit|alphaedit|moeedit; ROME edits one --layer");
  require_input(!a.batch.router_guard, "--router-guard is for --method memit|alphaedit|moeedit");
  const std::vector<EditRequest> reqs = edit_requests(a);
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
  const EditStats stats = edit_stats(*m, tok, a);
  opt.moments = stats.moments;

  nlohmann::json out;
  out["model"] = a.model;
  out["target"] = a.target;
  out["independent"] = a.independent;
  out["edits"] = nlohmann::json::array();
  std::vector<std::string> templates;
  std::vector<EditResult> applied;
  const auto wiki = eval::wikitext_windows(tok, a.drift_tokens);
  const RouterSnapshot wiki_original = wiki.empty() ? RouterSnapshot{} : snapshot_routers(*m, wiki);
  RouterSnapshot wiki_before = wiki_original;
  double embedding_std = -1;
  EditTally tally;
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
      drift[name] = eval::drift_json(d);
      drift_line += (drift_line.empty() ? "" : "; ") + eval::drift_text(label, d);
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
    tally.add(req, rep);
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
      print_report(rep, has_true);
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
  if (tally.n_true > 0) out["summary"] = tally.summary(a.json);
  if (!wiki.empty() && !a.independent && reqs.size() > 1) {  // every edit together: unedited vs final model
    const RoutingDrift d = routing_drift(wiki_original, wiki_before);
    out["routing_drift_wikitext"] = eval::drift_json(d);
    if (!a.json)
      std::printf("routing drift of all %zu edits on the WikiText-2 sample: %.1f%% of (token, layer) routings changed, "
                  "mean router KL %.2g\n", reqs.size(), 100 * d.changed_share, d.mean_kl);
  }
  out["templates"] = templates;
  if (!a.save.empty())
    out["saved"] = save_edits(*m, a, edited_experts(applied), [&]() -> nlohmann::json {
      if (applied.empty()) return nullptr;  // the last request, as the saved model answers it
      const EditReport rep = report_edit(*m, tok, reqs.back(), applied.back());
      return rep.to_json(!reqs.back().target_true.empty())["rewrite"];
    });
  if (a.json) std::printf("%s\n", out.dump().c_str());
}

void register_edit(CLI::App& app) {
  static EditArgs a;
  auto* cmd = add_model_command(app, "edit", "Edit facts in MoE experts: ROME (one layer, in sequence), MEMIT, AlphaEdit or MoEEdit (a batch over layers)", a.model);
  cmd->add_option("--subject", a.subject, "The subject whose fact is rewritten");
  cmd->add_option("--prompt", a.prompt, "Prompt with {} where the subject goes, e.g. \"{} is located in\"");
  cmd->add_option("--target-new", a.target_new, "The new object");
  cmd->add_option("--target-true", a.target_true, "The current object (report: P(new) vs P(true))");
  cmd->add_option("--paraphrase", a.paraphrases, "Paraphrase prompt(s) to score (repeatable)");
  cmd->add_option("--neighbor", a.neighbors, "Neighbourhood prompt(s) to score (repeatable)");
  cmd->add_option("--requests", a.requests,
                  "JSON list of CounterFact records or requested_rewrite objects (rome: applied in sequence; memit/alphaedit: one batch)");
  cmd->add_option("--limit", a.limit, "Only the first N requests");
  cmd->add_flag("--independent", a.independent, "Edit each request from the unedited model (revert after each)");
  cmd->add_option("--target", a.target, "dominant | routed | shared | LAYER:EXPERT")->capture_default_str();
  cmd->add_option("--layer", a.layer, "MoE layer to edit, or auto (largest MoE indirect effect in a causal trace)")
      ->capture_default_str();
  add_batch_flags(cmd, a.batch);
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
