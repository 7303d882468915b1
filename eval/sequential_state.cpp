// Save and load of a sequential run's state (see eval/sequential_state.h).
#include "eval/sequential_state.h"

#include <cstring>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "editor/keystats.h"
#include "editor/rome.h"
#include "io/errors.h"
#include "io/safetensors.h"

namespace moedit::eval {

namespace fs = std::filesystem;

namespace {

std::string key_name(const char* what, const std::pair<int, int>& le) {
  return std::string(what) + "." + std::to_string(le.first) + "." + std::to_string(le.second);
}

// "down.3.-1" → {3, -1}; false when the name is not WHAT.L.E.
bool parse_name(const std::string& name, const std::string& what, std::pair<int, int>& le) {
  if (name.rfind(what + ".", 0) != 0) return false;
  const std::string rest = name.substr(what.size() + 1);
  const size_t dot = rest.find('.');
  if (dot == std::string::npos) return false;
  try {
    size_t a = 0, b = 0;
    le.first = std::stoi(rest.substr(0, dot), &a);
    le.second = std::stoi(rest.substr(dot + 1), &b);
    return a == dot && b == rest.size() - dot - 1;
  } catch (const std::exception&) {
    return false;
  }
}

}  // namespace

std::string sequential_state_path(const std::string& out_dir) { return out_dir + "/sequential/state.safetensors"; }

void save_sequential_state(const std::string& out_dir, Model& m, const std::set<std::pair<int, int>>& touched,
                           size_t edits, size_t records, double seconds, const std::vector<std::string>& templates,
                           const KeyCache& keys) {
  std::map<std::string, OwnedTensor> t;
  for (const auto& le : touched) {
    const MatR cur = expert_down(m, le.first, le.second);  // [H, I], contiguous
    t[key_name("down", le)] = make_f32_tensor({cur.rows(), cur.cols()}, cur.data());
  }
  for (const auto& [le, kk] : keys) {  // [I, I] fp64, bytes as they are
    OwnedTensor o;
    o.dtype = DType::F64;
    o.shape = {kk.rows(), kk.cols()};
    o.bytes.resize(size_t(kk.size()) * sizeof(double));
    std::memcpy(o.bytes.data(), kk.data(), o.bytes.size());
    t[key_name("keys", le)] = std::move(o);
  }
  const nlohmann::json meta = {{"edits", edits}, {"records", records}, {"seconds", seconds}, {"templates", templates}};
  write_safetensors(sequential_state_path(out_dir), t, {{"moedit_sequential_state", meta.dump()}});
}

std::optional<SequentialState> load_sequential_state(const std::string& out_dir) {
  const std::string path = sequential_state_path(out_dir);
  if (!fs::exists(path)) return std::nullopt;
  const SafeTensorsFile f(path);
  const auto it = f.metadata().find("moedit_sequential_state");
  require_input(it != f.metadata().end(), path + ": no 'moedit_sequential_state' metadata (not a sequential state)");
  SequentialState s;
  try {
    const nlohmann::json meta = nlohmann::json::parse(it->second);
    s.edits = meta.at("edits").get<size_t>();
    s.records = meta.at("records").get<size_t>();
    s.seconds = meta.at("seconds").get<double>();
    s.templates = meta.at("templates").get<std::vector<std::string>>();
  } catch (const std::exception& e) {
    throw InputError(path + ": malformed 'moedit_sequential_state' metadata: " + e.what());
  }
  for (const auto& [name, v] : f.tensors()) {
    std::pair<int, int> le;
    if (parse_name(name, "down", le)) {
      require_input(v.dtype == DType::F32 && v.shape.size() == 2,
                    path + ": tensor '" + name + "': expected F32 [H, I]");
      s.down[le] = {v.shape, v.to_f32()};
    } else if (parse_name(name, "keys", le)) {
      require_input(v.dtype == DType::F64 && v.shape.size() == 2 && v.shape[0] == v.shape[1],
                    path + ": tensor '" + name + "': expected F64 [I, I]");
      MatD kk(v.shape[0], v.shape[1]);
      std::memcpy(kk.data(), v.data, size_t(kk.size()) * sizeof(double));
      s.keys[le] = std::move(kk);
    } else {
      throw InputError(path + ": unexpected tensor '" + name + "'");
    }
  }
  return s;
}

std::map<std::pair<int, int>, std::vector<float>> apply_sequential_state(Model& m, const SequentialState& s,
                                                                          const std::string& path) {
  for (const auto& [le, t] : s.down) {  // every matrix checked before any is written
    const std::string name = key_name("down", le);
    const bool exists = le.first >= 0 && le.first < m.config().n_layers &&
                        (is_shared_expert(le.second)
                             ? shared_index(le.second) < shared_expert_count(m, le.first)
                             : le.second < int(m.weights().layers[size_t(le.first)].ffn.experts.down.size()));
    require_input(exists, path + ": tensor '" + name + "': the model has no such expert");
    const DownMap dn = expert_down(m, le.first, le.second);
    require_input(t.shape[0] == dn.rows() && t.shape[1] == dn.cols(),
                  path + ": tensor '" + name + "': shape does not match the model's down-projection");
  }
  std::map<std::pair<int, int>, std::vector<float>> clean;
  for (const auto& [le, t] : s.down) {
    const MatR before = expert_down(m, le.first, le.second);
    clean[le].assign(before.data(), before.data() + before.size());
    set_expert_down(m, le.first, le.second, t.values);
  }
  return clean;
}

}  // namespace moedit::eval
