// Issue 20 commands through the CLI: `clusters` end to end on synthetic embeddings (clusters, purity, E_c files that
// --steer reads), `probe --build-features` then `probe`, and the bad inputs of README's matrix (rows 55–58).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <functional>
#include <random>

#include "io/npy.h"
#include "test_util.h"
#include "tracing/interventions.h"

namespace moedit {
namespace {

using test::TempDir;

std::string demo() { return test::source_dir() + "/models/moedit-demo"; }

// 60 texts in 3 groups (20 each, interleaved): embeddings of 2 layers x 4 experts concentrated on expert g of both
// layers, texts naming the group's topic.
nlohmann::json synthetic_index(bool with_embedding) {
  std::mt19937 rng(5);
  std::uniform_real_distribution<double> u(0, 0.05);
  const char* topic[3] = {"football goal", "flour sugar", "court judge"};
  nlohmann::json j = {{"moe_layers", {0, 1}}, {"experts", 4}, {"texts", nlohmann::json::array()},
                      {"labels", nlohmann::json::array()}, {"items", nlohmann::json::array()}};
  for (int i = 0; i < 60; ++i) {
    const int g = i % 3;
    j["texts"].push_back(std::string(topic[g]) + " text " + std::to_string(i));
    j["labels"].push_back("g" + std::to_string(g));
    nlohmann::json it = {{"text", i}, {"start", 0}, {"tokens", 5}, {"window", false}};
    if (with_embedding) {
      nlohmann::json rows = nlohmann::json::array();
      for (int l = 0; l < 2; ++l) {
        std::vector<double> r(4);
        for (int e = 0; e < 4; ++e) r[size_t(e)] = (e == g ? 1.0 : 0.3) + u(rng);
        rows.push_back(r);
      }
      it["embedding"] = rows;
    }
    j["items"].push_back(it);
  }
  return j;
}

TEST(Issue20Cli, ClustersEndToEnd) {
  TempDir d;
  test::write_file(d / "e.json", synthetic_index(true).dump());
  const auto r = test::run_cli("clusters " + (d / "e.json") + " --out " + (d / "c.json") + " --vectors " + (d / "v") +
                               " --svg-clusters " + (d / "c.svg") + " --svg-labels " + (d / "l.svg"));
  ASSERT_EQ(r.code, 0) << r.err;
  const auto c = nlohmann::json::parse(test::read_file(d / "c.json"));
  EXPECT_EQ(c["clusters"].size(), 3u) << r.out;
  EXPECT_DOUBLE_EQ(c["purity"].get<double>(), 1.0);
  EXPECT_EQ(c["points"].size(), 60u);
  // Cluster keywords name the topics; E_c files load as steering vectors with E_c = the cluster's mean.
  for (int k = 0; k < 3; ++k) {
    const std::string top = c["clusters"][k]["keywords"][0]["term"];
    EXPECT_TRUE(top == "football" || top == "goal" || top == "flour" || top == "sugar" || top == "court" || top == "judge") << top;
    const Steering s = load_steering(d / ("v/cluster_" + std::to_string(k) + ".json"));
    ASSERT_EQ(s.layers, (std::vector<int>{0, 1}));
    Eigen::Index big = 0;
    s.vector[0].maxCoeff(&big);
    EXPECT_GT(s.vector[0][big], 0.95f);
    EXPECT_LT(s.vector[0].minCoeff(), 0.4f);
  }
  EXPECT_NE(test::read_file(d / "l.svg").find("g0"), std::string::npos);
}

TEST(Issue20Cli, ProbeBuildsFeaturesAndProbes) {
  TempDir d;
  auto r = test::run_cli("probe " + demo() + " --build-features " + (d / "f.json") + " --wiki-lines 40 --records 40");
  ASSERT_EQ(r.code, 0) << r.err;
  r = test::run_cli("probe " + demo() + " --features " + (d / "f.json") + " --layers 0 --ks 1,4 --out " + (d / "p.json"));
  ASSERT_EQ(r.code, 0) << r.err;
  const auto p = nlohmann::json::parse(test::read_file(d / "p.json"));
  ASSERT_EQ(p["layers"].size(), 1u);
  EXPECT_TRUE(p["layers"][0].contains("shared"));  // the demo model (Qwen2-MoE) has a shared expert
  EXPECT_TRUE(p["layers"][0]["summary"].contains("digit")) << r.out;
}

struct Case {
  std::string name, message;
  std::function<std::string(const TempDir&)> setup;  // writes files, returns the CLI arguments
};

std::vector<Case> cases() {
  return {
      {"clusters: index without experts", "field 'experts' missing or malformed",
       [](const TempDir& d) {
         auto j = synthetic_index(false);
         j.erase("experts");
         test::write_file(d / "e.npy.index.json", j.dump());
         return "clusters " + (d / "e.npy") + " --out " + (d / "c.json");
       }},
      {"clusters: npy shape differs from the index", "shape does not match",
       [](const TempDir& d) {
         test::write_file(d / "e.npy.index.json", synthetic_index(false).dump());
         test::write_file(d / "e.npy", npy_f32({60, 2, 3}, std::vector<float>(360, 0.f)));
         return "clusters " + (d / "e.npy") + " --out " + (d / "c.json");
       }},
      {"probe: labels of the wrong length", "field 'texts[0].labels.digit' has 2 labels for 3 ids",
       [](const TempDir& d) {
         test::write_file(d / "f.json", R"({"features":["digit"],"texts":[{"ids":[1,2,3],"labels":{"digit":[0,1]}}]})");
         return "probe " + demo() + " --features " + (d / "f.json");
       }},
      {"steer-report: no keywords", "--keywords: none given and",
       [](const TempDir& d) {
         test::write_file(d / "s.json", R"({"layers":[0],"vector":[[1,0,0,0,0,0,0,0]]})");
         return "steer-report " + demo() + " --steer " + (d / "s.json");
       }},
  };
}

TEST(Issue20Cli, BadInputsExitTwoNamingTheField) {
  const std::string readme = test::read_file(test::source_dir() + "/README.md");
  for (const auto& c : cases()) {
    TempDir d;
    const auto r = test::run_cli(c.setup(d));
    EXPECT_EQ(r.code, 2) << c.name << ": " << r.err;
    EXPECT_NE(r.err.find(c.message), std::string::npos) << c.name << ": stderr was: " << r.err;
    EXPECT_NE(readme.find(c.message), std::string::npos) << c.name << " missing from README's bad-input table";
  }
}

}  // namespace
}  // namespace moedit
