// moedit info MODEL: architecture, sizes, parameter counts and memory estimates (needs only config.json).
#include <cstdio>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "model/config.h"
#include "model/memory.h"
#include "model/router.h"

namespace moedit::cli {

namespace {
std::string human(double n, const char* unit) {
  const char* pre[] = {"", "K", "M", "G", "T"};
  int i = 0;
  while (n >= 1000.0 && i < 4) {
    n /= 1000.0;
    ++i;
  }
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.2f %s%s", n, pre[i], unit);
  return buf;
}

int dtype_bytes(const std::string& dt) {
  if (dt == "float32") return 4;
  if (dt == "float8_e4m3fn") return 1;
  return 2;  // bfloat16 / float16 (and the usual default)
}

std::string router_name(const ModelConfig& c) {
  std::string s;
  switch (c.router) {
    case RouterKind::SoftmaxTopK: s = "softmax → "; break;
    case RouterKind::TopKSoftmax: return "top-k on logits → softmax over k";
    case RouterKind::SigmoidTopK: s = "sigmoid (+ selection bias) → "; break;
  }
  if (c.group_limit != GroupLimit::None)
    s += "best " + std::to_string(c.topk_group) + " of " + std::to_string(c.n_group) + " groups (" +
         (c.group_limit == GroupLimit::MaxScore ? "max" : "top-2 sum") + ") → ";
  s += "top-k";
  const WeightMode mode = weight_mode(c);
  if (mode.norm) s += " → renormalise";
  if (mode.scale) {
    char buf[32];
    std::snprintf(buf, sizeof buf, " → ×%g", double(c.routed_scaling));
    s += buf;
  }
  return s;
}
}  // namespace

namespace {

void register_info(CLI::App& app) {
  static std::string model;
  static bool as_json = false;
  auto* cmd = add_model_command(
      app, "info", "Architecture, sizes, parameter counts and memory estimate of a checkpoint", model, false);
  add_json_flag(cmd, as_json);
  cmd->callback([] {
    ModelConfig c = load_config(model);
    // DeepSeek-V2's norm_topk_prob: which of the two published semantics this run uses.
    std::string v2_norm;
    if (c.model_type == "deepseek_v2" && c.norm_topk_prob) {
      if (load_options().deepseek_v2_transformers_norm) {
        c.norm_topk_prob = false;
        v2_norm = "norm_topk_prob: true ignored, as transformers' native DeepseekV2 does (--deepseek-v2-transformers-norm)";
      } else {
        v2_norm = "norm_topk_prob: true renormalises instead of scaling, as DeepSeek's remote code does "
                  "(transformers' native DeepseekV2 ignores it: --deepseek-v2-transformers-norm)";
      }
    }
    const int64_t total = c.total_params(), active = c.active_params();
    const int bytes = dtype_bytes(c.dtype);
    nlohmann::json j = {
        {"model_type", c.model_type},
        {"architecture", std::string(c.arch->hf_class)},
        {"vocab_size", c.vocab_size},
        {"hidden_size", c.hidden},
        {"num_layers", c.n_layers},
        {"moe_layers", c.n_moe_layers()},
        {"num_heads", c.n_heads},
        {"num_kv_heads", c.n_kv_heads},
        {"head_dim", c.head_dim},
        {"num_experts", c.n_experts},
        {"experts_per_token", c.top_k},
        {"expert_intermediate_size", c.expert_width},
        {"dense_intermediate_size", c.dense_width},
        {"shared_expert_intermediate_size", c.shared_width},
        {"router", router_name(c)},
        {"router_semantics", v2_norm},
        {"num_shared_experts", c.n_shared_experts},
        {"tie_word_embeddings", c.tie_word_embeddings},
        {"rope_theta", c.rope_theta},
        {"rms_norm_eps", c.rms_eps},
        {"dtype", c.dtype.empty() ? "unspecified" : c.dtype},
        {"total_params", total},
        {"active_params", active},
        {"weights_bytes", total * bytes},
    };
    // What loading needs (files mapped in place + fp32 copies) against this machine, when the weights are there.
    const MachineMemory have = machine_memory();
    const CheckpointMemory need = checkpoint_memory(c, model);
    j["machine"] = {{"ram_bytes", have.ram}, {"available_bytes", have.available}, {"address_space_limit", have.as_limit}};
    if (need.file_bytes) j["load"] = {{"mapped_bytes", need.file_bytes}, {"fp32_copy_bytes", need.fp32_bytes}};
    if (as_json) {
      std::printf("%s\n", j.dump(2).c_str());
      return;
    }
    std::printf("%s (%s)\n", std::string(c.arch->hf_class).c_str(), c.model_type.c_str());
    std::printf("  layers            %d (%d MoE, %d dense)\n", c.n_layers, c.n_moe_layers(),
                c.n_layers - c.n_moe_layers());
    std::printf("  hidden / vocab    %d / %d\n", c.hidden, c.vocab_size);
    std::printf("  attention         %d heads, %d kv heads, head_dim %d\n", c.n_heads, c.n_kv_heads, c.head_dim);
    std::printf("  experts           %d routed (top-%d, width %d), router: %s\n", c.n_experts, c.top_k,
                c.expert_width, router_name(c).c_str());
    if (!v2_norm.empty()) std::printf("                    %s\n", v2_norm.c_str());
    if (c.arch->attention == AttentionKind::MLA)
      std::printf("  MLA               q_lora %d, kv_lora %d, nope/rope/v head dims %d/%d/%d\n", c.q_lora_rank,
                  c.kv_lora_rank, c.qk_nope_dim, c.qk_rope_dim, c.v_head_dim);
    if (c.shared_width)
      std::printf("  shared experts    %d (width %d in all)\n", c.n_shared_experts, c.shared_width);
    std::printf("  parameters        %s total, %s active per token\n", human(double(total), "").c_str(),
                human(double(active), "").c_str());
    std::printf("  weights           %s as stored (%s), read in place: weights are never copied to fp32\n",
                human(double(total) * bytes, "B").c_str(), c.dtype.empty() ? "bf16 assumed" : c.dtype.c_str());
    if (need.file_bytes) {
      std::printf("  loading needs     %s mapped (safetensors files) + %s of fp32 copies (norms, routers%s)\n",
                  gb(need.file_bytes).c_str(), gb(need.fp32_bytes).c_str(),
                  need.fp32_bytes > need.file_bytes / 4 ? ", dequantised weights" : "");
      const char* verdict = need.file_bytes + need.fp32_bytes <= have.available
                                ? "fits in available RAM"
                                : need.fp32_bytes <= have.available
                                      ? "weights exceed available RAM: runs through the page cache (reads from disk)"
                                      : "does not fit: the fp32 copies exceed available RAM";
      std::printf("  this machine      %s RAM, %s available%s%s → %s\n", gb(have.ram).c_str(),
                  gb(have.available).c_str(), have.as_limit ? ", address-space limit " : "",
                  have.as_limit ? gb(have.as_limit).c_str() : "", verdict);
    }
  });
}

}  // namespace

MOEDIT_COMMAND(10, register_info)

}  // namespace moedit::cli
