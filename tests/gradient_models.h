// Models and data of the gradient tests (tests/test_backward.cpp, tests/test_seam_backward.cpp): every family's tiny
// config with random weights, random matrices, and a standing router edit of each kind.
#pragma once
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "kernels/grad_ops.h"
#include "model/model.h"
#include "test_util.h"
#include "tracing/interventions.h"

namespace moedit::test {

// Smaller than test_forward's models: finite differences in float64 cost a forward pass per coordinate.
inline ModelConfig tiny(const std::string& type) {
  test::TinyShape s;
  s.vocab = 61, s.hidden = 24, s.inter = 20, s.moe_inter = 12, s.experts = 5, s.shared_inter = 14;
  s.qwen3_head_dim = 8, s.sliding_window = 4, s.clip_qkv = 0.9;
  return test::tiny_config(type, s);
}

// Every family's tiny config, and the DeepSeek fixtures' configs (MLA without and with q_lora, interleaved RoPE,
// softmax and sigmoid routers, shared experts, a dense first layer).
inline std::vector<std::pair<std::string, ModelConfig>> gradient_configs() {
  std::vector<std::pair<std::string, ModelConfig>> v;
  for (const char* fam : kFamilies) v.emplace_back(fam, tiny(fam));
  for (const char* fx : {"deepseek_v2", "deepseek_v2_group", "deepseek_v3"})
    v.emplace_back(fx, load_config(test::fixture(std::string("models/") + fx)));
  return v;
}

// body(family, config, model) for every gradient config, the model with random weights (seed, scale 0.3).
template <class F>
void for_each_gradient_model(uint64_t seed, F body) {
  for (const auto& [fam, c] : gradient_configs()) {
    Model m(c, random_weights(c, seed, 0.3f));
    body(fam, c, m);
  }
}

inline MatT<double> random_mat(int r, int c, uint64_t seed, double scale = 1.0) {
  std::mt19937_64 g(seed);
  std::normal_distribution<double> n(0.0, scale);
  MatT<double> m(r, c);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = n(g);
  return m;
}

inline std::vector<float> random_f(size_t n, uint64_t seed, double scale = 1.0) {
  std::mt19937_64 g(seed);
  std::normal_distribution<double> d(0.0, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = float(d(g));
  return v;
}

// Standing router edits (model/router_edit.h) of each kind on every MoE layer of c: steering forms 3, 4, 5 (a vector
// with zeros), then a norm-preserving boost with a mask and an additive boost.
inline std::vector<InterventionSpec> router_edit_specs(const ModelConfig& c) {
  std::vector<InterventionSpec> specs;
  for (int form : {3, 4, 5}) {
    InterventionSpec s;
    s.steer.form = form;
    s.steer.c = form == 3 ? 1.5f : 0.8f;
    for (int l = 0; l < c.n_layers; ++l) {
      if (!c.is_moe(l)) continue;
      s.steer.layers.push_back(l);
      VecF v = VecF::Map(random_f(size_t(c.n_experts), 54 + uint64_t(l)).data(), c.n_experts).cwiseAbs();
      v[1] = 0.f;  // form 5 keeps this expert's own logit
      s.steer.vector.push_back(v);
    }
    specs.push_back(s);
  }
  for (BoostMode mode : {BoostMode::NormPreserving, BoostMode::Add}) {
    InterventionSpec s = specs[1];  // form 4 steering, then boosts (and a mask)
    s.boost_mode = mode;
    for (int l : s.steer.layers) {
      s.boost.push_back({l, 2, 1.3f});
      if (mode == BoostMode::NormPreserving) s.mask.push_back({l, 0});
    }
    specs.push_back(s);
  }
  return specs;
}

}  // namespace moedit::test
