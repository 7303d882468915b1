// Routing: router logits z [E] of one token → the top-k experts and their weights, for every router kind in the
// architecture table (softmax → top-k → renormalise?, top-k on logits → softmax over k, sigmoid + selection bias
// with group-limited selection, DeepSeek's renormalise-instead-of-scale and routed_scaling_factor), and the backward
// with the selection held fixed. Model::route runs it per token; the taped blocks use it for v*.
#pragma once
#include "model/config.h"

namespace moedit::grad {

// Model::route for one token's router logits z[E]: ids[k] (top-k order) and weights w[k]. bias [E] (or null):
// DeepSeek-V3's selection-only e_score_correction_bias. The one implementation of every router kind.
template <class T>
void route(const ModelConfig& c, const T* z, int* ids, T* w, const float* bias = nullptr);
// Backward with the selection fixed: dz[E] (=) from dw[k].
template <class T>
void route_backward(const ModelConfig& c, const T* z, const int* ids, const T* dw, T* dz);

// How the selected scores become weights: renormalised (norm), times routed_scaling_factor (scale); DeepSeek adds
// 1e-20 to the renormalising sum. DeepSeek v1/V2 (remote code) renormalise *instead of* scaling, and only for k > 1.
struct WeightMode {
  bool norm, scale;
  double eps;
};
WeightMode weight_mode(const ModelConfig& c);

}  // namespace moedit::grad
