// The closed forms of the batch editors, per expert (issue 18; formulas in editor/README.md):
//
//   MEMIT (Meng et al. 2023, eq. 14, per expert as MoEEdit/MoTE apply it):
//       ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹
//     R [H, n]: residuals the expert's output must gain at the n edited keys, K [I, n]: those keys, C [I, I]:
//     E[k kᵀ] of the expert's keys (editor/keystats.h), λ: MEMIT's mom2_update_weight. With one request
//     (Sherman–Morrison) ΔW = r (C⁻¹k)ᵀ / (λ + kᵀC⁻¹k): ROME's update r (C⁻¹k)ᵀ / (kᵀC⁻¹k) up to the λ in the
//     denominator (so W′k = Wk + r·kᵀC⁻¹k / (λ + kᵀC⁻¹k); ROME's is exact, MEMIT's shrinks by that factor).
//
//   Null-space projection (AlphaEdit, Fang et al. 2025; MoEEdit applies it per expert):
//       P = Û Ûᵀ, Û = the eigenvectors of a preservation covariance C_p (E[k kᵀ] of keys whose outputs must not
//       move) with eigenvalue < threshold (AlphaEdit: 2e-2, on E[k kᵀ]); then
//       ΔW = R Kᵀ P (K Kᵀ P + A P + λ I)⁻¹   (A: Σ K_j K_jᵀ of earlier sequential edits, or 0)
//     whose rows lie in P's range, so ΔW K_p ≈ 0 for every preserved key k_p (‖ΔW k_p‖ ≤ √threshold‖ΔW‖ per unit
//     second moment).
#pragma once
#include <Eigen/Core>

namespace moedit {

using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// MEMIT's per-expert update. R [H, n], K [I, n], C [I, I] (symmetric positive semi-definite), lambda > 0 or C
// positive definite. Solved by Cholesky (LDLT when it fails) in fp64.
MatD memit_delta(const MatD& R, const MatD& K, const MatD& C, double lambda);

// The projector onto the eigenvectors of C_p [I, I] whose eigenvalue is below threshold; dim = their number.
struct NullSpace {
  MatD P;       // [I, I]
  int dim = 0;  // rank of P
};
NullSpace null_space(const MatD& C_p, double threshold);

// AlphaEdit's update (see above). A may be empty (no earlier edits).
MatD alphaedit_delta(const MatD& R, const MatD& K, const NullSpace& ns, const MatD& A, double lambda);

}  // namespace moedit
