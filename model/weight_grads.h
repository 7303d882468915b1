// Weight gradients for router tuning and expert fine-tuning: which parameters train (ParamSelection), a gradient
// container that holds only those (WeightGrads), and access to the model's storage of a parameter (for an optimiser).
//
// Trainable kinds, per layer l (shapes as the model stores them, model/weights.h):
//   router       MoE layers: mlp.gate.weight                      [E, H]
//   shared gate  Qwen2-MoE's sigmoid shared_expert_gate           [1, H]
//   expert e     routed expert e's gate [I, H], up [I, H], down [H, I] (MoE layers, 0 ≤ e < E);
//                on a dense layer expert 0 is the dense MLP (gate/up/down [I, H], [I, H], [H, I]);
//                kSharedBlock: the layer's shared MLP, every shared expert side by side ([Is, H], [Is, H], [H, Is];
//                DeepSeek's n shared experts are one MLP of width n·I, trained together).
// Frozen parameters get no gradient storage and cost no weight-gradient arithmetic. The gradient of a selected
// parameter does not depend on what else is selected. Routing is held fixed in the backward (the gradient flows
// through the selected experts' weights and the routing weights, not the top-k selection): PyTorch autograd's
// treatment of topk. DeepSeek-V3's e_score_correction_bias only selects, so it has no gradient.
//
// block_backward / TapedStack::backward (model/backward.h) fill a WeightGrads when given one; train/ builds the loss
// and the optimiser on top.
#pragma once
#include <cstddef>
#include <string>
#include <vector>

#include "model/backward.h"

namespace moedit {

// The shared MLP of a layer as an expert id in a ParamSelection / ParamId.
constexpr int kSharedBlock = -1;

struct ExpertId {
  int layer = 0;
  int expert = 0;  // routed expert id, 0 for a dense layer's MLP, or kSharedBlock
  bool operator==(const ExpertId&) const = default;
};

// Which parameters train. Duplicates are ignored; ParamSelection::validate names the first entry the model lacks.
struct ParamSelection {
  std::vector<int> routers;         // MoE layers whose router trains
  std::vector<int> shared_gates;    // layers whose shared-expert gate trains (sigmoid-gated shared experts only)
  std::vector<ExpertId> experts;   // experts whose gate/up/down train

  // Every MoE layer's router (router tuning).
  static ParamSelection all_routers(const Model& m);
  // Every trainable kind of every layer: routers, shared gates, routed experts, shared MLPs, dense MLPs.
  static ParamSelection everything(const Model& m);
  // InputError naming the entry when a layer, expert or shared part does not exist in the model.
  void validate(const Model& m) const;
};

// One trainable tensor.
struct ParamId {
  enum class Kind { Router, SharedGate, Gate, Up, Down };
  Kind kind = Kind::Router;
  int layer = 0;
  int expert = 0;  // Gate/Up/Down: as ExpertId::expert
  bool operator==(const ParamId&) const = default;
  // Canonical name: layers.{l}.router, layers.{l}.shared_gate, layers.{l}.experts.{e}.{gate,up,down},
  // layers.{l}.shared.{gate,up,down}.
  std::string name() const;
};

// The shape of a parameter's tensor in the model (rows × cols; the shared gate is [1, H]).
int64_t param_rows(const Model& m, const ParamId& p);
int64_t param_cols(const Model& m, const ParamId& p);
// Writable fp32 storage of a parameter: routers and the shared gate are fp32 already; an expert matrix gets its
// copy-on-write copy (Weight::mutable_f32), so every parameter not written stays a view of the checkpoint. After
// changing the values, call param_changed (a device backend uploads its resident copy again).
float* mutable_param(Model& m, const ParamId& p);
// The parameter's current values as fp32 [rows, cols] (a copy).
MatR param_values(const Model& m, const ParamId& p);
void param_changed(const Model& m, const ParamId& p);

// The parameters `sel` selects (validated), in WeightGrads::params()'s order, without allocating anything.
std::vector<ParamId> selected_params(const Model& m, const ParamSelection& sel);

// ∂loss/∂(selected parameters), zero-initialised; backward passes accumulate (+=) into it.
template <class T>
class WeightGrads {
 public:
  struct Expert {
    MatT<T> gate, up, down;  // [I, H], [I, H], [H, I]
  };

  WeightGrads(const Model& m, const ParamSelection& sel);  // validates sel

  // The selected parameters in a fixed order (layer ascending; router, shared gate, then experts ascending with the
  // shared MLP first; gate, up, down), and the gradient of each, shaped as the parameter.
  const std::vector<ParamId>& params() const { return params_; }
  const MatT<T>& grad(size_t i) const { return *ptrs_[i]; }
  // The same by id (throws std::out_of_range when not selected).
  const MatT<T>& grad(const ParamId& p) const;

  // For the backward: null when frozen.
  MatT<T>* router(int l) { return layers_[size_t(l)].router.size() ? &layers_[size_t(l)].router : nullptr; }
  MatT<T>* shared_gate(int l) {
    return layers_[size_t(l)].shared_gate.size() ? &layers_[size_t(l)].shared_gate : nullptr;
  }
  Expert* expert(int l, int e);
  // The lowest layer holding a selected parameter (n_layers when none): a backward may stop there.
  int lowest_layer() const { return lowest_; }

  // Bytes of gradient storage (selected parameters only).
  size_t bytes() const;
  void set_zero();

 private:
  struct Layer {
    MatT<T> router;       // [E, H] or empty
    MatT<T> shared_gate;  // [1, H] or empty
    std::vector<int> expert_slot;  // [E + 1]: index into experts (slot 0: the shared MLP, e + 1: expert e), -1
    std::vector<Expert> experts;
  };
  std::vector<Layer> layers_;
  std::vector<ParamId> params_;
  std::vector<MatT<T>*> ptrs_;  // into layers_ (sized before the pointers are taken)
  int lowest_;
};

}  // namespace moedit
