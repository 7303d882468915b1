// Issue 19 (Router Lens): the context task (datasets/context_task.h), its score and CE experts
// (eval/context_task_eval.h), CAG/AAG/APG (eval/attention_gain.h) and the CLI (experts --context-faithful,
// attention-gain).
#include <gtest/gtest.h>

#include <cmath>
#include <set>

#include "datasets/context_task.h"
#include "eval/attention_gain.h"
#include "eval/context_task_eval.h"
#include "io/errors.h"
#include "model/generate.h"
#include "context_task_util.h"
#include "test_util.h"
#include "tracing/interventions.h"

namespace moedit {
namespace {
using json = nlohmann::json;
using eval::TaskItem;

std::string demo_model() { return test::source_dir() + "/models/moedit-demo"; }

// Hand-made items on token ids (fixture vocabulary 128): context [ctx_begin, ctx_end), answer inside it.
std::vector<TaskItem> fixture_items() {
  std::vector<TaskItem> v(3);
  v[0].prompt = {5, 17, 33, 2, 90, 41, 8, 64, 12};
  v[0].answer = {77, 3};
  v[0].ctx_begin = 0, v[0].ctx_end = 5, v[0].ans_begin = 3, v[0].ans_end = 5;
  v[1].prompt = {100, 7, 7, 21, 50, 9};
  v[1].answer = {4};
  v[1].ctx_begin = 1, v[1].ctx_end = 4, v[1].ans_begin = 2, v[1].ans_end = 3;
  v[2].prompt = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13};
  v[2].answer = {60, 61, 62};
  v[2].ctx_begin = 2, v[2].ctx_end = 9, v[2].ans_begin = 6, v[2].ans_end = 8;
  for (int i = 0; i < 3; ++i) v[size_t(i)].case_id = i;
  return v;
}

// ---- loading ---------------------------------------------------------------------------------------------------

void expect_load_error(const std::string& content, const std::string& message) {
  test::TempDir t;
  const std::string p = t / "task.json";
  test::write_file(p, content);
  try {
    load_context_task(p);
    ADD_FAILURE() << "no error for " << content;
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find(p + ": " + message), std::string::npos) << e.what();
  }
}

TEST(ContextTask, LoaderNamesTheFileTheExampleAndTheField) {
  expect_load_error("{\"context\": \"a\"}", "expected a JSON list of {context, question, answer} examples");
  expect_load_error("[", "not valid JSON");
  expect_load_error("[]", "the list of examples is empty");
  expect_load_error("[3]", "example 0: not an object");
  const std::string ok = R"({"context": "c x.", "question": "q", "answer": "x"})";
  expect_load_error("[" + ok + R"(, {"case_id": 7, "context": "c", "question": "q"}])",
                    "example 1 (case_id 7): field 'answer' missing");
  expect_load_error("[" + ok + R"(, {"context": "c", "question": "q", "answer": 5}])",
                    "example 1: field 'answer' is not a string");
  expect_load_error(R"([{"context": "", "question": "q", "answer": "a"}])", "example 0: field 'context' is empty");
  expect_load_error(R"([{"case_id": "1", "context": "c", "question": "q", "answer": "a"}])",
                    "example 0: field 'case_id' is not an integer");
  expect_load_error(R"([{"context": "c", "question": "q", "answer": "a", "subject": 1}])",
                    "example 0: field 'subject' is not a string");
}

TEST(ContextTask, BundledSplitsAreDisjointCounterMemoryExamples) {
  const auto train = load_context_task(bundled_context_task_path("train"));
  const auto test = load_context_task(bundled_context_task_path("test"));
  EXPECT_EQ(train.size(), 874u);
  EXPECT_EQ(test.size(), 219u);
  std::set<int> ids;
  for (const auto* split : {&train, &test})
    for (const ContextExample& e : *split) {
      EXPECT_TRUE(ids.insert(e.case_id).second) << "case " << e.case_id << " in both splits";
      EXPECT_NE(e.context.find(e.answer), std::string::npos) << e.case_id;
      EXPECT_NE(e.answer, e.memory_answer) << e.case_id;  // counter-memory: the context contradicts the fact
      EXPECT_NE(e.question.find(e.subject), std::string::npos) << e.case_id;
    }
}

TEST(ContextTask, TokenizedSpansCoverTheContextAndTheAnswer) {
  const Tokenizer tok = Tokenizer::from_file(demo_model());
  ContextExample e;
  e.context = "The mother tongue of Danielle Darrieux is English.";
  e.question = "The native language of Danielle Darrieux is";
  e.answer = "English";
  e.case_id = 0;
  const TaskItem it = eval::tokenize_task({e}, tok, "x.json")[0];
  EXPECT_EQ(it.prompt, tok.encode_ids(e.context + " " + e.question));
  EXPECT_EQ(tok.decode(it.answer), " English");
  auto piece = [&](int b, int en) {
    return tok.decode(std::vector<int32_t>(it.prompt.begin() + b, it.prompt.begin() + en));
  };
  EXPECT_EQ(piece(it.ctx_begin, it.ctx_end), e.context);
  EXPECT_EQ(piece(it.ans_begin, it.ans_end), " English");
  ContextExample none = e;
  none.context = "Nothing here.";
  const auto items = eval::tokenize_task({e, none}, tok, "x.json");
  EXPECT_EQ(items[1].ans_begin, -1);
  try {
    eval::require_answer_in_context(items, "x.json");
    ADD_FAILURE() << "no error";
  } catch (const InputError& err) {
    EXPECT_NE(std::string(err.what()).find("x.json: example 1 (case_id 0): field 'answer' does not occur in field "
                                           "'context'"),
              std::string::npos)
        << err.what();
  }
}

// ---- score -------------------------------------------------------------------------------------------------------

TEST(ContextTask, ScoreIsGreedyExactMatchAndFirstTokenProbability) {
  const auto m = Model::load(test::fixture("models/qwen2_moe"));
  auto items = fixture_items();
  // Item 0's answer: the model's own greedy continuation (EM 1); the others keep answers it does not produce.
  GenerateOptions g;
  g.max_new_tokens = 2;
  items[0].answer = generate(*m, items[0].prompt, g);
  for (size_t i = 1; i < items.size(); ++i) {
    g.max_new_tokens = int(items[i].answer.size());
    ASSERT_NE(generate(*m, items[i].prompt, g), items[i].answer);
  }
  const eval::TaskScore s = eval::score_task(*m, items);
  EXPECT_EQ(s.exact, (std::vector<uint8_t>{1, 0, 0}));
  EXPECT_NEAR(s.em(), 100.0 / 3, 1e-12);
  for (size_t i = 0; i < items.size(); ++i) {  // p(first) by hand from the last prompt row's logits
    const ForwardOutput f = m->forward({items[i].prompt});
    const auto row = f.logits.row(f.logits.rows() - 1).cast<double>();
    const double p = std::exp(row(items[i].answer[0]) - row.maxCoeff()) / (row.array() - row.maxCoeff()).exp().sum();
    EXPECT_NEAR(s.first_prob[i], p, 1e-5 * p) << i;
  }
  EXPECT_NEAR(s.mean_first_prob(), (s.first_prob[0] + s.first_prob[1] + s.first_prob[2]) / 3, 1e-15);
}

// ---- CE experts --------------------------------------------------------------------------------------------------

TEST(ContextTask, ExpertCountsMatchAHandCountOfEveryTokensTopK) {
  const auto m = Model::load(test::fixture("models/qwen2_moe"));  // layer 2 dense, top-3 of 8
  const auto items = fixture_items();
  const ActivationProfile p = eval::count_task_experts(*m, items, {});
  EXPECT_EQ(p.layers, (std::vector<int>{0, 1, 3}));
  Eigen::MatrixXd hand = Eigen::MatrixXd::Zero(3, 8);
  int64_t tokens = 0;
  for (const TaskItem& it : items) {
    const ForwardOutput f = m->forward({it.full()});
    tokens += int64_t(it.full().size());
    for (int i = 0; i < 3; ++i) {
      const auto& ids = f.routing[size_t(p.layers[size_t(i)])].ids;
      for (int t = 0; t < ids.rows(); ++t)
        for (int k = 0; k < ids.cols(); ++k) hand(i, ids(t, k)) += 1;
    }
  }
  EXPECT_EQ(p.tokens, tokens);
  EXPECT_EQ(p.counts, hand);
  // Top-K by hand: count descending, ties to the lower id.
  const auto top = eval::most_activated(p, 3);
  for (int i = 0; i < 3; ++i) {
    std::vector<std::pair<double, int>> order;
    for (int e = 0; e < 8; ++e) order.push_back({-hand(i, e), e});
    std::sort(order.begin(), order.end());
    EXPECT_EQ(top[size_t(i)], (std::vector<int>{order[0].second, order[1].second, order[2].second}));
  }
}

TEST(ContextTask, TopExpertsBreakTiesTowardsTheLowerIdAndCheckK) {
  ActivationProfile p;
  p.n_experts = 4;
  p.top_k = 1;
  p.layers = {0, 2};
  p.counts.resize(2, 4);
  p.counts << 3, 5, 5, 1,  //
      2, 2, 2, 9;
  EXPECT_EQ(eval::most_activated(p, 2), (std::vector<std::vector<int>>{{1, 2}, {3, 0}}));
  EXPECT_THROW(eval::most_activated(p, 5), InputError);
  ActivationProfile b = p;
  b.counts << 9, 0, 0, 8,  //
      0, 0, 4, 9;
  const json j = eval::context_faithful_json(p, &b, 2);
  EXPECT_EQ(j["ce"]["0"], json({1, 2}));
  EXPECT_EQ(j["oe"]["0"], json({0, 3}));
  EXPECT_EQ(j["shared"]["0"], 0);
  EXPECT_EQ(j["oe"]["2"], json({3, 2}));
  EXPECT_EQ(j["shared"]["2"], 1);
  EXPECT_EQ(j["counts"]["2"], json({2, 2, 2, 9}));
}

TEST(ContextTask, ExpertFileRoundTripsAndNamesBadFields) {
  test::TempDir t;
  const std::string p = t / "ce.json";
  test::write_file(p, R"({"ce": {"0": [1, 2], "3": [5]}, "counts": {}})");
  EXPECT_EQ(eval::read_expert_set(p, "ce"), (std::vector<ExpertRef>{{0, 1}, {0, 2}, {3, 5}}));
  auto expect_error = [&](const std::string& content, const std::string& which, const std::string& msg) {
    test::write_file(p, content);
    try {
      eval::read_expert_set(p, which);
      ADD_FAILURE() << content;
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find(p + ": " + msg), std::string::npos) << e.what();
    }
  };
  expect_error(R"({"ce": {"0": [1]}})", "oe", "no field 'oe' (written only with --base BASE_MODEL)");
  expect_error(R"({"ce": {"x": [1]}})", "ce", "field 'ce.x': the key is not a layer number");
  expect_error(R"({"ce": {"1": [1, "a"]}})", "ce", "field 'ce.1' holds something other than an expert id");
  expect_error(R"({"ce": [1]})", "ce", "field 'ce' is not an object {layer: [experts]}");
}

TEST(ContextTask, MaskingAnExpertSetChangesRoutingOnlyWhereThoseExpertsWereChosen) {
  const auto m = Model::load(test::fixture("models/qwen2_moe"));
  const std::vector<int32_t> seq = fixture_items()[2].full();
  const ForwardOutput plain = m->forward({seq});
  InterventionSpec spec;
  spec.mask = {{0, 1}, {0, 4}, {3, 0}};
  Hooks h;
  install_interventions(spec, m->config(), h);
  ForwardOptions fo;
  fo.hooks = &h;
  const ForwardOutput masked = m->forward({seq}, fo);
  int changed = 0;
  for (int l : {0, 1, 3})
    for (int t = 0; t < int(seq.size()); ++t) {
      const auto& ids = masked.routing[size_t(l)].ids;
      for (int k = 0; k < ids.cols(); ++k)
        for (const ExpertRef& r : spec.mask) EXPECT_FALSE(r.layer == l && r.expert == ids(t, k)) << l << " " << t;
    }
  // Layer 0 sees the same input: a token's top-k changes exactly when it held a masked expert.
  const auto& a = plain.routing[0].ids;
  const auto& b = masked.routing[0].ids;
  for (int t = 0; t < a.rows(); ++t) {
    std::set<int> sa(a.row(t).data(), a.row(t).data() + a.cols()), sb(b.row(t).data(), b.row(t).data() + b.cols());
    const bool held = sa.count(1) || sa.count(4);
    EXPECT_EQ(sa != sb, held) << t;
    changed += held;
  }
  EXPECT_GT(changed, 0);  // the test exercises both cases
  EXPECT_LT(changed, a.rows());
}

// ---- CAG / AAG / APG ---------------------------------------------------------------------------------------------

// Hand computation on the Qwen2-MoE fixture (MHA with q/k bias, NeoX RoPE, no q/k norm): attention probabilities
// from the residual stream captured at blocks.{l}.hook_resid_pre, the logit lens from hook_resid_post.
struct HandLens {
  std::vector<std::vector<double>> C, A, P;  // [item][layer]
};

MatR rmsnorm_rows(const MatR& x, const VecF& w, float eps) {
  MatR y(x.rows(), x.cols());
  for (int r = 0; r < x.rows(); ++r) {
    double ss = 0;
    for (int c = 0; c < x.cols(); ++c) ss += double(x(r, c)) * x(r, c);
    const double s = 1.0 / std::sqrt(ss / double(x.cols()) + eps);
    for (int c = 0; c < x.cols(); ++c) y(r, c) = float(double(w(c)) * x(r, c) * s);
  }
  return y;
}

HandLens hand_lens(const Model& m, const std::vector<TaskItem>& items) {
  const ModelConfig& c = m.config();
  const int L = c.n_layers, Hq = c.n_heads, D = c.head_dim;
  HandLens out;
  for (const TaskItem& it : items) {
    Hooks h;
    std::vector<std::shared_ptr<Hooks::Capture>> pre, post;
    for (int l = 0; l < L; ++l) {
      pre.push_back(h.capture(hook_names::resid_pre(l)));
      post.push_back(h.capture(hook_names::resid_post(l)));
    }
    ForwardOptions fo;
    fo.hooks = &h;
    m.forward({it.prompt}, fo);
    const int P = int(it.prompt.size()), q = P - 1;
    std::vector<double> C, A, Pr;
    for (int l = 0; l < L; ++l) {
      const LayerWeights& w = m.weights().layers[size_t(l)];
      const MatR a = rmsnorm_rows(pre[size_t(l)]->value, w.ln_in, c.rms_eps);
      MatR Q = a * w.attn.wq.to_f32().transpose(), K = a * w.attn.wk.to_f32().transpose();
      Q.rowwise() += w.attn.bq.transpose();
      K.rowwise() += w.attn.bk.transpose();
      for (MatR* X : {&Q, &K})  // rotate-half RoPE per head, angle = position · θ^(−2i/D)
        for (int t = 0; t < P; ++t)
          for (int hd = 0; hd < Hq; ++hd)
            for (int i = 0; i < D / 2; ++i) {
              const double ang = t * std::pow(double(c.rope_theta), -2.0 * i / D);
              float& x1 = (*X)(t, hd * D + i);
              float& x2 = (*X)(t, hd * D + i + D / 2);
              const double y1 = x1 * std::cos(ang) - x2 * std::sin(ang), y2 = x2 * std::cos(ang) + x1 * std::sin(ang);
              x1 = float(y1), x2 = float(y2);
            }
      std::vector<double> att(size_t(P), 0.0);  // head-averaged probabilities of query q
      for (int hd = 0; hd < Hq; ++hd) {
        std::vector<double> s(static_cast<size_t>(P));
        double mx = -1e300, z = 0;
        for (int j = 0; j < P; ++j) {
          double d = 0;
          for (int i = 0; i < D; ++i) d += double(Q(q, hd * D + i)) * K(j, hd * D + i);
          s[size_t(j)] = d / std::sqrt(double(D));
          mx = std::max(mx, s[size_t(j)]);
        }
        for (double& v : s) z += (v = std::exp(v - mx));
        for (int j = 0; j < P; ++j) att[size_t(j)] += s[size_t(j)] / z / Hq;
      }
      double cm = 0, am = 0;
      for (int j = it.ctx_begin; j < it.ctx_end; ++j) cm += att[size_t(j)];
      for (int j = it.ans_begin; j < it.ans_end; ++j) am += att[size_t(j)];
      C.push_back(cm);
      A.push_back(am);
      const MatR hn = rmsnorm_rows(post[size_t(l)]->value.row(q), m.weights().final_norm, c.rms_eps);
      const Eigen::VectorXd lg = (m.weights().output_matrix().to_f32() * hn.transpose()).cast<double>();
      Pr.push_back(std::exp(lg(it.answer[0]) - lg.maxCoeff()) / (lg.array() - lg.maxCoeff()).exp().sum());
    }
    out.C.push_back(C), out.A.push_back(A), out.P.push_back(Pr);
  }
  return out;
}

TEST(ContextTask, AttentionGainsMatchAHandComputation) {
  const auto base = Model::load(test::fixture("models/qwen2_moe"));
  const auto tuned = Model::load(test::fixture("models/qwen2_moe"));
  // The "tuned" checkpoint: the same weights with layer 0's routing changed (what router tuning does), so attention
  // from layer 1 on and every layer's residual stream differ.
  InterventionSpec spec;
  spec.mask = {{0, 0}, {0, 2}, {0, 5}};
  tuned->set_router_edit(router_edit(spec, tuned->config()));
  const auto items = fixture_items();
  const HandLens hb = hand_lens(*base, items), ht = hand_lens(*tuned, items);
  const eval::LensMeasures mb = eval::measure_lens(*base, items, /*batch_tokens=*/16);  // two packed batches
  const eval::LensMeasures mt = eval::measure_lens(*tuned, items, 16);
  for (size_t i = 0; i < items.size(); ++i)
    for (int l = 0; l < 4; ++l) {
      EXPECT_NEAR(mb.context(long(i), l), hb.C[i][size_t(l)], 2e-5) << i << " " << l;
      EXPECT_NEAR(mb.answer(long(i), l), hb.A[i][size_t(l)], 2e-5) << i << " " << l;
      EXPECT_NEAR(mb.prob(long(i), l), hb.P[i][size_t(l)], 2e-5 * hb.P[i][size_t(l)] + 1e-9) << i << " " << l;
      EXPECT_NEAR(mt.context(long(i), l), ht.C[i][size_t(l)], 2e-5) << i << " " << l;
      EXPECT_NEAR(mt.prob(long(i), l), ht.P[i][size_t(l)], 2e-5 * ht.P[i][size_t(l)] + 1e-9) << i << " " << l;
    }
  const eval::AttentionGain g = eval::attention_gain(mb, mt);
  ASSERT_EQ(g.cag.size(), 4u);
  EXPECT_EQ(g.cag[0], 0.0);  // layer 0's attention comes before any routing
  EXPECT_EQ(g.aag[0], 0.0);
  double moved = 0;
  for (int l = 0; l < 4; ++l) {
    double cag = 0, aag = 0, apg = 0;
    for (size_t i = 0; i < items.size(); ++i) {
      cag += (ht.C[i][size_t(l)] - hb.C[i][size_t(l)]) / 3;
      aag += (ht.A[i][size_t(l)] - hb.A[i][size_t(l)]) / 3;
      apg += (ht.P[i][size_t(l)] - hb.P[i][size_t(l)]) / 3;
    }
    EXPECT_NEAR(g.cag[size_t(l)], cag, 3e-5) << l;
    EXPECT_NEAR(g.aag[size_t(l)], aag, 3e-5) << l;
    EXPECT_NEAR(g.apg[size_t(l)], apg, 3e-5) << l;
    moved += std::abs(cag) + std::abs(apg);
  }
  EXPECT_GT(moved, 1e-3);  // the masked routing does move attention and the logit lens
  // The last layer's P is the model's output probability.
  const ForwardOutput f = base->forward({items[0].prompt});
  const auto row = f.logits.row(f.logits.rows() - 1).cast<double>();
  const double p = std::exp(row(items[0].answer[0]) - row.maxCoeff()) / (row.array() - row.maxCoeff()).exp().sum();
  EXPECT_NEAR(mb.prob(0, 3), p, 1e-5 * p);
  const std::string svg = g.svg("apg");
  EXPECT_EQ(svg.rfind("<svg", 0), 0u);
  size_t circles = 0;
  for (size_t at = 0; (at = svg.find("<circle", at)) != std::string::npos; ++at) ++circles;
  EXPECT_EQ(circles, 4u);
}

// ---- CLI ---------------------------------------------------------------------------------------------------------

using test::small_task;

TEST(ContextTaskCli, ContextFaithfulExpertsCountsAndMaskRuns) {
  test::TempDir t;
  const std::string task = small_task(t, 12), ce = t / "ce.json";
  const auto r = test::run_cli("experts " + demo_model() + " --context-faithful --data " + task + " --base " +
                               demo_model() + " --out " + ce);
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("layer 0  CE:"), std::string::npos) << r.out;
  const json j = json::parse(test::read_file(ce));
  EXPECT_EQ(j["examples"], 12);
  EXPECT_EQ(j["top"], 2);  // default: the model's top-k
  for (const std::string l : {"0", "1", "2", "3"}) {
    int64_t sum = 0;
    for (const auto& c : j["counts"][l]) sum += c.get<int64_t>();
    EXPECT_EQ(sum, 2 * j["tokens"].get<int64_t>()) << l;  // every token selects top_k = 2 experts
    EXPECT_EQ(j["oe"][l], j["ce"][l]);                    // the same model as its own base
    EXPECT_EQ(j["shared"][l], 2);
  }
  const auto s = test::run_cli("experts " + demo_model() + " --context-faithful --data " + task +
                               " --mask-set ce --experts " + ce + " --json");
  ASSERT_EQ(s.code, 0) << s.err;
  const json sj = json::parse(s.out);
  EXPECT_EQ(sj["score"]["examples"], 12);
  EXPECT_EQ(sj["masked"]["set"], "ce");
  EXPECT_NE(sj["masked"]["mask"].get<std::string>().find("mask"), std::string::npos);
  EXPECT_NE(sj["score"]["p_first"], sj["masked"]["score"]["p_first"]);  // masking the most used experts matters
  for (const json* run : {&sj, &sj["masked"]}) {  // the per-example rows add up to the summary
    ASSERT_EQ((*run)["per_example"].size(), 12u);
    int exact = 0;
    double p = 0;
    for (const json& e : (*run)["per_example"]) exact += e["exact"].get<bool>(), p += e["p_first"].get<double>();
    EXPECT_EQ(exact, (*run)["score"]["exact_match"].get<int>());
    EXPECT_NEAR(p / 12, (*run)["score"]["p_first"].get<double>(), 1e-12);
  }
}

TEST(ContextTaskCli, AttentionGainOfAModelOverItselfIsZero) {
  test::TempDir t;
  const std::string task = small_task(t, 5);
  const auto r = test::run_cli("attention-gain " + demo_model() + " " + demo_model() + " --data " + task +
                               " --json --svg " + (t / "svg"));
  ASSERT_EQ(r.code, 0) << r.err;
  const json j = json::parse(r.out);
  EXPECT_EQ(j["examples"], 5);
  for (const char* k : {"cag", "aag", "apg"}) {
    ASSERT_EQ(j[k].size(), 4u);
    for (const auto& v : j[k]) EXPECT_EQ(v.get<double>(), 0.0) << k;
    EXPECT_EQ(test::read_file(t / "svg/" + std::string(k) + ".svg").rfind("<svg", 0), 0u) << k;
  }
  for (const auto& v : j["base"]["context_attention"]) EXPECT_GT(v.get<double>(), 0.0);
}

// Proposed bad-input rows (NOTES-issue19B.md): exit 2 and the message.
TEST(ContextTaskCli, BadInputs) {
  test::TempDir t;
  const std::string task = small_task(t, 3), bad = t / "bad.json", noans = t / "noans.json";
  test::write_file(bad, R"([{"context": "c", "question": "q"}])");
  test::write_file(noans, R"([{"context": "Nothing.", "question": "The capital is", "answer": "Paris"}])");
  const std::string ce = t / "ce.json";
  test::write_file(ce, R"({"ce": {"0": [1]}})");
  const std::string m = demo_model();
  const std::vector<std::pair<std::string, std::string>> rows = {
      {"experts " + m + " --context-faithful --data " + bad, bad + ": example 0: field 'answer' missing"},
      {"experts " + m + " --context-faithful", "--context-faithful needs --data FILE"},
      {"experts " + m + " --data " + task, "--data, --base, --score, --mask-set and --experts need --context-faithful"},
      {"experts " + m + " --context-faithful --data " + task + " --mask-set oe --experts " + ce,
       ce + ": no field 'oe' (written only with --base BASE_MODEL)"},
      {"experts " + m + " --context-faithful --data " + task + " --mask-set ce", "--mask-set ce|oe and --experts"},
      {"experts " + m + " --context-faithful --data " + task + " --top 9", "--top 9: expected 1..8"},
      {"attention-gain " + m + " " + m + " --data " + noans,
       noans + ": example 0 (case_id 0): field 'answer' does not occur in field 'context'"},
  };
  for (const auto& [args, msg] : rows) {
    const auto r = test::run_cli(args);
    EXPECT_EQ(r.code, 2) << args << "\n" << r.err;
    EXPECT_NE(r.err.find(msg), std::string::npos) << args << "\n" << r.err;
  }
}

}  // namespace
}  // namespace moedit
