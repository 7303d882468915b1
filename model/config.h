// config.json → ModelConfig, driven by the architecture table (model/architectures.cpp).
//
// One row of the table (ArchSpec) describes a model family as data: where its tensors live, which router, norms,
// shared experts and dense-layer rule it uses, and the defaults of its transformers configuration class. Nothing
// downstream branches on the family name; it reads these fields.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace moedit {

// How router logits z [E] become (expert ids, weights) for one token.
enum class RouterKind {
  SoftmaxTopK,  // p = softmax(z) (fp32) → top-k of p → renormalise if norm_topk_prob → × routed_scaling_factor
  TopKSoftmax,  // top-k of z → softmax over the k selected logits (GraniteMoE)
  SigmoidTopK,  // s = sigmoid(z); select on s + e_score_correction_bias; weights s (renorm?) × scaling (DeepSeek-V3)
};
// Group-limited selection (DeepSeek): experts form n_group equal groups; only the topk_group best groups compete.
enum class GroupLimit {
  None,
  MaxScore,   // group score = max score in the group; other groups' scores set to 0 (V2 group_limited_greedy)
  TopTwoSum,  // group score = sum of the two largest selection scores; others set to −inf (V3 noaux_tc)
};
enum class AttentionKind { Standard, MLA };  // MLA: DeepSeek-V2/V3 multi-head latent attention
enum class QKNorm { None, PerHead, WholeProjection };
enum class SharedExpertKind { None, SigmoidGated, Ungated };
// SparseStep: Qwen's mlp_only_layers + decoder_sparse_step. FirstKDense: DeepSeek's layer ℓ is MoE iff
// ℓ ≥ first_k_dense_replace and ℓ % moe_layer_freq == 0 (the remote code's rule; transformers has no moe_layer_freq).
enum class DenseLayerRule { None, SparseStep, FirstKDense };

struct ArchSpec {
  std::string_view model_type;
  std::string_view hf_class;                    // architectures[0] in config.json
  std::vector<std::string_view> moe_modules;     // MoE module names under model.layers.N., tried in order
  std::vector<std::string_view> router_weights;  // relative to the MoE module; Hub name first, then v5's
  // Per-expert (Hub) layout, relative to the MoE module, "{e}" = expert index; empty if the family has none.
  std::string_view expert_gate, expert_up, expert_down;
  // Packed layouts, relative to the MoE module: gate‖up [E, 2I, H] and down [E, H, I]. Tried in order.
  std::vector<std::pair<std::string_view, std::string_view>> packed;
  std::vector<std::string_view> n_experts_keys;  // the first present in config.json wins (v5 renamed some)
  std::string_view expert_width_key;  // per-expert intermediate size
  std::string_view dense_width_key;   // intermediate size of dense (non-MoE) layers
  RouterKind router;               // the default; `scoring_func` overrides it where deepseek_router is set
  bool deepseek_router = false;   // reads scoring_func / topk_method / n_group / topk_group / routed_scaling_factor
  bool norm_replaces_scaling = false;  // norm_topk_prob renormalises *instead of* scaling (DeepSeek v1/V2 remote code)
  std::string_view router_bias = {};  // relative to the MoE module: [E] selection bias (V3), empty if none
  bool renorm_always;             // Mixtral: top-k weights always renormalised (no norm_topk_prob switch)
  QKNorm qk_norm;
  std::string_view qkv_bias_key;  // config key switching q/k/v biases
  SharedExpertKind shared;
  std::string_view shared_module;  // relative to the MoE module: "<m>.{gate,up,down}_proj.weight"
  std::string_view shared_gate;    // relative to the MoE module: [1, H] sigmoid gate weight
  // Width of the shared block: a key holding it, or (DeepSeek) n_shared_experts × expert width.
  std::string_view shared_width_key = {}, shared_count_key = {};
  AttentionKind attention = AttentionKind::Standard;
  std::string_view rope_interleave_key = {};  // MLA: key switching interleaved-pair RoPE; empty = always interleaved
  DenseLayerRule dense_rule;
  bool reads_head_dim;            // honours an explicit `head_dim` key (else hidden / heads)
  bool multipliers;               // Granite's embedding/residual/attention/logits multipliers
  bool has_sliding_window;        // honours `sliding_window`
  // The transformers configuration class's defaults, as a JSON object: keys absent from config.json take these.
  std::string_view defaults;
};

// The table. Returns nullptr for an unknown family.
const ArchSpec* find_arch(std::string_view model_type_or_class);
std::vector<std::string_view> supported_model_types();

struct ModelConfig {
  const ArchSpec* arch = nullptr;
  std::string model_type;
  std::string source;  // path of config.json, for messages
  nlohmann::json raw;

  int vocab_size = 0, hidden = 0, n_layers = 0;
  int n_heads = 0, n_kv_heads = 0, head_dim = 0;
  int expert_width = 0;  // per routed expert
  int dense_width = 0;   // dense layers
  int shared_width = 0;  // the whole shared block (0 if none)
  // Shared experts in the shared block. DeepSeek's n_shared_experts are one MLP of width n·expert_width in HF;
  // shared expert j owns intermediate rows [j·shared_width/n, (j+1)·shared_width/n) of it (shared_slice).
  int n_shared_experts = 0;
  std::pair<int, int> shared_slice(int j) const {  // [begin, end) of shared expert j in the shared block
    const int w = shared_width / n_shared_experts;
    return {j * w, (j + 1) * w};
  }
  int n_experts = 0, top_k = 0;
  bool norm_topk_prob = false;
  float routed_scaling = 1.f;
  RouterKind router = RouterKind::SoftmaxTopK;
  GroupLimit group_limit = GroupLimit::None;
  int n_group = 1, topk_group = 1;
  // MLA (attention == AttentionKind::MLA); head_dim is then the rotary dim qk_rope_head_dim, as in transformers.
  int q_lora_rank = 0;  // 0 = plain q_proj
  int kv_lora_rank = 0, qk_nope_dim = 0, qk_rope_dim = 0, v_head_dim = 0;
  bool rope_interleave = false;  // RoPE pairs (2i, 2i+1) instead of (i, i + d/2)
  int qk_dim() const { return qk_nope_dim + qk_rope_dim; }
  float rms_eps = 1e-6f;
  float rope_theta = 10000.f;
  std::string rope_scaling_type = "default";
  float rope_linear_factor = 1.f;  // rope_scaling {type: linear}
  struct Yarn {                    // rope_scaling {type: yarn}
    bool on = false;
    double factor = 1, beta_fast = 32, beta_slow = 1;
    int original_max = 0;
  } yarn;
  float rope_attn_factor = 1.f;    // cos/sin scaling (yarn: mscale(F, mscale) / mscale(F, mscale_all_dim))
  int sliding_window = 0;          // 0 = none
  float clip_qkv = 0.f;            // 0 = none
  bool qkv_bias = false;
  bool tie_word_embeddings = false;
  float embedding_multiplier = 1.f, residual_multiplier = 1.f, logits_scaling = 1.f;
  float attn_scale = 0.f;  // softmax scale (head_dim^-0.5; Granite: attention_multiplier; MLA: qk_dim^-0.5·m²)
  int max_position_embeddings = 0;
  int bos_token_id = -1, eos_token_id = -1;
  std::string dtype;  // torch_dtype of the stored weights
  std::vector<bool> moe_layer;  // per layer: MoE block (true) or dense MLP

  bool is_moe(int layer) const { return moe_layer[size_t(layer)]; }
  int n_moe_layers() const;

  // Parameter counts (as stored, incl. embeddings and lm_head; tied counted once).
  int64_t total_params() const;
  int64_t active_params() const;  // per token: top-k routed experts + shared + everything dense
};

// Parses a config.json (a file, or a folder holding one). Missing keys take the transformers defaults of the
// family's configuration class; malformed or absurd values raise InputError naming the file and the field.
ModelConfig load_config(const std::string& path);
ModelConfig parse_config(const nlohmann::json& j, const std::string& source);

}  // namespace moedit
