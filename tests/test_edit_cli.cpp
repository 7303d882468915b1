// ROME editing at the text level and end to end: deterministic templates, save → reload, the edit CLI (bad inputs,
// edits/reports/saves, auto layer), the cross-check against the PyTorch implementation (tools/rome_reference.py →
// tests/fixtures/edit/{qwen2_moe,deepseek_v2,deepseek_v3}_rome.safetensors) and the bundled demo model.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "editor/keystats.h"
#include "editor/rome.h"
#include "editor/save.h"
#include "io/errors.h"
#include "model/model.h"
#include "io/safetensors.h"
#include "tokenizer/tokenizer.h"
#include "edit_util.h"
#include "reference_util.h"
#include "test_util.h"

namespace moedit {
namespace {

using namespace edit_test;

using test::SerialOps;

// ---- text level, save ---------------------------------------------------------------------------------------------

TEST(Edit, TemplatesAreDeterministicAndIdsFollowRome) {
  SerialOps serial;
  test::TempDir tmp;
  const auto [m, tok] = load_with_tokenizer(tmp, "qwen2_moe");
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
  write_edit_corpus(tmp / "corpus.txt");
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
  // Routing drift of the edit on the neighbourhood prompt and the WikiText-2 sample: cells of every MoE layer.
  for (const char* on : {"neighborhood", "wikitext"}) {
    const auto& d = e["routing_drift"][on];
    EXPECT_GT(d["cells"].get<int>(), 0) << on;
    EXPECT_GE(d["changed_share"].get<double>(), 0.0) << on;
    EXPECT_LE(d["changed_share"].get<double>(), 1.0) << on;
    EXPECT_GE(d["mean_kl"].get<double>(), 0.0) << on;
  }
  EXPECT_TRUE(fs::exists(tmp / "saved/model.safetensors"));
  EXPECT_TRUE(fs::exists(tmp / "saved/tokenizer.json"));
  // The saved model reproduces the edited probabilities.
  auto saved = Model::load(tmp / "saved");
  const Tokenizer tok = Tokenizer::from_file(tmp / "saved");
  const auto sc = score_prompts(*saved, tok, {"The capital of North Land is"}, "North Land", "Paris", "Rome", 1, {});
  EXPECT_NEAR(sc[0].p_new, e["report"]["rewrite"]["p_new"].get<double>(), 1e-6);
}


// ---- cross-check against the PyTorch implementation ------------------------------------------------------------------

// One reference (tools/rome_reference.py --fixture NAME → edit/NAME_rome.safetensors): same experts, δ, loss curve and
// post-edit logits per target kind. n_shared: the shared experts the "shared" target must edit (one update each).
void cross_check(const std::string& name, int n_shared) {
  const Reference ref("edit/" + name + "_rome.safetensors");
  ASSERT_EQ(ref.meta("model"), "tests/fixtures/models/" + name);
  const int layer = ref.meta_int("layer"), n_eval = ref.meta_int("n_eval");
  const EditIds ids = ref.edit_ids();
  ASSERT_EQ(int(ids.prompts.size()), ref.meta_int("n_prompts"));
  auto m = Model::load(fixture_model(name));
  ASSERT_TRUE(m->weights().layers[size_t(layer)].ffn.moe) << "layer " << layer << " is dense";
  EditOptions opt;
  opt.layer = layer;
  opt.moments = moments_from(compute_key_stats(*m, layer, ref.rows("corpus")));
  auto logits_of = [&](int i) { return m->forward({ref.ids("eval." + std::to_string(i))}).logits; };
  auto ref_logits = [&](const std::string& n, int64_t rows) { return ref.matrix(n, rows, m->config().vocab_size); };
  for (int i = 0; i < n_eval; ++i) {
    const MatR got = logits_of(i), want = ref_logits("pre.logits." + std::to_string(i), got.rows());
    EXPECT_LE(logits_rel_err(got, want), 1e-4);
  }
  for (const std::string kind :
       {"dominant", "routed", "shared", "dominant_exact", "routed_exact", "shared_exact"}) {
    const bool exact = kind.size() > 6 && kind.substr(kind.size() - 6) == "_exact";
    opt.target = parse_edit_target(exact ? kind.substr(0, kind.size() - 6) : kind);
    opt.v.objective = exact ? VStarObjective::Exact : VStarObjective::Rome;
    EditResult r = apply_edit_ids(*m, ids, opt);
    // Same experts, same δ, same loss curve, same post-edit logits.
    const auto want_experts = ref.ids(kind + ".experts");
    if (opt.target.kind == TargetKind::Shared) {
      EXPECT_EQ(want_experts.size(), size_t(n_shared)) << kind;
    }
    EXPECT_EQ(r.updates.size(), want_experts.size()) << kind;
    for (size_t i = 0; i < std::min(want_experts.size(), r.updates.size()); ++i)
      EXPECT_EQ(r.updates[i].expert, want_experts[i]) << kind << " update " << i;
    VecF wd(r.vstar.delta.size());
    ref.get(kind + ".delta").to_f32(wd.data());
    const double derr = (r.vstar.delta - wd).norm() / wd.norm();
    const auto wl = ref.values(kind + ".loss");
    EXPECT_EQ(r.vstar.loss.size(), wl.size()) << kind;
    double lerr = 0;
    for (size_t i = 0; i < std::min(wl.size(), r.vstar.loss.size()); ++i)
      lerr = std::max(lerr, std::abs(r.vstar.loss[i] - wl[i]) / std::abs(wl[i]));
    double worst = 0;
    for (int i = 0; i < n_eval; ++i) {
      const MatR got = logits_of(i), want = ref_logits(kind + ".logits." + std::to_string(i), got.rows());
      worst = std::max(worst, logits_rel_err(got, want));
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
