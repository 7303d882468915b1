// Cluster keywords by tf-idf contrast (see eval/cluster_keywords.h).
#include "eval/cluster_keywords.h"

#include <algorithm>
#include <map>
#include <stdexcept>

#include "eval/text_metrics.h"

namespace moedit::eval {

std::vector<std::vector<std::pair<std::string, double>>> cluster_keywords(const std::vector<std::string>& texts,
                                                                          const std::vector<int>& cluster,
                                                                          int n_clusters, int top) {
  if (texts.size() != cluster.size()) throw std::invalid_argument("cluster_keywords: one cluster per text");
  const TfIdf tfidf(texts);
  std::vector<std::map<std::string, double>> sum(static_cast<size_t>(n_clusters));  // Σ tf-idf over each cluster's texts
  std::map<std::string, double> all;                                   // Σ over every text
  std::vector<int> size(size_t(n_clusters), 0);
  for (size_t i = 0; i < texts.size(); ++i) {
    const auto v = tfidf.transform(texts[i]);
    for (const auto& [t, w] : v) all[t] += w;
    if (cluster[i] < 0) continue;
    ++size[size_t(cluster[i])];
    for (const auto& [t, w] : v) sum[size_t(cluster[i])][t] += w;
  }
  const double n = double(texts.size());
  std::vector<std::vector<std::pair<std::string, double>>> out(static_cast<size_t>(n_clusters));
  for (int c = 0; c < n_clusters; ++c) {
    const double in = size[size_t(c)], rest = n - in;
    auto& kw = out[size_t(c)];
    for (const auto& [t, s] : sum[size_t(c)]) {
      const double score = s / in - (rest > 0 ? (all[t] - s) / rest : 0.0);
      if (score > 0) kw.emplace_back(t, score);
    }
    std::stable_sort(kw.begin(), kw.end(), [](const auto& a, const auto& b) { return a.second > b.second; });
    if (int(kw.size()) > top) kw.resize(size_t(top));
  }
  return out;
}

}  // namespace moedit::eval
