// The model: weights in their checkpoint dtype (model/weights.h) for every supported family and one forward pass
// that serves them all.
//
// Batches are packed: sequences of different lengths are laid end to end (no padding); attention runs per
// sequence. A KVCache lets a later call continue every sequence (incremental decoding).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "kernels/ops.h"
#include "model/config.h"
#include "model/hooks.h"
#include "model/router_edit.h"
#include "model/weights.h"

namespace moedit {

// Per-layer, per-sequence K/V history (after norms and RoPE), contiguous: layer l holds one buffer
// [n_seqs, capacity, width] for K and one for V, so a sequence's cached rows are one strided block the attention
// reads in place. Capacity grows geometrically when a sequence outgrows it (or is set up front with reserve()).
class KVCache {
 public:
  KVCache() = default;
  int length(int seq) const { return seq < int(len_.size()) ? len_[size_t(seq)] : 0; }
  int n_seqs() const { return int(len_.size()); }
  int capacity() const { return cap_; }  // tokens per sequence before the next growth
  void clear() { *this = KVCache(); }
  // Room for n_seqs sequences of `tokens` tokens each in every layer (K rows kw floats wide, V rows vw), so that
  // decoding up to that length allocates nothing. The model sets the widths on first use otherwise. The rows live in
  // the memory of `be` (the model's backend: a cache belongs to one backend).
  void reserve(int n_layers, int n_seqs, int tokens, int kw, int vw, const Backend& be = cpu_backend());
  // A new cache whose sequence i copies the first lengths[i] tokens of this cache's sequence from[i] (continuing
  // many copies of one cached prefix: causal tracing). Only layers >= first_layer are copied; the others are left
  // empty, so the result may only run blocks >= first_layer. capacity: tokens per sequence to make room for.
  KVCache gather(const std::vector<int>& from, const std::vector<int>& lengths, int first_layer = 0,
                 int capacity = 0) const;

  // For the block that reads and appends: whether layer l is held, the K/V row of sequence s at position pos (rows
  // of one sequence are consecutive, kw / vw floats wide), and room for `tokens` tokens in every sequence (keeps
  // every row, grows capacity at least 2×).
  bool holds_layer(int l) const { return l < int(layers_.size()) && layers_[size_t(l)].k.bytes(); }
  float* k_row(int l, int s, int pos) const {
    return layers_[size_t(l)].k.as<float>() + (size_t(s) * cap_ + size_t(pos)) * kw_;
  }
  float* v_row(int l, int s, int pos) const {
    return layers_[size_t(l)].v.as<float>() + (size_t(s) * cap_ + size_t(pos)) * vw_;
  }
  const Backend* backend() const { return be_; }
  void grow(int n_seqs, int tokens);

 private:
  friend class Model;
  struct Layer {
    Buf k, v;  // [n_seqs, cap, kw], [n_seqs, cap, vw]; empty: a layer this cache may not run
  };
  // A sequence's K or V block of every layer, grown to n_new sequences of cap_new rows (rows kept).
  Buf relayout(const Buf& b, int w, int n_new, int cap_new) const;
  std::vector<Layer> layers_;
  const Backend* be_ = nullptr;
  std::vector<int> len_;
  int cap_ = 0, kw_ = 0, vw_ = 0;
};

struct ForwardOptions {
  const Hooks* hooks = nullptr;
  KVCache* cache = nullptr;      // continue the cached sequences (row b of the batch continues cached seq b)
  bool logits_all = true;        // false: only each sequence's last token → logits [n_seqs, V]
  int stop_after_layer = -1;     // ≥ 0: run blocks 0..stop_after_layer only (no final norm, no logits)
  bool record_routing = true;
};

// Router choices for one layer: top-k order (descending weight); empty for dense layers.
struct LayerRouting {
  Eigen::Matrix<int, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> ids;  // [N, k]
  MatR weights;                                                            // [N, k]
};

struct ForwardOutput {
  TokenLayout layout;
  MatR logits;                       // [N, V], or [n_seqs, V] without logits_all; empty with stop_after_layer
  MatR hidden;                       // residual stream after the last block run [N, H]
  std::vector<LayerRouting> routing; // [n_layers]
};

// MLA's q_a_layernorm / kv_a_layernorm are built without the config's eps (DeepSeek's code): 1e-6.
constexpr float kMlaLatentEps = 1e-6f;

// How a checkpoint is loaded and paged.
struct LoadOptions {
  // DeepSeek-V2 configs with norm_topk_prob: true. DeepSeek's remote code (moedit's default) renormalises the top-k
  // weights instead of scaling them by routed_scaling_factor; transformers' native DeepseekV2 ignores the flag and
  // always scales. Published V2 checkpoints say false, where both agree.
  bool deepseek_v2_transformers_norm = false;
  bool mlock = false;     // lock the mapped weights in RAM at load (they are read in now, never paged out)
  bool prefetch = false;  // while block l runs, ask the kernel to read block l+1's weights (models larger than RAM)
};

class Model {
 public:
  // Loads config.json and the safetensors weights of a checkpoint folder.
  static std::shared_ptr<Model> load(const std::string& path, const LoadOptions& opt = {});
  Model(ModelConfig cfg, Weights w);
  // Drops the device copies of this model's host data from every device backend it ran on: they are keyed by host
  // address, and a model loaded later may get the same addresses (a reused mapping or allocation).
  ~Model();
  Model(const Model&) = default;  // a copy shares mapped weights: its end only makes the original upload them again
  Model& operator=(const Model&) = default;

  const ModelConfig& config() const { return cfg_; }
  const Weights& weights() const { return w_; }
  Weights& mutable_weights() { return w_; }
  const std::string& path() const { return path_; }
  // RoPE inverse frequencies [head_dim/2] (theta, linear or yarn scaling applied), as the forward uses them.
  const std::vector<float>& inv_freq() const { return inv_freq_; }
  // The config's router as kernel data (model/router.h), computed once.
  const ops::RouteSpec& route_spec() const { return route_; }
  // The backend every op runs on (default: the CPU backend); it must outlive the model.
  const Backend& backend() const { return *be_; }
  // The backend of the helpers below that take host matrices: the model's where its memory is the host's, else the
  // CPU backend.
  const Backend& host_backend() const { return be_->host_memory() ? *be_ : cpu_backend(); }
  void set_backend(const Backend& b);
  // Drops the copies of host data at `host` from every device backend this model was set to: call it before data
  // the forward reads is written in place (an edit), or before its memory is freed, so no device runs on the old
  // bytes (copies are keyed by host address).
  void forget_device_copies(const void* host) const;
  // A standing router edit that every forward applies, the taped gradient stack included (model/router_edit.h);
  // null: none. Set it before the runs it should steer (it is read, never copied, by each forward).
  void set_router_edit(std::shared_ptr<const RouterEdit> e) { router_edit_ = std::move(e); }
  const RouterEdit* router_edit() const { return router_edit_.get(); }

  // Runs the sequences (token ids) as one packed batch.
  ForwardOutput forward(const std::vector<std::vector<int32_t>>& seqs, const ForwardOptions& opt = {}) const;

  // The pieces, for callers that cache and resume (tracing, editing): all act on packed activations.
  MatR embed(const std::vector<int32_t>& flat_ids, const TokenLayout& layout, const Hooks* hooks) const;
  void block(int l, MatR& x, const TokenLayout& layout, KVCache* cache, const Hooks* hooks,
             LayerRouting* routing) const;
  MatR logits(const MatR& x, const TokenLayout& layout, const Hooks* hooks) const;  // final norm + lm_head

  // The FFN / MoE block alone on normalised input a [N, H]; returns its output [N, H].
  MatR ffn(int l, const MatR& a, const TokenLayout& layout, const Hooks* hooks, LayerRouting* routing) const;
  // Reference MoE: the per-token loop (tests only; no hooks).
  MatR ffn_reference(int l, const MatR& a) const;

  // Routing for router logits z [N, E]: ids/weights [N, k] in top-k order; layer ≥ 0 applies that layer's
  // selection bias (DeepSeek-V3).
  void route(const MatR& z, LayerRouting& r, int layer = -1) const;

 private:
  // y [n, W.rows()] = x [n, in]·Wᵀ (+ b); y [N, H] = rmsnorm(x) with weight w; expert e of a bank (key, whole).
  void linear(const float* x, int n, int in, const Weight& W, float* y, const VecF& b = VecF()) const;
  void rmsnorm(const MatR& x, const VecF& w, MatR& y) const;
  void expert_key(const ExpertBank& b, int e, const MatR& x, MatR& key) const;
  MatR swiglu(const ExpertBank& b, int e, const MatR& x) const;

  ModelConfig cfg_;
  Weights w_;
  bool prefetch_ = false;
  std::string path_;
  std::vector<float> inv_freq_;
  ops::RouteSpec route_;
  const Backend* be_ = &cpu_backend();
  std::vector<const Backend*> devices_;  // the device backends set so far (their resident copies of our data)
  std::shared_ptr<const RouterEdit> router_edit_;
};

// The attention geometry of a config: GQA/MHA (Hq, Hkv, head_dim, head_dim, window) or MLA (Hq, Hq, qk_dim,
// v_head_dim, no window).
ops::AttnShape attn_shape(const ModelConfig& c);

// Builds the packed layout for a batch; with a cache, positions continue from each sequence's cached length.
TokenLayout make_layout(const std::vector<std::vector<int32_t>>& seqs, const KVCache* cache);
// The same from lengths: sequence s has lengths[s] tokens at positions first_pos[s], first_pos[s] + 1, ...
TokenLayout layout_from_lengths(const std::vector<int>& lengths, const std::vector<int>& first_pos);

}  // namespace moedit
