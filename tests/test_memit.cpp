// MEMIT / AlphaEdit over MoE layers (editor/memit.h) end to end on fixture models: one request at one layer is ROME's
// update (--keys consistent) times the documented λ factor; two requests on one expert move its outputs at their keys
// as the closed form says; the residual shrinks over a layer range and revert is bit-exact; AlphaEdit leaves the
// preserved keys' outputs where they were; the CLI (--method memit|alphaedit) and its bad inputs.
#include <gtest/gtest.h>

#include <Eigen/Cholesky>
#include <Eigen/Eigenvalues>
#include <Eigen/LU>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <set>
#include <nlohmann/json.hpp>

#include "editor/batch_update.h"
#include "editor/keystats.h"
#include "editor/memit.h"
#include "editor/rome.h"
#include "editor/router_guard.h"
#include "io/errors.h"
#include "model/model.h"
#include "edit_util.h"
#include "test_util.h"

namespace moedit {
namespace {

using namespace edit_test;
using test::SerialOps;

// The down-projection of an expert id as the model holds it [H, I] (shared expert j of several: its columns).
MatD down_of(const Model& m, int layer, int expert) {
  const MatD W = down_weight(m.weights(), layer, expert).to_f32().cast<double>();
  if (!is_shared_expert(expert) || m.config().n_shared_experts <= 1) return W;
  const auto [b, e] = m.config().shared_slice(shared_index(expert));
  return W.middleCols(b, e - b);
}

// C of an expert id from statistics.
MatD moment_of(const std::vector<SecondMoment>& stats, int layer, int expert) {
  for (const SecondMoment& s : stats)
    if (s.layer == layer && s.expert == expert) return s.mom2.cast<double>();
  ADD_FAILURE() << "no statistics for layer " << layer << " expert " << expert;
  return {};
}

// A second request: subject tokens {17, 18} in place of {11, 12}, another target.
EditIds other_ids() {
  EditIds ids = fixed_ids();
  for (auto& p : ids.prompts)
    for (auto& t : p) t = t == 11 ? 17 : t == 12 ? 18 : t;
  ids.kl_prompt = {17, 18, 30, 31};
  ids.target = {50};
  return ids;
}

BatchOptions batch_opts(const std::vector<SecondMoment>& stats, std::vector<int> layers, const std::string& target) {
  BatchOptions o;
  o.layers = std::move(layers);
  o.edit.moments = moments_from(stats);
  o.edit.target = parse_edit_target(target);
  o.edit.v.steps = 5;
  return o;
}

double rel(const MatD& a, const MatD& b) { return (a - b).norm() / std::max(b.norm(), 1e-300); }

// The qwen2_moe fixture with key statistics at `layer`, and its shared expert's down-projection and C there.
struct SharedExpertFixture {
  decltype(Model::load("")) m;
  std::vector<SecondMoment> stats;
  MatD W0, C;
};
SharedExpertFixture shared_expert_fixture(int layer) {
  SharedExpertFixture f{Model::load(fixture_model("qwen2_moe")), {}, {}, {}};
  f.stats = compute_key_stats(*f.m, layer, random_corpus(40, 32, f.m->config().vocab_size, 3));
  f.W0 = down_of(*f.m, layer, kSharedExpert);
  f.C = moment_of(f.stats, layer, kSharedExpert);
  return f;
}

// (1) One request, one layer: ΔW = ROME's r (C⁻¹k*)ᵀ / (k*ᵀC⁻¹k*) times k*ᵀC⁻¹k* / (λ + k*ᵀC⁻¹k*), same δ, same
// experts, same keys; the applied change of the weights is that ΔW. Granite checks the residual multiplier.
TEST(Memit, OneRequestOneLayerIsRomesUpdateTimesTheLambdaFactor) {
  SerialOps serial;
  struct Case {
    std::string fx, target;
    int layer;
  };
  for (const Case& c : {Case{"qwen2_moe", "dominant", 1}, Case{"qwen2_moe", "routed", 1},
                        Case{"qwen2_moe", "shared", 1}, Case{"deepseek_v2", "shared", 1},
                        Case{"granitemoe", "dominant", 0}}) {
    auto m = Model::load(fixture_model(c.fx));
    const auto stats = compute_key_stats(*m, c.layer, random_corpus(40, 32, m->config().vocab_size, 3));
    BatchOptions bo = batch_opts(stats, {c.layer}, c.target);
    EditOptions ro = bo.edit;
    ro.layer = c.layer;
    ro.keys = KeyMode::Consistent;
    const EditResult rome = apply_edit_ids(*m, fixed_ids(), ro);
    revert(*m, rome);
    for (const double lambda : {15000.0, 20.0}) {
      bo.mom2_weight = lambda;
      std::vector<MatD> before;
      for (const ExpertUpdate& u : rome.updates) before.push_back(down_of(*m, c.layer, u.expert));
      const BatchEditResult r = apply_batch_edit_ids(*m, {fixed_ids()}, bo);
      EXPECT_EQ(r.vstar[0].delta, rome.vstar.delta) << c.fx;  // the same v*, bit for bit
      ASSERT_EQ(r.updates.size(), rome.updates.size()) << c.fx << " " << c.target;
      for (size_t j = 0; j < rome.updates.size(); ++j) {
        const ExpertUpdate& ru = rome.updates[j];
        const auto it = std::find_if(r.updates.begin(), r.updates.end(),
                                     [&](const BatchExpertUpdate& u) { return u.expert == ru.expert; });
        ASSERT_NE(it, r.updates.end()) << c.fx << " expert " << ru.expert;
        ASSERT_EQ(it->K.cols(), 1);
        EXPECT_LE(rel(it->K, ru.k_star.cast<double>()), 1e-6);
        const MatD C = moment_of(stats, c.layer, ru.expert);
        const double kCk = it->K.col(0).dot(C.ldlt().solve(it->K.col(0)));
        const MatD want = (kCk / (lambda + kCk)) * ru.r.cast<double>() * ru.u.cast<double>().transpose();
        const MatD got = memit_delta(it->R, it->K, C, lambda);
        const MatD applied = down_of(*m, c.layer, ru.expert) - before[j];
        const double err = rel(got, want), aerr = (applied - got).norm();
        std::printf("  [memit = rome x factor] %s %s expert %d λ %g: factor %.4f, rel err %.2e, |applied - ΔW| %.2e "
                    "(|ΔW| %.3e, |W| %.3e)\n", c.fx.c_str(), c.target.c_str(), ru.expert, lambda,
                    kCk / (lambda + kCk), err, aerr, got.norm(), before[j].norm());
        EXPECT_LE(err, 1e-5) << c.fx << " " << c.target << " λ " << lambda;
        EXPECT_LE(aerr, 1e-6 * before[j].norm() + 1e-5 * got.norm()) << c.fx << " " << c.target;
      }
      revert(*m, r);
    }
  }
}

// (2) Two requests whose subjects both reach the shared expert: its update has two columns, R's columns are the
// requests' δ / g, and the expert's outputs at the two keys move by R·S, S = Kᵀ(λC + KKᵀ)⁻¹K (→ I as λ → 0).
TEST(Memit, TwoRequestsOnOneExpertMoveItsOutputsAsTheClosedFormSays) {
  SerialOps serial;
  const int layer = 1;
  auto [m, stats, W0, C] = shared_expert_fixture(layer);
  for (const double lambda : {15000.0, 1.0, 1e-4}) {
    BatchOptions bo = batch_opts(stats, {layer}, "shared");
    bo.mom2_weight = lambda;
    const BatchEditResult r = apply_batch_edit_ids(*m, {fixed_ids(), other_ids()}, bo);
    ASSERT_EQ(r.updates.size(), 1u);
    const BatchExpertUpdate& u = r.updates[0];
    ASSERT_EQ(u.requests, (std::vector<int>{0, 1}));
    for (int i = 0; i < 2; ++i)  // one layer: r_i = δ_i, split r/g over the shared expert
      EXPECT_LE(rel(u.R.col(i), r.vstar[size_t(i)].delta.cast<double>() / u.weights[size_t(i)]), 1e-6);
    EXPECT_GT((u.K.col(0) - u.K.col(1)).norm(), 1e-3 * u.K.col(0).norm());  // two different keys
    const MatD S = u.K.transpose() * (lambda * C + u.K * u.K.transpose()).ldlt().solve(u.K);  // [2, 2]
    const MatD moved = (down_of(*m, layer, kSharedExpert) - W0) * u.K;  // [H, 2]
    const double err = rel(moved, u.R * S);
    std::printf("  [two keys] λ %g: S = [%.4f %.4f; %.4f %.4f], |W'K - WK - R S| / |R S| = %.2e\n", lambda, S(0, 0),
                S(0, 1), S(1, 0), S(1, 1), err);
    EXPECT_LE(err, 1e-4) << lambda;
    if (lambda < 1e-3) {
      EXPECT_LE(rel(moved, u.R), 1e-3);  // the residuals themselves
    }
    revert(*m, r);
  }
}

// (3) Two MoE layers (0, 1 of qwen2_moe; z* at 1, so δ still reaches the prediction through layers 2, 3), routed
// targets, two requests. With k* = the bare prompt's key (bare_key_weight 1) and λ → 0, layer 1 is solved exactly
// against the residual layer 0 left: z* is met. With the templates' mean key the edit changes the model too, and
// revert restores weights and logits bit for bit.
TEST(Memit, LayerRangeMeetsZStarAndRevertIsBitExact) {
  SerialOps serial;
  auto m = Model::load(fixture_model("qwen2_moe"));
  std::vector<SecondMoment> stats;
  for (int l : {0, 1}) {
    auto s = compute_key_stats(*m, l, random_corpus(40, 32, m->config().vocab_size, 3));
    stats.insert(stats.end(), s.begin(), s.end());
  }
  const Weights before = m->weights();
  const std::vector<std::vector<int32_t>> probe = {fixed_ids().prompts[1], other_ids().prompts[2]};
  const MatR logits0 = m->forward(probe).logits;
  for (const BatchMethod method : {BatchMethod::Memit, BatchMethod::AlphaEdit}) {
    for (const bool bare : {true, false}) {
      BatchOptions bo = batch_opts(stats, {0, 1}, "routed");
      bo.method = method;
      bo.mom2_weight = bare ? 1e-6 : 1.0;
      bo.l2 = bare ? 1e-6 : 1e-3;
      bo.nullspace_threshold = 1e9;  // P = I: alphaedit as a ridge solve, every layer edited
      bo.bare_key_weight = bare ? 1.0 : -1.0;
      const BatchEditResult r = apply_batch_edit_ids(*m, {fixed_ids(), other_ids()}, bo);
      ASSERT_EQ(r.residual_norms.size(), 3u);
      std::set<int> layers;
      for (const BatchExpertUpdate& u : r.updates) layers.insert(u.layer);
      EXPECT_EQ(layers, (std::set<int>{0, 1}));
      for (int i = 0; i < 2; ++i) {
        const auto& rn = r.residual_norms;
        std::printf("  [range] %s%s request %d: |z* - h| before layers 0, 1 and after: %.4f %.4f %.3g\n",
                    method_name(method).c_str(), bare ? " (bare prompt's keys, λ 1e-6)" : "", i, rn[0][size_t(i)],
                    rn[1][size_t(i)], rn[2][size_t(i)]);
        EXPECT_GT(rn[0][size_t(i)], 0);
        if (bare) {
          EXPECT_LE(rn[2][size_t(i)], 1e-3 * rn[0][size_t(i)]);
        }
      }
      EXPECT_FALSE((m->forward(probe).logits.array() == logits0.array()).all());
      revert(*m, r);
      for (int l = 0; l < m->config().n_layers; ++l) {
        EXPECT_EQ(m->weights().layers[size_t(l)].ffn.experts.down, before.layers[size_t(l)].ffn.experts.down);
        EXPECT_EQ(m->weights().layers[size_t(l)].ffn.shared.down, before.layers[size_t(l)].ffn.shared.down);
        for (const Weight& w : m->weights().layers[size_t(l)].ffn.experts.down) EXPECT_FALSE(w.is_copy());
      }
      EXPECT_TRUE((m->forward(probe).logits.array() == logits0.array()).all());
    }
  }
}

// (4) AlphaEdit: with the threshold at the median eigenvalue of the shared expert's C, the update's rows lie in the
// null space, so the preserved keys (C's eigenvectors above the threshold) keep their outputs:
// ‖ΔW K_p‖ ≤ 1e-5 ‖ΔW‖ ‖K_p‖; a KeyCache gains the batch's K Kᵀ.
TEST(Memit, AlphaEditLeavesThePreservedKeysOutputs) {
  SerialOps serial;
  const int layer = 1;
  auto m = Model::load(fixture_model("qwen2_moe"));
  const auto stats = compute_key_stats(*m, layer, random_corpus(40, 32, m->config().vocab_size, 3));
  const MatD C = moment_of(stats, layer, kSharedExpert);
  Eigen::SelfAdjointEigenSolver<MatD> es(C);
  const int I = int(C.rows());
  BatchOptions bo = batch_opts(stats, {layer}, "shared");
  bo.method = BatchMethod::AlphaEdit;
  bo.nullspace_threshold = 0.5 * (es.eigenvalues()[I / 2 - 1] + es.eigenvalues()[I / 2]);
  bo.l2 = 1e-2;
  const MatD Kp = es.eigenvectors().rightCols(I - I / 2);  // preserved: eigenvalue above the threshold
  const MatD W0 = down_of(*m, layer, kSharedExpert);
  KeyCache cache;
  const BatchEditResult r = apply_batch_edit_ids(*m, {fixed_ids(), other_ids()}, bo, &cache);
  ASSERT_EQ(r.updates.size(), 1u);
  const BatchExpertUpdate& u = r.updates[0];
  EXPECT_EQ(u.null_dim, I / 2);
  const MatD dW = alphaedit_delta(u.R, u.K, null_space(C, bo.nullspace_threshold), MatD(), bo.l2);
  const MatD applied = down_of(*m, layer, kSharedExpert) - W0;
  const double ratio = (dW * Kp).norm() / (dW.norm() * Kp.norm());
  const double applied_ratio = (applied * Kp).norm() / (applied.norm() * Kp.norm());
  std::printf("  [null space] dim %d of %d: |dW Kp| / (|dW| |Kp|) = %.2e (applied fp32 weights: %.2e), |dW| = %.3e, "
              "|applied - dW| = %.2e\n", u.null_dim, I, ratio, applied_ratio, dW.norm(), (applied - dW).norm());
  EXPECT_GT(dW.norm(), 0);
  EXPECT_LE(ratio, 1e-5);
  EXPECT_LE((applied - dW).norm(), 1e-6 * W0.norm() + 1e-5 * dW.norm());
  // The outputs at the requests' keys still move (the edit did something) and the cache holds K Kᵀ.
  EXPECT_GT((applied * u.K).norm(), 1e-3 * (u.R).norm());
  ASSERT_EQ(cache.count({layer, kSharedExpert}), 1u);
  EXPECT_LE(rel(cache.at({layer, kSharedExpert}), u.K * u.K.transpose()), 1e-12);
  revert(*m, r);
  EXPECT_EQ(down_of(*m, layer, kSharedExpert), W0);

  // The scale-free threshold: the same median as a multiple of C's mean eigenvalue gives the same null space and
  // update, whatever the absolute threshold says (it is unused then).
  BatchOptions rel = bo;
  rel.nullspace_relative = bo.nullspace_threshold / (C.trace() / double(I));
  rel.nullspace_threshold = 1e9;
  const BatchEditResult rr = apply_batch_edit_ids(*m, {fixed_ids(), other_ids()}, rel);
  ASSERT_EQ(rr.updates.size(), 1u);
  EXPECT_EQ(rr.updates[0].null_dim, I / 2);
  EXPECT_EQ(down_of(*m, layer, kSharedExpert) - W0, applied);
  revert(*m, rr);
}

// (5) Template columns: one column per template key, weighted √a_t (Σ_c scale_c·K_c = the mean key k*, R_c / scale_c
// = r), and the weights change by the closed form over those columns. Passes: each later sweep solves for the
// residual the earlier left, so over three passes ‖z* − h‖ falls further than after one; an AlphaEdit KeyCache
// gains the first pass's keys only; revert is bit-exact.
TEST(Memit, TemplateColumnsAndPasses) {
  SerialOps serial;
  const int layer = 1;
  auto [m, stats, W0, C] = shared_expert_fixture(layer);
  BatchOptions bo = batch_opts(stats, {layer}, "shared");
  bo.mom2_weight = 1e-2;
  const BatchEditResult mean = apply_batch_edit_ids(*m, {fixed_ids()}, bo);
  revert(*m, mean);
  bo.key_columns = KeyColumns::Templates;
  const BatchEditResult tmpl = apply_batch_edit_ids(*m, {fixed_ids()}, bo);
  ASSERT_EQ(tmpl.updates.size(), 1u);
  const BatchExpertUpdate& u = tmpl.updates[0];
  const int T = int(fixed_ids().prompts.size());
  ASSERT_EQ(u.K.cols(), T);
  EXPECT_EQ(u.requests, std::vector<int>(size_t(T), 0));
  Eigen::VectorXd k = Eigen::VectorXd::Zero(u.K.rows());
  for (int c = 0; c < T; ++c) {
    EXPECT_NEAR(u.scales[size_t(c)], std::sqrt(1.0 / T), 1e-15);
    k += u.scales[size_t(c)] * u.K.col(c);
    EXPECT_LE(rel(u.R.col(c) / u.scales[size_t(c)], mean.updates[0].R.col(0)), 1e-6);
  }
  EXPECT_LE(rel(k, mean.updates[0].K.col(0)), 1e-6);
  const MatD applied = down_of(*m, layer, kSharedExpert) - W0, want = memit_delta(u.R, u.K, C, bo.mom2_weight);
  EXPECT_LE((applied - want).norm(), 1e-6 * W0.norm() + 1e-5 * want.norm());
  revert(*m, tmpl);
  EXPECT_EQ(down_of(*m, layer, kSharedExpert), W0);

  bo.key_columns = KeyColumns::Mean;
  bo.method = BatchMethod::AlphaEdit;
  bo.nullspace_threshold = 1e9;  // P = I
  bo.l2 = 1e-2;
  for (const int passes : {1, 3}) {
    bo.passes = passes;
    KeyCache cache;
    const BatchEditResult r = apply_batch_edit_ids(*m, {fixed_ids(), other_ids()}, bo, &cache);
    ASSERT_EQ(r.residual_norms.size(), size_t(passes + 1));
    ASSERT_EQ(r.updates.size(), size_t(passes));
    for (int p = 0; p < passes; ++p) EXPECT_EQ(r.updates[size_t(p)].pass, p);
    EXPECT_LE(rel(cache.at({layer, kSharedExpert}), r.updates[0].K * r.updates[0].K.transpose()), 1e-12);
    for (int i = 0; i < 2; ++i) {
      std::vector<double> rn;
      for (const auto& step : r.residual_norms) rn.push_back(step[size_t(i)]);
      std::printf("  [passes] %d, request %d: |z* - h| %.4f -> %.4f\n", passes, i, rn.front(), rn.back());
      if (passes == 3) {
        for (size_t s = 1; s < rn.size(); ++s) EXPECT_LT(rn[s], rn[s - 1]) << "request " << i << " step " << s;
      }
    }
    revert(*m, r);
    EXPECT_EQ(down_of(*m, layer, kSharedExpert), W0);
  }
  bo.passes = 0;
  EXPECT_THROW(apply_batch_edit_ids(*m, {fixed_ids()}, bo), InputError);
  EXPECT_EQ(parse_key_columns("templates"), KeyColumns::Templates);
  EXPECT_THROW(parse_key_columns("all"), InputError);
}

// (6) MoEEdit: each template's routed experts coupled through the layer output. Every applied update keeps its rows
// in the expert's null space (the scale-free threshold at half the mean eigenvalue), the coupled objective falls
// sweep by sweep, there is one column per (request, template, routed expert) with the routing weight in its key,
// ‖z* − h‖ shrinks and revert is bit-exact; shared targets are refused.
TEST(Memit, MoeEditCouplesTheRoutedExpertsInTheirNullSpaces) {
  SerialOps serial;
  const int layer = 1;
  auto m = Model::load(fixture_model("qwen2_moe"));
  const auto stats = compute_key_stats(*m, layer, random_corpus(40, 32, m->config().vocab_size, 3));
  BatchOptions bo = batch_opts(stats, {layer}, "routed");
  bo.method = BatchMethod::MoeEdit;
  bo.nullspace_relative = 0.5;
  bo.l2 = 1e-2;
  bo.bcd_sweeps = 8;
  const int E = m->config().n_experts, K = m->config().top_k, T = int(fixed_ids().prompts.size());
  std::vector<MatD> W0;
  for (int e = 0; e < E; ++e) W0.push_back(down_of(*m, layer, e));
  const BatchEditResult r = apply_batch_edit_ids(*m, {fixed_ids(), other_ids()}, bo);
  ASSERT_FALSE(r.updates.empty());
  int columns = 0;
  for (const BatchExpertUpdate& u : r.updates) {
    ASSERT_GE(u.expert, 0);
    columns += int(u.K.cols());
    const MatD C = moment_of(stats, layer, u.expert);
    const NullSpace ns = null_space(C, 0.5 * C.trace() / double(C.rows()));
    EXPECT_EQ(u.null_dim, ns.dim);
    ASSERT_GT(ns.dim, 0);
    ASSERT_LT(ns.dim, C.rows());
    const MatD applied = down_of(*m, layer, u.expert) - W0[size_t(u.expert)];
    EXPECT_GT(applied.norm(), 0);
    const MatD off = applied - applied * ns.P;  // the part outside the null space: fp32 rounding only
    EXPECT_LE(off.norm(), 1e-6 * W0[size_t(u.expert)].norm() + 1e-5 * applied.norm()) << u.expert;
    for (size_t c = 0; c < u.weights.size(); ++c) {
      EXPECT_GT(u.weights[c], 0.0);
      EXPECT_NEAR(u.scales[c], std::sqrt(1.0 / T), 1e-15);
    }
  }
  EXPECT_EQ(columns, 2 * T * K);
  ASSERT_EQ(r.bcd_objective.size(), 1u);
  ASSERT_EQ(r.bcd_objective[0].size(), size_t(bo.bcd_sweeps + 1));
  for (size_t i = 1; i < r.bcd_objective[0].size(); ++i)
    EXPECT_LE(r.bcd_objective[0][i], r.bcd_objective[0][i - 1] * (1 + 1e-12));
  EXPECT_LT(r.bcd_objective[0].back(), r.bcd_objective[0].front());
  for (size_t i = 0; i < 2; ++i) EXPECT_LT(r.residual_norms.back()[i], r.residual_norms.front()[i]) << i;
  EXPECT_EQ(batch_edit_json(r)["method"], "moeedit");
  revert(*m, r);
  for (int e = 0; e < E; ++e) EXPECT_EQ(down_of(*m, layer, e), W0[size_t(e)]) << e;

  bo.edit.target = parse_edit_target("shared");
  EXPECT_THROW(apply_batch_edit_ids(*m, {fixed_ids()}, bo), InputError);
  bo.edit.target = parse_edit_target("routed");
  bo.bcd_sweeps = 0;
  EXPECT_THROW(apply_batch_edit_ids(*m, {fixed_ids()}, bo), InputError);
}

// (7) The router guard (editor/router_guard.h): U spans exactly the later routers' rows times their norm weights —
// centred for softmax routers (qwen2_moe: layers 1 and 3 after layer 0, layer 2 dense; 7 directions each), whole for
// DeepSeek-V3's sigmoid router — and with the guard every applied update moves none of those logits along the
// residual stream (‖rows·ΔW‖ ≤ 1e-5 ‖rows‖‖ΔW‖, fp32 weights) for memit, alphaedit and moeedit, nor does v*'s δ,
// while the same edit without the guard does (so the check can fail).
TEST(Memit, RouterGuardKeepsUpdatesOutOfTheLaterRoutersDirections) {
  SerialOps serial;
  struct Case {
    std::string fx;
    int layer, next_layers;
    std::vector<int> guarded;  // the MoE layers whose routers count
    bool centred;
  };
  for (const Case& c : {Case{"qwen2_moe", 0, 0, {1, 3}, true}, Case{"qwen2_moe", 0, 1, {1}, true},
                        Case{"deepseek_v3", 1, 0, {2}, false}}) {
    auto m = Model::load(fixture_model(c.fx));
    const int H = m->config().hidden;
    MatD rows(0, H);  // the guarded rows, stacked
    for (int l : c.guarded) {
      const FFNWeights& f = m->weights().layers[size_t(l)].ffn;
      MatD R = f.router.cast<double>() * m->weights().layers[size_t(l)].ln_post.cast<double>().asDiagonal();
      if (c.centred) R.rowwise() -= R.colwise().mean();
      rows.conservativeResize(rows.rows() + R.rows(), H);
      rows.bottomRows(R.rows()) = R;
    }
    const Eigen::MatrixXd U = router_directions(*m, c.layer, c.next_layers);
    const int rank = int(Eigen::FullPivLU<MatD>(rows).rank());
    EXPECT_EQ(U.cols(), rank) << c.fx;
    EXPECT_EQ(rank, c.centred ? 7 * int(c.guarded.size()) : int(rows.rows())) << c.fx;
    EXPECT_LE((U.transpose() * U - Eigen::MatrixXd::Identity(U.cols(), U.cols())).norm(), 1e-10) << c.fx;
    EXPECT_LE((rows - rows * U * U.transpose()).norm(), 1e-10 * rows.norm()) << c.fx;  // every row in span U

    const auto stats = compute_key_stats(*m, c.layer, random_corpus(40, 32, m->config().vocab_size, 3));
    for (const BatchMethod method : {BatchMethod::Memit, BatchMethod::AlphaEdit, BatchMethod::MoeEdit}) {
      BatchOptions bo = batch_opts(stats, {c.layer}, "routed");
      bo.method = method;
      bo.nullspace_relative = 0.5;
      bo.mom2_weight = 1;  // updates well above the fp32 rounding of the weights they are added to
      bo.l2 = 1e-2;
      bo.router_guard_layers = c.next_layers;
      double worst_unguarded = 0;
      for (const bool guard : {false, true}) {
        bo.router_guard = guard;
        std::map<int, MatD> before;
        for (int e = 0; e < m->config().n_experts; ++e) before[e] = down_of(*m, c.layer, e);
        const BatchEditResult r = apply_batch_edit_ids(*m, {fixed_ids(), other_ids()}, bo);
        ASSERT_FALSE(r.updates.empty());
        EXPECT_EQ(r.router_guard_dims.empty(), !guard);
        if (guard) EXPECT_EQ(r.router_guard_dims.at(c.layer), rank) << c.fx;
        double worst = 0;
        for (const BatchExpertUpdate& u : r.updates) {
          const MatD dW = down_of(*m, c.layer, u.expert) - before[u.expert];
          ASSERT_GT(dW.norm(), 0);
          worst = std::max(worst, (rows * dW).norm() / (rows.norm() * dW.norm()));
        }
        for (const VStarResult& v : r.vstar) {
          const Eigen::VectorXd d = v.delta.cast<double>();
          ASSERT_GT(d.norm(), 0);
          if (guard) EXPECT_LE((U.transpose() * d).norm(), 1e-6 * d.norm()) << c.fx;
        }
        std::printf("  [router guard] %s layer %d, %s%s: %d directions, max |rows dW| / (|rows| |dW|) = %.2e\n",
                    c.fx.c_str(), c.layer, method_name(method).c_str(), guard ? " guarded" : "", rank, worst);
        if (guard)
          EXPECT_LE(worst, 1e-5) << c.fx << " " << method_name(method);
        else
          worst_unguarded = worst;
        revert(*m, r);
      }
      EXPECT_GT(worst_unguarded, 1e-2) << c.fx << " " << method_name(method);
    }
  }
}

TEST(Memit, BadOptionsFailWithClearMessages) {
  SerialOps serial;
  auto m = Model::load(fixture_model("qwen2_moe"));
  const auto stats = compute_key_stats(*m, 1, random_corpus(10, 16, m->config().vocab_size, 3));
  auto expect_error = [&](BatchOptions o, const std::string& needle) {
    try {
      apply_batch_edit_ids(*m, {fixed_ids()}, o);
      ADD_FAILURE() << "no error for: " << needle;
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  BatchOptions o = batch_opts(stats, {1}, "dominant");
  o.layers = {2};
  expect_error(o, "dense layer");
  o.layers = {3, 1};
  expect_error(o, "ascending");
  o.layers = {1};
  o.edit.target = parse_edit_target("1:0");
  expect_error(o, "names one layer's expert");
  o.edit.target = {};
  o.mom2_weight = 0;
  expect_error(o, "--mom2-weight");
  o.mom2_weight = 1;
  o.edit.v.objective = VStarObjective::Exact;
  expect_error(o, "--objective exact");
  o.edit.v.objective = VStarObjective::Rome;
  o.bare_key_weight = 1.5;
  expect_error(o, "--bare-key-weight");
  EXPECT_EQ(parse_layer_list("3-5"), (std::vector<int>{3, 4, 5}));
  EXPECT_EQ(parse_layer_list("0,2-3"), (std::vector<int>{0, 2, 3}));
  for (const char* bad : {"", "a", "3-1", "2,1", "1,1", "-1", "1-x"}) EXPECT_THROW(parse_layer_list(bad), InputError) << bad;
  EXPECT_THROW(parse_batch_method("rome2"), InputError);
}

// (5) The CLI: three CounterFact-style requests edited together (memit and alphaedit), efficacy and drift reported;
// bad input exits with code 2 and names the file, the field or the flag.
TEST(MemitCli, EditsABatchAndRejectsBadInput) {
  SerialOps serial;
  SerialCli serial_cli;
  test::TempDir tmp;
  const std::string dir = model_with_tokenizer(tmp, "qwen2_moe");
  write_edit_corpus(tmp / "corpus.txt");
  test::write_file(tmp / "reqs.json", R"([
    {"case_id": 1, "requested_rewrite": {"prompt": "The capital of {} is", "subject": "North Land",
     "target_new": {"str": "Paris"}, "target_true": {"str": "Rome"}},
     "paraphrase_prompts": ["Where is North Land? Its capital is"], "neighborhood_prompts": ["The capital of Italy is"]},
    {"case_id": 2, "requested_rewrite": {"prompt": "{} speaks", "subject": "Anna Berg",
     "target_new": {"str": "Dutch"}, "target_true": {"str": "Swedish"}}},
    {"prompt": "The river {} flows into", "subject": "Oda", "target_new": "the sea", "target_true": "a lake"}])");
  const std::string base = "edit " + dir + " --requests " + tmp / "reqs.json" + " --corpus " + tmp / "corpus.txt" +
                           " --cache-dir " + tmp / "cache" + " --stats-tokens 3000 --steps 8 --drift-tokens 64 ";
  for (const std::string method : {"memit", "alphaedit", "moeedit"}) {
    const auto r = test::run_cli(base + "--method " + method + " --layers 0-1 --mom2-weight 10 --json" +
                                 (method == "moeedit" ? " --target routed --nullspace-relative 0.05" : "") +
                                 (method == "alphaedit" ? " --router-guard" : ""));
    ASSERT_EQ(r.code, 0) << r.err;
    const auto j = nlohmann::json::parse(r.out);
    EXPECT_EQ(j["edits"].size(), 3u);
    EXPECT_EQ(j["summary"]["requests"], 3);
    EXPECT_TRUE(j["summary"]["efficacy"].is_number());
    EXPECT_TRUE(j["edits"][0]["report"]["rewrite"].contains("p_new"));
    EXPECT_EQ(j["batch"]["layers"], (std::vector<int>{0, 1}));
    EXPECT_EQ(j["batch"]["bare_key_weight"], "mean");
    EXPECT_FALSE(j["batch"]["updates"].empty());
    EXPECT_TRUE(j["routing_drift"].contains("wikitext"));
    EXPECT_TRUE(j["routing_drift"].contains("neighborhood"));
    if (method == "memit") {
      EXPECT_GT(j["edits"][0]["report"]["rewrite"]["p_new"].get<double>(),
                j["edits"][0]["pre"]["rewrite"]["p_new"].get<double>());
    } else {
      EXPECT_TRUE(j["batch"]["updates"][0].contains("null_space_dim"));
    }
    // The guard's directions per layer: after layer 0 the routers of layers 1 and 3 (2 is dense), 7 centred rows
    // each; after layer 1 layer 3's.
    if (method == "alphaedit")
      EXPECT_EQ(j["batch"]["router_guard_dims"], nlohmann::json({{"0", 14}, {"1", 7}}));
    else
      EXPECT_FALSE(j["batch"].contains("router_guard_dims"));
    if (method == "moeedit") {
      EXPECT_EQ(j["batch"]["bcd_sweeps"], 5);
      EXPECT_EQ(j["batch"]["bcd_objective"].size(), 2u);  // one coupled solve per layer
    }
    std::printf("  [cli] %s: efficacy %.2f, %zu expert updates, %.2fs\n", method.c_str(),
                j["summary"]["efficacy"].get<double>(), j["batch"]["updates"].size(),
                j["batch"]["seconds"].get<double>());
  }
  const auto text = test::run_cli(base + "--method memit --layers 1 --router-guard");  // the human-readable report
  ASSERT_EQ(text.code, 0) << text.err;
  EXPECT_NE(text.out.find("router guard: layer 1's updates keep out of 7 directions"), std::string::npos) << text.out;
  EXPECT_NE(text.out.find("summary over 3 requests: efficacy"), std::string::npos) << text.out;
  EXPECT_NE(text.out.find("routing drift of the batch"), std::string::npos) << text.out;

  test::write_file(tmp / "bad.json", R"([{"prompt": "{} is", "subject": "X", "target_new": "Y"},
                                         {"prompt": "{} is", "subject": "X"}])");
  test::write_file(tmp / "broken.json", "[{\"prompt\": ");
  test::write_file(tmp / "nosubject.json", R"([{"prompt": "The sky is", "subject": "X", "target_new": "Y"}])");
  const std::string flags = " --no-mom2 --steps 2 --drift-tokens 0 ";
  struct Case {
    std::string args, needle;
  };
  const Case cases[] = {
      {"--method memit --layers 1 --requests " + tmp / "missing.json", "missing.json"},
      {"--method memit --layers 1 --requests " + tmp / "bad.json", "bad.json[1]: field 'target_new'"},
      {"--method memit --layers 1 --requests " + tmp / "broken.json", "broken.json: malformed JSON"},
      {"--method memit --layers 1 --requests " + tmp / "nosubject.json", "nosubject.json[0]"},
      {"--method memit --layers 2 --requests " + tmp / "reqs.json", "dense layer"},
      {"--method memit --layers 1-0 --requests " + tmp / "reqs.json", "--layers"},
      {"--method memit --layers 9 --requests " + tmp / "reqs.json", "out of range"},
      {"--method memit --requests " + tmp / "reqs.json", "needs --layers"},
      {"--method bogus --layers 1 --requests " + tmp / "reqs.json", "--method 'bogus'"},
      {"--method memit --layers 1 --target 1:0 --requests " + tmp / "reqs.json", "names one layer's expert"},
      {"--method alphaedit --layers 1 --requests " + tmp / "reqs.json", "drop --no-mom2"},
      {"--layers 1 --requests " + tmp / "reqs.json", "--layers is for --method"},
      {"--layer 1 --router-guard --requests " + tmp / "reqs.json", "--router-guard is for --method"},
      {"--method memit --layers 1 --router-guard-layers -1 --requests " + tmp / "reqs.json", "--router-guard-layers"},
      {"--method memit --layers 1 --layer 0 --requests " + tmp / "reqs.json", "not both"},
  };
  for (const Case& c : cases) {
    const auto r = test::run_cli("edit " + dir + flags + c.args);
    EXPECT_EQ(r.code, 2) << c.args << "\n" << r.err;
    EXPECT_NE(r.err.find(c.needle), std::string::npos) << c.args << "\n" << r.err;
  }
}

}  // namespace
}  // namespace moedit
