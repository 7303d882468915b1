// Saving an edited or trained model as a normal Hugging Face checkpoint.
//
// The output folder is a copy of the source checkpoint folder (config.json, tokenizer files, index, every other
// top-level file) in which the changed parameters — edited experts' down-projections (save_edited_checkpoint), or any
// trained parameter of model/weight_grads.h: routers, shared-expert gates, expert/shared/dense gate, up and down
// (save_trained_checkpoint) — hold the model's current weights, converted back
// to each tensor's stored dtype (F32/F16/BF16, round-to-nearest-even) and layout (per-expert 2-D tensors or packed
// [E, H, I] tensors: only expert e's slice changes). Tensor names, dtypes, shapes and sharding are the source's;
// shards without an edited tensor are copied byte for byte. Everything is written into a temporary sibling folder
// that is renamed into place at the end, so a failed save leaves nothing half-written; the source folder is never
// written to (the output may not be the source).
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "io/safetensors.h"
#include "model/model.h"
#include "model/weight_grads.h"

namespace moedit {

// Where an expert's down projection lives in a checkpoint: tensor name, and the slice of a packed [E, H, I]
// tensor (−1: a whole [H, I] tensor). A shared expert id (editor/keystats.h: kSharedExpert − j) gives the shared
// block's one down_proj tensor [H, n·I]: saving writes that tensor whole (all its shared experts' slices).
struct DownProjLocation {
  std::string tensor;
  int slice = -1;
};
DownProjLocation locate_down_proj(const ModelConfig& c, const TensorStore& store, int layer, int expert);

// Where a trainable parameter lives in a checkpoint: its tensor, and the parameter's elements in it,
// [offset, offset + count) of the tensor's row-major data (a slice of a packed [E, 2I, H] gate‖up or [E, H, I] down
// tensor, else the whole tensor). InputError when the checkpoint has no such tensor or its shape is not the model's.
struct ParamLocation {
  std::string tensor;
  int64_t offset = 0, count = 0;
};
ParamLocation locate_param(const Model& m, const TensorStore& store, const ParamId& p);

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

// InputError unless out_dir may receive a save of source_dir (not the source, not inside it, not an existing file or
// non-empty folder unless opt.overwrite): what the save functions check first, for a command to check before it works.
void check_save_folder(const std::string& source_dir, const std::string& out_dir, const SaveOptions& opt = {});
// The same for a delta file (not inside the source folder, not a folder).
void check_save_file(const std::string& source_dir, const std::string& out_file);

// edited: the (layer, expert) pairs whose down projections changed (editor/rome.h: edited_experts()).
SaveReport save_edited_checkpoint(const Model& m, const std::string& source_dir, const std::string& out_dir,
                                  const std::vector<std::pair<int, int>>& edited, const SaveOptions& opt = {});

// The same for trained parameters (model/weight_grads.h; duplicates ignored). One code path with
// save_edited_checkpoint (which saves ParamId{Down, l, e}).
SaveReport save_trained_checkpoint(const Model& m, const std::string& source_dir, const std::string& out_dir,
                                   const std::vector<ParamId>& params, const SaveOptions& opt = {});
// Only the tensors holding the parameters, whole (a packed tensor with every other expert's slice as in the source),
// under their checkpoint names and dtypes (F32 with opt.f32), as one safetensors file written atomically. The file
// may not lie inside the source folder.
SaveReport save_param_delta(const Model& m, const std::string& source_dir, const std::string& out_file,
                            const std::vector<ParamId>& params, const SaveOptions& opt = {});
// Rounds the parameters' in-memory values to their stored dtype (what a save → reload gives).
std::vector<std::string> round_params_to_checkpoint_dtype(Model& m, const std::string& source_dir,
                                                          const std::vector<ParamId>& params);

// Rounds the in-memory weights of the edited experts to their stored dtype (what a save → reload gives), so that
// the in-memory model and a reloaded checkpoint compute identical logits. Returns the dtypes met ("F32" needs no
// rounding).
std::vector<std::string> round_to_checkpoint_dtype(Model& m, const std::string& source_dir,
                                                   const std::vector<std::pair<int, int>>& edited);

}  // namespace moedit
