// Named hook points (TransformerLens style), created where the tensor is created in the forward pass.
//
//   hook_embed                               [N, H]  token embeddings (before any embedding multiplier)
//   blocks.{l}.hook_resid_pre                [N, H]  residual stream entering layer l
//   blocks.{l}.hook_attn_out                 [N, H]  attention output (after o_proj, before the residual add)
//   blocks.{l}.moe.hook_router_logits        [N, E]  raw router logits (replace/add here to mask or steer)
//   blocks.{l}.moe.hook_expert_ids           [N, k]  selected experts, top-k order (as floats; capture only)
//   blocks.{l}.moe.hook_expert_weights       [N, k]  their routing weights
//   blocks.{l}.moe.experts.{e}.hook_key      [n_e, I] input of expert e's down_proj (the ROME key), rows = tokens
//                                                     routed to e
//   blocks.{l}.moe.experts.{e}.hook_out      [n_e, H] expert e's weighted contribution w_e·E_e(x)
//   blocks.{l}.moe.shared_experts.{j}.hook_out [N, H] shared expert j's contribution g·W_down[:, slice_j]·k[slice_j]
//                                                     (ModelConfig::shared_slice; gate included). Computed only when
//                                                     a hook is registered under the name; a change made here is
//                                                     added to the shared output (capturing leaves it bit-identical)
//   blocks.{l}.moe.hook_shared_out           [N, H]  shared-expert contribution (gate included; all shared experts)
//   blocks.{l}.hook_moe_out                  [N, H]  whole FFN/MoE output (shared part included; dense layers too)
//   blocks.{l}.hook_resid_post               [N, H]  residual stream leaving layer l
//   hook_final_norm                          [N, H]  after the final RMSNorm
//
// N counts the tokens of the whole (packed, unpadded) batch in this call; HookContext maps each activation row to
// its sequence (batch row) and absolute position. A hook may read the activation or modify it in place. A run
// with no hooks pays nothing: the forward pass checks `empty()` before formatting a single name.
#pragma once
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "kernels/ops.h"

namespace moedit {

// Where each of the N tokens of a forward call sits.
struct TokenLayout {
  std::vector<int> seq;  // [N] batch row of token i
  std::vector<int> pos;  // [N] absolute position of token i (cache offset included)
  int n_seqs = 0;
  int index_of(int row, int position) const;  // -1 if absent from this call
};

struct HookContext {
  const std::string& name;
  int layer;    // -1 outside blocks
  int expert;   // -1 unless an expert hook
  const TokenLayout& layout;
  const std::vector<int>* tokens;  // activation row r is token (*tokens)[r]; nullptr: row r is token r
  int token(int r) const { return tokens ? (*tokens)[size_t(r)] : r; }
};

using HookFn = std::function<void(Eigen::Ref<MatR> act, const HookContext& ctx)>;

// A (row, position) site; position < 0 counts from the end of the sequence as seen in this call.
struct Site {
  int row = 0;
  int pos = 0;
};

class Hooks {
 public:
  bool empty() const { return fns_.empty() && readers_.empty(); }
  void add(const std::string& name, HookFn fn) { fns_[name].push_back(std::move(fn)); }
  void clear() {
    fns_.clear();
    readers_.clear();
  }
  bool has(const std::string& name) const { return fns_.count(name) != 0; }
  // Runs the hooks registered under `name` (if any).
  void run(const std::string& name, Eigen::Ref<MatR> act, const HookContext& ctx) const;

  // Readers see an activation where it is — the model backend's memory, device memory on a GPU — read only, with no
  // host copy: fn(rows, n, cols, ld) for rows [n, cols], ld floats apart, before any hook of the same name. Called
  // at expert_key (the routed rows) and shared_key; key statistics accumulate there with Backend::gram.
  using ReadFn = std::function<void(const float* rows, int n, int cols, size_t ld)>;
  void add_reader(const std::string& name, ReadFn fn) { readers_[name].push_back(std::move(fn)); }
  bool has_reader(const std::string& name) const { return readers_.count(name) != 0; }
  void read(const std::string& name, const float* rows, int n, int cols, size_t ld) const;

  // Conveniences built on add():
  // Records every call's activation, keyed by name (expert hooks store only their routed rows; see rows()).
  struct Capture {
    MatR value;
    std::vector<int> tokens;  // token index of each row
  };
  std::shared_ptr<Capture> capture(const std::string& name);
  // Overwrites the activation at the given sites with `value` (one row vector, broadcast).
  void replace(const std::string& name, std::vector<Site> sites, VecF value);
  // Adds `delta` at the given sites.
  void add_delta(const std::string& name, std::vector<Site> sites, VecF delta);

 private:
  std::unordered_map<std::string, std::vector<HookFn>> fns_;
  std::unordered_map<std::string, std::vector<ReadFn>> readers_;
};

// Names: keep every formatting of a hook name in one place.
namespace hook_names {
std::string resid_pre(int l);
std::string attn_out(int l);
std::string moe_out(int l);
std::string resid_post(int l);
std::string ffn_in(int l);      // the FFN/MoE block's input: post-attention RMSNorm output [N, H]
std::string shared_key(int l);  // the shared expert(s)' key: input of the shared down_proj [N, shared width]
std::string router_logits(int l);
std::string expert_ids(int l);
std::string expert_weights(int l);
std::string shared_out(int l);
std::string shared_expert_out(int l, int j);
std::string expert_out(int l, int e);
std::string expert_key(int l, int e);
inline const char* embed() { return "hook_embed"; }
inline const char* final_norm() { return "hook_final_norm"; }
}  // namespace hook_names

}  // namespace moedit
