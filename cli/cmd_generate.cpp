// moedit generate MODEL (--prompt TEXT | --ids 1,2,3) [-n N] [--greedy | --top-k K --seed S]
#include <cstdio>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/common.h"
#include "cli/ids.h"
#include "cli/interventions.h"
#include "model/generate.h"
#include "model/model.h"

namespace moedit::cli {

namespace {

void register_generate(CLI::App& app) {
  static std::string model, ids_arg, prompt_text;
  static int n = 16, top_k = 0;
  static uint64_t seed = 0;
  static bool greedy = false, as_json = false;
  static InterventionSpec iv;
  auto* cmd = add_model_command(
      app, "generate", "Continue a prompt (greedy or top-k sampling), with a KV cache", model);
  auto* ids_opt = cmd->add_option("--ids", ids_arg, "Prompt as comma-separated token ids");
  auto* text_opt = cmd->add_option("--prompt", prompt_text, "Prompt text (needs the model's tokenizer.json)");
  ids_opt->excludes(text_opt);
  cmd->add_option("-n,--max-new-tokens", n, "Tokens to generate")->check(CLI::Range(1, 1 << 20));
  auto* g = cmd->add_flag("--greedy", greedy, "Greedy decoding (the default)");
  cmd->add_option("--top-k", top_k, "Sample from the k most likely tokens")->check(CLI::Range(1, 1 << 24))->excludes(g);
  cmd->add_option("--seed", seed, "Sampling seed");
  add_json_flag(cmd, as_json, "{\"prompt_ids\": [...], \"ids\": [...]} (+ \"text\" with --prompt)");
  add_intervention_flags(cmd, iv);
  cmd->callback([] {
    if (ids_arg.empty() == prompt_text.empty()) throw InputError("generate: give exactly one of --prompt and --ids");
    std::optional<Tokenizer> tok;
    if (!prompt_text.empty()) tok = require_tokenizer(model, "--prompt needs one; use --ids with token ids instead");
    const std::vector<int32_t> prompt = tok ? tok->encode(prompt_text).ids : parse_ids(ids_arg);
    if (prompt.empty()) throw InputError("--prompt: the prompt encodes to no tokens");
    auto m = load_model(model);
    Hooks hooks;
    install_interventions(iv, m->config(), hooks);
    GenerateOptions o;
    o.hooks = hooks.empty() ? nullptr : &hooks;
    o.max_new_tokens = n;
    o.top_k = top_k;
    o.seed = seed;
    const auto out = generate(*m, prompt, o);
    if (as_json) {
      nlohmann::json j = {{"prompt_ids", prompt}, {"ids", out}};
      if (tok) j["text"] = tok->decode(out);
      std::printf("%s\n", j.dump().c_str());
      return;
    }
    if (tok) {
      std::printf("%s%s\n", prompt_text.c_str(), tok->decode(out).c_str());
      return;
    }
    for (size_t i = 0; i < out.size(); ++i) std::printf("%s%d", i ? "," : "", out[i]);
    std::printf("\n");
  });
}

}  // namespace

MOEDIT_COMMAND(40, register_generate)

}  // namespace moedit::cli
