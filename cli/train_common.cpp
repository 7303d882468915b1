// Shared training flags, data, loop and saving of router-tune and ceft (see cli/train_common.h).
#include "cli/train_common.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <numeric>
#include <random>

#include "cli/commands.h"
#include "cli/common.h"
#include "datasets/context_task.h"
#include "editor/save.h"
#include "io/errors.h"
#include "model/memory.h"
#include "train/train.h"

namespace fs = std::filesystem;

namespace moedit::cli {

namespace {

// "train" / "test" name a bundled split unless a file of that name exists.
std::string task_path(const std::string& arg) {
  if ((arg == "train" || arg == "test") && !fs::is_regular_file(arg)) return bundled_context_task_path(arg);
  return arg;
}

std::vector<eval::TaskItem> load_items(const std::string& path, const std::string& flag, const Tokenizer& tok) {
  require_input(fs::is_regular_file(path), flag + " " + path + ": no such file");
  return eval::tokenize_task(load_context_task(path), tok, path);
}

std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

// Runs check(), prefixing its InputError with the flag.
template <class F>
void with_flag(const std::string& flag, F check) {
  try {
    check();
  } catch (const InputError& e) {
    throw InputError(flag + ": " + e.what());
  }
}

}  // namespace

void add_train_flags(CLI::App* cmd, TrainFlags& f, double lr) {
  f.lr = lr;
  add_model_arg(cmd, f.model);
  add_load_options(cmd, false);
  cmd->add_option("--data", f.data, "Training examples: a context-task JSON file, or train/test (bundled splits)")
      ->required();
  cmd->add_option("--eval", f.eval,
                  "Score the task on this split before and after (default: the bundled test split when --data is "
                  "the bundled train split; else not scored)");
  cmd->add_option("--epochs", f.epochs, "Passes over the training examples")->capture_default_str();
  cmd->add_option("--batch-size", f.batch_size, "Examples per optimiser step")->capture_default_str();
  cmd->add_option("--lr", f.lr, "AdamW learning rate")->capture_default_str();
  cmd->add_option("--weight-decay", f.weight_decay, "AdamW decoupled weight decay")->capture_default_str();
  cmd->add_option("--betas", f.betas, "AdamW beta1 beta2")->expected(2)->capture_default_str();
  cmd->add_option("--seed", f.seed, "Seed of the per-epoch shuffle")->capture_default_str();
  cmd->add_option("--limit", f.limit, "Train on the first N examples only (0: all)")->capture_default_str();
  cmd->add_option("--save", f.save, "Write the tuned model as a checkpoint folder (the source's names, dtypes, "
                                    "sharding; only the trained tensors change)");
  cmd->add_option("--save-delta", f.save_delta,
                  "Write only the trained tensors (checkpoint names and dtypes) as one safetensors file");
  add_json_flag(cmd, f.json, "the losses, scores and settings");
}

TrainSetup load_training(const TrainFlags& f) {
  require_input(f.epochs >= 1, "--epochs " + std::to_string(f.epochs) + ": expected at least 1");
  require_input(f.batch_size >= 1, "--batch-size " + std::to_string(f.batch_size) + ": expected at least 1");
  require_input(f.limit >= 0, "--limit " + std::to_string(f.limit) + ": expected 0 (all) or more");
  require_input(f.lr > 0, "--lr " + num(f.lr) + ": expected a learning rate > 0");
  require_input(f.weight_decay >= 0, "--weight-decay " + num(f.weight_decay) + ": expected >= 0");
  for (double b : f.betas) require_input(b >= 0 && b < 1, "--betas " + num(b) + ": expected in [0, 1)");
  TrainSetup s;
  s.data_path = task_path(f.data);
  if (!f.eval.empty())
    s.eval_path = task_path(f.eval);
  else if (fs::exists(s.data_path) && fs::equivalent(s.data_path, bundled_context_task_path("train")))
    s.eval_path = bundled_context_task_path("test");
  if (!f.save.empty()) with_flag("--save " + f.save, [&] { check_save_folder(f.model, f.save); });
  if (!f.save_delta.empty()) with_flag("--save-delta " + f.save_delta, [&] { check_save_file(f.model, f.save_delta); });
  require_input(fs::is_regular_file(s.data_path), "--data " + f.data + ": no such file");
  if (!s.eval_path.empty()) require_input(fs::is_regular_file(s.eval_path), "--eval " + f.eval + ": no such file");
  s.model = load_model(f.model);
  s.tok = require_tokenizer(f.model, "training tokenizes the task with the model's tokenizer");
  s.train = load_items(s.data_path, "--data", *s.tok);
  if (f.limit > 0 && size_t(f.limit) < s.train.size()) s.train.resize(size_t(f.limit));
  if (!s.eval_path.empty()) s.eval = load_items(s.eval_path, "--eval", *s.tok);
  return s;
}

int64_t count_params(const Model& m, const ParamSelection& sel) {
  int64_t n = 0;
  for (const ParamId& p : selected_params(m, sel)) n += param_rows(m, p) * param_cols(m, p);
  return n;
}

nlohmann::json score_json(const TrainSetup& s, std::string& line) {
  if (s.eval.empty()) {
    line = "not scored (no --eval split)";
    return nullptr;
  }
  const eval::TaskScore sc = eval::score_task(*s.model, s.eval, nullptr, s.tok->eos_id().value_or(-1));
  line = sc.line();
  return sc.summary();
}

nlohmann::json train_epochs(Model& m, const std::vector<eval::TaskItem>& items, const ParamSelection& sel,
                            const TrainFlags& f) {
  AdamWOptions o;
  o.lr = f.lr;
  o.weight_decay = f.weight_decay;
  o.beta1 = f.betas[0];
  o.beta2 = f.betas[1];
  AdamW opt(o);
  std::mt19937_64 rng(f.seed);
  std::vector<size_t> order(items.size());
  std::iota(order.begin(), order.end(), size_t(0));
  nlohmann::json epochs = nlohmann::json::array();
  for (int ep = 1; ep <= f.epochs; ++ep) {
    std::shuffle(order.begin(), order.end(), rng);
    double sum = 0;
    size_t tokens = 0, steps = 0;
    const auto t0 = std::chrono::steady_clock::now();
    for (size_t b = 0; b < order.size(); b += size_t(f.batch_size)) {
      TrainBatch batch;
      size_t n = 0;
      for (size_t i = b; i < std::min(order.size(), b + size_t(f.batch_size)); ++i) {
        batch.push_back({items[order[i]].prompt, items[order[i]].answer});
        n += items[order[i]].answer.size();
      }
      sum += train_step(m, batch, sel, opt) * double(n);
      tokens += n;
      ++steps;
    }
    const double loss = sum / double(tokens);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!f.json)
      std::printf("epoch %d: loss %.4f (%zu steps, %.3f s per step)\n", ep, loss, steps, secs / double(steps));
    // Wall time of the epoch's optimiser steps (forward, backward, AdamW), not the scoring before/after.
    epochs.push_back({{"epoch", ep}, {"loss", loss}, {"steps", steps}, {"seconds", secs}});
  }
  return epochs;
}

void save_trained(Model& m, const ParamSelection& sel, const TrainFlags& f, nlohmann::json& out) {
  if (f.save.empty() && f.save_delta.empty()) return;
  const std::vector<ParamId> params = selected_params(m, sel);
  round_params_to_checkpoint_dtype(m, f.model, params);
  if (!f.save.empty()) {
    with_flag("--save " + f.save, [&] { save_trained_checkpoint(m, f.model, f.save, params); });
    out["saved"] = f.save;
  }
  if (!f.save_delta.empty()) {
    with_flag("--save-delta " + f.save_delta, [&] { save_param_delta(m, f.model, f.save_delta, params); });
    out["delta"] = f.save_delta;
  }
}

void run_training(TrainSetup& s, const ParamSelection& sel, const TrainFlags& f, const std::string& command,
                  const std::string& selection, const MeasureFn& extra) {
  Model& m = *s.model;
  nlohmann::json out = {{"command", command},
                        {"model", f.model},
                        {"data", s.data_path},
                        {"eval", s.eval_path.empty() ? nlohmann::json(nullptr) : nlohmann::json(s.eval_path)},
                        {"train_examples", s.train.size()},
                        {"selection", selection},
                        {"trainable_params", count_params(m, sel)},
                        {"lr", f.lr},
                        {"weight_decay", f.weight_decay},
                        {"betas", f.betas},
                        {"batch_size", f.batch_size},
                        {"seed", f.seed}};
  if (!f.json)
    std::printf("%s: %s, %lld trainable parameters (%s), %zu training examples, eval %s\n", command.c_str(),
                f.model.c_str(), static_cast<long long>(out["trainable_params"].get<int64_t>()), selection.c_str(),
                s.train.size(), s.eval_path.empty() ? "none" : s.eval_path.c_str());
  check_training_fits(f.model, uint64_t(out["trainable_params"].get<int64_t>()),
                      checkpoint_memory(m.config(), f.model), machine_memory());
  std::string line;
  out["before"] = score_json(s, line);
  if (!f.json) std::printf("before: %s\n", line.c_str());
  if (extra) {
    const Measures mb = extra(m);
    out["forgetting_before"] = mb.json;
    if (!f.json) std::printf("before: %s\n", mb.line.c_str());
  }
  out["epochs"] = train_epochs(m, s.train, sel, f);
  save_trained(m, sel, f, out);
  out["after"] = score_json(s, line);
  if (!f.json) std::printf("after: %s\n", line.c_str());
  if (extra) {
    const Measures ma = extra(m);
    out["forgetting_after"] = ma.json;
    if (!f.json) std::printf("after: %s\n", ma.line.c_str());
  }
  if (f.json) {
    std::printf("%s\n", out.dump().c_str());
    return;
  }
  if (out.contains("saved")) std::printf("saved %s\n", f.save.c_str());
  if (out.contains("delta")) std::printf("saved the trained tensors to %s\n", f.save_delta.c_str());
}

}  // namespace moedit::cli
