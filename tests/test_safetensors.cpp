// safetensors: round trip through the writer, sharded checkpoints, and every hostile-file case with its exact
// message — through the library and through the CLI (exit code 2).
#include <gtest/gtest.h>

#include <cstring>
#include <nlohmann/json.hpp>

#include "io/errors.h"
#include "io/safetensors.h"
#include "test_util.h"

namespace moedit {
namespace {

using test::TempDir;

// Raw file: u64 header length (or an override) ‖ header ‖ data.
std::string raw_file(const std::string& header, size_t data_bytes, int64_t len_override = -1) {
  std::string s(8, '\0');
  const uint64_t n = len_override >= 0 ? uint64_t(len_override) : header.size();
  std::memcpy(s.data(), &n, 8);
  return s + header + std::string(data_bytes, '\x01');
}

std::string error_of(const std::string& path) {
  try {
    SafeTensorsFile f(path);
  } catch (const InputError& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(SafeTensors, WriteReadRoundTrip) {
  TempDir d;
  const float vals[6] = {1.f, -2.5f, 3.25f, 0.f, 1e-3f, 65504.f};
  std::map<std::string, OwnedTensor> t;
  t["a.f32"] = make_tensor(DType::F32, {2, 3}, vals);
  t["b.bf16"] = make_tensor(DType::BF16, {6}, vals);
  t["c.f16"] = make_tensor(DType::F16, {3, 2}, vals);
  write_safetensors(d / "m.safetensors", t, {{"format", "pt"}});
  SafeTensorsFile f(d / "m.safetensors");
  EXPECT_EQ(f.metadata().at("format"), "pt");
  EXPECT_EQ(f.get("a.f32").shape, (std::vector<int64_t>{2, 3}));
  auto a = f.get("a.f32").to_f32(), b = f.get("b.bf16").to_f32(), c = f.get("c.f16").to_f32();
  for (int i = 0; i < 6; ++i) {
    EXPECT_EQ(a[size_t(i)], vals[i]);
    EXPECT_NEAR(b[size_t(i)], vals[i], std::fabs(vals[i]) * 4e-3);
    EXPECT_NEAR(c[size_t(i)], vals[i], std::fabs(vals[i]) * 1e-3);
  }
  // The data buffer starts 8-byte aligned and no temp file is left behind.
  const std::string bytes = test::read_file(d / "m.safetensors");
  uint64_t n;
  std::memcpy(&n, bytes.data(), 8);
  EXPECT_EQ((8 + n) % 8, 0u);
  for (const auto& e : std::filesystem::directory_iterator(d.path))  // m.safetensors.tmp.<pid> renamed away
    EXPECT_EQ(e.path().filename().string().find(".tmp"), std::string::npos) << e.path();
}

TEST(SafeTensors, ShardedIndex) {
  TempDir d;
  const float v[4] = {1, 2, 3, 4};
  write_safetensors(d / "model-00001-of-00002.safetensors", {{"x", make_f32_tensor({2, 2}, v)}});
  write_safetensors(d / "model-00002-of-00002.safetensors", {{"y", make_f32_tensor({4}, v)}});
  test::write_file(d / "model.safetensors.index.json",
                   R"({"metadata": {"total_size": 32}, "weight_map": {"x": "model-00001-of-00002.safetensors",
                       "y": "model-00002-of-00002.safetensors"}})");
  TensorStore s(d.path.string());
  EXPECT_TRUE(s.has("x"));
  EXPECT_TRUE(s.has("y"));
  EXPECT_EQ(s.get("y").to_f32()[3], 4.f);
  EXPECT_EQ(s.files().size(), 2u);
  try {
    s.get("z");
    ADD_FAILURE();
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("missing tensor 'z'"), std::string::npos);
  }
  test::write_file(d / "model.safetensors.index.json", R"({"weight_map": {"x": "../evil.safetensors"}})");
  try {
    TensorStore bad(d.path.string());
    ADD_FAILURE();
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("names an invalid shard file '../evil.safetensors'"), std::string::npos)
        << e.what();
  }
}

struct Hostile {
  const char* name;
  std::string bytes;
  std::string message;  // expected after "<path>: "
};

std::vector<Hostile> hostile_cases() {
  const std::string ok = R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  return {
      {"too_short", "abc", "file too short for a safetensors header (3 bytes)"},
      {"header_beyond_file", raw_file(ok, 8, 5000), "header length 5000 runs beyond the end of the file (70 bytes)"},
      {"header_over_100mb", raw_file(ok, 8, int64_t(200) << 20), "header length 209715200 exceeds the 100 MB limit"},
      {"not_json", raw_file("{not json", 0), "header is not valid JSON"},
      {"not_object", raw_file("[1,2]", 0), "header is not a JSON object"},
      {"offsets_outside", raw_file(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8),
       "tensor 'w': data_offsets [0, 16) lie outside the data buffer (8 bytes)"},
      {"overlap",
       raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                12),
       "tensors 'a' and 'b' overlap in the data buffer"},
      {"size_mismatch", raw_file(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8),
       "tensor 'w': byte size 8 does not match shape x dtype size (12)"},
      {"unknown_dtype", raw_file(R"({"w":{"dtype":"Q4_K","shape":[2],"data_offsets":[0,8]}})", 8),
       "tensor 'w': unsupported dtype \"Q4_K\""},
      {"negative_shape", raw_file(R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8),
       "tensor 'w': shape has a non-integer or negative entry"},
      {"shape_overflow",
       raw_file(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", 8),
       "tensor 'w': shape product overflows"},
      {"end_before_begin", raw_file(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", 8),
       "tensor 'w': data_offsets end < begin"},
      {"missing_fields", raw_file(R"({"w":{"dtype":"F32"}})", 0),
       "tensor 'w': entry must have dtype, shape and data_offsets"},
  };
}

TEST(SafeTensors, HostileFilesFailCleanly) {
  TempDir d;
  for (const auto& h : hostile_cases()) {
    const std::string p = d / (std::string(h.name) + ".safetensors");
    test::write_file(p, h.bytes);
    EXPECT_EQ(error_of(p), p + ": " + h.message) << h.name;
  }
}

// The same files behind a valid config.json: the CLI prints the message and exits 2.
TEST(SafeTensors, HostileFilesThroughTheCli) {
  TempDir d;
  const std::string cfg =
      R"({"model_type":"mixtral","vocab_size":8,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,
          "num_attention_heads":2,"num_key_value_heads":1,"num_local_experts":2,"num_experts_per_tok":1})";
  for (const auto& h : hostile_cases()) {
    const std::string dir = d / h.name;
    std::filesystem::create_directories(dir);
    test::write_file(dir + "/config.json", cfg);
    test::write_file(dir + "/model.safetensors", h.bytes);
    const auto r = test::run_cli("logits " + dir + " --ids 1,2");
    EXPECT_EQ(r.code, 2) << h.name << ": " << r.err;
    EXPECT_EQ(r.err, "moedit: error: " + dir + "/model.safetensors: " + h.message + "\n") << h.name;
  }
}

TEST(SafeTensors, MissingAndMisshapenTensorsThroughTheCli) {
  TempDir d;
  const std::string cfg =
      R"({"model_type":"mixtral","vocab_size":8,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,
          "num_attention_heads":2,"num_key_value_heads":1,"num_local_experts":2,"num_experts_per_tok":1})";
  test::write_file(d / "config.json", cfg);
  std::vector<float> z(64, 0.f);
  write_safetensors(d / "model.safetensors", {{"model.embed_tokens.weight", make_f32_tensor({8, 4}, z.data())}});
  auto r = test::run_cli("logits " + d.path.string() + " --ids 1");
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("tensor 'model.embed_tokens.weight' has shape [8, 4], expected [8, 8]"), std::string::npos)
      << r.err;
  write_safetensors(d / "model.safetensors", {{"model.embed_tokens.weight", make_f32_tensor({8, 8}, z.data())}});
  r = test::run_cli("logits " + d.path.string() + " --ids 1");
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("missing tensor 'lm_head.weight'"), std::string::npos) << r.err;
  std::filesystem::remove(d / "model.safetensors");
  r = test::run_cli("logits " + d.path.string() + " --ids 1");
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("no model.safetensors or model.safetensors.index.json"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace moedit
