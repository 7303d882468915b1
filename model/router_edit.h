// A standing edit of the router logits that a Model owns (Model::set_router_edit) and every forward it runs applies:
// Model::forward and its pieces (block, ffn) on any backend, and the taped forward of the gradient stack
// (model/backward.h), whose backward applies the edit's transposed Jacobian. Evaluation uses it so that scoring,
// generation, perplexity, key statistics and the edit itself (k*, v* and its gradient) all see one steered model.
//
// Per MoE layer l the edit maps the raw logits z [N, E] (z = a·W_rᵀ) to z' [N, E] row by row, before the router
// turns them into (ids, weights) and before any `blocks.{l}.moe.hook_router_logits` hook runs. The edits in use
// (tracing/interventions.h: masks, boosts, steering) are piecewise linear in z, so the backward is exact away from
// ties of a row's maximum.
#pragma once
#include <string>

#include "kernels/ops.h"

namespace moedit {

using MatRD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

class RouterEdit {
 public:
  virtual ~RouterEdit() = default;
  // Whether layer l's logits change (false: the forward skips the edit, the tape keeps nothing).
  virtual bool touches(int layer) const = 0;
  // z [N, E]: layer `layer`'s raw logits, edited in place (float: the forward; double: the taped stack in tests).
  virtual void apply(int layer, Eigen::Ref<MatR> z) const = 0;
  virtual void apply(int layer, Eigen::Ref<MatRD> z) const = 0;
  // z [N, E]: the raw logits; dz [N, E] holds ∂loss/∂z' and becomes ∂loss/∂z.
  virtual void backward(int layer, const MatR& z, MatR& dz) const = 0;
  virtual void backward(int layer, const MatRD& z, MatRD& dz) const = 0;
  // What the edit does to layer `layer`, as bytes: equal strings for equal edits ("" where it does not touch it).
  // Caches of values the edit changes key on it (editor/keystats.h).
  virtual std::string fingerprint(int layer) const = 0;
};

}  // namespace moedit
