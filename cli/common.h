// Helpers shared by the cli/cmd_*.cpp commands.
#pragma once
#include <unistd.h>

#include <cstdio>
#include <exception>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>

#include "io/errors.h"
#include "tokenizer/tokenizer.h"

namespace moedit::cli {

// Prints a command's error as one line on stderr ("moedit: error: …" for bad input, "moedit: runtime failure: …",
// the memory messages) and returns the exit code: 2 for bad input, 1 for everything else (cli/main.cpp).
int report_error(const std::exception_ptr& e);

// The tokenizer.json of a model folder, or nullopt when it has none.
inline std::optional<Tokenizer> model_tokenizer(const std::string& model) {
  const std::filesystem::path p = std::filesystem::path(model) / "tokenizer.json";
  if (!std::filesystem::exists(p)) return std::nullopt;
  return Tokenizer::from_file(p.string());
}

// The same, as an input error saying why it is needed when the folder has none.
inline Tokenizer require_tokenizer(const std::string& model, const std::string& why) {
  std::optional<Tokenizer> t = model_tokenizer(model);
  if (!t) throw InputError(model + ": no tokenizer.json (" + why + ")");
  return std::move(*t);
}

// A "what: done/total" counter on stderr when it is a terminal; empty (no output) otherwise.
inline std::function<void(size_t, size_t)> stderr_counter(const char* what) {
  if (!::isatty(2)) return nullptr;
  return [what](size_t done, size_t total) {
    std::fprintf(stderr, "\r%s: %zu/%zu", what, done, total);
    if (done >= total) std::fprintf(stderr, "\n");
    std::fflush(stderr);
  };
}

}  // namespace moedit::cli
