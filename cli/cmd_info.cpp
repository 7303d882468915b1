// moedit info MODEL: architecture, sizes, parameter counts and memory estimates (needs only config.json).
#include <cstdio>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "model/config.h"

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

const char* router_name(RouterKind r, bool renorm) {
  switch (r) {
    case RouterKind::SoftmaxTopK: return renorm ? "softmax → top-k → renormalise" : "softmax → top-k";
    case RouterKind::TopKSoftmax: return "top-k on logits → softmax over k";
  }
  return "?";
}
}  // namespace

namespace {

void register_info(CLI::App& app) {
  auto* cmd = app.add_subcommand("info", "Architecture, sizes, parameter counts and memory estimate of a checkpoint");
  static std::string model;
  static bool as_json = false;
  add_model_arg(cmd, model);
  cmd->add_flag("--json", as_json, "Print JSON");
  cmd->callback([] {
    const ModelConfig c = load_config(model);
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
        {"router", router_name(c.arch->router, c.norm_topk_prob)},
        {"tie_word_embeddings", c.tie_word_embeddings},
        {"rope_theta", c.rope_theta},
        {"rms_norm_eps", c.rms_eps},
        {"dtype", c.dtype.empty() ? "unspecified" : c.dtype},
        {"total_params", total},
        {"active_params", active},
        {"weights_bytes", total * bytes},
        {"fp32_compute_bytes", total * 4},
    };
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
                c.expert_width, router_name(c.arch->router, c.norm_topk_prob));
    if (c.shared_width) std::printf("  shared expert     width %d\n", c.shared_width);
    std::printf("  parameters        %s total, %s active per token\n", human(double(total), "").c_str(),
                human(double(active), "").c_str());
    std::printf("  memory            %s as stored (%s), %s in fp32 compute\n",
                human(double(total) * bytes, "B").c_str(), c.dtype.empty() ? "bf16 assumed" : c.dtype.c_str(),
                human(double(total) * 4, "B").c_str());
  });
}

}  // namespace

MOEDIT_COMMAND(10, register_info)

}  // namespace moedit::cli
