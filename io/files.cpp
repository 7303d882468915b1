#include "io/files.h"

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>

#include "io/errors.h"

namespace moedit {

void write_file_atomic(const std::string& path, std::string_view bytes) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());  // concurrent writers never share one
  std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
  if (!out) throw InputError(path + ": cannot write (does the folder exist?)");
  out.write(bytes.data(), std::streamsize(bytes.size()));
  commit_temp_file(out, tmp, path, path);
}

void commit_temp_file(std::ofstream& out, const std::string& tmp, const std::string& path, const std::string& name) {
  out.flush();
  if (!out) {
    out.close();
    std::remove(tmp.c_str());
    throw std::runtime_error(name + ": write failed");
  }
  out.close();
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::remove(tmp.c_str());
    throw std::runtime_error(path + ": rename failed (" + ec.message() + ")");
  }
}

}  // namespace moedit
