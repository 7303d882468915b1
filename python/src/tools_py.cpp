// What the CLI's trace / edit / eval commands do, on a loaded Model, returning the JSON they print or write.
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "datasets/eval_records.h"
#include "eval/run.h"
#include "io/errors.h"
#include "model_py.h"
#include "tracing/trace.h"

namespace moedit::py {

namespace {

trace::TraceOptions trace_options(const std::string& kinds, int samples, const std::string& noise, uint32_t seed,
                                  int window, bool replace, bool naive) {
  trace::TraceOptions o;
  o.kinds = trace::parse_kinds(kinds);
  o.samples = samples;
  o.noise = noise;
  trace::parse_noise_rule(o.noise);
  o.seed = seed;
  o.window = window;
  o.replace = replace;
  o.naive = naive;
  return o;
}

// `moedit trace MODEL --prompt P --subject S [--target T] --json`: the report as a dict.
nb::object trace(PyModel& pm, const std::string& prompt, const std::string& subject, const std::string& target,
                 const std::string& kinds, int samples, const std::string& noise, uint32_t seed, int window,
                 bool replace, bool naive) {
  const trace::TraceOptions o = trace_options(kinds, samples, noise, seed, window, replace, naive);
  nlohmann::json j;
  {
    nb::gil_scoped_release nogil;  // long runs: other Python threads (a notebook's kernel) keep running
    j = trace::report_json(trace::trace_fact(*pm.m, pm.tokenizer(), {prompt, subject, target, "", ""}, o));
  }
  return to_python(j);
}

// Several facts traced together (trace_facts_together: shared forwards and batches, each fact's scores as alone):
// facts are (prompt, subject[, target]) tuples; one report dict per fact, or, with skip_errors, {"error": message}
// for a fact that cannot be traced (else InputError naming it).
nb::object trace_many(PyModel& pm, const std::vector<std::vector<std::string>>& facts, const std::string& kinds,
                      int samples, const std::string& noise, uint32_t seed, int window, bool replace, bool naive,
                      bool skip_errors) {
  const trace::TraceOptions o = trace_options(kinds, samples, noise, seed, window, replace, naive);
  std::vector<trace::TraceRequest> reqs;
  for (size_t i = 0; i < facts.size(); ++i) {
    const auto& f = facts[i];
    if (f.size() < 2 || f.size() > 3)
      throw InputError("trace_many: fact " + std::to_string(i) + " must be (prompt, subject) or (prompt, subject, target)");
    reqs.push_back({f[0], f[1], f.size() == 3 ? f[2] : "", "", ""});  // no id: errors name the fact's index
  }
  nlohmann::json out = nlohmann::json::array();
  {
    nb::gil_scoped_release nogil;
    std::vector<std::string> errors;
    const std::vector<trace::TraceReport> reps =
        trace::trace_facts_together(*pm.m, pm.tokenizer(), reqs, o, skip_errors ? &errors : nullptr);
    for (size_t i = 0; i < reps.size(); ++i) {
      if (skip_errors && !errors[i].empty()) {
        out.push_back({{"error", errors[i]}});
        continue;
      }
      out.push_back(trace::report_json(reps[i]));
    }
  }
  return to_python(out);
}

// The v* and key options of `moedit edit` / `moedit eval` (their flags' defaults are EditOptions' own).
EditOptions editor_options(const std::string& target, int layer, int steps, double lr, double weight_decay,
                           double kl_factor, bool mom2_adjustment) {
  EditOptions o;
  o.target = parse_edit_target(target);
  o.layer = o.target.kind == TargetKind::Expert ? o.target.layer : layer;
  o.v.steps = steps;
  o.v.lr = lr;
  o.v.weight_decay = weight_decay;
  o.v.kl_factor = kl_factor;
  o.mom2_adjustment = mom2_adjustment;
  return o;
}

// One ROME edit on the model (kept applied): the entry of "edits" that cli/cmd_edit.cpp builds for the request
// (routing drift aside). No Python: runs without the GIL.
nlohmann::json apply_and_report(PyModel& pm, const EditRequest& req, EditOptions o) {
  const Tokenizer& tok = pm.tokenizer();
  KeyStatsCache& stats = pm.key_stats();
  o.moments = [&stats](int l, int e) { return stats.get(l, e); };
  EditResult probe;
  probe.layer = o.layer;
  const EditReport pre = report_edit(*pm.m, tok, req, probe);
  EditResult r = apply_edit(*pm.m, tok, req, o);
  const EditReport rep = report_edit(*pm.m, tok, req, r);
  const bool has_true = !req.target_true.empty();
  nlohmann::json j;
  j["case_id"] = req.case_id;
  j["request"] = {{"prompt", req.prompt}, {"subject", req.subject}, {"target_new", req.target_new},
                  {"target_true", req.target_true}};
  j["edit"] = edit_json(r);
  j["pre"] = pre.to_json(has_true);
  j["report"] = rep.to_json(has_true);
  pm.edits.push_back(std::move(r));
  return j;
}

// `moedit edit MODEL --subject S --prompt P --target-new N [--target-true T] --layer L --json`, one request.
nb::object edit(PyModel& pm, const std::string& subject, const std::string& prompt, const std::string& target_new,
                const std::string& target_true, int layer, const std::string& target,
                const std::vector<std::string>& paraphrases, const std::vector<std::string>& neighbors, int steps,
                double lr, double weight_decay, double kl_factor, bool mom2_adjustment) {
  const EditRequest req{prompt, subject, target_new, target_true, paraphrases, neighbors, ""};
  normalized_prompt(req);
  require_input(target_new.find_first_not_of(" \t") != std::string::npos, "target_new is empty");
  const EditOptions o = editor_options(target, layer, steps, lr, weight_decay, kl_factor, mom2_adjustment);
  const int n_layers = pm.m->config().n_layers;
  require_input(o.layer >= 0 && o.layer < n_layers,
                "layer " + std::to_string(o.layer) + " is out of range [0, " + std::to_string(n_layers) + ")");
  nlohmann::json j;
  {
    nb::gil_scoped_release nogil;
    j = apply_and_report(pm, req, o);
  }
  return to_python(j);
}

// `moedit eval MODEL --dataset F --out DIR --layer L [--limit N]`: the summary (summary.json) as a dict.
nb::object evaluate(PyModel& pm, const std::string& dataset, const std::string& out, int layer, int limit,
                    const std::string& target, const std::string& format, int generation_interval, int gen_length, bool resume,
                    int steps, double lr, double weight_decay, double kl_factor, bool mom2_adjustment) {
  const auto records = load_eval_records(dataset, parse_dataset_format(format));
  require_input(!records.empty(), dataset + ": no records");
  eval::RunOptions o;
  o.out_dir = out;
  o.limit = limit;
  o.resume = resume;
  require_input(generation_interval >= 0, "generation_interval must be >= 0");
  o.generation_interval = generation_interval;
  o.gen.max_out_len = gen_length;
  o.edit = editor_options(target, layer, steps, lr, weight_decay, kl_factor, mom2_adjustment);
  const ModelConfig& c = pm.m->config();
  const int l = o.edit.layer;
  require_input(l >= 0 && l < c.n_layers && c.is_moe(l), "layer " + std::to_string(l) + " is not an MoE layer of this model");
  KeyStatsCache& stats = pm.key_stats();
  o.edit.moments = [&stats](int l, int e) { return stats.get(l, e); };
  o.settings = {{"model", pm.path},  {"dataset", dataset}, {"format", format},
                {"limit", limit},    {"target", target},   {"layer", l},
                {"editor", {{"v_steps", steps}, {"v_lr", lr}, {"v_weight_decay", weight_decay},
                            {"kl_factor", kl_factor}, {"mom2_adjustment", mom2_adjustment}}},
                {"generation", {{"interval", generation_interval}, {"max_out_len", gen_length}}}, {"via", "python"}};
  nlohmann::json summary;
  {
    nb::gil_scoped_release nogil;
    summary = eval::run_eval(*pm.m, pm.tokenizer(), records, o).summary;
  }
  return to_python(summary);
}

}  // namespace

void bind_tools(nb::module_& mod, nb::class_<PyModel>& cls) {
  mod.def("trace", &trace, nb::arg("model"), nb::arg("prompt"), nb::arg("subject"), nb::arg("target") = "",
          nb::arg("kinds") = "all", nb::arg("samples") = 10, nb::arg("noise") = "s3", nb::arg("seed") = 1,
          nb::arg("window") = 10, nb::arg("replace") = false, nb::arg("naive") = false,
          "Causal tracing (ROME, extended to experts): the JSON `moedit trace --json` prints, as a dict");
  mod.def("trace_many", &trace_many, nb::arg("model"), nb::arg("facts"), nb::arg("kinds") = "all",
          nb::arg("samples") = 10, nb::arg("noise") = "s3", nb::arg("seed") = 1, nb::arg("window") = 10,
          nb::arg("replace") = false, nb::arg("naive") = false, nb::arg("skip_errors") = false,
          "trace() of several (prompt, subject[, target]) facts traced together (shared forwards and batches; each "
          "fact's scores as traced alone): a list of report dicts; with skip_errors a fact that cannot be traced "
          "gives {'error': message} instead of raising InputError");
  mod.def("evaluate", &evaluate, nb::arg("model"), nb::arg("dataset"), nb::arg("out"), nb::arg("layer"),
          nb::arg("limit") = -1, nb::arg("target") = "dominant", nb::arg("format") = "auto",
          nb::arg("generation_interval") = 1, nb::arg("gen_length") = 100, nb::arg("resume") = false, nb::arg("steps") = 20, nb::arg("lr") = 0.5,
          nb::arg("weight_decay") = 0.5, nb::arg("kl_factor") = 0.0625, nb::arg("mom2_adjustment") = true,
          "CounterFact-style evaluation of ROME edits into `out` (as `moedit eval`); returns summary.json as a dict");
  cls.def("edit", &edit, nb::arg("subject"), nb::arg("prompt"), nb::arg("target_new"), nb::arg("target_true") = "",
          nb::arg("layer") = -1, nb::arg("target") = "dominant", nb::arg("paraphrases") = std::vector<std::string>{},
          nb::arg("neighbors") = std::vector<std::string>{}, nb::arg("steps") = 20, nb::arg("lr") = 0.5,
          nb::arg("weight_decay") = 0.5, nb::arg("kl_factor") = 0.0625, nb::arg("mom2_adjustment") = true,
          "ROME edit of one fact (as `moedit edit --json`, one request): the edit stays applied until revert(). "
          "layer: the MoE layer (or target='L:E')");
  cls.def("revert", [](PyModel& p) {
        revert_all(*p.m, p.edits);
        p.edits.clear();
      },
      "Undo every edit made through this Model, bit for bit");
  cls.def_prop_ro("n_edits", [](PyModel& p) { return p.edits.size(); });
}

}  // namespace moedit::py
