// Evaluation of batch editors and the routing-drift / perplexity metrics (issue 18): WikiText-2 perplexity against
// the logits, a drift probe against routing_drift of its own snapshots, MEMIT batches in `moedit eval` (case files
// per record with their batch, shards merging to one run, resume redoing a partly written batch, bit-exact revert),
// sequential batches with their curve, and the CLI's errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "datasets/eval_records.h"
#include "eval/curve.h"
#include "eval/drift_probe.h"
#include "eval/run.h"
#include "io/errors.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"
#include "eval_util.h"
#include "test_util.h"

namespace moedit {
namespace {
using json = nlohmann::json;
using test::TempDir;

using test::summary_without_time;
std::string demo_dir() { return test::demo_model_dir(); }
std::string bundled_cf() { return test::bundled_counterfact(); }

// Key statistics C = I·(1/2) for every expert of the demo model (128-wide keys): below AlphaEdit's threshold 1 every
// direction is null, so the projection keeps the whole update.
std::shared_ptr<const SecondMoment> half_identity_moments(int, int) {
  auto s = std::make_shared<SecondMoment>();
  s->mom2 = MatR::Identity(128, 128) * 0.5f;
  s->count = 1000;
  return s;
}

TEST(EvalDrift, WindowsPerplexityIsTheMeanNllOfEveryPredictedToken) {
  auto m = Model::load(demo_dir());
  const Tokenizer tok = Tokenizer::from_file(demo_dir());
  const eval::Sequences w = {tok.encode_ids("The mother tongue of Danielle Darrieux is French", true),
                             tok.encode_ids("Paris is the capital of France", true)};
  double nll = 0;
  int n = 0;
  for (const auto& seq : w) {
    const ForwardOutput f = m->forward({seq});
    for (size_t t = 1; t < seq.size(); ++t, ++n) {
      const auto row = f.logits.row(long(t) - 1).cast<double>();
      nll += std::log((row.array() - row.maxCoeff()).exp().sum()) + row.maxCoeff() - row[seq[t]];
    }
  }
  EXPECT_NEAR(eval::windows_perplexity(*m, w), std::exp(nll / n), 1e-4 * std::exp(nll / n));
  const auto wiki = eval::wikitext_windows(tok, 300);
  ASSERT_EQ(wiki.size(), 3u);  // 128 + 128 + 44 tokens
  EXPECT_EQ(wiki[0].size(), 128u);
  EXPECT_TRUE(eval::wikitext_windows(tok, 0).empty());
}

TEST(EvalDrift, ProbeComparesTheSamePromptsBeforeAndAfter) {
  auto m = Model::load(demo_dir());
  const Tokenizer tok = Tokenizer::from_file(demo_dir());
  const eval::Sequences prompts = eval::wikitext_windows(tok, 256);
  const eval::DriftProbe probe(*m, prompts);
  const RoutingDrift none = probe.measure(*m);
  EXPECT_EQ(none.cells, 256 * 4);  // every token at each of the 4 MoE layers
  EXPECT_EQ(none.changed_share, 0.0);
  EXPECT_EQ(none.mean_kl, 0.0);
  // Scale one router row of layer 2 (expert 3's logit grows): the probe's drift is routing_drift's of the snapshots.
  const RouterSnapshot before = snapshot_routers(*m, prompts);
  MatR& gate = m->mutable_weights().layers[2].ffn.router;  // [E, H]
  const MatR saved = gate;
  gate.row(3) *= 3.0f;
  const RoutingDrift d = probe.measure(*m), ref = routing_drift(before, snapshot_routers(*m, prompts));
  EXPECT_GT(d.changed_share, 0.0);
  EXPECT_EQ(d.changed_share, ref.changed_share);
  EXPECT_EQ(d.mean_kl, ref.mean_kl);
  EXPECT_EQ(d.cells, ref.cells);
  gate = saved;
}

// `moedit eval --method memit` on the demo model: 4 records, batches of 2, fast v*.
std::string batch_args(const std::string& out, const std::string& extra) {
  return "eval " + demo_dir() + " --dataset " + bundled_cf() +
         " --method memit --layers 1-2 --batch-size 2 --mom2-weight 1 --no-mom2 --steps 3 --drift-tokens 128"
         " --generation-interval 0 --limit 4 --quiet --out " + out + " " + extra;
}

TEST(EvalBatch, BatchesWriteCasesMergeAcrossShardsAndResume) {
  TempDir tmp;
  const auto full = test::run_cli(batch_args(tmp / "full", ""));
  ASSERT_EQ(full.code, 0) << full.err;
  const json ref = summary_without_time(tmp / "full");
  EXPECT_EQ(ref["num_cases"], 4);
  for (const char* k : {"post_rewrite_success", "post_drift_neighborhood", "post_drift_wikitext",
                        "post_router_kl_wikitext"})
    EXPECT_TRUE(ref.contains(k)) << k;
  const auto recs = load_eval_records(bundled_cf());
  std::vector<json> cases;
  for (int i = 0; i < 4; ++i) cases.push_back(json::parse(test::read_file(eval::case_path(tmp / "full", recs[size_t(i)].case_id))));
  for (int i = 0; i < 4; ++i) {
    const json& b = cases[size_t(i)]["edit"]["batch"];
    EXPECT_EQ(b["method"], "memit");
    EXPECT_EQ(b["size"], 2);
    EXPECT_EQ(b["first_case"], recs[size_t(i / 2 * 2)].case_id);
    EXPECT_DOUBLE_EQ(cases[size_t(i)]["time"].get<double>(), b["seconds"].get<double>() / 2);
    EXPECT_EQ(cases[size_t(i)]["moe"]["layer"], 2);  // routing read at the range's last layer
  }
  EXPECT_EQ(cases[0]["routing_drift"], cases[1]["routing_drift"]);  // one batch, one drift
  EXPECT_NE(cases[0]["routing_drift"], cases[2]["routing_drift"]);

  // Shards take whole batches: batch 0 (records 0, 1) and batch 1 (records 2, 3); merged = one run.
  for (const char* s : {"0/2", "1/2"}) {
    const auto r = test::run_cli(batch_args(tmp / ("shard" + std::string(1, s[0])), std::string("--shard ") + s));
    ASSERT_EQ(r.code, 0) << r.err;
  }
  EXPECT_TRUE(std::filesystem::exists(eval::case_path(tmp / "shard0", recs[1].case_id)));
  EXPECT_TRUE(std::filesystem::exists(eval::case_path(tmp / "shard1", recs[2].case_id)));
  const auto merged = test::run_cli("eval merge " + (tmp / "shard0") + " " + (tmp / "shard1") + " --out " + (tmp / "merged"));
  ASSERT_EQ(merged.code, 0) << merged.err;
  EXPECT_EQ(summary_without_time(tmp / "merged"), ref);

  // A batch with one case file missing is edited again as a whole; the result is the uninterrupted run's.
  std::filesystem::remove(eval::case_path(tmp / "full", recs[3].case_id));
  std::filesystem::remove(tmp / "full/summary.json");
  const auto resumed = test::run_cli(batch_args(tmp / "full", "--resume"));
  ASSERT_EQ(resumed.code, 0) << resumed.err;
  EXPECT_EQ(summary_without_time(tmp / "full"), ref);
}

TEST(EvalBatch, SequentialBatchesGiveACurveAndRevertBitForBit) {
  TempDir tmp;
  auto m = Model::load(demo_dir());
  const Tokenizer tok = Tokenizer::from_file(demo_dir());
  const auto down1 = m->weights().layers[1].ffn.experts.down, down2 = m->weights().layers[2].ffn.experts.down;
  const auto recs = load_eval_records(bundled_cf());
  for (const auto method : {BatchMethod::Memit, BatchMethod::AlphaEdit}) {
    eval::RunOptions o;
    o.out_dir = tmp / method_name(method);
    o.limit = 4;
    o.sequential_every = 2;
    o.generation_interval = 0;
    o.drift_tokens = 128;
    o.batch_size = 2;
    BatchOptions b;
    b.method = method;
    b.layers = {1, 2};
    b.mom2_weight = 1;
    b.edit.mom2_adjustment = false;
    b.edit.v.steps = 3;
    if (method == BatchMethod::AlphaEdit) {  // AlphaEdit needs key statistics: C = I·(1/2) has no null space below 1
      b.edit.mom2_adjustment = true;
      b.nullspace_threshold = 1.0;
      b.edit.moments = half_identity_moments;
    }
    o.batch = b;
    o.edit.layer = 2;
    o.settings = {{"test", method_name(method)}};
    const auto res = eval::run_eval(*m, tok, recs, o);
    EXPECT_EQ(res.evaluated, 4);
    const json& curve = res.summary["sequential"];
    ASSERT_EQ(curve.size(), 3u);
    EXPECT_EQ(curve[0]["edits"], 0);
    EXPECT_NEAR(curve[0]["perplexity_wikitext"].get<double>(),
                eval::windows_perplexity(*m, eval::wikitext_windows(tok, 128)), 0);  // the clean model's
    EXPECT_EQ(curve[2]["edits"], 4);
    EXPECT_TRUE(curve[2]["routing_drift"].contains("neighborhood"));
    EXPECT_GT(curve[2]["edit_seconds"].get<double>(), 0);
    EXPECT_TRUE(m->weights().layers[1].ffn.experts.down == down1);
    EXPECT_TRUE(m->weights().layers[2].ffn.experts.down == down2);
  }
  const auto r = test::run_cli("eval curve " + (tmp / "memit") + " " + (tmp / "alphaedit") +
                               " --labels MEMIT,AlphaEdit --out " + (tmp / "c.svg"));
  ASSERT_EQ(r.code, 0) << r.err;
  const std::string svg = test::read_file(tmp / "c.svg");
  EXPECT_NE(svg.find("AlphaEdit"), std::string::npos);
  EXPECT_EQ(std::count(svg.begin(), svg.end(), '\n') > 10, true);
}

// A sequential run resumes from its last curve point (the state file: the changed down-projections, AlphaEdit's key
// cache, the templates): a run stopped after 3 of 4 edits (the state holds 2), then --resume, gives the curve and
// cases of one uninterrupted run, bit for bit (times aside), and the weights are the checkpoint's again at the end.
TEST(EvalBatch, SequentialRunsResumeFromTheLastCurvePoint) {
  TempDir tmp;
  auto m = Model::load(demo_dir());
  const Tokenizer tok = Tokenizer::from_file(demo_dir());
  const auto clean = Model::load(demo_dir());
  const auto recs = load_eval_records(bundled_cf());
  auto strip = [](json j) {  // wall times differ between runs
    for (auto& p : j) {
      p.erase("edit_seconds");
      p.erase("time");
    }
    return j;
  };
  for (const std::string method : {"rome", "alphaedit"}) {
    auto options = [&](const std::string& dir, bool resume) {
      eval::RunOptions o;
      o.out_dir = tmp / dir;
      o.limit = 4;
      o.resume = resume;
      o.sequential_every = 2;
      o.generation_interval = 0;
      o.drift_tokens = 128;
      o.edit.layer = 2;
      o.edit.mom2_adjustment = false;
      o.edit.v.steps = 3;
      if (method == "alphaedit") {  // C = I·(1/2): every direction below the threshold 1 is null
        BatchOptions b;
        b.method = BatchMethod::AlphaEdit;
        b.layers = {2};
        b.edit = o.edit;
        b.edit.mom2_adjustment = true;
        b.nullspace_threshold = 1.0;
        b.edit.moments = half_identity_moments;
        o.batch = b;
        o.batch_size = 2;
      }
      o.settings = {{"test", method}};
      return o;
    };
    const auto full = eval::run_eval(*m, tok, recs, options(method + "_full", false));
    // Stopped once the 3rd (rome) or 4th (alphaedit: the second batch) edit is written, before its curve point.
    eval::RunOptions stop = options(method + "_part", false);
    stop.progress = [](int done, int) {
      if (done >= 3) throw std::runtime_error("interrupted");
    };
    EXPECT_THROW(eval::run_eval(*m, tok, recs, stop), std::runtime_error);
    ASSERT_TRUE(std::filesystem::exists(tmp / (method + "_part/sequential/state.safetensors")));
    m = Model::load(demo_dir());  // the interrupted process's edits are gone with it
    const auto resumed = eval::run_eval(*m, tok, recs, options(method + "_part", true));
    EXPECT_EQ(resumed.evaluated, 2) << method;
    EXPECT_EQ(resumed.skipped, 2) << method;
    ASSERT_EQ(resumed.summary["sequential"].size(), 3u) << method;
    EXPECT_EQ(strip(resumed.summary["sequential"]), strip(full.summary["sequential"]))
        << method << " " << json::diff(strip(full.summary["sequential"]), strip(resumed.summary["sequential"])).dump();
    for (int k = 0; k < 4; ++k) {
      const int id = recs[size_t(k)].case_id;
      json a = json::parse(test::read_file(eval::case_path(tmp / (method + "_full"), id)));
      json b = json::parse(test::read_file(eval::case_path(tmp / (method + "_part"), id)));
      for (json* c : {&a, &b}) {
        c->erase("time");
        (*c)["edit"].erase("seconds");
        (*c)["edit"].erase("vstar_seconds");
        if (c->at("edit").contains("batch")) {
          (*c)["edit"]["batch"].erase("seconds");
          (*c)["edit"]["batch"].erase("vstar_seconds");
        }
      }
      EXPECT_EQ(a, b) << method << " case " << id << " " << json::diff(a, b).dump();
    }
    EXPECT_TRUE(m->weights().layers[2].ffn.experts.down == clean->weights().layers[2].ffn.experts.down)
        << method;  // reverted, the loaded state included
  }
  auto resume_rome = [&](int limit) {
    eval::RunOptions o;
    o.out_dir = tmp / "rome_part";
    o.limit = limit;
    o.resume = true;
    o.sequential_every = 2;
    o.generation_interval = 0;
    o.drift_tokens = 128;
    o.edit.layer = 2;
    o.edit.mom2_adjustment = false;
    o.settings = {{"test", "rome"}};
    return o;
  };
  auto expect_error = [&](const eval::RunOptions& o, const std::string& want) {
    try {
      eval::run_eval(*m, tok, recs, o);
      ADD_FAILURE() << "no error: " << want;
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find(want), std::string::npos) << e.what();
    }
  };
  expect_error(resume_rome(6), "state.safetensors: written by a run of 4 records, this one has 6");
  // A state file that does not belong to the model is refused by name.
  std::map<std::string, OwnedTensor> bad;
  const std::vector<float> z(4, 0.f);
  bad["down.9.0"] = make_f32_tensor({2, 2}, z.data());
  write_safetensors(tmp / "rome_part/sequential/state.safetensors", bad,
                    {{"moedit_sequential_state", R"({"edits": 2, "records": 4, "seconds": 0, "templates": []})"}});
  expect_error(resume_rome(4), "state.safetensors: tensor 'down.9.0': the model has no such expert");
}

// --layers auto:2 traces the first records and takes the two MoE layers ending at the largest mean MoE effect among
// the layers a range may end at (not the model's last; fewer when it is layer 0); --key-columns and --passes reach
// the edit and the settings.
TEST(EvalBatch, LayersAutoKeyColumnsAndPasses) {
  TempDir tmp;
  const auto r = test::run_cli("eval " + demo_dir() + " --dataset " + bundled_cf() +
                               " --method memit --layers auto:2 --auto-layer-cases 3 --key-columns templates --passes 2"
                               " --batch-size 2 --limit 2 --mom2-weight 1 --no-mom2 --steps 2 --drift-tokens 0"
                               " --generation-interval 0 --quiet --out " + (tmp / "auto"));
  ASSERT_EQ(r.code, 0) << r.err;
  const json settings = json::parse(test::read_file(tmp / "auto/settings.json"));
  const json& la = settings["layer_auto"];
  ASSERT_TRUE(la.contains("layers")) << settings.dump();
  const std::vector<double> mean = la["mean_indirect_effect"];
  const std::vector<int> layers = la["layers"];
  int best = -1;
  for (int l = 0; l + 1 < int(mean.size()); ++l)
    if (best < 0 || mean[size_t(l)] > mean[size_t(best)]) best = l;
  ASSERT_GE(best, 0) << la.dump();
  std::vector<int> want;  // the demo model's layers are all MoE: best − 1 and best, or layer 0 alone
  for (int l = std::max(0, best - 1); l <= best; ++l) want.push_back(l);
  EXPECT_EQ(layers, want) << la.dump();
  EXPECT_EQ(settings["batch"]["key_columns"], "templates");
  EXPECT_EQ(settings["batch"]["passes"], 2);
  const auto recs = load_eval_records(bundled_cf());
  const json c = json::parse(test::read_file(eval::case_path(tmp / "auto", recs[0].case_id)));
  EXPECT_EQ(c["moe"]["layer"], best);
}

TEST(EvalBatch, BadOptionsExitWithTwoAndSayWhy) {
  TempDir tmp;
  struct Case {
    std::string args, needle;
  };
  const std::string base = "eval " + demo_dir() + " --dataset " + bundled_cf() + " --limit 2 --quiet --out " + (tmp / "o");
  const Case cases[] = {
      {" --layer 1 --batch-size 2", "--batch-size"},
      {" --method memit --layers 1-2 --batch-size 2 --sequential 3", "multiple of --batch-size"},
      {" --method memit --layers 1-3", "last layer"},
      {" --method memit", "needs --layers"},
      {" --method mend --layers 1", "--method 'mend'"},
      {" --method memit --layers auto:0", "--layers 'auto:0'"},
      {" --method memit --layers 1 --key-columns all", "--key-columns 'all'"},
      {" --method memit --layers 1 --passes 0", "--passes"},
      {" --method moeedit --layers 1 --target shared", "--target shared: moeedit edits the routed experts"},
      {" --method moeedit --layers 1 --bcd-sweeps 0", "--bcd-sweeps must be at least 1"},
      {" --method alphaedit --layers 1 --nullspace-relative -1", "--nullspace-relative must be"},
      {" --layer 1 --lr-scale log", "--lr-scale must be absolute or relative"},
      {" --layer 1 --router-guard", "--router-guard is for --method"},
  };
  for (const Case& c : cases) {
    const auto r = test::run_cli(base + c.args);
    EXPECT_EQ(r.code, 2) << c.args << "\n" << r.err;
    EXPECT_NE(r.err.find(c.needle), std::string::npos) << c.args << "\n" << r.err;
  }
  std::filesystem::create_directories(tmp / "plain");
  test::write_file(tmp / "plain/summary.json", "{\"num_cases\": 1}");
  const auto r = test::run_cli("eval curve " + (tmp / "plain") + " --out " + (tmp / "c.svg"));
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("plain/summary.json: no \"sequential\" curve"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace moedit
