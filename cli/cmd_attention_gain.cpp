// moedit attention-gain BASE TUNED --data TASK [--svg DIR] [--json] [--max-examples N]: per layer, the context
// attention gain (CAG), answer attention gain (AAG) and answer probability gain (APG, logit lens) of TUNED over BASE
// on a context task (definitions: eval/attention_gain.h). Both checkpoints read the prompts tokenized with BASE's
// tokenizer; they must have the same vocabulary and layer count. --svg DIR writes DIR/{cag,aag,apg}.svg. The
// intervention flags (--mask L:E,..., --boost, --steer) apply to TUNED as a standing router edit: with TUNED = BASE
// they measure what masking (say) the CE experts does to the attention and the logit lens.
#include <cstdio>
#include <filesystem>

#include "cli/commands.h"
#include "cli/common.h"
#include "cli/interventions.h"
#include "datasets/context_task.h"
#include "eval/attention_gain.h"
#include "io/errors.h"
#include "io/files.h"

namespace moedit::cli {

namespace {

struct Args {
  std::string base, tuned, data, svg;
  bool json = false;
  int max_examples = 0, batch_tokens = 2048;
  InterventionSpec iv;
};

void register_attention_gain(CLI::App& app) {
  static Args a;
  auto* cmd = app.add_subcommand("attention-gain",
                                 "Per-layer context/answer attention gain and answer probability gain (logit lens) "
                                 "of a tuned checkpoint over its base on a context task (--mask/--boost/--steer act "
                                 "on TUNED)");
  cmd->add_option("BASE", a.base, "The untuned checkpoint folder (its tokenizer.json tokenizes the task)")->required();
  cmd->add_option("TUNED", a.tuned, "The tuned checkpoint folder (same vocabulary and layers)")->required();
  add_load_options(cmd);
  cmd->add_option("--data", a.data, "The context task: JSON list of {context, question, answer}")->required();
  cmd->add_option("--svg", a.svg, "Write DIR/cag.svg, DIR/aag.svg and DIR/apg.svg (line charts per layer)");
  add_json_flag(cmd, a.json, "the gains and both models' means per layer");
  cmd->add_option("--max-examples", a.max_examples, "Use the first N examples only (0: all)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--batch-tokens", a.batch_tokens, "Tokens per taped forward")->check(CLI::Range(1, 1 << 24));
  add_intervention_flags(cmd, a.iv);
  cmd->callback([] {
    std::vector<ContextExample> examples = load_context_task(a.data);
    if (a.max_examples > 0 && size_t(a.max_examples) < examples.size()) examples.resize(size_t(a.max_examples));
    if (!a.svg.empty()) {
      std::error_code ec;
      std::filesystem::create_directories(a.svg, ec);
      require_input(std::filesystem::is_directory(a.svg), "--svg " + a.svg + ": cannot create the folder");
    }
    auto m = load_model(a.base);
    const Tokenizer tok = require_tokenizer(a.base, "attention-gain tokenizes the task with BASE's tokenizer");
    const std::vector<eval::TaskItem> items = eval::tokenize_task(examples, tok, a.data);
    eval::require_answer_in_context(items, a.data);
    const eval::LensMeasures base = eval::measure_lens(*m, items, a.batch_tokens);
    const ModelConfig cb = m->config();
    m.reset();
    m = load_model(a.tuned);
    const ModelConfig& ct = m->config();
    require_input(ct.vocab_size == cb.vocab_size && ct.n_layers == cb.n_layers,
                  a.tuned + ": vocabulary " + std::to_string(ct.vocab_size) + " and " + std::to_string(ct.n_layers) +
                      " layers, but BASE has " + std::to_string(cb.vocab_size) + " and " +
                      std::to_string(cb.n_layers) + " (TUNED must be a tuned copy of BASE)");
    if (!a.iv.empty()) m->set_router_edit(router_edit(a.iv, ct));
    const eval::AttentionGain g = eval::attention_gain(base, eval::measure_lens(*m, items, a.batch_tokens));
    if (!a.svg.empty())
      for (const char* metric : {"cag", "aag", "apg"})
        write_file_atomic(a.svg + "/" + metric + ".svg", g.svg(metric));
    if (a.json) {
      nlohmann::json j = g.to_json();
      j["base_model"] = a.base;
      j["tuned_model"] = a.tuned;
      j["data"] = a.data;
      j["tuned_interventions"] = describe(a.iv);
      std::printf("%s\n", j.dump().c_str());
    } else {
      std::printf("BASE %s, TUNED %s%s, data %s\n%s", a.base.c_str(), a.tuned.c_str(),
                  a.iv.empty() ? "" : (" with " + describe(a.iv)).c_str(), a.data.c_str(), g.table().c_str());
    }
  });
}

}  // namespace

MOEDIT_COMMAND(51, register_attention_gain)

}  // namespace moedit::cli
