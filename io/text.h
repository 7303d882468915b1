// Small parsers of user-given text shared by the flags and the corpus readers: comma lists and token ids.
#pragma once
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "io/errors.h"

namespace moedit {

// "a,b,,c" → {"a", "b", "", "c"}: the pieces between the separators as std::getline cuts them (none after a
// trailing separator, none at all for "").
inline std::vector<std::string> split_list(const std::string& s, char sep = ',') {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string piece; std::getline(ss, piece, sep);) out.push_back(piece);
  return out;
}

// A token id: the whole of `s` a number in [0, INT32_MAX]; InputError "<where>: '<s>' is not a token id" otherwise.
inline int32_t parse_token_id(const std::string& s, const std::string& where) {
  try {
    size_t used = 0;
    const long v = std::stol(s, &used);
    if (used != s.size() || v < 0 || v > INT32_MAX) throw std::invalid_argument(s);
    return int32_t(v);
  } catch (const std::exception&) {
    throw InputError(where + ": '" + s + "' is not a token id");
  }
}

}  // namespace moedit
