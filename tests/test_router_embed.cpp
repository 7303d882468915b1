// Router embeddings (tracing/router_embed.h): counts against the routing of separate forwards, windows, the .npy
// layout, and `moedit embed` on the demo model.
#include <gtest/gtest.h>

#include <cstring>
#include <nlohmann/json.hpp>

#include "model/model.h"
#include "test_util.h"
#include "tracing/router_embed.h"

namespace moedit {
namespace {

TEST(RouterEmbed, FrequenciesCountEachTextsTopKSets) {
  const ModelConfig c = test::tiny_config("qwen2_moe");  // has a dense layer: left out
  Model m(c, random_weights(c, 5, 0.3f));
  const std::vector<std::vector<int32_t>> texts = {{5, 17, 3, 88, 42, 7, 9}, {9, 2}, {33, 34, 35, 36, 0}};
  EmbedOptions o;
  o.window = 3;
  o.routing.max_batch_tokens = 6;  // several forward calls
  const auto emb = router_embeddings(m, texts, o);
  const std::vector<int> layers = moe_layers(c);
  ASSERT_LT(layers.size(), size_t(c.n_layers));
  ASSERT_EQ(emb.size(), 3u + 3u + 1u + 2u);  // texts, then windows of 3 tokens: 7 → 3, 2 → 1, 5 → 2
  for (size_t i = 0; i < texts.size(); ++i) {
    const ForwardOutput f = m.forward({texts[i]});  // the text alone
    MatR want = MatR::Zero(Eigen::Index(layers.size()), c.n_experts);
    for (size_t li = 0; li < layers.size(); ++li)
      for (Eigen::Index t = 0; t < f.routing[size_t(layers[li])].ids.rows(); ++t)
        for (int j = 0; j < c.top_k; ++j) want(Eigen::Index(li), f.routing[size_t(layers[li])].ids(t, j)) += 1;
    want /= float(texts[i].size());
    EXPECT_EQ(emb[i].text, int(i));
    EXPECT_FALSE(emb[i].window);
    EXPECT_EQ(emb[i].tokens, int(texts[i].size()));
    EXPECT_EQ((emb[i].freq - want).cwiseAbs().maxCoeff(), 0.f) << "text " << i;
    for (Eigen::Index r = 0; r < want.rows(); ++r) EXPECT_NEAR(emb[i].freq.row(r).sum(), float(c.top_k), 1e-5);
  }
  // A text's embedding is the token-weighted mean of its windows' embeddings.
  MatR mix = MatR::Zero(emb[0].freq.rows(), emb[0].freq.cols());
  int starts = 0;
  for (const auto& e : emb)
    if (e.window && e.text == 0) {
      EXPECT_EQ(e.start, starts);
      starts += e.tokens;
      mix += e.freq * float(e.tokens);
    }
  EXPECT_EQ(starts, 7);
  EXPECT_LE((mix / 7.f - emb[0].freq).cwiseAbs().maxCoeff(), 1e-6f);
}

TEST(RouterEmbed, NpyLayout) {
  std::vector<RouterEmbedding> e(2);
  for (int i = 0; i < 2; ++i) {
    e[size_t(i)].freq = MatR::Constant(3, 4, float(i) + 0.5f);
    e[size_t(i)].freq(2, 3) = 7.f;
  }
  const std::string b = embeddings_npy(e);
  ASSERT_EQ(b.substr(0, 8), std::string("\x93NUMPY\x01\x00", 8));
  const size_t hl = size_t(uint8_t(b[8])) | size_t(uint8_t(b[9])) << 8;
  EXPECT_EQ((10 + hl) % 64, 0u);
  const std::string header = b.substr(10, hl);
  EXPECT_NE(header.find("'descr': '<f4'"), std::string::npos);
  EXPECT_NE(header.find("'shape': (2, 3, 4)"), std::string::npos);
  EXPECT_EQ(header.back(), '\n');
  ASSERT_EQ(b.size(), 10 + hl + 2 * 3 * 4 * sizeof(float));
  float v[24];
  std::memcpy(v, b.data() + 10 + hl, sizeof v);
  EXPECT_EQ(v[0], 0.5f);
  EXPECT_EQ(v[11], 7.f);
  EXPECT_EQ(v[12], 1.5f);
  EXPECT_EQ(v[23], 7.f);
}

TEST(RouterEmbed, CliWritesJsonAndNpy) {
  test::TempDir tmp;
  auto r = test::run_cli("embed --dataset bundled --limit 4 --window 6 --out " + (tmp / "e.json"));
  ASSERT_EQ(r.code, 0) << r.err;
  const auto j = nlohmann::json::parse(test::read_file(tmp / "e.json"));
  EXPECT_EQ(j["texts"].size(), 4u);
  EXPECT_EQ(j["labels"].size(), 4u);
  const int k = j["top_k"];
  ASSERT_GT(j["items"].size(), 4u);
  for (const auto& it : j["items"])
    for (const auto& row : it["embedding"]) {
      double s = 0;
      for (double x : row) s += x;
      EXPECT_NEAR(s, k, 1e-5);
    }
  r = test::run_cli("embed --dataset bundled --limit 4 --out " + (tmp / "e.npy"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(std::filesystem::exists(tmp / "e.npy.index.json"));
  // Bad input: exit 2, naming what is wrong.
  r = test::run_cli("embed --out " + (tmp / "x.json"));
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("--corpus"), std::string::npos) << r.err;
  test::write_file(tmp / "c.jsonl", "{\"text\": \"a b\"}\n{\"txt\": 1}\n");
  r = test::run_cli("embed --corpus " + (tmp / "c.jsonl") + " --out " + (tmp / "x.json"));
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("line 2: field 'text'"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace moedit
