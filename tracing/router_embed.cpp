// Router embeddings (see tracing/router_embed.h).
#include "tracing/router_embed.h"

#include "io/npy.h"
#include "tracing/routing_profile.h"

#include <stdexcept>

namespace moedit {

namespace {

// Frequencies [layers.size(), E] of tokens [t0, t1) of one routed sequence (float32 of the exact quotient).
MatR frequencies(const SequenceRouting& r, const std::vector<int>& layers, int E, int t0, int t1) {
  Eigen::MatrixXd counts = Eigen::MatrixXd::Zero(Eigen::Index(layers.size()), E);
  count_experts(r, layers, t0, t1, counts);
  return (counts / double(t1 - t0)).cast<float>();
}

}  // namespace

std::vector<RouterEmbedding> router_embeddings(const Model& m, const std::vector<std::vector<int32_t>>& texts,
                                               const EmbedOptions& opt) {
  for (size_t i = 0; i < texts.size(); ++i)
    if (texts[i].empty()) throw std::invalid_argument("router_embeddings: text " + std::to_string(i) + " has no tokens");
  RoutingOptions ro = opt.routing;
  ro.probabilities = false;  // counts only: no router-logit capture
  const std::vector<SequenceRouting> routing = capture_routing(m, texts, ro);
  const std::vector<int> layers = moe_layers(m.config());
  const int E = m.config().n_experts;
  std::vector<RouterEmbedding> out;
  for (size_t i = 0; i < texts.size(); ++i) {
    const int T = routing[i].n_tokens();
    out.push_back({int(i), 0, T, false, frequencies(routing[i], layers, E, 0, T)});
  }
  if (opt.window > 0)
    for (size_t i = 0; i < texts.size(); ++i) {
      const int T = routing[i].n_tokens();
      for (int s = 0; s < T; s += opt.window) {
        const int e = std::min(T, s + opt.window);
        out.push_back({int(i), s, e - s, true, frequencies(routing[i], layers, E, s, e)});
      }
    }
  return out;
}

std::string embeddings_npy(const std::vector<RouterEmbedding>& e) {
  const size_t L = e.empty() ? 0 : size_t(e[0].freq.rows()), E = e.empty() ? 0 : size_t(e[0].freq.cols());
  std::vector<float> v;
  v.reserve(e.size() * L * E);
  for (const auto& x : e) {
    if (size_t(x.freq.rows()) != L || size_t(x.freq.cols()) != E) throw std::logic_error("embeddings_npy: shapes differ");
    v.insert(v.end(), x.freq.data(), x.freq.data() + x.freq.size());
  }
  return npy_f32({e.size(), L, E}, v);
}

}  // namespace moedit
