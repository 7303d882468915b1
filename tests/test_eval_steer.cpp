// Issue 20: steering (and masking, boosting) on `moedit eval`, a standing router edit of the model
// (model/router_edit.h; tracing/interventions.h router_edit): the model's forward with the edit equals, bit for bit,
// the forward with the hooks `moedit logits --steer` installs (logits, routing, scores, perplexity); the v* gradient
// under steering against finite differences; the key-statistics cache keyed on the edit; the CLI run: steered scores
// differ from unsteered ones and equal the steered hooks' scores, generations are the steered model's, the settings
// record the steering and --resume with other steering is refused; bad inputs (README rows 71–75).
#include <gtest/gtest.h>

#include <cstdio>
#include <nlohmann/json.hpp>
#include <random>

#include "datasets/eval_records.h"
#include "edit_util.h"
#include "editor/keystats.h"
#include "editor/rome.h"
#include "eval/counterfact_eval.h"
#include "eval/run.h"
#include "eval_util.h"
#include "model/model.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"
#include "tracing/interventions.h"

namespace moedit {
namespace {

using json = nlohmann::json;
using test::TempDir;

// A cluster-style steering file for the demo model (8 experts): mean-embedding rows on layers 1–3, binarised at
// 3/8 = 0.375 they mark experts {1, 5} (layer 1), {2, 6} (layer 2) and {0, 3, 7} (layer 3).
void write_demo_steering(const std::string& path) {
  test::write_file(path, R"({"layers": [1, 2, 3], "vector": [
      [0.05, 0.60, 0.10, 0.00, 0.20, 0.45, 0.30, 0.10],
      [0.10, 0.00, 0.80, 0.25, 0.05, 0.10, 0.50, 0.20],
      [0.40, 0.10, 0.00, 0.70, 0.10, 0.05, 0.20, 0.50]], "keywords": ["x"]})");
}

InterventionSpec demo_spec(const std::string& file, int form, float c) {
  InterventionSpec s;
  s.steer = load_steering(file, 0.375);
  s.steer.form = form;
  s.steer.c = c;
  return s;
}

// Scores of the queries with the hooks `moedit logits` would install for `spec` (no standing edit on the model).
std::vector<eval::TargetScore> hooked_scores(Model& m, const InterventionSpec& spec,
                                             const std::vector<eval::TargetQuery>& q) {
  Hooks h;
  install_interventions(spec, m.config(), h);
  m.set_router_edit(nullptr);
  return eval::score_targets(m, q, 1, 4096, &h);
}

TEST(EvalSteer, StandingEditEqualsTheSteeredHooksBitForBit) {
  TempDir tmp;
  write_demo_steering(tmp / "s.json");
  auto m = Model::load(test::demo_model_dir());
  const Tokenizer tok = Tokenizer::from_file(test::demo_model_dir());
  const auto prompt = tok.encode_ids("The mother tongue of Danielle Darrieux is", true);
  const std::vector<eval::TargetQuery> q = {{prompt, tok.encode_ids(" French", false), 3},
                                            {prompt, tok.encode_ids(" English language", false), -1}};
  const ForwardOutput plain = m->forward({prompt});
  std::vector<InterventionSpec> specs = {demo_spec(tmp / "s.json", 3, 2.f), demo_spec(tmp / "s.json", 4, 1.f),
                                         demo_spec(tmp / "s.json", 5, 1.5f)};
  InterventionSpec mb = specs[2];  // with a mask and a norm-preserving boost on top
  mb.mask = {{2, 0}};
  mb.boost = {{1, 3, 1.2f}};
  mb.boost_mode = BoostMode::NormPreserving;
  specs.push_back(mb);
  for (const InterventionSpec& s : specs) {
    Hooks h;
    install_interventions(s, m->config(), h);
    ForwardOptions o;
    o.hooks = &h;
    m->set_router_edit(nullptr);
    const ForwardOutput hooked = m->forward({prompt}, o);
    const double ppl_hooked = eval::perplexity(*m, tok, "Paris is the capital of France", 100, &h);
    const auto sh = hooked_scores(*m, s, q);
    m->set_router_edit(router_edit(s, m->config()));
    const ForwardOutput standing = m->forward({prompt});
    EXPECT_EQ(standing.logits, hooked.logits) << describe(s);  // bit for bit
    for (int l = 1; l < 4; ++l) EXPECT_EQ(standing.routing[size_t(l)].ids, hooked.routing[size_t(l)].ids);
    EXPECT_GT((standing.logits - plain.logits).cwiseAbs().maxCoeff(), 1e-3f) << describe(s);
    EXPECT_EQ(standing.routing[0].ids, plain.routing[0].ids);  // layer 0 is not steered
    const auto ss = eval::score_targets(*m, q, 1);
    for (size_t i = 0; i < q.size(); ++i) {
      EXPECT_EQ(ss[i].nll, sh[i].nll) << describe(s);
      EXPECT_EQ(ss[i].correct, sh[i].correct);
      EXPECT_EQ(ss[i].experts, sh[i].experts);
    }
    EXPECT_EQ(eval::perplexity(*m, tok, "Paris is the capital of France"), ppl_hooked);
  }
  m->set_router_edit(nullptr);
}

// ROME's v* under steering on every MoE layer (those below the edited layer reach it through the plain forward, those
// above through the taped stack): ∂loss/∂δ against central differences, and unlike the unsteered gradient.
TEST(EvalSteer, VStarGradientUnderSteeringMatchesFiniteDifferences) {
  test::SerialOps serial;
  for (const std::string fx : {"qwen2_moe", "olmoe_clip", "deepseek_v3"}) {
    auto m = Model::load(edit_test::fixture_model(fx));
    const ModelConfig& c = m->config();
    const int layer = fx == "deepseek_v3" ? 1 : 0;
    for (int form : {4, 5}) {
      InterventionSpec s;
      s.steer.form = form;
      s.steer.c = 0.8f;
      std::mt19937_64 g{uint64_t(form)};
      std::uniform_real_distribution<float> u(0.f, 1.f);
      for (int l = 0; l < c.n_layers; ++l) {
        if (!c.is_moe(l)) continue;
        VecF v(c.n_experts);
        for (int e = 0; e < c.n_experts; ++e) v[e] = e % 3 == 1 ? 0.f : u(g);
        s.steer.layers.push_back(l);
        s.steer.vector.push_back(v);
      }
      m->set_router_edit(nullptr);
      VStarProblem<double> P0(*m, layer, edit_test::fixed_ids(), VStarOptions{});
      m->set_router_edit(router_edit(s, c));
      VStarProblem<double> P(*m, layer, edit_test::fixed_ids(), VStarOptions{});
      Eigen::VectorXd delta = Eigen::VectorXd::LinSpaced(P.hidden(), -1, 1);
      delta *= 0.5 * double(P.target_init().norm()) / delta.norm();
      P.eval(delta);
      const Eigen::VectorXd grad = P.grad();
      const Eigen::VectorXd fd = edit_test::fd_gradient(P, delta);
      const double err = edit_test::rel(grad, fd);
      std::printf("  [fd] steered (form %d) dloss/ddelta %s layer %d: relative error %.2e\n", form, fx.c_str(), layer,
                  err);
      EXPECT_LE(err, 1e-4) << fx << " form " << form;
      P0.eval(delta);
      EXPECT_GT(edit_test::rel(P0.grad(), grad), 1e-3) << fx << ": the steering must change the gradient";
    }
  }
}

// Key statistics depend on the routers up to their layer: the cache key covers the edit of layers ≤ L only.
TEST(EvalSteer, KeyStatisticsCacheKeysOnTheEdit) {
  TempDir tmp;
  write_demo_steering(tmp / "s.json");
  auto m = Model::load(test::demo_model_dir());
  const uint64_t h1 = key_weights_hash(*m, 0), h2 = key_weights_hash(*m, 1);
  m->set_router_edit(router_edit(demo_spec(tmp / "s.json", 5, 1.5f), m->config()));  // layers 1–3
  EXPECT_EQ(key_weights_hash(*m, 0), h1);
  EXPECT_NE(key_weights_hash(*m, 1), h2);
  const uint64_t h2s = key_weights_hash(*m, 1);
  m->set_router_edit(router_edit(demo_spec(tmp / "s.json", 5, 1.25f), m->config()));
  EXPECT_NE(key_weights_hash(*m, 1), h2s);
}

std::string steer_flags(const std::string& file, const std::string& coef) {
  return "--steer " + file + " --steer-threshold 0.375 --steer-form 5 --steer-coef " + coef;
}

TEST(EvalSteer, SteeredRunScoresWithTheSteeredModelAndResumesOnlyWithTheSameSteering) {
  edit_test::SerialCli serial;
  TempDir tmp;
  write_demo_steering(tmp / "s.json");
  const auto steered = test::run_cli(test::fast_eval_args(tmp / "st", "--limit 2 " + steer_flags(tmp / "s.json", "1.5")));
  ASSERT_EQ(steered.code, 0) << steered.err;
  const auto plain = test::run_cli(test::fast_eval_args(tmp / "pl", "--limit 2"));
  ASSERT_EQ(plain.code, 0) << plain.err;

  // The settings (and the summary) record the steering; an unsteered run has no such entry.
  const json set = json::parse(test::read_file(tmp / "st/settings.json"));
  const json& st = set["interventions"]["steer"];
  EXPECT_EQ(st["file"], tmp / "s.json");
  EXPECT_EQ(st["coef"], 1.5);
  EXPECT_EQ(st["form"], 5);
  EXPECT_EQ(st["threshold"], 0.375);
  EXPECT_EQ(st["layers"], json({1, 2, 3}));
  EXPECT_TRUE(set["interventions"].contains("hash"));
  EXPECT_EQ(json::parse(test::read_file(tmp / "st/summary.json"))["settings"]["interventions"], set["interventions"]);
  EXPECT_FALSE(json::parse(test::read_file(tmp / "pl/settings.json")).contains("interventions"));

  // Every "pre" score is the steered model's: equal to the steered hooks' scores, unlike the plain run's.
  const auto recs = load_eval_records(test::bundled_counterfact());
  auto m = Model::load(test::demo_model_dir());
  const Tokenizer tok = Tokenizer::from_file(test::demo_model_dir());
  const InterventionSpec spec = demo_spec(tmp / "s.json", 5, 1.5f);
  int generated = 0;
  for (size_t i = 0; i < 2; ++i) {
    const EvalRecord& r = recs[i];
    const json pre = json::parse(test::read_file(eval::case_path(tmp / "st", r.case_id)))["pre"];
    const json pre_plain = json::parse(test::read_file(eval::case_path(tmp / "pl", r.case_id)))["pre"];
    std::vector<std::string> prompts = {r.rewrite_prompt()};
    prompts.insert(prompts.end(), r.paraphrase_prompts.begin(), r.paraphrase_prompts.end());
    std::vector<eval::TargetQuery> q;
    for (const auto& p : prompts) q.push_back({tok.encode_ids(p, true), tok.encode_ids(" " + r.target_new, false), -1});
    const auto sh = hooked_scores(*m, spec, q);
    EXPECT_EQ(pre["rewrite_prompts_probs"][0]["target_new"].get<double>(), sh[0].nll) << r.case_id;
    for (size_t j = 1; j < prompts.size(); ++j)
      EXPECT_EQ(pre["paraphrase_prompts_probs"][j - 1]["target_new"].get<double>(), sh[j].nll) << r.case_id << " " << j;
    EXPECT_NE(pre["rewrite_prompts_probs"], pre_plain["rewrite_prompts_probs"]);
    if (pre.contains("text")) {  // generation: the steered model's texts (seeded as in the run)
      m->set_router_edit(router_edit(spec, m->config()));
      const auto texts = eval::generate_texts(*m, tok, r.generation_prompts, {24, 5, 1}, r.case_id);
      m->set_router_edit(nullptr);
      EXPECT_EQ(pre["text"], json(texts));
      EXPECT_NE(pre["text"], pre_plain["text"]);
      ++generated;
    }
  }
  EXPECT_GE(generated, 1);  // the even case ids generate

  // --resume: the same steering continues; other steering, or none, is refused.
  const auto same = test::run_cli(test::fast_eval_args(tmp / "st", "--limit 2 --resume " + steer_flags(tmp / "s.json", "1.5")));
  EXPECT_EQ(same.code, 0) << same.err;
  for (const std::string& other : {steer_flags(tmp / "s.json", "2"), std::string()}) {
    const auto r = test::run_cli(test::fast_eval_args(tmp / "st", "--limit 2 --resume " + other));
    EXPECT_EQ(r.code, 2) << other;
    EXPECT_NE(r.err.find("used different settings"), std::string::npos) << r.err;
  }
}

TEST(EvalSteer, BadInputsExitTwoNamingTheFlagOrFile) {
  TempDir tmp;
  write_demo_steering(tmp / "s.json");
  test::write_file(tmp / "short.json", R"({"layers": [1], "vector": [[0.5, 0.5]]})");
  struct Case {
    std::string flags, needle;
  };
  const Case cases[] = {
      {"--steer " + (tmp / "none.json"), tmp / "none.json: cannot open the steering file"},
      {"--steer " + (tmp / "short.json"), "--steer " + (tmp / "short.json") + ": the row of layer 1 has 2 entries, the model 8 experts"},
      {"--steer " + (tmp / "s.json") + " --steer-form 7", "--steer-form: 7 (expected 3, 4 or 5)"},
      {"--mask 1:0,1:1,1:2,1:3,1:4,1:5,1:6", "--mask: masking 7 experts of layer 1 leaves fewer than top_k = 2"},
  };
  for (const Case& c : cases) {
    const auto r = test::run_cli(test::fast_eval_args(tmp / "o", "--limit 1 " + c.flags));
    EXPECT_EQ(r.code, 2) << c.flags << "\n" << r.err;
    EXPECT_NE(r.err.find(c.needle), std::string::npos) << c.flags << "\n" << r.err;
  }
}

}  // namespace
}  // namespace moedit
