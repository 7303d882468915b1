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
  m.forget_device_copies(data);  // every device the model ran on (null: nothing)
}

// ---- gradients ---------------------------------------------------------------------------------------------------

std::vector<ParamId> selected_params(const Model& m, const ParamSelection& sel) {
  sel.validate(m);
  const size_t L = size_t(m.config().n_layers);
  std::vector<char> router(L, 0), shared_gate(L, 0);
  for (int l : sel.routers) router[size_t(l)] = 1;
  for (int l : sel.shared_gates) shared_gate[size_t(l)] = 1;
  std::vector<std::vector<int>> experts(L);  // per layer, the shared MLP as kSharedBlock (−1)
  for (const ExpertId& x : sel.experts) experts[size_t(x.layer)].push_back(x.expert);
  using K = ParamId::Kind;
  std::vector<ParamId> out;
  for (size_t l = 0; l < L; ++l) {
    const int li = int(l);
    if (router[l]) out.push_back({K::Router, li, 0});
    if (shared_gate[l]) out.push_back({K::SharedGate, li, 0});
    std::vector<int>& es = experts[l];
    std::sort(es.begin(), es.end());  // kSharedBlock first
    es.erase(std::unique(es.begin(), es.end()), es.end());
    for (int e : es)
      for (K k : {K::Gate, K::Up, K::Down}) out.push_back({k, li, e});
  }
  return out;
}

template <class T>
WeightGrads<T>::WeightGrads(const Model& m, const ParamSelection& sel) : params_(selected_params(m, sel)) {
  const int L = m.config().n_layers;
  layers_.resize(size_t(L));
  for (int l = 0; l < L; ++l)
    layers_[size_t(l)].expert_slot.assign(size_t(m.weights().layers[size_t(l)].ffn.experts.E + 1), -1);
  lowest_ = L;
  using K = ParamId::Kind;
  for (const ParamId& p : params_) {  // allocate (every vector gets its final size before pointers are taken)
    Layer& ly = layers_[size_t(p.layer)];
    const FFNWeights& f = m.weights().layers[size_t(p.layer)].ffn;
    lowest_ = std::min(lowest_, p.layer);
    if (p.kind == K::Router) {
      ly.router = MatT<T>::Zero(f.router.rows(), m.config().hidden);
    } else if (p.kind == K::SharedGate) {
      ly.shared_gate = MatT<T>::Zero(1, m.config().hidden);
    } else if (p.kind == K::Gate) {  // an expert's three matrices come together, gate first
      const ExpertBank& b = bank_of(f, p.expert);
      ly.expert_slot[size_t(p.expert + 1)] = int(ly.experts.size());
      ly.experts.push_back({MatT<T>::Zero(b.I, b.H), MatT<T>::Zero(b.I, b.H), MatT<T>::Zero(b.H, b.I)});
    }
  }
  for (const ParamId& p : params_) {
    Layer& ly = layers_[size_t(p.layer)];
    if (p.kind == K::Router) {
      ptrs_.push_back(&ly.router);
    } else if (p.kind == K::SharedGate) {
      ptrs_.push_back(&ly.shared_gate);
    } else {
      Expert& x = ly.experts[size_t(ly.expert_slot[size_t(p.expert + 1)])];
      ptrs_.push_back(p.kind == K::Gate ? &x.gate : p.kind == K::Up ? &x.up : &x.down);
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
