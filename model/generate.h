// Text continuation with a KV cache: greedy or top-k sampling (seeded).
#pragma once
#include <cstdint>
#include <vector>

#include "model/model.h"

namespace moedit {

struct GenerateOptions {
  int max_new_tokens = 16;
  int top_k = 0;          // 0 = greedy (argmax; ties → lowest id)
  uint64_t seed = 0;      // sampling seed (std::mt19937_64; not torch's generator)
  int eos_token_id = -1;  // stop after emitting it (-1: never)
  const Hooks* hooks = nullptr;
};

// Returns only the new tokens.
std::vector<int32_t> generate(const Model& m, const std::vector<int32_t>& prompt, const GenerateOptions& opt);

// Index of the largest entry (lowest index on ties).
int argmax(const float* x, int n);

}  // namespace moedit
