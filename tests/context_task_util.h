// Test helper shared by the context-task tests (tests/test_context_task.cpp, tests/test_train_cli.cpp).
#pragma once
#include <nlohmann/json.hpp>
#include <string>

#include "datasets/context_task.h"
#include "test_util.h"

namespace moedit::test {

// The first n examples of the bundled train split, written to t/task.json; returns its path.
inline std::string small_task(const TempDir& t, size_t n) {
  const nlohmann::json all = nlohmann::json::parse(read_file(bundled_context_task_path("train")));
  nlohmann::json some = nlohmann::json::array();
  for (size_t i = 0; i < n; ++i) some.push_back(all[i]);
  const std::string p = t / "task.json";
  write_file(p, some.dump());
  return p;
}

}  // namespace moedit::test
