// Internals of the ROME editor (not a public header): the helpers that more than one of editor/rome*.cpp use.
#pragma once
#include <Eigen/Core>
#include <string>
#include <utility>
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

// ---- expert edits shared by ROME (rome.cpp) and the batch editors (memit*.cpp); defined in rome.cpp ------------------

// [begin, end) of shared expert `expert` (an id ≤ kSharedExpert) in the shared block's intermediate dimension.
std::pair<int, int> shared_columns(const Model& m, int layer, int expert);
// The shared expert's gate g(x) = σ(x·w_g) at one FFN input row (1 when the family has no shared gate).
double shared_gate(const FFNWeights& f, const Eigen::Ref<const Eigen::RowVectorXf>& x);
// The keys of an expert id at `layer` for FFN input rows x [n, H] → [n, I] (shared expert j: its columns of the
// shared keys).
MatR target_keys(const Model& m, int layer, int expert, const MatR& x);

// A target expert of an edit and its share of the residual (r_e = share·δ), as rome.h step 2 defines it.
struct TargetShare {
  int expert;
  double weight;  // routing weight (or shared gate) at the token
  double share;
};
// The targets at one token of `layer` from its top-k (routed ids/weights, top-k order) and FFN input row x.
// InputError for an L:E target not routed there, a missing shared expert or a zero routing weight.
std::vector<TargetShare> target_shares(const Model& m, int layer, const EditTarget& t, const std::vector<int>& routed,
                                       const std::vector<float>& weights,
                                       const Eigen::Ref<const Eigen::RowVectorXf>& x);

// C = E[k kᵀ] [I, I] of an expert id from opt.moments (+ ridge·mean(diag C)·I), fp64; *count: tokens behind it.
// InputError when the statistics are missing or the wrong size.
Eigen::MatrixXd moment_matrix(const EditOptions& opt, int layer, int expert, int I, int n_shared, int64_t* count);

// The down-projection an update changes (copy-on-write), its current value first saved into *original [H, I].
DownMap save_down(Model& m, int layer, int expert, std::vector<float>* original);
// Puts `original` back and drops the copy when the matrix equals the checkpoint again (no-op for an empty original).
void restore_down(Model& m, int layer, int expert, const std::vector<float>& original);

}  // namespace moedit::rome_detail
