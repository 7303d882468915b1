// Scale-out (issue 21): `--shard auto` from a Slurm job array's or an MPI launcher's variables, `mpirun -np 2 moedit
// eval --mpi` against one process, and key statistics of corpus shards merged against one pass.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <optional>

#include <nlohmann/json.hpp>

#include "datasets/eval_records.h"
#include "editor/keystats.h"
#include "eval/run.h"
#include "io/safetensors.h"
#include "eval_util.h"
#include "test_util.h"

namespace moedit {
namespace {

using json = nlohmann::json;
using test::TempDir;
namespace fs = std::filesystem;

const char* const kSchedulerVars[] = {
    "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP",
    "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "PMIX_RANK", "SLURM_NTASKS"};

// Clears the variables `--shard auto` reads (this test may itself run inside a Slurm job or under mpirun), sets the
// given ones for the CLI runs of one test, and restores everything afterwards.
struct SchedulerEnv {
  std::map<std::string, std::optional<std::string>> saved;
  explicit SchedulerEnv(const std::map<std::string, std::string>& set = {}) {
    for (const char* k : kSchedulerVars) {
      const char* v = std::getenv(k);
      saved[k] = v ? std::optional<std::string>(v) : std::nullopt;
      ::unsetenv(k);
    }
    for (const auto& [k, v] : set) ::setenv(k.c_str(), v.c_str(), 1);
  }
  ~SchedulerEnv() {
    for (const auto& [k, v] : saved) v ? ::setenv(k.c_str(), v->c_str(), 1) : ::unsetenv(k.c_str());
  }
};

using test::summary_without_time;
std::string demo_dir() { return test::demo_model_dir(); }
std::string bundled_cf() { return test::bundled_counterfact(); }
std::string eval_args(const std::string& out, const std::string& extra) {
  return test::fast_eval_args(out, "--limit 3 " + extra);
}

// Statistics flags shared by every run of a comparison: a short corpus prefix in short windows (several batches).
std::string stats_args(const std::string& extra) {
  return "stats " + demo_dir() + " --layer 0 --layer 2 --max-tokens 3000 --seq-len 48 " + extra;
}

// The value of `key` in a shard file's metadata.
std::string shard_meta(const std::string& path, const std::string& key) {
  SafeTensorsFile f(path);
  return f.metadata().at(key);
}

// Every statistics file under dir (by path relative to dir).
std::map<std::string, std::string> stat_files(const std::string& dir) {
  std::map<std::string, std::string> out;
  for (const auto& e : fs::recursive_directory_iterator(dir))
    if (e.is_regular_file() && e.path().extension() == ".safetensors")
      out[fs::relative(e.path(), dir).string()] = e.path().string();
  return out;
}

// Compares two caches file by file: same files, counts and token totals; mom2 within rel_tol of the larger entry
// (max |a − b| / max |a|). Returns the largest relative difference seen.
double expect_same_stats(const std::string& one_pass, const std::string& merged, double rel_tol) {
  const auto a = stat_files(one_pass), b = stat_files(merged);
  EXPECT_FALSE(a.empty());
  double worst = 0;
  for (const auto& [rel, path] : a) {
    if (rel.starts_with("mpi-parts")) continue;
    EXPECT_TRUE(b.count(rel)) << rel << " missing from the merged cache";
    if (!b.count(rel)) continue;
    const auto x = read_moment_file(path), y = read_moment_file(b.at(rel));
    EXPECT_EQ(x->count, y->count) << rel;
    EXPECT_EQ(shard_meta(path, "tokens"), shard_meta(b.at(rel), "tokens")) << rel;
    EXPECT_EQ(shard_meta(path, "format"), shard_meta(b.at(rel), "format")) << rel;
    EXPECT_EQ(x->mom2.rows(), y->mom2.rows()) << rel;
    if (x->mom2.rows() != y->mom2.rows()) continue;
    const double scale = x->mom2.cwiseAbs().maxCoeff();
    const double diff = (x->mom2 - y->mom2).cwiseAbs().maxCoeff();
    if (x->count == 0) {
      EXPECT_EQ(diff, 0.0) << rel;
      continue;
    }
    EXPECT_GT(scale, 0.0) << rel;
    worst = std::max(worst, diff / scale);
    EXPECT_LE(diff / scale, rel_tol) << rel;
  }
  return worst;
}

// The command run by the shell with stdout/stderr captured.
test::CliResult run_shell(const std::string& cmd) {
  TempDir tmp;
  const std::string o = tmp / "out", e = tmp / "err";
  const int st = std::system((cmd + " >" + o + " 2>" + e + " </dev/null").c_str());
  return {WIFEXITED(st) ? WEXITSTATUS(st) : -1, test::read_file(o), test::read_file(e)};
}

bool have_mpirun() { return std::system("command -v mpirun >/dev/null 2>&1") == 0; }

// mpirun as the CI machine needs it: as root (containers) and with more ranks than cores; one OpenMP thread a rank.
// Under AddressSanitizer (tools/test_sanitize.sh) the ranks run without its leak check: Open MPI's libraries and the
// components it dlopens leave allocations behind at MPI_Finalize (frames in unloaded modules, which no suppression
// can name); every other check (use after free, overflows, UB) stays on.
std::string mpirun(int n) {
  return "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1 "
         "OMP_NUM_THREADS=1 ASAN_OPTIONS=\"${ASAN_OPTIONS:-}:detect_leaks=0\" mpirun --oversubscribe "
         "-x OMP_NUM_THREADS -x ASAN_OPTIONS -np " + std::to_string(n) + " " + MOEDIT_BIN;
}

TEST(ShardAuto, EvalReadsASlurmJobArray) {
  // --array=1-2: the second task (id 2) is shard 1 of 2, i.e. record 1 of the first 3.
  SchedulerEnv env({{"SLURM_ARRAY_TASK_ID", "2"}, {"SLURM_ARRAY_TASK_COUNT", "2"}, {"SLURM_ARRAY_TASK_MIN", "1"}});
  TempDir tmp;
  const auto r = test::run_cli(eval_args(tmp / "s", "--shard auto"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(json::parse(test::read_file(tmp / "s/settings.json"))["shard"], "1/2");
  EXPECT_EQ(json::parse(test::read_file(tmp / "s/summary.json"))["num_cases"], 1);
  const auto recs = load_eval_records(bundled_cf());
  EXPECT_TRUE(fs::exists(eval::case_path(tmp / "s", recs[1].case_id)));
  EXPECT_FALSE(fs::exists(eval::case_path(tmp / "s", recs[0].case_id)));
}

// `stats --shard auto --out DIR`: the shard and shard count its files record.
std::pair<std::string, std::string> stats_shard_of(const std::map<std::string, std::string>& vars) {
  SchedulerEnv env(vars);
  TempDir tmp;
  const auto r = test::run_cli("stats " + demo_dir() + " --layer 0 --max-tokens 200 --seq-len 32 --shard auto --out " +
                               (tmp / "p"));
  EXPECT_EQ(r.code, 0) << r.err;
  if (r.code != 0) return {};
  const auto files = stat_files(tmp / "p");
  EXPECT_FALSE(files.empty());
  if (files.empty()) return {};
  const std::string f = files.begin()->second;
  return {shard_meta(f, "shard"), shard_meta(f, "n_shards")};
}

TEST(ShardAuto, StatsReadsSlurmAndMpiLauncherVariables) {
  using P = std::pair<std::string, std::string>;
  EXPECT_EQ(stats_shard_of({{"OMPI_COMM_WORLD_RANK", "2"}, {"OMPI_COMM_WORLD_SIZE", "3"}}), P("2", "3"));
  EXPECT_EQ(stats_shard_of({{"PMI_RANK", "1"}, {"PMI_SIZE", "4"}}), P("1", "4"));
  EXPECT_EQ(stats_shard_of({{"PMIX_RANK", "0"}, {"SLURM_NTASKS", "2"}}), P("0", "2"));
  // --array=10-14:2 (ids 10, 12, 14): id 14 is the third task.
  EXPECT_EQ(stats_shard_of({{"SLURM_ARRAY_TASK_ID", "14"}, {"SLURM_ARRAY_TASK_COUNT", "3"},
                            {"SLURM_ARRAY_TASK_MIN", "10"}, {"SLURM_ARRAY_TASK_STEP", "2"}}),
            P("2", "3"));
  // A job array wins over an MPI launcher's rank.
  EXPECT_EQ(stats_shard_of({{"SLURM_ARRAY_TASK_ID", "0"}, {"SLURM_ARRAY_TASK_COUNT", "2"},
                            {"OMPI_COMM_WORLD_RANK", "1"}, {"OMPI_COMM_WORLD_SIZE", "2"}}),
            P("0", "2"));
}

struct BadShard {
  std::map<std::string, std::string> vars;
  std::string args;     // appended to the eval or stats command
  std::string message;  // must appear in stderr and in README.md's bad-input table
};

std::vector<BadShard> bad_shards() {
  const std::string eval = "eval " + demo_dir() + " --dataset " + bundled_cf() + " --layer 3 --out /nonexistent/x";
  return {
      {{}, eval + " --shard auto", "--shard auto: no Slurm job array or MPI launcher found (looked for SLURM_ARRAY_TASK_ID"},
      {{{"SLURM_ARRAY_TASK_ID", "4"}, {"SLURM_ARRAY_TASK_COUNT", "4"}}, eval + " --shard auto",
       "--shard auto: SLURM_ARRAY_TASK_ID=4 is not one of the 4 tasks"},
      {{{"SLURM_ARRAY_TASK_ID", "x1"}, {"SLURM_ARRAY_TASK_COUNT", "4"}}, eval + " --shard auto",
       "--shard auto: SLURM_ARRAY_TASK_ID='x1' is not a number"},
      {{{"SLURM_ARRAY_TASK_ID", "1"}}, eval + " --shard auto", "--shard auto: SLURM_ARRAY_TASK_COUNT is not set"},
      {{{"OMPI_COMM_WORLD_RANK", "2"}, {"OMPI_COMM_WORLD_SIZE", "2"}}, eval + " --shard auto",
       "--shard auto: OMPI_COMM_WORLD_RANK=2 is outside 0..1 (OMPI_COMM_WORLD_SIZE=2)"},
      {{}, "stats " + demo_dir() + " --layer 0 --shard 0/2", "--shard needs --out DIR"},
      {{}, "stats merge " + demo_dir(), "no tensor 'sum' (not a statistics shard of `moedit stats --shard i/n`)"},
  };
}

TEST(ShardAuto, BadSchedulerVariablesExitTwoNamingTheVariable) {
  const std::string readme = test::read_file(test::source_dir() + "/README.md");
  for (const auto& c : bad_shards()) {
    SchedulerEnv env(c.vars);
    const auto r = test::run_cli(c.args);
    EXPECT_EQ(r.code, 2) << c.args << ": " << r.err;
    EXPECT_NE(r.err.find(c.message), std::string::npos) << c.message << "\nstderr was: " << r.err;
    EXPECT_NE(readme.find(c.message), std::string::npos) << c.message << ": missing from README's bad-input table";
  }
}

TEST(StatsShards, TwoShardsMergedEqualOnePass) {
  SchedulerEnv env;
  TempDir tmp;
  const auto one = test::run_cli(stats_args("--cache-dir " + (tmp / "one")));
  ASSERT_EQ(one.code, 0) << one.err;
  for (const char* s : {"0", "1"}) {
    const auto r = test::run_cli(stats_args("--shard " + std::string(s) + "/2 --out " + (tmp / ("p" + std::string(s)))));
    ASSERT_EQ(r.code, 0) << r.err;
  }
  // Each shard saw part of the tokens: the merge has work to do.
  const auto p0 = stat_files(tmp / "p0"), p1 = stat_files(tmp / "p1");
  ASSERT_EQ(p0.size(), p1.size());
  const std::string e0 = p0.begin()->first;
  const int64_t c0 = std::stoll(shard_meta(p0.at(e0), "count")), c1 = std::stoll(shard_meta(p1.at(e0), "count"));
  EXPECT_EQ(c0 + c1, read_moment_file(stat_files(tmp / "one").at(e0))->count);
  EXPECT_GT(c0, 0);
  EXPECT_GT(c1, 0);

  const auto merged = test::run_cli("stats merge " + (tmp / "p1") + " " + (tmp / "p0") + " --cache-dir " +
                                    (tmp / "merged") + " --json");
  ASSERT_EQ(merged.code, 0) << merged.err;
  const json mj = json::parse(merged.out);
  ASSERT_EQ(mj["merged"].size(), 2u);  // layers 0 and 2
  EXPECT_EQ(mj["merged"][0]["shards"], 2);
  const double worst = expect_same_stats(tmp / "one", tmp / "merged", 1e-6);
  std::printf("[ scaleout ] stats merged from 2 shards vs one pass: max relative difference %.3g\n", worst);

  // The merged cache is what a later run loads.
  const auto again = test::run_cli(stats_args("--cache-dir " + (tmp / "merged") + " --json"));
  ASSERT_EQ(again.code, 0) << again.err;
  const json aj = json::parse(again.out);  // (a range-for over a temporary's member would read freed memory)
  for (const auto& l : aj["layers"]) EXPECT_TRUE(l["from_cache"].get<bool>());

  // A shard missing, or given twice: bad input.
  const auto missing = test::run_cli("stats merge " + (tmp / "p0") + " --cache-dir " + (tmp / "m2"));
  EXPECT_EQ(missing.code, 2);
  EXPECT_NE(missing.err.find("shard 1/2 of "), std::string::npos) << missing.err;
  EXPECT_NE(missing.err.find("is missing"), std::string::npos) << missing.err;
  const auto twice = test::run_cli("stats merge " + (tmp / "p0") + " " + (tmp / "p0") + " --cache-dir " + (tmp / "m3"));
  EXPECT_EQ(twice.code, 2);
  EXPECT_NE(twice.err.find("is given twice"), std::string::npos) << twice.err;
}

TEST(Mpi, EvalOnTwoRanksEqualsOneProcess) {
  if (!have_mpirun()) GTEST_SKIP() << "mpirun is not installed (tools/setup.sh installs Open MPI)";
  SchedulerEnv env;
  TempDir tmp;
  const auto one = test::run_cli(eval_args(tmp / "one", ""));
  ASSERT_EQ(one.code, 0) << one.err;
  const auto r = run_shell(mpirun(2) + " " + eval_args(tmp / "mpi", "--mpi"));
  ASSERT_EQ(r.code, 0) << r.out << r.err;
  EXPECT_EQ(summary_without_time(tmp / "mpi"), summary_without_time(tmp / "one"));
  EXPECT_EQ(json::parse(test::read_file(tmp / "mpi/shards/0-of-2/summary.json"))["num_cases"], 2);
  EXPECT_EQ(json::parse(test::read_file(tmp / "mpi/shards/1-of-2/summary.json"))["num_cases"], 1);

  // One rank failing (rank 1's folder holds a finished run, no --resume): every rank exits non-zero, nothing merged.
  fs::remove_all(tmp / "mpi/shards/0-of-2");
  fs::remove(tmp / "mpi/summary.json");
  const auto bad = run_shell(mpirun(2) + " " + eval_args(tmp / "mpi", "--mpi"));
  EXPECT_NE(bad.code, 0);
  EXPECT_NE(bad.err.find("--mpi: another rank stopped on bad input"), std::string::npos) << bad.err;
  EXPECT_TRUE(fs::exists(tmp / "mpi/shards/0-of-2/summary.json"));  // rank 0 did its shard
  EXPECT_FALSE(fs::exists(tmp / "mpi/summary.json"));
}

TEST(Mpi, StatsOnTwoRanksEqualOnePass) {
  if (!have_mpirun()) GTEST_SKIP() << "mpirun is not installed (tools/setup.sh installs Open MPI)";
  SchedulerEnv env;
  TempDir tmp;
  const auto one = test::run_cli(stats_args("--cache-dir " + (tmp / "one")));
  ASSERT_EQ(one.code, 0) << one.err;
  const auto r = run_shell(mpirun(2) + " " + stats_args("--mpi --json --cache-dir " + (tmp / "mpi")));
  ASSERT_EQ(r.code, 0) << r.out << r.err;
  const json j = json::parse(r.out);  // rank 0 alone reports, from the merged cache
  ASSERT_EQ(j["layers"].size(), 2u);
  for (const auto& l : j["layers"]) EXPECT_TRUE(l["from_cache"].get<bool>());
  EXPECT_FALSE(fs::exists(tmp / "mpi/mpi-parts") && !fs::is_empty(tmp / "mpi/mpi-parts"));  // the ranks' shards: removed
  const double worst = expect_same_stats(tmp / "one", tmp / "mpi", 1e-6);
  std::printf("[ scaleout ] mpirun -np 2 stats vs one pass: max relative difference %.3g\n", worst);
}

}  // namespace
}  // namespace moedit
