// Parsing of --ids lists shared by the commands that take token ids.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "io/errors.h"

namespace moedit::cli {

// "1,2,3" → {1, 2, 3}; InputError naming the flag for anything else.
inline std::vector<int32_t> parse_ids(const std::string& s, const std::string& flag = "--ids") {
  std::vector<int32_t> ids;
  size_t i = 0;
  while (i < s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    const std::string tok = s.substr(i, j - i);
    try {
      size_t used = 0;
      const long v = std::stol(tok, &used);
      if (used != tok.size() || v < 0 || v > INT32_MAX) throw std::invalid_argument(tok);
      ids.push_back(int32_t(v));
    } catch (const std::exception&) {
      throw InputError(flag + ": '" + tok + "' is not a token id");
    }
    i = j + 1;
  }
  if (ids.empty()) throw InputError(flag + ": no token ids given");
  return ids;
}

}  // namespace moedit::cli
