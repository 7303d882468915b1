// Evaluation records from the four dataset formats editors are judged on, in one shape.
//
//   counterfact  ROME's counterfact.json and MEMIT's multi_counterfact.json (same schema; datasets/counterfact.h)
//   zsre         MEND/ROME zsre_mend_eval.json: {subject, src, pred, rephrase, alt, answers[], loc, loc_ans, cond}
//                mapped as ROME's dsets/zsre.py does: prompt = src with the subject replaced by "{}",
//                target_new = answers[0], paraphrase = [rephrase], locality question = loc + "?" with answer
//                loc_ans; no target_true (ROME's "<|endoftext|>" placeholder is never scored).
//   easyedit     EasyEdit lists: {prompt, subject, target_new, ground_truth, rephrase_prompt, locality_prompt,
//                locality_ground_truth}; prompt holds the subject literally; target_true = ground_truth (optional),
//                paraphrase = [rephrase_prompt] (optional), locality question = locality_prompt with answer
//                locality_ground_truth (optional, both or neither).
//
// CounterFact records are scored with ROME's probability metrics; zsre and easyedit records with token accuracy
// (eval/counterfact_eval.h). Malformed records raise InputError naming the file, the record index and the field.
#pragma once
#include <string>
#include <vector>

namespace moedit {

enum class DatasetFormat { Auto, CounterFact, ZsRE, EasyEdit };
DatasetFormat parse_dataset_format(const std::string& s);  // auto | counterfact | mcf | zsre | easyedit
std::string format_name(DatasetFormat f);

struct EvalRecord {
  int case_id = -1;         // the record's case_id (counterfact), else its index in the file
  bool token_accuracy = false;  // zsre / easyedit: token-accuracy metrics instead of CounterFact probabilities
  std::string prompt;       // one "{}" where the subject goes
  std::string subject, relation_id;
  std::string target_new, target_new_id, target_true, target_true_id;  // target_true may be empty (zsre)
  std::vector<std::string> paraphrase_prompts, neighborhood_prompts, attribute_prompts, generation_prompts;
  std::string locality_prompt, locality_answer;  // token-accuracy records: the unrelated question and its answer

  std::string rewrite_prompt() const;  // prompt with the subject filled in
};

// Reads a JSON list in `format` (Auto: decided from the first record's fields).
std::vector<EvalRecord> load_eval_records(const std::string& path, DatasetFormat format = DatasetFormat::Auto);

}  // namespace moedit
