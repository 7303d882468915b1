// An InterventionSpec as a RouterEdit (tracing/interventions.h, model/router_edit.h): the forward is
// apply_interventions; the backward runs its three stages in reverse on each row, the steered row recomputed.
//
// One row z [E] of layer l, the stages z0 (raw) → z1 (steered) → z2 (boosted) → z3 (masked), and g = ∂loss/∂z3:
//   masks      z3_e = −∞ on masked e (a constant): g_e ← 0 there.
//   boosts     add: z2 = z1 + c, identity. norm: z2_b = c_b·m with m = max over unmasked e of z1 with the boosted
//              entries zeroed (argmax j): g_b ← 0, and g_j += Σ_b c_b·g_b unless j is itself boosted (then m = 0).
//   steering   form 3: identity. Forms 4/5: z1_e = z0_e (form 5: 0 where v_e ≠ 0) + max(z0)·c·v_e: form 5 zeroes
//              g_e where v_e ≠ 0, and g_argmax(z0) += c·Σ_e v_e·g_e.
#include <cstdio>
#include <limits>

#include "tracing/interventions.h"

namespace moedit {

namespace {

// First index of the largest entry of row z [E] among the allowed ones (allowed: null = all).
template <class R>
int argmax(const R& z, const std::vector<char>* skip = nullptr) {
  int j = -1;
  for (int e = 0; e < int(z.size()); ++e)
    if ((!skip || !(*skip)[size_t(e)]) && (j < 0 || z[e] > z[j])) j = e;
  return j;
}

// "%a" spelling of a float (exact).
std::string hex(double x) {
  char b[40];
  std::snprintf(b, sizeof b, "%a", x);
  return b;
}

class SpecEdit final : public RouterEdit {
 public:
  explicit SpecEdit(InterventionSpec s) : s_(std::move(s)), layers_(intervention_layers(s_)) {
    steer_only_.steer = s_.steer;
  }
  bool touches(int l) const override { return layers_.count(l) != 0; }
  void apply(int l, Eigen::Ref<MatR> z) const override { apply_interventions(s_, l, z); }
  void apply(int l, Eigen::Ref<MatRD> z) const override { apply_interventions(s_, l, z); }
  void backward(int l, const MatR& z, MatR& dz) const override { back(l, z, dz); }
  void backward(int l, const MatRD& z, MatRD& dz) const override { back(l, z, dz); }
  std::string fingerprint(int l) const override;

 private:
  // z [N, E] raw logits, dz [N, E]: ∂/∂(edited) → ∂/∂(raw).
  template <class M>
  void back(int l, const M& z, M& dz) const;

  InterventionSpec s_;
  std::set<int> layers_;
  InterventionSpec steer_only_;  // the steering stage alone (z0 → z1)
};

template <class M>
void SpecEdit::back(int l, const M& z, M& dz) const {
  using T = typename M::Scalar;
  const int E = int(z.cols());
  const std::vector<char> masked = masked_experts(s_, l, E);
  std::vector<char> boosted(size_t(E), 0);
  for (const auto& b : s_.boost)
    if (b.layer == l && b.expert < E) boosted[size_t(b.expert)] = 1;
  const VecF* v = nullptr;  // layer l's steering row (validated: at most one)
  for (size_t i = 0; i < s_.steer.layers.size(); ++i)
    if (s_.steer.layers[i] == l) v = &s_.steer.vector[i];
  const bool norm_boost = s_.boost_mode == BoostMode::NormPreserving;
  M z1;  // steered: what boosts in norm mode read
  if (norm_boost) {
    z1 = z;
    if (v) apply_interventions(steer_only_, l, z1);
  }
  for (int t = 0; t < int(z.rows()); ++t) {
    auto g = dz.row(t);
    for (int e = 0; e < E; ++e)
      if (masked[size_t(e)]) g[e] = 0;
    if (norm_boost) {
      T s = 0;
      for (const auto& b : s_.boost)
        if (b.layer == l && b.expert < E) s += T(b.c) * g[b.expert];
      auto zz = z1.row(t).eval();
      for (int e = 0; e < E; ++e)
        if (boosted[size_t(e)]) {
          zz[e] = 0;
          g[e] = 0;
        }
      const int j = argmax(zz, &masked);
      if (j >= 0 && !boosted[size_t(j)]) g[j] += s;
    }
    if (v && s_.steer.form != 3) {
      T s = 0;
      for (int e = 0; e < E; ++e) s += T((*v)[e]) * g[e];
      if (s_.steer.form == 5)
        for (int e = 0; e < E; ++e)
          if ((*v)[e] != 0.f) g[e] = 0;
      g[argmax(z.row(t))] += T(s_.steer.c) * s;
    }
  }
}

std::string SpecEdit::fingerprint(int l) const {
  std::string f;
  const Steering& st = s_.steer;
  for (size_t i = 0; i < st.layers.size(); ++i) {
    if (st.layers[i] != l) continue;
    f += "steer form " + std::to_string(st.form) + " c " + hex(st.c) + " v";
    for (int e = 0; e < int(st.vector[i].size()); ++e) f += " " + hex(st.vector[i][e]);
    f += ";";
  }
  for (const auto& b : s_.boost)
    if (b.layer == l) f += std::string(s_.boost_mode == BoostMode::Add ? "boost add " : "boost norm ") +
                           std::to_string(b.expert) + "=" + hex(b.c) + ";";
  for (const auto& m : s_.mask)
    if (m.layer == l) f += "mask " + std::to_string(m.expert) + ";";
  return f;
}

}  // namespace

std::shared_ptr<const RouterEdit> router_edit(const InterventionSpec& spec, const ModelConfig& cfg) {
  validate_interventions(spec, cfg);
  return std::make_shared<SpecEdit>(spec);
}

}  // namespace moedit
