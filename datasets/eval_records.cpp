#include "datasets/eval_records.h"

#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "datasets/counterfact.h"
#include "io/errors.h"

namespace moedit {
using json = nlohmann::json;

DatasetFormat parse_dataset_format(const std::string& s) {
  if (s == "auto") return DatasetFormat::Auto;
  if (s == "counterfact" || s == "cf" || s == "mcf") return DatasetFormat::CounterFact;
  if (s == "zsre") return DatasetFormat::ZsRE;
  if (s == "easyedit") return DatasetFormat::EasyEdit;
  throw InputError("dataset format '" + s + "': expected auto, counterfact, mcf, zsre or easyedit");
}

std::string format_name(DatasetFormat f) {
  switch (f) {
    case DatasetFormat::Auto: return "auto";
    case DatasetFormat::CounterFact: return "counterfact";
    case DatasetFormat::ZsRE: return "zsre";
    case DatasetFormat::EasyEdit: return "easyedit";
  }
  return "?";
}

std::string EvalRecord::rewrite_prompt() const {
  std::string s = prompt;
  s.replace(s.find("{}"), 2, subject);
  return s;
}

namespace {

// Field access for one record; every failure names the file, the record and the field.
struct Fields {
  const json& r;
  std::string where;

  [[noreturn]] void fail(const std::string& field, const std::string& what) const {
    throw InputError(where + ": field '" + field + "' " + what);
  }
  bool has(const char* key) const { return r.contains(key) && !r[key].is_null(); }
  std::string str(const char* key) const {
    if (!has(key) || !r[key].is_string()) fail(key, "missing or not a string");
    std::string s = r[key].get<std::string>();
    if (s.find_first_not_of(" \t\r\n") == std::string::npos) fail(key, "is empty");
    return s;
  }
  std::string optional_str(const char* key) const { return has(key) ? str(key) : std::string(); }
  // A string, or a non-empty list of strings whose first entry is taken (zsRE's answers, EasyEdit's lists).
  std::string first_str(const char* key) const {
    if (!has(key)) fail(key, "missing (expected a string or a non-empty list of strings)");
    if (r[key].is_array()) {
      if (r[key].empty() || !r[key][0].is_string()) fail(key, "must be a string or a non-empty list of strings");
      return r[key][0].get<std::string>();
    }
    return str(key);
  }
};

// The subject must occur in the prompt; its first occurrence becomes "{}".
std::string template_from(const Fields& f, const std::string& text, const char* text_field, const std::string& subject) {
  const auto p = text.find(subject);
  if (p == std::string::npos) f.fail(text_field, "does not contain the subject '" + subject + "'");
  std::string t = text;
  t.replace(p, subject.size(), "{}");
  return t;
}

// The part zsRE and EasyEdit share: the subject, the prompt that holds it literally, the new target.
EvalRecord token_accuracy_record(const Fields& f, int index, const char* prompt_key, const char* target_key) {
  EvalRecord e;
  e.case_id = index;
  e.token_accuracy = true;
  e.subject = f.str("subject");
  e.prompt = template_from(f, f.str(prompt_key), prompt_key, e.subject);
  e.target_new = f.first_str(target_key);
  return e;
}

EvalRecord from_zsre(const Fields& f, int index) {
  EvalRecord e = token_accuracy_record(f, index, "src", "answers");
  e.paraphrase_prompts = {f.str("rephrase")};
  e.locality_prompt = f.str("loc") + "?";
  e.locality_answer = f.str("loc_ans");
  return e;
}

EvalRecord from_easyedit(const Fields& f, int index) {
  EvalRecord e = token_accuracy_record(f, index, "prompt", "target_new");
  if (f.has("ground_truth")) e.target_true = f.first_str("ground_truth");
  if (f.has("rephrase_prompt")) e.paraphrase_prompts = {f.first_str("rephrase_prompt")};
  if (f.has("locality_prompt") || f.has("locality_ground_truth")) {
    e.locality_prompt = f.first_str("locality_prompt");
    e.locality_answer = f.first_str("locality_ground_truth");
  }
  return e;
}

EvalRecord from_counterfact(const CounterFactRecord& c) {
  return {.case_id = c.case_id,
          .prompt = c.prompt,
          .subject = c.subject,
          .relation_id = c.relation_id,
          .target_new = c.target_new,
          .target_new_id = c.target_new_id,
          .target_true = c.target_true,
          .target_true_id = c.target_true_id,
          .paraphrase_prompts = c.paraphrase_prompts,
          .neighborhood_prompts = c.neighborhood_prompts,
          .attribute_prompts = c.attribute_prompts,
          .generation_prompts = c.generation_prompts,
          .locality_prompt = {},
          .locality_answer = {}};
}

DatasetFormat detect(const json& first) {
  if (!first.is_object()) return DatasetFormat::CounterFact;  // the reader reports the record
  if (first.contains("requested_rewrite")) return DatasetFormat::CounterFact;
  if (first.contains("src") && first.contains("answers")) return DatasetFormat::ZsRE;
  return DatasetFormat::EasyEdit;
}

}  // namespace

std::vector<EvalRecord> load_eval_records(const std::string& path, DatasetFormat format) {
  std::ifstream in(path);
  if (!in) throw InputError(path + ": cannot open");
  const json j = json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) throw InputError(path + ": not valid JSON");
  if (!j.is_array()) throw InputError(path + ": expected a JSON list of records");
  if (format == DatasetFormat::Auto) format = j.empty() ? DatasetFormat::CounterFact : detect(j[0]);

  std::vector<EvalRecord> out;
  if (format == DatasetFormat::CounterFact) {
    for (const auto& c : load_counterfact(path)) out.push_back(from_counterfact(c));
    for (size_t i = 0; i < out.size(); ++i)
      if (out[i].case_id < 0) out[i].case_id = int(i);  // records without case_id: their index
  } else {
    for (size_t i = 0; i < j.size(); ++i) {
      const std::string where = path + ": record " + std::to_string(i);
      if (!j[i].is_object()) throw InputError(where + ": not an object");
      const Fields f{j[i], where};
      out.push_back(format == DatasetFormat::ZsRE ? from_zsre(f, int(i)) : from_easyedit(f, int(i)));
    }
  }
  std::map<int, size_t> seen;  // case_id → first record
  for (size_t i = 0; i < out.size(); ++i)
    if (const auto [it, fresh] = seen.emplace(out[i].case_id, i); !fresh)
      throw InputError(path + ": record " + std::to_string(i) + ": field 'case_id' repeats " +
                       std::to_string(out[i].case_id) + " (record " + std::to_string(it->second) + ")");
  return out;
}

}  // namespace moedit
