// Shared by the libFuzzer targets: write the input to a scratch file (the parsers under test read files).
#pragma once
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <string>

namespace moedit::fuzz {

// A per-process scratch path in /dev/shm (fast) or /tmp.
inline std::string scratch(const char* name) {
  const char* base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
  return std::string(base) + "/moedit_fuzz_" + std::to_string(getpid()) + "_" + name;
}

inline void write(const std::string& path, const uint8_t* data, size_t size) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) return;
  std::fwrite(data, 1, size, f);
  std::fclose(f);
}

}  // namespace moedit::fuzz
