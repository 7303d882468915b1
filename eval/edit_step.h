// One edit step of an evaluation run (eval/run.h): a ROME edit of one record, or a MEMIT / AlphaEdit batch of
// several (editor/memit.h). The run scores its records before and after the step and reverts it (independent
// mode) or keeps it (sequential mode); the step knows what it changed and what each record's case file records.
#pragma once
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "datasets/eval_records.h"
#include "editor/memit.h"
#include "editor/rome.h"
#include "eval/counterfact_eval.h"

namespace moedit::eval {

class EditStep {
 public:
  // ROME on one record; `templates` are sampled on the first call and reused.
  static EditStep rome(Model& m, const Tokenizer& tok, const EvalRecord& rec, const EditOptions& opt,
                       std::vector<std::string>& templates);
  // The records together; `cache` (alphaedit, sequential runs) holds the earlier batches' keys.
  static EditStep batch(Model& m, const Tokenizer& tok, const std::vector<const EvalRecord*>& recs,
                        const BatchOptions& opt, std::vector<std::string>& templates, KeyCache* cache);

  size_t size() const { return records_.size(); }
  const EvalRecord& record(size_t i) const { return *records_[i]; }
  double seconds() const;                      // wall time of the whole step
  nlohmann::json edit_json(size_t i) const;    // record i's "edit" entry
  // Record i's "moe" entry: the experts its edit changed and how its paraphrases route relative to them.
  nlohmann::json moe_json(size_t i, const CaseMetrics& pre, const CaseMetrics& post) const;
  void revert(Model& m) const;
  // The (layer, expert) down-projections the step changed.
  std::vector<std::pair<int, int>> touched() const;

 private:
  std::vector<const EvalRecord*> records_;
  std::optional<EditResult> rome_;
  std::shared_ptr<const BatchEditResult> batch_;
};

// The routing layer of the MoE extras: ROME's edited layer, a batch's last layer.
int routing_layer(const EditOptions& edit, const std::optional<BatchOptions>& batch);
// The layers whose down-projections a run's edits may change (fingerprinted around every revert).
std::set<int> edited_layers(const EditOptions& edit, const std::optional<BatchOptions>& batch);
// "L:E", "L:shared", "L:shared1", …
std::string expert_label(int layer, int expert);

}  // namespace moedit::eval
