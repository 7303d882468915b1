#include "datasets/counterfact.h"

#include <fstream>
#include <nlohmann/json.hpp>

#include "io/errors.h"

namespace moedit {
using json = nlohmann::json;

std::string CounterFactRecord::rewrite_prompt() const {
  std::string s = prompt;
  const auto p = s.find("{}");
  if (p != std::string::npos) s.replace(p, 2, subject);
  return s;
}

std::string bundled_counterfact_path() {
  return std::string(MOEDIT_SOURCE_DIR) + "/datasets/data/counterfact/counterfact_preknown.json";
}
std::string bundled_wikitext_path() { return std::string(MOEDIT_SOURCE_DIR) + "/datasets/data/wikitext-2/wiki.test.raw"; }

std::vector<CounterFactRecord> load_counterfact(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw InputError(path + ": cannot open");
  json j = json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) throw InputError(path + ": not valid JSON");
  if (!j.is_array()) throw InputError(path + ": expected a JSON list of CounterFact records");
  std::vector<CounterFactRecord> out;
  out.reserve(j.size());
  for (size_t i = 0; i < j.size(); ++i) {
    const json& r = j[i];
    std::string where = path + ": record " + std::to_string(i);
    if (!r.is_object()) throw InputError(where + ": not an object");
    CounterFactRecord c;
    if (r.contains("case_id") && r["case_id"].is_number_integer()) {
      c.case_id = r["case_id"].get<int>();
      where += " (case_id " + std::to_string(c.case_id) + ")";
    }
    auto str = [&](const json& o, const char* key, const std::string& field) {
      if (!o.contains(key) || !o[key].is_string()) throw InputError(where + ": field '" + field + "' missing or not a string");
      return o[key].get<std::string>();
    };
    auto strs = [&](const char* key) {
      std::vector<std::string> v;
      if (!r.contains(key)) return v;
      if (!r[key].is_array()) throw InputError(where + ": field '" + std::string(key) + "' is not a list");
      for (const auto& s : r[key]) {
        if (!s.is_string()) throw InputError(where + ": field '" + std::string(key) + "' holds a non-string");
        v.push_back(s.get<std::string>());
      }
      return v;
    };
    if (!r.contains("requested_rewrite") || !r["requested_rewrite"].is_object())
      throw InputError(where + ": field 'requested_rewrite' missing or not an object");
    const json& rw = r["requested_rewrite"];
    c.prompt = str(rw, "prompt", "requested_rewrite.prompt");
    if (c.prompt.find("{}") == std::string::npos)
      throw InputError(where + ": field 'requested_rewrite.prompt' has no '{}' placeholder for the subject");
    c.subject = str(rw, "subject", "requested_rewrite.subject");
    if (c.subject.empty()) throw InputError(where + ": field 'requested_rewrite.subject' is empty");
    if (rw.contains("relation_id") && rw["relation_id"].is_string()) c.relation_id = rw["relation_id"].get<std::string>();
    for (const char* t : {"target_new", "target_true"}) {
      if (!rw.contains(t) || !rw[t].is_object())
        throw InputError(where + ": field 'requested_rewrite." + std::string(t) + "' missing or not an object");
      const std::string s = str(rw[t], "str", "requested_rewrite." + std::string(t) + ".str");
      if (s.empty()) throw InputError(where + ": field 'requested_rewrite." + std::string(t) + ".str' is empty");
      const std::string id = rw[t].contains("id") && rw[t]["id"].is_string() ? rw[t]["id"].get<std::string>() : "";
      if (std::string(t) == "target_new") {
        c.target_new = s;
        c.target_new_id = id;
      } else {
        c.target_true = s;
        c.target_true_id = id;
      }
    }
    c.paraphrase_prompts = strs("paraphrase_prompts");
    c.neighborhood_prompts = strs("neighborhood_prompts");
    c.attribute_prompts = strs("attribute_prompts");
    c.generation_prompts = strs("generation_prompts");
    out.push_back(std::move(c));
  }
  return out;
}

}  // namespace moedit
