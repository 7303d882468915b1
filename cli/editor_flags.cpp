#include "cli/editor_flags.h"

#include <cmath>
#include <fstream>
#include <limits>
#include <sstream>

#include "cli/common.h"
#include "datasets/counterfact.h"
#include "io/errors.h"
#include "tracing/trace.h"

namespace moedit::cli {

namespace {

std::vector<std::string> read_templates(const std::string& path) {
  std::ifstream in(path);
  require_input(bool(in), "templates file '" + path + "' cannot be read");
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::string> out;
  const auto first = text.find_first_not_of(" \t\r\n");
  if (first != std::string::npos && text[first] == '[') {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
      throw InputError(path + ": malformed JSON (" + std::string(e.what()) + ")");
    }
    for (const auto& v : j) {
      require_input(v.is_string(), path + ": expected a list of strings");
      out.push_back(v.get<std::string>());
    }
  } else {
    std::string line;
    std::istringstream ls(text);
    while (std::getline(ls, line))
      if (!line.empty()) out.push_back(line);
  }
  require_input(!out.empty(), path + ": no templates");
  return out;
}

}  // namespace

void add_editor_flags(CLI::App* cmd, EditorFlags& f) {
  cmd->add_option("--keys", f.keys, "rome (C⁻¹k* over the bare prompt's k) | consistent (k* in both, r-ROME)")
      ->capture_default_str();
  cmd->add_option("--objective", f.objective,
                  "v*: rome (δ at the subject's last token) | exact (δ where the update puts it: every token routed "
                  "through the edited expert, scaled by gate·uᵀk — the edited model's loss)")
      ->capture_default_str();
  cmd->add_flag("--no-mom2", f.no_mom2, "No key statistics: C = I");
  cmd->add_option("--ridge", f.ridge, "Add ridge·mean(diag C) to C's diagonal")->capture_default_str();
  cmd->add_option("--steps", f.steps, "v* optimisation: at most this many steps")->capture_default_str()
      ->check(CLI::Range(1, 10000));
  cmd->add_option("--stop-loss", f.stop_loss, "v* optimisation: stop once the loss is below this (ROME: 5e-2)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--lr", f.lr, "v* Adam learning rate")->capture_default_str();
  cmd->add_option("--lr-scale", f.lr_scale,
                  "v*: absolute (ROME: --lr per coordinate) | relative (--lr in units of the MoE output's RMS entry "
                  "‖MoE output‖/√H, for models whose hidden states are on another scale than GPT-2's)")
      ->capture_default_str();
  cmd->add_option("--weight-decay", f.weight_decay, "v* weight decay")->capture_default_str();
  cmd->add_option("--kl-factor", f.kl_factor, "v* KL factor")->capture_default_str();
  cmd->add_option("--clamp-norm-factor", f.clamp, "‖δ‖ ≤ factor·‖MoE output‖")->capture_default_str();
  cmd->add_flag("--no-prefix-cache", f.no_prefix_cache, "Recompute every token in each v* step (slower, same result)");
  cmd->add_option("--templates", f.templates_file, "Context templates (JSON list or one per line, each with {})");
  cmd->add_option("--template-seed", f.template_seed, "Seed of the sampled context templates")->capture_default_str();
  cmd->add_option("--kl-prompt", f.kl_prompt, "KL prompt")->capture_default_str();
  cmd->add_option("--corpus", f.corpus, "Corpus for key statistics (default: bundled WikiText-2 test)");
  cmd->add_option("--cache-dir", f.cache_dir, "Key statistics cache (default: $MOEDIT_CACHE or ~/.cache/moedit)");
  cmd->add_option("--stats-tokens", f.stats_tokens, "Cap on corpus tokens for key statistics (0: all)");
  cmd->add_option("--seq-len", f.seq_len, "Corpus window length for key statistics")->capture_default_str();
}

EditOptions editor_options(const EditorFlags& f) {
  EditOptions opt;
  opt.keys = parse_key_mode(f.keys);
  opt.mom2_adjustment = !f.no_mom2;
  require_input(f.ridge >= 0, "--ridge must be ≥ 0");
  opt.ridge = f.ridge;
  opt.v.steps = f.steps;
  opt.v.lr = f.lr;
  require_input(f.lr_scale == "absolute" || f.lr_scale == "relative",
                "--lr-scale must be absolute or relative (got '" + f.lr_scale + "')");
  opt.v.relative_lr = f.lr_scale == "relative";
  opt.v.early_stop_loss = f.stop_loss;
  opt.v.weight_decay = f.weight_decay;
  opt.v.kl_factor = f.kl_factor;
  opt.v.clamp_norm_factor = f.clamp;
  opt.v.cache_prefix = !f.no_prefix_cache;
  opt.v.objective = parse_objective(f.objective);
  opt.template_seed = f.template_seed;
  opt.kl_prompt = f.kl_prompt;
  if (!f.templates_file.empty()) opt.templates = read_templates(f.templates_file);
  return opt;
}

KeyStatsOptions key_stats_options(const EditorFlags& f) {
  KeyStatsOptions so;
  if (!f.cache_dir.empty()) so.cache_dir = f.cache_dir;
  if (!f.corpus.empty()) so.corpus = f.corpus;
  so.max_tokens = f.stats_tokens;
  so.seq_len = f.seq_len;
  return so;
}

nlohmann::json editor_settings(const EditorFlags& f) {
  return {{"keys", f.keys},
          {"v_objective", f.objective},
          {"mom2_adjustment", !f.no_mom2},
          {"ridge", f.ridge},
          {"v_steps", f.steps},
          {"v_lr", f.lr},
          {"v_lr_scale", f.lr_scale},
          {"v_stop_loss", f.stop_loss},
          {"v_weight_decay", f.weight_decay},
          {"kl_factor", f.kl_factor},
          {"clamp_norm_factor", f.clamp},
          {"templates", f.templates_file},
          {"template_seed", f.template_seed},
          {"kl_prompt", f.kl_prompt},
          {"stats_corpus", f.corpus.empty() ? bundled_wikitext_path() : f.corpus},
          {"stats_tokens", f.stats_tokens},
          {"stats_seq_len", f.seq_len}};
}

std::vector<double> moe_layer_effects(const Model& m, const Tokenizer& tok, const EditRequest& req,
                                      double* embedding_std) {
  std::string prompt = normalized_prompt(req);
  prompt.replace(prompt.find("{}"), 2, req.subject);
  trace::TraceOptions o;
  o.kinds = {trace::Kind::Moe};
  o.window = 1;
  if (*embedding_std < 0) {
    auto subjects = trace::counterfact_subjects(bundled_counterfact_path());
    if (subjects.empty()) subjects = {req.subject};
    *embedding_std = trace::subject_embedding_std(m, tok, subjects);
  }
  o.embedding_std = *embedding_std;
  trace::TraceRequest tr{prompt, req.subject, req.target_true, "", req.case_id};
  const trace::TraceReport rep = trace::trace_fact(m, tok, tr, o);
  const trace::KindResult* k = rep.find(trace::Kind::Moe);
  require_input(k != nullptr, "--layer auto: the trace produced no MoE scores");
  std::vector<double> effects(size_t(m.config().n_layers), std::numeric_limits<double>::quiet_NaN());
  for (size_t r = 0; r < k->rows.size(); ++r) {
    if (k->rows[r] != rep.subject_end - 1) continue;
    for (int l = 0; l < int(k->scores[r].size()) && l < m.config().n_layers; ++l)
      if (m.config().is_moe(l) && !std::isnan(k->scores[r][size_t(l)]))
        effects[size_t(l)] = k->scores[r][size_t(l)] - rep.low_score;
  }
  return effects;
}

int parse_layer_index(const std::string& s) {
  try {
    size_t used = 0;
    const int l = std::stoi(s, &used);
    if (used == s.size()) return l;
  } catch (const std::exception&) {
  }
  throw InputError("--layer '" + s + "': expected a layer index or auto");
}

int best_effect_layer(const std::vector<double>& effects) {
  int best = -1;
  for (int l = 0; l < int(effects.size()); ++l)
    if (!std::isnan(effects[size_t(l)]) && (best < 0 || effects[size_t(l)] > effects[size_t(best)])) best = l;
  require_input(best >= 0, "--layer auto: no MoE layer scored at the subject's last token");
  return best;
}

void add_batch_flags(CLI::App* cmd, BatchFlags& f) {
  cmd->add_option("--method", f.method,
                  "rome: one rank-one edit per request | memit: the requests together over --layers (MEMIT per "
                  "expert) | alphaedit: memit projected onto the key statistics' null space | moeedit: the null-space "
                  "edit with each template's routed experts coupled, solved by block-coordinate descent (MoEEdit)")
      ->capture_default_str();
  cmd->add_option("--layers", f.layers,
                  "memit/alphaedit: MoE layers, e.g. 1,2,3 or 1-3 (z* at the last); auto[:W]: the W MoE layers (default "
                  "1) ending at the largest mean MoE indirect effect of a causal trace over the first requests");
  cmd->add_option("--mom2-weight", f.mom2_weight, "memit: λ in ΔW = R Kᵀ (λC + K Kᵀ)⁻¹ (MEMIT's mom2_update_weight)")
      ->capture_default_str();
  cmd->add_option("--nullspace-threshold", f.nullspace_threshold,
                  "alphaedit/moeedit: the null space is spanned by C's eigenvectors with eigenvalue below this")
      ->capture_default_str();
  cmd->add_option("--nullspace-relative", f.nullspace_relative,
                  "alphaedit/moeedit: per expert, the threshold is this times the mean eigenvalue of C (scale-free; replaces "
                  "--nullspace-threshold when > 0)");
  cmd->add_option("--bare-key-weight", f.bare_key_weight,
                  "memit/alphaedit: k* = w·(bare prompt's key) + (1 − w)·(mean of the other templates'); default: the "
                  "plain mean over all templates (ROME's k*); MEMIT's code: 0.5; 1: the bare prompt's key");
  cmd->add_option("--key-columns", f.key_columns,
                  "memit/alphaedit: mean: one column per request and target with k* | templates: one per context "
                  "template's key (weighted as k* weights them), fitted in the least-squares sense")
      ->capture_default_str();
  cmd->add_option("--passes", f.passes,
                  "memit/alphaedit: sweeps over --layers; each later one solves for the residual the earlier left")
      ->capture_default_str();
  cmd->add_option("--bcd-sweeps", f.bcd_sweeps,
                  "moeedit: block-coordinate sweeps over a layer's experts per solve")
      ->capture_default_str();
  cmd->add_option("--l2", f.l2, "alphaedit/moeedit: λ₂ in ΔW = R Kᵀ P (K Kᵀ P + λ₂ I)⁻¹ (AlphaEdit's L2)")->capture_default_str();
  cmd->add_flag("--router-guard", f.router_guard,
                "memit/alphaedit/moeedit: keep every update's output change (and v*'s δ) out of the directions the "
                "routers after its layer read, so their logits do not move along the residual stream (first order)");
  cmd->add_option("--router-guard-layers", f.router_guard_layers,
                  "--router-guard: only the next N MoE layers' routers (0: all later ones)")
      ->capture_default_str();
}

void check_batch_flags(const BatchFlags& f, const std::string& target) {
  const BatchMethod method = parse_batch_method(f.method);
  const TargetKind kind = parse_edit_target(target).kind;
  require_input(method != BatchMethod::MoeEdit || kind == TargetKind::Dominant || kind == TargetKind::Routed,
                "--target " + target + ": moeedit edits the routed experts each template's subject token uses "
                "(dominant or routed)");
  auto_layer_width(f);
  parse_key_columns(f.key_columns);
  require_input(f.passes >= 1, "--passes must be at least 1");
  require_input(f.bcd_sweeps >= 1, "--bcd-sweeps must be at least 1");
  require_input(f.nullspace_relative >= 0 && std::isfinite(f.nullspace_relative), "--nullspace-relative must be ≥ 0");
  require_input(f.router_guard_layers >= 0, "--router-guard-layers must be ≥ 0 (0: every later MoE layer)");
}

int auto_layer_width(const BatchFlags& f) {
  if (f.layers == "auto") return 1;
  if (f.layers.rfind("auto:", 0) != 0) return 0;
  size_t used = 0;
  int width = 0;
  try {
    width = std::stoi(f.layers.substr(5), &used);
  } catch (const std::exception&) {
    used = 0;
  }
  require_input(used > 0 && used == f.layers.size() - 5 && width >= 1,
                "--layers '" + f.layers + "': expected auto or auto:W with a width W >= 1");
  return width;
}

std::vector<int> auto_layer_range(int width, const std::vector<double>& mean_effects, const ModelConfig& c) {
  std::vector<double> eligible = mean_effects;  // a range may not end at the model's last layer
  if (!eligible.empty()) eligible.back() = std::numeric_limits<double>::quiet_NaN();
  const int best = best_effect_layer(eligible);
  std::vector<int> out;
  for (int l = best; l >= 0 && int(out.size()) < width; --l)
    if (c.is_moe(l)) out.insert(out.begin(), l);
  return out;
}

std::vector<double> mean_layer_effects(const Model& m, const Tokenizer& tok, const std::vector<EditRequest>& reqs,
                                       size_t cases) {
  std::vector<double> mean(size_t(m.config().n_layers), 0.0);
  double embedding_std = -1;
  const size_t n = std::min(reqs.size(), cases);
  for (size_t i = 0; i < n; ++i) {
    const auto eff = moe_layer_effects(m, tok, reqs[i], &embedding_std);
    for (size_t l = 0; l < mean.size(); ++l) mean[l] += eff[l] / double(n);
  }
  return mean;
}

BatchOptions batch_options(const BatchFlags& f, const std::string& layer, const EditorFlags& e,
                           const std::string& target, const ModelConfig& c, const MomentSource& moments,
                           const std::vector<double>* mean_effects) {
  check_batch_flags(f, target);
  BatchOptions o;
  o.method = parse_batch_method(f.method);
  require_input(f.layers.empty() || layer.empty() || layer == "auto", "give --layers or --layer, not both");
  if (auto_layers(f)) {
    require_input(mean_effects != nullptr, "--layers auto needs the requests' causal traces");
    o.layers = auto_layer_range(auto_layer_width(f), *mean_effects, c);
  } else if (!f.layers.empty())
    o.layers = parse_layer_list(f.layers);
  else if (!layer.empty() && layer != "auto")
    o.layers = {parse_layer_index(layer)};
  else
    throw InputError("--method " + f.method + " needs --layers (e.g. --layers 1-3) or one --layer L");
  for (int l : o.layers) {
    require_input(l < c.n_layers, "--layers: layer " + std::to_string(l) + " is out of range [0, " +
                                      std::to_string(c.n_layers) + ")");
    require_input(c.is_moe(l), "--layers: layer " + std::to_string(l) +
                                   " is a dense layer (no experts to edit); choose MoE layers");
  }
  // z* is reached through the attention of the layers above the last one: at the model's last layer a change at
  // the subject's token cannot reach the token the answer is read at (v*'s gradient is zero).
  require_input(o.layers.back() < c.n_layers - 1,
                "--layers: layer " + std::to_string(o.layers.back()) + " is the model's last layer; an edit there "
                "cannot reach the prompt's last token (no attention after it): end the range at an earlier layer");
  o.edit = editor_options(e);
  o.edit.target = parse_edit_target(target);
  o.edit.moments = moments;
  o.mom2_weight = f.mom2_weight;
  o.nullspace_threshold = f.nullspace_threshold;
  o.nullspace_relative = f.nullspace_relative;
  o.l2 = f.l2;
  o.bare_key_weight = f.bare_key_weight;
  o.key_columns = parse_key_columns(f.key_columns);
  o.passes = f.passes;
  o.bcd_sweeps = f.bcd_sweeps;
  o.router_guard = f.router_guard;
  o.router_guard_layers = f.router_guard_layers;
  return o;
}

nlohmann::json batch_settings(const BatchFlags& f) {
  if (!f.batch()) return {{"method", f.method}};
  return {{"method", f.method},           {"layers", f.layers}, {"mom2_weight", f.mom2_weight},
          {"nullspace_threshold", f.nullspace_threshold},
          {"nullspace_relative", f.nullspace_relative}, {"l2", f.l2}, {"bare_key_weight", f.bare_key_weight},
          {"key_columns", f.key_columns}, {"passes", f.passes}, {"bcd_sweeps", f.bcd_sweeps},
          {"router_guard", f.router_guard ? nlohmann::json(f.router_guard_layers) : nlohmann::json(nullptr)}};
}

}  // namespace moedit::cli
