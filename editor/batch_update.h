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
//
//   MoEEdit's coupled objective (Gu et al., ICLR 2026), solved by block-coordinate descent over the experts:
//       min Σ_c ‖Σ_{e∈A_c} ΔW_e k_ce − r_c‖² + Σ_e (λ ‖ΔW_e‖² + tr(ΔW_e A_e ΔW_eᵀ))   over ΔW_e = ΔW_e P_e
//     Column c (a request's template, weighted) wants the layer output to move by r_c; its active experts A_c each
//     contribute ΔW_e k_ce (k_ce: e's key there, already multiplied by the routing weight and the column's weight).
//     One block step fixes every other expert and solves e's AlphaEdit problem for the residual the others leave:
//       t_c = r_c − Σ_{e'∈A_c, e'≠e} ΔW_e' k_ce'   for the columns c with e ∈ A_c
//       ΔW_e = T K_eᵀ P_e ((K_e K_eᵀ + A_e) P_e + λ I)⁻¹
//     Each step minimises the (strictly convex) objective exactly over one block, so it never rises and the sweeps
//     converge to the joint minimiser (tests/test_batch_update.cpp checks it against the stacked ridge solve).
#pragma once
#include <Eigen/Core>
#include <vector>

#include "kernels/backend.h"

namespace moedit {

using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// MEMIT's per-expert update. R [H, n], K [I, n], C [I, I] (symmetric positive semi-definite), lambda > 0 or C
// positive definite. Solved by Cholesky in fp64 on `be` (Backend::solve_spd: the model's backend, a GPU's cuSOLVER
// included), LDLT on the host when that fails.
MatD memit_delta(const MatD& R, const MatD& K, const MatD& C, double lambda, const Backend& be = cpu_backend());

// The projector onto the eigenvectors of C_p [I, I] whose eigenvalue is below threshold; dim = their number.
struct NullSpace {
  MatD P;       // [I, I]
  int dim = 0;  // rank of P
};
NullSpace null_space(const MatD& C_p, double threshold);

// AlphaEdit's update (see above). A may be empty (no earlier edits).
MatD alphaedit_delta(const MatD& R, const MatD& K, const NullSpace& ns, const MatD& A, double lambda);

// MoEEdit's coupled problem (see above). Blocks are numbered 0..B−1.
struct CoupledColumn {
  Eigen::VectorXd r;                                  // [H] the output change the column wants
  std::vector<std::pair<int, Eigen::VectorXd>> keys;  // (block, its weighted key k_ce [I_b]) of each active block
};
struct CoupledBlock {
  NullSpace ns;  // P_e (P = I: no constraint)
  MatD A;        // Σ K Kᵀ of earlier batches [I, I], or empty
};
struct CoupledSolution {
  std::vector<MatD> delta;        // ΔW_e [H, I_e] per block
  std::vector<double> objective;  // after each sweep (the first entry: at ΔW = 0)
};
// `sweeps` cyclic passes over the blocks in ascending order (MoEEdit samples blocks at random; a fixed order keeps
// runs reproducible). Every block must be active in at least one column.
CoupledSolution coupled_bcd(const std::vector<CoupledColumn>& cols, const std::vector<CoupledBlock>& blocks,
                            double lambda, int sweeps);

}  // namespace moedit
