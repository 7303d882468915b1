// Key statistics over corpus shards, merged exactly: `moedit stats --shard i/n --out DIR` (or one MPI rank) writes
// shard i, `moedit stats merge DIR...` (or rank 0) adds them up into the cache.
//
// Shard i of n holds the corpus windows w with w mod n == i (KeyStatsCache::write_shard; every window runs from
// position 0, so a window's keys do not depend on the others). A shard folder mirrors the cache's layout
// (<key-weights hash>/layer<L>/<corpus hash>-s<seq_len>-n<max>/expert<E>.safetensors, editor/keystats.h), but each
// file holds the fp64 sum Σ k kᵀ ("sum" [I, I] F64, row-major) and its count instead of the fp32 mean, with the
// cache file's metadata plus shard, n_shards and the shard's tokens. Merging checks that the shards 0..n−1 of each
// file are there exactly once with the same metadata otherwise, adds sums, counts and tokens in shard order, and
// writes mom2 = moment_from_sum(...) with a one-pass file's metadata to the path a single pass writes: later
// `stats`, `edit` and `eval` runs load it as if computed in one pass. Keys are batch-invariant and accumulated in
// fp64, so the two differ only by the order of fp64 additions, which the final rounding to fp32 hides (the demo
// model's merged matrices equal one pass bit for bit; tests/test_scaleout.cpp requires ≤ 1e-6 relative).
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "editor/keystats.h"

namespace moedit {

// One shard file; md is the cache file's metadata (its "format" is replaced by the shard format).
void write_sum_file(const std::string& path, const KeySum& s, std::map<std::string, std::string> md, int shard,
                    int n_shards);

struct MergedKeyStats {
  std::string dir;      // the cache folder written (cache_dir/<subdir>)
  int layer = -1;
  int n_shards = 0;
  int experts = 0;      // files merged
  int64_t tokens = 0;   // corpus tokens over all shards
};
// Merges the shard folders into cache_dir (one entry per cache folder found in them). InputError naming the file
// and field for a missing or duplicated shard, mismatched metadata or shapes, or a folder without shard files.
std::vector<MergedKeyStats> merge_key_stat_shards(const std::vector<std::string>& shard_dirs,
                                                  const std::string& cache_dir);

}  // namespace moedit
