// 2-D maps of embeddings for `moedit clusters` (issue 20): PCA and exact t-SNE.
//
// No C++ UMAP library is packaged for Debian (apt has only umap-learn for Python and R's uwot), so the map is t-SNE
// (van der Maaten & Hinton 2008) computed exactly — O(n²) memory and time per iteration, meant for up to a few
// thousand points — with the choices scikit-learn's TSNE makes by default: PCA initialisation scaled to a standard
// deviation of 1e-4 in the first coordinate, perplexity 30 (lowered to (n − 1)/3 for small n), early exaggeration
// 12 for 250 iterations with momentum 0.5, then momentum 0.8, learning rate max(n / 12 / 4, 50), delta-bar-delta
// gains (+0.2 / ×0.8, at least 0.01). Deterministic: no random numbers anywhere.
#pragma once
#include <Eigen/Dense>

namespace moedit {

// The first `dims` principal-component scores of x [n, d] → [n, dims] (centred; each axis's sign fixed so that the
// component's largest-magnitude loading is positive).
Eigen::MatrixXd pca(const Eigen::MatrixXd& x, int dims);

struct TsneOptions {
  double perplexity = 30;
  int iterations = 1000;
  double exaggeration = 12;
  int exaggeration_iterations = 250;
  double learning_rate = 0;  // ≤ 0: max(n / exaggeration / 4, 50)
};

// Symmetric input affinities P [n, n] (Σ P = 1) of x [n, d] at the given perplexity (binary search per row).
Eigen::MatrixXd tsne_affinities(const Eigen::MatrixXd& x, double perplexity);

// The t-SNE map [n, 2] of x [n, d]. Fewer than 5 points: their PCA scores.
Eigen::MatrixXd tsne(const Eigen::MatrixXd& x, const TsneOptions& opt = {});

}  // namespace moedit
