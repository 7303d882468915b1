// Checks shared by the parity tests: a model's logits are bit for bit the same batched or alone, and decoded
// through the KV cache or recomputed in full.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "model/model.h"
#include "test_util.h"

namespace moedit::test {

// The fixture checkpoints that carry HF reference outputs (tests/fixtures/models/*/reference.safetensors).
inline std::vector<std::string> fixture_names() {
  std::vector<std::string> v;
  for (const auto& e : std::filesystem::directory_iterator(fixture("models")))
    if (e.is_directory() && std::filesystem::exists(e.path() / "reference.safetensors"))
      v.push_back(e.path().filename().string());
  std::sort(v.begin(), v.end());
  return v;
}

// The sequences a fixture's HF reference ran (input_ids.{b} of its reference.safetensors).
inline std::vector<std::vector<int32_t>> reference_inputs(const std::string& dir) {
  SafeTensorsFile ref(dir + "/reference.safetensors");
  std::vector<std::vector<int32_t>> seqs;
  for (int b = 0; b < std::stoi(ref.metadata().at("n_seqs")); ++b) {
    const auto f = ref.get("input_ids." + std::to_string(b)).to_f32();
    seqs.emplace_back(f.begin(), f.end());
  }
  return seqs;
}

inline void expect_batch_and_cache_invariant(const Model& m, const std::vector<std::vector<int32_t>>& seqs) {
  const ForwardOutput all = m.forward(seqs);
  int row = 0;
  for (const auto& s : seqs) {
    const int n = int(s.size());
    const MatR one = m.forward({s}).logits;
    // Batch-invariant kernels: bit for bit, batched or alone, and decoded through the cache.
    EXPECT_EQ((all.logits.middleRows(row, n) - one).cwiseAbs().maxCoeff(), 0.f) << m.path();
    // Prefill half, then decode one token at a time through the cache.
    KVCache cache;
    ForwardOptions o;
    o.cache = &cache;
    MatR inc(n, one.cols());
    const int h = n / 2;
    inc.topRows(h) = m.forward({{s.begin(), s.begin() + h}}, o).logits;
    for (int t = h; t < n; ++t) inc.row(t) = m.forward({{s[size_t(t)]}}, o).logits.row(0);
    EXPECT_EQ((inc - one).cwiseAbs().maxCoeff(), 0.f) << m.path();
    row += n;
  }
}

}  // namespace moedit::test
