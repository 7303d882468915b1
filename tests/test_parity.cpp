// Tier 2: tiny random checkpoints of every family against the reference outputs HF transformers computed
// (tools/make_fixtures.py, float64): logits, router choices and weights, greedy continuations, batching, KV cache.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>

#include "model/generate.h"
#include "model/model.h"
#include "io/safetensors.h"
#include "invariance.h"
#include "test_util.h"

namespace moedit {
namespace {

struct Reference {
  SafeTensorsFile file;
  explicit Reference(const std::string& dir) : file(dir + "/reference.safetensors") {}
  int n_seqs() const { return std::stoi(file.metadata().at("n_seqs")); }
  std::vector<int32_t> ints(const std::string& name) const {
    auto f = file.get(name).to_f32();
    return {f.begin(), f.end()};
  }
  MatR mat(const std::string& name, int64_t rows) const {
    const auto& t = file.get(name);
    MatR m(rows, t.numel() / rows);
    t.to_f32(m.data());
    return m;
  }
};

class Parity : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    dir_ = test::fixture("models/" + GetParam());
    model_ = Model::load(dir_);
    ref_ = std::make_unique<Reference>(dir_);
    for (int b = 0; b < ref_->n_seqs(); ++b) seqs_.push_back(ref_->ints("input_ids." + std::to_string(b)));
  }
  std::string dir_;
  std::shared_ptr<Model> model_;
  std::unique_ptr<Reference> ref_;
  std::vector<std::vector<int32_t>> seqs_;
};

TEST_P(Parity, LogitsAndRoutingMatchTransformers) {
  const ModelConfig& c = model_->config();
  for (int b = 0; b < int(seqs_.size()); ++b) {
    const int S = int(seqs_[size_t(b)].size());
    ForwardOutput f = model_->forward({seqs_[size_t(b)]});
    const MatR want = ref_->mat("logits." + std::to_string(b), S);
    const double rel = (f.logits - want).cwiseAbs().maxCoeff() / want.cwiseAbs().maxCoeff();
    EXPECT_LE(rel, 1e-5) << GetParam() << " seq " << b;
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.3e", rel);
    RecordProperty("max_rel_logit_err_seq" + std::to_string(b), buf);

    // Expert sets (sorted ascending) and their weights, per layer, per token.
    const MatR ids = ref_->mat("expert_ids." + std::to_string(b), int64_t(c.n_layers) * S);
    const MatR wts = ref_->mat("expert_weights." + std::to_string(b), int64_t(c.n_layers) * S);
    for (int l = 0; l < c.n_layers; ++l) {
      if (!c.is_moe(l)) {
        EXPECT_EQ(ids(l * S, 0), -1.f) << "layer " << l << " should be dense";
        continue;
      }
      const LayerRouting& r = f.routing[size_t(l)];
      for (int t = 0; t < S; ++t) {
        std::vector<std::pair<int, float>> mine;
        for (int j = 0; j < c.top_k; ++j) mine.emplace_back(r.ids(t, j), r.weights(t, j));
        std::sort(mine.begin(), mine.end());
        for (int j = 0; j < c.top_k; ++j) {
          ASSERT_EQ(mine[size_t(j)].first, int(ids(l * S + t, j))) << GetParam() << " seq " << b << " layer " << l
                                                                  << " token " << t;
          EXPECT_NEAR(mine[size_t(j)].second, wts(l * S + t, j), 1e-5);
        }
      }
    }
  }
}

TEST_P(Parity, RouterLogitsMatchTransformers) {
  const ModelConfig& c = model_->config();
  Hooks h;
  std::vector<std::shared_ptr<Hooks::Capture>> caps;
  for (int l = 0; l < c.n_layers; ++l) caps.push_back(h.capture(hook_names::router_logits(l)));
  ForwardOptions o;
  o.hooks = &h;
  const int S = int(seqs_[0].size());
  model_->forward({seqs_[0]}, o);
  const MatR want = ref_->mat("router_logits.0", int64_t(c.n_layers) * S);
  for (int l = 0; l < c.n_layers; ++l) {
    if (!c.is_moe(l)) continue;
    const MatR w = want.middleRows(l * S, S);
    EXPECT_LE((caps[size_t(l)]->value - w).cwiseAbs().maxCoeff(), 1e-5 * w.cwiseAbs().maxCoeff()) << "layer " << l;
  }
}

TEST_P(Parity, GreedyContinuationMatchesTransformers) {
  for (int b = 0; b < int(seqs_.size()); ++b) {
    GenerateOptions g;
    g.max_new_tokens = 16;
    EXPECT_EQ(generate(*model_, seqs_[size_t(b)], g), ref_->ints("greedy." + std::to_string(b)))
        << GetParam() << " seq " << b;
  }
}

TEST_P(Parity, BatchedEqualsSeparateAndCachedEqualsFull) { test::expect_batch_and_cache_invariant(*model_, seqs_); }

INSTANTIATE_TEST_SUITE_P(Fixtures, Parity, ::testing::ValuesIn(test::fixture_names()),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace moedit
