// Issue 20 clusters: t-SNE + DBSCAN find known clusters on synthetic data, the automatic eps, purity, cluster means,
// the tf-idf keywords of a hand-made example, and the SVG scatter.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "eval/cluster_keywords.h"
#include "tracing/clusters.h"
#include "tracing/tsne.h"

namespace moedit {
namespace {

// Three Gaussian blobs in 12-D, 40 points each, interleaved (point i in blob i % 3).
Eigen::MatrixXd blobs(std::vector<std::string>& label) {
  std::mt19937 rng(7);
  std::normal_distribution<double> g(0, 0.15);
  Eigen::MatrixXd x(120, 12);
  for (int i = 0; i < 120; ++i) {
    const int b = i % 3;
    for (int j = 0; j < 12; ++j) x(i, j) = (j % 3 == b ? 3.0 : 0.0) + g(rng);
    label.push_back("blob" + std::to_string(b));
  }
  return x;
}

TEST(Clusters, TsneAndDbscanRecoverSyntheticBlobs) {
  std::vector<std::string> label;
  const Eigen::MatrixXd x = blobs(label);
  const Eigen::MatrixXd xy = tsne(x);
  ASSERT_EQ(xy.rows(), 120);
  ASSERT_EQ(xy.cols(), 2);
  const Dbscan db = dbscan(xy, kdistance_eps(xy, 5), 5);
  EXPECT_EQ(db.n_clusters, 3);
  const Purity p = cluster_purity(db.label, db.n_clusters, label);
  EXPECT_DOUBLE_EQ(p.purity, 1.0);
  int noise = 0;
  for (int c : db.label) noise += c < 0;
  EXPECT_LE(noise, 3);
  // The same in the embedding space itself.
  const Dbscan raw = dbscan(x, kdistance_eps(x, 5), 5);
  EXPECT_EQ(raw.n_clusters, 3);
  EXPECT_DOUBLE_EQ(cluster_purity(raw.label, raw.n_clusters, label).purity, 1.0);
}

TEST(Clusters, DbscanHandExample) {
  Eigen::MatrixXd x(8, 1);
  x << 5, 5.1, 0, 0.1, 0.2, 5.2, 20, 5.3;  // {5, 5.1, 5.2, 5.3} (4), {0, 0.1, 0.2} (3), 20 alone
  const Dbscan db = dbscan(x, 0.15, 2);
  EXPECT_EQ(db.n_clusters, 2);
  EXPECT_EQ(db.label, (std::vector<int>{0, 0, 1, 1, 1, 0, -1, 0}));  // largest cluster first
  // min_pts 3: 5.0 and 0.0 have one neighbour each within 0.15 but are reached as border points.
  EXPECT_EQ(dbscan(x, 0.15, 3).label, (std::vector<int>{0, 0, 1, 1, 1, 0, -1, 0}));
  EXPECT_EQ(dbscan(x, 0.15, 4).n_clusters, 0);
}

TEST(Clusters, KDistanceKnee) {
  Eigen::MatrixXd x(5, 1);
  x << 0, 1, 2, 3, 100;  // nearest-other distances 1, 1, 1, 1, 97: the knee is at 1
  EXPECT_DOUBLE_EQ(kdistance_eps(x, 2), 1.0);
  // min_pts 3 (2nd nearest other): 2, 1, 1, 2, 98 → sorted 1, 1, 2, 2, 98; knee at the last 2.
  EXPECT_DOUBLE_EQ(kdistance_eps(x, 3), 2.0);
  // No tail (largest ≤ 3 × median): the largest k-distance, so no dense point is left out.
  Eigen::MatrixXd y(5, 1);
  y << 0, 1, 2, 3, 4.5;
  EXPECT_DOUBLE_EQ(kdistance_eps(y, 2), 1.5);
}

TEST(Clusters, PurityAndMeans) {
  const std::vector<int> c = {0, 0, 0, 1, 1, -1};
  const Purity p = cluster_purity(c, 2, {"a", "a", "b", "c", "c", "a"});
  EXPECT_DOUBLE_EQ(p.purity, 0.8);  // (2 + 2) / 5, noise left out
  EXPECT_EQ(p.majority, (std::vector<std::string>{"a", "c"}));
  EXPECT_DOUBLE_EQ(p.majority_share[0], 2.0 / 3);
  Eigen::MatrixXd e(6, 4);  // 2 layers x 2 experts
  for (int i = 0; i < 6; ++i) e.row(i) << i, 2 - i, 1, 1;
  const auto m = cluster_means(e, c, 2, 2);
  ASSERT_EQ(m.size(), 2u);
  EXPECT_DOUBLE_EQ(m[0](0, 0), 1.0);   // (0 + 1 + 2) / 3
  EXPECT_DOUBLE_EQ(m[0](0, 1), 1.0);   // (2 + 1 + 0) / 3
  EXPECT_DOUBLE_EQ(m[1](0, 0), 3.5);
  EXPECT_DOUBLE_EQ(m[1](1, 1), 1.0);
}

TEST(Clusters, TfIdfKeywordsHandExample) {
  const std::vector<std::string> t = {"football goal match", "football match the", "flour sugar cake",
                                      "the sugar flour"};
  const auto kw = eval::cluster_keywords(t, {0, 0, 1, 1}, 2, 3);
  ASSERT_EQ(kw.size(), 2u);
  ASSERT_EQ(kw[0].size(), 3u);
  // Hand computation: idf(football) = idf(match) = ln(5/3) + 1, idf(goal) = ln(5/2) + 1, idf(the) = ln(5/3) + 1.
  const double a = std::log(5.0 / 3) + 1, b = std::log(5.0 / 2) + 1;
  const double n1 = std::sqrt(2 * a * a + b * b), n2 = std::sqrt(3 * a * a);
  // football: (a/n1 + a/n2) / 2 in cluster 0, never elsewhere.
  EXPECT_EQ(kw[0][0].first, "football");
  EXPECT_NEAR(kw[0][0].second, (a / n1 + a / n2) / 2, 1e-12);
  EXPECT_EQ(kw[0][1].first, "match");  // same weight as football; ties alphabetical
  EXPECT_EQ(kw[0][2].first, "goal");   // b/n1/2 < a-terms
  EXPECT_NEAR(kw[0][2].second, b / n1 / 2, 1e-12);
  for (const auto& [term, s] : kw[1]) EXPECT_NE(term, "the");
  EXPECT_TRUE(kw[1][0].first == "flour" || kw[1][0].first == "sugar");
}

TEST(Clusters, ScatterSvgDrawsEveryPoint) {
  Eigen::MatrixXd xy(3, 2);
  xy << 0, 0, 1, 1, 2, 0;
  const std::string s = scatter_svg(xy, {0, 1, -1}, {"a<b", "c"}, "t");
  size_t circles = 0;
  for (size_t at = 0; (at = s.find("<circle", at)) != std::string::npos; ++at) ++circles;
  EXPECT_EQ(circles, 3u + 3u);  // points + legend entries (two groups and noise)
  EXPECT_NE(s.find("a&lt;b"), std::string::npos);
}

}  // namespace
}  // namespace moedit
