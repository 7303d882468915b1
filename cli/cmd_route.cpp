// moedit route MODEL (--prompt TEXT | --ids 1,2,3) [--paraphrase TEXT]... [--subject S] [--json]
// moedit route MODEL --counterfact [--dataset FILE] [--limit N] [--svg FILE] [--cases N] [--json]
//
// Per token and MoE layer: the top-k experts and weights, the router entropy and the dominant expert; with
// paraphrases, the routing consistency of the prompt and each paraphrase at the last token and at the subject's
// last token. Dataset mode: the consistency rate per layer and overall over CounterFact, the most different cases,
// and an SVG chart. Every mode takes --mask / --boost.
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>

#include "cli/commands.h"
#include "cli/common.h"
#include "cli/ids.h"
#include "cli/interventions.h"
#include "datasets/counterfact.h"
#include "io/errors.h"
#include "io/files.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"
#include "tracing/routing.h"

namespace moedit::cli {

namespace {

struct Args {
  std::string model, prompt, ids, subject, dataset, svg;
  std::vector<std::string> paraphrases, paraphrase_ids;
  bool counterfact = false, as_json = false;
  int limit = 0, cases = 10, batch_tokens = 4096;
  InterventionSpec iv;
};

void print_comparison(const std::string& title, const std::vector<LayerComparison>& comps, int pa, int pb) {
  std::printf("  %s (prompt pos %d vs paraphrase pos %d)\n", title.c_str(), pa, pb);
  std::printf("    layer  prompt experts      paraphrase experts  shared  overlap  jaccard    sym KL  consistent\n");
  for (const auto& c : comps) {
    auto join = [](const std::vector<int>& ids) {  // appended piece by piece (GCC 12 -Wrestrict misfires on a + b)
      std::string s;
      for (size_t i = 0; i < ids.size(); ++i) {
        if (i) s += ',';
        s += std::to_string(ids[i]);
      }
      return s;
    };
    const std::string a = join(c.a_ids), b = join(c.b_ids);
    std::printf("    %5d  %-18s  %-18s  %6d  %7.3f  %7.3f  %8.4f  %s\n", c.layer, a.c_str(), b.c_str(), c.topk.shared,
                c.topk.overlap, c.topk.jaccard, c.sym_kl, c.topk.consistent ? "yes" : "no");
  }
}

void run_dataset(const Args& a, const Model& m) {
  const Tokenizer tok = require_tokenizer(a.model, "dataset mode tokenizes the CounterFact prompts");
  const std::string path = a.dataset.empty() ? bundled_counterfact_path() : a.dataset;
  const auto recs = load_counterfact(path);
  const auto pairs = counterfact_pairs(recs, tok, a.limit);
  if (pairs.empty()) throw InputError(path + ": no (prompt, paraphrase) pairs");
  ConsistencyOptions o;
  o.routing.interventions = a.iv.empty() ? nullptr : &a.iv;
  o.routing.max_batch_tokens = a.batch_tokens;
  o.routing.progress = stderr_counter("routing");
  o.top_cases = a.cases;
  const ConsistencyReport rep = paraphrase_consistency(m, pairs, o);
  if (!a.svg.empty()) {
    const std::string title = "Paraphrase routing consistency — " + std::filesystem::path(a.model).filename().string() +
                              ", " + std::filesystem::path(path).filename().string();
    write_file_atomic(a.svg, consistency_svg(rep, title));
  }
  if (a.as_json) {
    nlohmann::json j = rep.to_json();
    j["model"] = a.model;
    j["dataset"] = path;
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::printf("%s", rep.table().c_str());
    if (!a.svg.empty()) std::printf("\nchart: %s\n", a.svg.c_str());
  }
}

void run_single(const Args& a, const Model& m) {
  const ModelConfig& c = m.config();
  const bool text = !a.prompt.empty();
  std::optional<Tokenizer> tok;
  if (text) tok = require_tokenizer(a.model, "--prompt needs one; use --ids with token ids instead");
  if (!a.subject.empty() && !text) throw InputError("--subject needs --prompt (text input)");
  if (!a.paraphrases.empty() && !text) throw InputError("--paraphrase needs --prompt; with --ids use --paraphrase-ids");
  if (!a.paraphrase_ids.empty() && text) throw InputError("--paraphrase-ids needs --ids; with --prompt use --paraphrase");

  struct Seq {
    std::string text;
    Tokenizer::Encoding enc;
    int subject_last = -1;
  };
  std::vector<Seq> seqs;
  auto add_text = [&](const std::string& t, const std::string& flag) {
    Seq s;
    s.text = t;
    s.enc = tok->encode(t);
    if (s.enc.ids.empty()) throw InputError(flag + ": the text encodes to no tokens");
    if (!a.subject.empty()) {
      const auto span = tok->find_span(s.enc, t, a.subject);
      if (!span) throw InputError(flag + ": subject '" + a.subject + "' not found in '" + t + "'");
      s.subject_last = span->second - 1;
    }
    seqs.push_back(std::move(s));
  };
  if (text) {
    add_text(a.prompt, "--prompt");
    for (const auto& p : a.paraphrases) add_text(p, "--paraphrase");
  } else {
    Seq s;
    s.enc.ids = parse_ids(a.ids);
    seqs.push_back(std::move(s));
    for (const auto& p : a.paraphrase_ids) {
      Seq q;
      q.enc.ids = parse_ids(p, "--paraphrase-ids");
      seqs.push_back(std::move(q));
    }
  }
  std::vector<std::vector<int32_t>> ids;
  for (const auto& s : seqs) ids.push_back(s.enc.ids);
  RoutingOptions ro;
  ro.interventions = a.iv.empty() ? nullptr : &a.iv;
  const auto routed = capture_routing(m, ids, ro);

  nlohmann::json j;
  if (a.as_json) {
    j["model"] = a.model;
    j["top_k"] = c.top_k;
    j["n_experts"] = c.n_experts;
    j["moe_layers"] = moe_layers(c);
    j["interventions"] = describe(a.iv);
    j["sequences"] = nlohmann::json::array();
  }
  for (size_t i = 0; i < seqs.size(); ++i) {
    if (a.as_json) {
      nlohmann::json sj = routing_json(routed[i], c, seqs[i].enc.pieces);
      sj["role"] = i == 0 ? "prompt" : "paraphrase";
      if (!seqs[i].text.empty()) sj["text"] = seqs[i].text;
      if (seqs[i].subject_last >= 0) sj["subject_last"] = seqs[i].subject_last;
      j["sequences"].push_back(std::move(sj));
    } else if (i == 0) {
      std::printf("%s%s\n", text ? ("prompt: " + a.prompt).c_str() : "ids", a.iv.empty() ? "" : ("  [" + describe(a.iv) + "]").c_str());
      std::printf("%s", routing_table(routed[i], c, seqs[i].enc.pieces).c_str());
    }
  }
  if (seqs.size() > 1) {
    nlohmann::json cons = nlohmann::json::array();
    const SequenceRouting& A = routed[0];
    for (size_t i = 1; i < seqs.size(); ++i) {
      const SequenceRouting& B = routed[i];
      const auto last = compare_tokens(A, A.n_tokens() - 1, B, B.n_tokens() - 1, c);
      std::vector<LayerComparison> subj;
      if (seqs[0].subject_last >= 0 && seqs[i].subject_last >= 0)
        subj = compare_tokens(A, seqs[0].subject_last, B, seqs[i].subject_last, c);
      if (a.as_json) {
        nlohmann::json cj = {{"paraphrase", int(i) - 1},
                             {"last", {{"prompt_pos", A.n_tokens() - 1},
                                       {"paraphrase_pos", B.n_tokens() - 1},
                                       {"layers", comparison_json(last)}}}};
        if (!subj.empty())
          cj["subject_last"] = {{"prompt_pos", seqs[0].subject_last},
                                {"paraphrase_pos", seqs[i].subject_last},
                                {"layers", comparison_json(subj)}};
        cons.push_back(std::move(cj));
      } else {
        std::printf("\nparaphrase %zu: %s\n", i - 1,
                    seqs[i].text.empty() ? a.paraphrase_ids[i - 1].c_str() : seqs[i].text.c_str());
        print_comparison("last token", last, A.n_tokens() - 1, B.n_tokens() - 1);
        if (!subj.empty()) print_comparison("subject's last token", subj, seqs[0].subject_last, seqs[i].subject_last);
      }
    }
    if (a.as_json) j["consistency"] = std::move(cons);
  }
  if (a.as_json) std::printf("%s\n", j.dump().c_str());
}

void register_route(CLI::App& app) {
  static Args a;
  auto* cmd = add_model_command(
      app, "route", "Which experts each token is routed to; paraphrase routing consistency (one prompt or CounterFact)",
      a.model);
  auto* prompt = cmd->add_option("--prompt", a.prompt, "Prompt text (needs the model's tokenizer.json)");
  auto* ids = cmd->add_option("--ids", a.ids, "Prompt as comma-separated token ids");
  prompt->excludes(ids);
  auto* para = cmd->add_option("--paraphrase", a.paraphrases, "A paraphrase of the prompt to compare routing with (repeatable)")
      ->expected(1)
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  auto* para_ids = cmd->add_option("--paraphrase-ids", a.paraphrase_ids, "A paraphrase as token ids (with --ids; repeatable)")
      ->expected(1)
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  auto* subject = cmd->add_option("--subject", a.subject, "Subject string: also compare at its last token (found in every text)");
  auto* cf = cmd->add_flag("--counterfact", a.counterfact,
                           "Dataset mode: every CounterFact record's rewrite prompt vs its paraphrase prompts");
  cmd->add_option("--dataset", a.dataset, "CounterFact JSON for --counterfact (default: the bundled file)")
      ->needs(cf)
      ->check(CLI::ExistingFile);
  cmd->add_option("--limit", a.limit, "Dataset mode: only the first N records")->needs(cf)->check(CLI::Range(1, 1 << 30));
  cmd->add_option("--svg", a.svg, "Dataset mode: write the per-layer chart to this SVG file")->needs(cf);
  cmd->add_option("--cases", a.cases, "Dataset mode: how many most-different cases to list")->needs(cf)->check(CLI::Range(0, 100000));
  cmd->add_option("--batch-tokens", a.batch_tokens, "Tokens per forward call")->check(CLI::Range(1, 1 << 24));
  add_json_flag(cmd, a.as_json);
  cf->excludes(prompt)->excludes(ids)->excludes(para)->excludes(para_ids)->excludes(subject);
  add_intervention_flags(cmd, a.iv);
  cmd->callback([] {
    if (!a.counterfact && a.prompt.empty() && a.ids.empty())
      throw InputError("route: give --prompt TEXT, --ids 1,2,3 or --counterfact");
    auto m = load_model(a.model);
    if (a.counterfact) run_dataset(a, *m);
    else run_single(a, *m);
  });
}

}  // namespace

MOEDIT_COMMAND(45, register_route)

}  // namespace moedit::cli
