// What `moedit router-tune` and `moedit ceft` share (issue 19): the training flags, the task data (prompt ‖ " " +
// answer, tokenized as eval/context_task_eval.h scores it), the epoch loop, the task score and the saving.
//
// --data/--eval take a file or the name of a bundled split ("train", "test": datasets/data/context_task/). The eval
// split defaults to the bundled test split when --data is the bundled train split; otherwise without --eval the task
// is not scored (the losses are still reported).
#pragma once
#include <CLI/CLI.hpp>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "eval/context_task_eval.h"
#include "model/model.h"
#include "model/weight_grads.h"
#include "tokenizer/tokenizer.h"

namespace moedit::cli {

struct TrainFlags {
  std::string model, data, eval, save, save_delta;
  int epochs = 3, batch_size = 8, limit = 0;
  uint64_t seed = 0;
  double lr = 0, weight_decay = 0;
  std::vector<double> betas = {0.9, 0.999};
  bool json = false;
};

// Adds the training flags (and the positional MODEL) to cmd; `lr` is the command's default learning rate.
void add_train_flags(CLI::App* cmd, TrainFlags& f, double lr);

// A loaded training run: the model, its tokenizer, the tokenized train and eval items.
struct TrainSetup {
  std::shared_ptr<Model> model;
  std::optional<Tokenizer> tok;
  std::string data_path, eval_path;  // eval_path empty: no scoring
  std::vector<eval::TaskItem> train, eval;
};
// Validates the flags (InputError naming the flag or file), loads the data and the model.
TrainSetup load_training(const TrainFlags& f);

// Elements of the selected parameters.
int64_t count_params(const Model& m, const ParamSelection& sel);
// The task score on setup.eval: its summary JSON (eval/context_task_eval.h TaskScore::summary; null when there is
// no eval split) and line (TaskScore::line, or "not scored").
nlohmann::json score_json(const TrainSetup& s, std::string& line);
// Trains sel for f.epochs epochs (batches of f.batch_size, order shuffled each epoch by a generator seeded with
// f.seed); prints each epoch's loss unless f.json. Returns [{"epoch", "loss"}] (loss: the epoch's mean answer-token
// cross-entropy, each batch's before its update, weighted by its answer tokens).
nlohmann::json train_epochs(Model& m, const std::vector<eval::TaskItem>& items, const ParamSelection& sel,
                            const TrainFlags& f);
// Extra before/after measures of a command (ceft's forgetting): their JSON object and one text line.
struct Measures {
  nlohmann::json json;
  std::string line;
};
using MeasureFn = std::function<Measures(const Model&)>;

// The whole run: scores (and `extra`, if any) before, trains, saves, scores after; prints the text report (or the
// JSON with --json: {"command", "model", "data", "eval", "train_examples", "selection", "trainable_params", "lr",
// "weight_decay", "betas", "batch_size", "epochs": [...], "seed", "before", "after", with extra "forgetting_before",
// "forgetting_after", "saved", "delta"}).
void run_training(TrainSetup& s, const ParamSelection& sel, const TrainFlags& f, const std::string& command,
                  const std::string& selection, const MeasureFn& extra = {});

// --save / --save-delta of the trained parameters (their in-memory values are first rounded to the stored dtypes,
// so the model scored afterwards is the one saved). Adds "saved"/"delta" to out.
void save_trained(Model& m, const ParamSelection& sel, const TrainFlags& f, nlohmann::json& out);

}  // namespace moedit::cli
