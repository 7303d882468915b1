// Weight gradients (model/weight_grads.h) of the answer-token loss (train/train.h): every trainable kind — routers,
// the shared-expert gate, routed experts' gate/up/down, shared MLPs, dense MLPs — against float64 central finite
// differences on the fixture checkpoints of several families, for a batch of mixed-length examples; frozen
// parameters allocate nothing; the input-gradient path is unchanged by asking for weight gradients.
#include <gtest/gtest.h>

#include <cstdio>
#include <cmath>
#include <cstring>
#include <map>
#include <random>

#include "model/weight_grads.h"
#include "io/errors.h"
#include "test_util.h"
#include "tracing/interventions.h"
#include "train/train.h"

namespace moedit {
namespace {

using test::SerialOps;
using MatD = MatT<double>;
using Kind = ParamId::Kind;

constexpr double kTol = 1e-4;

// Three examples of different lengths (prompt ‖ answer), ids below every fixture's vocabulary.
TrainBatch mixed_batch() {
  return {{{5, 17, 3, 58, 42}, {7, 1}}, {{9, 2, 33}, {34}}, {{11, 12, 13, 14, 15, 16, 20}, {40, 41, 44}}};
}

// Fixtures: Qwen2-MoE (shared expert with sigmoid gate, a dense layer), OLMoE, Mixtral (GQA, bf16), GraniteMoE
// (top-k then softmax, multipliers), DeepSeek-V3 (MLA, sigmoid router with selection bias and groups, shared
// expert, dense first layer), DeepSeek-V2 (two ungated shared experts, greedy softmax router).
const char* const kFixtures[] = {"qwen2_moe", "olmoe", "mixtral_gqa", "granitemoe", "deepseek_v3", "deepseek_v2"};

// The kind of a parameter for reporting: router, shared gate, routed/shared/dense gate, up, down.
std::string kind_name(const Model& m, const ParamId& p) {
  if (p.kind == Kind::Router) return "router";
  if (p.kind == Kind::SharedGate) return "shared_gate";
  const char* part = p.kind == Kind::Gate ? "gate" : p.kind == Kind::Up ? "up" : "down";
  const char* owner = p.expert == kSharedBlock ? "shared" : m.config().is_moe(p.layer) ? "routed" : "dense";
  return std::string(owner) + "." + part;
}

// Every selected parameter of the model against central differences at a few coordinates each (the largest
// gradient entry and three random ones), the weight perturbed in its fp32 storage; the relative error
// ‖g_fd − g‖ / ‖g‖ per kind over the coordinates checked.
void check_against_finite_differences(Model& m, const TrainBatch& batch, const std::string& fixture,
                                      const ParamSelection& sel) {
  WeightGrads<double> g(m, sel);
  answer_loss(m, batch, &g);
  std::map<std::string, std::pair<std::vector<double>, std::vector<double>>> by_kind;  // kind → (fd, analytic)
  std::mt19937_64 rng(7);
  const double h = 1e-4;
  for (size_t i = 0; i < g.params().size(); ++i) {
    const ParamId& p = g.params()[i];
    const MatD& gi = g.grad(i);
    std::vector<Eigen::Index> coords;
    Eigen::Index top;
    Eigen::Map<const Eigen::VectorXd>(gi.data(), gi.size()).cwiseAbs().maxCoeff(&top);
    coords.push_back(top);
    for (int j = 0; j < 3; ++j) coords.push_back(Eigen::Index(rng() % uint64_t(gi.size())));
    float* w = mutable_param(m, p);  // an fp32 copy of the same values: the loss does not change
    auto& [fd, an] = by_kind[kind_name(m, p)];
    for (Eigen::Index c : coords) {
      const float keep = w[c];
      const float wp = keep + float(h), wm = keep - float(h);
      w[c] = wp;
      const double fp = answer_loss<double>(m, batch);
      w[c] = wm;
      const double fm = answer_loss<double>(m, batch);
      w[c] = keep;
      fd.push_back((fp - fm) / (double(wp) - double(wm)));
      an.push_back(gi.data()[c]);
    }
  }
  for (const auto& [kind, v] : by_kind) {
    const Eigen::Map<const Eigen::VectorXd> fd(v.first.data(), Eigen::Index(v.first.size()));
    const Eigen::Map<const Eigen::VectorXd> an(v.second.data(), Eigen::Index(v.second.size()));
    EXPECT_GT(an.norm(), 1e-6) << fixture << " " << kind << ": gradient (nearly) zero, the check would be vacuous";
    const double err = (fd - an).norm() / std::max(an.norm(), 1e-300);
    std::printf("  [fd] %s %s: relative error %.2e over %zu coordinates\n", fixture.c_str(), kind.c_str(), err,
                v.first.size());
    EXPECT_LE(err, kTol) << fixture << " " << kind;
  }
}

TEST(WeightGrads, EveryKindMatchesFiniteDifferencesOnFixtures) {
  SerialOps serial;
  for (const char* fx : kFixtures) {
    const auto m = Model::load(test::fixture(std::string("models/") + fx));
    check_against_finite_differences(*m, mixed_batch(), fx, ParamSelection::everything(*m));
  }
}

// Router gradients under a standing router edit (steering form 4 and a boost on every MoE layer): through the edit's
// Jacobian to the raw logits, then to the router weights.
TEST(WeightGrads, RouterGradientThroughARouterEdit) {
  SerialOps serial;
  const auto m = Model::load(test::fixture("models/qwen2_moe"));
  const ModelConfig& c = m->config();
  InterventionSpec s;
  s.steer.form = 4;
  s.steer.c = 0.8f;
  for (int l = 0; l < c.n_layers; ++l) {
    if (!c.is_moe(l)) continue;
    s.steer.layers.push_back(l);
    s.steer.vector.push_back(VecF::Map(test::randn(size_t(c.n_experts), 60 + uint64_t(l)).data(), c.n_experts)
                                 .cwiseAbs());
    s.boost.push_back({l, 2, 1.3f});
  }
  m->set_router_edit(router_edit(s, c));
  check_against_finite_differences(*m, mixed_batch(), "qwen2_moe+edit", ParamSelection::all_routers(*m));
}

// The loss equals the answer tokens' mean −log p from Model::forward, example by example.
TEST(AnswerLoss, MatchesModelForward) {
  for (const char* fx : {"qwen2_moe", "granitemoe"}) {
    const auto m = Model::load(test::fixture(std::string("models/") + fx));
    const TrainBatch batch = mixed_batch();
    double want = 0;
    int count = 0;
    for (const TrainExample& ex : batch) {
      std::vector<int32_t> seq = ex.prompt;
      seq.insert(seq.end(), ex.answer.begin(), ex.answer.end());
      const MatR lg = m->forward({seq}).logits;
      for (size_t j = 0; j < ex.answer.size(); ++j) {
        const Eigen::VectorXd row = lg.row(Eigen::Index(ex.prompt.size() + j - 1)).cast<double>();
        const double lse = row.maxCoeff() + std::log((row.array() - row.maxCoeff()).exp().sum());
        want += lse - row[ex.answer[j]];
        ++count;
      }
    }
    want /= count;
    const double got = answer_loss<float>(*m, batch);
    EXPECT_NEAR(got, want, 1e-5 * std::abs(want)) << fx;
    EXPECT_NEAR(answer_loss<double>(*m, batch), want, 1e-5 * std::abs(want)) << fx;
  }
}

// Only selected parameters get storage, and a parameter's gradient does not depend on what else is selected (the
// backward with fewer parameters, stopping at a higher layer, gives the same numbers bit for bit).
TEST(WeightGrads, FrozenParametersAllocateNothing) {
  const auto m = Model::load(test::fixture("models/qwen2_moe"));
  const ModelConfig& c = m->config();
  const int E = c.n_experts, H = c.hidden, I = c.expert_width;
  EXPECT_EQ(WeightGrads<float>(*m, ParamSelection{}).bytes(), 0u);
  EXPECT_TRUE(WeightGrads<float>(*m, ParamSelection{}).params().empty());

  ParamSelection one_router;
  one_router.routers = {3};
  WeightGrads<float> gr(*m, one_router);
  EXPECT_EQ(gr.bytes(), size_t(E) * H * sizeof(float));
  EXPECT_EQ(gr.lowest_layer(), 3);

  ParamSelection two_experts;
  two_experts.experts = {{1, 5}, {1, 2}, {1, 5}};  // a duplicate counts once
  WeightGrads<float> ge(*m, two_experts);
  EXPECT_EQ(ge.bytes(), 2 * 3 * size_t(I) * H * sizeof(float));
  ASSERT_EQ(ge.params().size(), 6u);
  EXPECT_EQ(ge.params()[0].name(), "layers.1.experts.2.gate");
  EXPECT_EQ(ge.params()[5].name(), "layers.1.experts.5.down");

  size_t all_bytes = 0;
  for (const auto& L : m->weights().layers) {
    const FFNWeights& f = L.ffn;
    all_bytes += size_t(f.router.size() + f.shared_gate.size());
    for (const ExpertBank* b : {&f.experts, &f.shared})
      for (const auto* v : {&b->gate, &b->up, &b->down})
        for (const Weight& w : *v) all_bytes += size_t(w.size());
  }
  WeightGrads<float> ga(*m, ParamSelection::everything(*m));
  EXPECT_EQ(ga.bytes(), all_bytes * sizeof(float));

  answer_loss(*m, mixed_batch(), &gr);
  answer_loss(*m, mixed_batch(), &ge);
  answer_loss(*m, mixed_batch(), &ga);
  for (const WeightGrads<float>* part : {&gr, &ge})
    for (size_t i = 0; i < part->params().size(); ++i) {
      const MatT<float>& a = part->grad(i);
      const MatT<float>& b = ga.grad(part->params()[i]);
      ASSERT_EQ(a.size(), b.size());
      EXPECT_GT(a.norm(), 0.f) << part->params()[i].name();
      EXPECT_EQ(std::memcmp(a.data(), b.data(), sizeof(float) * size_t(a.size())), 0) << part->params()[i].name();
    }
}

// Selections the model does not have are input errors naming the entry.
TEST(WeightGrads, BadSelectionsAreInputErrors) {
  const auto m = Model::load(test::fixture("models/qwen2_moe"));  // layer 2 dense; shared expert with gate
  auto fails = [&](ParamSelection s) {
    EXPECT_THROW(WeightGrads<float>(*m, s), InputError);
  };
  fails({{2}, {}, {}});              // dense layer: no router
  fails({{4}, {}, {}});              // layer out of range
  fails({{}, {2}, {}});              // no shared gate on the dense layer
  fails({{}, {}, {{0, 8}}});         // 8 routed experts
  fails({{}, {}, {{2, 1}}});         // the dense MLP is expert 0
  fails({{}, {}, {{2, kSharedBlock}}});
  EXPECT_NO_THROW(WeightGrads<float>(*m, ParamSelection{{}, {}, {{2, 0}, {0, kSharedBlock}}}));
}

// Asking for weight gradients leaves the input gradient bit for bit as it was.
TEST(WeightGrads, InputGradientUnchangedByWeightGradients) {
  const auto m = Model::load(test::fixture("models/deepseek_v3"));
  const std::vector<std::vector<int32_t>> seqs = {{5, 17, 3, 58, 42, 7}, {9, 2, 33}};
  const TokenLayout lay = make_layout(seqs, nullptr);
  std::vector<int32_t> flat;
  for (const auto& s : seqs) flat.insert(flat.end(), s.begin(), s.end());
  grad::TapedStack<float> st(*m, 0);
  st.forward(m->embed(flat, lay, nullptr), lay);
  const std::vector<int> rows = {1, 4, 7};
  const MatR lg = st.logits(rows);
  const MatR dl = MatR::Map(test::randn(size_t(lg.size()), 3).data(), lg.rows(), lg.cols());
  const MatR dx0 = st.backward(dl);
  WeightGrads<float> g(*m, ParamSelection::everything(*m));
  const MatR dx1 = st.backward(dl, &g);
  ASSERT_EQ(dx0.size(), dx1.size());
  EXPECT_EQ(std::memcmp(dx0.data(), dx1.data(), sizeof(float) * size_t(dx0.size())), 0);
  EXPECT_GT(g.grad(0).norm(), 0.f);
}

TEST(AnswerLoss, BadBatchesAreInputErrors) {
  const auto m = Model::load(test::fixture("models/olmoe"));  // vocabulary 100
  EXPECT_THROW(answer_loss<float>(*m, {}), InputError);
  EXPECT_THROW(answer_loss<float>(*m, {{{}, {3}}}), InputError);
  EXPECT_THROW(answer_loss<float>(*m, {{{3}, {}}}), InputError);
  EXPECT_THROW(answer_loss<float>(*m, {{{3}, {100}}}), InputError);  // an answer id (a label only) out of range
}

}  // namespace
}  // namespace moedit
