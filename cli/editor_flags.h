// The editor's command-line options, shared by `moedit edit` and `moedit eval`: v* hyperparameters, key mode,
// mom2 adjustment, context templates and the key-statistics corpus/cache.
#pragma once
#include <CLI/CLI.hpp>
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "editor/keystats.h"
#include "editor/memit.h"
#include "editor/rome.h"

namespace moedit::cli {

struct EditorFlags {
  std::string keys = "rome", objective = "rome", lr_scale = "absolute", templates_file, kl_prompt = "{} is a", corpus, cache_dir;
  bool no_mom2 = false, no_prefix_cache = false;
  double ridge = 0, lr = 0.5, weight_decay = 0.5, kl_factor = 0.0625, clamp = 4.0, stop_loss = 5e-2;
  int steps = 20, seq_len = 256;
  int64_t stats_tokens = 0;
  uint64_t template_seed = 1;
};

void add_editor_flags(CLI::App* cmd, EditorFlags& f);

// --method rome|memit|alphaedit and the batch editors' options (editor/memit.h), shared by `edit` and `eval`.
struct BatchFlags {
  std::string method = "rome", layers, key_columns = "mean";
  double mom2_weight = 15000, nullspace_threshold = 2e-2, nullspace_relative = 0, l2 = 10, bare_key_weight = -1;
  int passes = 1, bcd_sweeps = 5, router_guard_layers = 0;
  bool router_guard = false;
  bool batch() const { return method != "rome"; }
};
void add_batch_flags(CLI::App* cmd, BatchFlags& f);
// The options of --method memit|alphaedit: --layers, else a numeric `layer` as a range of one (each an MoE layer of
// the model, the last one not the model's last layer); the editor flags, target and moments as for ROME.
// --layers auto[:W] takes the range from `mean_effects` (mean_layer_effects; InputError when it is not given).
BatchOptions batch_options(const BatchFlags& f, const std::string& layer, const EditorFlags& e,
                           const std::string& target, const ModelConfig& c, const MomentSource& moments,
                           const std::vector<double>* mean_effects = nullptr);
// The batch flags that need no model (--method, --layers auto:W, --key-columns, --passes, --bcd-sweeps, the null-space
// threshold, and --target for moeedit): InputError for a bad one, so commands fail before loading anything.
void check_batch_flags(const BatchFlags& f, const std::string& target);
// --layers auto[:W]: W (default 1); 0 when --layers is not auto; InputError for a malformed W.
int auto_layer_width(const BatchFlags& f);
inline bool auto_layers(const BatchFlags& f) { return auto_layer_width(f) > 0; }
// The W MoE layers ending at the one with the largest mean effect among the layers a range may end at (MoE layers
// below the model's last); fewer where the model has no more MoE layers below it.
std::vector<int> auto_layer_range(int width, const std::vector<double>& mean_effects, const ModelConfig& c);
nlohmann::json batch_settings(const BatchFlags& f);  // for run records
// The options the flags set (layer, target and moments are the caller's); InputError for bad values.
EditOptions editor_options(const EditorFlags& f);
KeyStatsOptions key_stats_options(const EditorFlags& f);
nlohmann::json editor_settings(const EditorFlags& f);  // for run records (eval's settings.json)

// --layer auto. The indirect effect at the subject's last token of restoring each layer's (whole) MoE block in a
// causal trace (tracing/trace.h, ROME's noise: 3 x the std of the bundled CounterFact subject embeddings, computed
// once into *embedding_std when it is < 0; 10 samples): one entry per layer, NaN for dense layers. The answer is
// target_true when given, else the model's own prediction.
std::vector<double> moe_layer_effects(const Model& m, const Tokenizer& tok, const EditRequest& req,
                                      double* embedding_std);
// The mean of moe_layer_effects over the first `cases` requests (one causal trace each).
std::vector<double> mean_layer_effects(const Model& m, const Tokenizer& tok, const std::vector<EditRequest>& reqs,
                                       size_t cases);
// A --layer value that is not "auto": the layer index; InputError for anything else.
int parse_layer_index(const std::string& s);
// The layer with the largest effect; InputError when no MoE layer was scored.
int best_effect_layer(const std::vector<double>& effects);

}  // namespace moedit::cli
