// Saving trained parameters (editor/save.h save_trained_checkpoint / save_param_delta) and the training commands
// `moedit router-tune` and `moedit ceft` (issue 19 part C) on the bundled demo model.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "datasets/context_task.h"
#include "editor/save.h"
#include "io/errors.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "train/train.h"
#include "edit_util.h"
#include "context_task_util.h"
#include "test_util.h"

namespace moedit {
namespace {

using json = nlohmann::json;
using namespace edit_test;

std::string demo_model() { return test::source_dir() + "/models/moedit-demo"; }

// Tensor names whose bytes differ between two checkpoints with the same names, dtypes and shapes.
std::set<std::string> changed_tensors(const std::string& a, const std::string& b) {
  TensorStore s0(a), s1(b);
  EXPECT_EQ(s0.names(), s1.names());
  std::set<std::string> out;
  for (const std::string& n : s0.names()) {
    const TensorView &x = s0.get(n), &y = s1.get(n);
    EXPECT_EQ(x.dtype, y.dtype) << n;
    EXPECT_EQ(x.shape, y.shape) << n;
    if (x.nbytes != y.nbytes || std::memcmp(x.data, y.data, x.nbytes) != 0) out.insert(n);
  }
  return out;
}

// One AdamW step on sel with a fixed batch.
void train_once(Model& m, const ParamSelection& sel) {
  const TrainBatch batch = {{{1, 7, 3, 9, 4}, {11, 2, 8}}, {{5, 6}, {13}}};
  AdamW opt({.lr = 1e-2, .weight_decay = 0.0});
  train_step(m, batch, sel, opt);
}

TEST(SaveTrained, EveryKindRoundTripsAndOnlyTrainedTensorsChange) {
  test::SerialOps serial;
  for (const std::string fx : {"olmoe", "mixtral_fused", "qwen2_moe", "deepseek_v1"}) {
    test::TempDir tmp;
    auto m = Model::load(fixture_model(fx));
    const ParamSelection sel = ParamSelection::everything(*m);
    train_once(*m, sel);
    const std::vector<ParamId> params = WeightGrads<float>(*m, sel).params();
    round_params_to_checkpoint_dtype(*m, fixture_model(fx), params);
    save_trained_checkpoint(*m, fixture_model(fx), tmp / "out", params);
    auto r = Model::load(tmp / "out"), src = Model::load(fixture_model(fx));
    const std::vector<std::vector<int32_t>> seqs = {{1, 7, 3, 9, 4, 11, 2, 8}, {5, 6, 13, 21}};
    const ForwardOutput a = m->forward(seqs), b = r->forward(seqs), c = src->forward(seqs);
    EXPECT_TRUE((a.logits.array() == b.logits.array()).all()) << fx;
    EXPECT_FALSE((a.logits.array() == c.logits.array()).all()) << fx << ": training changed nothing";
    EXPECT_FALSE(changed_tensors(fixture_model(fx), tmp / "out").empty()) << fx;
  }
  // A partial selection (routers and one expert): exactly those tensors change; the delta file holds them.
  for (const std::string fx : {"mixtral_fused", "qwen2_moe"}) {
    test::TempDir tmp;
    auto m = Model::load(fixture_model(fx));
    ParamSelection sel = ParamSelection::all_routers(*m);
    const int l = sel.routers.back();
    sel.experts = {{l, 1}};
    train_once(*m, sel);
    const std::vector<ParamId> params = WeightGrads<float>(*m, sel).params();
    save_trained_checkpoint(*m, fixture_model(fx), tmp / "out", params);
    save_param_delta(*m, fixture_model(fx), tmp / "delta.safetensors", params);
    TensorStore src(fixture_model(fx));
    std::set<std::string> want;
    for (const ParamId& p : params) want.insert(locate_param(*m, src, p).tensor);
    EXPECT_EQ(changed_tensors(fixture_model(fx), tmp / "out"), want) << fx;
    SafeTensorsFile delta(tmp / "delta.safetensors");
    TensorStore out(tmp / "out");
    std::set<std::string> names;
    for (const auto& [n, v] : delta.tensors()) {
      names.insert(n);
      const TensorView& o = out.get(n);
      ASSERT_EQ(v.nbytes, o.nbytes) << n;
      EXPECT_EQ(std::memcmp(v.data, o.data, v.nbytes), 0) << n;
    }
    EXPECT_EQ(names, want) << fx;
  }
}

// ---- CLI ---------------------------------------------------------------------------------------------------------

using test::small_task;

TEST(TrainCli, RouterTuneReportsScoresAndSavesOnlyRouters) {
  SerialCli serial;  // the re-scored checkpoint must reproduce the reported score exactly
  test::TempDir t;
  const std::string task = small_task(t, 12), out = t / "tuned", delta = t / "delta.safetensors";
  const auto r = test::run_cli("router-tune " + demo_model() + " --data " + task + " --eval " + task +
                               " --epochs 2 --batch-size 4 --json --save " + out + " --save-delta " + delta);
  ASSERT_EQ(r.code, 0) << r.err;
  const json j = json::parse(r.out);
  EXPECT_EQ(j["trainable_params"], 4 * 8 * 128);  // 4 MoE layers' routers [8, 128]
  EXPECT_EQ(j["train_examples"], 12);
  for (const char* k : {"before", "after"}) {
    EXPECT_EQ(j[k]["examples"], 12) << k;
    EXPECT_GE(j[k]["p_first"].get<double>(), 0.0) << k;
    EXPECT_TRUE(j[k].contains("em")) << k;
  }
  ASSERT_EQ(j["epochs"].size(), 2u);
  for (const auto& e : j["epochs"]) {
    EXPECT_TRUE(std::isfinite(e["loss"].get<double>()));
    EXPECT_EQ(e["steps"].get<int>(), 3);  // 12 examples in batches of 4
    EXPECT_GT(e["seconds"].get<double>(), 0.0);
  }
  std::set<std::string> routers;
  for (int l = 0; l < 4; ++l) routers.insert("model.layers." + std::to_string(l) + ".mlp.gate.weight");
  EXPECT_EQ(changed_tensors(demo_model(), out), routers);
  std::set<std::string> names;
  const SafeTensorsFile delta_file(delta);
  for (const auto& [n, v] : delta_file.tensors()) names.insert(n);
  EXPECT_EQ(names, routers);
  // The saved checkpoint scores what the command reported after tuning.
  const auto s = test::run_cli("router-tune " + out + " --data " + task + " --eval " + task + " --epochs 1 --json");
  ASSERT_EQ(s.code, 0) << s.err;
  EXPECT_EQ(json::parse(s.out)["before"], j["after"]);
}

TEST(TrainCli, CeftTrainsOnlyTheChosenExperts) {
  test::TempDir t;
  const std::string task = small_task(t, 8), ce = t / "ce.json", out = t / "ceft";
  test::write_file(ce, R"({"ce": {"1": [2], "3": [5]}})");
  const auto r = test::run_cli("ceft " + demo_model() + " --data " + task + " --experts " + ce +
                               " --epochs 1 --batch-size 4 --ppl-tokens 256 --facts 10 --json --save " + out);
  ASSERT_EQ(r.code, 0) << r.err;
  const json j = json::parse(r.out);
  EXPECT_EQ(j["trainable_params"], 2 * 3 * 128 * 128);  // two experts' gate, up, down [128, 128]
  EXPECT_TRUE(j["before"].is_null());                    // --data is not the bundled train split, no --eval
  for (const char* k : {"forgetting_before", "forgetting_after"}) {
    EXPECT_EQ(j[k]["facts"], 10) << k;
    EXPECT_GT(j[k]["wikitext_ppl"].get<double>(), 1.0) << k;
  }
  std::set<std::string> want;
  for (const auto& [l, e] : {std::pair{1, 2}, std::pair{3, 5}})
    for (const char* p : {"gate", "up", "down"})
      want.insert("model.layers." + std::to_string(l) + ".mlp.experts." + std::to_string(e) + "." + p +
                  "_proj.weight");
  EXPECT_EQ(changed_tensors(demo_model(), out), want);
  // --routers adds the routers.
  const auto s = test::run_cli("ceft " + demo_model() + " --data " + task + " --experts " + ce +
                               " --routers --epochs 1 --ppl-tokens 0 --facts 0 --json");
  ASSERT_EQ(s.code, 0) << s.err;
  const json js = json::parse(s.out);
  EXPECT_EQ(js["trainable_params"], 2 * 3 * 128 * 128 + 4 * 8 * 128);
  for (const char* k : {"forgetting_before", "forgetting_after"}) {  // skipped measures are null, not 0
    EXPECT_TRUE(js[k]["wikitext_ppl"].is_null()) << k;
    EXPECT_TRUE(js[k]["facts_acc"].is_null()) << k;
    EXPECT_EQ(js[k]["facts"], 0) << k;
  }
}

TEST(TrainCli, BadInputsExit2NamingTheFlagOrFile) {
  test::TempDir t;
  const std::string task = small_task(t, 4), m = demo_model(), missing = t / "missing.json";
  const std::string bad_ce = t / "bad_ce.json", no_ce = t / "no_ce.json", far_ce = t / "far_ce.json";
  test::write_file(bad_ce, "{not json");
  test::write_file(no_ce, R"({"oe": {"0": [1]}})");
  test::write_file(far_ce, R"({"ce": {"0": [9]}})");
  const std::vector<std::pair<std::string, std::string>> rows = {
      {"router-tune " + m + " --data " + missing, "--data " + missing + ": no such file"},
      {"router-tune " + m + " --data " + task + " --eval " + missing, "--eval " + missing + ": no such file"},
      {"router-tune " + m + " --data " + task + " --epochs 0", "--epochs 0: expected at least 1"},
      {"router-tune " + m + " --data " + task + " --lr 0", "--lr 0: expected a learning rate > 0"},
      {"router-tune " + m + " --data " + task + " --lr -1", "--lr -1: expected a learning rate > 0"},
      {"router-tune " + m + " --data " + task + " --betas 0.9 1", "--betas 1: expected in [0, 1)"},
      {"router-tune " + m + " --data " + task + " --batch-size 0", "--batch-size 0: expected at least 1"},
      {"router-tune " + m + " --data " + task + " --save " + m, "--save " + m + ": refusing to save over the source"},
      {"router-tune " + m + " --data " + task + " --save-delta " + m + "/d.safetensors",
       "the output file may not lie inside the source checkpoint"},
      {"ceft " + m + " --data " + task + " --experts " + missing, missing + ": cannot open the expert file"},
      {"ceft " + m + " --data " + task + " --experts " + bad_ce, bad_ce + ": not valid JSON"},
      {"ceft " + m + " --data " + task + " --experts " + no_ce, no_ce + ": no field 'ce'"},
      {"ceft " + m + " --data " + task + " --experts " + far_ce, far_ce + ": "},
      {"ceft " + m + " --data " + task, "ceft needs --experts CE.json (or --full)"},
      {"ceft " + m + " --data " + task + " --full --experts " + no_ce, "--full trains everything"},
  };
  for (const auto& [args, msg] : rows) {
    const auto r = test::run_cli(args);
    EXPECT_EQ(r.code, 2) << args << "\n" << r.err;
    EXPECT_NE(r.err.find(msg), std::string::npos) << args << "\n" << r.err;
  }
}

}  // namespace
}  // namespace moedit
