// Helpers of the tests that run `moedit eval` on the demo model (test_eval.cpp, test_scaleout.cpp).
#pragma once
#include <string>

#include <nlohmann/json.hpp>

#include "test_util.h"

namespace moedit::test {

inline std::string demo_model_dir() { return source_dir() + "/models/moedit-demo"; }
inline std::string bundled_counterfact() {
  return source_dir() + "/datasets/data/counterfact/counterfact_preknown.json";
}

// Fast settings: the last layer, no key statistics, 2 v* steps, short generations on even case ids.
inline std::string fast_eval_args(const std::string& out, const std::string& extra = "") {
  return "eval " + demo_model_dir() + " --dataset " + bundled_counterfact() +
         " --layer 3 --no-mom2 --steps 2 --gen-length 24 --generation-interval 2 --quiet --out " + out + " " + extra;
}

// A run's summary.json without what may differ between equal runs (wall time, settings).
inline nlohmann::json summary_without_time(const std::string& dir) {
  nlohmann::json s = nlohmann::json::parse(read_file(dir + "/summary.json"));
  s.erase("time");
  s.erase("settings");
  return s;
}

}  // namespace moedit::test
