// moedit ceft MODEL --data TRAIN --experts CE.json [--routers] [--full] [training flags] [--save DIR] [--json]:
// context-faithful expert fine-tuning (Router Lens's CEFT, issue 19): trains only the gate/up/down of the CE experts
// of a CE file (`moedit experts --context-faithful --out CE.json`, its "ce" set), with --routers the routers too, or
// with --full every trainable kind (model/weight_grads.h ParamSelection::everything: routers, shared gates, every
// expert, shared and dense MLPs; attention, norms and embeddings are not trainable here). Reports the trainable
// parameter count, the task score before/after, and forgetting before/after: WikiText-2 perplexity on the bundled
// sample's first --ppl-tokens tokens (eval/drift_probe.h) and the first-token accuracy of the rewrite prompts of the
// first --facts bundled CounterFact records with target_true (eval/accuracy.h) that are not training examples
// (same case_id). Shared flags: cli/train_common.h.
#include <cstdio>
#include <set>

#include "cli/commands.h"
#include "cli/train_common.h"
#include "datasets/counterfact.h"
#include "eval/accuracy.h"
#include "eval/drift_probe.h"
#include "io/errors.h"

namespace moedit::cli {

namespace {

struct Args {
  TrainFlags f;
  std::string experts;
  bool routers = false, full = false;
  int ppl_tokens = 1024, facts = 200;
};

// WikiText-2 perplexity and CounterFact rewrite-prompt accuracy (the facts the base model knows). The bundled context
// task is built from these records (counter-memory contexts), so records whose case_id is a training example's are
// skipped: training on a record's counter-memory answer is not forgetting an unrelated fact.
MeasureFn forgetting(const Tokenizer& tok, const Args& a, const std::vector<eval::TaskItem>& train) {
  const eval::Sequences windows = eval::wikitext_windows(tok, a.ppl_tokens);
  std::set<int> trained;
  for (const eval::TaskItem& it : train) trained.insert(it.case_id);
  std::vector<std::pair<std::string, std::string>> facts;
  for (const CounterFactRecord& r : load_counterfact(bundled_counterfact_path())) {
    if (int(facts.size()) >= a.facts) break;
    if (!trained.count(r.case_id)) facts.emplace_back(r.rewrite_prompt(), r.target_true);
  }
  // A part skipped (--ppl-tokens 0, --facts 0) is null in the JSON and "not measured" in the line.
  return [&tok, windows, facts](const Model& m) {
    Measures out;
    nlohmann::json ppl = nullptr, acc = nullptr;
    std::string line = "WikiText-2 perplexity ";
    char buf[96];
    if (!windows.empty()) {
      ppl = eval::windows_perplexity(m, windows);
      std::snprintf(buf, sizeof buf, "%.3f", ppl.get<double>());
      line += buf;
    } else {
      line += "not measured";
    }
    int correct = 0;
    line += ", CounterFact facts top-1 ";
    if (!facts.empty()) {
      for (const PromptCheck& c : check_first_tokens(m, tok, facts)) correct += c.correct;
      acc = double(correct) / double(facts.size());
      std::snprintf(buf, sizeof buf, "%.2f%% (%d/%zu)", 100.0 * acc.get<double>(), correct, facts.size());
      line += buf;
    } else {
      line += "not measured";
    }
    out.json = {{"wikitext_ppl", ppl}, {"facts", facts.size()}, {"facts_correct", correct}, {"facts_acc", acc}};
    out.line = line;
    return out;
  };
}

void register_ceft(CLI::App& app) {
  static Args a;
  auto* cmd = app.add_subcommand(
      "ceft",
      "Context-faithful expert fine-tuning (Router Lens CEFT): train only the CE experts' gate/up/down (--routers: "
      "and the routers; --full: everything) on a context task; trainable parameters, task score and forgetting "
      "(WikiText-2 perplexity, CounterFact facts) before/after");
  add_train_flags(cmd, a.f, 1e-3);
  cmd->add_option("--experts", a.experts, "The CE file (moedit experts --context-faithful --out): its \"ce\" set");
  cmd->add_flag("--routers", a.routers, "Train the routers too");
  cmd->add_flag("--full", a.full,
                "Train every trainable kind of every layer: routers, shared gates, all experts, shared and dense MLPs "
                "(the full fine-tuning baseline; attention, norms and embeddings stay frozen)");
  cmd->add_option("--ppl-tokens", a.ppl_tokens, "WikiText-2 tokens for the perplexity (0: skip)")
      ->capture_default_str();
  cmd->add_option("--facts", a.facts,
                  "CounterFact records whose facts are checked, the first not among the training examples (0: skip)")->capture_default_str();
  cmd->callback([] {
    require_input(a.full || !a.experts.empty(), "ceft needs --experts CE.json (or --full)");
    require_input(!(a.full && (a.routers || !a.experts.empty())), "--full trains everything: drop --experts/--routers");
    require_input(a.ppl_tokens >= 0 && a.facts >= 0, "--ppl-tokens and --facts: expected 0 or more");
    std::vector<ExpertRef> ce;
    if (!a.full) {
      ce = eval::read_expert_set(a.experts, "ce");
      require_input(!ce.empty(), a.experts + ": the 'ce' set is empty");
    }
    TrainSetup s = load_training(a.f);
    const Model& m = *s.model;
    ParamSelection sel;
    std::string what = "full";
    if (a.full) {
      sel = ParamSelection::everything(m);
    } else {
      for (const ExpertRef& e : ce) sel.experts.push_back({e.layer, e.expert});
      if (a.routers) sel.routers = ParamSelection::all_routers(m).routers;
      what = std::to_string(ce.size()) + " CE experts" + (a.routers ? " + routers" : "");
      try {
        sel.validate(m);
      } catch (const InputError& e) {
        throw InputError(a.experts + ": " + e.what());
      }
    }
    run_training(s, sel, a.f, "ceft", what, forgetting(*s.tok, a, s.train));
  });
}

}  // namespace

MOEDIT_COMMAND(53, register_ceft)

}  // namespace moedit::cli
