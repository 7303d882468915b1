#include "datasets/context_task.h"

#include <fstream>
#include <nlohmann/json.hpp>

#include "io/errors.h"

namespace moedit {
using json = nlohmann::json;

std::string bundled_context_task_path(const std::string& split) {
  return std::string(MOEDIT_SOURCE_DIR) + "/datasets/data/context_task/" + split + ".json";
}

std::vector<ContextExample> load_context_task(const std::string& path) {
  std::ifstream in(path);
  require_input(bool(in), path + ": cannot open");
  const json j = json::parse(in, nullptr, /*allow_exceptions=*/false);
  require_input(!j.is_discarded(), path + ": not valid JSON");
  require_input(j.is_array(), path + ": expected a JSON list of {context, question, answer} examples");
  require_input(!j.empty(), path + ": the list of examples is empty");
  std::vector<ContextExample> out;
  out.reserve(j.size());
  for (size_t i = 0; i < j.size(); ++i) {
    const json& r = j[i];
    std::string where = path + ": example " + std::to_string(i);
    require_input(r.is_object(), where + ": not an object");
    ContextExample e;
    e.case_id = int(i);
    if (r.contains("case_id")) {
      require_input(r["case_id"].is_number_integer(), where + ": field 'case_id' is not an integer");
      e.case_id = r["case_id"].get<int>();
      where += " (case_id " + std::to_string(e.case_id) + ")";
    }
    auto text = [&](const char* key, bool required) {
      if (!r.contains(key)) {
        require_input(!required, where + ": field '" + key + "' missing");
        return std::string();
      }
      require_input(r[key].is_string(), where + ": field '" + key + "' is not a string");
      std::string s = r[key].get<std::string>();
      require_input(!required || !s.empty(), where + ": field '" + key + "' is empty");
      return s;
    };
    e.context = text("context", true);
    e.question = text("question", true);
    e.answer = text("answer", true);
    e.subject = text("subject", false);
    e.relation_id = text("relation_id", false);
    e.memory_answer = text("memory_answer", false);
    out.push_back(std::move(e));
  }
  return out;
}

}  // namespace moedit
