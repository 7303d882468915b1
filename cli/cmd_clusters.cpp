// moedit clusters EMB --out F.json [--svg-clusters F.svg] [--svg-labels F.svg] [--vectors DIR] [--windows]
//                 [--perplexity P] [--iterations N] [--min-pts K] [--eps X] [--space map|embedding] [--keywords N]
//
// Router-embedding clusters (issue 20). EMB is what `moedit embed` writes: X.npy (with X.npy.index.json next to it)
// or X.json. The embeddings [n, layers·E] are mapped to 2-D by exact t-SNE with PCA initialisation
// (tracing/tsne.h), clustered by DBSCAN with eps from the k-distance knee (tracing/clusters.h; in the 2-D map by
// default, --space embedding clusters the embeddings themselves), named by tf-idf keywords (eval/cluster_keywords.h),
// scored by purity against the labels when the index has them, and each cluster's mean embedding E_c is written in
// the format `--steer` reads ({"layers", "vector"}; pass --steer-threshold 3/E to binarise it as the study does).
// --windows adds the token windows of `embed --window` as points of their own (keywords from their whole text).
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "eval/cluster_keywords.h"
#include "io/errors.h"
#include "io/files.h"
#include "io/npy_read.h"
#include "tracing/clusters.h"
#include "tracing/tsne.h"

namespace moedit::cli {

namespace {

struct Args {
  std::string emb, out, svg_clusters, svg_labels, vectors, space = "map";
  bool windows = false;
  double perplexity = 30, eps = 0;
  int iterations = 1000, min_pts = 5, keywords = 8;
};

struct Embeddings {
  Eigen::MatrixXd e;  // [n, layers·E]
  std::vector<int> layers;
  int E = 0;
  std::vector<std::string> text, label;  // per row (label empty: none)
  std::vector<nlohmann::json> item;      // per row: the index's item
};

nlohmann::json read_json(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw InputError(path + ": cannot open");
  try {
    return nlohmann::json::parse(f);
  } catch (const nlohmann::json::exception& e) {
    throw InputError(path + ": not JSON (" + e.what() + ")");
  }
}

Embeddings load_embeddings(const std::string& path, bool windows) {
  const bool npy = path.size() > 4 && path.substr(path.size() - 4) == ".npy";
  const std::string ipath = npy ? path + ".index.json" : path;
  const nlohmann::json j = read_json(ipath);
  auto field = [&](const char* k, bool ok) { require_input(ok, ipath + ": field '" + k + "' missing or malformed"); };
  field("moe_layers", j.is_object() && j.contains("moe_layers") && j["moe_layers"].is_array());
  field("experts", j.contains("experts") && j["experts"].is_number_integer() && j["experts"].get<int>() > 0);
  field("texts", j.contains("texts") && j["texts"].is_array());
  field("items", j.contains("items") && j["items"].is_array());
  Embeddings r;
  r.layers = j["moe_layers"].get<std::vector<int>>();
  r.E = j["experts"].get<int>();
  const auto texts = j["texts"].get<std::vector<std::string>>();
  std::vector<std::string> labels;
  if (j.contains("labels")) labels = j["labels"].get<std::vector<std::string>>();
  const size_t L = r.layers.size(), E = size_t(r.E), n_items = j["items"].size();
  NpyF32 arr;
  if (npy) {
    arr = read_npy_f32(path);
    require_input(arr.shape == std::vector<size_t>{n_items, L, E},
                  path + ": shape does not match " + ipath + " (" + std::to_string(n_items) + " items of " +
                      std::to_string(L) + " layers x " + std::to_string(E) + " experts)");
  }
  std::vector<std::vector<double>> rows;
  for (size_t i = 0; i < n_items; ++i) {
    const auto& it = j["items"][i];
    const std::string where = ipath + ": field 'items[" + std::to_string(i) + "]";
    require_input(it.is_object() && it.contains("text") && it["text"].is_number_integer() && it["text"].get<int>() >= 0 &&
                      size_t(it["text"].get<int>()) < texts.size(),
                  where + ".text' missing or not a text index");
    if (it.value("window", false) && !windows) continue;
    std::vector<double> row;
    if (npy) {
      row.assign(arr.values.begin() + long(i * L * E), arr.values.begin() + long((i + 1) * L * E));
    } else {
      require_input(it.contains("embedding") && it["embedding"].is_array() && it["embedding"].size() == L,
                    where + ".embedding' missing or not " + std::to_string(L) + " rows");
      for (const auto& er : it["embedding"]) {
        require_input(er.is_array() && er.size() == E, where + ".embedding' rows must have " + std::to_string(E) + " numbers");
        for (const auto& x : er) row.push_back(x.get<double>());
      }
    }
    const size_t t = size_t(it["text"].get<int>());
    r.text.push_back(texts[t]);
    if (!labels.empty()) r.label.push_back(t < labels.size() ? labels[t] : "");
    r.item.push_back(it);
    rows.push_back(std::move(row));
  }
  require_input(!rows.empty(), ipath + ": no embeddings to cluster");
  r.e.resize(Eigen::Index(rows.size()), Eigen::Index(L * E));
  for (size_t i = 0; i < rows.size(); ++i)
    r.e.row(Eigen::Index(i)) = Eigen::Map<const Eigen::RowVectorXd>(rows[i].data(), Eigen::Index(rows[i].size()));
  return r;
}

nlohmann::json vector_json(const Eigen::MatrixXd& m, const std::vector<int>& layers) {
  nlohmann::json v = nlohmann::json::array();
  for (Eigen::Index l = 0; l < m.rows(); ++l) v.push_back(std::vector<double>(m.row(l).begin(), m.row(l).end()));
  return {{"layers", layers}, {"vector", v}};
}

void run_clusters(const Args& a) {
  require_input(a.space == "map" || a.space == "embedding", "--space '" + a.space + "': expected map or embedding");
  Embeddings x;
  try {
    x = load_embeddings(a.emb, a.windows);
  } catch (const nlohmann::json::exception& e) {
    throw InputError(a.emb + ": malformed embeddings index (" + e.what() + ")");
  }
  TsneOptions to;
  to.perplexity = a.perplexity;
  to.iterations = a.iterations;
  const Eigen::MatrixXd xy = tsne(x.e, to);  // [n, 2]
  const Eigen::MatrixXd& space = a.space == "map" ? xy : x.e;
  const double eps = a.eps > 0 ? a.eps : kdistance_eps(space, a.min_pts);
  const Dbscan db = dbscan(space, eps, a.min_pts);
  const auto kw = eval::cluster_keywords(x.text, db.label, db.n_clusters, a.keywords);
  const auto means = cluster_means(x.e, db.label, db.n_clusters, int(x.layers.size()));
  const bool labelled = !x.label.empty();
  const Purity pur = labelled ? cluster_purity(db.label, db.n_clusters, x.label) : Purity{};

  nlohmann::json out;
  out["method"] = {{"map", "t-SNE (exact, PCA init)"}, {"perplexity", std::min(a.perplexity, double(x.e.rows() - 1) / 3)},
                   {"clustering", "DBSCAN, eps from the k-distance knee"}, {"space", a.space}, {"eps", eps},
                   {"min_pts", a.min_pts}};
  out["n"] = x.e.rows();
  int noise = 0;
  for (int c : db.label) noise += c < 0;
  out["noise"] = noise;
  if (labelled) out["purity"] = pur.purity;
  out["clusters"] = nlohmann::json::array();
  std::vector<std::string> names;
  for (int c = 0; c < db.n_clusters; ++c) {
    nlohmann::json cj = {{"id", c}, {"size", std::count(db.label.begin(), db.label.end(), c)}};
    std::string name = "cluster " + std::to_string(c) + ":";
    cj["keywords"] = nlohmann::json::array();
    for (size_t k = 0; k < kw[size_t(c)].size(); ++k) {
      cj["keywords"].push_back({{"term", kw[size_t(c)][k].first}, {"score", kw[size_t(c)][k].second}});
      if (k < 3) name += " " + kw[size_t(c)][k].first;
    }
    names.push_back(name);
    if (labelled) cj["majority_label"] = pur.majority[size_t(c)], cj["majority_share"] = pur.majority_share[size_t(c)];
    cj["experts"] = nlohmann::json::array();  // entries ≥ 3/E, the study's threshold
    for (Eigen::Index l = 0; l < means[size_t(c)].rows(); ++l)
      for (int e = 0; e < x.E; ++e)
        if (means[size_t(c)](l, e) >= 3.0 / x.E) cj["experts"].push_back(std::to_string(x.layers[size_t(l)]) + ":" + std::to_string(e));
    cj["expert_vector"] = vector_json(means[size_t(c)], x.layers);
    if (!a.vectors.empty()) {
      std::filesystem::create_directories(a.vectors);
      nlohmann::json v = cj["expert_vector"];
      v["cluster"] = c, v["threshold"] = 3.0 / x.E, v["keywords"] = cj["keywords"];
      write_file_atomic(a.vectors + "/cluster_" + std::to_string(c) + ".json", v.dump(1) + "\n");
    }
    out["clusters"].push_back(std::move(cj));
  }
  out["points"] = nlohmann::json::array();
  for (Eigen::Index i = 0; i < x.e.rows(); ++i) {
    nlohmann::json p = {{"item", x.item[size_t(i)]["text"]}, {"x", xy(i, 0)}, {"y", xy(i, 1)}, {"cluster", db.label[size_t(i)]}};
    if (x.item[size_t(i)].value("window", false)) p["start"] = x.item[size_t(i)]["start"];
    if (labelled) p["label"] = x.label[size_t(i)];
    out["points"].push_back(std::move(p));
  }
  write_file_atomic(a.out, out.dump(1) + "\n");
  if (!a.svg_clusters.empty()) write_file_atomic(a.svg_clusters, scatter_svg(xy, db.label, names, "router embeddings: DBSCAN clusters (t-SNE map)"));
  if (!a.svg_labels.empty() && labelled) {
    std::vector<std::string> lnames;
    std::vector<int> g;
    for (const auto& l : x.label) {
      const auto at = std::find(lnames.begin(), lnames.end(), l);
      g.push_back(int(at - lnames.begin()));
      if (at == lnames.end()) lnames.push_back(l);
    }
    write_file_atomic(a.svg_labels, scatter_svg(xy, g, lnames, "router embeddings by label (t-SNE map)"));
  }
  std::printf("%lld embeddings, %d clusters (eps %.4g, min_pts %d), %d noise", (long long)x.e.rows(), db.n_clusters, eps,
              a.min_pts, noise);
  if (labelled) std::printf(", purity %.3f", pur.purity);
  std::printf(" → %s\n", a.out.c_str());
  for (int c = 0; c < db.n_clusters; ++c) std::printf("  %s\n", names[size_t(c)].c_str());
}

void register_clusters(CLI::App& app) {
  static Args a;
  auto* cmd = app.add_subcommand("clusters", "Router-embedding map, density clusters, keywords and expert vectors E_c");
  cmd->add_option("EMB", a.emb, "Embeddings from `moedit embed`: X.npy (+ X.npy.index.json) or X.json")->required();
  cmd->add_option("--out", a.out, "Output JSON")->required();
  cmd->add_option("--svg-clusters", a.svg_clusters, "SVG scatter coloured by cluster");
  cmd->add_option("--svg-labels", a.svg_labels, "SVG scatter coloured by label");
  cmd->add_option("--vectors", a.vectors, "Write each cluster's E_c to DIR/cluster_C.json (the --steer format)");
  cmd->add_flag("--windows", a.windows, "Include the token windows (default: whole texts only)");
  cmd->add_option("--perplexity", a.perplexity, "t-SNE perplexity")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--iterations", a.iterations, "t-SNE iterations")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--min-pts", a.min_pts, "DBSCAN min_pts")->capture_default_str()->check(CLI::Range(2, 1 << 20));
  cmd->add_option("--eps", a.eps, "DBSCAN eps (default: the k-distance knee)")->check(CLI::NonNegativeNumber);
  cmd->add_option("--space", a.space, "Cluster the 2-D map (map) or the embeddings (embedding)")->capture_default_str();
  cmd->add_option("--keywords", a.keywords, "Keywords per cluster")->capture_default_str()->check(CLI::NonNegativeNumber);
  cmd->callback([] { run_clusters(a); });
}

}  // namespace

MOEDIT_COMMAND(48, register_clusters)

}  // namespace moedit::cli
