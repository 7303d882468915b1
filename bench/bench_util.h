// Timing helpers shared by the benchmarks.
#pragma once
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

namespace moedit::bench {

using Clock = std::chrono::steady_clock;

inline double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// The fastest of `reps` runs of f, in seconds (the least disturbed by other load on the machine).
template <typename F>
double best_of(int reps, F&& f) {
  double best = 1e300;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = Clock::now();
    f();
    best = std::min(best, seconds_since(t0));
  }
  return best;
}

// The value after the flag argv[i] (i moves onto it); without one, prints `missing` (a printf format given the
// flag) to stderr and exits 2.
inline std::string flag_value(int argc, char** argv, int& i, const char* missing) {
  if (i + 1 >= argc) {
    std::fprintf(stderr, missing, argv[i]);
    std::exit(2);
  }
  return argv[++i];
}

// The sequences packed into batches of about `budget` tokens, in order (as tracing/routing.h capture_routing packs).
inline std::vector<std::vector<std::vector<int32_t>>> batches_of(const std::vector<std::vector<int32_t>>& seqs,
                                                                 size_t budget) {
  std::vector<std::vector<std::vector<int32_t>>> out;
  for (size_t i = 0; i < seqs.size();) {
    size_t j = i, n = 0;
    while (j < seqs.size() && (j == i || n + seqs[j].size() <= budget)) n += seqs[j++].size();
    out.emplace_back(seqs.begin() + long(i), seqs.begin() + long(j));
    i = j;
  }
  return out;
}

}  // namespace moedit::bench
