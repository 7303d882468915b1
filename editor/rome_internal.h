// Internals of the ROME editor (not a public header): the helpers that more than one of editor/rome*.cpp use.
#pragma once
#include <string>
#include <vector>

#include "editor/rome.h"
#include "io/errors.h"

namespace moedit::rome_detail {

inline void check_layer(const ModelConfig& c, int layer) {
  require_input(layer >= 0 && layer < c.n_layers, "layer " + std::to_string(layer) + " is out of range [0, " +
                                                      std::to_string(c.n_layers) + ")");
  require_input(c.is_moe(layer), "layer " + std::to_string(layer) +
                                     " is a dense layer (no experts to edit); choose an MoE layer");
}

inline std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  const auto e = s.find_last_not_of(" \t\r\n");
  return s.substr(b, e - b + 1);
}

// Offsets of a packed batch: row of (sequence s, position p) = off[s] + p.
inline std::vector<int> offsets(const std::vector<std::vector<int32_t>>& seqs) {
  std::vector<int> off(seqs.size());
  int o = 0;
  for (size_t s = 0; s < seqs.size(); ++s) {
    off[s] = o;
    o += int(seqs[s].size());
  }
  return off;
}

// The text as a continuation of a prompt: a leading space added unless it starts with one.
inline std::string with_space(const std::string& t) { return (!t.empty() && t[0] == ' ') ? t : " " + t; }

}  // namespace moedit::rome_detail
