// Gradients (model/backward.h): every op's backward and whole blocks / stacks of every family against central
// finite differences in float64 (relative error ≤ 1e-4, measured as ‖g_fd − g‖ / ‖g‖ over all coordinates), blocks
// under a standing router edit (steering, boosts, masks), and the taped forward against Model::forward.
#include <gtest/gtest.h>

#include <cstdio>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>

#include "model/backward.h"
#include "model/model.h"
#include "gradient_models.h"
#include "test_util.h"
#include "tracing/interventions.h"

namespace moedit {
namespace {

using test::SerialOps;

using MatD = MatT<double>;
using VecD = VecT<double>;

constexpr double kTol = 1e-4;

using test::for_each_gradient_model;
using test::kFamilies;
using test::tiny;
using test::random_f;
using test::random_mat;

// Relative error of the gradient `g` of f at x against central differences over every coordinate.
double fd_error(const std::function<double(const MatD&)>& f, const MatD& x, const MatD& g, double h = 1e-5) {
  MatD fd(x.rows(), x.cols());
  MatD xp = x;
  for (Eigen::Index i = 0; i < x.size(); ++i) {
    const double keep = xp.data()[i];
    xp.data()[i] = keep + h;
    const double fp = f(xp);
    xp.data()[i] = keep - h;
    const double fm = f(xp);
    xp.data()[i] = keep;
    fd.data()[i] = (fp - fm) / (2 * h);
  }
  const double n = std::max(g.norm(), 1e-300);
  EXPECT_GT(g.norm(), 1e-8) << "gradient is (nearly) zero: the check would be vacuous";
  const double err = (fd - g).norm() / n;
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::printf("  [fd] %s.%s: relative error %.2e over %lld coordinates\n", info->test_suite_name(), info->name(), err,
              static_cast<long long>(x.size()));
  return err;
}

// ---- ops --------------------------------------------------------------------------------------------------------

TEST(BackwardOps, Linear) {
  SerialOps serial;
  const int n = 5, in = 7, out = 6;
  auto W = random_f(size_t(out) * in, 1), b = random_f(size_t(out), 2);
  const MatD X = random_mat(n, in, 3), R = random_mat(n, out, 4);
  auto f = [&](const MatD& x) {
    MatD y(n, out);
    grad::linear(x.data(), n, in, W.data(), out, y.data(), b.data());
    return (y.cwiseProduct(R)).sum();
  };
  MatD dX(n, in), dW = MatD::Zero(out, in);
  VecD db = VecD::Zero(out);
  grad::linear_backward(R.data(), n, in, W.data(), out, dX.data(), false, X.data(), dW.data(), db.data());
  EXPECT_LE(fd_error(f, X, dX), kTol);
  // Weight and bias gradients: perturb W through a double copy.
  auto fw = [&](const MatD& w) {
    MatD y = X * w.transpose();
    for (int r = 0; r < n; ++r) y.row(r) += Eigen::Map<const Eigen::VectorXf>(b.data(), out).cast<double>().transpose();
    return (y.cwiseProduct(R)).sum();
  };
  MatD W0 = Eigen::Map<const MatR>(W.data(), out, in).cast<double>();
  EXPECT_LE(fd_error(fw, W0, dW), kTol);
  EXPECT_LE((db - R.colwise().sum().transpose()).norm(), 1e-12);
}

TEST(BackwardOps, RmsNorm) {
  SerialOps serial;
  const int rows = 4, dim = 9;
  auto w = random_f(size_t(dim), 5);
  const MatD X = random_mat(rows, dim, 6), R = random_mat(rows, dim, 7);
  auto f = [&](const MatD& x) {
    MatD y(rows, dim);
    grad::rmsnorm(x.data(), w.data(), y.data(), rows, dim, 1e-5f);
    return y.cwiseProduct(R).sum();
  };
  MatD dX(rows, dim);
  VecD dw = VecD::Zero(dim);
  grad::rmsnorm_backward(X.data(), w.data(), R.data(), dX.data(), rows, dim, 1e-5f, false, dw.data());
  EXPECT_LE(fd_error(f, X, dX), kTol);
  // dw: the output is linear in w, so dw_i = Σ_r R_ri·x_ri·r_r exactly.
  VecD want = VecD::Zero(dim);
  for (int r = 0; r < rows; ++r) {
    const double inv = 1.0 / std::sqrt(X.row(r).squaredNorm() / dim + 1e-5);
    want += (R.row(r).cwiseProduct(X.row(r)) * inv).transpose();
  }
  EXPECT_LE((dw - want).norm() / want.norm(), 1e-12);
}

TEST(BackwardOps, Rope) {
  SerialOps serial;
  const int rows = 5, heads = 3, D = 8;
  std::vector<int> pos = {0, 1, 2, 7, 30};
  std::vector<float> inv(D / 2);
  for (int i = 0; i < D / 2; ++i) inv[size_t(i)] = 1.f / std::pow(1e4f, float(2 * i) / float(D));
  const MatD X = random_mat(rows, heads * D, 8), R = random_mat(rows, heads * D, 9);
  auto f = [&](const MatD& x) {
    MatD y = x;
    grad::rope(y.data(), rows, heads * D, heads, D, D, pos.data(), inv.data(), false);
    return y.cwiseProduct(R).sum();
  };
  MatD g = R;
  grad::rope(g.data(), rows, heads * D, heads, D, D, pos.data(), inv.data(), true);
  EXPECT_LE(fd_error(f, X, g), kTol);
  // The float forward is ops::rope_neox; the double one must be the same rotation.
  MatR xf = X.cast<float>();
  MatD yd = X.cast<float>().cast<double>();
  grad::rope(xf.data(), rows, heads * D, heads, D, D, pos.data(), inv.data(), false);
  grad::rope(yd.data(), rows, heads * D, heads, D, D, pos.data(), inv.data(), false);
  EXPECT_LE((xf.cast<double>() - yd).cwiseAbs().maxCoeff(), 1e-5);
}

TEST(BackwardOps, SoftmaxAndLogSoftmax) {
  SerialOps serial;
  const int n = 7;
  const MatD X = random_mat(1, n, 10, 2.0), R = random_mat(1, n, 11);
  auto f = [&](const MatD& x) {
    MatD p = x;
    grad::softmax(p.data(), n);
    return p.cwiseProduct(R).sum();
  };
  MatD p = X, g(1, n);
  grad::softmax(p.data(), n);
  grad::softmax_backward(p.data(), R.data(), n, g.data());
  EXPECT_LE(fd_error(f, X, g), kTol);
  MatD ls(1, n);
  grad::log_softmax(X.data(), n, ls.data());
  EXPECT_LE((ls.array().exp() - p.array()).abs().maxCoeff(), 1e-15);
}

TEST(BackwardOps, SwiGLU) {
  SerialOps serial;
  const int rows = 3, I = 6;
  const MatD GU = random_mat(rows, 2 * I, 12, 2.0), R = random_mat(rows, I, 13);
  auto f = [&](const MatD& gu) {
    MatD k(rows, I);
    grad::swiglu(gu.data(), rows, I, k.data());
    return k.cwiseProduct(R).sum();
  };
  MatD g(rows, 2 * I);
  grad::swiglu_backward(GU.data(), R.data(), rows, I, g.data());
  EXPECT_LE(fd_error(f, GU, g), kTol);
}

// Attention of one sequence: GQA (4 query heads on 2 kv heads), a constant prefix of keys, with and without a
// sliding window. Gradients for q, the active keys and the active values.
TEST(BackwardOps, Attention) {
  SerialOps serial;
  for (int window : {0, 3}) {
    const int Hq = 4, Hkv = 2, D = 5, nq = 4, np = 3, nk = np + nq;
    const ops::AttnShape s{Hq, Hkv, D, D, 0.4f, window};
    const MatD Q = random_mat(nq, Hq * D, 14), K = random_mat(nk, Hkv * D, 15), V = random_mat(nk, Hkv * D, 16);
    const MatD R = random_mat(nq, Hq * D, 17);
    auto run = [&](const MatD& q, const MatD& k, const MatD& v) {
      MatD out(nq, Hq * D), probs(Hq * nq, nk);
      grad::attention(q.data(), nq, Hq * D, np, k.data(), Hkv * D, v.data(), Hkv * D, nk, s, out.data(), Hq * D,
                      probs.data());
      return std::make_pair(out, probs);
    };
    auto [out, probs] = run(Q, K, V);
    MatD dq(nq, Hq * D), dk = MatD::Zero(nk, Hkv * D), dv = MatD::Zero(nk, Hkv * D);
    grad::attention_backward(Q.data(), nq, Hq * D, K.data(), Hkv * D, V.data(), Hkv * D, nk, s, probs.data(), R.data(),
                             Hq * D, dq.data(), dk.data(), dv.data());
    EXPECT_LE(fd_error([&](const MatD& q) { return run(q, K, V).first.cwiseProduct(R).sum(); }, Q, dq), kTol);
    EXPECT_LE(fd_error([&](const MatD& k) { return run(Q, k, V).first.cwiseProduct(R).sum(); }, K, dk), kTol);
    EXPECT_LE(fd_error([&](const MatD& v) { return run(Q, K, v).first.cwiseProduct(R).sum(); }, V, dv), kTol);
    // Matches the float kernel the forward uses.
    MatR of(nq, Hq * D);
    MatR qf = Q.cast<float>(), kf = K.cast<float>(), vf = V.cast<float>();
    ops::attention(qf.data(), nq, Hq * D, np, kf.data(), Hkv * D, vf.data(), Hkv * D, nk, s, of.data(), Hq * D);
    EXPECT_LE((of.cast<double>() - out).cwiseAbs().maxCoeff(), 1e-5) << "window " << window;
  }
}

// Routers with the selection fixed: softmax→top-k (with and without renormalisation, with a routed scaling
// factor) and top-k→softmax (Granite).
TEST(BackwardOps, Router) {
  SerialOps serial;
  struct Case {
    const char* family;
    bool norm;
    float scaling;
  };
  for (const Case& cs : {Case{"qwen2_moe", false, 1.f}, Case{"qwen3_moe", true, 1.f}, Case{"qwen2_moe", true, 2.5f},
                         Case{"granitemoe", false, 1.f}}) {
    ModelConfig c = tiny(cs.family);
    c.norm_topk_prob = cs.norm;
    c.routed_scaling = cs.scaling;
    const int E = c.n_experts, k = c.top_k;
    const MatD Z = random_mat(1, E, 18, 1.5), R = random_mat(1, k, 19);
    std::vector<int> ids(static_cast<size_t>(k));
    MatD w(1, k);
    grad::route(c, Z.data(), ids.data(), w.data());
    auto f = [&](const MatD& z) {
      std::vector<int> id2(static_cast<size_t>(k));
      MatD w2(1, k);
      grad::route(c, z.data(), id2.data(), w2.data());
      EXPECT_EQ(id2, ids);  // the perturbation must not change the selection
      return w2.cwiseProduct(R).sum();
    };
    MatD dz(1, E);
    grad::route_backward(c, Z.data(), ids.data(), R.data(), dz.data());
    EXPECT_LE(fd_error(f, Z, dz), kTol) << cs.family << " norm " << cs.norm;
    // Same routing as the model's.
    Model m(c, random_weights(c, 1));
    LayerRouting lr;
    m.route(Z.cast<float>(), lr);
    for (int j = 0; j < k; ++j) {
      EXPECT_EQ(lr.ids(0, j), ids[size_t(j)]);
      EXPECT_NEAR(lr.weights(0, j), w(0, j), 1e-6);
    }
  }
}

// ---- blocks and stacks ------------------------------------------------------------------------------------------

// Relative error of ∂(Σ R ⊙ block_l(x))/∂x at X [9, H] (two sequences of 6 and 3 tokens) against finite differences.
double block_fd_error(const Model& m, int l, const MatD& X, const MatD& R) {
  const TokenLayout lay = layout_from_lengths({6, 3}, {0, 0});
  auto f = [&](const MatD& x) {
    MatD y = x;
    grad::BlockTape<double> tp;
    grad::block_forward(m, l, y, lay, static_cast<const grad::PrefixKV<double>*>(nullptr), tp);
    return y.cwiseProduct(R).sum();
  };
  MatD y = X;
  grad::BlockTape<double> tp;
  grad::block_forward(m, l, y, lay, static_cast<const grad::PrefixKV<double>*>(nullptr), tp);
  MatD dx = R;
  grad::block_backward(m, l, tp, dx);
  return fd_error(f, X, dx);
}

// One block of every family (every layer: MoE with and without shared expert, dense): ∂(Σ R ⊙ out)/∂x.
TEST(BackwardBlocks, EveryLayerOfEveryFamily) {
  SerialOps serial;
  for_each_gradient_model(21, [&](const std::string& fam, const ModelConfig& c, Model& m) {
    const MatD X = random_mat(9, c.hidden, 22), R = random_mat(9, c.hidden, 23);
    for (int l = 0; l < c.n_layers; ++l) EXPECT_LE(block_fd_error(m, l, X, R), kTol) << fam << " layer " << l;
  });
}

// A standing router edit (model/router_edit.h) of each kind on every MoE layer — steering forms 3, 4, 5 (a vector
// with zeros), a norm-preserving boost with a mask, an additive boost — applied by the taped block; its backward
// (the edit's transposed Jacobian) against finite differences, and the edit changes the block.
TEST(BackwardBlocks, RouterEditsOfEveryKind) {
  SerialOps serial;
  for_each_gradient_model(51, [&](const std::string& fam, const ModelConfig& c, Model& m) {
    const MatD X = random_mat(9, c.hidden, 52), R = random_mat(9, c.hidden, 53);
    const std::vector<InterventionSpec> specs = test::router_edit_specs(c);
    for (size_t i = 0; i < specs.size(); ++i) {
      for (int l = 0; l < c.n_layers; ++l) {
        if (!c.is_moe(l)) continue;
        m.set_router_edit(router_edit(specs[i], c));
        EXPECT_LE(block_fd_error(m, l, X, R), kTol) << fam << " layer " << l << " edit " << describe(specs[i]);
      }
      // The taped forward applies the edit: the block's output moves.
      const int l = specs[i].steer.layers.front();
      const auto* none = static_cast<const grad::PrefixKV<double>*>(nullptr);
      const TokenLayout lay = layout_from_lengths({6, 3}, {0, 0});
      MatD y0 = X, y1 = X;
      grad::BlockTape<double> tp;
      grad::block_forward(m, l, y1, lay, none, tp);
      m.set_router_edit(nullptr);
      grad::block_forward(m, l, y0, lay, none, tp);
      EXPECT_GT((y1 - y0).norm(), 1e-6 * y0.norm()) << fam << " edit " << describe(specs[i]);
    }
  });
}

// The taped forward (float) from the embeddings equals Model::forward; a prefix-cached continuation equals the
// full run; and the whole stack's input gradient (with a constant prefix) matches finite differences.
TEST(BackwardStack, TapedForwardMatchesModel) {
  SerialOps serial;
  for_each_gradient_model(31, [&](const std::string& fam, const ModelConfig& c, Model& m) {
    const std::vector<std::vector<int32_t>> seqs = {{5, 17, 3, 58, 42, 7, 7, 1}, {9, 2, 33, 34, 35}};
    ForwardOutput ref = m.forward(seqs);
    TokenLayout lay = make_layout(seqs, nullptr);
    std::vector<int32_t> flat;
    for (const auto& s : seqs) flat.insert(flat.end(), s.begin(), s.end());
    MatR x = m.embed(flat, lay, nullptr);
    grad::TapedStack<float> st(m, 0);
    st.forward(x, lay);
    std::vector<int> rows(lay.seq.size());
    for (size_t i = 0; i < rows.size(); ++i) rows[i] = int(i);
    MatR lg = st.logits(rows);
    const float scale = ref.logits.cwiseAbs().maxCoeff();
    EXPECT_LE((lg - ref.logits).cwiseAbs().maxCoeff(), 1e-5f * scale) << fam;

    // Prefix: the first 3 / 2 tokens of each sequence once, then the rest continuing them.
    const std::vector<int> np = {3, 2};
    std::vector<int> pre_rows, act_rows;
    for (int i = 0; i < int(lay.seq.size()); ++i)
      (lay.pos[size_t(i)] < np[size_t(lay.seq[size_t(i)])] ? pre_rows : act_rows).push_back(i);
    auto gather = [&](const std::vector<int>& r) {
      MatR g(int(r.size()), c.hidden);
      for (size_t i = 0; i < r.size(); ++i) g.row(int(i)) = x.row(r[i]);
      return g;
    };
    grad::TapedStack<float> pre(m, 0), act(m, 0);
    pre.forward(gather(pre_rows), layout_from_lengths(np, {0, 0}));
    const auto kv = pre.kv();
    act.forward(gather(act_rows), layout_from_lengths({8 - 3, 5 - 2}, np), &kv);
    std::vector<int> all(act_rows.size());
    for (size_t i = 0; i < all.size(); ++i) all[i] = int(i);
    MatR la = act.logits(all);
    for (size_t i = 0; i < act_rows.size(); ++i)
      EXPECT_LE((la.row(int(i)) - ref.logits.row(act_rows[i])).cwiseAbs().maxCoeff(), 1e-5f * scale) << fam;
  });
}

TEST(BackwardStack, InputGradientWithPrefixMatchesFiniteDifferences) {
  SerialOps serial;
  for_each_gradient_model(41, [&](const std::string& fam, const ModelConfig& c, Model& m) {
    const int first = 1;
    // Constant prefix K/V from a double forward of 2 + 3 prefix tokens.
    const std::vector<int> np = {2, 3}, na = {4, 3};
    grad::TapedStack<double> pre(m, first);
    pre.forward(random_mat(5, c.hidden, 42), layout_from_lengths(np, {0, 0}));
    const auto kv = pre.kv();
    const TokenLayout lay = layout_from_lengths(na, np);
    const MatD X = random_mat(7, c.hidden, 43);
    const std::vector<int> rows = {1, 3, 4, 6};
    const MatD R = random_mat(int(rows.size()), c.vocab_size, 44);
    auto f = [&](const MatD& x) {
      grad::TapedStack<double> st(m, first);
      st.forward(x, lay, &kv);
      return st.logits(rows).cwiseProduct(R).sum();
    };
    grad::TapedStack<double> st(m, first);
    st.forward(X, lay, &kv);
    st.logits(rows);
    const MatD dx = st.backward(R);
    EXPECT_LE(fd_error(f, X, dx), kTol) << fam;
  });
}

}  // namespace
}  // namespace moedit
