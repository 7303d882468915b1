// Parsing of --ids lists shared by the commands that take token ids.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "io/errors.h"
#include "io/text.h"

namespace moedit::cli {

// "1,2,3" → {1, 2, 3}; InputError naming the flag for anything else.
inline std::vector<int32_t> parse_ids(const std::string& s, const std::string& flag = "--ids") {
  std::vector<int32_t> ids;
  for (const std::string& tok : split_list(s)) ids.push_back(parse_token_id(tok, flag));
  if (ids.empty()) throw InputError(flag + ": no token ids given");
  return ids;
}

}  // namespace moedit::cli
