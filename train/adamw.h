// AdamW with torch.optim.AdamW's semantics (amsgrad off, maximize off): per parameter w, gradient g, step t ≥ 1,
//   w ← w·(1 − lr·weight_decay)                      (decoupled weight decay, before the Adam update)
//   m ← β₁·m + (1 − β₁)·g,   v ← β₂·v + (1 − β₂)·g²
//   w ← w − lr/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + eps)
// State (m, v) is fp32, zero at a parameter's first step, kept per parameter (ParamId) across steps. As in PyTorch, a
// parameter with a gradient is stepped even where that gradient is zero (its weights still decay).
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "model/weight_grads.h"

namespace moedit {

struct AdamWOptions {  // torch.optim.AdamW's defaults
  double lr = 1e-3;
  double beta1 = 0.9, beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;
  // InputError naming the option out of range (lr, eps, weight_decay ≥ 0; betas in [0, 1)).
  void validate() const;
};

// One AdamW update of n values in place: weights w, gradient g, state m and v; step = the step count after this one
// (1 at the first update).
void adamw_update(float* w, const float* g, float* m, float* v, size_t n, int64_t step, const AdamWOptions& o);

class AdamW {
 public:
  explicit AdamW(const AdamWOptions& o = {});
  const AdamWOptions& options() const { return o_; }

  // One step on every parameter of grads, written into the model (model/weight_grads.h mutable_param).
  void step(Model& m, const WeightGrads<float>& grads);
  // Steps taken by a parameter (0: never).
  int64_t steps(const ParamId& p) const;
  // Bytes of optimiser state (m and v of the parameters stepped so far).
  size_t state_bytes() const;

 private:
  struct State {
    ParamId id;
    int64_t step = 0;
    std::vector<float> m, v;
  };
  State& state(const ParamId& p, size_t n);
  AdamWOptions o_;
  std::vector<State> states_;
};

}  // namespace moedit
