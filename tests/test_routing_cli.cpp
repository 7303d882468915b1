// The `route` and `experts` commands (and --mask/--boost on `logits`/`generate`) against the routing library.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "datasets/counterfact.h"
#include "model/generate.h"
#include "model/model.h"
#include "routing_util.h"
#include "tokenizer/tokenizer.h"
#include "test_util.h"
#include "tracing/interventions.h"
#include "tracing/routing.h"
#include "tracing/routing_profile.h"

namespace moedit {
namespace {

using json = nlohmann::json;
using namespace routing_test;

// ---- the CLI ------------------------------------------------------------------------------------------------------

std::string fx(const std::string& name) { return test::fixture("models/" + name); }

std::string join_ids(const std::vector<int32_t>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i) s += ',';
    s += std::to_string(ids[i]);
  }
  return s;
}

TEST(RouteCli, IdsJsonMatchesTheLibrary) {
  Fixture f("qwen2_moe");
  const auto r = capture_routing(*f.model, {f.seqs[0], f.seqs[1]});
  const std::string ids0 = join_ids(f.seqs[0]), ids1 = join_ids(f.seqs[1]);
  const auto res = test::run_cli("route " + fx("qwen2_moe") + " --ids " + ids0 + " --paraphrase-ids " + ids1 + " --json");
  ASSERT_EQ(res.code, 0) << res.err;
  const json j = json::parse(res.out);
  EXPECT_EQ(j["moe_layers"], json({0, 1, 3}));
  const json& tok3 = j["sequences"][0]["tokens"][3]["layers"][1];  // token 3, layer 1
  EXPECT_EQ(tok3["layer"], 1);
  EXPECT_EQ(tok3["experts"][0].get<int>(), r[0].experts[1](3, 0));
  EXPECT_EQ(tok3["dominant"].get<int>(), r[0].experts[1](3, 0));
  EXPECT_NEAR(tok3["entropy"].get<double>(), router_entropy(r[0].probs[1].row(3).data(), 8), 1e-6);
  const auto last = compare_tokens(r[0], 8, r[1], 4, f.cfg());
  const json& cj = j["consistency"][0]["last"]["layers"];
  ASSERT_EQ(cj.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(cj[i]["shared"].get<int>(), last[i].topk.shared);
    EXPECT_NEAR(cj[i]["sym_kl"].get<double>(), last[i].sym_kl, 1e-6);
  }
  // The table form runs too.
  const auto t = test::run_cli("route " + fx("qwen2_moe") + " --ids " + ids0);
  ASSERT_EQ(t.code, 0) << t.err;
  EXPECT_NE(t.out.find("layer 3 (top-3 of 8"), std::string::npos) << t.out;
}

TEST(RouteCli, BadInterventionsExitTwoNamingTheFlag) {
  const std::string m = fx("qwen2_moe");
  for (const auto& [args, flag] : std::vector<std::pair<std::string, std::string>>{
           {"route " + m + " --ids 1,2 --mask 9:0", "--mask"},
           {"route " + m + " --ids 1,2 --mask 2:0", "--mask"},
           {"route " + m + " --ids 1,2 --mask 1:x", "--mask"},
           {"route " + m + " --ids 1,2 --boost 1:8=3", "--boost"},
           {"logits " + m + " --ids 1,2 --boost 1:3", "--boost"},
           {"generate " + m + " --ids 1,2 --mask 0:99", "--mask"},
           {"experts " + m + " --ids 1,2 --boost-mode times", "--boost-mode"}}) {
    const auto r = test::run_cli(args);
    EXPECT_EQ(r.code, 2) << args << "\n" << r.err;
    EXPECT_NE(r.err.find(flag), std::string::npos) << args << "\n" << r.err;
  }
  const auto r = test::run_cli("route " + m + " --prompt hello");
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("tokenizer.json"), std::string::npos) << r.err;
}

TEST(RouteCli, LogitsAndGenerateTakeMaskAndBoost) {
  const std::string m = fx("mixtral_gqa");  // top-2 of 6
  auto r = test::run_cli("logits " + m + " --ids 5,17,3,88,42 --mask 0:0,0:1 --mask 1:2 --json");
  ASSERT_EQ(r.code, 0) << r.err;
  json j = json::parse(r.out);
  for (const auto& lj : j["routing"])
    for (const auto& ids : lj["expert_ids"])
      for (int e : ids) {
        const int layer = lj["layer"];
        EXPECT_TRUE(layer != 0 || (e != 0 && e != 1)) << "layer 0 routed to masked expert " << e;
        EXPECT_TRUE(layer != 1 || e != 2) << "layer 1 routed to masked expert 2";
      }
  r = test::run_cli("logits " + m + " --ids 5,17,3 --boost 1:4=1000 --json");
  ASSERT_EQ(r.code, 0) << r.err;
  j = json::parse(r.out);
  for (const auto& lj : j["routing"]) {
    if (lj["layer"] != 1) continue;
    for (const auto& ids : lj["expert_ids"]) EXPECT_EQ(ids[0].get<int>(), 4);
  }
  const auto g0 = test::run_cli("generate " + m + " --ids 5,17,3 -n 6 --json");
  const auto g1 = test::run_cli("generate " + m + " --ids 5,17,3 -n 6 --json --boost 0:3=50 --boost-mode add");
  ASSERT_EQ(g0.code, 0) << g0.err;
  ASSERT_EQ(g1.code, 0) << g1.err;
  // Same as the library with the same intervention.
  Fixture f("mixtral_gqa");
  InterventionSpec s;
  s.boost = {{0, 3, 50.f}};
  Hooks h;
  install_interventions(s, f.cfg(), h);
  GenerateOptions go;
  go.max_new_tokens = 6;
  go.hooks = &h;
  EXPECT_EQ(json::parse(g1.out)["ids"].get<std::vector<int32_t>>(), generate(*f.model, {5, 17, 3}, go));
  // Steering with a vector that strongly favours expert 4 at layer 1 (form 3): it is always chosen there.
  test::TempDir tmp;
  test::write_file(tmp / "steer.json", R"({"layers": [1], "vector": [[0, 0, 0, 0, 1, 0]]})");
  r = test::run_cli("logits " + m + " --ids 5,17,3 --steer " + (tmp / "steer.json") + " --steer-coef 1000 --json");
  ASSERT_EQ(r.code, 0) << r.err;
  j = json::parse(r.out);
  for (const auto& lj : j["routing"]) {
    if (lj["layer"] != 1) continue;
    for (const auto& ids : lj["expert_ids"]) EXPECT_EQ(ids[0].get<int>(), 4);
  }
  r = test::run_cli("logits " + m + " --ids 5,17,3 --steer " + (tmp / "missing.json"));
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("missing.json: cannot open the steering file"), std::string::npos) << r.err;
}

TEST(ExpertsCli, ProfileFormatsAndDomains) {
  test::TempDir tmp;
  Fixture f("qwen3_moe");
  std::string lines;
  for (const auto& s : f.seqs) {
    lines += join_ids(s) + "\n";
  }
  test::write_file(tmp / "all.ids", lines);
  test::write_file(tmp / "two.ids", lines.substr(0, lines.find('\n') + 1));
  const ActivationProfile p = activation_profile(*f.model, f.seqs);
  auto r = test::run_cli("experts " + fx("qwen3_moe") + " --corpus " + (tmp / "all.ids") + " --json");
  ASSERT_EQ(r.code, 0) << r.err;
  json j = json::parse(r.out);
  EXPECT_EQ(j["tokens"].get<int>(), 27);
  EXPECT_NEAR(j["frequency"][1][3].get<double>(), p.frequency()(1, 3), 1e-12);
  r = test::run_cli("experts " + fx("qwen3_moe") + " --corpus " + (tmp / "all.ids") + " --format npy --out " +
                    (tmp / "p.npy"));
  ASSERT_EQ(r.code, 0) << r.err;
  const std::string npy = test::read_file(tmp / "p.npy");
  ASSERT_GE(npy.size(), 128u);
  EXPECT_EQ(npy.substr(0, 6), "\x93NUMPY");
  const size_t hlen = size_t(uint8_t(npy[8])) | size_t(uint8_t(npy[9])) << 8;
  EXPECT_EQ((10 + hlen) % 64, 0u);
  EXPECT_NE(npy.find("'shape': (2, 8)"), std::string::npos);  // MoE layers 1, 2 of 3 (layer 0 dense)
  ASSERT_EQ(npy.size(), 10 + hlen + 2 * 8 * 4);
  float v;
  std::memcpy(&v, npy.data() + 10 + hlen + (1 * 8 + 5) * 4, 4);
  EXPECT_FLOAT_EQ(v, float(p.frequency()(1, 5)));
  r = test::run_cli("experts " + fx("qwen3_moe") + " --corpus " + (tmp / "all.ids") + " --format csv");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, p.to_csv());
  r = test::run_cli("experts " + fx("qwen3_moe") + " --domain a=" + (tmp / "all.ids") + " --domain b=" +
                    (tmp / "two.ids") + " --json");
  ASSERT_EQ(r.code, 0) << r.err;
  j = json::parse(r.out);
  EXPECT_EQ(j["domains"], json({"a", "b"}));
  EXPECT_EQ(j["tokens"], json({27, 9}));
  EXPECT_EQ(j["all"].size(), 16u);
  r = test::run_cli("experts " + fx("qwen3_moe") + " --compare " + (tmp / "all.ids") + " " + (tmp / "two.ids"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("Experts used more by"), std::string::npos);
  r = test::run_cli("experts " + fx("qwen3_moe") + " --drivers " + (tmp / "two.ids") + " --layers 1 --json");
  ASSERT_EQ(r.code, 0) << r.err;
  j = json::parse(r.out);
  EXPECT_EQ(j["experts"].size(), 8u);
  EXPECT_EQ(j["tokens"].get<int>(), 9);
  r = test::run_cli("experts " + fx("qwen3_moe") + " --domain a=" + (tmp / "all.ids"));
  EXPECT_EQ(r.code, 2);
  r = test::run_cli("experts " + fx("qwen3_moe") + " --ids 1,2 --format npy");
  EXPECT_EQ(r.code, 2);
}

TEST(RouteCli, DatasetModeWithATokenizer) {
  // A model folder = a fixture's weights + the character tokenizer; CounterFact = the two records above.
  test::TempDir tmp;
  std::filesystem::create_directories(tmp / "m");
  for (const char* file : {"config.json", "model.safetensors"})
    std::filesystem::copy_file(fx("qwen2_moe") + "/" + file, tmp / ("m/" + std::string(file)));
  test::write_file(tmp / "m/tokenizer.json", char_tokenizer_json());
  test::write_file(tmp / "cf.json", kMiniCounterFact);
  const auto r = test::run_cli("route " + (tmp / "m") + " --counterfact --dataset " + (tmp / "cf.json") + " --svg " +
                               (tmp / "c.svg") + " --json --cases 3");
  ASSERT_EQ(r.code, 0) << r.err;
  const json j = json::parse(r.out);
  EXPECT_EQ(j["n_pairs"], 3);
  EXPECT_EQ(j["subject_missing"], 1);
  EXPECT_EQ(j["most_different"].size(), 3u);
  // Same numbers as the library.
  auto m = Model::load(tmp / "m");
  const Tokenizer tok = Tokenizer::from_file(tmp / "m/tokenizer.json");
  const ConsistencyReport rep = paraphrase_consistency(*m, counterfact_pairs(load_counterfact(tmp / "cf.json"), tok));
  for (int w = 0; w < 2; ++w)
    for (size_t i = 0; i < rep.layers.size(); ++i) {
      const json& lj = j["positions"][where_name(Where(w))]["per_layer"][i];
      EXPECT_EQ(lj["consistent"].get<int>(), rep.tally[w].consistent[i]);
      EXPECT_NEAR(lj["mean_sym_kl"].get<double>(), rep.tally[w].mean_sym_kl(i), 1e-9);
    }
  EXPECT_EQ(test::read_file(tmp / "c.svg").rfind("<svg", 0), 0u);
  // Text mode with --subject and a paraphrase.
  const auto t = test::run_cli("route " + (tmp / "m") +
                               " --prompt 'Ed Roe plays the' --paraphrase 'Who knows? Ed Roe plays' --subject 'Ed Roe'");
  ASSERT_EQ(t.code, 0) << t.err;
  EXPECT_NE(t.out.find("subject's last token (prompt pos 5 vs paraphrase pos 16)"), std::string::npos) << t.out;
  const auto bad = test::run_cli("route " + (tmp / "m") + " --prompt 'Ed Roe plays' --subject 'Bob'");
  EXPECT_EQ(bad.code, 2);
  EXPECT_NE(bad.err.find("not found"), std::string::npos);
}

}  // namespace
}  // namespace moedit
