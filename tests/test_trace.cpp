// Causal tracing engine (tracing/trace): cached = naive restorations on every fixture family and on deep models, the
// restoration invariants (nothing → low, everything → high, every expert + shared → the MoE block), hand-computed
// expert restorations, token-row subsets, bad requests and noise-file round trips.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "io/errors.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"
#include "test_util.h"
#include "trace_util.h"
#include "tracing/trace.h"

namespace moedit {
namespace {

using namespace trace_test;
using trace::Kind;
using trace::Patch;
using trace::Restoration;

const char* kFixtures[] = {"granitemoe", "mixtral_fused", "mixtral_gqa", "olmoe", "olmoe_clip",
                           "qwen2_moe", "qwen2_moe_fused_norm", "qwen3_moe", "qwen3_moe_nonorm"};

// A prompt of n ids valid for the model.
std::vector<int32_t> prompt_ids(const Model& m, int n, int salt = 0) {
  std::vector<int32_t> ids;
  for (int i = 0; i < n; ++i) ids.push_back(int32_t((7 + 31 * i + 17 * salt + i * i) % m.config().vocab_size));
  return ids;
}

// That prompt as a trace input, the subject at tokens [begin, end).
trace::TraceInput prompt_input(const Model& m, int n, int salt, int begin, int end) {
  trace::TraceInput in;
  in.ids = prompt_ids(m, n, salt);
  in.subject_begin = begin;
  in.subject_end = end;
  return in;
}

double max_abs_diff(const trace::KindResult& a, const trace::KindResult& b) {
  double d = 0;
  EXPECT_EQ(a.scores.size(), b.scores.size());
  for (size_t i = 0; i < a.scores.size(); ++i)
    for (size_t l = 0; l < a.scores[i].size(); ++l) {
      const double x = a.scores[i][l], y = b.scores[i][l];
      EXPECT_EQ(std::isnan(x), std::isnan(y)) << "row " << i << " layer " << l;
      if (!std::isnan(x) && !std::isnan(y)) d = std::max(d, std::abs(x - y));
    }
  EXPECT_EQ(a.experts.size(), b.experts.size());
  for (size_t i = 0; i < std::min(a.experts.size(), b.experts.size()); ++i) {
    EXPECT_EQ(a.experts[i].expert, b.experts[i].expert);
    d = std::max(d, std::abs(a.experts[i].score - b.experts[i].score));
  }
  EXPECT_EQ(a.shared_experts.size(), b.shared_experts.size());
  for (size_t i = 0; i < std::min(a.shared_experts.size(), b.shared_experts.size()); ++i) {
    EXPECT_EQ(a.shared_experts[i].expert, b.shared_experts[i].expert);
    d = std::max(d, std::abs(a.shared_experts[i].score - b.shared_experts[i].score));
  }
  // The dominant expert of one run is a best expert of the other (ties — experts that restore nothing — may
  // break differently under float rounding).
  EXPECT_EQ(a.dominant.size(), b.dominant.size());
  for (size_t i = 0; i < a.experts.size() && i < b.experts.size(); ++i) {
    const trace::ExpertScore& x = a.experts[i];
    const size_t row = size_t(std::find(a.rows.begin(), a.rows.end(), x.token) - a.rows.begin());
    if (a.dominant[row][size_t(x.layer)] == x.expert)
      EXPECT_GE(b.experts[i].score, b.scores[row][size_t(x.layer)] - 1e-6) << "token " << x.token << " layer " << x.layer;
  }
  return d;
}

// ------------------------------------------------------------------------------------------- cached = naive

TEST(Trace, CachedEqualsNaiveOnEveryFixtureAndKind) {
  const OneThread one_thread;
  std::vector<std::string> fixtures(std::begin(kFixtures), std::end(kFixtures));
  fixtures.insert(fixtures.end(), {"deepseek_v1", "deepseek_v2"});  // two shared experts: each restored alone too
  for (const std::string& fx : fixtures) {
    auto m = fixture_model(fx);
    trace::TraceInput in = prompt_input(*m, 9, 1, 1, 4);
    trace::TraceOptions o;
    o.samples = 4;
    o.window = 2;
    o.expert_all_tokens = fx == "qwen2_moe";
    o.batch_rows = 100;  // several batches with mixed start layers/tokens
    const trace::TraceReport c = trace::trace_ids(*m, in, o);
    o.naive = true;
    const trace::TraceReport n = trace::trace_ids(*m, in, o);
    EXPECT_EQ(c.kinds.size(), n.kinds.size());
    EXPECT_EQ(c.low_score, n.low_score);
    // Bit for bit (batch-invariant kernels), except the routed-expert kind: the naive run restores an expert as
    // moe_out − corrupted + clean, which rounds even where the two are equal (tokens before the subject), while the
    // cached run skips those cells (seen: 1.3e-9).
    for (size_t k = 0; k < c.kinds.size(); ++k)
      EXPECT_LE(max_abs_diff(c.kinds[k], n.kinds[k]), c.kinds[k].kind == Kind::Expert ? 1e-6 : 0.0)
          << fx << " " << trace::kind_name(c.kinds[k].kind);
    // Shared appears exactly for the Qwen2-MoE and DeepSeek fixtures; each of DeepSeek's 2 shared experts is also
    // restored alone at every (token, MoE layer) cell.
    const trace::KindResult* sh = c.find(Kind::Shared);
    EXPECT_EQ(sh != nullptr, fx.rfind("qwen2", 0) == 0 || fx.rfind("deepseek", 0) == 0) << fx;
    if (sh)
      EXPECT_EQ(sh->shared_experts.size(),
                fx.rfind("deepseek", 0) == 0 ? 9u * size_t(m->config().n_moe_layers()) * 2u : 0u)
          << fx;
  }
}

// Deeper random models: the window (10, ROME's centring) clips at both ends of 12 layers; a sliding window and
// Granite's multipliers; a 12-token prompt with the subject in the middle.
ModelConfig deep_config(const std::string& type) {
  nlohmann::json j = {{"model_type", type},       {"vocab_size", 61},        {"hidden_size", 32},
                      {"num_hidden_layers", 12},  {"num_attention_heads", 4}, {"num_key_value_heads", 2},
                      {"intermediate_size", 24},  {"moe_intermediate_size", 16}, {"num_experts_per_tok", 2},
                      {"num_local_experts", 5},   {"num_experts", 5},        {"rms_norm_eps", 1e-6}};
  if (type == "qwen2_moe") {
    j["shared_expert_intermediate_size"] = 20;
    j["mlp_only_layers"] = {3};
  }
  if (type == "mixtral") j["sliding_window"] = 6;
  if (type == "granitemoe") {
    j["embedding_multiplier"] = 2.0;
    j["residual_multiplier"] = 0.5;
    j["attention_multiplier"] = 0.2;
    j["logits_scaling"] = 0.5;
  }
  return parse_config(j, type + ".json");
}

TEST(Trace, CachedEqualsNaiveOnDeepModelsWithDefaultWindow) {
  const OneThread one_thread;
  for (const char* fam : {"qwen2_moe", "mixtral", "granitemoe"}) {
    const ModelConfig cfg = deep_config(fam);
    Model m(cfg, random_weights(cfg, 11, 0.35f));
    trace::TraceInput in = prompt_input(m, 12, 2, 3, 6);
    trace::TraceOptions o;
    o.samples = 2;
    o.noise = "s4";
    if (std::string(fam) == "qwen2_moe")
      o.kinds = {Kind::Resid, Kind::Attn, Kind::Moe, Kind::Expert, Kind::Shared};
    else
      o.kinds = {Kind::Resid, Kind::Moe, Kind::Expert};
    const trace::TraceReport c = trace::trace_ids(m, in, o);
    o.naive = true;
    const trace::TraceReport n = trace::trace_ids(m, in, o);
    for (size_t k = 0; k < c.kinds.size(); ++k)
      EXPECT_EQ(max_abs_diff(c.kinds[k], n.kinds[k]), 0.0) << fam << " " << trace::kind_name(c.kinds[k].kind);
    EXPECT_GT(c.high_score - c.low_score, 0.01) << fam << ": the corruption should matter";
    // Caching must pay: fewer FLOPs for the same restorations.
    EXPECT_LT(c.stats.flops, 0.6 * n.stats.flops) << fam;
    EXPECT_EQ(c.stats.restorations, n.stats.restorations);
    EXPECT_LT(c.stats.computed, c.stats.restorations) << fam;  // pruned: tokens before the subject, last layer
    EXPECT_GT(c.stats.shared_prefixes, 0) << fam;               // windows clipped at layer 0 share layers 0..4
    EXPECT_EQ(n.stats.computed, n.stats.restorations);
    if (std::string(fam) == "qwen2_moe") {  // pure prefix caching, no pruning, equals naive too
      o.naive = false;
      o.prune = false;
      const trace::TraceReport u = trace::trace_ids(m, in, o);
      EXPECT_EQ(u.stats.computed, u.stats.restorations);
      for (size_t k = 0; k < u.kinds.size(); ++k)
        EXPECT_EQ(max_abs_diff(u.kinds[k], n.kinds[k]), 0.0)
            << fam << " unpruned " << trace::kind_name(u.kinds[k].kind);
    }
  }
}

// ------------------------------------------------------------------------------------------------ invariants

trace::Tracer make_tracer(const Model& m, const std::vector<int32_t>& ids, int b, int e, int samples) {
  const double sd = trace::embedding_std(m, {std::vector<int32_t>(ids.begin() + b, ids.begin() + e)});
  return trace::Tracer(m, ids, b, e, trace::make_noise(trace::parse_noise_rule("s3"), sd, samples, e - b,
                                                       m.config().hidden, 1),
                       false);
}

TEST(Trace, NothingGivesLowEverythingGivesHigh) {
  const OneThread one_thread;
  for (const char* fx : {"qwen2_moe", "granitemoe", "mixtral_fused"}) {
    auto m = fixture_model(fx);
    const std::vector<int32_t> ids = prompt_ids(*m, 8, 3);
    const int S = 8, L = m->config().n_layers;
    trace::Tracer tr = make_tracer(*m, ids, 2, 5, 5);
    Restoration all_first, all_last, embed_like;
    for (int t = 0; t < S; ++t) {
      all_first.push_back({Kind::Resid, t, 0});
      all_last.push_back({Kind::Resid, t, L - 1});
    }
    // Everything at once: every layer-0 hidden state, every attention and every MoE output.
    Restoration every = all_first;
    for (int t = 0; t < S; ++t)
      for (int l = 0; l < L; ++l) {
        every.push_back({Kind::Attn, t, l});
        every.push_back({Kind::Moe, t, l});
      }
    for (bool naive : {false, true}) {
      const std::vector<double> p = tr.run({{}, all_first, all_last, {{Kind::Resid, S - 1, L - 1}}, every}, naive);
      EXPECT_EQ(p[0], tr.low_score()) << fx;  // batch mates change nothing (batch-invariant kernels)
      EXPECT_NEAR(p[1], tr.high_score(), 1e-6) << fx;
      EXPECT_NEAR(p[2], tr.high_score(), 1e-6) << fx;
      EXPECT_NEAR(p[3], tr.high_score(), 1e-6) << fx;
      EXPECT_NEAR(p[4], tr.high_score(), 1e-6) << fx;
      EXPECT_GT(tr.high_score() - tr.low_score(), 0.02) << fx;
    }
    EXPECT_EQ(tr.run({{}}, false)[0], tr.low_score()) << fx;  // alone: the cached corrupted run itself
  }
}

TEST(Trace, EveryExpertPlusSharedEqualsTheMoeBlock) {
  const OneThread one_thread;
  for (const char* fx : {"qwen2_moe", "qwen3_moe_nonorm", "olmoe"}) {
    auto m = fixture_model(fx);
    const ModelConfig& c = m->config();
    const std::vector<int32_t> ids = prompt_ids(*m, 9, 4);
    trace::Tracer tr = make_tracer(*m, ids, 1, 4, 6);
    std::vector<Restoration> rs;
    int pairs = 0;
    for (int t : {3, 5, 8})
      for (int l = 0; l < c.n_layers; ++l) {
        const FFNWeights& w = m->weights().layers[size_t(l)].ffn;
        if (!w.moe) continue;
        Restoration r;
        for (int e = 0; e < c.n_experts; ++e) r.push_back({Kind::Expert, t, l, e});
        if (w.has_shared) r.push_back({Kind::Shared, t, l});
        rs.push_back(r);
        rs.push_back({{Kind::Moe, t, l}});
        // Clean-routed experts only is *not* the block: the corrupted run's other experts stay.
        ++pairs;
      }
    for (bool naive : {false, true}) {
      const std::vector<double> p = tr.run(rs, naive);
      double d = 0, spread = 0;
      for (size_t i = 0; i < p.size(); i += 2) {
        d = std::max(d, std::abs(p[i] - p[i + 1]));
        spread = std::max(spread, std::abs(p[i + 1] - tr.low_score()));
      }
      EXPECT_LE(d, 1e-6) << fx;
      EXPECT_GT(spread, 1e-3) << fx << ": restorations should move p(answer)";
    }
    EXPECT_GT(pairs, 2);
  }
}

// Several shared experts (DeepSeek, 2 of width 12 side by side in one MLP): the per-expert hook points split the
// shared output exactly (hand computation in double), capturing them leaves the forward bit-identical, and restoring
// every shared expert alone at once equals restoring the shared block (and, with every routed expert, the MoE
// block) in both modes, while one shared expert alone is a different restoration.
TEST(Trace, SharedExpertsOneByOneTogetherEqualTheSharedBlock) {
  const OneThread one_thread;
  for (const char* fx : {"deepseek_v1", "deepseek_v2"}) {
    auto m = fixture_model(fx);
    const ModelConfig& c = m->config();
    ASSERT_EQ(c.n_shared_experts, 2) << fx;
    const std::vector<int32_t> ids = prompt_ids(*m, 9, 4);
    int l0 = 0;
    while (!c.is_moe(l0)) ++l0;
    Hooks h;
    auto in = h.capture(hook_names::resid_pre(l0));
    auto att = h.capture(hook_names::attn_out(l0));
    auto whole = h.capture(hook_names::shared_out(l0));
    auto s0 = h.capture(hook_names::shared_expert_out(l0, 0)), s1 = h.capture(hook_names::shared_expert_out(l0, 1));
    ForwardOptions fo;
    fo.hooks = &h;
    const MatR hooked = m->forward({ids}, fo).logits, plain = m->forward({ids}).logits;
    EXPECT_TRUE((hooked.array() == plain.array()).all()) << fx;
    // By hand: a = post-attention norm of the residual, key = silu(gate a) ⊙ up a, out_j = W_down[:, j]·key[j].
    const FFNWeights& f = m->weights().layers[size_t(l0)].ffn;
    const int H = c.hidden, W = f.shared.I;
    MatR x = in->value + att->value, a(x.rows(), H);
    ops::rmsnorm(x.data(), m->weights().layers[size_t(l0)].ln_post.data(), a.data(), int(x.rows()), H, c.rms_eps);
    const Eigen::MatrixXd g = a.cast<double>() * f.shared.gate[0].to_f32().cast<double>().transpose();
    const Eigen::MatrixXd u = a.cast<double>() * f.shared.up[0].to_f32().cast<double>().transpose();
    const Eigen::MatrixXd key = (g.array() / (1 + (-g.array()).exp())) * u.array();
    const Eigen::MatrixXd dn = f.shared.down[0].to_f32().cast<double>();
    ASSERT_EQ(dn.rows(), H);
    ASSERT_EQ(dn.cols(), W);
    for (int j = 0; j < 2; ++j) {
      const auto [b, e] = c.shared_slice(j);
      const Eigen::MatrixXd want = key.middleCols(b, e - b) * dn.middleCols(b, e - b).transpose();
      const MatR& got = (j == 0 ? s0 : s1)->value;
      EXPECT_LE((got.cast<double>() - want).norm(), 1e-5 * want.norm()) << fx << " shared expert " << j;
    }
    EXPECT_LE((s0->value + s1->value - whole->value).norm(), 1e-5 * whole->value.norm()) << fx;

    trace::Tracer tr = make_tracer(*m, ids, 1, 4, 6);
    std::vector<Restoration> rs;
    for (int t : {3, 5, 8})
      for (int l = 0; l < c.n_layers; ++l) {
        if (!c.is_moe(l)) continue;
        Restoration every;
        for (int e = 0; e < c.n_experts; ++e) every.push_back({Kind::Expert, t, l, e});
        every.push_back({Kind::Shared, t, l, 0});
        every.push_back({Kind::Shared, t, l, 1});
        rs.push_back({{Kind::Shared, t, l, 0}, {Kind::Shared, t, l, 1}});
        rs.push_back({{Kind::Shared, t, l}});
        rs.push_back(every);
        rs.push_back({{Kind::Moe, t, l}});
        rs.push_back({{Kind::Shared, t, l, 0}});
      }
    for (bool naive : {false, true}) {
      const std::vector<double> p = tr.run(rs, naive);
      double d = 0, spread = 0, alone = 0;
      for (size_t i = 0; i < p.size(); i += 5) {
        d = std::max({d, std::abs(p[i] - p[i + 1]), std::abs(p[i + 2] - p[i + 3])});
        spread = std::max(spread, std::abs(p[i + 1] - tr.low_score()));
        alone = std::max(alone, std::abs(p[i + 4] - p[i + 1]));
      }
      std::printf("  [shared experts] %s %s: |both alone - block| <= %.1e, block moves p by up to %.3f, "
                  "expert 0 alone differs by up to %.3f\n", fx, naive ? "naive" : "cached", d, spread, alone);
      EXPECT_LE(d, 1e-6) << fx;
      EXPECT_GT(spread, 1e-3) << fx << ": restorations should move p(answer)";
      EXPECT_GT(alone, 1e-4) << fx << ": one shared expert alone is not the block";
    }
    EXPECT_THROW(tr.run({{{Kind::Shared, 3, l0, 2}}}, false), InputError);  // only 2 shared experts
  }
  // Reported: trace_shared.json lists every shared expert alone; the per-expert bars show them next to "shared".
  auto m = fixture_model("deepseek_v1");
  trace::TraceOptions o{.kinds = {Kind::Expert, Kind::Shared}, .samples = 3};
  const trace::TraceReport r =
      trace::trace_ids(*m, {.ids = prompt_ids(*m, 6, 2), .subject_begin = 1, .subject_end = 3}, o);
  test::TempDir tmp;
  trace::write_trace_outputs(r, tmp.path.string());
  const nlohmann::json js = nlohmann::json::parse(test::read_file(tmp / "trace_shared.json"));
  EXPECT_EQ(js["n_shared_experts"], 2);
  ASSERT_EQ(js["shared_experts"].size(), 6u * 2u * 2u);  // 6 tokens × 2 MoE layers × 2 shared experts
  const nlohmann::json& e = js["shared_experts"][3];
  EXPECT_EQ(e["expert"], 1);
  EXPECT_DOUBLE_EQ(e["score"].get<double>(), r.find(Kind::Shared)->shared_experts[3].score);
  const std::string bars = test::read_file(tmp / "trace_expert.svg");
  EXPECT_NE(bars.find("shared expert 1 alone: p="), std::string::npos);
  EXPECT_NE(bars.find(">s0<"), std::string::npos);
  // Dataset mode: per MoE layer, the average indirect effect of each shared expert alone (one fact: its own).
  const Tokenizer tok = char_tokenizer();
  test::write_file(tmp / "cf.json", R"([{"case_id": 3, "requested_rewrite": {"prompt": "{} had a home in",
      "subject": "Ann Lee", "target_true": {"str": "Nice"}}}])");  // characters < 112, the fixture's vocabulary
  trace::DatasetOptions d;
  d.out_dir = tmp / "out";
  d.only_correct = false;
  d.plots = 0;
  const trace::DatasetSummary ds = trace::trace_dataset(*m, tok, tmp / "cf.json", o, d);
  ASSERT_EQ(ds.traced, 1) << ds.json["skipped"];
  const nlohmann::json fact = nlohmann::json::parse(test::read_file(tmp / "out/cases/3_shared.json"));
  const int last_subject = fact["subject_range"][1].get<int>() - 1;
  int checked = 0;
  for (const auto& row : ds.json["expert_last_subject"]) {
    ASSERT_EQ(row["shared_expert_aie"].size(), 2u);
    for (const auto& x : fact["shared_experts"])
      if (x["token"] == last_subject && x["layer"] == row["layer"]) {
        EXPECT_NEAR(row["shared_expert_aie"][x["expert"].get<size_t>()].get<double>(),
                    x["score"].get<double>() - fact["low_score"].get<double>(), 1e-12);
        ++checked;
      }
  }
  EXPECT_EQ(checked, 4);  // 2 MoE layers × 2 shared experts
}

// The expert restoration, recomputed by hand at the last layer: final residual = corrupted final residual +
// (clean − corrupted contribution of e) × residual multiplier.
TEST(Trace, ExpertRestorationMatchesHandComputation) {
  const OneThread one_thread;
  auto m = fixture_model("granitemoe");  // residual multiplier 0.3
  const ModelConfig& c = m->config();
  const std::vector<int32_t> ids = prompt_ids(*m, 7, 5);
  const int S = 7, L = c.n_layers, b = 1, e = 3, N = 4;
  const double sd = trace::embedding_std(*m, {std::vector<int32_t>(ids.begin() + b, ids.begin() + e)});
  const trace::Noise noise = trace::make_noise(trace::parse_noise_rule("s3"), sd, N, e - b, c.hidden, 1);
  trace::Tracer tr(*m, ids, b, e, noise, false);
  // Corrupted run with captures of every expert's output at the last layer.
  Hooks h;
  h.add(hook_names::embed(), [&](Eigen::Ref<MatR> act, const HookContext& ctx) {
    for (int i = 0; i < int(act.rows()); ++i)
      if (ctx.layout.pos[size_t(i)] >= b && ctx.layout.pos[size_t(i)] < e)
        act.row(i) += noise[size_t(ctx.layout.seq[size_t(i)])].row(ctx.layout.pos[size_t(i)] - b);
  });
  std::vector<std::shared_ptr<Hooks::Capture>> caps;
  for (int x = 0; x < c.n_experts; ++x) caps.push_back(h.capture(hook_names::expert_out(L - 1, x)));
  ForwardOptions fo;
  fo.hooks = &h;
  ForwardOutput f = m->forward(std::vector<std::vector<int32_t>>(size_t(N), ids), fo);
  int tested = 0;
  for (int x = 0; x < c.n_experts; ++x) {
    const float* clean = tr.clean_expert_row(L - 1, x, S - 1);
    MatR last(N, c.hidden);
    for (int n = 0; n < N; ++n) {
      last.row(n) = f.hidden.row(n * S + S - 1);
      Eigen::RowVectorXf delta = Eigen::RowVectorXf::Zero(c.hidden);
      if (clean) delta += Eigen::Map<const Eigen::RowVectorXf>(clean, c.hidden);
      const auto& cap = caps[size_t(x)];
      for (int r = 0; r < int(cap->tokens.size()); ++r)
        if (cap->tokens[size_t(r)] == n * S + S - 1) delta -= cap->value.row(r);
      last.row(n) += c.residual_multiplier * delta;
    }
    TokenLayout ll = make_layout(std::vector<std::vector<int32_t>>(size_t(N), {0}), nullptr);
    const MatR z = m->logits(last, ll, nullptr);
    double want = 0;
    for (int n = 0; n < N; ++n) {
      const Eigen::VectorXd zz = z.row(n).transpose().cast<double>();
      want += std::exp(zz[tr.answer()] - zz.maxCoeff()) / (zz.array() - zz.maxCoeff()).exp().sum();
    }
    want /= N;
    for (bool naive : {false, true}) {
      const double got = tr.run({{{Kind::Expert, S - 1, L - 1, x}}}, naive)[0];
      EXPECT_NEAR(got, want, 1e-6) << "expert " << x;
    }
    ++tested;
  }
  EXPECT_EQ(tested, c.n_experts);
}

TEST(Trace, TokenRowsSubsetEqualsTheFullTrace) {
  const OneThread one_thread;
  auto m = fixture_model("qwen2_moe");
  trace::TraceInput in = prompt_input(*m, 9, 8, 2, 5);
  trace::TraceOptions o;
  o.samples = 3;
  o.window = 2;
  o.kinds = {Kind::Resid, Kind::Moe, Kind::Shared, Kind::Expert};
  const trace::TraceReport full = trace::trace_ids(*m, in, o);
  o.tokens = {8, 4, 4};
  const trace::TraceReport part = trace::trace_ids(*m, in, o);
  for (size_t k = 0; k < part.kinds.size(); ++k) {
    const trace::KindResult &a = part.kinds[k], &b = full.kinds[k];
    if (a.kind == Kind::Expert) {
      EXPECT_EQ(a.rows, b.rows);
      continue;
    }
    ASSERT_EQ(a.rows, (std::vector<int>{4, 8}));
    for (size_t i = 0; i < 2; ++i)
      for (int l = 0; l < m->config().n_layers; ++l) {
        const double x = a.scores[i][size_t(l)], y = b.scores[size_t(a.rows[i])][size_t(l)];
        if (std::isnan(y)) EXPECT_TRUE(std::isnan(x));
        else EXPECT_NEAR(x, y, 1e-7) << trace::kind_name(a.kind);
      }
  }
  o.tokens = {9};
  EXPECT_THROW(trace::trace_ids(*m, in, o), InputError);
  test::TempDir tmp;  // outputs still render with a row subset
  EXPECT_NO_THROW(trace::write_trace_outputs(part, tmp.path.string()));
}

TEST(Trace, BadRequestsAreInputErrors) {
  const OneThread one_thread;
  auto m = fixture_model("qwen2_moe");
  trace::TraceInput in = prompt_input(*m, 6, 0, 4, 9);
  EXPECT_THROW(trace::trace_ids(*m, in, {}), InputError);
  in.subject_end = 4;
  EXPECT_THROW(trace::trace_ids(*m, in, {}), InputError);
  in.subject_end = 5;
  in.target = 100000;
  EXPECT_THROW(trace::trace_ids(*m, in, {}), InputError);
  in.target = -1;
  trace::TraceOptions o;
  o.noise_file = "/nonexistent/noise.safetensors";
  EXPECT_THROW(trace::trace_ids(*m, in, o), InputError);
  trace::Tracer tr = make_tracer(*m, in.ids, 4, 5, 2);
  EXPECT_THROW(tr.run({{{Kind::Shared, 0, 2}}}, false), InputError);  // layer 2 is dense in this fixture
  EXPECT_THROW(tr.run({{{Kind::Expert, 0, 0, 8}}}, false), InputError);
  EXPECT_THROW(tr.run({{{Kind::Resid, 6, 0}}}, false), InputError);
}

TEST(Trace, NoiseFileRoundTripGivesTheSameTrace) {
  const OneThread one_thread;
  auto m = fixture_model("olmoe_clip");
  test::TempDir tmp;
  trace::TraceInput in = prompt_input(*m, 7, 6, 2, 4);
  trace::TraceOptions o;
  o.samples = 3;
  o.kinds = {Kind::Resid, Kind::Expert};
  const trace::TraceReport a = trace::trace_ids(*m, in, o);
  const trace::Noise n = trace::make_noise(trace::parse_noise_rule("s3"), a.embedding_std, 3, 2, m->config().hidden, 1);
  trace::save_noise_file(tmp / "noise.safetensors", n);
  o.noise_file = tmp / "noise.safetensors";
  const trace::TraceReport b = trace::trace_ids(*m, in, o);
  for (size_t k = 0; k < a.kinds.size(); ++k) EXPECT_EQ(max_abs_diff(a.kinds[k], b.kinds[k]), 0.0);
  // Wrong subject length for the file.
  in.subject_end = 5;
  EXPECT_THROW(trace::trace_ids(*m, in, o), InputError);
}

}  // namespace
}  // namespace moedit
