#include "model/generate.h"

#include <algorithm>
#include <cmath>
#include <random>

namespace moedit {

int argmax(const float* x, int n) {
  int best = 0;
  for (int i = 1; i < n; ++i)
    if (x[i] > x[best]) best = i;
  return best;
}

std::vector<int32_t> generate(const Model& m, const std::vector<int32_t>& prompt, const GenerateOptions& opt) {
  KVCache cache;
  ForwardOptions fo;
  fo.cache = &cache;
  fo.logits_all = false;
  fo.hooks = opt.hooks;
  fo.record_routing = false;
  std::mt19937_64 rng(opt.seed);
  std::vector<int32_t> out;
  std::vector<int32_t> step = prompt;
  const int V = m.config().vocab_size;
  for (int i = 0; i < opt.max_new_tokens; ++i) {
    ForwardOutput f = m.forward({step}, fo);
    const float* lg = f.logits.row(0).data();
    int next;
    if (opt.top_k <= 0) {
      next = argmax(lg, V);
    } else {  // top-k sampling: softmax over the k largest logits
      const int k = std::min(opt.top_k, V);
      std::vector<int> idx(static_cast<size_t>(V));
      for (int j = 0; j < V; ++j) idx[size_t(j)] = j;
      std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                        [lg](int a, int b) { return lg[a] > lg[b] || (lg[a] == lg[b] && a < b); });
      std::vector<double> p(static_cast<size_t>(k));
      for (int j = 0; j < k; ++j) p[size_t(j)] = std::exp(double(lg[idx[size_t(j)]]) - double(lg[idx[0]]));
      std::discrete_distribution<int> dist(p.begin(), p.end());
      next = idx[size_t(dist(rng))];
    }
    out.push_back(next);
    if (next == opt.eos_token_id) break;
    step = {next};
  }
  return out;
}

}  // namespace moedit
