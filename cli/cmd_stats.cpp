// moedit stats MODEL --layer L [--corpus FILE]: per-expert key statistics C = E[k kᵀ] for ROME edits at layer L,
// streamed over a text corpus (forward stopped at L) and cached on disk (editor/keystats.h).
// In parallel (editor/keystats_shards.h): `--shard i/n|auto --out DIR` writes one corpus shard's sums and counts,
// `moedit stats merge DIR...` adds them into the cache; under mpirun, `--mpi` does both (rank 0 merges).
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/mpi.h"
#include "cli/shard.h"
#include "editor/keystats.h"
#include "editor/keystats_shards.h"
#include "io/errors.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"

namespace moedit::cli {

namespace {

struct StatsArgs {
  std::string model, corpus, cache_dir, shard, out;
  std::vector<int> layers;
  int64_t max_tokens = 0;
  int seq_len = 256;
  bool force = false, json = false, mpi = false;
  std::vector<std::string> merge_dirs;
};

std::shared_ptr<Model> load_checked(const StatsArgs& a) {
  require_input(!a.layers.empty(), "--layer L is required (the MoE layer(s) whose statistics to compute)");
  auto m = load_model(a.model);
  const ModelConfig& c = m->config();
  for (int l : a.layers) {
    require_input(l >= 0 && l < c.n_layers,
                  "layer " + std::to_string(l) + " is out of range [0, " + std::to_string(c.n_layers) + ")");
    require_input(c.is_moe(l), "layer " + std::to_string(l) + " is a dense layer, not an MoE layer");
  }
  return m;
}

KeyStatsOptions stats_options(const StatsArgs& a) {
  KeyStatsOptions o;
  if (!a.corpus.empty()) o.corpus = a.corpus;
  if (!a.cache_dir.empty()) o.cache_dir = a.cache_dir;
  o.max_tokens = a.max_tokens;
  o.seq_len = a.seq_len;
  if (::isatty(2))
    o.progress = [](int64_t done, int64_t total) {
      const int w = 40, f = total ? int(w * done / total) : w;
      std::fprintf(stderr, "\r[%s%s] %lld/%lld tokens", std::string(size_t(f), '#').c_str(),
                   std::string(size_t(w - f), ' ').c_str(), static_cast<long long>(done),
                   static_cast<long long>(total));
      if (done >= total) std::fprintf(stderr, "\n");
    };
  return o;
}

void run_stats(const StatsArgs& a) {
  auto m = load_checked(a);
  const Tokenizer tok = Tokenizer::from_file(a.model);
  const KeyStatsOptions o = stats_options(a);
  KeyStatsCache cache(*m, tok, o);
  nlohmann::json out = {{"model", a.model}, {"corpus", o.corpus}, {"layers", nlohmann::json::array()}};
  int warnings = 0;
  for (int l : a.layers) {
    const auto t0 = std::chrono::steady_clock::now();
    const auto st = cache.layer(l, a.force);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    nlohmann::json lj = {{"layer", l},
                         {"cache_dir", cache.layer_dir(l)},
                         {"from_cache", cache.loaded_from_disk(l)},
                         {"corpus_tokens", cache.corpus_tokens(l)},
                         {"seconds", secs},
                         {"experts", nlohmann::json::array()}};
    if (!a.json)
      std::printf("layer %d: %s in %.2fs (%lld corpus tokens)\n  cache: %s\n", l,
                  cache.loaded_from_disk(l) ? "loaded" : "computed", secs,
                  static_cast<long long>(cache.corpus_tokens(l)), cache.layer_dir(l).c_str());
    for (const auto& s : st) {
      const int64_t dim = s->mom2.rows();
      const bool low = s->count < 2 * dim;
      const std::string name = expert_label(s->expert, m->config().n_shared_experts);
      lj["experts"].push_back({{"expert", expert_json(s->expert, m->config().n_shared_experts)},
                               {"tokens", s->count},
                               {"key_size", dim},
                               {"trace", s->mom2.trace()},
                               {"low_count", low}});
      if (!a.json) std::printf("  expert %-6s %10lld tokens  (key size %lld)%s\n", name.c_str(),
                               static_cast<long long>(s->count), static_cast<long long>(dim),
                               low ? "  LOW" : "");
      if (low) {
        ++warnings;
        std::fprintf(stderr,
                     "moedit: warning: layer %d expert %s saw %lld tokens, fewer than 2x its key size (%lld): its "
                     "statistics are poorly conditioned (use a larger corpus or --ridge when editing)\n",
                     l, name.c_str(), static_cast<long long>(s->count), static_cast<long long>(dim));
      }
    }
    out["layers"].push_back(std::move(lj));
  }
  out["warnings"] = warnings;
  if (a.json) std::printf("%s\n", out.dump().c_str());
}

// One corpus shard of every --layer: its sums and counts under `out` (not a cache entry), for `moedit stats merge`.
void write_shards(const StatsArgs& a, const Shard& shard, const std::string& out, bool print) {
  auto m = load_checked(a);
  const Tokenizer tok = Tokenizer::from_file(a.model);
  KeyStatsCache cache(*m, tok, stats_options(a));
  for (int l : a.layers) {
    const int64_t tokens = cache.write_shard(l, shard.index, shard.count, out);
    if (print)
      std::printf("layer %d: shard %s, %lld corpus tokens\n  sums: %s/%s\n", l, shard.str().c_str(),
                  static_cast<long long>(tokens), out.c_str(), cache.layer_subdir(l).c_str());
  }
}

void print_merged(const std::vector<MergedKeyStats>& merged, bool json) {
  nlohmann::json out = nlohmann::json::array();
  for (const auto& m : merged) {
    out.push_back({{"layer", m.layer}, {"shards", m.n_shards}, {"experts", m.experts}, {"corpus_tokens", m.tokens},
                   {"cache_dir", m.dir}});
    if (!json)
      std::printf("layer %d: %d shards merged, %d experts, %lld corpus tokens\n  cache: %s\n", m.layer, m.n_shards,
                  m.experts, static_cast<long long>(m.tokens), m.dir.c_str());
  }
  if (json) std::printf("%s\n", nlohmann::json{{"merged", out}}.dump().c_str());
}

// --mpi: rank r computes shard r/n into PARTS/shard<r>; rank 0 merges them into the cache, then reports as one pass
// would (from the cache). PARTS: --out, else a folder under the cache (removed after the merge).
void run_mpi(const StatsArgs& a) {
  require_input(a.shard.empty(), "--mpi takes the shard from the MPI rank: drop --shard " + a.shard);
  const std::string cache_dir = stats_options(a).cache_dir;
  std::string key = a.model + "\n" + a.corpus + "\n" + std::to_string(a.seq_len) + "\n" + std::to_string(a.max_tokens);
  for (int l : a.layers) key += "\n" + std::to_string(l);
  const std::string parts = a.out.empty() ? cache_dir + "/mpi-parts/" + hex64(hash_bytes(key.data(), key.size())) : a.out;
  const auto part = [&parts](int r) { return parts + "/shard" + std::to_string(r); };
  mpi::run_then_merge([&](int rank, int size) { write_shards(a, Shard{rank, size, "MPI"}, part(rank), false); },
                      [&](int size) {
                        std::vector<std::string> dirs;
                        for (int r = 0; r < size; ++r) dirs.push_back(part(r));
                        merge_key_stat_shards(dirs, cache_dir);
                        if (a.out.empty()) {
                          std::filesystem::remove_all(parts);
                          std::error_code ec;  // and mpi-parts/ itself once no other run's shards are left in it
                          std::filesystem::remove(std::filesystem::path(parts).parent_path(), ec);
                        }
                        StatsArgs report = a;
                        report.force = false;  // load what was just merged
                        run_stats(report);
                      });
}

void run(const StatsArgs& a) {
  if (a.mpi) return run_mpi(a);
  if (a.shard.empty()) {
    require_input(a.out.empty(), "--out DIR goes with --shard i/n or --mpi (the cache holds a one-pass result)");
    return run_stats(a);
  }
  const Shard shard = parse_shard(a.shard);
  require_input(!a.out.empty(), "--shard needs --out DIR: the shard's sums, for `moedit stats merge`");
  if (a.shard == "auto" && !a.json)
    std::fprintf(stderr, "moedit: --shard auto: shard %s (%s)\n", shard.str().c_str(), shard.source.c_str());
  write_shards(a, shard, a.out, !a.json);
}

void register_stats(CLI::App& app) {
  static StatsArgs a;
  auto* cmd = add_model_command(
      app, "stats", "Per-expert key statistics (E[k kᵀ]) for ROME edits, cached on disk", a.model);
  cmd->add_option("--layer", a.layers, "MoE layer(s) (required)");
  cmd->add_option("--corpus", a.corpus, "Text corpus (default: bundled WikiText-2 test split)");
  cmd->add_option("--max-tokens", a.max_tokens, "Cap on corpus tokens (0: all)")->capture_default_str();
  cmd->add_option("--seq-len", a.seq_len, "Window length")->capture_default_str()->check(CLI::Range(2, 1 << 20));
  cmd->add_option("--cache-dir", a.cache_dir, "Cache folder (default: $MOEDIT_CACHE or ~/.cache/moedit)");
  cmd->add_flag("--force", a.force, "Recompute even when cached");
  cmd->add_option("--shard", a.shard,
                  "Compute corpus shard i of n (windows i, i+n, ...) into --out, for `moedit stats merge`; auto: from a "
                  "Slurm job array or an MPI launcher (as `moedit eval --shard auto`)");
  cmd->add_option("--out", a.out, "Shard folder of --shard (with --mpi: where the ranks' shards go)");
  cmd->add_flag("--mpi", a.mpi, "Under mpirun: each rank computes its corpus shard, rank 0 merges into the cache");
  add_json_flag(cmd, a.json);
  cmd->callback([] {
    if (!a.merge_dirs.empty()) return;  // the merge subcommand ran
    run(a);
  });

  auto* merge = cmd->add_subcommand("merge", "Add the sums and counts of corpus shards into the cache (exact)");
  merge->add_option("dirs", a.merge_dirs, "Shard folders (`moedit stats --shard i/n --out DIR`)")->required();
  merge->add_option("--cache-dir", a.cache_dir, "Cache folder (default: $MOEDIT_CACHE or ~/.cache/moedit)");
  add_json_flag(merge, a.json);
  merge->callback([] {
    print_merged(merge_key_stat_shards(a.merge_dirs, a.cache_dir.empty() ? default_cache_dir() : a.cache_dir),
                 a.json);
  });
}

}  // namespace

MOEDIT_COMMAND(55, register_stats)

}  // namespace moedit::cli
