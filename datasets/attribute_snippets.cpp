#include "datasets/attribute_snippets.h"

#include <fstream>
#include <nlohmann/json.hpp>

#include "io/errors.h"

namespace moedit {
using json = nlohmann::json;

AttributeSnippets AttributeSnippets::load(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw InputError(path + ": cannot open");
  const json j = json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) throw InputError(path + ": not valid JSON");
  if (!j.is_array()) throw InputError(path + ": expected a JSON list of {relation_id, target_id, samples}");
  AttributeSnippets s;
  for (size_t i = 0; i < j.size(); ++i) {
    const std::string where = path + ": entry " + std::to_string(i);
    const json& e = j[i];
    auto field = [&](const json& o, const char* key, const std::string& name) {
      if (!o.is_object() || !o.contains(key) || !o[key].is_string())
        throw InputError(where + ": field '" + name + "' missing or not a string");
      return o[key].get<std::string>();
    };
    const std::string rel = field(e, "relation_id", "relation_id"), target = field(e, "target_id", "target_id");
    if (!e.contains("samples") || !e["samples"].is_array())
      throw InputError(where + ": field 'samples' missing or not a list");
    auto& out = s.by_fact_[{rel, target}];
    for (const auto& x : e["samples"]) out.push_back({field(x, "name", "samples.name"), field(x, "text", "samples.text")});
  }
  return s;
}

const std::vector<Snippet>& AttributeSnippets::get(const std::string& relation_id, const std::string& target_id) const {
  static const std::vector<Snippet> none;
  const auto it = by_fact_.find({relation_id, target_id});
  return it == by_fact_.end() ? none : it->second;
}

std::vector<std::string> AttributeSnippets::all_texts() const {
  std::vector<std::string> out;
  for (const auto& [k, v] : by_fact_)
    for (const auto& x : v) out.push_back(x.text);
  return out;
}

size_t AttributeSnippets::size() const { return by_fact_.size(); }

}  // namespace moedit
