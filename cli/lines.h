// The non-blank lines of a text file (CR stripped), for commands that read one item per line.
#pragma once
#include <fstream>
#include <string>
#include <vector>

#include "io/errors.h"

namespace moedit::cli {

// InputError "PATH: cannot open (what)" when the file cannot be read.
inline std::vector<std::string> nonblank_lines(const std::string& path, const std::string& what) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw InputError(path + ": cannot open (" + what + ")");
  std::vector<std::string> out;
  for (std::string l; std::getline(f, l);) {
    if (!l.empty() && l.back() == '\r') l.pop_back();
    if (l.find_first_not_of(" \t") != std::string::npos) out.push_back(l);
  }
  return out;
}

}  // namespace moedit::cli
