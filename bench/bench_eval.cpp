// CounterFact evaluation benchmark: cases per minute of moedit's whole evaluation loop (eval/run.h: pre scores,
// generation, edit, post scores, generation, revert + check) against the same loop in PyTorch/transformers
// (tools/eval_reference.py, which edits with tools/rome_reference.py), measured in the same run on the same
// model, records, token ids, key statistics and thread count.
//
//   bench_eval [MODEL] [--cases N] [--layer L] [--target dominant|routed|shared] [--no-generation]
//              [--python PYTHON] [--no-anchor]
//
// MODEL defaults to the bundled demo model. Records: the first N bundled CounterFact records. Key statistics: the
// first 32 windows of 128 tokens of the bundled WikiText-2 test split, computed once and not timed (both sides).
// Prints the cases per minute of each side and the ratio.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "datasets/counterfact.h"
#include "editor/keystats.h"
#include "editor/rome.h"
#include "eval/run.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"

using namespace moedit;
using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

// What the PyTorch loop needs for one case, as token ids.
json case_spec(const Tokenizer& tok, const EvalRecord& r, const EditIds& ids, int max_out_len) {
  json edit;
  edit["prompts"] = ids.prompts;
  edit["subject_last"] = ids.subject_last;
  edit["kl_prompt"] = ids.kl_prompt;
  edit["kl_subject_last"] = ids.kl_subject_last;
  edit["target"] = ids.target;
  json prompts = json::array();
  std::vector<std::string> all = {r.rewrite_prompt()};
  for (const auto* g : {&r.paraphrase_prompts, &r.neighborhood_prompts, &r.attribute_prompts})
    all.insert(all.end(), g->begin(), g->end());
  for (const auto& p : all) prompts.push_back(tok.encode_ids(p, true));
  json gen = json::array();
  size_t longest = 0;
  for (const auto& p : r.generation_prompts) {
    gen.push_back(tok.encode_ids(p, true));
    longest = std::max(longest, gen.back().size());
  }
  return {{"edit", edit},
          {"score_prompts", prompts},
          {"target_new", tok.encode_ids(" " + r.target_new, false)},
          {"target_true", tok.encode_ids(" " + r.target_true, false)},
          {"generation_prompts", gen},
          {"new_tokens", std::max(0, max_out_len - int(longest))}};
}

}  // namespace

int main(int argc, char** argv) {
  std::string model = std::string(MOEDIT_SOURCE_DIR) + "/models/moedit-demo", target = "dominant", python = "python3";
  int n_cases = 10, layer = -1;
  bool anchor = true, generation = true;
  const std::map<std::string, std::function<void(const std::string&)>> valued = {
      {"--cases", [&](const std::string& v) { n_cases = std::stoi(v); }},
      {"--layer", [&](const std::string& v) { layer = std::stoi(v); }},
      {"--target", [&](const std::string& v) { target = v; }},
      {"--python", [&](const std::string& v) { python = v; }}};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (const auto it = valued.find(a); it != valued.end() && i + 1 < argc) {
      it->second(argv[++i]);
    } else if (a == "--no-anchor" || a == "--no-generation") {
      (a == "--no-anchor" ? anchor : generation) = false;
    } else if (a[0] != '-') {
      model = a;
    } else {
      std::fprintf(stderr, "bad option %s (see the header of bench/bench_eval.cpp)\n", a.c_str());
      return 2;
    }
  }
  auto m = Model::load(model);
  const Tokenizer tok = Tokenizer::from_file(model);
  const ModelConfig& c = m->config();
  for (int l = c.n_layers / 2; l < c.n_layers && layer < 0; ++l)
    if (c.is_moe(l)) layer = l;
  const auto records = load_eval_records(bundled_counterfact_path());
  n_cases = std::min(n_cases, int(records.size()));

  std::string text;
  {
    std::ifstream in(bundled_wikitext_path());
    text.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  const auto corpus = corpus_windows(tok, text, 128, 32 * 128);
  auto stats = std::make_shared<std::vector<SecondMoment>>(compute_key_stats(*m, layer, corpus));

  eval::RunOptions o;
  o.out_dir = "/tmp/moedit_bench_eval_" + std::to_string(::getpid());
  o.limit = n_cases;
  o.generation_interval = generation ? 1 : 0;
  o.edit.layer = layer;
  o.edit.target = parse_edit_target(target);
  o.edit.moments = [stats](int l, int e) -> std::shared_ptr<const SecondMoment> {
    for (const auto& s : *stats)
      if (s.layer == l && s.expert == e) return std::make_shared<const SecondMoment>(s);
    return nullptr;
  };
  o.settings = {{"bench", "bench_eval"}};
  std::printf("model %s, layer %d, target %s, %d cases, generation %s, threads %d\n", model.c_str(), layer,
              target.c_str(), n_cases, generation ? "on" : "off", ops::num_threads());

  const auto t0 = std::chrono::steady_clock::now();
  const auto res = eval::run_eval(*m, tok, records, o);
  const double ours_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double ours_cpm = 60.0 * n_cases / ours_s;
  std::printf("moedit: %.2f s for %d cases = %.1f cases/min (post ES %s, PS %s, NS %s)\n", ours_s, n_cases, ours_cpm,
              res.summary["post_rewrite_success"].dump().c_str(), res.summary["post_paraphrase_success"].dump().c_str(),
              res.summary["post_neighborhood_success"].dump().c_str());
  json out = {{"model", model},          {"layer", layer},         {"target", target}, {"cases", n_cases},
              {"generation", generation}, {"threads", ops::num_threads()}, {"moedit_seconds", ours_s},
              {"moedit_cases_per_minute", ours_cpm}};
  if (anchor) {
    const auto templates = context_templates(*m, tok, o.edit);
    json spec = {{"layer", layer}, {"target", target}, {"corpus", corpus}, {"generation", generation},
                 {"cases", json::array()}};
    for (int i = 0; i < n_cases; ++i) {
      const EvalRecord& r = records[size_t(i)];
      const EditRequest req{r.prompt, r.subject, r.target_new, r.target_true, {}, {}, ""};
      spec["cases"].push_back(case_spec(tok, r, build_edit_ids(tok, req, templates, o.edit.kl_prompt), 100));
    }
    std::ofstream(o.out_dir + "/spec.json") << spec.dump();
    const std::string cmd = python + " " + MOEDIT_SOURCE_DIR + "/tools/eval_reference.py --model " + model +
                            " --spec " + o.out_dir + "/spec.json --threads " + std::to_string(ops::num_threads()) +
                            " > " + o.out_dir + "/anchor.json 2> " + o.out_dir + "/anchor.err";
    std::printf("anchor: %s\n", cmd.c_str());
    const int rc = std::system(cmd.c_str());
    json pj;
    try {
      std::ifstream in(o.out_dir + "/anchor.json");
      if (rc == 0) in >> pj;
    } catch (const std::exception&) {
    }
    if (pj.contains("seconds")) {
      const double py_s = pj["seconds"].get<double>(), py_cpm = 60.0 * n_cases / py_s;
      std::printf("PyTorch %s (transformers, same ids/statistics/threads): %.2f s = %.1f cases/min\n",
                  pj.value("torch", std::string("?")).c_str(), py_s, py_cpm);
      std::printf("speed-up: %.1fx (target >= 10x)\n", ours_cpm / py_cpm);
      out["pytorch_seconds"] = py_s;
      out["pytorch_cases_per_minute"] = py_cpm;
      out["pytorch_post_rewrite_success"] = pj["post_rewrite_success"];
      out["speedup"] = ours_cpm / py_cpm;
    } else {
      std::printf("anchor unavailable (exit %d; see %s/anchor.err): no ratio reported\n", rc, o.out_dir.c_str());
    }
  }
  std::printf("%s\n", out.dump().c_str());
  if (!anchor || out.contains("speedup")) fs::remove_all(o.out_dir);
  return 0;
}
