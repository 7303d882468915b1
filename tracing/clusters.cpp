// DBSCAN, automatic eps, purity and cluster means (see tracing/clusters.h).
#include "tracing/clusters.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <stdexcept>

namespace moedit {

namespace {

// Pairwise Euclidean distances [n, n].
Eigen::MatrixXd distances(const Eigen::MatrixXd& x) {
  const Eigen::VectorXd sq = x.rowwise().squaredNorm();
  Eigen::MatrixXd d = (-2.0 * x * x.transpose()).colwise() + sq;
  d.rowwise() += sq.transpose();
  return d.cwiseMax(0.0).cwiseSqrt();
}

}  // namespace

double kdistance_eps(const Eigen::MatrixXd& x, int min_pts) {
  const Eigen::Index n = x.rows();
  if (min_pts < 2) throw std::invalid_argument("kdistance_eps: min_pts < 2");
  if (n < min_pts) return 0;
  const Eigen::MatrixXd d = distances(x);
  std::vector<double> kd(static_cast<size_t>(n));
  for (Eigen::Index i = 0; i < n; ++i) {
    std::vector<double> row(static_cast<size_t>(n));
    for (Eigen::Index j = 0; j < n; ++j) row[size_t(j)] = d(i, j);
    row[size_t(i)] = INFINITY;  // not itself
    std::nth_element(row.begin(), row.begin() + (min_pts - 2), row.end());
    kd[size_t(i)] = row[size_t(min_pts - 2)];
  }
  std::sort(kd.begin(), kd.end());
  if (kd.back() <= 3 * kd[kd.size() / 2]) return kd.back();  // no tail: every point lies in a dense region
  const double lo = kd.front(), span = kd.back() - kd.front();
  if (span <= 0 || n < 3) return kd.back();
  size_t knee = 0;
  double best = -1;
  for (size_t i = 0; i < kd.size(); ++i) {
    const double below = double(i) / double(kd.size() - 1) - (kd[i] - lo) / span;
    if (below > best) best = below, knee = i;
  }
  return kd[knee];
}

Dbscan dbscan(const Eigen::MatrixXd& x, double eps, int min_pts) {
  if (min_pts < 2) throw std::invalid_argument("dbscan: min_pts < 2");
  const int n = int(x.rows());
  const Eigen::MatrixXd d = distances(x);
  std::vector<std::vector<int>> nb(static_cast<size_t>(n));  // neighbours within eps, itself included
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j)
      if (d(i, j) <= eps) nb[size_t(i)].push_back(j);
  auto core = [&](int i) { return int(nb[size_t(i)].size()) >= min_pts; };
  std::vector<int> raw(size_t(n), -1);
  int k = 0;
  for (int i = 0; i < n; ++i) {
    if (raw[size_t(i)] >= 0 || !core(i)) continue;
    std::vector<int> stack = {i};  // grow from core point i
    raw[size_t(i)] = k;
    while (!stack.empty()) {
      const int p = stack.back();
      stack.pop_back();
      for (int q : nb[size_t(p)]) {
        if (raw[size_t(q)] >= 0) continue;
        raw[size_t(q)] = k;
        if (core(q)) stack.push_back(q);
      }
    }
    ++k;
  }
  // Renumber: largest first, ties by first member (raw ids already follow first members).
  std::vector<int> size(size_t(k), 0), order(static_cast<size_t>(k));
  for (int c : raw)
    if (c >= 0) ++size[size_t(c)];
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return size[size_t(a)] > size[size_t(b)]; });
  std::vector<int> rank(static_cast<size_t>(k));
  for (int r = 0; r < k; ++r) rank[size_t(order[size_t(r)])] = r;
  Dbscan out{std::vector<int>(size_t(n), -1), k, eps, min_pts};
  for (int i = 0; i < n; ++i)
    if (raw[size_t(i)] >= 0) out.label[size_t(i)] = rank[size_t(raw[size_t(i)])];
  return out;
}

Purity cluster_purity(const std::vector<int>& cluster, int n_clusters, const std::vector<std::string>& labels) {
  if (labels.size() != cluster.size()) throw std::invalid_argument("cluster_purity: one label per point");
  std::vector<std::map<std::string, int>> count(static_cast<size_t>(n_clusters));
  for (size_t i = 0; i < cluster.size(); ++i)
    if (cluster[i] >= 0) ++count[size_t(cluster[i])][labels[i]];
  Purity p;
  int hit = 0, total = 0;
  for (const auto& c : count) {
    std::string best;
    int n = 0, size = 0;
    for (const auto& [label, k] : c) {  // ascending labels: ties keep the smallest
      size += k;
      if (k > n) best = label, n = k;
    }
    p.majority.push_back(best);
    p.majority_share.push_back(size ? double(n) / size : NAN);
    hit += n;
    total += size;
  }
  p.purity = total ? double(hit) / total : NAN;
  return p;
}

std::vector<Eigen::MatrixXd> cluster_means(const Eigen::MatrixXd& e, const std::vector<int>& cluster, int n_clusters,
                                           int n_layers) {
  if (n_layers < 1 || e.cols() % n_layers) throw std::invalid_argument("cluster_means: columns not layers x experts");
  const Eigen::Index E = e.cols() / n_layers;
  std::vector<Eigen::VectorXd> sum(size_t(n_clusters), Eigen::VectorXd::Zero(e.cols()));
  std::vector<int> size(size_t(n_clusters), 0);
  for (size_t i = 0; i < cluster.size(); ++i)
    if (cluster[i] >= 0) sum[size_t(cluster[i])] += e.row(Eigen::Index(i)).transpose(), ++size[size_t(cluster[i])];
  std::vector<Eigen::MatrixXd> out;
  for (int c = 0; c < n_clusters; ++c) {
    Eigen::MatrixXd m(n_layers, E);
    for (int l = 0; l < n_layers; ++l) m.row(l) = sum[size_t(c)].segment(l * E, E).transpose() / std::max(1, size[size_t(c)]);
    out.push_back(std::move(m));
  }
  return out;
}

}  // namespace moedit
