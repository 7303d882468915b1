// The architecture table: every supported family as one row of data (see ArchSpec in model/config.h).
// Defaults are those of each family's transformers configuration class (configuration_<family>.py).
#include <algorithm>

#include "model/config.h"

namespace moedit {

namespace {

const std::vector<ArchSpec>& table() {
  static const std::vector<ArchSpec> t = {
      {
          .model_type = "mixtral",
          .hf_class = "MixtralForCausalLM",
          .moe_modules = {"block_sparse_moe", "mlp"},  // v5 renamed the module to mlp
          .router_weights = {"gate.weight"},
          .expert_gate = "experts.{e}.w1.weight",
          .expert_up = "experts.{e}.w3.weight",
          .expert_down = "experts.{e}.w2.weight",
          .packed = {{"experts.gate_up_proj", "experts.down_proj"}},
          .n_experts_keys = {"num_local_experts", "num_experts"},
          .expert_width_key = "intermediate_size",
          .dense_width_key = "intermediate_size",
          .router = RouterKind::SoftmaxTopK,
          .renorm_always = true,
          .qk_norm = QKNorm::None,
          .qkv_bias_key = "",
          .shared = SharedExpertKind::None,
          .shared_module = "",
          .shared_gate = "",
          .dense_rule = DenseLayerRule::None,
          .reads_head_dim = true,
          .multipliers = false,
          .has_sliding_window = true,
          .defaults = R"({"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
              "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
              "num_experts_per_tok": 2, "num_local_experts": 8, "tie_word_embeddings": false,
              "bos_token_id": 1, "eos_token_id": 2})",
      },
      {
          .model_type = "qwen2_moe",
          .hf_class = "Qwen2MoeForCausalLM",
          .moe_modules = {"mlp"},
          .router_weights = {"gate.weight"},
          .expert_gate = "experts.{e}.gate_proj.weight",
          .expert_up = "experts.{e}.up_proj.weight",
          .expert_down = "experts.{e}.down_proj.weight",
          .packed = {{"experts.gate_up_proj", "experts.down_proj"}},
          .n_experts_keys = {"num_experts", "num_local_experts"},
          .expert_width_key = "moe_intermediate_size",
          .dense_width_key = "intermediate_size",
          .router = RouterKind::SoftmaxTopK,
          .renorm_always = false,
          .qk_norm = QKNorm::None,
          .qkv_bias_key = "qkv_bias",
          .shared = SharedExpertKind::SigmoidGated,
          .shared_module = "shared_expert",
          .shared_gate = "shared_expert_gate.weight",
          .dense_rule = DenseLayerRule::SparseStep,
          .reads_head_dim = false,
          .multipliers = false,
          .has_sliding_window = false,
          .defaults = R"({"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632,
              "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
              "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "decoder_sparse_step": 1, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
              "num_experts_per_tok": 4, "num_experts": 60, "norm_topk_prob": false, "mlp_only_layers": [],
              "qkv_bias": true, "tie_word_embeddings": false})",
      },
      {
          .model_type = "qwen3_moe",
          .hf_class = "Qwen3MoeForCausalLM",
          .moe_modules = {"mlp"},
          .router_weights = {"gate.weight"},
          .expert_gate = "experts.{e}.gate_proj.weight",
          .expert_up = "experts.{e}.up_proj.weight",
          .expert_down = "experts.{e}.down_proj.weight",
          .packed = {{"experts.gate_up_proj", "experts.down_proj"}},
          .n_experts_keys = {"num_experts", "num_local_experts"},
          .expert_width_key = "moe_intermediate_size",
          .dense_width_key = "intermediate_size",
          .router = RouterKind::SoftmaxTopK,
          .renorm_always = false,
          .qk_norm = QKNorm::PerHead,
          .qkv_bias_key = "attention_bias",
          .shared = SharedExpertKind::None,
          .shared_module = "",
          .shared_gate = "",
          .dense_rule = DenseLayerRule::SparseStep,
          .reads_head_dim = true,
          .multipliers = false,
          .has_sliding_window = false,
          .defaults = R"({"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
              "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 4,
              "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "decoder_sparse_step": 1, "moe_intermediate_size": 768, "num_experts_per_tok": 8,
              "num_experts": 128, "norm_topk_prob": false, "mlp_only_layers": [], "attention_bias": false,
              "tie_word_embeddings": false})",
      },
      {
          .model_type = "olmoe",
          .hf_class = "OlmoeForCausalLM",
          .moe_modules = {"mlp"},
          .router_weights = {"gate.weight"},
          .expert_gate = "experts.{e}.gate_proj.weight",
          .expert_up = "experts.{e}.up_proj.weight",
          .expert_down = "experts.{e}.down_proj.weight",
          .packed = {{"experts.gate_up_proj", "experts.down_proj"}},
          .n_experts_keys = {"num_experts", "num_local_experts"},
          .expert_width_key = "intermediate_size",
          .dense_width_key = "intermediate_size",
          .router = RouterKind::SoftmaxTopK,
          .renorm_always = false,
          .qk_norm = QKNorm::WholeProjection,
          .qkv_bias_key = "attention_bias",
          .shared = SharedExpertKind::None,
          .shared_module = "",
          .shared_gate = "",
          .dense_rule = DenseLayerRule::None,
          .reads_head_dim = false,
          .multipliers = false,
          .has_sliding_window = false,
          .defaults = R"({"vocab_size": 50304, "hidden_size": 2048, "intermediate_size": 2048,
              "num_hidden_layers": 16, "num_attention_heads": 16, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "num_experts_per_tok": 8, "num_experts": 64,
              "norm_topk_prob": false, "clip_qkv": null, "attention_bias": false, "tie_word_embeddings": false,
              "pad_token_id": 1, "eos_token_id": 50279})",
      },
      {
          .model_type = "granitemoe",
          .hf_class = "GraniteMoeForCausalLM",
          .moe_modules = {"block_sparse_moe"},
          .router_weights = {"router.layer.weight", "router.weight"},
          .expert_gate = "",
          .expert_up = "",
          .expert_down = "",
          .packed = {{"input_linear.weight", "output_linear.weight"}, {"experts.gate_up_proj", "experts.down_proj"}},
          .n_experts_keys = {"num_local_experts", "num_experts"},
          .expert_width_key = "intermediate_size",
          .dense_width_key = "intermediate_size",
          .router = RouterKind::TopKSoftmax,
          .renorm_always = false,
          .qk_norm = QKNorm::None,
          .qkv_bias_key = "attention_bias",
          .shared = SharedExpertKind::None,
          .shared_module = "",
          .shared_gate = "",
          .dense_rule = DenseLayerRule::None,
          .reads_head_dim = false,
          .multipliers = true,
          .has_sliding_window = false,
          .defaults = R"({"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
              "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "attention_bias": false,
              "embedding_multiplier": 1.0, "logits_scaling": 1.0, "residual_multiplier": 1.0,
              "attention_multiplier": 1.0, "num_local_experts": 8, "num_experts_per_tok": 2,
              "tie_word_embeddings": false})",
      },
  };
  return t;
}

}  // namespace

const ArchSpec* find_arch(std::string_view name) {
  for (const auto& a : table())
    if (a.model_type == name || a.hf_class == name) return &a;
  return nullptr;
}

std::vector<std::string_view> supported_model_types() {
  std::vector<std::string_view> v;
  for (const auto& a : table()) v.push_back(a.model_type);
  return v;
}

}  // namespace moedit
