// The bad-input matrix: every malformed input the README lists, run through the CLI, must print its message and
// exit with code 2. Each case's message must also appear in README.md's matrix, so the two cannot drift apart.
#include <gtest/gtest.h>

#include <filesystem>
#include <functional>

#include <nlohmann/json.hpp>

#include "io/safetensors.h"
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

// The bundled demo model: the smallest checkpoint with a tokenizer (text-level commands need one).
std::string demo_model() { return test::source_dir() + "/models/moedit-demo"; }

// The demo model's config and weights with `tokenizer_json` as tokenizer.json; the `tokenize DIR --text hi` flags.
std::string tokenizer_text_case(const TempDir& d, const std::string& tokenizer_json) {
  for (const char* f : {"config.json", "model.safetensors"})
    std::filesystem::copy_file(demo_model() + "/" + f, d / f);
  write_file(d / "tokenizer.json", tokenizer_json);
  return "tokenize " + d.path.string() + " --text hi";
}

// As above, with the demo model's own tokenizer.json after `edit`.
std::string tokenizer_case(const TempDir& d, const std::function<void(nlohmann::json&)>& edit) {
  auto j = nlohmann::json::parse(test::read_file(demo_model() + "/tokenizer.json"));
  edit(j);
  return tokenizer_text_case(d, j.dump());
}

// Flags for a one-fact text-level edit of the demo model; `extra` replaces or adds flags.
std::string edit_case(const std::string& extra) {
  return "edit " + demo_model() + " --subject Rome --target-new Paris " + extra;
}

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
      // tokenizer.json
      {"tokenizer_not_json", [](const TempDir& d) { return tokenizer_text_case(d, "{\"model\": "); },
       "tokenizer.json: malformed JSON"},
      {"tokenizer_not_bpe",
       [](const TempDir& d) { return tokenizer_case(d, [](nlohmann::json& j) { j["model"]["type"] = "WordPiece"; }); },
       "field 'model.type': unsupported model type 'WordPiece' (only BPE is supported)"},
      {"tokenizer_merge_unknown_token",
       [](const TempDir& d) {
         return tokenizer_case(d, [](nlohmann::json& j) {
           j["model"]["merges"].insert(j["model"]["merges"].begin(), nlohmann::json::array({"zzq", "qqz"}));
         });
       },
       "field 'model.merges[0]': token 'zzq' is not in model.vocab"},
      {"tokenizer_merge_result_unknown",
       [](const TempDir& d) {
         // "t" + "\u0120" (byte-level space) is not a token of the demo vocabulary.
         return tokenizer_case(d, [](nlohmann::json& j) {
           j["model"]["merges"].insert(j["model"]["merges"].begin(), nlohmann::json::array({"t", "\u0120"}));
         });
       },
       "field 'model.merges[0]': merged token 't\u0120' is not in model.vocab"},
      // trace
      {"trace_subject_not_in_prompt",
       [](const TempDir&) { return "trace " + demo_model() + " --prompt \"Rome is in\" --subject Paris"; },
       "subject 'Paris' is not in the prompt 'Rome is in'"},
      {"trace_unknown_kind",
       [](const TempDir&) { return "trace " + demo_model() + " --prompt \"Rome is in\" --subject Rome --kinds foo"; },
       "--kinds: unknown kind 'foo' (expected resid, attn, moe, expert or shared)"},
      {"trace_bad_noise_rule",
       [](const TempDir&) { return "trace " + demo_model() + " --prompt \"Rome is in\" --subject Rome --noise zz"; },
       "--noise: 'zz' is not a noise rule (s<F>, u<F> or a non-negative σ, e.g. s3, u0.5, 0.1)"},
      {"trace_together_zero",
       [](const TempDir& d) {
         return "trace " + demo_model() + " --dataset " + test::source_dir() +
                "/datasets/data/counterfact/counterfact_preknown.json --out " + (d / "t") + " --together 0";
       },
       "--together: Value 0 not in range 1 to 4096"},
      // edit
      {"edit_subject_not_in_prompt",
       [](const TempDir&) {
         return "edit " + demo_model() + " --subject Paris --prompt \"Rome is in\" --target-new Berlin --layer 0";
       },
       "the subject 'Paris' is not in the prompt 'Rome is in' (write {} where the subject goes)"},
      {"edit_empty_target",
       [](const TempDir&) {
         return "edit " + demo_model() + " --subject Rome --prompt \"{} is in\" --target-new \"\" --layer 0";
       },
       "--target-new is empty"},
      {"edit_unknown_expert", [](const TempDir&) { return edit_case("--prompt \"{} is in\" --target 0:99"); },
       "expert 99 does not exist: layer 0 has 8 experts"},
      {"edit_layer_out_of_range", [](const TempDir&) { return edit_case("--prompt \"{} is in\" --layer 9"); },
       "layer 9 is out of range [0, 4)"},
      {"edit_unknown_objective",
       [](const TempDir&) { return edit_case("--prompt \"{} is in\" --layer 0 --objective best"); },
       "--objective 'best': expected rome or exact"},
      {"edit_unknown_save_dtype",
       [](const TempDir& d) { return edit_case("--prompt \"{} is in\" --layer 0 --save " + (d / "out") + " --save-dtype f8"); },
       "--save-dtype 'f8': expected checkpoint or f32"},
      {"edit_request_without_subject",
       [](const TempDir& d) {
         write_file(d / "req.json", R"([{"prompt": "{} is in", "target_new": {"str": "Paris"}}])");
         return "edit " + demo_model() + " --layer 0 --requests " + (d / "req.json");
       },
       "req.json[0]: field 'subject' is missing"},
      // eval and key statistics
      {"zsre_record_without_answers",
       [](const TempDir& d) {
         write_file(d / "z.json", R"([{"subject": "Paris", "src": "Where is Paris?", "rephrase": "Paris is where?"}])");
         return "eval " + demo_model() + " --layer 0 --format zsre --dataset " + (d / "z.json") + " --out " + (d / "o");
       },
       "z.json: record 0: field 'answers' missing (expected a string or a non-empty list of strings)"},
      {"eval_bad_shard",
       [](const TempDir& d) {
         return "eval " + demo_model() + " --layer 0 --shard 3/2 --dataset " +
                test::source_dir() + "/datasets/data/counterfact/counterfact_preknown.json --out " + (d / "o");
       },
       "--shard '3/2': expected i/n with 0 <= i < n"},
      {"eval_layer_not_moe",
       [](const TempDir& d) {
         return "eval " + demo_model() + " --layer 7 --dataset " + test::source_dir() +
                "/datasets/data/counterfact/counterfact_preknown.json --out " + (d / "o");
       },
       "--layer 7 is not an MoE layer of this model"},
      {"stats_corpus_missing",
       [](const TempDir& d) { return "stats " + demo_model() + " --layer 0 --corpus " + (d / "nofile.txt"); },
       "nofile.txt' cannot be read"},
      {"embed_no_texts", [](const TempDir& d) { return "embed " + demo_model() + " --out " + (d / "e.json"); },
       "give exactly one of --corpus FILE and --dataset FILE"},
      {"embed_jsonl_without_text",
       [](const TempDir& d) {
         write_file(d / "c.jsonl", "{\"text\": \"a b\"}\n{\"label\": \"x\"}\n");
         return "embed " + demo_model() + " --corpus " + (d / "c.jsonl") + " --out " + (d / "e.json");
       },
       "c.jsonl: line 2: field 'text' (a string) is missing"},
      {"steer_row_length",
       [](const TempDir& d) {
         write_file(d / "s.json", R"({"layers": [1], "vector": [[1, 0]]})");
         return "logits " + demo_model() + " --ids 1,2 --steer " + (d / "s.json");
       },
       "the row of layer 1 has 2 entries, the model 8 experts"},
      {"steer_dense_layer_or_range",
       [](const TempDir& d) {
         write_file(d / "s.json", R"({"layers": [9], "vector": [[1, 0, 0, 0, 0, 0, 0, 0]]})");
         return "logits " + demo_model() + " --ids 1,2 --steer " + (d / "s.json");
       },
       "layer 9 out of range (the model has 4 layers, 0..3)"},
      {"triggers_without_texts", [](const TempDir&) { return "experts " + demo_model() + " --triggers 0:1"; },
       "--triggers needs the texts to count on: --text, --ids or --corpus"},
      {"unknown_device", [](const TempDir&) { return "logits " + demo_model() + " --ids 1,2 --device tpu"; },
       "--device tpu: unknown device 'tpu' (expected cpu, cuda or cuda:N)"},
      {"gpu_memory_cap_size",
       [](const TempDir&) { return "logits " + demo_model() + " --ids 1,2 --max-gpu-memory lots"; },
       "--max-gpu-memory lots: expected a size such as 40GB, 512MiB or a number of bytes"},
      {"gpu_memory_cap_on_cpu",
       [](const TempDir&) { return "logits " + demo_model() + " --ids 1,2 --device cpu --max-gpu-memory 4GB"; },
       "--max-gpu-memory: --device cpu has no GPU memory to cap"},
      {"unknown_precision", [](const TempDir&) { return "logits " + demo_model() + " --ids 1,2 --precision fp8"; },
       "--precision fp8: unknown precision 'fp8' (expected bf16 or fp32)"},
      {"bf16_on_cpu",
       [](const TempDir&) { return "logits " + demo_model() + " --ids 1,2 --device cpu --precision bf16"; },
       "--precision bf16: bf16 runs on a GPU's tensor cores; the cpu backend computes in fp32"},
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
