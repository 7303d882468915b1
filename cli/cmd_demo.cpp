// moedit demo: a tour of moedit on the bundled demo model (or --model): what the model knows, how a fact routes
// through the experts, and — as those features land — a causal trace, ROME edits and a short evaluation.
#include <cmath>
#include <cstdio>
#include <filesystem>

#include "cli/commands.h"
#include "datasets/counterfact.h"
#include "eval/accuracy.h"
#include "model/errors.h"
#include "model/generate.h"
#include "model/model.h"
#include "model/tokenizer.h"

namespace moedit::cli {

namespace {

struct DemoArgs {
  std::string model, out = "moedit-demo-out", dataset;
  int n_facts = 3;
};

std::vector<float> softmax_row(const float* x, int n) {
  std::vector<float> p(x, x + n);
  ops::softmax_inplace(p.data(), n);
  return p;
}

std::string show(const Tokenizer& tok, int id) {
  std::string s = tok.decode({id});
  for (auto& c : s)
    if (c == '\n') c = ' ';
  return "'" + s + "'";
}

void section(int i, const char* title) { std::printf("\n[%d] %s\n", i, title); }

void run_demo(const DemoArgs& a) {
  const auto recs = load_counterfact(a.dataset);  // bad input fails before the model loads
  auto m = Model::load(a.model);
  const Tokenizer tok = Tokenizer::from_file(a.model);
  const ModelConfig& c = m->config();
  std::printf("moedit demo — model %s\n", a.model.c_str());

  section(1, "The model");
  std::printf("    %s: %d layers (%d MoE), hidden %d, %d routed experts (top-%d, width %d)%s, vocab %d\n",
              std::string(c.arch->hf_class).c_str(), c.n_layers, c.n_moe_layers(), c.hidden, c.n_experts, c.top_k,
              c.expert_width, c.shared_width ? (", + a gated shared expert (width " + std::to_string(c.shared_width) + ")").c_str() : "",
              c.vocab_size);
  std::printf("    %.2f M parameters, %.2f M active per token\n", c.total_params() / 1e6, c.active_params() / 1e6);

  section(2, "What it knows: first-token accuracy of target_true on CounterFact");
  const FactAccuracy acc = first_token_accuracy(*m, tok, recs);
  auto line = [](const char* name, const Tally& t) {
    std::printf("    %-22s %6.2f%%  (%d / %d)\n", name, 100.0 * t.rate(), t.correct, t.total);
  };
  std::printf("    over %zu records of %s\n", recs.size(), std::filesystem::path(a.dataset).filename().c_str());
  line("rewrite prompts", acc.rewrite);
  line("paraphrase prompts", acc.paraphrase);
  line("neighborhood prompts", acc.neighborhood);

  section(3, "A few facts: the prediction, and the experts the subject's last token routes through");
  for (int i = 0; i < a.n_facts && i < int(recs.size()); ++i) {
    const CounterFactRecord& r = recs[size_t(i)];
    const std::string prompt = r.rewrite_prompt();
    const auto enc = tok.encode(prompt);
    const auto span = tok.find_span(enc, prompt, r.subject);
    if (!span) throw InputError("subject '" + r.subject + "' not found in prompt '" + prompt + "'");
    ForwardOutput f = m->forward({enc.ids});
    const int last = int(enc.ids.size()) - 1, subj_last = span->second - 1;
    const auto p = softmax_row(f.logits.row(last).data(), c.vocab_size);
    std::vector<int> order(p.size());
    for (size_t v = 0; v < p.size(); ++v) order[v] = int(v);
    std::partial_sort(order.begin(), order.begin() + 3, order.end(), [&](int x, int y) { return p[size_t(x)] > p[size_t(y)]; });
    std::printf("    \"%s\" → true answer '%s'\n      next token:", prompt.c_str(), r.target_true.c_str());
    for (int k = 0; k < 3; ++k) std::printf("  %s %.3f", show(tok, order[size_t(k)]).c_str(), p[size_t(order[size_t(k)])]);
    std::printf("\n      subject's last token %s routes to:", show(tok, enc.ids[size_t(subj_last)]).c_str());
    for (int l = 0; l < c.n_layers; ++l) {
      if (!c.is_moe(l)) continue;
      std::printf("  L%d", l);
      for (int j = 0; j < c.top_k; ++j)
        std::printf("%se%d(%.2f)", j ? "," : ":", f.routing[size_t(l)].ids(subj_last, j),
                    f.routing[size_t(l)].weights(subj_last, j));
    }
    GenerateOptions g;
    g.max_new_tokens = 8;
    g.eos_token_id = c.eos_token_id;
    const auto cont = generate(*m, enc.ids, g);
    std::string text = tok.decode(cont);
    for (auto& ch : text)
      if (ch == '\n') ch = ' ';
    std::printf("\n      greedy continuation: \"%s%s\"\n", prompt.c_str(), text.c_str());
  }
}

void register_demo(CLI::App& app) {
  auto* cmd = app.add_subcommand("demo", "A tour of moedit on the bundled demo model");
  static DemoArgs a;
  a.model = default_model_path();
  a.dataset = bundled_counterfact_path();
  cmd->add_option("--model", a.model, "Checkpoint folder (default: the bundled demo model)");
  cmd->add_option("--dataset", a.dataset, "CounterFact JSON (default: the bundled records)");
  cmd->add_option("--out", a.out, "Folder for the demo's files (heatmaps, reports)");
  cmd->add_option("--facts", a.n_facts, "Facts to show")->check(CLI::Range(1, 100));
  cmd->callback([] { run_demo(a); });
}

}  // namespace

MOEDIT_COMMAND(90, register_demo)

}  // namespace moedit::cli
