// Parameter selections and the weight-gradient container (see model/weight_grads.h).
#include "model/weight_grads.h"

#include <algorithm>
#include <stdexcept>
#include <utility>

#include "io/errors.h"

namespace moedit {

namespace {

// The bank holding expert e of a layer: the shared MLP, the routed experts, or the dense MLP (expert 0).
const ExpertBank& bank_of(const FFNWeights& f, int e) { return e == kSharedBlock ? f.shared : f.experts; }

// The matrix of a Gate/Up/Down parameter.
const Weight& expert_matrix(const Model& m, const ParamId& p) {
  const ExpertBank& b = bank_of(m.weights().layers[size_t(p.layer)].ffn, p.expert);
  const size_t i = size_t(p.expert == kSharedBlock ? 0 : p.expert);
  return p.kind == ParamId::Kind::Gate ? b.gate[i] : p.kind == ParamId::Kind::Up ? b.up[i] : b.down[i];
}
Weight& expert_matrix(Model& m, const ParamId& p) {
  return const_cast<Weight&>(expert_matrix(std::as_const(m), p));  // m is mutable: so is its matrix
}

}  // namespace

// ---- selection --------------------------------------------------------------------------------------------------

ParamSelection ParamSelection::all_routers(const Model& m) {
  ParamSelection s;
  for (int l = 0; l < m.config().n_layers; ++l)
    if (m.weights().layers[size_t(l)].ffn.moe) s.routers.push_back(l);
  return s;
}

ParamSelection ParamSelection::everything(const Model& m) {
  ParamSelection s;
  for (int l = 0; l < m.config().n_layers; ++l) {
    const FFNWeights& f = m.weights().layers[size_t(l)].ffn;
    if (f.moe) s.routers.push_back(l);
    if (f.shared_gate.size()) s.shared_gates.push_back(l);
    if (f.has_shared) s.experts.push_back({l, kSharedBlock});
    for (int e = 0; e < f.experts.E; ++e) s.experts.push_back({l, e});
  }
  return s;
}

void ParamSelection::validate(const Model& m) const {
  const int L = m.config().n_layers;
  auto layer_ok = [&](int l, const char* what) -> const FFNWeights& {
    require_input(l >= 0 && l < L, std::string(what) + ": layer " + std::to_string(l) +
                                       " out of range (the model has " + std::to_string(L) + " layers)");
    return m.weights().layers[size_t(l)].ffn;
  };
  for (int l : routers)
    require_input(layer_ok(l, "router").moe, "router: layer " + std::to_string(l) + " is dense (no router)");
  for (int l : shared_gates)
    require_input(layer_ok(l, "shared gate").shared_gate.size() > 0,
                  "shared gate: layer " + std::to_string(l) + " has no gated shared expert");
  for (const ExpertId& x : experts) {
    const FFNWeights& f = layer_ok(x.layer, "expert");
    const std::string at = "layer " + std::to_string(x.layer);
    if (x.expert == kSharedBlock)
      require_input(f.has_shared, "expert: " + at + " has no shared expert");
    else
      require_input(x.expert >= 0 && x.expert < f.experts.E,
                    "expert " + std::to_string(x.expert) + ": " + at + " has " + std::to_string(f.experts.E) +
                        (f.moe ? " routed experts" : " MLP (expert 0, dense layer)"));
  }
}

std::string ParamId::name() const {
  const std::string l = "layers." + std::to_string(layer) + ".";
  switch (kind) {
    case Kind::Router: return l + "router";
    case Kind::SharedGate: return l + "shared_gate";
    default: break;
  }
  const char* m = kind == Kind::Gate ? "gate" : kind == Kind::Up ? "up" : "down";
  return l + (expert == kSharedBlock ? std::string("shared.") : "experts." + std::to_string(expert) + ".") + m;
}

// ---- the model's storage -----------------------------------------------------------------------------------------

int64_t param_rows(const Model& m, const ParamId& p) {
  const FFNWeights& f = m.weights().layers[size_t(p.layer)].ffn;
  if (p.kind == ParamId::Kind::Router) return f.router.rows();
  if (p.kind == ParamId::Kind::SharedGate) return 1;
  return expert_matrix(m, p).rows();
}

int64_t param_cols(const Model& m, const ParamId& p) {
  const FFNWeights& f = m.weights().layers[size_t(p.layer)].ffn;
  if (p.kind == ParamId::Kind::Router) return f.router.cols();
  if (p.kind == ParamId::Kind::SharedGate) return f.shared_gate.size();
  return expert_matrix(m, p).cols();
}

float* mutable_param(Model& m, const ParamId& p) {
  FFNWeights& f = m.mutable_weights().layers[size_t(p.layer)].ffn;
  if (p.kind == ParamId::Kind::Router) return f.router.data();
  if (p.kind == ParamId::Kind::SharedGate) return f.shared_gate.data();
  return expert_matrix(m, p).mutable_f32();
}

MatR param_values(const Model& m, const ParamId& p) {
  const FFNWeights& f = m.weights().layers[size_t(p.layer)].ffn;
  if (p.kind == ParamId::Kind::Router) return f.router;
  if (p.kind == ParamId::Kind::SharedGate) {
    MatR g(1, f.shared_gate.size());  // [1, H]
    for (Eigen::Index i = 0; i < g.cols(); ++i) g(0, i) = f.shared_gate(i);
    return g;
  }
  return expert_matrix(m, p).to_f32();
}

void param_changed(const Model& m, const ParamId& p) {
  const FFNWeights& f = m.weights().layers[size_t(p.layer)].ffn;
  const void* data = p.kind == ParamId::Kind::Router       ? static_cast<const void*>(f.router.data())
                     : p.kind == ParamId::Kind::SharedGate ? static_cast<const void*>(f.shared_gate.data())
                                                           : expert_matrix(m, p).f32();
  if (data) m.backend().forget(data);
}

// ---- gradients ---------------------------------------------------------------------------------------------------

template <class T>
WeightGrads<T>::WeightGrads(const Model& m, const ParamSelection& sel) {
  sel.validate(m);
  const int L = m.config().n_layers;
  layers_.resize(size_t(L));
  lowest_ = L;
  auto sorted_unique = [](std::vector<int> v) {
    std::sort(v.begin(), v.end());
    v.erase(std::unique(v.begin(), v.end()), v.end());
    return v;
  };
  using K = ParamId::Kind;
  for (int l : sorted_unique(sel.routers)) {
    layers_[size_t(l)].router = MatT<T>::Zero(m.weights().layers[size_t(l)].ffn.router.rows(), m.config().hidden);
    lowest_ = std::min(lowest_, l);
  }
  for (int l : sorted_unique(sel.shared_gates)) {
    layers_[size_t(l)].shared_gate = MatT<T>::Zero(1, m.config().hidden);
    lowest_ = std::min(lowest_, l);
  }
  // Per layer: the selected expert ids (the shared MLP as kSharedBlock).
  std::vector<std::vector<int>> experts(static_cast<size_t>(L));
  for (const ExpertId& x : sel.experts) experts[size_t(x.layer)].push_back(x.expert);
  for (int l = 0; l < L; ++l) {
    Layer& ly = layers_[size_t(l)];
    const FFNWeights& f = m.weights().layers[size_t(l)].ffn;
    ly.expert_slot.assign(size_t(f.experts.E + 1), -1);
    for (int e : sorted_unique(experts[size_t(l)])) {  // kSharedBlock (−1) first: slot 0
      const ExpertBank& b = bank_of(f, e);
      ly.expert_slot[size_t(e + 1)] = int(ly.experts.size());
      ly.experts.push_back({MatT<T>::Zero(b.I, b.H), MatT<T>::Zero(b.I, b.H), MatT<T>::Zero(b.H, b.I)});
      lowest_ = std::min(lowest_, l);
    }
  }
  // The flat list, in the documented order (pointers taken after every vector has its final size).
  for (int l = 0; l < L; ++l) {
    Layer& ly = layers_[size_t(l)];
    if (ly.router.size()) {
      params_.push_back({K::Router, l, 0});
      ptrs_.push_back(&ly.router);
    }
    if (ly.shared_gate.size()) {
      params_.push_back({K::SharedGate, l, 0});
      ptrs_.push_back(&ly.shared_gate);
    }
    for (size_t s = 0; s < ly.expert_slot.size(); ++s) {
      const int i = ly.expert_slot[s];
      if (i < 0) continue;
      Expert& x = ly.experts[size_t(i)];
      for (auto [kind, mat] : {std::pair{K::Gate, &x.gate}, std::pair{K::Up, &x.up}, std::pair{K::Down, &x.down}}) {
        params_.push_back({kind, l, int(s) - 1});
        ptrs_.push_back(mat);
      }
    }
  }
}

template <class T>
const MatT<T>& WeightGrads<T>::grad(const ParamId& p) const {
  for (size_t i = 0; i < params_.size(); ++i)
    if (params_[i] == p) return *ptrs_[i];
  throw std::out_of_range("WeightGrads: " + p.name() + " is not selected");
}

template <class T>
typename WeightGrads<T>::Expert* WeightGrads<T>::expert(int l, int e) {
  const int i = layers_[size_t(l)].expert_slot[size_t(e + 1)];
  return i < 0 ? nullptr : &layers_[size_t(l)].experts[size_t(i)];
}

template <class T>
size_t WeightGrads<T>::bytes() const {
  size_t n = 0;
  for (const MatT<T>* g : ptrs_) n += size_t(g->size());
  return n * sizeof(T);
}

template <class T>
void WeightGrads<T>::set_zero() {
  for (MatT<T>* g : ptrs_) g->setZero();
}

template class WeightGrads<float>;
template class WeightGrads<double>;

}  // namespace moedit
