// Density clusters of router embeddings (issue 20, `moedit clusters`): DBSCAN with an automatic eps, purity against
// labels, a cluster's expert vector E_c, and SVG scatter plots of a 2-D map (tracing/tsne.h).
//
// DBSCAN (Ester et al. 1996): a point with ≥ min_pts points (itself included) within distance eps is a core point;
// clusters are the connected components of core points (joined when within eps of each other) plus the non-core
// points within eps of one of their core points (border points: the first cluster, in index order, to reach them).
// Everything else is noise (-1). Clusters are numbered by size, largest first (ties: lowest first member).
//
// Automatic eps (the k-distance heuristic of the DBSCAN paper, made mechanical): every point's distance to its
// (min_pts − 1)-th nearest other point, sorted ascending, is the k-distance curve; eps is the curve's knee, the value
// at the point farthest below the chord from the first to the last value (both axes scaled to [0, 1]). When the curve
// has no tail (its largest value is at most 3× its median: every point lies in a dense region, as with
// well-separated tight clusters, where the knee would fall inside one cluster's spread) eps is the largest value.
#pragma once
#include <Eigen/Dense>
#include <string>
#include <vector>

namespace moedit {

struct Dbscan {
  std::vector<int> label;  // [n] cluster id (0 = largest) or -1 (noise)
  int n_clusters = 0;
  double eps = 0;
  int min_pts = 0;
};

// x [n, d]. min_pts ≥ 2.
Dbscan dbscan(const Eigen::MatrixXd& x, double eps, int min_pts);
// The knee of the sorted k-distance curve (k = min_pts − 1 other points); 0 when n < min_pts.
double kdistance_eps(const Eigen::MatrixXd& x, int min_pts);

struct Purity {
  double purity = 0;            // Σ_c max_label |c ∩ label| / (clustered points); noise left out; NaN if none
  std::vector<std::string> majority;    // [n_clusters] most frequent label (ties: the smallest string)
  std::vector<double> majority_share;   // [n_clusters] its share of the cluster
};
Purity cluster_purity(const std::vector<int>& cluster, int n_clusters, const std::vector<std::string>& labels);

// Each cluster's mean embedding [n_clusters] × [n_layers, E], from embeddings e [n, n_layers·E] (row-major L×E).
std::vector<Eigen::MatrixXd> cluster_means(const Eigen::MatrixXd& e, const std::vector<int>& cluster, int n_clusters,
                                           int n_layers);

// A scatter plot of xy [n, 2], each point coloured by its group (−1: grey, "noise"); names[g] in the legend.
std::string scatter_svg(const Eigen::MatrixXd& xy, const std::vector<int>& group, const std::vector<std::string>& names,
                        const std::string& title);

}  // namespace moedit
