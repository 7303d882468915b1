#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>

#include "model/config.h"
#include "model/errors.h"

namespace moedit {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// Field access with errors that name the file and the key.
struct Fields {
  const json& j;
  const std::string& src;

  [[noreturn]] void bad(const std::string& key, const std::string& what) const {
    throw InputError(src + ": field '" + key + "' " + what);
  }
  bool has(const std::string& key) const { return j.contains(key) && !j[key].is_null(); }
  int64_t integer(const std::string& key, int64_t lo, int64_t hi) const {
    if (!has(key)) bad(key, "is missing");
    const json& v = j[key];
    int64_t x;
    if (v.is_number_integer()) {
      x = v.get<int64_t>();
    } else if (v.is_number_float() && std::floor(v.get<double>()) == v.get<double>() &&
               std::fabs(v.get<double>()) < 1e15) {
      x = int64_t(v.get<double>());
    } else {
      bad(key, "must be an integer");
    }
    if (x < lo || x > hi) bad(key, "= " + std::to_string(x) + " is out of range [" + std::to_string(lo) + ", " +
                                       std::to_string(hi) + "]");
    return x;
  }
  double number(const std::string& key, double lo, double hi) const {
    if (!has(key)) bad(key, "is missing");
    if (!j[key].is_number()) bad(key, "must be a number");
    const double x = j[key].get<double>();
    if (!(x >= lo && x <= hi)) bad(key, "= " + std::to_string(x) + " is out of range");
    return x;
  }
  bool boolean(const std::string& key) const {
    if (!has(key)) bad(key, "is missing");
    if (!j[key].is_boolean()) bad(key, "must be true or false");
    return j[key].get<bool>();
  }
};

constexpr int64_t kMaxDim = 1 << 20;

}  // namespace

int ModelConfig::n_moe_layers() const { return int(std::count(moe_layer.begin(), moe_layer.end(), true)); }

ModelConfig load_config(const std::string& path) {
  std::string file = path;
  if (fs::is_directory(path)) file = (fs::path(path) / "config.json").string();
  std::ifstream in(file);
  if (!in) throw InputError(file + ": cannot open (is this a Hugging Face checkpoint folder?)");
  json j = json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) throw InputError(file + ": not valid JSON");
  return parse_config(j, file);
}

ModelConfig parse_config(const json& file_json, const std::string& src) {
  if (!file_json.is_object()) throw InputError(src + ": not a JSON object");
  ModelConfig c;
  c.source = src;
  c.raw = file_json;

  // Dispatch on architectures[0], falling back to model_type.
  const ArchSpec* arch = nullptr;
  std::string named;
  if (file_json.contains("architectures") && file_json["architectures"].is_array() &&
      !file_json["architectures"].empty() && file_json["architectures"][0].is_string()) {
    named = file_json["architectures"][0].get<std::string>();
    arch = find_arch(named);
  }
  if (!arch && file_json.contains("model_type") && file_json["model_type"].is_string()) {
    named = file_json["model_type"].get<std::string>();
    arch = find_arch(named);
  }
  if (!arch) {
    std::string list;
    for (auto t : supported_model_types()) list += (list.empty() ? "" : ", ") + std::string(t);
    throw InputError(src + ": field 'model_type' " +
                     (named.empty() ? std::string("is missing") : "'" + named + "' is not supported") +
                     " (supported: " + list + ")");
  }
  c.arch = arch;
  c.model_type = std::string(arch->model_type);

  json j = json::parse(arch->defaults);
  for (auto it = file_json.begin(); it != file_json.end(); ++it) j[it.key()] = it.value();
  // v5 nests RoPE settings in rope_parameters.
  json rope = json::object();
  if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) rope = j["rope_parameters"];
  else if (j.contains("rope_scaling") && j["rope_scaling"].is_object()) rope = j["rope_scaling"];
  if (rope.contains("rope_theta")) j["rope_theta"] = rope["rope_theta"];
  const Fields f{j, src};

  c.vocab_size = int(f.integer("vocab_size", 1, 1 << 24));
  c.hidden = int(f.integer("hidden_size", 1, kMaxDim));
  c.n_layers = int(f.integer("num_hidden_layers", 1, 4096));
  c.n_heads = int(f.integer("num_attention_heads", 1, 4096));
  c.n_kv_heads = f.has("num_key_value_heads") ? int(f.integer("num_key_value_heads", 1, 4096)) : c.n_heads;
  if (c.n_heads % c.n_kv_heads != 0)
    f.bad("num_key_value_heads", "= " + std::to_string(c.n_kv_heads) + " does not divide num_attention_heads = " +
                                     std::to_string(c.n_heads));
  if (arch->reads_head_dim && f.has("head_dim")) {
    c.head_dim = int(f.integer("head_dim", 1, 65536));
  } else {
    if (c.hidden % c.n_heads != 0)
      f.bad("num_attention_heads", "= " + std::to_string(c.n_heads) + " does not divide hidden_size = " +
                                       std::to_string(c.hidden));
    c.head_dim = c.hidden / c.n_heads;
  }
  if (c.head_dim % 2 != 0) f.bad("head_dim", "must be even for rotary embeddings");

  std::string experts_key(arch->n_experts_keys.front());
  for (auto key : arch->n_experts_keys)
    if (file_json.contains(key) && !file_json[std::string(key)].is_null()) {
      experts_key = std::string(key);
      break;
    }
  c.n_experts = int(f.integer(experts_key, 1, 65536));
  c.top_k = int(f.integer("num_experts_per_tok", 1, 65536));
  if (c.top_k > c.n_experts)
    f.bad("num_experts_per_tok", "= " + std::to_string(c.top_k) + " exceeds the number of experts (" +
                                     std::to_string(c.n_experts) + ")");
  c.expert_width = int(f.integer(std::string(arch->expert_width_key), 1, kMaxDim));
  c.dense_width = f.has(std::string(arch->dense_width_key))
                      ? int(f.integer(std::string(arch->dense_width_key), 1, kMaxDim))
                      : c.expert_width;
  c.norm_topk_prob = arch->renorm_always || (f.has("norm_topk_prob") && f.boolean("norm_topk_prob"));
  if (arch->shared != SharedExpertKind::None)
    c.shared_width = int(f.integer("shared_expert_intermediate_size", 1, kMaxDim));

  c.rms_eps = float(f.number("rms_norm_eps", 0.0, 1.0));
  c.rope_theta = float(f.number("rope_theta", 1e-6, 1e30));
  if (!rope.empty()) {
    std::string type = rope.contains("rope_type") && rope["rope_type"].is_string() ? rope["rope_type"].get<std::string>()
                       : rope.contains("type") && rope["type"].is_string()     ? rope["type"].get<std::string>()
                                                                               : "default";
    if (type == "linear") {
      if (!rope.contains("factor") || !rope["factor"].is_number() || !(rope["factor"].get<double>() > 0))
        throw InputError(src + ": field 'rope_scaling.factor' must be a positive number");
      c.rope_linear_factor = float(rope["factor"].get<double>());
    } else if (type != "default") {
      throw InputError(src + ": field 'rope_scaling' type '" + type + "' is not supported (default, linear)");
    }
  }
  if (arch->has_sliding_window && f.has("sliding_window"))
    c.sliding_window = int(f.integer("sliding_window", 1, INT32_MAX));
  if (f.has("use_sliding_window") && j["use_sliding_window"].is_boolean() && j["use_sliding_window"].get<bool>() &&
      !arch->has_sliding_window)
    f.bad("use_sliding_window", "= true is not supported for " + c.model_type);
  if (f.has("clip_qkv")) c.clip_qkv = float(f.number("clip_qkv", 1e-30, 1e30));
  c.qkv_bias = !arch->qkv_bias_key.empty() && f.has(std::string(arch->qkv_bias_key)) &&
               f.boolean(std::string(arch->qkv_bias_key));
  c.tie_word_embeddings = f.has("tie_word_embeddings") && f.boolean("tie_word_embeddings");
  c.attn_scale = 1.f / std::sqrt(float(c.head_dim));
  if (arch->multipliers) {
    c.embedding_multiplier = float(f.number("embedding_multiplier", -1e9, 1e9));
    c.residual_multiplier = float(f.number("residual_multiplier", -1e9, 1e9));
    c.logits_scaling = float(f.number("logits_scaling", -1e9, 1e9));
    if (c.logits_scaling == 0.f) f.bad("logits_scaling", "must not be 0");
    c.attn_scale = float(f.number("attention_multiplier", -1e9, 1e9));
  }
  if (f.has("routed_scaling_factor")) c.routed_scaling = float(f.number("routed_scaling_factor", 0.0, 1e6));
  c.max_position_embeddings = f.has("max_position_embeddings")
                                  ? int(f.integer("max_position_embeddings", 1, int64_t(1) << 30))
                                  : 0;
  auto token_id = [&](const char* key) {
    if (!f.has(key)) return -1;
    const json& v = j[key];
    if (v.is_array()) return v.empty() || !v[0].is_number_integer() ? -1 : v[0].get<int>();
    return v.is_number_integer() ? v.get<int>() : -1;
  };
  c.bos_token_id = token_id("bos_token_id");
  c.eos_token_id = token_id("eos_token_id");
  for (const char* key : {"torch_dtype", "dtype"})
    if (f.has(key) && j[key].is_string()) c.dtype = j[key].get<std::string>();

  // Which layers are MoE.
  c.moe_layer.assign(size_t(c.n_layers), true);
  if (arch->dense_rule == DenseLayerRule::SparseStep) {
    const int step = int(f.integer("decoder_sparse_step", 1, 1 << 20));
    std::vector<int> only;
    if (f.has("mlp_only_layers")) {
      if (!j["mlp_only_layers"].is_array()) f.bad("mlp_only_layers", "must be a list of layer indices");
      for (const auto& v : j["mlp_only_layers"]) {
        if (!v.is_number_integer()) f.bad("mlp_only_layers", "must be a list of layer indices");
        only.push_back(v.get<int>());
      }
    }
    for (int l = 0; l < c.n_layers; ++l)
      c.moe_layer[size_t(l)] = std::find(only.begin(), only.end(), l) == only.end() && (l + 1) % step == 0;
  }
  return c;
}

namespace {
int64_t layer_params(const ModelConfig& c, int l, bool active) {
  const int64_t H = c.hidden, D = c.head_dim, Hq = c.n_heads, Hkv = c.n_kv_heads;
  int64_t p = 2 * H;                              // input + post-attention norms
  p += H * Hq * D + 2 * H * Hkv * D + Hq * D * H;  // q, k, v, o
  if (c.qkv_bias) p += (Hq + 2 * Hkv) * D;
  if (c.arch->qk_norm == QKNorm::PerHead) p += 2 * D;
  if (c.arch->qk_norm == QKNorm::WholeProjection) p += (Hq + Hkv) * D;
  if (!c.is_moe(l)) return p + 3 * H * c.dense_width;
  p += int64_t(c.n_experts) * H;  // router
  p += int64_t(active ? c.top_k : c.n_experts) * 3 * H * c.expert_width;
  if (c.arch->shared != SharedExpertKind::None) p += 3 * H * c.shared_width;
  if (c.arch->shared == SharedExpertKind::SigmoidGated) p += H;
  return p;
}
}  // namespace

int64_t ModelConfig::total_params() const {
  int64_t p = int64_t(vocab_size) * hidden * (tie_word_embeddings ? 1 : 2) + hidden;
  for (int l = 0; l < n_layers; ++l) p += layer_params(*this, l, false);
  return p;
}

int64_t ModelConfig::active_params() const {
  int64_t p = int64_t(vocab_size) * hidden * (tie_word_embeddings ? 1 : 2) + hidden;
  for (int l = 0; l < n_layers; ++l) p += layer_params(*this, l, true);
  return p;
}

}  // namespace moedit
