// A sequential run's state after N edits (issue 18: sequential runs resume like the others). Written next to every
// curve point as OUT/sequential/state.safetensors: the down-projections the edits so far changed (fp32, [H, I] each,
// "down.L.E"), AlphaEdit's key cache (fp64 Σ K Kᵀ [I, I] per expert, "keys.L.E") and, in the header's metadata, the
// number of edits, their wall seconds and the context templates sampled on the clean model. `eval --resume` on a
// sequential run loads the last state, writes it into the clean model and goes on from edit N: the remaining edits,
// cases and curve points are bit-identical to an uninterrupted run's.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "editor/memit.h"
#include "model/model.h"

namespace moedit::eval {

struct SequentialState {
  struct Down {
    std::vector<int64_t> shape;  // [H, I] as stored
    std::vector<float> values;   // row-major
  };
  size_t edits = 0;
  size_t records = 0;                                         // of the run (its curve's neighbourhood drift covers all)
  double seconds = 0;                                         // wall time of those edits
  std::vector<std::string> templates;                         // sampled once, on the clean model
  std::map<std::pair<int, int>, Down> down;                   // (layer, expert) → its down-projection
  KeyCache keys;                                              // alphaedit: the batches' Σ K Kᵀ
};

// The state file of a run directory.
std::string sequential_state_path(const std::string& out_dir);
// Writes the state (atomically) with the current values of the `touched` experts' down-projections.
void save_sequential_state(const std::string& out_dir, Model& m, const std::set<std::pair<int, int>>& touched,
                           size_t edits, size_t records, double seconds, const std::vector<std::string>& templates,
                           const KeyCache& keys);
// The state of a run directory, or nullopt when it has none; InputError naming the file when it is malformed.
std::optional<SequentialState> load_sequential_state(const std::string& out_dir);
// Writes the state's matrices into the model after checking that every one fits it (InputError naming `path` and
// the tensor otherwise, nothing written); returns the values they replaced (clean: what a revert restores).
std::map<std::pair<int, int>, std::vector<float>> apply_sequential_state(Model& m, const SequentialState& s,
                                                                          const std::string& path);

}  // namespace moedit::eval
