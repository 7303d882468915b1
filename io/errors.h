// moedit error types.
//
// InputError: the user handed us something malformed (file, field, flag). The CLI prints its message and exits 2.
// Everything else that escapes (std::runtime_error, ...) is a runtime failure: exit 1.
#pragma once
#include <stdexcept>
#include <string>

namespace moedit {

class InputError : public std::runtime_error {
 public:
  explicit InputError(const std::string& msg) : std::runtime_error(msg) {}
};

// Throws InputError(msg) unless cond holds. For validating untrusted input only (not internal invariants).
inline void require_input(bool cond, const std::string& msg) {
  if (!cond) throw InputError(msg);
}

}  // namespace moedit
