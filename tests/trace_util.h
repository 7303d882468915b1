// Helpers shared by the causal-tracing test files: loading a fixture model, running single-threaded, and a
// character-level tokenizer.
#pragma once
#include <omp.h>

#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "kernels/ops.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"
#include "test_util.h"

namespace moedit::trace_test {

inline std::shared_ptr<Model> fixture_model(const std::string& name) { return Model::load(test::fixture("models/" + name)); }

// Tiny models on a shared machine: one thread avoids OpenMP barrier stalls (the results do not depend on it).
struct OneThread {
  int ops_prev = ops::num_threads(), omp_prev = omp_get_max_threads();
  OneThread() {
    ops::set_num_threads(1);
    omp_set_num_threads(1);
  }
  ~OneThread() {
    ops::set_num_threads(ops_prev);
    omp_set_num_threads(omp_prev);
  }
};

// A character-level BPE tokenizer (no merges): printable ASCII c → id c, which fits the 128-token fixtures.
inline Tokenizer char_tokenizer() {
  nlohmann::json vocab = nlohmann::json::object();
  for (int ch = 32; ch < 127; ++ch) vocab[std::string(1, char(ch))] = ch;
  nlohmann::json j = {{"version", "1.0"},
                      {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", nlohmann::json::array()}}}};
  return Tokenizer::from_json(j.dump(), "char-tokenizer.json");
}

}  // namespace moedit::trace_test
