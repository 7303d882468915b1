// Small file helpers shared by the commands and the report writers.
#pragma once
#include <iosfwd>
#include <string>
#include <string_view>

namespace moedit {

// Writes `bytes` to `path` atomically: path + ".tmp.<pid>", then rename, so a reader never sees a half-written file and
// an existing file survives a failed write. Throws InputError naming `path` when it cannot be opened (missing
// folder, no permission), std::runtime_error when writing or renaming fails (the temp file is removed).
void write_file_atomic(const std::string& path, std::string_view bytes);

// The end of an atomic write through `out`, open on the file `tmp`: flushes and closes it, then renames tmp to
// `path`. Throws std::runtime_error(`name` + ": write failed") when writing failed, path + ": rename failed (…)"
// when renaming does; tmp is removed either way.
void commit_temp_file(std::ofstream& out, const std::string& tmp, const std::string& path, const std::string& name);

}  // namespace moedit
