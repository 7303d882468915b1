// tf-idf keywords of text clusters (issue 20, `moedit clusters`).
//
// The texts are turned into scikit-learn-style tf-idf vectors (eval/text_metrics.h TfIdf, fitted on all the texts:
// lowercase words of ≥ 2 characters, smooth idf, L2-normalised rows). A term's score for cluster c is its mean
// weight over c's texts minus its mean weight over every other text (noise included): terms frequent in c and rare
// elsewhere come first, words common to every text ("the") score near zero. The top terms with a positive score are
// the cluster's keywords (ties: alphabetical).
#pragma once
#include <string>
#include <utility>
#include <vector>

namespace moedit::eval {

// texts [n], cluster [n] (−1: noise) → for each cluster 0..n_clusters−1, up to `top` (term, score), best first.
std::vector<std::vector<std::pair<std::string, double>>> cluster_keywords(const std::vector<std::string>& texts,
                                                                          const std::vector<int>& cluster,
                                                                          int n_clusters, int top);

}  // namespace moedit::eval
