// The batch editors' closed forms (see editor/batch_update.h).
#include "editor/batch_update.h"

#include <Eigen/Cholesky>
#include <Eigen/Eigenvalues>
#include <Eigen/LU>
#include <stdexcept>

namespace moedit {

MatD memit_delta(const MatD& R, const MatD& K, const MatD& C, double lambda) {
  if (K.cols() != R.cols() || C.rows() != K.rows() || C.cols() != K.rows())
    throw std::invalid_argument("memit_delta: R [H, n], K [I, n] and C [I, I] disagree");
  const MatD M = lambda * C + K * K.transpose();  // [I, I], symmetric
  // ΔW = R Kᵀ M⁻¹  ⇔  M ΔWᵀ = K Rᵀ
  const MatD rhs = K * R.transpose();
  Eigen::LLT<MatD> llt(M);
  if (llt.info() == Eigen::Success) return llt.solve(rhs).transpose();
  return Eigen::LDLT<MatD>(M).solve(rhs).transpose();
}

NullSpace null_space(const MatD& C_p, double threshold) {
  if (C_p.rows() != C_p.cols()) throw std::invalid_argument("null_space: the covariance must be square");
  Eigen::SelfAdjointEigenSolver<MatD> es(C_p);
  if (es.info() != Eigen::Success) throw std::runtime_error("null_space: eigendecomposition failed");
  NullSpace ns;
  const auto& ev = es.eigenvalues();  // ascending
  while (ns.dim < ev.size() && ev[ns.dim] < threshold) ++ns.dim;
  const MatD U = es.eigenvectors().leftCols(ns.dim);
  ns.P = U * U.transpose();
  return ns;
}

MatD alphaedit_delta(const MatD& R, const MatD& K, const NullSpace& ns, const MatD& A, double lambda) {
  const Eigen::Index I = K.rows();
  if (K.cols() != R.cols() || ns.P.rows() != I || (A.size() && (A.rows() != I || A.cols() != I)))
    throw std::invalid_argument("alphaedit_delta: R [H, n], K [I, n], P and A [I, I] disagree");
  // ΔWᵀ = (P (K Kᵀ + A) + λ I)⁻¹ P K Rᵀ: the transpose of R Kᵀ P ((K Kᵀ + A) P + λ I)⁻¹ (AlphaEdit's code solves this
  // side); every column of ΔWᵀ is P(·)/λ, so ΔW's rows lie in P's range.
  MatD S = K * K.transpose();
  if (A.size()) S += A;
  const MatD M = ns.P * S + lambda * MatD::Identity(I, I);
  return Eigen::PartialPivLU<MatD>(M).solve(ns.P * K * R.transpose()).transpose();
}

}  // namespace moedit
