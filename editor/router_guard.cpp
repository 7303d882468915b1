#include "editor/router_guard.h"

#include <Eigen/Eigenvalues>
#include <vector>

namespace moedit {

Eigen::MatrixXd router_directions(const Model& m, int layer, int next_layers) {
  const ModelConfig& c = m.config();
  const int H = c.hidden;
  const bool centre = c.router != RouterKind::SigmoidTopK;  // selection on z: a common shift changes nothing
  Eigen::MatrixXd G = Eigen::MatrixXd::Zero(H, H);  // Σ rowᵀ row over the guarded rows: its range is their span
  int taken = 0;
  for (int l = layer + 1; l < c.n_layers && (next_layers <= 0 || taken < next_layers); ++l) {
    const LayerWeights& L = m.weights().layers[size_t(l)];
    if (!L.ffn.moe) continue;
    Eigen::MatrixXd R = L.ffn.router.cast<double>() * L.ln_post.cast<double>().asDiagonal();  // [E, H]
    if (centre) R.rowwise() -= R.colwise().mean();
    G.noalias() += R.transpose() * R;
    ++taken;
  }
  if (taken == 0) return Eigen::MatrixXd(H, 0);
  const Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> es(G);  // ascending eigenvalues = squared singular values
  const Eigen::VectorXd& ev = es.eigenvalues();
  Eigen::Index keep = 0;
  while (keep < H && ev[H - 1 - keep] > 1e-12 * ev[H - 1]) ++keep;
  return es.eigenvectors().rightCols(keep);
}

void remove_directions(const Eigen::MatrixXd& U, Eigen::Ref<Eigen::MatrixXd> x) {
  if (U.cols() > 0) x -= U * (U.transpose() * x);
}

}  // namespace moedit
