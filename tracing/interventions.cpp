#include "tracing/interventions.h"

#include <cctype>
#include <cmath>
#include <limits>
#include <map>
#include <set>
#include <sstream>

#include "io/errors.h"
#include "io/files.h"

#include <fstream>
#include <nlohmann/json.hpp>

namespace moedit {

namespace {

std::string trim(const std::string& s) {
  size_t a = 0, b = s.size();
  while (a < b && std::isspace(static_cast<unsigned char>(s[a]))) ++a;
  while (b > a && std::isspace(static_cast<unsigned char>(s[b - 1]))) --b;
  return s.substr(a, b - a);
}

std::vector<std::string> split_items(const std::string& s, const std::string& flag) {
  std::vector<std::string> out;
  size_t i = 0;
  while (i <= s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    const std::string item = trim(s.substr(i, j - i));
    if (item.empty()) throw InputError(flag + ": empty item in '" + s + "' (expected L:E,...)");
    out.push_back(item);
    i = j + 1;
  }
  return out;
}

int parse_int(const std::string& t, const std::string& flag, const std::string& item, const char* what) {
  const std::string s = trim(t);
  try {
    size_t used = 0;
    const long v = std::stol(s, &used);
    if (used != s.size() || v < 0 || v > 1000000) throw std::invalid_argument(s);
    return int(v);
  } catch (const std::exception&) {
    throw InputError(flag + ": '" + item + "': " + what + " '" + s + "' is not a non-negative integer");
  }
}

ExpertRef parse_ref(const std::string& item, const std::string& flag) {
  const size_t c = item.find(':');
  if (c == std::string::npos) throw InputError(flag + ": '" + item + "' is not of the form LAYER:EXPERT");
  return {parse_int(item.substr(0, c), flag, item, "layer"), parse_int(item.substr(c + 1), flag, item, "expert")};
}

}  // namespace

std::vector<ExpertRef> parse_mask_spec(const std::string& s, const std::string& flag) {
  std::vector<ExpertRef> out;
  for (const auto& item : split_items(s, flag)) out.push_back(parse_ref(item, flag));
  return out;
}

std::vector<ExpertBoost> parse_boost_spec(const std::string& s, const std::string& flag) {
  std::vector<ExpertBoost> out;
  for (const auto& item : split_items(s, flag)) {
    const size_t eq = item.find('=');
    if (eq == std::string::npos) throw InputError(flag + ": '" + item + "' is not of the form LAYER:EXPERT=C");
    const ExpertRef r = parse_ref(trim(item.substr(0, eq)), flag);
    const std::string cs = trim(item.substr(eq + 1));
    float c = 0.f;
    try {
      size_t used = 0;
      c = std::stof(cs, &used);
      if (used != cs.size()) throw std::invalid_argument(cs);
    } catch (const std::exception&) {
      throw InputError(flag + ": '" + item + "': '" + cs + "' is not a number");
    }
    if (!std::isfinite(c)) throw InputError(flag + ": '" + item + "': the boost must be finite");
    out.push_back({r.layer, r.expert, c});
  }
  return out;
}

BoostMode parse_boost_mode(const std::string& s, const std::string& flag) {
  if (s == "add") return BoostMode::Add;
  if (s == "norm" || s == "norm-preserving") return BoostMode::NormPreserving;
  throw InputError(flag + ": '" + s + "' is not a boost mode (add | norm)");
}

Steering load_steering(const std::string& path, double threshold) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw InputError(path + ": cannot open the steering file");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(f);
  } catch (const nlohmann::json::exception& e) {
    throw InputError(path + ": not JSON (" + e.what() + ")");
  }
  Steering s;
  s.source = path;
  s.threshold = threshold;
  if (!j.is_object() || !j.contains("layers") || !j["layers"].is_array() || !j.contains("vector") ||
      !j["vector"].is_array())
    throw InputError(path + ": expected {\"layers\": [...], \"vector\": [[...], ...]}");
  if (j["layers"].size() != j["vector"].size())
    throw InputError(path + ": field 'vector' has " + std::to_string(j["vector"].size()) + " rows for " +
                     std::to_string(j["layers"].size()) + " layers");
  for (size_t i = 0; i < j["layers"].size(); ++i) {
    const auto& l = j["layers"][i];
    const auto& row = j["vector"][i];
    if (!l.is_number_integer()) throw InputError(path + ": field 'layers[" + std::to_string(i) + "]' is not an integer");
    if (!row.is_array()) throw InputError(path + ": field 'vector[" + std::to_string(i) + "]' is not a list");
    VecF v(Eigen::Index(row.size()));
    for (size_t e = 0; e < row.size(); ++e) {
      if (!row[e].is_number())
        throw InputError(path + ": field 'vector[" + std::to_string(i) + "][" + std::to_string(e) + "]' is not a number");
      const double x = row[e].get<double>();
      if (!std::isfinite(x)) throw InputError(path + ": field 'vector[" + std::to_string(i) + "]' is not finite");
      v[Eigen::Index(e)] = threshold >= 0 ? float(x >= threshold) : float(x);
    }
    s.layers.push_back(l.get<int>());
    s.vector.push_back(std::move(v));
  }
  return s;
}

void validate_interventions(const InterventionSpec& spec, const ModelConfig& cfg) {
  auto check = [&](int l, int e, const std::string& flag) {
    if (l < 0 || l >= cfg.n_layers)
      throw InputError(flag + ": layer " + std::to_string(l) + " out of range (the model has " +
                       std::to_string(cfg.n_layers) + " layers, 0.." + std::to_string(cfg.n_layers - 1) + ")");
    if (!cfg.is_moe(l)) throw InputError(flag + ": layer " + std::to_string(l) + " is a dense layer (it has no router)");
    if (e < 0 || e >= cfg.n_experts)
      throw InputError(flag + ": expert " + std::to_string(e) + " out of range (layer " + std::to_string(l) + " has " +
                       std::to_string(cfg.n_experts) + " experts, 0.." + std::to_string(cfg.n_experts - 1) + ")");
  };
  std::map<int, std::set<int>> masked;
  for (const auto& m : spec.mask) {
    check(m.layer, m.expert, spec.mask_flag);
    masked[m.layer].insert(m.expert);
  }
  for (const auto& b : spec.boost) {
    check(b.layer, b.expert, spec.boost_flag);
    if (!std::isfinite(b.c)) throw InputError(spec.boost_flag + ": the boost must be finite");
    if (masked.count(b.layer) && masked[b.layer].count(b.expert))
      throw InputError(spec.boost_flag + ": expert " + std::to_string(b.layer) + ":" + std::to_string(b.expert) +
                       " is also given to " + spec.mask_flag);
  }
  const Steering& st = spec.steer;
  if (!st.empty()) {
    const std::string where = spec.steer_flag + " " + st.source;
    if (st.form < 3 || st.form > 5) throw InputError(spec.steer_flag + "-form: " + std::to_string(st.form) + " (expected 3, 4 or 5)");
    if (!std::isfinite(st.c)) throw InputError(spec.steer_flag + "-coef: the coefficient must be finite");
    std::set<int> seen;
    for (size_t i = 0; i < st.layers.size(); ++i) {
      check(st.layers[i], 0, where);
      if (!seen.insert(st.layers[i]).second)
        throw InputError(where + ": layer " + std::to_string(st.layers[i]) + " is listed twice");
      if (st.vector[i].size() != cfg.n_experts)
        throw InputError(where + ": the row of layer " + std::to_string(st.layers[i]) + " has " +
                         std::to_string(st.vector[i].size()) + " entries, the model " + std::to_string(cfg.n_experts) +
                         " experts");
    }
  }
  for (const auto& [l, es] : masked)
    if (cfg.n_experts - int(es.size()) < cfg.top_k)
      throw InputError(spec.mask_flag + ": masking " + std::to_string(es.size()) + " experts of layer " +
                       std::to_string(l) + " leaves fewer than top_k = " + std::to_string(cfg.top_k) +
                       " of its " + std::to_string(cfg.n_experts) + " experts");
}

namespace {

// apply_interventions on float (the forward) or double (the taped stack in tests) logits z [N, E]; in float the
// arithmetic of every entry is the same whatever the caller (hook or standing edit).
template <class Z>
void apply_rows(const InterventionSpec& spec, int l, Z& z) {
  using T = typename Z::Scalar;
  const int E = int(z.cols());
  const Steering& st = spec.steer;
  for (size_t i = 0; i < st.layers.size(); ++i) {
    if (st.layers[i] != l) continue;
    const VecF& v = st.vector[i];
    for (int t = 0; t < int(z.rows()); ++t) {
      const T m = z.row(t).maxCoeff();  // before steering
      const T scale = st.form == 3 ? T(st.c) : m * T(st.c);
      for (int e = 0; e < E; ++e) {
        if (st.form == 5 && v[e] != 0.f) z(t, e) = 0;
        z(t, e) += scale * T(v[e]);
      }
    }
  }
  const std::vector<char> is_masked = masked_experts(spec, l, E);
  std::vector<const ExpertBoost*> boosts;
  for (const auto& b : spec.boost)
    if (b.layer == l && b.expert < E) boosts.push_back(&b);
  if (!boosts.empty()) {
    if (spec.boost_mode == BoostMode::Add) {
      for (const auto* b : boosts) z.col(b->expert).array() += T(b->c);
    } else {
      for (int t = 0; t < int(z.rows()); ++t) {
        for (const auto* b : boosts) z(t, b->expert) = 0;
        T m = -std::numeric_limits<T>::infinity();
        for (int e = 0; e < E; ++e)
          if (!is_masked[size_t(e)]) m = std::max(m, z(t, e));
        for (const auto* b : boosts) z(t, b->expert) += T(b->c) * m;
      }
    }
  }
  for (int e = 0; e < E; ++e)
    if (is_masked[size_t(e)]) z.col(e).setConstant(-std::numeric_limits<T>::infinity());
}

}  // namespace

std::vector<char> masked_experts(const InterventionSpec& spec, int l, int n_experts) {
  std::vector<char> is_masked(size_t(n_experts), 0);
  for (const auto& m : spec.mask)
    if (m.layer == l && m.expert < n_experts) is_masked[size_t(m.expert)] = 1;
  return is_masked;
}

void apply_interventions(const InterventionSpec& spec, int l, Eigen::Ref<MatR> z) { apply_rows(spec, l, z); }
void apply_interventions(const InterventionSpec& spec, int l, Eigen::Ref<MatRD> z) { apply_rows(spec, l, z); }

std::set<int> intervention_layers(const InterventionSpec& spec) {
  std::set<int> layers;
  for (const auto& m : spec.mask) layers.insert(m.layer);
  for (const auto& b : spec.boost) layers.insert(b.layer);
  for (int l : spec.steer.layers) layers.insert(l);
  return layers;
}

void install_interventions(const InterventionSpec& spec, const ModelConfig& cfg, Hooks& hooks) {
  const std::shared_ptr<const RouterEdit> edit = router_edit(spec, cfg);  // validates
  for (int l : intervention_layers(spec))
    hooks.add(hook_names::router_logits(l),
              [edit, l](Eigen::Ref<MatR> z, const HookContext&) { edit->apply(l, z); });
}

namespace {
// "1:3,2:0" and "1:2=4,0:1=-1": the flags' own syntax.
std::string mask_list(const InterventionSpec& spec) {
  std::ostringstream o;
  for (size_t i = 0; i < spec.mask.size(); ++i) o << (i ? "," : "") << spec.mask[i].layer << ":" << spec.mask[i].expert;
  return o.str();
}
std::string boost_list(const InterventionSpec& spec) {
  std::ostringstream o;
  for (size_t i = 0; i < spec.boost.size(); ++i)
    o << (i ? "," : "") << spec.boost[i].layer << ":" << spec.boost[i].expert << "=" << spec.boost[i].c;
  return o.str();
}
const char* mode_name(BoostMode m) { return m == BoostMode::Add ? "add" : "norm"; }
}  // namespace

nlohmann::json intervention_settings(const InterventionSpec& spec) {
  nlohmann::json j = nlohmann::json::object();
  if (!spec.mask.empty()) j["mask"] = mask_list(spec);
  if (!spec.boost.empty()) {
    j["boost"] = boost_list(spec);
    j["boost_mode"] = mode_name(spec.boost_mode);
  }
  const Steering& st = spec.steer;
  if (!st.empty())
    j["steer"] = {{"file", st.source},
                  {"coef", st.c},
                  {"form", st.form},
                  {"threshold", st.threshold >= 0 ? nlohmann::json(st.threshold) : nlohmann::json(nullptr)},
                  {"layers", st.layers}};
  return j;
}

std::string describe(const InterventionSpec& spec) {
  std::ostringstream o;
  if (!spec.mask.empty()) o << "mask " << mask_list(spec);
  if (!spec.boost.empty()) o << (spec.mask.empty() ? "" : "; ") << "boost(" << mode_name(spec.boost_mode) << ") "
                             << boost_list(spec);
  if (!spec.steer.empty()) {
    if (!spec.mask.empty() || !spec.boost.empty()) o << "; ";
    o << "steer(form " << spec.steer.form << ", c=" << spec.steer.c << ") " << spec.steer.source;
  }
  return o.str();
}

}  // namespace moedit
