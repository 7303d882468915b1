// The bad-input matrix: every malformed input the README lists, run through the CLI, must print its message and
// exit with code 2. Each case's message must also appear in README.md's matrix, so the two cannot drift apart.
#include <gtest/gtest.h>

#include <filesystem>
#include <functional>

#include "model/safetensors.h"
#include "test_util.h"

namespace moedit {
namespace {

using test::TempDir;
using test::write_file;

struct BadInput {
  std::string name;
  std::function<std::string(const TempDir&)> setup;  // writes files, returns the CLI arguments
  std::string message;                               // must appear in stderr (and in README.md)
};

const char* kTinyConfig =
    R"({"model_type":"mixtral","vocab_size":8,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,
        "num_attention_heads":2,"num_key_value_heads":1,"num_local_experts":2,"num_experts_per_tok":1})";

std::string config_case(const TempDir& d, const std::string& json) {
  write_file(d / "config.json", json);
  return "info " + d.path.string();
}

std::string fixture_model() { return test::fixture("models/qwen2_moe"); }

std::vector<BadInput> cases() {
  std::vector<BadInput> v = {
      {"config_not_json", [](const TempDir& d) { return config_case(d, "{\"model_type\": "); },
       "config.json: not valid JSON"},
      {"config_missing", [](const TempDir& d) { return "info " + (d / "none"); },
       "none: cannot open (is this a Hugging Face checkpoint folder?)"},
      {"unknown_model_type", [](const TempDir& d) { return config_case(d, R"({"model_type": "llama"})"); },
       "field 'model_type' 'llama' is not supported"},
      {"zero_hidden_size",
       [](const TempDir& d) { return config_case(d, R"({"model_type": "olmoe", "hidden_size": 0})"); },
       "field 'hidden_size' = 0 is out of range"},
      {"heads_not_dividing",
       [](const TempDir& d) {
         return config_case(d, R"({"model_type":"mixtral","num_attention_heads":32,"num_key_value_heads":5})");
       },
       "field 'num_key_value_heads' = 5 does not divide num_attention_heads = 32"},
      {"topk_over_experts",
       [](const TempDir& d) {
         return config_case(d, R"({"model_type":"olmoe","num_experts":4,"num_experts_per_tok":8})");
       },
       "field 'num_experts_per_tok' = 8 exceeds the number of experts (4)"},
      {"unsupported_rope",
       [](const TempDir& d) {
         return config_case(d, R"({"model_type":"olmoe","rope_scaling":{"type":"dynamic","factor":2}})");
       },
       "field 'rope_scaling' type 'dynamic' is not supported (default, linear, yarn)"},
      {"missing_tensor",
       [](const TempDir& d) {
         write_file(d / "config.json", kTinyConfig);
         std::vector<float> z(64, 0.f);
         write_safetensors(d / "model.safetensors", {{"model.embed_tokens.weight", make_f32_tensor({8, 8}, z.data())},
                                                     {"lm_head.weight", make_f32_tensor({8, 8}, z.data())},
                                                     {"model.norm.weight", make_f32_tensor({8}, z.data())}});
         return "logits " + d.path.string() + " --ids 1";
       },
       "missing tensor 'model.layers.0.input_layernorm.weight'"},
      {"no_weights",
       [](const TempDir& d) {
         write_file(d / "config.json", kTinyConfig);
         return "logits " + d.path.string() + " --ids 1";
       },
       "no model.safetensors or model.safetensors.index.json"},
      {"index_without_weight_map",
       [](const TempDir& d) {
         write_file(d / "config.json", kTinyConfig);
         write_file(d / "model.safetensors.index.json", R"({"metadata": {}})");
         return "logits " + d.path.string() + " --ids 1";
       },
       "model.safetensors.index.json: missing or malformed field 'weight_map'"},
      {"index_escaping_folder",
       [](const TempDir& d) {
         write_file(d / "config.json", kTinyConfig);
         write_file(d / "model.safetensors.index.json", R"({"weight_map": {"x": "../../etc/passwd"}})");
         return "logits " + d.path.string() + " --ids 1";
       },
       "weight_map['x'] names an invalid shard file '../../etc/passwd'"},
      {"ids_not_numbers", [](const TempDir&) { return "logits " + fixture_model() + " --ids 1,two,3"; },
       "--ids: 'two' is not a token id"},
      {"id_outside_vocab", [](const TempDir&) { return "logits " + fixture_model() + " --ids 1,100000"; },
       "token id 100000 is outside the vocabulary [0, 128)"},
      {"counterfact_not_json",
       [](const TempDir& d) {
         write_file(d / "cf.json", "[{\"case_id\": 1,");
         return "demo --model " + fixture_model() + " --dataset " + (d / "cf.json");
       },
       "cf.json: not valid JSON"},
      {"counterfact_no_subject",
       [](const TempDir& d) {
         write_file(d / "cf.json", R"([{"case_id": 7, "requested_rewrite": {"prompt": "{} is in",
             "target_new": {"str": "Paris"}, "target_true": {"str": "Rome"}}}])");
         return "demo --model " + fixture_model() + " --dataset " + (d / "cf.json");
       },
       "record 0 (case_id 7): field 'requested_rewrite.subject' missing or not a string"},
      {"counterfact_no_placeholder",
       [](const TempDir& d) {
         write_file(d / "cf.json", R"([{"case_id": 3, "requested_rewrite": {"prompt": "Rome is in", "subject": "Rome",
             "target_new": {"str": "Paris"}, "target_true": {"str": "Italy"}}}])");
         return "demo --model " + fixture_model() + " --dataset " + (d / "cf.json");
       },
       "field 'requested_rewrite.prompt' has no '{}' placeholder for the subject"},
      {"counterfact_empty_target",
       [](const TempDir& d) {
         write_file(d / "cf.json", R"([{"case_id": 4, "requested_rewrite": {"prompt": "{} is in", "subject": "Rome",
             "target_new": {"str": ""}, "target_true": {"str": "Italy"}}}])");
         return "demo --model " + fixture_model() + " --dataset " + (d / "cf.json");
       },
       "field 'requested_rewrite.target_new.str' is empty"},
      {"unknown_flag", [](const TempDir&) { return "info --no-such-flag"; }, "The following argument was not expected: --no-such-flag"},
  };
  return v;
}

TEST(BadInputs, EachCaseExitsTwoWithItsMessage) {
  for (const auto& c : cases()) {
    TempDir d;
    const auto r = test::run_cli(c.setup(d));
    EXPECT_EQ(r.code, 2) << c.name << ": " << r.err;
    EXPECT_NE(r.err.find(c.message), std::string::npos) << c.name << ": stderr was: " << r.err;
  }
}

TEST(BadInputs, ReadmeMatrixListsEveryCase) {
  const std::string readme = test::read_file(test::source_dir() + "/README.md");
  for (const auto& c : cases()) EXPECT_NE(readme.find(c.message), std::string::npos) << c.name << " missing from README";
}

}  // namespace
}  // namespace moedit
