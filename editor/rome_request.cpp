// ROME edit requests and options: targets, objectives and key modes parsed from their command-line names, requests
// read from JSON (CounterFact records or bare {prompt, subject, target_new}), and token-level inputs validated.
#include "editor/rome.h"

#include <fstream>

#include "editor/rome_internal.h"
#include "io/errors.h"

namespace moedit {

using namespace rome_detail;

namespace {

std::string json_str(const nlohmann::json& j, const char* key, const std::string& where, bool required) {
  if (!j.contains(key)) {
    require_input(!required, where + ": field '" + key + "' is missing");
    return "";
  }
  const auto& v = j.at(key);
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("str") && v.at("str").is_string()) return v.at("str").get<std::string>();
  throw InputError(where + ": field '" + key + "' must be a string or {\"str\": ...}");
}

std::vector<std::string> json_strings(const nlohmann::json& j, const char* key, const std::string& where) {
  std::vector<std::string> out;
  if (!j.contains(key)) return out;
  require_input(j.at(key).is_array(), where + ": field '" + key + "' must be a list of strings");
  for (const auto& v : j.at(key)) {
    require_input(v.is_string(), where + ": field '" + key + "' must be a list of strings");
    out.push_back(v.get<std::string>());
  }
  return out;
}

}  // namespace

// ---- parsing ------------------------------------------------------------------------------------------------------

EditTarget parse_edit_target(const std::string& s) {
  EditTarget t;
  if (s == "dominant") return t;
  if (s == "routed") {
    t.kind = TargetKind::Routed;
    return t;
  }
  if (s == "shared") {
    t.kind = TargetKind::Shared;
    return t;
  }
  const auto colon = s.find(':');
  if (colon != std::string::npos) {
    try {
      size_t u1 = 0, u2 = 0;
      const std::string a = s.substr(0, colon), b = s.substr(colon + 1);
      t.layer = std::stoi(a, &u1);
      t.expert = std::stoi(b, &u2);
      if (u1 == a.size() && u2 == b.size() && t.layer >= 0 && t.expert >= 0) {
        t.kind = TargetKind::Expert;
        return t;
      }
    } catch (const std::exception&) {
    }
  }
  throw InputError("--target '" + s + "': expected dominant, routed, shared or LAYER:EXPERT (e.g. 3:5)");
}

std::string target_name(const EditTarget& t) {
  switch (t.kind) {
    case TargetKind::Dominant: return "dominant";
    case TargetKind::Routed: return "routed";
    case TargetKind::Shared: return "shared";
    case TargetKind::Expert: return std::to_string(t.layer) + ":" + std::to_string(t.expert);
  }
  return "?";
}

VStarObjective parse_objective(const std::string& s) {
  if (s == "rome") return VStarObjective::Rome;
  if (s == "exact") return VStarObjective::Exact;
  throw InputError("--objective '" + s + "': expected rome or exact");
}

KeyMode parse_key_mode(const std::string& s) {
  if (s == "rome") return KeyMode::Rome;
  if (s == "consistent" || s == "r-rome") return KeyMode::Consistent;
  throw InputError("--keys '" + s + "': expected rome or consistent");
}

EditRequest parse_request(const nlohmann::json& j, const std::string& where) {
  require_input(j.is_object(), where + ": a request must be a JSON object");
  EditRequest r;
  const nlohmann::json* rr = &j;
  if (j.contains("requested_rewrite")) {
    rr = &j.at("requested_rewrite");
    require_input(rr->is_object(), where + ": 'requested_rewrite' must be an object");
    r.paraphrases = json_strings(j, "paraphrase_prompts", where);
    r.neighbors = json_strings(j, "neighborhood_prompts", where);
  }
  r.paraphrases = r.paraphrases.empty() ? json_strings(*rr, "paraphrase_prompts", where) : r.paraphrases;
  r.neighbors = r.neighbors.empty() ? json_strings(*rr, "neighborhood_prompts", where) : r.neighbors;
  if (j.contains("case_id")) r.case_id = j.at("case_id").is_string() ? j.at("case_id").get<std::string>() : j.at("case_id").dump();
  r.prompt = json_str(*rr, "prompt", where, true);
  r.subject = json_str(*rr, "subject", where, true);
  r.target_new = json_str(*rr, "target_new", where, true);
  r.target_true = json_str(*rr, "target_true", where, false);
  require_input(!trim(r.target_new).empty(), where + ": target_new is empty");
  require_input(!trim(r.subject).empty(), where + ": subject is empty");
  return r;
}

std::vector<EditRequest> load_requests(const std::string& path) {
  std::ifstream in(path);
  require_input(bool(in), "requests file '" + path + "' cannot be read");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw InputError(path + ": malformed JSON (" + std::string(e.what()) + ")");
  }
  std::vector<EditRequest> out;
  if (j.is_object()) {
    out.push_back(parse_request(j, path));
  } else {
    require_input(j.is_array(), path + ": expected a JSON list of requests");
    for (size_t i = 0; i < j.size(); ++i) out.push_back(parse_request(j[i], path + "[" + std::to_string(i) + "]"));
  }
  require_input(!out.empty(), path + ": no requests");
  return out;
}

void validate(const EditIds& ids, const ModelConfig& c) {
  require_input(!ids.prompts.empty(), "no rewriting prompts");
  require_input(ids.subject_last.size() == ids.prompts.size(), "one subject index per prompt is required");
  require_input(!ids.target.empty(), "the target is empty (no target tokens)");
  auto check_ids = [&](const std::vector<int32_t>& v, const std::string& what) {
    require_input(!v.empty(), what + " is empty");
    for (int32_t id : v)
      require_input(id >= 0 && id < c.vocab_size, what + ": token id " + std::to_string(id) + " is outside [0, " +
                                                      std::to_string(c.vocab_size) + ")");
  };
  for (size_t i = 0; i < ids.prompts.size(); ++i) {
    check_ids(ids.prompts[i], "prompt " + std::to_string(i));
    require_input(ids.subject_last[i] >= 0 && ids.subject_last[i] < int(ids.prompts[i].size()),
                  "prompt " + std::to_string(i) + ": subject index out of range");
  }
  check_ids(ids.kl_prompt, "the KL prompt");
  require_input(ids.kl_subject_last >= 0 && ids.kl_subject_last < int(ids.kl_prompt.size()),
                "the KL prompt's subject index is out of range");
  check_ids(ids.target, "the target");
}

}  // namespace moedit
