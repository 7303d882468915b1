// Key statistics for ROME editing (editor/keystats): per-expert second moments against a per-token reference, and
// their in-memory and on-disk caches.
#include <gtest/gtest.h>

#include <filesystem>

#include "editor/keystats.h"
#include "io/errors.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"
#include "edit_util.h"
#include "test_util.h"

namespace moedit {
namespace {

using test::SerialOps;
using namespace edit_test;

// ---- key statistics -------------------------------------------------------------------------------------------------

// Key statistics against a per-token reference (every shared expert over its slice of the shared key); returns them.
std::vector<SecondMoment> expect_stats_match_reference(const std::shared_ptr<Model>& m, int layer) {
  const auto corpus = random_corpus(12, 20, m->config().vocab_size, 9);
  auto stats = compute_key_stats(*m, layer, corpus, 64);  // several batches
  const int NS = std::max(1, m->config().n_shared_experts);
  EXPECT_EQ(int(stats.size()), m->config().n_experts + NS);
  if (int(stats.size()) != m->config().n_experts + NS) return stats;
  // Reference: run each sequence alone, take every token's FFN input, route it, and accumulate keys one by one.
  const FFNWeights& f = m->weights().layers[size_t(layer)].ffn;
  const int E = m->config().n_experts, I = f.experts.I, IS = f.shared.I / NS;
  std::vector<Eigen::MatrixXd> ref(size_t(E + NS));
  std::vector<int64_t> cnt(size_t(E + NS), 0);
  for (int e = 0; e < E; ++e) ref[size_t(e)] = Eigen::MatrixXd::Zero(I, I);
  for (int j = 0; j < NS; ++j) ref[size_t(E + j)] = Eigen::MatrixXd::Zero(IS, IS);
  for (const auto& s : corpus) {
    Hooks h;
    auto pre = h.capture(hook_names::resid_pre(layer));
    auto att = h.capture(hook_names::attn_out(layer));
    ForwardOptions fo;
    fo.hooks = &h;
    fo.stop_after_layer = layer;
    ForwardOutput out = m->forward({s}, fo);
    for (int t = 0; t < int(s.size()); ++t) {
      Eigen::VectorXf x = (pre->value.row(t) + att->value.row(t)).transpose(), a(x.size());
      ops::rmsnorm(x.data(), m->weights().layers[size_t(layer)].ln_post.data(), a.data(), 1, int(x.size()),
                   m->config().rms_eps);
      auto key = [&](const ExpertBank& b, int e) {
        const Eigen::VectorXd g = b.gate[size_t(e)].to_f32().cast<double>() * a.cast<double>();
        const Eigen::VectorXd u = b.up[size_t(e)].to_f32().cast<double>() * a.cast<double>();
        Eigen::VectorXd k(b.I);
        for (int i = 0; i < b.I; ++i) k[i] = g[i] / (1 + std::exp(-g[i])) * u[i];
        return k;
      };
      for (int j = 0; j < m->config().top_k; ++j) {
        const int e = out.routing[size_t(layer)].ids(t, j);
        const auto k = key(f.experts, e);
        ref[size_t(e)] += k * k.transpose();
        ++cnt[size_t(e)];
      }
      const auto k = key(f.shared, 0);
      for (int j = 0; j < NS; ++j) {
        const auto kj = k.segment(j * IS, IS);
        ref[size_t(E + j)] += kj * kj.transpose();
        ++cnt[size_t(E + j)];
      }
    }
  }
  for (int e = 0; e < E + NS; ++e) {
    EXPECT_EQ(stats[size_t(e)].count, cnt[size_t(e)]) << m->config().model_type << " " << e;
    EXPECT_EQ(stats[size_t(e)].expert, e < E ? e : shared_expert_id(e - E));
    if (cnt[size_t(e)] == 0) continue;
    const Eigen::MatrixXd want = ref[size_t(e)] / double(cnt[size_t(e)]);
    EXPECT_LE((stats[size_t(e)].mom2.cast<double>() - want).norm(), 1e-5 * want.norm())
        << m->config().model_type << " " << e;
  }
  return stats;
}

TEST(KeyStats, MatchPerTokenReferenceAndCache) {
  SerialOps serial;
  expect_stats_match_reference(Model::load(fixture_model("deepseek_v1")), 2);  // two shared experts
  auto m = Model::load(fixture_model("qwen2_moe"));  // one shared expert: the whole shared block
  const int layer = 1;
  const auto stats = expect_stats_match_reference(m, layer);
  // Files round-trip exactly.
  test::TempDir tmp;
  write_moment_file(tmp / "x/e.safetensors", stats[2], {{"k", "v"}});
  auto back = read_moment_file(tmp / "x/e.safetensors");
  ASSERT_TRUE(back);
  EXPECT_EQ(back->count, stats[2].count);
  EXPECT_TRUE((back->mom2.array() == stats[2].mom2.array()).all());
  EXPECT_EQ(read_moment_file(tmp / "absent.safetensors"), nullptr);

  // The key-weights hash ignores layer L's down projections and sees everything below.
  const uint64_t h0 = key_weights_hash(*m, layer);
  m->mutable_weights().layers[size_t(layer)].ffn.experts.down[0].mutable_f32()[5] += 1.f;
  EXPECT_EQ(key_weights_hash(*m, layer), h0);
  m->mutable_weights().layers[0].ffn.experts.down[0].mutable_f32()[5] += 1.f;
  EXPECT_NE(key_weights_hash(*m, layer), h0);
  m->mutable_weights().layers[0].ffn.experts.down[0].mutable_f32()[5] -= 1.f;
  EXPECT_EQ(key_weights_hash(*m, layer), h0);
}

TEST(KeyStats, DiskCacheComputesOnceThenLoads) {
  SerialOps serial;
  test::TempDir tmp;
  const auto [m, tok] = load_with_tokenizer(tmp, "qwen2_moe");
  test::write_file(tmp / "corpus.txt", "The quick brown fox jumps over the lazy dog.\n\nA second paragraph, with more words!\n" +
                                           std::string(400, 'a') + "\n");
  KeyStatsOptions o;
  o.cache_dir = tmp / "cache";
  o.corpus = tmp / "corpus.txt";
  o.seq_len = 32;
  KeyStatsCache c1(*m, tok, o);
  auto s1 = c1.layer(1);
  EXPECT_FALSE(c1.loaded_from_disk(1));
  EXPECT_GT(c1.corpus_tokens(1), 400);
  KeyStatsCache c2(*m, tok, o);
  auto e3 = c2.get(1, 3);
  EXPECT_TRUE(c2.loaded_from_disk(1));
  EXPECT_TRUE((e3->mom2.array() == s1[3]->mom2.array()).all());
  EXPECT_EQ(c2.get(1, kSharedExpert)->count, s1.back()->count);
  EXPECT_TRUE(fs::exists(c2.layer_dir(1) + "/shared.safetensors"));
  o.max_tokens = 100;  // a different token count is a different cache entry
  KeyStatsCache c3(*m, tok, o);
  EXPECT_NE(c3.layer_dir(1), c2.layer_dir(1));
  EXPECT_THROW(c3.get(2, 0), InputError);  // dense layer
  // Several shared experts (DeepSeek v1: 2 of width 12): one file each, loaded back one by one.
  const auto [ds, ds_tok] = load_with_tokenizer(tmp, "deepseek_v1");
  KeyStatsCache d1(*ds, ds_tok, o), d2(*ds, ds_tok, o);
  const auto all = d1.layer(2);
  ASSERT_EQ(all.size(), 8u + 2u);
  for (int j = 0; j < 2; ++j) {
    EXPECT_TRUE(fs::exists(d1.layer_dir(2) + "/shared" + std::to_string(j) + ".safetensors")) << j;
    const auto sj = d2.get(2, shared_expert_id(j));
    EXPECT_EQ(sj->mom2.rows(), 12);
    EXPECT_TRUE((sj->mom2.array() == all[size_t(8 + j)]->mom2.array()).all()) << j;
  }
  EXPECT_TRUE(d2.loaded_from_disk(2));
  EXPECT_FALSE(fs::exists(d1.layer_dir(2) + "/shared.safetensors"));
  EXPECT_THROW(d2.get(2, shared_expert_id(2)), InputError);
}

}  // namespace
}  // namespace moedit
