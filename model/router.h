// Routing for a model config: the RouteSpec (kernels/route.h) that describes its router — softmax → top-k →
// renormalise?, top-k on logits → softmax over k, sigmoid + selection bias with group-limited selection, DeepSeek's
// renormalise-instead-of-scale and routed_scaling_factor — and per-token conveniences over the kernel rows.
#pragma once
#include "kernels/route.h"
#include "model/config.h"

namespace moedit {

// How the selected scores become weights: renormalised (norm), times routed_scaling_factor (scale); DeepSeek adds
// 1e-20 to the renormalising sum. DeepSeek v1/V2 (remote code) renormalise *instead of* scaling, and only for k > 1.
struct WeightMode {
  bool norm, scale;
  double eps;
};
WeightMode weight_mode(const ModelConfig& c);

// The config's router as kernel data.
ops::RouteSpec route_spec(const ModelConfig& c);

namespace grad {
// One token's routing: ids[k] (top-k order) and weights w[k]; bias [E] or null (DeepSeek-V3's selection bias).
template <class T>
void route(const ModelConfig& c, const T* z, int* ids, T* w, const float* bias = nullptr) {
  ops::route_row(route_spec(c), z, bias, ids, w);
}
// Backward with the selection fixed: dz[E] (=) from dw[k].
template <class T>
void route_backward(const ModelConfig& c, const T* z, const int* ids, const T* dw, T* dz) {
  ops::route_row_backward(route_spec(c), z, ids, dw, dz);
}
}  // namespace grad

}  // namespace moedit
