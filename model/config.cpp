#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>

#include "model/config.h"
#include "io/errors.h"

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

std::string str_field(const Fields& f, const std::string& key) {
  if (!f.has(key) || !f.j[key].is_string()) f.bad(key, "must be a string");
  return f.j[key].get<std::string>();
}

// DeepSeek routers: scoring function, group-limited selection, scaling.
void parse_deepseek_router(const Fields& f, ModelConfig& c) {
  const std::string scoring = str_field(f, "scoring_func");
  if (scoring == "softmax") c.router = RouterKind::SoftmaxTopK;
  else if (scoring == "sigmoid") c.router = RouterKind::SigmoidTopK;
  else f.bad("scoring_func", "'" + scoring + "' is not supported (softmax, sigmoid)");
  const std::string method = f.has("topk_method") ? str_field(f, "topk_method") : "greedy";
  if (method == "greedy") c.group_limit = GroupLimit::None;
  else if (method == "group_limited_greedy") c.group_limit = GroupLimit::MaxScore;
  else if (method == "noaux_tc") c.group_limit = GroupLimit::TopTwoSum;
  else f.bad("topk_method", "'" + method + "' is not supported (greedy, group_limited_greedy, noaux_tc)");
  if (c.group_limit != GroupLimit::None) {
    c.n_group = int(f.integer("n_group", 1, c.n_experts));
    if (c.n_experts % c.n_group != 0)
      f.bad("n_group", "= " + std::to_string(c.n_group) + " does not divide the number of experts (" +
                           std::to_string(c.n_experts) + ")");
    const int per = c.n_experts / c.n_group;
    if (c.group_limit == GroupLimit::TopTwoSum && per < 2)
      f.bad("n_group", "= " + std::to_string(c.n_group) + " leaves fewer than 2 experts per group (noaux_tc)");
    c.topk_group = int(f.integer("topk_group", 1, c.n_group));
    if (c.topk_group * per < c.top_k)
      f.bad("topk_group", "= " + std::to_string(c.topk_group) + " keeps " + std::to_string(c.topk_group * per) +
                              " experts, fewer than num_experts_per_tok = " + std::to_string(c.top_k));
  }
  if (f.has("routed_scaling_factor")) c.routed_scaling = float(f.number("routed_scaling_factor", 0.0, 1e6));
}

double yarn_mscale(double factor, double m) { return factor <= 1.0 ? 1.0 : 0.1 * m * std::log(factor) + 1.0; }

// rope_scaling / rope_parameters: linear or yarn (transformers' _compute_yarn_parameters).
void parse_rope_scaling(const json& rope, const std::string& src, ModelConfig& c) {
  const std::string type = rope.contains("rope_type") && rope["rope_type"].is_string()
                               ? rope["rope_type"].get<std::string>()
                           : rope.contains("type") && rope["type"].is_string() ? rope["type"].get<std::string>()
                                                                                : "default";
  const Fields r{rope, src};
  auto positive = [&](const char* key) {
    if (!rope.contains(key) || !rope[key].is_number() || !(rope[key].get<double>() > 0))
      throw InputError(src + ": field 'rope_scaling." + key + "' must be a positive number");
    return rope[key].get<double>();
  };
  auto optional = [&](const char* key, double fallback) {  // absent, null or 0 → fallback (HF: `x or default`)
    if (!rope.contains(key) || rope[key].is_null()) return fallback;
    if (!rope[key].is_number()) throw InputError(src + ": field 'rope_scaling." + std::string(key) + "' must be a number");
    const double v = rope[key].get<double>();
    return v == 0.0 ? fallback : v;
  };
  c.rope_scaling_type = type;
  if (type == "linear") {
    c.rope_linear_factor = float(positive("factor"));
  } else if (type == "yarn") {
    ModelConfig::Yarn& y = c.yarn;
    y.on = true;
    const bool has_orig = rope.contains("original_max_position_embeddings") &&
                          !rope["original_max_position_embeddings"].is_null();
    y.original_max = has_orig ? int(r.integer("original_max_position_embeddings", 1, int64_t(1) << 30))
                              : c.max_position_embeddings;
    if (y.original_max <= 0)
      throw InputError(src + ": field 'rope_scaling.original_max_position_embeddings' is missing");
    y.factor = rope.contains("factor") && !rope["factor"].is_null()
                   ? positive("factor")
                   : double(c.max_position_embeddings) / double(y.original_max);
    y.beta_fast = optional("beta_fast", 32.0);
    y.beta_slow = optional("beta_slow", 1.0);
    const double ms = optional("mscale", 0.0), ms_all = optional("mscale_all_dim", 0.0);
    double att = (ms != 0.0 && ms_all != 0.0) ? yarn_mscale(y.factor, ms) / yarn_mscale(y.factor, ms_all)
                                              : yarn_mscale(y.factor, 1.0);
    if (rope.contains("attention_factor") && !rope["attention_factor"].is_null()) att = positive("attention_factor");
    c.rope_attn_factor = float(att);
  } else if (type != "default") {
    throw InputError(src + ": field 'rope_scaling' type '" + type + "' is not supported (default, linear, yarn)");
  }
}

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
  if (arch->attention == AttentionKind::MLA) {
    if (c.n_kv_heads != c.n_heads)
      f.bad("num_key_value_heads", "= " + std::to_string(c.n_kv_heads) +
                                       " must equal num_attention_heads for multi-head latent attention");
    c.q_lora_rank = f.has("q_lora_rank") ? int(f.integer("q_lora_rank", 1, kMaxDim)) : 0;
    c.kv_lora_rank = int(f.integer("kv_lora_rank", 1, kMaxDim));
    c.qk_nope_dim = int(f.integer("qk_nope_head_dim", 0, 65536));
    c.qk_rope_dim = int(f.integer("qk_rope_head_dim", 2, 65536));
    c.v_head_dim = int(f.integer("v_head_dim", 1, 65536));
    c.head_dim = c.qk_rope_dim;  // the rotary dim, as transformers sets it
    c.rope_interleave =
        arch->rope_interleave_key.empty() || f.boolean(std::string(arch->rope_interleave_key));
    if (c.head_dim % 2 != 0) f.bad("qk_rope_head_dim", "must be even for rotary embeddings");
  } else if (arch->reads_head_dim && f.has("head_dim")) {
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
  if (!arch->shared_width_key.empty()) {
    c.shared_width = int(f.integer(std::string(arch->shared_width_key), 1, kMaxDim));
    c.n_shared_experts = 1;
  } else if (!arch->shared_count_key.empty() && f.has(std::string(arch->shared_count_key))) {
    c.n_shared_experts = int(f.integer(std::string(arch->shared_count_key), 0, 4096));  // 0 / null: none
    c.shared_width = c.n_shared_experts * c.expert_width;
  }
  c.router = arch->router;
  if (arch->deepseek_router) parse_deepseek_router(f, c);

  c.rms_eps = float(f.number("rms_norm_eps", 0.0, 1.0));
  c.rope_theta = float(f.number("rope_theta", 1e-6, 1e30));
  c.max_position_embeddings = f.has("max_position_embeddings")
                                  ? int(f.integer("max_position_embeddings", 1, int64_t(1) << 30))
                                  : 0;
  if (!rope.empty()) parse_rope_scaling(rope, src, c);
  c.attn_scale = 1.f / std::sqrt(float(c.head_dim));
  if (arch->attention == AttentionKind::MLA) {
    // softmax scale qk_dim^-0.5, times mscale(F, mscale_all_dim)² under RoPE scaling (transformers'
    // yarn_apply_mscale; the DeepSeek remote code does the same).
    double scale = 1.0 / std::sqrt(double(c.qk_dim()));
    if (c.rope_scaling_type != "default" && rope.contains("mscale_all_dim") && rope["mscale_all_dim"].is_number() &&
        rope["mscale_all_dim"].get<double>() != 0.0 && rope.contains("factor") && rope["factor"].is_number()) {
      const double m = yarn_mscale(rope["factor"].get<double>(), rope["mscale_all_dim"].get<double>());
      scale *= m * m;
    }
    c.attn_scale = float(scale);
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
  if (arch->multipliers) {
    c.embedding_multiplier = float(f.number("embedding_multiplier", -1e9, 1e9));
    c.residual_multiplier = float(f.number("residual_multiplier", -1e9, 1e9));
    c.logits_scaling = float(f.number("logits_scaling", -1e9, 1e9));
    if (c.logits_scaling == 0.f) f.bad("logits_scaling", "must not be 0");
    c.attn_scale = float(f.number("attention_multiplier", -1e9, 1e9));
  }
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
  } else if (arch->dense_rule == DenseLayerRule::FirstKDense) {
    const int first = int(f.integer("first_k_dense_replace", 0, 1 << 20));
    const int freq = int(f.integer("moe_layer_freq", 1, 1 << 20));
    for (int l = 0; l < c.n_layers; ++l) c.moe_layer[size_t(l)] = l >= first && l % freq == 0;
  }
  return c;
}

namespace {
int64_t layer_params(const ModelConfig& c, int l, bool active) {
  const int64_t H = c.hidden, D = c.head_dim, Hq = c.n_heads, Hkv = c.n_kv_heads;
  int64_t p = 2 * H;  // input + post-attention norms
  if (c.arch->attention == AttentionKind::MLA) {
    const int64_t qk = c.qk_dim(), rq = c.q_lora_rank, rkv = c.kv_lora_rank;
    p += rq ? H * rq + rq + rq * Hq * qk : H * Hq * qk;                  // q_proj, or q_a_proj + norm + q_b_proj
    p += H * (rkv + c.qk_rope_dim) + rkv + rkv * Hq * (c.qk_nope_dim + c.v_head_dim);  // kv_a (+ norm), kv_b
    p += Hq * c.v_head_dim * H;                                          // o_proj
  } else {
    p += H * Hq * D + 2 * H * Hkv * D + Hq * D * H;  // q, k, v, o
  }
  if (c.qkv_bias) p += (Hq + 2 * Hkv) * D;
  if (c.arch->qk_norm == QKNorm::PerHead) p += 2 * D;
  if (c.arch->qk_norm == QKNorm::WholeProjection) p += (Hq + Hkv) * D;
  if (!c.is_moe(l)) return p + 3 * H * c.dense_width;
  p += int64_t(c.n_experts) * H;  // router
  p += int64_t(active ? c.top_k : c.n_experts) * 3 * H * c.expert_width;
  p += 3 * H * c.shared_width;
  if (c.shared_width && c.arch->shared == SharedExpertKind::SigmoidGated) p += H;
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
