// Helpers shared by the editing test files (test_edit.cpp, test_keystats.cpp, test_edit_cli.cpp, test_eval_steer.cpp):
// fixture paths, a random id corpus, a fixed id-level edit request, the v* gradient by finite differences, moment
// sources and a fixture copy with a character tokenizer.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "editor/keystats.h"
#include "editor/rome.h"
#include "model/model.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"

namespace moedit::edit_test {

namespace fs = std::filesystem;

// OMP_NUM_THREADS=1 for the CLI processes a test starts (test::SerialOps does it for this process).
struct SerialCli {
  SerialCli() { ::setenv("OMP_NUM_THREADS", "1", 1); }
  ~SerialCli() { ::unsetenv("OMP_NUM_THREADS"); }
};

// A 60-line text corpus for the CLI's key statistics.
inline void write_edit_corpus(const fs::path& file) {
  std::string corpus;
  for (int i = 0; i < 60; ++i)
    corpus += "Paragraph " + std::to_string(i) + ": the capital of a land is a city, and rivers run to the sea.\n";
  test::write_file(file, corpus);
}

inline std::string fixture_model(const std::string& name) { return test::fixture("models/" + name); }

// Random id sequences (a stand-in corpus for key statistics).
inline std::vector<std::vector<int32_t>> random_corpus(int n, int len, int vocab, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::uniform_int_distribution<int> d(0, vocab - 1);
  std::vector<std::vector<int32_t>> v(static_cast<size_t>(n));
  for (auto& s : v)
    for (int i = 0; i < len; ++i) s.push_back(d(g));
  return v;
}

// A fixed edit request at the id level: 4 "templates" (bare first), a KL prompt, a 2-token target.
inline EditIds fixed_ids() {
  EditIds ids;
  ids.prompts = {{11, 12, 13, 14, 15}, {3, 4, 5, 6, 11, 12, 13, 14, 15}, {7, 8, 11, 12, 13, 14, 15},
                 {9, 10, 20, 21, 22, 11, 12, 13, 14, 15}};
  ids.subject_last = {1, 5, 3, 6};  // subject = tokens 11, 12
  ids.kl_prompt = {11, 12, 30, 31};
  ids.kl_subject_last = 1;
  ids.target = {40, 41};
  return ids;
}

// ‖a − b‖ / ‖b‖.
inline double rel(const Eigen::VectorXd& a, const Eigen::VectorXd& b) {
  return (a - b).norm() / std::max(b.norm(), 1e-300);
}

// Central differences of the v* loss at δ, one coordinate at a time.
inline Eigen::VectorXd fd_gradient(VStarProblem<double>& P, const Eigen::VectorXd& delta) {
  Eigen::VectorXd fd(delta.size());
  const double h = 1e-5 * std::max(1.0, delta.norm());
  for (int i = 0; i < int(delta.size()); ++i) {
    Eigen::VectorXd d = delta;
    d[i] += h;
    const double fp = P.eval(d).loss;
    d[i] -= 2 * h;
    fd[i] = (fp - P.eval(d).loss) / (2 * h);
  }
  return fd;
}

inline MomentSource moments_from(std::vector<SecondMoment> stats) {
  auto shared = std::make_shared<std::vector<SecondMoment>>(std::move(stats));
  return [shared](int layer, int expert) -> std::shared_ptr<const SecondMoment> {
    for (const auto& s : *shared)
      if (s.layer == layer && s.expert == expert) return std::make_shared<SecondMoment>(s);
    return nullptr;
  };
}

// A character-level byte-level BPE tokenizer (newline, space, printable ASCII; "<|endoftext|>" special) whose 97 ids
// fit the fixtures' vocabularies, so the text API and the CLI can run on them.
inline std::string char_tokenizer_json() {
  nlohmann::json vocab = nlohmann::json::object();
  vocab["\u010a"] = 0;  // '\n'
  vocab["\u0120"] = 1;  // ' '
  int id = 2;
  for (int b = 33; b <= 126; ++b) vocab[std::string(1, char(b))] = id++;
  nlohmann::json j = {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens",
       {{{"id", id}, {"content", "<|endoftext|>"}, {"single_word", false}, {"lstrip", false}, {"rstrip", false},
         {"normalized", false}, {"special", true}}}},
      {"normalizer", nullptr},
      {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}}},
      {"post_processor", nullptr},
      {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
      {"model",
       {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", nullptr},
        {"end_of_word_suffix", nullptr}, {"fuse_unk", false}, {"byte_fallback", false}, {"ignore_merges", false},
        {"vocab", vocab}, {"merges", nlohmann::json::array()}}}};
  return j.dump();
}

// A copy of a fixture checkpoint with the character tokenizer added.
inline std::string model_with_tokenizer(const test::TempDir& tmp, const std::string& fixture) {
  const std::string dir = tmp / fixture;
  fs::create_directories(dir);
  for (const auto& e : fs::directory_iterator(fixture_model(fixture)))
    if (e.path().filename() != "reference.safetensors") fs::copy_file(e.path(), dir + "/" + e.path().filename().string());
  test::write_file(dir + "/tokenizer.json", char_tokenizer_json());
  test::write_file(dir + "/tokenizer_config.json", R"({"eos_token": "<|endoftext|>"})");
  return dir;
}

// The same fixture copy, loaded: its model and its (character) tokenizer.
struct WithTokenizer {
  std::shared_ptr<Model> m;
  Tokenizer tok;
};
inline WithTokenizer load_with_tokenizer(const test::TempDir& tmp, const std::string& fixture) {
  const std::string dir = model_with_tokenizer(tmp, fixture);
  return {Model::load(dir), Tokenizer::from_file(dir)};
}

}  // namespace moedit::edit_test
