// Helpers shared by the routing test files: HF fixture checkpoints with their reference outputs, a double softmax,
// a character-level tokenizer and a two-record CounterFact file.
#pragma once
#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "io/safetensors.h"
#include "model/model.h"
#include "test_util.h"

namespace moedit::routing_test {

struct Fixture {
  std::string dir;
  std::shared_ptr<Model> model;
  std::unique_ptr<SafeTensorsFile> ref;
  std::vector<std::vector<int32_t>> seqs;
  explicit Fixture(const std::string& name) : dir(test::fixture("models/" + name)) {
    model = Model::load(dir);
    ref = std::make_unique<SafeTensorsFile>(dir + "/reference.safetensors");
    const int n = std::stoi(ref->metadata().at("n_seqs"));
    for (int b = 0; b < n; ++b) {
      auto f = ref->get("input_ids." + std::to_string(b)).to_f32();
      seqs.emplace_back(f.begin(), f.end());
    }
  }
  const ModelConfig& cfg() const { return model->config(); }
  // Reference [L, S, X] tensor of sequence b as a matrix [L·S, X].
  MatR mat(const std::string& what, int b) const {
    const auto& t = ref->get(what + "." + std::to_string(b));
    const int64_t rows = int64_t(cfg().n_layers) * int64_t(seqs[size_t(b)].size());
    MatR m(rows, t.numel() / rows);
    t.to_f32(m.data());
    return m;
  }
};

// Full softmax of one row of reference router logits, in double.
inline std::vector<double> softmax_d(const float* z, int E) {
  double mx = -1e300;
  for (int e = 0; e < E; ++e) mx = std::max(mx, double(z[e]));
  std::vector<double> p(static_cast<size_t>(E));
  double s = 0;
  for (int e = 0; e < E; ++e) s += (p[size_t(e)] = std::exp(double(z[e]) - mx));
  for (auto& v : p) v /= s;
  return p;
}

// A byte-level BPE tokenizer over printable ASCII with no merges: one token per character, id = code − 32 (space is
// 'Ġ'), so token positions can be worked out by hand. Fits the fixtures' 128-token vocabularies.
inline std::string char_tokenizer_json() {
  using json = nlohmann::json;
  json vocab = json::object();
  for (int ch = 33; ch < 127; ++ch) vocab[std::string(1, char(ch))] = ch - 32;
  vocab["\xC4\xA0"] = 0;  // U+0120 'Ġ' = the byte-level image of ' '
  json j = {{"version", "1.0"},
            {"truncation", nullptr},
            {"padding", nullptr},
            {"added_tokens", json::array()},
            {"normalizer", nullptr},
            {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true},
                               {"use_regex", true}}},
            {"post_processor", nullptr},
            {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true},
                         {"use_regex", true}}},
            {"model", {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr},
                       {"continuing_subword_prefix", nullptr}, {"end_of_word_suffix", nullptr},
                       {"fuse_unk", false}, {"byte_fallback", false}, {"ignore_merges", false},
                       {"vocab", vocab}, {"merges", json::array()}}}};
  return j.dump();
}

inline constexpr const char* kMiniCounterFact = R"([
 {"case_id": 7, "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
  "target_new": {"str": "English"}, "target_true": {"str": "French"}},
  "paraphrase_prompts": ["So it goes. Danielle Darrieux, a native", "Danielle Darrieux spoke"]},
 {"case_id": 9, "requested_rewrite": {"prompt": "{} plays the", "subject": "Ed Roe",
  "target_new": {"str": "piano"}, "target_true": {"str": "guitar"}},
  "paraphrase_prompts": ["Who knows? ed roe plays"]}
])";

}  // namespace moedit::routing_test
