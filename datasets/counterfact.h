// CounterFact records in ROME's schema (counterfact.json / MEMIT's multi_counterfact.json):
//   {case_id, pararel_idx, requested_rewrite{prompt "...{}...", relation_id, subject, target_new{str,id},
//    target_true{str,id}}, paraphrase_prompts[], neighborhood_prompts[], attribute_prompts[], generation_prompts[]}
// Malformed records raise InputError naming the file, the record (index and case_id) and the field.
#pragma once
#include <string>
#include <vector>

namespace moedit {

struct CounterFactRecord {
  int case_id = -1;
  std::string prompt;   // template with one "{}" for the subject
  std::string subject;
  std::string relation_id;
  std::string target_new, target_true;
  std::string target_new_id, target_true_id;
  std::vector<std::string> paraphrase_prompts, neighborhood_prompts, attribute_prompts, generation_prompts;

  std::string rewrite_prompt() const;  // prompt with the subject filled in
};

std::vector<CounterFactRecord> load_counterfact(const std::string& path);

// The bundled CounterFact file (datasets/data/counterfact/counterfact_preknown.json in the source tree).
std::string bundled_counterfact_path();
// The bundled WikiText-2 test split.
std::string bundled_wikitext_path();

}  // namespace moedit
