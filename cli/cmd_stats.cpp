// moedit stats MODEL --layer L [--corpus FILE]: per-expert key statistics C = E[k kᵀ] for ROME edits at layer L,
// streamed over a text corpus (forward stopped at L) and cached on disk (editor/keystats.h).
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "editor/keystats.h"
#include "io/errors.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"

namespace moedit::cli {

namespace {

struct StatsArgs {
  std::string model, corpus, cache_dir;
  std::vector<int> layers;
  int64_t max_tokens = 0;
  int seq_len = 256;
  bool force = false, json = false;
};

void run_stats(const StatsArgs& a) {
  auto m = load_model(a.model);
  const ModelConfig& c = m->config();
  for (int l : a.layers) {
    require_input(l >= 0 && l < c.n_layers,
                  "layer " + std::to_string(l) + " is out of range [0, " + std::to_string(c.n_layers) + ")");
    require_input(c.is_moe(l), "layer " + std::to_string(l) + " is a dense layer, not an MoE layer");
  }
  const Tokenizer tok = Tokenizer::from_file(a.model);
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

void register_stats(CLI::App& app) {
  static StatsArgs a;
  auto* cmd = add_model_command(
      app, "stats", "Per-expert key statistics (E[k kᵀ]) for ROME edits, cached on disk", a.model);
  cmd->add_option("--layer", a.layers, "MoE layer(s)")->required();
  cmd->add_option("--corpus", a.corpus, "Text corpus (default: bundled WikiText-2 test split)");
  cmd->add_option("--max-tokens", a.max_tokens, "Cap on corpus tokens (0: all)")->capture_default_str();
  cmd->add_option("--seq-len", a.seq_len, "Window length")->capture_default_str()->check(CLI::Range(2, 1 << 20));
  cmd->add_option("--cache-dir", a.cache_dir, "Cache folder (default: $MOEDIT_CACHE or ~/.cache/moedit)");
  cmd->add_flag("--force", a.force, "Recompute even when cached");
  add_json_flag(cmd, a.json);
  cmd->callback([] { run_stats(a); });
}

}  // namespace

MOEDIT_COMMAND(55, register_stats)

}  // namespace moedit::cli
