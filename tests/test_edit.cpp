// ROME editing of MoE experts (editor/): ∂loss/∂δ against finite differences (float64), exactness of the rank-one
// update (W′k = Wk + r, MoE output moves by δ), bit-exact revert, save → reload, key statistics and their cache,
// deterministic templates, the CLI's bad-input handling, and the cross-check against the PyTorch implementation
// (tools/rome_reference.py → tests/fixtures/edit/{qwen2_moe,deepseek_v2,deepseek_v3}_rome.safetensors).
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>

#include "editor/keystats.h"
#include "editor/rome.h"
#include "editor/save.h"
#include "model/backward.h"
#include "io/errors.h"
#include "model/model.h"
#include "io/safetensors.h"
#include "tokenizer/tokenizer.h"
#include "test_util.h"

namespace moedit {
namespace {

using test::SerialOps;
// The same for the CLI processes a test starts.
struct SerialCli {
  SerialCli() { ::setenv("OMP_NUM_THREADS", "1", 1); }
  ~SerialCli() { ::unsetenv("OMP_NUM_THREADS"); }
};

namespace fs = std::filesystem;

// ---- helpers ------------------------------------------------------------------------------------------------------

std::string fixture_model(const std::string& name) { return test::fixture("models/" + name); }

// Random id sequences (a stand-in corpus for key statistics).
std::vector<std::vector<int32_t>> random_corpus(int n, int len, int vocab, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::uniform_int_distribution<int> d(0, vocab - 1);
  std::vector<std::vector<int32_t>> v(static_cast<size_t>(n));
  for (auto& s : v)
    for (int i = 0; i < len; ++i) s.push_back(d(g));
  return v;
}

// A fixed edit request at the id level: 4 "templates" (bare first), a KL prompt, a 2-token target.
EditIds fixed_ids() {
  EditIds ids;
  ids.prompts = {{11, 12, 13, 14, 15}, {3, 4, 5, 6, 11, 12, 13, 14, 15}, {7, 8, 11, 12, 13, 14, 15},
                 {9, 10, 20, 21, 22, 11, 12, 13, 14, 15}};
  ids.subject_last = {1, 5, 3, 6};  // subject = tokens 11, 12
  ids.kl_prompt = {11, 12, 30, 31};
  ids.kl_subject_last = 1;
  ids.target = {40, 41};
  return ids;
}

MomentSource moments_from(std::vector<SecondMoment> stats) {
  auto shared = std::make_shared<std::vector<SecondMoment>>(std::move(stats));
  return [shared](int layer, int expert) -> std::shared_ptr<const SecondMoment> {
    for (const auto& s : *shared)
      if (s.layer == layer && s.expert == expert) return std::make_shared<SecondMoment>(s);
    return nullptr;
  };
}

double rel(const Eigen::VectorXd& a, const Eigen::VectorXd& b) { return (a - b).norm() / std::max(b.norm(), 1e-300); }

// A character-level byte-level BPE tokenizer (newline, space, printable ASCII; "<|endoftext|>" special) whose 97 ids
// fit the fixtures' vocabularies, so the text API and the CLI can run on them.
std::string char_tokenizer_json() {
  nlohmann::json vocab = nlohmann::json::object();
  vocab["\u010a"] = 0;  // '\n'
  vocab["\u0120"] = 1;  // ' '
  int id = 2;
  for (int b = 33; b <= 126; ++b) vocab[std::string(1, char(b))] = id++;
  nlohmann::json j = {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens",
       {{{"id", id}, {"content", "<|endoftext|>"}, {"single_word", false}, {"lstrip", false}, {"rstrip", false},
         {"normalized", false}, {"special", true}}}},
      {"normalizer", nullptr},
      {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}}},
      {"post_processor", nullptr},
      {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
      {"model",
       {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", nullptr},
        {"end_of_word_suffix", nullptr}, {"fuse_unk", false}, {"byte_fallback", false}, {"ignore_merges", false},
        {"vocab", vocab}, {"merges", nlohmann::json::array()}}}};
  return j.dump();
}

// A copy of a fixture checkpoint with the character tokenizer added.
std::string model_with_tokenizer(const test::TempDir& tmp, const std::string& fixture) {
  const std::string dir = tmp / fixture;
  fs::create_directories(dir);
  for (const auto& e : fs::directory_iterator(fixture_model(fixture)))
    if (e.path().filename() != "reference.safetensors") fs::copy_file(e.path(), dir + "/" + e.path().filename().string());
  test::write_file(dir + "/tokenizer.json", char_tokenizer_json());
  test::write_file(dir + "/tokenizer_config.json", R"({"eos_token": "<|endoftext|>"})");
  return dir;
}

// ---- ∂loss/∂δ -----------------------------------------------------------------------------------------------------

// Central differences of the v* loss at δ, one coordinate at a time.
Eigen::VectorXd fd_gradient(VStarProblem<double>& P, const Eigen::VectorXd& delta) {
  Eigen::VectorXd fd(delta.size());
  const double h = 1e-5 * std::max(1.0, delta.norm());
  for (int i = 0; i < int(delta.size()); ++i) {
    Eigen::VectorXd d = delta;
    d[i] += h;
    const double fp = P.eval(d).loss;
    d[i] -= 2 * h;
    fd[i] = (fp - P.eval(d).loss) / (2 * h);
  }
  return fd;
}

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
  const std::string dir = model_with_tokenizer(tmp, "qwen2_moe");
  auto m = Model::load(dir);
  const Tokenizer tok = Tokenizer::from_file(dir);
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
  const std::string ds_dir = model_with_tokenizer(tmp, "deepseek_v1");
  auto ds = Model::load(ds_dir);
  const Tokenizer ds_tok = Tokenizer::from_file(ds_dir);
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

// ---- text level, save ---------------------------------------------------------------------------------------------

TEST(Edit, TemplatesAreDeterministicAndIdsFollowRome) {
  SerialOps serial;
  test::TempDir tmp;
  const std::string dir = model_with_tokenizer(tmp, "qwen2_moe");
  auto m = Model::load(dir);
  const Tokenizer tok = Tokenizer::from_file(dir);
  EditOptions opt;
  const auto t1 = context_templates(*m, tok, opt), t2 = context_templates(*m, tok, opt);
  ASSERT_EQ(t1.size(), 21u);
  EXPECT_EQ(t1, t2);
  EXPECT_EQ(t1[0], "{}");
  for (const auto& t : t1) EXPECT_EQ(t.substr(t.size() - 2), "{}");
  opt.template_seed = 2;
  EXPECT_NE(context_templates(*m, tok, opt), t1);

  EditRequest req{"The capital of {} is", "North Land", "Paris", "Rome", {}, {}, ""};
  const EditIds ids = build_edit_ids(tok, req, {"{}", "Hi there. {}"}, "{} is a");
  // Character tokenizer: one token per character.
  EXPECT_EQ(ids.prompts[0].size(), std::string("The capital of North Land is").size());
  EXPECT_EQ(ids.subject_last[0], int(std::string("The capital of North Lan").size()));
  EXPECT_EQ(ids.subject_last[1], int(std::string("Hi there. The capital of North Lan").size()));
  EXPECT_EQ(ids.kl_subject_last, int(std::string("North Lan").size()));
  EXPECT_EQ(ids.target, tok.encode_ids(" Paris", false));
}

TEST(Edit, SaveReloadGivesBitIdenticalLogits) {
  SerialOps serial;
  for (const std::string fx : {"olmoe", "mixtral_fused", "qwen2_moe", "qwen2_moe_fused_norm", "deepseek_v1"}) {
    test::TempDir tmp;
    auto m = Model::load(fixture_model(fx));
    const int layer = fx == "qwen2_moe_fused_norm" ? 1 : fx == "deepseek_v1" ? 2 : 0;
    const std::string src_hash = [&] {
      std::string all;
      for (const auto& e : fs::directory_iterator(fixture_model(fx))) all += test::read_file(e.path().string());
      return hex64(hash_bytes(all.data(), all.size()));
    }();
    EditOptions opt;
    opt.layer = layer;
    opt.mom2_adjustment = false;
    opt.target = parse_edit_target(m->weights().layers[size_t(layer)].ffn.has_shared ? "shared" : "routed");
    std::vector<EditResult> edits = {apply_edit_ids(*m, fixed_ids(), opt)};
    const auto edited = edited_experts(edits);
    const auto dtypes = round_to_checkpoint_dtype(*m, fixture_model(fx), edited);
    save_edited_checkpoint(*m, fixture_model(fx), tmp / "out", edited);
    auto r = Model::load(tmp / "out");
    const auto seqs = fixed_ids().prompts;
    const ForwardOutput a = m->forward(seqs), b = r->forward(seqs);
    EXPECT_TRUE((a.logits.array() == b.logits.array()).all()) << fx;
    // Same names, dtypes, shapes; only the edited tensors' bytes differ; the source is untouched.
    TensorStore s0(fixture_model(fx)), s1(tmp / "out");
    ASSERT_EQ(s0.names(), s1.names());
    int changed = 0;
    for (const auto& n : s0.names()) {
      const auto &t0 = s0.get(n), &t1 = s1.get(n);
      EXPECT_EQ(t0.dtype, t1.dtype);
      EXPECT_EQ(t0.shape, t1.shape);
      changed += std::memcmp(t0.data, t1.data, t0.nbytes) != 0;
    }
    EXPECT_EQ(changed, int(std::set<std::string>{[&] {
                             std::set<std::string> s;
                             for (const auto& [l, e] : edited) s.insert(locate_down_proj(m->config(), s0, l, e).tensor);
                             return s;
                           }()}.size()))
        << fx;
    for (const auto& e : fs::directory_iterator(fixture_model(fx)))
      EXPECT_TRUE(fs::exists(tmp / ("out/" + e.path().filename().string()))) << e.path();
    std::string all;
    for (const auto& e : fs::directory_iterator(fixture_model(fx))) all += test::read_file(e.path().string());
    EXPECT_EQ(hex64(hash_bytes(all.data(), all.size())), src_hash);
    // Refuses to overwrite without --overwrite, and never the source.
    EXPECT_THROW(save_edited_checkpoint(*m, fixture_model(fx), tmp / "out", edited), InputError);
    save_edited_checkpoint(*m, fixture_model(fx), tmp / "out", edited, {true});
    EXPECT_THROW(save_edited_checkpoint(*m, fixture_model(fx), fixture_model(fx), edited, {true}), InputError);
    if (fx == "deepseek_v1") {  // both shared experts' slices live in (and are written to) one tensor
      EXPECT_EQ(edited.size(), 2u);
      EXPECT_EQ(changed, 1);
      EXPECT_EQ(locate_down_proj(m->config(), s1, layer, shared_expert_id(1)).tensor,
                "model.layers.2.mlp.shared_experts.down_proj.weight");
    }
    std::printf("  [save] %s: stored dtype %s, %d tensor(s) changed\n", fx.c_str(), dtypes.front().c_str(), changed);
  }
}

// ---- CLI -----------------------------------------------------------------------------------------------------------

TEST(EditCli, BadInputsExitWithCode2) {
  SerialOps serial;
  SerialCli serial_cli;
  test::TempDir tmp;
  const std::string dir = model_with_tokenizer(tmp, "qwen2_moe");
  const std::string base = "edit " + dir + " --no-mom2 --steps 2 ";
  struct Case {
    std::string args, needle;
  };
  const Case cases[] = {
      {"--subject France --prompt 'The capital of Spain is' --target-new Paris --layer 1", "not in the prompt"},
      {"--subject France --prompt '{} is in' --target-new '' --layer 1", "target"},
      {"--subject France --prompt '{} is in' --target-new Paris --layer 9", "out of range"},
      {"--subject France --prompt '{} is in' --target-new Paris --layer 2", "dense layer"},
      {"--subject France --prompt '{} is in' --target-new Paris --target 1:99", "does not exist"},
      {"--subject France --prompt '{} is in' --target-new Paris --target bogus --layer 1", "--target"},
      {"--requests " + tmp / "missing.json" + " --layer 1", "cannot be read"},
  };
  for (const Case& c : cases) {
    const auto r = test::run_cli(base + c.args);
    EXPECT_EQ(r.code, 2) << c.args << "\n" << r.err;
    EXPECT_NE(r.err.find(c.needle), std::string::npos) << c.args << "\n" << r.err;
  }
  test::write_file(tmp / "bad.json", "[{\"prompt\": \"{} is\", \"subject\": \"X\"}]");
  const auto r = test::run_cli(base + "--requests " + tmp / "bad.json" + " --layer 1");
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("target_new"), std::string::npos) << r.err;
}

TEST(EditCli, EditsReportsAndSaves) {
  SerialOps serial;
  SerialCli serial_cli;
  test::TempDir tmp;
  const std::string dir = model_with_tokenizer(tmp, "qwen2_moe");
  std::string corpus;
  for (int i = 0; i < 60; ++i)
    corpus += "Paragraph " + std::to_string(i) + ": the capital of a land is a city, and rivers run to the sea.\n";
  test::write_file(tmp / "corpus.txt", corpus);
  test::write_file(tmp / "reqs.json", R"([{"case_id": 7, "requested_rewrite": {"prompt": "The capital of {} is",
      "subject": "North Land", "target_new": {"str": "Paris"}, "target_true": {"str": "Rome"}},
      "paraphrase_prompts": ["Where is North Land? Its capital is"], "neighborhood_prompts": ["The capital of Italy is"]}])");
  const auto r = test::run_cli("edit " + dir + " --requests " + tmp / "reqs.json" +
                               " --layer 1 --target routed --json --save " + tmp / "saved" +
                               " --corpus " + tmp / "corpus.txt" + " --cache-dir " + tmp / "cache" +
                               " --stats-tokens 3000");
  ASSERT_EQ(r.code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  const auto& e = j["edits"][0];
  EXPECT_EQ(e["case_id"], "7");
  EXPECT_EQ(e["edit"]["layer"], 1);
  EXPECT_EQ(e["edit"]["updates"].size(), 3u);  // top-3 routed experts
  EXPECT_TRUE(e["report"]["rewrite"].contains("p_new"));
  EXPECT_EQ(e["report"]["paraphrases"].size(), 1u);
  EXPECT_EQ(e["report"]["neighborhood"][0]["routes_through_edited"], nullptr);  // subject absent there
  EXPECT_GT(e["report"]["rewrite"]["p_new"].get<double>(), e["pre"]["rewrite"]["p_new"].get<double>());
  EXPECT_TRUE(fs::exists(tmp / "saved/model.safetensors"));
  EXPECT_TRUE(fs::exists(tmp / "saved/tokenizer.json"));
  // The saved model reproduces the edited probabilities.
  auto saved = Model::load(tmp / "saved");
  const Tokenizer tok = Tokenizer::from_file(tmp / "saved");
  const auto sc = score_prompts(*saved, tok, {"The capital of North Land is"}, "North Land", "Paris", "Rome", 1, {});
  EXPECT_NEAR(sc[0].p_new, e["report"]["rewrite"]["p_new"].get<double>(), 1e-6);
}

}  // namespace
}  // namespace moedit

namespace moedit {
namespace {

// ---- cross-check against the PyTorch implementation ------------------------------------------------------------------

// One reference (tools/rome_reference.py --fixture NAME → edit/NAME_rome.safetensors): same experts, δ, loss curve and
// post-edit logits per target kind. n_shared: the shared experts the "shared" target must edit (one update each).
void cross_check(const std::string& name, int n_shared) {
  const std::string path = test::fixture("edit/" + name + "_rome.safetensors");
  SafeTensorsFile ref(path);
  ASSERT_EQ(ref.metadata().at("model"), "tests/fixtures/models/" + name);
  auto ints = [&](const std::string& n) {
    const auto f = ref.get(n).to_f32();
    return std::vector<int32_t>(f.begin(), f.end());
  };
  const int layer = std::stoi(ref.metadata().at("layer"));
  const int n_prompts = std::stoi(ref.metadata().at("n_prompts")), n_eval = std::stoi(ref.metadata().at("n_eval"));
  EditIds ids;
  for (int i = 0; i < n_prompts; ++i) ids.prompts.push_back(ints("prompts." + std::to_string(i)));
  ids.subject_last = ints("subject_last");
  ids.kl_prompt = ints("kl_prompt");
  ids.kl_subject_last = ints("kl_subject_last")[0];
  ids.target = ints("target");
  const auto& ct = ref.get("corpus");
  std::vector<std::vector<int32_t>> corpus;
  {
    const auto f = ct.to_f32();
    for (int64_t r = 0; r < ct.shape[0]; ++r)
      corpus.emplace_back(f.begin() + r * ct.shape[1], f.begin() + (r + 1) * ct.shape[1]);
  }
  auto m = Model::load(fixture_model(name));
  ASSERT_TRUE(m->weights().layers[size_t(layer)].ffn.moe) << "layer " << layer << " is dense";
  EditOptions opt;
  opt.layer = layer;
  opt.moments = moments_from(compute_key_stats(*m, layer, corpus));
  auto logits_of = [&](int i) { return m->forward({ints("eval." + std::to_string(i))}).logits; };
  auto ref_logits = [&](const std::string& n, int64_t rows) {
    MatR x(rows, m->config().vocab_size);
    ref.get(n).to_f32(x.data());
    return x;
  };
  for (int i = 0; i < n_eval; ++i) {
    const MatR got = logits_of(i), want = ref_logits("pre.logits." + std::to_string(i), got.rows());
    EXPECT_LE((got - want).cwiseAbs().maxCoeff(), 1e-4 * want.cwiseAbs().maxCoeff());
  }
  for (const std::string kind :
       {"dominant", "routed", "shared", "dominant_exact", "routed_exact", "shared_exact"}) {
    const bool exact = kind.size() > 6 && kind.substr(kind.size() - 6) == "_exact";
    opt.target = parse_edit_target(exact ? kind.substr(0, kind.size() - 6) : kind);
    opt.v.objective = exact ? VStarObjective::Exact : VStarObjective::Rome;
    EditResult r = apply_edit_ids(*m, ids, opt);
    // Same experts, same δ, same loss curve, same post-edit logits.
    const auto want_experts = ints(kind + ".experts");
    if (opt.target.kind == TargetKind::Shared) EXPECT_EQ(want_experts.size(), size_t(n_shared)) << kind;
    EXPECT_EQ(r.updates.size(), want_experts.size()) << kind;
    for (size_t i = 0; i < std::min(want_experts.size(), r.updates.size()); ++i)
      EXPECT_EQ(r.updates[i].expert, want_experts[i]) << kind << " update " << i;
    VecF wd(r.vstar.delta.size());
    ref.get(kind + ".delta").to_f32(wd.data());
    const double derr = (r.vstar.delta - wd).norm() / wd.norm();
    const auto wl = ref.get(kind + ".loss").to_f32();
    EXPECT_EQ(r.vstar.loss.size(), wl.size()) << kind;
    double lerr = 0;
    for (size_t i = 0; i < std::min(wl.size(), r.vstar.loss.size()); ++i)
      lerr = std::max(lerr, std::abs(r.vstar.loss[i] - wl[i]) / std::abs(wl[i]));
    double worst = 0;
    for (int i = 0; i < n_eval; ++i) {
      const MatR got = logits_of(i), want = ref_logits(kind + ".logits." + std::to_string(i), got.rows());
      worst = std::max(worst, double((got - want).cwiseAbs().maxCoeff() / want.cwiseAbs().maxCoeff()));
    }
    std::printf("  [xcheck] %s %s: delta rel err %.2e, loss curve max rel err %.2e, post-edit logits max rel err "
                "%.2e\n", name.c_str(), kind.c_str(), derr, lerr, worst);
    EXPECT_LE(derr, 1e-3) << kind;
    EXPECT_LE(lerr, 1e-4) << kind;
    EXPECT_LE(worst, 1e-3) << kind;
    revert(*m, r);
  }
}

// Qwen2-MoE (gated shared expert); DeepSeek-V2 (MLA, softmax router, 2 ungated shared experts: "shared" = two
// updates); DeepSeek-V3 (MLA with q_lora, interleaved RoPE, sigmoid router with selection bias, 1 shared expert).
// Layer 1 of each (an MoE layer: the DeepSeek fixtures' layer 0 is dense).
TEST(EditCrossCheck, MatchesPyTorchReference) {
  SerialOps serial;
  const std::pair<std::string, int> refs[] = {{"qwen2_moe", 1}, {"deepseek_v2", 2}, {"deepseek_v3", 1}};
  for (const auto& [name, n_shared] : refs) {
    SCOPED_TRACE(name);
    cross_check(name, n_shared);
  }
}

}  // namespace
}  // namespace moedit

namespace moedit {
namespace {

TEST(EditCli, AutoLayerPicksAnMoeLayerFromTheTrace) {
  SerialOps serial;
  SerialCli serial_cli;
  test::TempDir tmp;
  const std::string dir = model_with_tokenizer(tmp, "qwen2_moe");
  const auto r = test::run_cli("edit " + dir +
                               " --subject 'North Land' --prompt 'The capital of {} is' --target-new Paris"
                               " --target-true Rome --layer auto --no-mom2 --steps 3 --json");
  ASSERT_EQ(r.code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  const int l = j["edits"][0]["auto_layer"]["layer"].get<int>();
  EXPECT_NE(l, 2);  // layer 2 of this fixture is dense
  EXPECT_EQ(j["edits"][0]["edit"]["layer"].get<int>(), l);
  EXPECT_TRUE(j["edits"][0]["auto_layer"].contains("indirect_effect"));
}

}  // namespace
}  // namespace moedit

namespace moedit {
namespace {

// Tier 3: the bundled demo model (skipped when absent). A few CounterFact edits from the clean model: the target
// becomes more likely on the rewrite prompt, the MoE output moves by δ, neighbours keep their answer, revert is exact.
TEST(EditDemo, CounterFactEditsMoveTheTargetAndRevert) {
  SerialOps serial;
  const std::string dir = test::source_dir() + "/models/moedit-demo";
  if (!fs::exists(dir + "/config.json") || !fs::exists(dir + "/tokenizer.json"))
    GTEST_SKIP() << "demo model not present at " << dir;
  auto m = Model::load(dir);
  const Tokenizer tok = Tokenizer::from_file(dir);
  const int layer = 0;
  const std::string text = test::read_file(default_corpus_path());
  auto stats = compute_key_stats(*m, layer, corpus_windows(tok, text, 128, 16384));
  EditOptions opt;
  opt.layer = layer;
  opt.moments = moments_from(stats);
  const auto reqs = load_requests(test::source_dir() + "/datasets/data/counterfact/counterfact_preknown.json");
  std::vector<std::string> templates;
  const MatR logits0 = m->forward({tok.encode_ids("The mother tongue of Danielle Darrieux is")}).logits;
  int up = 0, neigh_ok = 0, neigh_n = 0;
  const int n = 4;
  for (int i = 0; i < n; ++i) {
    const EditRequest& rq = reqs[size_t(i)];
    EditResult probe;
    probe.layer = layer;
    const EditReport pre = report_edit(*m, tok, rq, probe);
    EditResult r = apply_edit(*m, tok, rq, opt, &templates);
    const EditReport post = report_edit(*m, tok, rq, r);
    up += post.rewrite.p_new > pre.rewrite.p_new;
    for (const auto& s : post.neighbors) {
      neigh_ok += s.nll_true < s.nll_new;
      ++neigh_n;
    }
    EXPECT_LT(r.vstar.loss.back(), r.vstar.loss.front()) << rq.subject;
    EXPECT_EQ(r.updates.size(), 1u);
    EXPECT_GT(r.template_route_share, 0.5);
    revert(*m, r);
  }
  EXPECT_EQ(templates.size(), 21u);
  EXPECT_EQ(up, n);
  EXPECT_GE(neigh_ok, int(0.9 * neigh_n));
  const MatR logits1 = m->forward({tok.encode_ids("The mother tongue of Danielle Darrieux is")}).logits;
  EXPECT_TRUE((logits0.array() == logits1.array()).all());
}

}  // namespace
}  // namespace moedit
