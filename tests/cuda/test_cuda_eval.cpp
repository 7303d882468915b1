// `moedit eval` with the model on the GPU (issue 23's eval check): ROME edits of the demo model's first 20 bundled
// CounterFact records (dominant expert, layer 0 as in eval/results/demo-dominant, the demo's v* settings, generation
// every 10th case, routing drift), key statistics computed on each backend, give the CPU run's summary to the printed
// precision: every count equal, every printed value (ROME's summaries round to 2 decimals) within one unit of its
// last digit — two fp32 results 1e-5 apart can straddle a rounding boundary, nothing more. On the GPU every part runs
// on the device: the forwards, v* (model/seam_backward.h), scores, generation (device KV cache), key statistics and
// drift probes.
// Checked on the CPU against itself (69 values, all equal) and with v*'s lr 1.5 against 2 (18 values beyond the
// tolerance: the check can fail). Skips without a GPU.
#include <gtest/gtest.h>

#include <cmath>

#include "datasets/eval_records.h"
#include "editor/keystats.h"
#include "eval/run.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/eval_util.h"
#include "tests/test_util.h"
#include "tokenizer/tokenizer.h"

namespace moedit {
namespace {

using nlohmann::json;

json run_on(const Backend* be, const std::string& dir) {
  auto m = Model::load(test::demo_model_dir());
  if (be) m->set_backend(*be);
  const Tokenizer tok = Tokenizer::from_file(test::demo_model_dir());
  KeyStatsOptions so;
  so.cache_dir = dir + "/stats";
  so.max_tokens = 20000;
  KeyStatsCache stats(*m, tok, so);
  eval::RunOptions o;
  o.out_dir = dir + "/eval";
  o.limit = 20;
  o.generation_interval = 10;
  o.edit.layer = 0;
  o.edit.target = parse_edit_target("dominant");
  o.edit.v.lr = 2.0;
  o.edit.v.steps = 40;
  o.edit.moments = [&stats](int l, int e) { return stats.get(l, e); };
  o.settings = {{"test", "cuda eval"}};
  return eval::run_eval(*m, tok, load_eval_records(test::bundled_counterfact()), o).summary;
}

struct Diff {
  std::vector<std::string> bad;  // beyond the tolerance, or different in kind
  int numbers = 0, equal = 0;    // numbers compared; equal as printed
};

// Differences between two summaries ("time" aside): integers exactly, other numbers within `tol`.
void compare(const json& gpu, const json& cpu, double tol, const std::string& path, Diff& d) {
  std::vector<std::string>& bad = d.bad;
  if (cpu.is_object()) {
    for (auto it = cpu.begin(); it != cpu.end(); ++it) {
      if (it.key() == "time") continue;
      if (!gpu.contains(it.key())) {
        bad.push_back(path + "/" + it.key() + ": missing on the GPU");
        continue;
      }
      compare(gpu[it.key()], it.value(), tol, path + "/" + it.key(), d);
    }
    for (auto it = gpu.begin(); it != gpu.end(); ++it)
      if (!cpu.contains(it.key())) bad.push_back(path + "/" + it.key() + ": only on the GPU");
  } else if (cpu.is_array()) {
    if (!gpu.is_array() || gpu.size() != cpu.size()) return bad.push_back(path + ": different lengths");
    for (size_t i = 0; i < cpu.size(); ++i) compare(gpu[i], cpu[i], tol, path + "/" + std::to_string(i), d);
  } else if (cpu.is_number()) {
    ++d.numbers;
    const bool integral = cpu.is_number_integer() && gpu.is_number_integer();
    const double a = gpu.get<double>(), b = cpu.get<double>();
    d.equal += a == b;
    if (integral ? a != b : !(std::abs(a - b) <= tol))
      bad.push_back(path + ": cuda " + gpu.dump() + ", cpu " + cpu.dump());
  } else if (gpu != cpu) {
    bad.push_back(path + ": cuda " + gpu.dump() + ", cpu " + cpu.dump());
  }
}

TEST(CudaEval, SummaryMatchesTheCpuToThePrintedPrecision) {
  MOEDIT_REQUIRE_GPU();
  test::TempDir tmp;
  const json cpu = run_on(nullptr, tmp / "cpu");
  const json gpu = run_on(&test::gpu(), tmp / "gpu");
  ASSERT_EQ(cpu["num_cases"], 20);
  ASSERT_TRUE(cpu.contains("post_ngram_entropy")) << "generation ran on no case: the check would miss it";
  Diff d;
  compare(gpu, cpu, 0.01 + 1e-9, "", d);
  EXPECT_GT(d.numbers, 40);
  std::string all;
  for (const auto& b : d.bad) all += "\n  " + b;
  EXPECT_TRUE(d.bad.empty()) << d.bad.size() << " of " << d.numbers << " summary values differ:" << all;
  std::printf("  [cuda eval] %d summary values: %d equal as printed, %zu beyond one unit of the last digit\n",
              d.numbers, d.equal, d.bad.size());
}

}  // namespace
}  // namespace moedit
