// The model: canonical fp32 weights for every supported family and one forward pass that serves them all.
//
// Canonical layout (whatever the checkpoint's): Linear weights row-major [out, in]; experts stacked, gate‖up
// [E, 2I, H] (rows 0..I-1 gate, I..2I-1 up) and down [E, H, I]. A dense MLP is an ExpertBank with E = 1, so one
// SwiGLU path serves routed experts, shared experts and dense layers.
//
// Batches are packed: sequences of different lengths are laid end to end (no padding); attention runs per
// sequence. A KVCache lets a later call continue every sequence (incremental decoding).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/ops.h"
#include "model/config.h"
#include "model/hooks.h"

namespace moedit {

class TensorStore;

struct ExpertBank {
  int E = 0, I = 0, H = 0;
  std::vector<float> gate_up;  // [E, 2I, H]
  std::vector<float> down;     // [E, H, I]
  const float* gate_up_of(int e) const { return gate_up.data() + size_t(e) * 2 * I * H; }
  float* down_of(int e) { return down.data() + size_t(e) * H * I; }
  const float* down_of(int e) const { return down.data() + size_t(e) * H * I; }
  void resize(int e, int i, int h);
};

struct AttnWeights {
  MatR wq, wk, wv, wo;     // [Hq·D, H], [Hkv·D, H] ×2, [H, Hq·D]  (MLA: wq [Hq·dq, H] or empty, wo [H, Hq·dv])
  VecF bq, bk, bv, bo;     // empty when absent
  VecF q_norm, k_norm;     // per-head [D] or whole-projection [Hq·D]/[Hkv·D]; empty when absent
  // MLA (dq = qk_nope + qk_rope, dr = qk_rope). Rotary rows (each head's last dr rows of wq / wq_b, the last dr rows
  // of wkv_a) are stored de-interleaved when rope_interleave is set ([x0,x2,…,x1,x3,…]), so rotate-half RoPE
  // applies; q·k is unchanged because q and k are permuted alike.
  MatR wq_a, wq_b;         // [q_lora, H], [Hq·dq, q_lora] (q_lora_rank > 0)
  VecF q_a_norm;           // [q_lora]
  MatR wkv_a;              // [kv_lora + dr, H]
  VecF bq_a, bkv_a;        // attention_bias: [q_lora], [kv_lora + dr]; empty when absent
  VecF kv_a_norm;          // [kv_lora]
  MatR wkv_b;              // [Hq·(dn + dv), kv_lora]
};

struct FFNWeights {
  bool moe = false;
  MatR router;             // [E, H] (MoE layers)
  VecF router_bias;        // [E] selection-only bias (DeepSeek-V3 e_score_correction_bias), empty otherwise
  ExpertBank experts;      // routed experts (MoE) or the dense MLP (E = 1)
  bool has_shared = false;
  ExpertBank shared;       // E = 1, I = shared_width: every shared expert side by side (config.shared_slice)
  VecF shared_gate;        // [H] (sigmoid-gated shared expert), empty otherwise
};

struct LayerWeights {
  VecF ln_in, ln_post;     // [H]
  AttnWeights attn;
  FFNWeights ffn;
};

struct Weights {
  MatR embed;              // [V, H]
  MatR lm_head;            // [V, H]; empty when tied (embed is used)
  VecF final_norm;         // [H]
  std::vector<LayerWeights> layers;
  const MatR& output_matrix() const { return lm_head.size() ? lm_head : embed; }
};

// Converts a checkpoint's tensors into the canonical layout; InputError names any missing or misshapen tensor.
Weights load_weights(const ModelConfig& cfg, const TensorStore& store);

// Per-layer, per-sequence K/V history (after norms and RoPE).
class KVCache {
 public:
  KVCache() = default;
  int length(int seq) const { return seq < int(len_.size()) ? len_[size_t(seq)] : 0; }
  int n_seqs() const { return int(len_.size()); }
  void clear() { k_.clear(); v_.clear(); len_.clear(); }
  // A new cache whose sequence i copies the first lengths[i] tokens of this cache's sequence from[i] (continuing
  // many copies of one cached prefix: causal tracing). Only layers >= first_layer are copied; the others are left
  // empty, so the result may only run blocks >= first_layer.
  KVCache gather(const std::vector<int>& from, const std::vector<int>& lengths, int first_layer = 0) const;

 private:
  friend class Model;
  // [layer][seq] → rows of width Hkv·D (k) / Hkv·Dv (v)
  std::vector<std::vector<std::vector<float>>> k_, v_;
  std::vector<int> len_;
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

class Model {
 public:
  // Loads config.json and the safetensors weights of a checkpoint folder.
  static std::shared_ptr<Model> load(const std::string& path);
  Model(ModelConfig cfg, Weights w);

  const ModelConfig& config() const { return cfg_; }
  const Weights& weights() const { return w_; }
  Weights& mutable_weights() { return w_; }
  const std::string& path() const { return path_; }
  // RoPE inverse frequencies [head_dim/2] (theta, linear or yarn scaling applied), as the forward uses them.
  const std::vector<float>& inv_freq() const { return inv_freq_; }

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
  MatR attention(int l, const MatR& a, const TokenLayout& layout, KVCache* cache, const Hooks* hooks) const;
  // MLA projections: q [N, Hq·dq], k [N, Hq·dq], v [N, Hq·dv], RoPE applied.
  void mla_qkv(int l, const MatR& a, const TokenLayout& layout, MatR& q, MatR& k, MatR& v) const;

  ModelConfig cfg_;
  Weights w_;
  std::string path_;
  std::vector<float> inv_freq_;
};

// Builds the packed layout for a batch; with a cache, positions continue from each sequence's cached length.
TokenLayout make_layout(const std::vector<std::vector<int32_t>>& seqs, const KVCache* cache);
// The same from lengths: sequence s has lengths[s] tokens at positions first_pos[s], first_pos[s] + 1, ...
TokenLayout layout_from_lengths(const std::vector<int>& lengths, const std::vector<int>& first_pos);

// Random weights with the given config (benchmarks and tests): uniform entries of standard deviation std,
// norm weights around 1.
Weights random_weights(const ModelConfig& cfg, uint64_t seed, float std = 0.02f);

}  // namespace moedit
