#include "eval/edit_step.h"

#include "eval/run.h"

namespace moedit::eval {
using json = nlohmann::json;

namespace {

// The MoE extras of one record: experts changed (labels), the ones at `layer`, the paraphrases' routing there.
json moe_extras(int layer, const std::string& target, const std::vector<std::pair<int, int>>& changed,
                const json& rewrite_experts, const CaseMetrics& pre, const CaseMetrics& post) {
  std::vector<std::string> labels;
  std::set<int> routed_edits;
  bool shared_edit = false;
  for (const auto& [l, e] : changed) {
    labels.push_back(expert_label(l, e));
    if (l != layer) continue;
    if (is_shared_expert(e))
      shared_edit = true;
    else
      routed_edits.insert(e);
  }
  json routes = json::array();
  double overlap = 0;
  int found = 0;
  for (const auto& ex : post.paraphrase_experts) {
    if (ex.empty()) {
      routes.push_back(nullptr);
      continue;
    }
    int hits = 0;
    for (const int e : ex) hits += int(routed_edits.count(e));
    const size_t n_edited = routed_edits.size() + (shared_edit ? 1 : 0);
    routes.push_back(shared_edit || hits > 0);
    overlap += n_edited ? double(hits + (shared_edit ? 1 : 0)) / double(n_edited) : 0.0;
    ++found;
  }
  return {{"layer", layer},
          {"target", target},
          {"edited_experts", labels},
          {"rewrite_experts", rewrite_experts},
          {"paraphrase_experts", post.paraphrase_experts},
          {"paraphrase_routes_through_edited", routes},
          {"routing_overlap", found ? json(overlap / found) : json(nullptr)},
          {"paraphrase_success", {{"pre", pre.paraphrase_success}, {"post", post.paraphrase_success}}}};
}

}  // namespace

std::string expert_label(int layer, int expert) {
  if (!is_shared_expert(expert)) return std::to_string(layer) + ":" + std::to_string(expert);
  const int j = shared_index(expert);
  return std::to_string(layer) + ":shared" + (j > 0 ? std::to_string(j) : std::string());
}

int routing_layer(const EditOptions& edit, const std::optional<BatchOptions>& batch) {
  if (batch) return batch->layers.back();
  return edit.target.kind == TargetKind::Expert ? edit.target.layer : edit.layer;
}

std::set<int> edited_layers(const EditOptions& edit, const std::optional<BatchOptions>& batch) {
  if (batch) return {batch->layers.begin(), batch->layers.end()};
  return {routing_layer(edit, batch)};
}

EditStep EditStep::rome(Model& m, const Tokenizer& tok, const EvalRecord& rec, const EditOptions& opt,
                        std::vector<std::string>& templates) {
  EditStep s;
  s.records_ = {&rec};
  s.rome_ = apply_edit(m, tok, edit_request(rec), opt, &templates);
  return s;
}

EditStep EditStep::batch(Model& m, const Tokenizer& tok, const std::vector<const EvalRecord*>& recs,
                         const BatchOptions& opt, std::vector<std::string>& templates, KeyCache* cache) {
  EditStep s;
  s.records_ = recs;
  std::vector<EditRequest> reqs;
  for (const auto* r : recs) reqs.push_back(edit_request(*r));
  s.batch_ = std::make_shared<BatchEditResult>(apply_batch_edit(m, tok, reqs, opt, &templates, cache));
  return s;
}

double EditStep::seconds() const { return rome_ ? rome_->seconds : batch_->seconds; }

json EditStep::edit_json(size_t i) const {
  if (rome_) return ::moedit::edit_json(*rome_);
  json j = batch_request_json(*batch_, int(i));
  j["batch"] = {{"method", method_name(batch_->method)},
                {"size", size()},
                {"first_case", records_.front()->case_id},
                {"seconds", batch_->seconds},
                {"vstar_seconds", batch_->vstar_seconds},
                {"expert_updates", batch_->updates.size()}};
  return j;
}

json EditStep::moe_json(size_t i, const CaseMetrics& pre, const CaseMetrics& post) const {
  if (rome_) {
    std::vector<std::pair<int, int>> changed;
    for (const auto& u : rome_->updates) changed.emplace_back(u.layer, u.expert);
    return moe_extras(rome_->layer, target_name(rome_->target), changed, rome_->routed, pre, post);
  }
  return moe_extras(batch_->layers.back(), target_name(batch_->target), edited_experts(*batch_, int(i)), nullptr,
                    pre, post);
}

void EditStep::revert(Model& m) const {
  if (rome_)
    ::moedit::revert(m, *rome_);
  else
    ::moedit::revert(m, *batch_);
}

std::vector<std::pair<int, int>> EditStep::touched() const {
  return rome_ ? edited_experts(*rome_) : edited_experts(*batch_);
}

}  // namespace moedit::eval
