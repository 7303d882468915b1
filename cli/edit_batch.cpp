// moedit edit MODEL --method memit|alphaedit|moeedit --requests FILE --layers 1-3 [--target dominant|routed|shared]
// The requests of FILE edited together, as one step, over a range of MoE layers (editor/memit.h); each request scored
// as the ROME path scores it (rewrite, paraphrases, neighbours, before and after), the CounterFact summary, and the
// batch's routing drift on the neighbourhood prompts and a WikiText-2 sample.
#include <cstdio>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/edit_common.h"
#include "editor/memit.h"
#include "eval/drift_probe.h"
#include "io/errors.h"
#include "model/model.h"
#include "model/routing_drift.h"
#include "tokenizer/tokenizer.h"

namespace moedit::cli {

namespace {

std::string layers_text(const std::vector<int>& layers) {
  std::string s;
  for (int l : layers) s += (s.empty() ? "" : ",") + std::to_string(l);
  return s;
}

void print_request(const BatchEditResult& r, const EditRequest& req, size_t i, size_t n, const EditReport& rep) {
  std::printf("[%zu/%zu]%s %s → %s:", i + 1, n, req.case_id.empty() ? "" : (" case " + req.case_id).c_str(),
              req.subject.c_str(), req.target_new.c_str());
  for (const BatchExpertUpdate& u : r.updates)
    for (size_t c = 0; c < u.requests.size(); ++c)
      if (u.requests[c] == int(i)) {
        const std::string who = (is_shared_expert(u.expert) ? "" : "E") + expert_label(u.expert, r.n_shared_experts);
        std::printf(" L%d %s(w=%.3f)", u.layer, who.c_str(), u.weights[c]);
      }
  const VStarResult& v = r.vstar[i];
  std::printf("  v*: loss %.3f → %.3f in %d steps; |z* - h| %.3g → %.3g\n", v.loss.front(), v.loss.back(), v.updates,
              r.residual_norms.front()[i], r.residual_norms.back()[i]);
  print_report(rep, !req.target_true.empty());
}

}  // namespace

void run_batch_edit(const EditArgs& a) {
  check_batch_flags(a.batch, a.target);  // a bad --method, --layers auto:W, --key-columns or --passes fails before anything loads
  require_input(!a.independent, "--independent edits requests one by one; --method " + a.batch.method +
                                    " edits them together (use --method rome)");
  require_input(a.save_dtype == "checkpoint" || a.save_dtype == "f32",
                "--save-dtype '" + a.save_dtype + "': expected checkpoint or f32");
  const std::vector<EditRequest> reqs = edit_requests(a);
  auto m = load_model(a.model);
  const Tokenizer tok = Tokenizer::from_file(a.model);
  const EditStats stats = edit_stats(*m, tok, a);
  std::vector<double> mean_effects;  // --layers auto: from causal traces of the first 50 requests
  if (auto_layers(a.batch)) mean_effects = mean_layer_effects(*m, tok, reqs, 50);
  const BatchOptions opt =
      batch_options(a.batch, a.layer, a.editor, a.target, m->config(), stats.moments, &mean_effects);

  // Before: every request's prompts, the routers on the neighbourhood prompts and the WikiText-2 sample.
  std::vector<EditReport> pre;
  BatchEditResult none;
  none.layers = opt.layers;
  std::vector<std::vector<int32_t>> neigh;
  for (size_t i = 0; i < reqs.size(); ++i) {
    pre.push_back(report_request(*m, tok, reqs[i], none, int(i)));
    for (const auto& p : reqs[i].neighbors) neigh.push_back(tok.encode_ids(p, true));
  }
  const eval::DriftProbe neigh_probe(*m, std::move(neigh)), wiki_probe(*m, eval::wikitext_windows(tok, a.drift_tokens));

  std::vector<std::string> templates;
  const BatchEditResult r = apply_batch_edit(*m, tok, reqs, opt, &templates);

  nlohmann::json out = {{"model", a.model}, {"method", a.batch.method}, {"target", a.target}, {"layers", opt.layers}};
  out["batch"] = batch_edit_json(r);
  out["edits"] = nlohmann::json::array();
  EditTally tally;
  for (size_t i = 0; i < reqs.size(); ++i) {
    const EditRequest& req = reqs[i];
    const bool has_true = !req.target_true.empty();
    const EditReport rep = report_request(*m, tok, req, r, int(i));
    tally.add(req, rep);
    if (!a.json) print_request(r, req, i, reqs.size(), rep);
    out["edits"].push_back({{"case_id", req.case_id},
                            {"request", {{"prompt", req.prompt}, {"subject", req.subject},
                                         {"target_new", req.target_new}, {"target_true", req.target_true}}},
                            {"edit", batch_request_json(r, int(i))},
                            {"pre", pre[i].to_json(has_true)},
                            {"report", rep.to_json(has_true)}});
  }
  if (!a.json)
    std::printf("%s over layers %s (%s targets): %zu requests, %zu expert updates, %.2fs (%.3fs per request; v* "
                "%.2fs)\n", a.batch.method.c_str(), layers_text(r.layers).c_str(), a.target.c_str(), reqs.size(),
                r.updates.size(), r.seconds, r.seconds / double(reqs.size()), r.vstar_seconds);
  if (!a.json)
    for (const auto& [l, d] : r.router_guard_dims)
      std::printf("router guard: layer %d's updates keep out of %d directions the later routers read\n", l, d);
  if (tally.n_true > 0) out["summary"] = tally.summary(a.json);

  // Routing drift of the whole batch.
  nlohmann::json drift = nlohmann::json::object();
  std::string line;
  auto measure = [&](const char* name, const char* label, const eval::DriftProbe& probe) {
    if (probe.empty()) return;
    const RoutingDrift d = probe.measure(*m);
    drift[name] = eval::drift_json(d);
    line += (line.empty() ? "" : "; ") + eval::drift_text(label, d);
  };
  measure("neighborhood", "neighbourhood", neigh_probe);
  measure("wikitext", "WikiText-2", wiki_probe);
  out["routing_drift"] = drift;
  if (!a.json && !line.empty()) std::printf("routing drift of the batch: %s\n", line.c_str());
  out["templates"] = templates;
  if (!a.save.empty())
    out["saved"] = save_edits(*m, a, edited_experts(r), [&]() -> nlohmann::json {
      const EditReport rep = report_request(*m, tok, reqs.back(), r, int(reqs.size()) - 1);
      return rep.to_json(!reqs.back().target_true.empty())["rewrite"];
    });
  if (a.json) std::printf("%s\n", out.dump().c_str());
}

}  // namespace moedit::cli
