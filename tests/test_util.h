// Helpers shared by the test files: fixture paths and running the moedit CLI.
#pragma once
#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <sys/wait.h>

namespace moedit::test {

inline std::string source_dir() { return MOEDIT_SOURCE_DIR; }
inline std::string fixture(const std::string& rel) { return source_dir() + "/tests/fixtures/" + rel; }

// A fresh scratch directory under the build tree's temp, removed by the caller's TempDir destructor.
struct TempDir {
  std::filesystem::path path;
  TempDir() {
    char tmpl[] = "/tmp/moedit_test_XXXXXX";
    path = ::mkdtemp(tmpl);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string operator/(const std::string& rel) const { return (path / rel).string(); }
};

inline void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
}

inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

struct CliResult {
  int code = -1;
  std::string out, err;
};

// Runs `moedit <args>` (args are passed to the shell as written; quote them yourself).
inline CliResult run_cli(const std::string& args) {
  TempDir tmp;
  const std::string o = tmp / "out", e = tmp / "err";
  const std::string cmd = std::string(MOEDIT_BIN) + " " + args + " >" + o + " 2>" + e + " </dev/null";
  const int st = std::system(cmd.c_str());
  CliResult r;
  r.code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  r.out = read_file(o);
  r.err = read_file(e);
  return r;
}

}  // namespace moedit::test
