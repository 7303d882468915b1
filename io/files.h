// Small file helpers shared by the commands and the report writers.
#pragma once
#include <string>
#include <string_view>

namespace moedit {

// Writes `bytes` to `path` atomically: path + ".tmp.<pid>", then rename, so a reader never sees a half-written file and
// an existing file survives a failed write. Throws InputError naming `path` when it cannot be opened (missing
// folder, no permission), std::runtime_error when writing or renaming fails (the temp file is removed).
void write_file_atomic(const std::string& path, std::string_view bytes);

}  // namespace moedit
