// AdamW (see train/adamw.h).
#include "train/adamw.h"

#include <cmath>
#include <stdexcept>
#include <string>

#include "io/errors.h"

namespace moedit {

void AdamWOptions::validate() const {
  require_input(lr >= 0, "AdamW: lr must be ≥ 0 (got " + std::to_string(lr) + ")");
  require_input(eps >= 0, "AdamW: eps must be ≥ 0 (got " + std::to_string(eps) + ")");
  require_input(weight_decay >= 0, "AdamW: weight_decay must be ≥ 0 (got " + std::to_string(weight_decay) + ")");
  require_input(beta1 >= 0 && beta1 < 1, "AdamW: beta1 must be in [0, 1) (got " + std::to_string(beta1) + ")");
  require_input(beta2 >= 0 && beta2 < 1, "AdamW: beta2 must be in [0, 1) (got " + std::to_string(beta2) + ")");
}

void adamw_update(float* w, const float* g, float* m, float* v, size_t n, int64_t step, const AdamWOptions& o) {
  // Scalars in double, as PyTorch computes them in Python; the elementwise work in fp32, in its order.
  const double t = double(step);
  const float decay = float(1.0 - o.lr * o.weight_decay);
  const float b2 = float(o.beta2), one_b1 = float(1.0 - o.beta1), one_b2 = float(1.0 - o.beta2);
  const float step_size = float(o.lr / (1.0 - std::pow(o.beta1, t)));
  const float bc2_sqrt = float(std::sqrt(1.0 - std::pow(o.beta2, t)));
  const float eps = float(o.eps);
  for (size_t i = 0; i < n; ++i) {
    w[i] *= decay;
    m[i] += one_b1 * (g[i] - m[i]);  // lerp(m, g, 1 − β₁)
    v[i] = v[i] * b2 + one_b2 * g[i] * g[i];
    const float denom = std::sqrt(v[i]) / bc2_sqrt + eps;
    w[i] -= step_size * (m[i] / denom);
  }
}

AdamW::AdamW(const AdamWOptions& o) : o_(o) { o_.validate(); }

AdamW::State& AdamW::state(const ParamId& p, size_t n) {
  for (State& s : states_)
    if (s.id == p) {
      if (s.m.size() != n) throw std::logic_error("AdamW: " + p.name() + " changed size between steps");
      return s;
    }
  states_.push_back({p, 0, std::vector<float>(n, 0.f), std::vector<float>(n, 0.f)});
  return states_.back();
}

void AdamW::step(Model& m, const WeightGrads<float>& grads) {
  for (size_t i = 0; i < grads.params().size(); ++i) {
    const ParamId& p = grads.params()[i];
    const MatT<float>& g = grads.grad(i);
    State& s = state(p, size_t(g.size()));
    float* w = mutable_param(m, p);
    adamw_update(w, g.data(), s.m.data(), s.v.data(), s.m.size(), ++s.step, o_);
    param_changed(m, p);
  }
}

int64_t AdamW::steps(const ParamId& p) const {
  for (const State& s : states_)
    if (s.id == p) return s.step;
  return 0;
}

size_t AdamW::state_bytes() const {
  size_t n = 0;
  for (const State& s : states_) n += (s.m.size() + s.v.size()) * sizeof(float);
  return n;
}

}  // namespace moedit
