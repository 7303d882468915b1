// Causal tracing: ROME's noise generator reproduced bit for bit, cached = naive restorations on every fixture family,
// agreement with an independent HF-transformers implementation (tools/trace_reference.py → tests/fixtures/trace/),
// the restoration invariants (nothing → low, everything → high, every expert + shared → the MoE block), the text
// path (subject lookup through offsets), outputs, dataset mode and the CLI.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "io/errors.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"
#include "test_util.h"
#include "tracing/trace.h"

namespace moedit {
namespace {

using trace::Kind;
using trace::Patch;
using trace::Restoration;

const char* kFixtures[] = {"granitemoe", "mixtral_fused", "mixtral_gqa", "olmoe", "olmoe_clip",
                           "qwen2_moe", "qwen2_moe_fused_norm", "qwen3_moe", "qwen3_moe_nonorm"};

std::shared_ptr<Model> fixture_model(const std::string& name) { return Model::load(test::fixture("models/" + name)); }

// A prompt of n ids valid for the model.
std::vector<int32_t> prompt_ids(const Model& m, int n, int salt = 0) {
  std::vector<int32_t> ids;
  for (int i = 0; i < n; ++i) ids.push_back(int32_t((7 + 31 * i + 17 * salt + i * i) % m.config().vocab_size));
  return ids;
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

// Tiny models on a shared machine: one thread avoids OpenMP barrier stalls (the results do not depend on it).
struct OneThread {
  int ops_prev = ops::num_threads(), omp_prev = omp_get_max_threads();
  OneThread() {
    ops::set_num_threads(1);
    omp_set_num_threads(1);
  }
  ~OneThread() {
    ops::set_num_threads(ops_prev);
    omp_set_num_threads(omp_prev);
  }
};

// ---------------------------------------------------------------------------------------------------- noise

TEST(TraceNoise, NumpyRandomStateIsReproducedBitForBit) {
  const OneThread one_thread;
  // numpy.random.RandomState(1).randn(7) and RandomState(7).uniform(-1, 1, 3) (numpy 2.4.6; the legacy stream is
  // frozen by numpy's compatibility policy).
  const double randn1[7] = {1.6243453636632417, -0.6117564136500754, -0.5281717522634557, -1.0729686221561705,
                            0.8654076293246785, -2.3015386968802827, 1.74481176421648};
  trace::NumpyRandomState rs(1);
  for (double want : randn1) EXPECT_EQ(rs.gauss(), want);
  const double unif7[3] = {-0.8473834212520857, 0.5598375844802292, -0.123181537118213};
  trace::NumpyRandomState ru(7);
  for (double want : unif7) EXPECT_EQ(ru.uniform(-1, 1), want);
  trace::NumpyRandomState r2(12345);
  EXPECT_EQ(r2.gauss(), -0.20470765948471295);
}

TEST(TraceNoise, RulesAndKinds) {
  const OneThread one_thread;
  auto r = trace::parse_noise_rule("s3");
  EXPECT_EQ(r.type, trace::NoiseRule::ScaledStd);
  EXPECT_EQ(r.value, 3.0);
  EXPECT_EQ(trace::parse_noise_rule("s").value, 1.0);
  r = trace::parse_noise_rule("0.025");
  EXPECT_EQ(r.type, trace::NoiseRule::Fixed);
  EXPECT_DOUBLE_EQ(r.value, 0.025);
  r = trace::parse_noise_rule("u0.5");
  EXPECT_EQ(r.type, trace::NoiseRule::Uniform);
  EXPECT_THROW(trace::parse_noise_rule("x3"), InputError);
  EXPECT_THROW(trace::parse_noise_rule("s-1"), InputError);
  EXPECT_THROW(trace::parse_noise_rule(""), InputError);
  EXPECT_EQ(trace::parse_kinds("resid,mlp,attn,resid"), (std::vector<Kind>{Kind::Resid, Kind::Moe, Kind::Attn}));
  EXPECT_EQ(trace::parse_kinds("all").size(), 5u);
  EXPECT_THROW(trace::parse_kinds("resid,bogus"), InputError);
}

TEST(TraceNoise, ScaledNoiseIsSigmaTimesRandn) {
  const OneThread one_thread;
  const trace::Noise n = trace::make_noise(trace::parse_noise_rule("s3"), 0.5, 2, 3, 4, 1);
  ASSERT_EQ(n.size(), 2u);
  trace::NumpyRandomState rs(1);
  for (int s = 0; s < 2; ++s)
    for (int i = 0; i < 3; ++i)
      for (int h = 0; h < 4; ++h) EXPECT_EQ(n[size_t(s)](i, h), float(1.5 * rs.gauss()));
  const trace::Noise u = trace::make_noise(trace::parse_noise_rule("u0.25"), 0, 1, 2, 2, 7);
  EXPECT_FLOAT_EQ(u[0](0, 0), float(0.25 * -0.8473834212520857));
}

TEST(TraceNoise, EmbeddingStdIsRomesUnbiasedStd) {
  const OneThread one_thread;
  auto m = fixture_model("qwen2_moe");
  const std::vector<std::vector<int32_t>> lists = {{3, 88}, {42}};
  double sum = 0, sq = 0;
  int n = 0;
  for (const auto& l : lists)
    for (int id : l)
      for (int h = 0; h < m->config().hidden; ++h) {
        const double x = m->weights().embed(id, h);
        sum += x;
        ++n;
      }
  const double mean = sum / n;
  for (const auto& l : lists)
    for (int id : l)
      for (int h = 0; h < m->config().hidden; ++h) sq += std::pow(m->weights().embed(id, h) - mean, 2);
  EXPECT_NEAR(trace::embedding_std(*m, lists), std::sqrt(sq / (n - 1)), 1e-12);
}

// ---------------------------------------------------------------------------------- cross-check with HF

// tests/fixtures/trace/<fixture>/{reference.json, noise.safetensors}: tools/trace_reference.py, HF float64.
TEST(Trace, MatchesTransformersReference) {
  const OneThread one_thread;
  int checked = 0;
  for (const auto& dir : std::filesystem::directory_iterator(test::fixture("trace"))) {
    if (!dir.is_directory()) continue;
    const std::string name = dir.path().filename().string();
    const nlohmann::json ref = nlohmann::json::parse(test::read_file((dir.path() / "reference.json").string()));
    auto m = fixture_model(name);
    trace::TraceInput in;
    in.ids = ref["ids"].get<std::vector<int32_t>>();
    in.subject_begin = ref["subject_range"][0];
    in.subject_end = ref["subject_range"][1];
    trace::TraceOptions o;
    o.noise_file = (dir.path() / "noise.safetensors").string();
    o.window = ref["window"];
    // The noise file is the one HF used; moedit's own generator must reproduce it from the same rule and seed.
    const trace::Noise file_noise = trace::load_noise_file(o.noise_file, in.subject_end - in.subject_begin,
                                                           m->config().hidden);
    ASSERT_EQ(int(file_noise.size()), ref["samples"].get<int>());
    double sd = ref["embedding_std"];
    const trace::Noise mine = trace::make_noise(trace::parse_noise_rule(ref["noise_rule"]), sd,
                                                int(file_noise.size()), in.subject_end - in.subject_begin,
                                                m->config().hidden, ref["seed"]);
    double nd = 0;
    for (size_t s = 0; s < mine.size(); ++s) nd = std::max(nd, double((mine[s] - file_noise[s]).cwiseAbs().maxCoeff()));
    EXPECT_LE(nd, 1e-6 * file_noise[0].cwiseAbs().maxCoeff()) << name << ": built-in noise differs from numpy's";
    const double std_mine = trace::embedding_std(
        *m, {std::vector<int32_t>(in.ids.begin() + in.subject_begin, in.ids.begin() + in.subject_end)});
    EXPECT_NEAR(std_mine, sd, 1e-9 * sd) << name;

    for (bool naive : {false, true}) {
      o.naive = naive;
      const trace::TraceReport r = trace::trace_ids(*m, in, o);
      EXPECT_EQ(r.answer, ref["answer"].get<int>()) << name;
      double err = std::max(std::abs(r.high_score - ref["high_score"].get<double>()),
                            std::abs(r.low_score - ref["low_score"].get<double>()));
      int cells = 0;
      for (const auto& [kname, kref] : ref["kinds"].items()) {
        const trace::KindResult* k = r.find(trace::parse_kind(kname));
        ASSERT_NE(k, nullptr) << name << " " << kname;
        if (kname == "expert") {
          ASSERT_EQ(k->experts.size(), kref.size()) << name;
          for (const auto& x : kref) {
            auto it = std::find_if(k->experts.begin(), k->experts.end(), [&](const trace::ExpertScore& e) {
              return e.token == x["token"].get<int>() && e.layer == x["layer"].get<int>() &&
                     e.expert == x["expert"].get<int>();
            });
            ASSERT_NE(it, k->experts.end()) << name << " expert " << x.dump();
            err = std::max(err, std::abs(it->score - x["score"].get<double>()));
            ++cells;
          }
          continue;
        }
        for (size_t t = 0; t < kref.size(); ++t)
          for (size_t l = 0; l < kref[t].size(); ++l) {
            const double v = k->scores[t][l];
            if (kref[t][l].is_null()) {
              EXPECT_TRUE(std::isnan(v)) << name << " " << kname;
              continue;
            }
            err = std::max(err, std::abs(v - kref[t][l].get<double>()));
            ++cells;
          }
      }
      EXPECT_LE(err, 1e-5) << name << (naive ? " naive" : " cached");
      EXPECT_GT(cells, 40) << name;
      RecordProperty(name + (naive ? "_naive" : "_cached") + "_max_abs_err", std::to_string(err));
      // The corruption must matter, or the comparison says little.
      EXPECT_GT(r.high_score - r.low_score, 0.05) << name;
    }
    ++checked;
  }
  EXPECT_GE(checked, 3);
}

// ------------------------------------------------------------------------------------------- cached = naive

TEST(Trace, CachedEqualsNaiveOnEveryFixtureAndKind) {
  const OneThread one_thread;
  std::vector<std::string> fixtures(std::begin(kFixtures), std::end(kFixtures));
  fixtures.insert(fixtures.end(), {"deepseek_v1", "deepseek_v2"});  // two shared experts: each restored alone too
  for (const std::string& fx : fixtures) {
    auto m = fixture_model(fx);
    trace::TraceInput in;
    in.ids = prompt_ids(*m, 9, 1);
    in.subject_begin = 1;
    in.subject_end = 4;
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
    trace::TraceInput in;
    in.ids = prompt_ids(m, 12, 2);
    in.subject_begin = 3;
    in.subject_end = 6;
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

Tokenizer char_tokenizer();  // below

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
  trace::TraceInput in;
  in.ids = prompt_ids(*m, 9, 8);
  in.subject_begin = 2;
  in.subject_end = 5;
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
  trace::TraceInput in;
  in.ids = prompt_ids(*m, 6);
  in.subject_begin = 4;
  in.subject_end = 9;
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
  trace::TraceInput in;
  in.ids = prompt_ids(*m, 7, 6);
  in.subject_begin = 2;
  in.subject_end = 4;
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

// -------------------------------------------------------------------------------------------- text path

// A character-level BPE tokenizer (no merges): printable ASCII c → id c, which fits the 128-token fixtures.
Tokenizer char_tokenizer() {
  nlohmann::json vocab = nlohmann::json::object();
  for (int ch = 32; ch < 127; ++ch) vocab[std::string(1, char(ch))] = ch;
  nlohmann::json j = {{"version", "1.0"},
                      {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", nlohmann::json::array()}}}};
  return Tokenizer::from_json(j.dump(), "char-tokenizer.json");
}

TEST(Trace, TextPathLocatesTheSubjectThroughOffsets) {
  const OneThread one_thread;
  auto m = fixture_model("qwen2_moe");
  const Tokenizer tok = char_tokenizer();
  EXPECT_EQ(trace::locate_subject(tok, "Paris is in France", "is in"), (std::pair<int, int>{6, 11}));
  try {
    trace::locate_subject(tok, "Paris is in France", "Spain");
    FAIL() << "expected InputError";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("'Spain' is not in the prompt"), std::string::npos) << e.what();
  }
  trace::TraceOptions o;
  o.samples = 3;
  o.kinds = {Kind::Resid, Kind::Expert};
  const trace::TraceReport r = trace::trace_fact(*m, tok, {"Rome is in", "Rome", "Italy", "", ""}, o);
  EXPECT_EQ(r.subject_begin, 0);
  EXPECT_EQ(r.subject_end, 4);
  EXPECT_EQ(r.answer, int(' '));  // " Italy": a space is prepended, its first (character) token is ' '
  EXPECT_EQ(r.answer_source, "target");
  EXPECT_EQ(r.tokens[0], "R");
  EXPECT_NE(r.noise_source.find("CounterFact"), std::string::npos) << r.noise_source;
  const trace::TraceReport r2 = trace::trace_fact(*m, tok, {"Rome is in ", "Rome", "Italy", "", ""}, o);
  EXPECT_EQ(r2.answer, int('I'));
  EXPECT_THROW(trace::trace_fact(*m, tok, {"Rome is in", "Paris", "", "", ""}, o), InputError);
  // Expert kind defaults to the last subject token and the last token.
  EXPECT_EQ(r.find(Kind::Expert)->rows, (std::vector<int>{3, 9}));
}

// ------------------------------------------------------------------------------------------------ outputs

TEST(Trace, OutputsJsonSvgAndSelfContainedHtml) {
  const OneThread one_thread;
  auto m = fixture_model("qwen2_moe");
  const Tokenizer tok = char_tokenizer();
  trace::TraceOptions o;
  o.samples = 3;
  const trace::TraceReport r = trace::trace_fact(*m, tok, {"Bob <lives> in", "Bob", "", "", ""}, o);
  test::TempDir tmp;
  const auto files = trace::write_trace_outputs(r, tmp.path.string());
  for (const char* f : {"trace_resid.json", "trace_attn.json", "trace_moe.json", "trace_expert.json",
                        "trace_shared.json", "trace_resid.svg", "trace_attn.svg", "trace_moe.svg", "trace_shared.svg",
                        "trace_expert.svg", "trace_expert_dominant.svg", "trace_report.html"})
    EXPECT_TRUE(std::filesystem::exists(tmp.path / f)) << f;
  EXPECT_EQ(files.size(), 12u);
  const nlohmann::json j = nlohmann::json::parse(test::read_file(tmp / "trace_moe.json"));
  for (const char* key : {"scores", "low_score", "high_score", "input_tokens", "subject_range", "answer", "window",
                          "kind", "input_ids", "noise", "rows"})
    EXPECT_TRUE(j.contains(key)) << key;
  EXPECT_EQ(j["kind"], "moe");
  EXPECT_EQ(j["window"], 10);
  EXPECT_EQ(j["scores"].size(), r.ids.size());
  EXPECT_EQ(j["scores"][0].size(), size_t(m->config().n_layers));
  EXPECT_EQ(j["subject_range"], nlohmann::json({0, 3}));
  EXPECT_DOUBLE_EQ(j["low_score"].get<double>(), r.low_score);
  const nlohmann::json js = nlohmann::json::parse(test::read_file(tmp / "trace_shared.json"));
  EXPECT_TRUE(js["scores"][0][2].is_null());  // layer 2 is dense: no shared expert
  const nlohmann::json je = nlohmann::json::parse(test::read_file(tmp / "trace_expert.json"));
  EXPECT_EQ(je["experts"].size(), 2u * 3u * 3u);  // 2 tokens × 3 MoE layers × top-3
  EXPECT_EQ(je["dominant"].size(), 2u);
  const std::string resid = test::read_file(tmp / "trace_resid.svg");
  EXPECT_NE(resid.find("<svg"), std::string::npos);
  EXPECT_NE(resid.find(">B*</text>"), std::string::npos);  // subject tokens starred
  EXPECT_NE(resid.find("&lt;"), std::string::npos);        // escaped
  EXPECT_NE(resid.find("Impact of restoring state"), std::string::npos);
  EXPECT_NE(test::read_file(tmp / "trace_moe.svg").find("#00441b"), std::string::npos);   // Greens top (colour bar)
  EXPECT_NE(test::read_file(tmp / "trace_attn.svg").find("#67000d"), std::string::npos);  // Reds
  EXPECT_NE(resid.find("#3f007d"), std::string::npos);                                     // Purples
  const std::string html = test::read_file(tmp / "trace_report.html");
  size_t svgs = 0;
  for (size_t p = html.find("<svg"); p != std::string::npos; p = html.find("<svg", p + 1)) ++svgs;
  EXPECT_EQ(svgs, 6u);
  EXPECT_EQ(html.find("<script"), std::string::npos);
  EXPECT_EQ(html.find("src="), std::string::npos);
  EXPECT_NE(html.find("href=\"trace_expert.json\""), std::string::npos);
  // report_json (the --json output) holds every kind.
  EXPECT_EQ(trace::report_json(r)["kinds"].size(), 5u);
}

// ---------------------------------------------------------------------------------------------- dataset mode

TEST(Trace, DatasetModeAveragesRomesSixTokenGroups) {
  const OneThread one_thread;
  auto m = fixture_model("qwen2_moe");
  const Tokenizer tok = char_tokenizer();
  test::TempDir tmp;
  const nlohmann::json data = nlohmann::json::array(
      {{{"case_id", 7},
        {"requested_rewrite",
         {{"prompt", "{} is from"}, {"subject", "Ann Lee"}, {"target_true", {{"str", "Oslo"}}},
          {"target_new", {{"str", "Rome"}}}}}},
       {{"case_id", 9},
        {"requested_rewrite",
         {{"prompt", "Home of {}:"}, {"subject", "Bo"}, {"target_true", {{"str", "Y"}}},
          {"target_new", {{"str", "Z"}}}}}},
       {{"case_id", 11},
        {"requested_rewrite",
         {{"prompt", "{} plays"}, {"subject", "absent subject?"}, {"target_true", {{"str", "x"}}}}}}});
  test::write_file(tmp / "cf.json", data.dump());
  trace::TraceOptions o;
  o.samples = 2;
  o.kinds = {Kind::Resid, Kind::Moe, Kind::Expert, Kind::Shared};
  trace::DatasetOptions d;
  d.out_dir = tmp / "out";
  d.only_correct = false;
  d.plots = 1;
  const trace::DatasetSummary s = trace::trace_dataset(*m, tok, tmp / "cf.json", o, d);
  EXPECT_EQ(s.facts, 3);
  EXPECT_EQ(s.traced, 3);  // "{} plays" with subject "absent subject?" still contains it: formatted from the record
  const nlohmann::json& j = s.json;
  // Recompute the last-token and last-subject-token averages from the per-fact files.
  double low = 0;
  std::vector<nlohmann::json> facts;
  for (const char* id : {"7", "9", "11"}) {
    facts.push_back(nlohmann::json::parse(test::read_file(tmp / ("out/cases/" + std::string(id) + "_resid.json"))));
    low += facts.back()["low_score"].get<double>() / 3;
  }
  EXPECT_NEAR(j["avg_low_score"].get<double>(), low, 1e-12);
  for (int l = 0; l < m->config().n_layers; ++l) {
    double last = 0, last_subj = 0;
    for (const auto& f : facts) {
      const int S = int(f["input_ids"].size()), e = f["subject_range"][1];
      last += f["scores"][S - 1][l].get<double>() / 3;
      last_subj += f["scores"][e - 1][l].get<double>() / 3;
    }
    EXPECT_NEAR(j["kinds"]["resid"]["groups"]["last"]["aie"][l].get<double>(), last - low, 1e-12);
    EXPECT_NEAR(j["kinds"]["resid"]["groups"]["last_subject"]["aie"][l].get<double>(), last_subj - low, 1e-12);
  }
  for (const char* g : {"first_subject", "middle_subject", "last_subject", "first_subsequent", "further", "last"})
    EXPECT_TRUE(j["kinds"]["moe"]["groups"].contains(g)) << g;
  // "Bo" has no middle tokens, "Ann Lee" has 5: middle-subject counts per layer = 5.
  EXPECT_EQ(j["kinds"]["resid"]["groups"]["middle_subject"]["n"][0], 5 + 0 + 13);
  ASSERT_EQ(j["expert_last_subject"].size(), 3u);  // three MoE layers
  EXPECT_EQ(j["expert_last_subject"][0]["rank_aie"].size(), 3u);
  EXPECT_TRUE(j["expert_last_subject"][0]["shared_aie"].is_number());
  EXPECT_TRUE(std::filesystem::exists(tmp / "out/summary.json"));
  EXPECT_TRUE(std::filesystem::exists(tmp / "out/report.html"));
  EXPECT_TRUE(std::filesystem::exists(tmp / "out/summary_resid.svg"));
  EXPECT_TRUE(std::filesystem::exists(tmp / "out/cases/7/trace_report.html"));
  EXPECT_FALSE(std::filesystem::exists(tmp / "out/cases/9/trace_report.html"));  // plots = 1
  // Resume: a second run re-reads the cases and gives the same summary.
  const trace::DatasetSummary s2 = trace::trace_dataset(*m, tok, tmp / "cf.json", o, d);
  EXPECT_EQ(s2.json["kinds"], j["kinds"]);
}

// ------------------------------------------------------------------------------------------------------ CLI

TEST(TraceCli, IdsModeJsonAndNoiseFileCrossCheck) {
  const std::string model = test::fixture("models/qwen2_moe");
  const nlohmann::json ref = nlohmann::json::parse(test::read_file(test::fixture("trace/qwen2_moe/reference.json")));
  std::string ids;
  for (int id : ref["ids"]) ids += (ids.empty() ? "" : ",") + std::to_string(id);
  const std::string range = std::to_string(ref["subject_range"][0].get<int>()) + ":" +
                            std::to_string(ref["subject_range"][1].get<int>());
  auto r = test::run_cli("trace " + model + " --ids " + ids + " --subject-range " + range + " --window " +
                         std::to_string(ref["window"].get<int>()) + " --kinds resid,expert --noise-file " +
                         test::fixture("trace/qwen2_moe/noise.safetensors") + " --json --threads 1");
  ASSERT_EQ(r.code, 0) << r.err;
  const nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["kinds"].size(), 2u);
  double err = 0;
  for (size_t t = 0; t < ref["kinds"]["resid"].size(); ++t)
    for (size_t l = 0; l < ref["kinds"]["resid"][t].size(); ++l)
      err = std::max(err, std::abs(j["kinds"]["resid"]["scores"][t][l].get<double>() -
                                   ref["kinds"]["resid"][t][l].get<double>()));
  EXPECT_LE(err, 1e-5);
  EXPECT_EQ(j["answer"]["id"], ref["answer"]);

  test::TempDir tmp;
  r = test::run_cli("trace " + model + " --ids " + ids + " --subject-range " + range + " --samples 2 --threads 1 --out " +
                    tmp.path.string());
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("answer"), std::string::npos);
  EXPECT_TRUE(std::filesystem::exists(tmp / "trace_report.html"));
  EXPECT_EQ(r.err.find("\r"), std::string::npos);  // no progress bar when stderr is not a TTY

  r = test::run_cli("trace " + model + " --ids " + ids + " --subject-range " + range +
                    " --samples 2 --threads 1 --kinds resid,moe --tokens subject_last,last --json");
  ASSERT_EQ(r.code, 0) << r.err;
  const nlohmann::json jt = nlohmann::json::parse(r.out);
  EXPECT_EQ(jt["kinds"]["moe"]["rows"], nlohmann::json({ref["subject_range"][1].get<int>() - 1,
                                                         int(ref["ids"].size()) - 1}));
}

TEST(TraceCli, BadInputExitsWithTwo) {
  const std::string model = test::fixture("models/qwen2_moe");
  for (const std::string args :
       {"--ids 1,2,3", "--ids 1,2,3 --subject-range 2:9", "--ids 1,2,3 --subject-range a:b",
        "--ids 1,2,3 --subject-range 0:1 --kinds nope", "--ids 1,2,3 --subject-range 0:1 --noise q",
        "--prompt 'Rome is' --subject Rome",  // fixture has no tokenizer.json
        "--ids 1,2,3 --subject-range 0:1 --noise-file /nonexistent.safetensors",
        "--dataset /nonexistent.json --out /tmp/x", "--ids 1,2,3 --subject-range 0:1 --prompt x"}) {
    const auto r = test::run_cli("trace " + model + " " + args);
    EXPECT_EQ(r.code, 2) << args << "\n" << r.err;
    EXPECT_NE(r.err.find("error"), std::string::npos) << args;
  }
  const auto r = test::run_cli("trace " + test::fixture("models/qwen3_moe") + " --ids 1,2,3 --subject-range 0:1 --kinds shared");
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("no shared expert"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace moedit
