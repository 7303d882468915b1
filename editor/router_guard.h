// The router guard (issue 18): keep an edit's output changes out of the directions the downstream routers read.
//
// Router l' scores a residual x as z = W_r (g ⊙ x / rms(x)) (W_r [E, H]: its weights, g [H]: the weight of the norm
// before its MoE block). A change Δ of the residual stream moves z, to first order, by
//     W_r diag(g) Δ / rms(x)  −  z · (xᵀΔ) / (H · rms(x)²)
// The second term scales z, which no top-k set notices; for the routers that select on z itself (softmax top-k,
// top-k then softmax) a shift common to every expert does not change the set either, so only the centred rows
// (W_r − 1·mean row) diag(g) matter there; a sigmoid router (DeepSeek-V3) selects on sigmoid(z) + bias, which a
// common shift does reorder, so its rows count whole. U_l: an orthonormal basis [H, m] of those rows of every MoE
// layer after l. An edit at layer l whose output changes lie in the complement (ΔW ← (I − U Uᵀ) ΔW, its v* δ kept
// there too) leaves every later router's logits unmoved along the residual stream's direct path, for every token
// and to first order: what remains reaches the routers only through attention and the MLPs in between. It is the
// output-side companion of the key null space (editor/batch_update.h), which protects chosen keys' outputs, not
// the routers.
#pragma once
#include <Eigen/Core>

#include "model/model.h"

namespace moedit {

// U_l [H, m], orthonormal columns: the router directions of the MoE layers after `layer`, of the next `next_layers`
// of them when > 0 (deep models: E·(layers left) rows soon span all of H; the next few routers feel Δ most directly),
// m = 0 if there are none. Directions whose singular value is below 1e-6 of the largest are dropped (below that,
// the eigenvalues of G = Σ rowᵀrow are rounding).
Eigen::MatrixXd router_directions(const Model& m, int layer, int next_layers = 0);

// x − U Uᵀ x for each column of x [H, n] (in place).
void remove_directions(const Eigen::MatrixXd& U, Eigen::Ref<Eigen::MatrixXd> x);

}  // namespace moedit
