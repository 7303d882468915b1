// config.json parsing, the architecture table, and `moedit info` on the real config.json files of the families.
#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "model/config.h"
#include "model/errors.h"
#include "test_util.h"

namespace moedit {
namespace {

using test::fixture;
using test::run_cli;

double billions(int64_t n) { return std::round(double(n) / 1e8) / 10.0; }

struct RealConfig {
  const char* dir;
  const char* model_type;
  double total_b, active_b;  // as published, rounded to 0.1B
};

// Published sizes: OLMoE-1B-7B 6.9B/1.3B; Qwen1.5-MoE-A2.7B 14.3B/2.7B; Mixtral-8x7B 46.7B/12.9B;
// Qwen3-30B-A3B 30.5B/3.3B; Qwen2-57B-A14B 57.4B/14.2B.
const RealConfig kReal[] = {
    {"olmoe-1b-7b-0924", "olmoe", 6.9, 1.3},
    {"qwen1.5-moe-a2.7b", "qwen2_moe", 14.3, 2.7},
    {"mixtral-8x7b-v0.1", "mixtral", 46.7, 12.9},
    {"qwen3-30b-a3b", "qwen3_moe", 30.5, 3.3},
    {"qwen2-57b-a14b", "qwen2_moe", 57.4, 14.2},
};

TEST(Config, RealConfigsParameterCounts) {
  for (const auto& r : kReal) {
    const ModelConfig c = load_config(fixture(std::string("configs/") + r.dir));
    EXPECT_EQ(c.model_type, r.model_type) << r.dir;
    // Published figures are rounded (or truncated) to 0.1B.
    EXPECT_NEAR(double(c.total_params()) / 1e9, r.total_b, 0.06) << r.dir << " total " << c.total_params();
    EXPECT_NEAR(double(c.active_params()) / 1e9, r.active_b, 0.06) << r.dir << " active " << c.active_params();
  }
}

TEST(Config, DefaultsOfTheConfigurationClass) {
  // OLMoE's file has no rms_norm_eps: transformers' OlmoeConfig default is 1e-5.
  const ModelConfig o = load_config(fixture("configs/olmoe-1b-7b-0924"));
  EXPECT_FLOAT_EQ(o.rms_eps, 1e-5f);
  EXPECT_EQ(o.n_kv_heads, 16);
  EXPECT_EQ(o.head_dim, 128);
  EXPECT_FALSE(o.norm_topk_prob);
  // Qwen3: explicit head_dim differs from hidden / heads.
  const ModelConfig q3 = load_config(fixture("configs/qwen3-30b-a3b"));
  EXPECT_EQ(q3.head_dim, 128);
  EXPECT_EQ(q3.hidden / q3.n_heads, 64);
  EXPECT_TRUE(q3.norm_topk_prob);
  // Mixtral always renormalises.
  const ModelConfig mx = load_config(fixture("configs/mixtral-8x7b-v0.1"));
  EXPECT_TRUE(mx.norm_topk_prob);
  EXPECT_EQ(mx.n_kv_heads, 8);
  EXPECT_FLOAT_EQ(mx.rope_theta, 1e6f);
  // Qwen1.5-MoE: biases, shared expert, every layer sparse.
  const ModelConfig q2 = load_config(fixture("configs/qwen1.5-moe-a2.7b"));
  EXPECT_TRUE(q2.qkv_bias);
  EXPECT_EQ(q2.shared_width, 5632);
  EXPECT_EQ(q2.n_moe_layers(), 24);
}

TEST(Config, SparseStepAndMlpOnlyLayers) {
  nlohmann::json j = {{"model_type", "qwen2_moe"}, {"num_hidden_layers", 6}, {"decoder_sparse_step", 2},
                      {"mlp_only_layers", {3}}, {"hidden_size", 32}, {"num_attention_heads", 4},
                      {"num_key_value_heads", 4}};
  const ModelConfig c = parse_config(j, "config.json");
  const std::vector<bool> want = {false, true, false, false, false, true};
  EXPECT_EQ(c.moe_layer, want);
}

TEST(Config, V5RopeParametersShape) {
  nlohmann::json j = {{"model_type", "olmoe"}, {"hidden_size", 32}, {"num_attention_heads", 4},
                      {"rope_parameters", {{"rope_theta", 5000.0}, {"rope_type", "default"}}}};
  EXPECT_FLOAT_EQ(parse_config(j, "config.json").rope_theta, 5000.f);
}

void expect_input_error(const nlohmann::json& j, const std::string& fragment) {
  try {
    parse_config(j, "cfg.json");
    ADD_FAILURE() << "no error for " << j.dump();
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

TEST(Config, BadValuesNameTheField) {
  const nlohmann::json base = {{"model_type", "mixtral"}, {"hidden_size", 64}, {"num_attention_heads", 4},
                               {"num_key_value_heads", 2}};
  auto with = [&](const char* k, nlohmann::json v) {
    auto j = base;
    j[k] = v;
    return j;
  };
  expect_input_error(with("model_type", "llama"), "cfg.json: field 'model_type' 'llama' is not supported");
  expect_input_error(with("hidden_size", 0), "cfg.json: field 'hidden_size' = 0 is out of range");
  expect_input_error(with("hidden_size", "big"), "cfg.json: field 'hidden_size' must be an integer");
  expect_input_error(with("num_key_value_heads", 3), "field 'num_key_value_heads' = 3 does not divide");
  expect_input_error(with("num_experts_per_tok", 9), "field 'num_experts_per_tok' = 9 exceeds the number of experts");
  expect_input_error(with("num_hidden_layers", -2), "field 'num_hidden_layers' = -2 is out of range");
  expect_input_error(with("rope_scaling", {{"type", "yarn"}, {"factor", 4}}), "type 'yarn' is not supported");
  auto j = base;
  j.erase("model_type");
  expect_input_error(j, "field 'model_type' is missing");
}

TEST(CliInfo, RealOlmoeConfig) {
  const auto r = run_cli("info " + fixture("configs/olmoe-1b-7b-0924") + " --json");
  ASSERT_EQ(r.code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["model_type"], "olmoe");
  EXPECT_EQ(j["num_experts"], 64);
  EXPECT_EQ(j["experts_per_token"], 8);
  EXPECT_DOUBLE_EQ(billions(j["total_params"].get<int64_t>()), 6.9);
  EXPECT_DOUBLE_EQ(billions(j["active_params"].get<int64_t>()), 1.3);
  const auto t = run_cli("info " + fixture("configs/qwen1.5-moe-a2.7b"));
  ASSERT_EQ(t.code, 0) << t.err;
  EXPECT_NE(t.out.find("14.3"), std::string::npos) << t.out;
  EXPECT_NE(t.out.find("2.69 G active"), std::string::npos) << t.out;
}

TEST(CliInfo, BadConfigExitsTwo) {
  test::TempDir d;
  test::write_file(d / "config.json", "{\"model_type\": \"mixtral\", \"hidden_size\": ");
  auto r = run_cli("info " + d.path.string());
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("config.json: not valid JSON"), std::string::npos) << r.err;
  r = run_cli("info " + (d / "nowhere"));
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("nowhere: cannot open"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace moedit
