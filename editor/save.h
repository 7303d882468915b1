// Saving an edited model as a normal Hugging Face checkpoint.
//
// The output folder is a copy of the source checkpoint folder (config.json, tokenizer files, index, every other
// top-level file) in which the edited experts' down-projections hold the model's current weights, converted back
// to each tensor's stored dtype (F32/F16/BF16, round-to-nearest-even) and layout (per-expert 2-D tensors or packed
// [E, H, I] tensors: only expert e's slice changes). Tensor names, dtypes, shapes and sharding are the source's;
// shards without an edited tensor are copied byte for byte. Everything is written into a temporary sibling folder
// that is renamed into place at the end, so a failed save leaves nothing half-written; the source folder is never
// written to (the output may not be the source).
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "model/model.h"
#include "io/safetensors.h"

namespace moedit {

// Where an expert's down projection lives in a checkpoint: tensor name, and the slice of a packed [E, H, I]
// tensor (−1: a whole [H, I] tensor). A shared expert id (editor/keystats.h: kSharedExpert − j) gives the shared
// block's one down_proj tensor [H, n·I]: saving writes that tensor whole (all its shared experts' slices).
struct DownProjLocation {
  std::string tensor;
  int slice = -1;
};
DownProjLocation locate_down_proj(const ModelConfig& c, const TensorStore& store, int layer, int expert);

struct SaveOptions {
  bool overwrite = false;  // replace an existing non-empty output folder
  bool f32 = false;        // write the edited tensors as F32 (whole tensors, packed ones too): no rounding of ΔW
};

// One written edited tensor: its dtype in the file, max |ΔW| over the edited experts (W − the source's W) and the
// rounding of ΔW by the stored dtype, max |ΔW_written − ΔW| (0 for F32).
struct SavedTensor {
  std::string name, dtype;
  double max_delta = 0, max_rounding = 0;
};
struct SaveReport {
  std::vector<SavedTensor> tensors;
  double rounding_ratio() const;  // max |ΔW_written − ΔW| / max |ΔW| over every edited tensor
};

// edited: the (layer, expert) pairs whose down projections changed (editor/rome.h: edited_experts()).
SaveReport save_edited_checkpoint(const Model& m, const std::string& source_dir, const std::string& out_dir,
                                  const std::vector<std::pair<int, int>>& edited, const SaveOptions& opt = {});

// Rounds the in-memory weights of the edited experts to their stored dtype (what a save → reload gives), so that
// the in-memory model and a reloaded checkpoint compute identical logits. Returns the dtypes met ("F32" needs no
// rounding).
std::vector<std::string> round_to_checkpoint_dtype(Model& m, const std::string& source_dir,
                                                   const std::vector<std::pair<int, int>>& edited);

}  // namespace moedit
