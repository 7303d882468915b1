// ROME editing of MoE experts (editor/): ∂loss/∂δ against finite differences (float64), exactness of the rank-one
// update (W′k = Wk + r, MoE output moves by δ), bit-exact revert, shared-expert
// targets, sequential edits and bad requests.
#include <gtest/gtest.h>

#include <cstdio>
#include <random>

#include "editor/keystats.h"
#include "editor/rome.h"
#include "model/backward.h"
#include "io/errors.h"
#include "model/model.h"
#include "edit_util.h"
#include "test_util.h"

namespace moedit {
namespace {

using test::SerialOps;
using namespace edit_test;


// ---- ∂loss/∂δ -----------------------------------------------------------------------------------------------------

TEST(VStar, LossGradientMatchesFiniteDifferences) {
  SerialOps serial;
  for (const std::string fx : {"qwen2_moe", "granitemoe", "qwen3_moe", "olmoe_clip", "deepseek_v2", "deepseek_v3"}) {
    auto m = Model::load(fixture_model(fx));
    const int layer = fx == "qwen3_moe" || fx.rfind("deepseek", 0) == 0 ? 1 : 0;  // their layer 0 is dense
    VStarOptions opt;
    VStarProblem<double> P(*m, layer, fixed_ids(), opt);
    const int H = P.hidden();
    std::mt19937_64 g(5);
    std::normal_distribution<double> n(0, 1);
    Eigen::VectorXd delta(H);
    for (int i = 0; i < H; ++i) delta[i] = n(g);
    delta *= 0.5 * double(P.target_init().norm()) / delta.norm();
    P.eval(delta);
    const Eigen::VectorXd grad = P.grad();
    const Eigen::VectorXd fd = fd_gradient(P, delta);
    const double err = rel(grad, fd);
    std::printf("  [fd] dloss/ddelta %s layer %d: relative error %.2e (|g| = %.3e, H = %d)\n", fx.c_str(), layer, err,
                fd.norm(), H);
    EXPECT_LE(err, 1e-4) << fx;
    EXPECT_GT(fd.norm(), 1e-6);

    // The KL and NLL parts separately are non-trivial, and the prefix cache changes nothing.
    const auto v = P.eval(delta);
    EXPECT_GT(v.kl, 0);
    EXPECT_GT(v.nll, 0);
    VStarOptions nocache = opt;
    nocache.cache_prefix = false;
    VStarProblem<double> Q(*m, layer, fixed_ids(), nocache);
    const auto w = Q.eval(delta);
    EXPECT_NEAR(w.loss, v.loss, 1e-9 * std::abs(v.loss));
    P.eval(delta);
    EXPECT_LE(rel(Q.grad(), P.grad()), 1e-9);
    EXPECT_LT(P.tokens_per_step(), Q.tokens_per_step());
  }
}

// The exact objective: δ reaches every row with a factor s_t (here a fixed pattern with zeros, non-zero rows before
// some subject tokens and a zero at one subject token), gradient against finite differences, prefix cache exact.
TEST(VStar, ExactObjectiveGradientMatchesFiniteDifferences) {
  SerialOps serial;
  auto m = Model::load(fixture_model("qwen2_moe"));
  const int layer = 0;
  int calls = 0;
  const DeltaSpread spread = [&](const MatR& x, const LayerRouting& routing) {
    ++calls;
    EXPECT_EQ(x.cols(), m->config().hidden);
    EXPECT_EQ(routing.ids.rows(), x.rows());
    VecF f(x.rows());
    for (int i = 0; i < int(x.rows()); ++i) f[i] = i % 3 == 2 ? 0.f : 0.3f + 0.1f * float(i % 7);
    return f;
  };
  VStarOptions opt;
  opt.objective = VStarObjective::Exact;
  VStarProblem<double> P(*m, layer, fixed_ids(), opt, spread);
  EXPECT_EQ(calls, 1);
  const int H = P.hidden();
  Eigen::VectorXd delta = Eigen::VectorXd::LinSpaced(H, -1, 1);
  delta *= 0.5 * double(P.target_init().norm()) / delta.norm();
  P.eval(delta);
  const Eigen::VectorXd grad = P.grad();
  const Eigen::VectorXd fd = fd_gradient(P, delta);
  const double err = rel(grad, fd);
  std::printf("  [fd] exact objective dloss/ddelta: relative error %.2e (|g| = %.3e)\n", err, fd.norm());
  EXPECT_LE(err, 1e-4);
  EXPECT_GT(fd.norm(), 1e-6);

  VStarOptions nocache = opt;
  nocache.cache_prefix = false;
  VStarProblem<double> Q(*m, layer, fixed_ids(), nocache, spread);
  const auto v = P.eval(delta), w = Q.eval(delta);
  EXPECT_NEAR(w.loss, v.loss, 1e-9 * std::abs(v.loss));
  EXPECT_LE(rel(Q.grad(), P.grad()), 1e-9);
  // δ reaches rows before the subject tokens, so more rows run than with ROME's objective.
  VStarProblem<double> R(*m, layer, fixed_ids(), VStarOptions{});
  EXPECT_GT(P.tokens_per_step(), R.tokens_per_step());
  EXPECT_LT(P.tokens_per_step(), Q.tokens_per_step());
  EXPECT_THROW(VStarProblem<double>(*m, layer, fixed_ids(), opt), InputError);  // exact needs the spread
}

TEST(VStar, FloatMatchesDoubleAndOptimises) {
  SerialOps serial;
  auto m = Model::load(fixture_model("qwen2_moe"));
  VStarOptions opt;
  VStarProblem<double> Pd(*m, 1, fixed_ids(), opt);
  VStarProblem<float> Pf(*m, 1, fixed_ids(), opt);
  Eigen::VectorXd d = Eigen::VectorXd::LinSpaced(Pd.hidden(), -1, 1) * 0.1;
  const auto vd = Pd.eval(d);
  const auto vf = Pf.eval(d.cast<float>());
  EXPECT_NEAR(vf.loss, vd.loss, 1e-5 * vd.loss);
  EXPECT_LE(rel(Pf.grad().cast<double>(), Pd.grad()), 1e-4);

  const VStarResult r = compute_vstar(*m, 1, fixed_ids(), opt);
  ASSERT_GE(r.loss.size(), 2u);
  EXPECT_LT(r.loss.back(), 0.7 * r.loss.front());
  EXPECT_GT(r.p_target.back(), r.p_target.front());
  EXPECT_LE(r.delta.norm(), opt.clamp_norm_factor * r.target_init.norm() * (1 + 1e-5));
  EXPECT_EQ(r.updates + 1, int(r.loss.size()));
}

// What a device runs — the layers above L through the backend's ops (model/seam_backward.h) — on the host, against the
// taped stack the host runs: the same loss and gradient to fp32 rounding (with and without the prefix cache), and the
// same optimisation.
TEST(VStar, BackendOpsMatchTheTapedStack) {
  SerialOps serial;
  auto m = Model::load(fixture_model("qwen2_moe"));
  for (bool cache : {true, false}) {
    VStarOptions opt;
    opt.cache_prefix = cache;
    VStarOptions ops = opt;
    ops.backend_ops = true;
    VStarProblem<float> P(*m, 1, fixed_ids(), opt), Q(*m, 1, fixed_ids(), ops);
    const Eigen::VectorXf d = Eigen::VectorXf::LinSpaced(P.hidden(), -1, 1) * 0.1f;
    const auto vp = P.eval(d), vq = Q.eval(d);
    EXPECT_NEAR(vq.loss, vp.loss, 1e-5 * vp.loss) << cache;
    EXPECT_LE(rel(Q.grad().cast<double>(), P.grad().cast<double>()), 1e-4) << cache;
    const VStarResult a = compute_vstar(*m, 1, fixed_ids(), opt), b = compute_vstar(*m, 1, fixed_ids(), ops);
    EXPECT_EQ(a.loss.size(), b.loss.size()) << cache;
    EXPECT_LE((a.delta - b.delta).norm(), 1e-3 * a.delta.norm()) << cache;
  }
}

// --lr-scale relative: lr in units of ‖target_init‖/√H, so a relative lr is the absolute lr·√H/‖target_init‖
// (the same steps up to the rounding of that product), and it differs from the absolute lr it names.
TEST(VStar, RelativeLearningRateIsInUnitsOfTheMoeOutputsRms) {
  SerialOps serial;
  auto m = Model::load(fixture_model("qwen2_moe"));
  VStarOptions abs_opt;
  abs_opt.steps = 6;
  abs_opt.early_stop_loss = 0;
  const VStarResult a = compute_vstar(*m, 1, fixed_ids(), abs_opt);
  VStarOptions rel_opt = abs_opt;
  rel_opt.relative_lr = true;
  rel_opt.lr = abs_opt.lr * std::sqrt(double(a.delta.size())) / double(a.target_init.norm());
  const VStarResult r = compute_vstar(*m, 1, fixed_ids(), rel_opt);
  ASSERT_EQ(r.updates, a.updates);
  EXPECT_LE(rel(r.delta.cast<double>(), a.delta.cast<double>()), 1e-5);
  EXPECT_NEAR(r.loss.back(), a.loss.back(), 1e-5 * a.loss.back());
  rel_opt.lr = abs_opt.lr;  // the same number read as relative: another step size (‖target_init‖ ≠ √H here)
  ASSERT_GT(std::abs(double(a.target_init.norm()) / std::sqrt(double(a.delta.size())) - 1), 0.1);
  EXPECT_GT(rel(compute_vstar(*m, 1, fixed_ids(), rel_opt).delta.cast<double>(), a.delta.cast<double>()), 1e-2);
}

// ---- the update -----------------------------------------------------------------------------------------------------

struct Bare {
  MatR moe_out;             // [N, H] of the bare prompt at layer L
  std::vector<MatR> keys;   // per expert, the bare prompt's key rows
  std::vector<std::vector<int>> key_tokens;
  MatR logits;
};
Bare run_bare(const Model& m, int layer, const std::vector<int32_t>& ids) {
  Hooks h;
  auto mo = h.capture(hook_names::moe_out(layer));
  std::vector<std::shared_ptr<Hooks::Capture>> ks;
  for (int e = 0; e < m.config().n_experts; ++e) ks.push_back(h.capture(hook_names::expert_key(layer, e)));
  ForwardOptions fo;
  fo.hooks = &h;
  ForwardOutput f = m.forward({ids}, fo);
  Bare b;
  b.moe_out = mo->value;
  for (auto& k : ks) {
    b.keys.push_back(k->value);
    b.key_tokens.push_back(k->tokens);
  }
  b.logits = f.logits;
  return b;
}

// A fixture model with key statistics at `layer` (random corpus), its weights and its bare-prompt run before editing
// fixed_ids() (subject token s of the bare prompt).
struct EditSetup {
  std::shared_ptr<Model> m;
  std::vector<SecondMoment> stats;
  Weights before;
  Bare pre;
  EditIds ids = fixed_ids();
  int s = ids.subject_last[0];
};
EditSetup edit_setup(const std::string& fx, int layer) {
  EditSetup e;
  e.m = Model::load(fixture_model(fx));
  e.stats = compute_key_stats(*e.m, layer, random_corpus(40, 32, e.m->config().vocab_size, 3));
  e.before = e.m->weights();
  e.pre = run_bare(*e.m, layer, e.ids.prompts[0]);
  return e;
}

TEST(Edit, RankOneUpdateIsExactAndRevertIsBitExact) {
  SerialOps serial;
  const int layer = 1;
  for (const std::string fx : {"qwen2_moe", "deepseek_v2", "deepseek_v3"}) {  // GQA; MLA (2 shared); MLA + sigmoid
  EditSetup setup = edit_setup(fx, layer);
  auto& [m, stats, before, pre, ids, s] = setup;
  for (const std::string tgt : {"dominant", "routed", "shared", "1:X", "consistent"}) {
    EditOptions opt;
    opt.layer = layer;
    opt.moments = moments_from(stats);
    if (tgt == "consistent") {
      opt.keys = KeyMode::Consistent;
    } else if (tgt == "1:X") {
      opt.target = parse_edit_target("1:" + std::to_string(pre.key_tokens.size()));  // placeholder, set below
    } else {
      opt.target = parse_edit_target(tgt);
    }
    if (tgt == "1:X") {  // the second expert of the subject token's top-k
      EditOptions probe = opt;
      probe.target = {};
      EditResult r0 = apply_edit_ids(*m, ids, probe);
      revert(*m, r0);
      opt.target = parse_edit_target("1:" + std::to_string(r0.routed[1]));
    }
    EditResult r = apply_edit_ids(*m, ids, opt);
    ASSERT_FALSE(r.updates.empty()) << tgt;
    // W′k = Wk + r for the denominator's key (the bare prompt's, read from the forward's hook_key).
    for (const ExpertUpdate& u : r.updates) {
      const bool shared = is_shared_expert(u.expert);
      const ExpertBank& bank = shared ? m->weights().layers[1].ffn.shared : m->weights().layers[1].ffn.experts;
      const ExpertBank& bank0 = shared ? before.layers[1].ffn.shared : before.layers[1].ffn.experts;
      const int e = shared ? 0 : u.expert;
      // Shared expert j of several edits its slice of the shared block's columns.
      const auto [c0, c1] = shared && m->config().n_shared_experts > 1
                                ? m->config().shared_slice(shared_index(u.expert))
                                : std::pair<int, int>{0, bank.I};
      Eigen::VectorXd k = u.k.cast<double>();
      if (!shared && tgt != "consistent") {  // the forward's own key at the subject token
        const auto& tk = pre.key_tokens[size_t(e)];
        const auto it = std::find(tk.begin(), tk.end(), s);
        ASSERT_NE(it, tk.end());
        k = pre.keys[size_t(e)].row(int(it - tk.begin())).transpose().cast<double>();
        EXPECT_LE(rel(u.k.cast<double>(), k), 1e-6);
      }
      const Eigen::MatrixXd W1 = bank.down[size_t(e)].to_f32().cast<double>().middleCols(c0, c1 - c0);
      const Eigen::MatrixXd W0 = bank0.down[size_t(e)].to_f32().cast<double>().middleCols(c0, c1 - c0);
      ASSERT_EQ(W1.cols(), k.size());
      const double err = rel(W1 * k, W0 * k + u.r.cast<double>());
      std::printf("  [exact] %s expert %d: |W'k - (Wk + r)| / |Wk + r| = %.2e, |r| = %.3f\n", tgt.c_str(), u.expert,
                  err, u.r.norm());
      EXPECT_LE(err, 1e-5) << tgt;
      EXPECT_LE((W1 * k - W0 * k - u.r.cast<double>()).norm() / u.r.norm(), 1e-5) << tgt;
    }
    // The bare prompt's MoE output at the subject token moved by δ (ROME keys: every target kind).
    if (tgt != "consistent") {
      const Bare post = run_bare(*m, layer, ids.prompts[0]);
      const Eigen::VectorXd moved = (post.moe_out.row(s) - pre.moe_out.row(s)).transpose().cast<double>();
      EXPECT_LE(rel(moved, r.vstar.delta.cast<double>()), 1e-4) << tgt;
    }
    EXPECT_GE(r.template_route_share, 1.0 / 4);
    // Revert: weights and logits bit for bit.
    revert(*m, r);
    for (int l = 0; l < m->config().n_layers; ++l) {
      EXPECT_EQ(m->weights().layers[size_t(l)].ffn.experts.down, before.layers[size_t(l)].ffn.experts.down);
      EXPECT_EQ(m->weights().layers[size_t(l)].ffn.shared.down, before.layers[size_t(l)].ffn.shared.down);
    }
    const Bare back = run_bare(*m, layer, ids.prompts[0]);
    EXPECT_TRUE((back.logits.array() == pre.logits.array()).all()) << fx << " " << tgt;
    for (const Weight& w : m->weights().layers[size_t(layer)].ffn.experts.down) EXPECT_FALSE(w.is_copy()) << fx;
  }
  }
}

// With the exact objective v*'s last loss is the edited model's own loss: the NLL of the target after every template
// and the KL at the KL prompt, measured by plain forwards of the edited model. With ROME's objective it is not.
TEST(Edit, ExactObjectiveIsTheEditedModelsLoss) {
  SerialOps serial;
  struct Case {
    std::string fx;
    int layer;
    std::string target;
  };
  for (const Case& c : {Case{"qwen2_moe", 1, "dominant"}, Case{"qwen2_moe", 1, "routed"},
                        Case{"qwen2_moe", 1, "shared"}, Case{"deepseek_v1", 2, "shared"}}) {
    for (const VStarObjective obj : {VStarObjective::Exact, VStarObjective::Rome}) {
      EditSetup setup = edit_setup(c.fx, c.layer);
      auto& m = setup.m;
      const EditIds& ids = setup.ids;  // a plain reference: clang 14 cannot capture structured bindings
      // [templates] target NLL and the KL prompt's next-token log-probabilities of the current model.
      auto measure = [&](Model& model) {
        std::vector<std::vector<int32_t>> seqs;
        for (const auto& p : ids.prompts) {
          auto q = p;
          q.insert(q.end(), ids.target.begin(), ids.target.end() - 1);
          seqs.push_back(q);
        }
        const ForwardOutput f = model.forward(seqs, {});
        const ForwardOutput k = model.forward({ids.kl_prompt}, {});
        double nll = 0;
        int row0 = 0;
        for (size_t i = 0; i < seqs.size(); ++i) {
          double t = 0;
          for (size_t j = 0; j < ids.target.size(); ++j) {
            const Eigen::VectorXd lg = f.logits.row(row0 + int(ids.prompts[i].size() + j) - 1).transpose().cast<double>();
            t += std::log((lg.array() - lg.maxCoeff()).exp().sum()) + lg.maxCoeff() - lg[ids.target[j]];
          }
          nll += t / double(ids.target.size());
          row0 += int(seqs[i].size());
        }
        const Eigen::VectorXd lk = k.logits.row(ids.kl_subject_last).transpose().cast<double>();
        const Eigen::VectorXd logp = lk.array() - (std::log((lk.array() - lk.maxCoeff()).exp().sum()) + lk.maxCoeff());
        return std::make_pair(nll / double(seqs.size()), logp);
      };
      const auto [nll0, logp0] = measure(*m);
      EditOptions opt;
      opt.layer = c.layer;
      opt.moments = moments_from(setup.stats);
      opt.target = parse_edit_target(c.target);
      opt.v.objective = obj;
      opt.v.steps = 6;
      opt.v.lr = 0.2;
      EditResult r = apply_edit_ids(*m, ids, opt);
      const auto [nll1, logp1] = measure(*m);
      const double kl = opt.v.kl_factor * (logp1.array().exp() * (logp1 - logp0).array()).sum();
      const double dn = std::abs(nll1 - r.vstar.nll.back()), dk = std::abs(kl - r.vstar.kl.back());
      std::printf("  [exact objective] %s %s %s: edited NLL %.6f vs v* %.6f, KL %.3e vs %.3e (unedited NLL %.4f)\n",
                  c.fx.c_str(), c.target.c_str(), obj == VStarObjective::Exact ? "exact" : "rome", nll1,
                  r.vstar.nll.back(), kl, r.vstar.kl.back(), nll0);
      if (obj == VStarObjective::Exact) {
        EXPECT_LE(dn, 1e-4 * std::max(1.0, nll1)) << c.fx << " " << c.target;
        EXPECT_LE(dk, 1e-4 * std::max(1e-2, kl)) << c.fx << " " << c.target;
      } else {  // ROME's objective misses the spill-over onto the other tokens
        EXPECT_GT(dn + dk, 1e-3) << c.fx << " " << c.target;
      }
      EXPECT_GT(std::abs(nll1 - nll0), 1e-3);  // the edit did something
      revert(*m, r);
    }
  }
}

// DeepSeek v1 (2 ungated shared experts of width 12, one MLP in the checkpoint): --target shared edits each shared
// expert's slice of the shared down-projection with r_j = δ/2 and C_j over that slice's keys; W′_j k_j = W_j k_j + r_j,
// the other weights stay, the MoE output at the subject token moves by δ, revert is bit-exact, labels name each one.
TEST(Edit, SharedTargetEditsEverySharedExpertSlice) {
  SerialOps serial;
  const int layer = 2;
  EditSetup setup = edit_setup("deepseek_v1", layer);
  auto& [m, stats, before, pre, ids, s] = setup;
  const int H = m->config().hidden, W = before.layers[size_t(layer)].ffn.shared.I;
  EditOptions opt;
  opt.layer = layer;
  opt.moments = moments_from(stats);
  opt.target = parse_edit_target("shared");
  EditResult r = apply_edit_ids(*m, ids, opt);
  ASSERT_EQ(r.updates.size(), 2u);
  const Eigen::MatrixXd W1 = m->weights().layers[size_t(layer)].ffn.shared.down[0].to_f32().cast<double>();
  const Eigen::MatrixXd W0 = before.layers[size_t(layer)].ffn.shared.down[0].to_f32().cast<double>();
  ASSERT_EQ(W1.rows(), H);
  ASSERT_EQ(W1.cols(), W);
  for (int j = 0; j < 2; ++j) {
    const ExpertUpdate& u = r.updates[size_t(j)];
    EXPECT_EQ(u.expert, shared_expert_id(j));
    EXPECT_EQ(u.stats_count, 40 * 32);  // every token's key
    EXPECT_LE(rel(u.r.cast<double>(), 0.5 * r.vstar.delta.cast<double>()), 1e-6);  // minimum-norm split, ungated
    const auto [b, e] = m->config().shared_slice(j);
    ASSERT_EQ(u.k.size(), e - b);
    const Eigen::VectorXd k = u.k.cast<double>();
    const double err = rel(W1.middleCols(b, e - b) * k, W0.middleCols(b, e - b) * k + u.r.cast<double>());
    std::printf("  [exact] shared expert %d: |W'k - (Wk + r)| / |Wk + r| = %.2e, |r| = %.3f\n", j, err, u.r.norm());
    EXPECT_LE(err, 1e-5);
    // Rank one within the slice: ΔW_j = r_j u_jᵀ.
    const Eigen::MatrixXd dW = W1.middleCols(b, e - b) - W0.middleCols(b, e - b);
    EXPECT_LE((dW - u.r.cast<double>() * u.u.cast<double>().transpose()).norm(), 1e-5 * dW.norm());
  }
  EXPECT_EQ(m->weights().layers[size_t(layer)].ffn.experts.down, before.layers[size_t(layer)].ffn.experts.down);
  const Bare post = run_bare(*m, layer, ids.prompts[0]);
  const Eigen::VectorXd moved = (post.moe_out.row(s) - pre.moe_out.row(s)).transpose().cast<double>();
  std::printf("  [shared split] |Δ moe_out - δ| / |δ| = %.2e\n", rel(moved, r.vstar.delta.cast<double>()));
  EXPECT_LE(rel(moved, r.vstar.delta.cast<double>()), 1e-4);
  const nlohmann::json j = edit_json(r);
  EXPECT_EQ(j["updates"][0]["expert"], "shared0");
  EXPECT_EQ(j["updates"][1]["expert"], "shared1");
  revert(*m, r);
  EXPECT_EQ(m->weights().layers[size_t(layer)].ffn.shared.down, before.layers[size_t(layer)].ffn.shared.down);
  const Bare back = run_bare(*m, layer, ids.prompts[0]);
  EXPECT_TRUE((back.logits.array() == pre.logits.array()).all());
  // Statistics of one shared expert's slice are required (a whole-block matrix is the wrong size).
  opt.moments = [&](int l, int e) -> std::shared_ptr<const SecondMoment> {
    auto full = std::make_shared<SecondMoment>();
    full->layer = l;
    full->expert = e;
    full->mom2 = MatR::Identity(W, W);
    return full;
  };
  EXPECT_THROW(apply_edit_ids(*m, ids, opt), InputError);
  EXPECT_EQ(m->weights().layers[size_t(layer)].ffn.shared.down, before.layers[size_t(layer)].ffn.shared.down);
}

TEST(Edit, SequentialEditsRevertInReverseOrder) {
  SerialOps serial;
  auto m = Model::load(fixture_model("mixtral_fused"));
  auto stats = compute_key_stats(*m, 0, random_corpus(30, 32, m->config().vocab_size, 4));
  const Weights before = m->weights();
  const MatR l0 = m->forward({fixed_ids().prompts[1]}).logits;
  EditOptions opt;
  opt.layer = 0;
  opt.moments = moments_from(stats);
  std::vector<EditResult> edits;
  EditIds a = fixed_ids(), b = fixed_ids();
  b.target = {50};
  edits.push_back(apply_edit_ids(*m, a, opt));
  opt.target = parse_edit_target("routed");
  edits.push_back(apply_edit_ids(*m, b, opt));
  EXPECT_FALSE((m->forward({fixed_ids().prompts[1]}).logits.array() == l0.array()).all());
  revert_all(*m, edits);
  EXPECT_EQ(m->weights().layers[0].ffn.experts.down, before.layers[0].ffn.experts.down);
  EXPECT_TRUE((m->forward({fixed_ids().prompts[1]}).logits.array() == l0.array()).all());
}

TEST(Edit, BadRequestsFailWithClearMessages) {
  SerialOps serial;
  auto m = Model::load(fixture_model("qwen2_moe"));
  EditOptions opt;
  opt.mom2_adjustment = false;
  auto expect_input_error = [&](EditOptions o, EditIds ids, const std::string& needle) {
    try {
      apply_edit_ids(*m, ids, o);
      ADD_FAILURE() << "no error for: " << needle;
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  opt.layer = 7;
  expect_input_error(opt, fixed_ids(), "out of range");
  opt.layer = 2;
  expect_input_error(opt, fixed_ids(), "dense layer");
  opt.layer = 1;
  EditIds empty = fixed_ids();
  empty.target.clear();
  expect_input_error(opt, empty, "target is empty");
  EditOptions ex = opt;
  ex.layer = -1;
  ex.target = parse_edit_target("1:8");
  expect_input_error(ex, fixed_ids(), "does not exist");
  EXPECT_THROW(parse_edit_target("best"), InputError);
  EXPECT_THROW(parse_edit_target("1:"), InputError);
  auto mix = Model::load(fixture_model("mixtral_gqa"));
  EditOptions sh;
  sh.layer = 0;
  sh.mom2_adjustment = false;
  sh.target = parse_edit_target("shared");
  try {
    apply_edit_ids(*mix, fixed_ids(), sh);
    ADD_FAILURE();
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("no shared expert"), std::string::npos);
  }
  EditRequest req{"The capital of {} is", "", "Paris", "", {}, {}, ""};
  EXPECT_THROW(normalized_prompt(req), InputError);
  req.subject = "France";
  req.prompt = "The capital of Spain is";
  EXPECT_THROW(normalized_prompt(req), InputError);
  req.prompt = "The capital of France is";
  EXPECT_EQ(normalized_prompt(req), "The capital of {} is");
  req.target_new = " ";
  EXPECT_THROW(normalized_prompt(req), InputError);
}

}  // namespace
}  // namespace moedit
