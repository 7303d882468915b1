// Features file and the bundled feature set (see tracing/probe_features.h).
#include "tracing/probe_features.h"

#include <cctype>
#include <fstream>
#include <nlohmann/json.hpp>

#include "io/errors.h"

namespace moedit {

FeatureSet load_features(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw InputError(path + ": cannot open the features file");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(f);
  } catch (const nlohmann::json::exception& e) {
    throw InputError(path + ": not JSON (" + e.what() + ")");
  }
  require_input(j.is_object() && j.contains("features") && j["features"].is_array() && !j["features"].empty(),
                path + ": field 'features' missing or not a non-empty list");
  require_input(j.contains("texts") && j["texts"].is_array() && !j["texts"].empty(),
                path + ": field 'texts' missing or not a non-empty list");
  FeatureSet s;
  for (const auto& n : j["features"]) {
    require_input(n.is_string(), path + ": field 'features' must list strings");
    s.features.push_back(n.get<std::string>());
  }
  for (size_t i = 0; i < j["texts"].size(); ++i) {
    const auto& t = j["texts"][i];
    const std::string where = path + ": field 'texts[" + std::to_string(i) + "]";
    require_input(t.is_object() && t.contains("ids") && t["ids"].is_array() && !t["ids"].empty(),
                  where + ".ids' missing or empty");
    FeatureText ft;
    for (const auto& id : t["ids"]) {
      require_input(id.is_number_integer(), where + ".ids' holds a non-integer");
      ft.ids.push_back(id.get<int32_t>());
    }
    if (t.contains("text") && t["text"].is_string()) ft.text = t["text"].get<std::string>();
    for (const auto& name : s.features) {
      const std::string fw = where + ".labels." + name + "'";
      require_input(t.contains("labels") && t["labels"].is_object() && t["labels"].contains(name) &&
                        t["labels"][name].is_array(),
                    fw + " missing");
      const auto& l = t["labels"][name];
      require_input(l.size() == ft.ids.size(), fw + " has " + std::to_string(l.size()) + " labels for " +
                                                   std::to_string(ft.ids.size()) + " ids");
      std::vector<uint8_t> v;
      for (const auto& x : l) {
        require_input(x.is_number_integer() && (x.get<int>() == 0 || x.get<int>() == 1), fw + " holds a value other than 0 or 1");
        v.push_back(uint8_t(x.get<int>()));
      }
      ft.labels[name] = std::move(v);
    }
    s.texts.push_back(std::move(ft));
  }
  return s;
}

std::string features_json(const FeatureSet& f) {
  nlohmann::json j = {{"features", f.features}, {"texts", nlohmann::json::array()}};
  for (const auto& t : f.texts) {
    nlohmann::json l = nlohmann::json::object();
    for (const auto& [k, v] : t.labels) l[k] = v;
    j["texts"].push_back({{"ids", t.ids}, {"text", t.text}, {"labels", l}});
  }
  return j.dump() + "\n";
}

namespace {

bool has_any(const std::string& s, const char* chars) { return s.find_first_of(chars) != std::string::npos; }

bool ends_sentence(const std::string& s) {
  const size_t e = s.find_last_not_of(" \t\n");
  return e != std::string::npos && (s[e] == '.' || s[e] == '!' || s[e] == '?');
}

bool has_alnum(const std::string& s) {
  for (unsigned char c : s)
    if (std::isalnum(c)) return true;
  return false;
}

// One text's labels; subject_span [b, e) (b = e: none).
FeatureText label_text(const Tokenizer& tok, const std::string& text, int max_tokens, const std::string& subject) {
  const auto enc = tok.encode(text, true);
  FeatureText ft;
  ft.text = text;
  const int n = std::min<int>(int(enc.ids.size()), max_tokens);
  ft.ids.assign(enc.ids.begin(), enc.ids.begin() + n);
  std::pair<int, int> span{0, 0};
  if (!subject.empty())
    if (const auto s = tok.find_span(enc, text, subject)) span = *s;
  for (const char* f : {"digit", "sentence_start", "subject", "closing_bracket"}) ft.labels[f].assign(size_t(n), 0);
  bool first = true;
  std::string prev;
  for (int i = 0; i < n; ++i) {
    if (enc.special_mask[size_t(i)]) continue;
    const std::string piece = tok.decode({ft.ids[size_t(i)]});
    ft.labels["digit"][size_t(i)] = has_any(piece, "0123456789");
    ft.labels["closing_bracket"][size_t(i)] = has_any(piece, ")]}");
    ft.labels["subject"][size_t(i)] = i >= span.first && i < span.second;
    ft.labels["sentence_start"][size_t(i)] = first || (ends_sentence(prev) && has_alnum(piece));
    first = false;
    prev = piece;
  }
  return ft;
}

}  // namespace

FeatureSet build_probe_features(const Tokenizer& tok, const std::vector<std::string>& wiki_lines,
                                const std::vector<CounterFactRecord>& records, int max_tokens) {
  FeatureSet s;
  s.features = {"digit", "sentence_start", "subject", "closing_bracket"};
  for (const auto& l : wiki_lines) s.texts.push_back(label_text(tok, l, max_tokens, ""));
  for (const auto& r : records)
    s.texts.push_back(label_text(tok, r.rewrite_prompt() + " " + r.target_true, max_tokens, r.subject));
  return s;
}

}  // namespace moedit
