// The Python-side model: a loaded checkpoint, its tokenizer, and the ROME edits applied through it.
#pragma once
#include <memory>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "convert.h"
#include "editor/keystats.h"
#include "editor/rome.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"

namespace moedit::py {

// A prompt as text (tokenized with the tokenizer's special tokens, as the CLI's --prompt) or as token ids.
using Tokens = std::variant<std::string, std::vector<int32_t>>;

struct PyModel {
  PyModel(const std::string& path, const std::string& device, const std::string& precision = "fp32");
  std::shared_ptr<Model> m;
  std::string path;
  std::vector<EditResult> edits;  // applied by edit(), in order; revert() undoes them all

  const Tokenizer& tokenizer();   // path/tokenizer.json, loaded on first use (InputError when absent)
  std::vector<int32_t> ids(const Tokens& t);
  // The key statistics ROME's edits read (editor/keystats.h defaults, as the CLI: cached on disk), made on first use.
  KeyStatsCache& key_stats();

 private:
  std::optional<Tokenizer> tok_;
  std::unique_ptr<KeyStatsCache> stats_;
};

// Every hook point a forward of this model runs, in forward order, with the width of its activation:
// hook_embed, per layer resid_pre, attn_out, ffn_in, [MoE: router_logits, expert_ids, expert_weights,
// experts.{e}.hook_key / hook_out, shared_key, shared_experts.{j}.hook_out, hook_shared_out], moe_out, resid_post,
// then hook_final_norm.
struct HookPoint {
  std::string name;
  int cols;
};
std::vector<HookPoint> hook_points(const Model& m);

nb::class_<PyModel> bind_model(nb::module_& mod);      // model_py.cpp: class Model
void bind_tools(nb::module_& mod, nb::class_<PyModel>& cls);  // tools_py.cpp: trace, Model.edit / revert, evaluate

}  // namespace moedit::py
