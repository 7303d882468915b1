// Helpers shared by the test files: fixture paths and running the moedit CLI.
#pragma once
#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <utility>
#include <vector>
#include <sys/wait.h>

#include <Eigen/Core>
#include <nlohmann/json.hpp>

#include "kernels/ops.h"
#include "model/config.h"

namespace moedit::test {

inline std::string source_dir() { return MOEDIT_SOURCE_DIR; }

// n normal samples of standard deviation sd (fixed seed).
inline std::vector<float> randn(size_t n, uint64_t seed, float sd = 1.f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.f, sd);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}
inline std::string fixture(const std::string& rel) { return source_dir() + "/tests/fixtures/" + rel; }

// A random symmetric positive definite system (fixed seed): A = L·Lᵀ/(2n) [n, n] for a standard normal L [n, 2n], and
// m standard normal right-hand sides B [n, m].
inline std::pair<Eigen::MatrixXd, Eigen::MatrixXd> random_spd_system(int n, int m, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::normal_distribution<double> nd;
  Eigen::MatrixXd L(n, 2 * n), B(n, m);
  for (Eigen::Index i = 0; i < L.size(); ++i) L.data()[i] = nd(g);
  for (Eigen::Index i = 0; i < B.size(); ++i) B.data()[i] = nd(g);
  return {L * L.transpose() / (2 * n), B};
}

// A fresh scratch directory under the build tree's temp, removed by the caller's TempDir destructor.
struct TempDir {
  std::filesystem::path path;
  TempDir() {
    char tmpl[] = "/tmp/moedit_test_XXXXXX";
    path = ::mkdtemp(tmpl);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string operator/(const std::string& rel) const { return (path / rel).string(); }
};

inline void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
}

inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

struct CliResult {
  int code = -1;
  std::string out, err;
};

// Runs `moedit <args>` (args are passed to the shell as written; quote them yourself).
inline CliResult run_cli(const std::string& args) {
  TempDir tmp;
  const std::string o = tmp / "out", e = tmp / "err";
  const std::string cmd = std::string(MOEDIT_BIN) + " " + args + " >" + o + " 2>" + e + " </dev/null";
  const int st = std::system(cmd.c_str());
  CliResult r;
  r.code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  r.out = read_file(o);
  r.err = read_file(e);
  return r;
}

// Sizes of the tiny random models the unit tests build (defaults: test_forward's).
struct TinyShape {
  int vocab = 97, hidden = 32, layers = 3, inter = 24, moe_inter = 16, experts = 6, shared_inter = 20;
  int qwen3_head_dim = 12, sliding_window = 5;
  double clip_qkv = 0.5;
};

// A tiny config of each family with its distinguishing features switched on: Qwen2-MoE's shared expert and a dense
// layer 1, Qwen3's explicit head_dim and normalised top-k, OLMoE's QKV clipping, Granite's four multipliers and tied
// embeddings, Mixtral's sliding window.
inline ModelConfig tiny_config(const std::string& type, const TinyShape& s = {}) {
  nlohmann::json j = {{"model_type", type},          {"vocab_size", s.vocab},    {"hidden_size", s.hidden},
                      {"num_hidden_layers", s.layers}, {"num_attention_heads", 4}, {"num_key_value_heads", 2},
                      {"intermediate_size", s.inter}, {"moe_intermediate_size", s.moe_inter},
                      {"num_experts_per_tok", 2},    {"rms_norm_eps", 1e-6}};
  j["num_local_experts"] = s.experts;
  j["num_experts"] = s.experts;
  if (type == "qwen2_moe") {
    j["shared_expert_intermediate_size"] = s.shared_inter;
    j["mlp_only_layers"] = {1};
    j["num_key_value_heads"] = 4;
    j["qkv_bias"] = true;
  }
  if (type == "qwen3_moe") {
    j["head_dim"] = s.qwen3_head_dim;
    j["norm_topk_prob"] = true;
  }
  if (type == "olmoe") {
    j["num_key_value_heads"] = 4;
    j["clip_qkv"] = s.clip_qkv;
  }
  if (type == "granitemoe") {
    j["embedding_multiplier"] = 3.0;
    j["residual_multiplier"] = 0.5;
    j["attention_multiplier"] = 0.2;
    j["logits_scaling"] = 2.0;
    j["tie_word_embeddings"] = true;
  }
  if (type == "mixtral") j["sliding_window"] = s.sliding_window;
  return parse_config(j, type + ".json");
}

inline const char* const kFamilies[] = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe"};

// Tiny models gain nothing from threads, and OpenMP's spin-waiting makes them slow on a loaded machine: a test
// holding one runs the kernels serially (restored afterwards).
struct SerialOps {
  int prev = ops::num_threads();
  SerialOps() { ops::set_num_threads(1); }
  ~SerialOps() { ops::set_num_threads(prev); }
};

}  // namespace moedit::test
