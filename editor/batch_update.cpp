// The batch editors' closed forms (see editor/batch_update.h).
#include "editor/batch_update.h"

#include <Eigen/Cholesky>
#include <Eigen/Eigenvalues>
#include <Eigen/LU>
#include <stdexcept>

namespace moedit {

MatD memit_delta(const MatD& R, const MatD& K, const MatD& C, double lambda, const Backend& be) {
  if (K.cols() != R.cols() || C.rows() != K.rows() || C.cols() != K.rows())
    throw std::invalid_argument("memit_delta: R [H, n], K [I, n] and C [I, I] disagree");
  const MatD M = lambda * C + K * K.transpose();  // [I, I], symmetric
  // ΔW = R Kᵀ M⁻¹  ⇔  M ΔWᵀ = K Rᵀ
  const MatD rhs = K * R.transpose();
  if (const std::optional<Eigen::MatrixXd> x = solve_spd(be, M, rhs)) return x->transpose();
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

namespace {

// Σ_c ‖Σ_e ΔW_e k_ce − r_c‖² + Σ_e (λ ‖ΔW_e‖² + tr(ΔW_e A_e ΔW_eᵀ))
double coupled_objective(const std::vector<CoupledColumn>& cols, const std::vector<CoupledBlock>& blocks,
                         const std::vector<MatD>& d, double lambda) {
  double f = 0;
  for (const CoupledColumn& c : cols) {
    Eigen::VectorXd res = -c.r;
    for (const auto& [b, k] : c.keys) res += d[size_t(b)] * k;
    f += res.squaredNorm();
  }
  for (size_t b = 0; b < d.size(); ++b) {
    f += lambda * d[b].squaredNorm();
    if (blocks[b].A.size()) f += (d[b] * blocks[b].A * d[b].transpose()).trace();
  }
  return f;
}

}  // namespace

CoupledSolution coupled_bcd(const std::vector<CoupledColumn>& cols, const std::vector<CoupledBlock>& blocks,
                            double lambda, int sweeps) {
  if (cols.empty() || blocks.empty()) throw std::invalid_argument("coupled_bcd: no columns or no blocks");
  const Eigen::Index H = cols[0].r.size();
  const size_t B = blocks.size();
  // Per block: the columns it is active in, and where in them.
  std::vector<std::vector<std::pair<size_t, size_t>>> uses(B);
  for (size_t c = 0; c < cols.size(); ++c) {
    if (cols[c].r.size() != H) throw std::invalid_argument("coupled_bcd: columns of different widths");
    for (size_t j = 0; j < cols[c].keys.size(); ++j) {
      const int b = cols[c].keys[j].first;
      if (b < 0 || size_t(b) >= B) throw std::invalid_argument("coupled_bcd: a key names no block");
      if (cols[c].keys[j].second.size() != blocks[size_t(b)].ns.P.rows())
        throw std::invalid_argument("coupled_bcd: a key's width differs from its block's");
      uses[size_t(b)].push_back({c, j});
    }
  }
  CoupledSolution s;
  for (size_t b = 0; b < B; ++b) {
    if (uses[b].empty()) throw std::invalid_argument("coupled_bcd: a block is active in no column");
    s.delta.push_back(MatD::Zero(H, blocks[b].ns.P.rows()));
  }
  // Σ_e ΔW_e k_ce per column, kept current as blocks change.
  std::vector<Eigen::VectorXd> out(cols.size(), Eigen::VectorXd::Zero(H));
  s.objective.push_back(coupled_objective(cols, blocks, s.delta, lambda));
  for (int sweep = 0; sweep < sweeps; ++sweep) {
    for (size_t b = 0; b < B; ++b) {
      const auto& u = uses[b];
      MatD T(H, Eigen::Index(u.size())), K(blocks[b].ns.P.rows(), Eigen::Index(u.size()));
      for (size_t j = 0; j < u.size(); ++j) {
        const CoupledColumn& c = cols[u[j].first];
        const Eigen::VectorXd& k = c.keys[u[j].second].second;
        K.col(Eigen::Index(j)) = k;
        T.col(Eigen::Index(j)) = c.r - (out[u[j].first] - s.delta[b] * k);  // what the other blocks leave
      }
      const MatD next = alphaedit_delta(T, K, blocks[b].ns, blocks[b].A, lambda);
      for (size_t j = 0; j < u.size(); ++j)
        out[u[j].first] += (next - s.delta[b]) * cols[u[j].first].keys[u[j].second].second;
      s.delta[b] = next;
    }
    s.objective.push_back(coupled_objective(cols, blocks, s.delta, lambda));
  }
  return s;
}

}  // namespace moedit
