// read_npy_f32 (see io/npy_read.h).
#include "io/npy_read.h"

#include <cstring>
#include <fstream>
#include <regex>
#include <sstream>

#include "io/errors.h"

namespace moedit {

NpyF32 read_npy_f32(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw InputError(path + ": cannot open");
  std::stringstream ss;
  ss << f.rdbuf();
  const std::string b = ss.str();
  require_input(b.size() >= 10 && b.compare(0, 6, "\x93NUMPY") == 0, path + ": not a .npy file (bad magic)");
  const int major = static_cast<unsigned char>(b[6]);
  require_input(major >= 1 && major <= 3, path + ": unsupported .npy version " + std::to_string(major));
  const size_t lenbytes = major == 1 ? 2 : 4, start = 8 + lenbytes;
  require_input(b.size() >= start, path + ": truncated .npy header");
  size_t hlen = 0;
  for (size_t i = 0; i < lenbytes; ++i) hlen |= size_t(static_cast<unsigned char>(b[8 + i])) << (8 * i);
  require_input(b.size() >= start + hlen, path + ": .npy header runs beyond the end of the file");
  const std::string h = b.substr(start, hlen);
  std::smatch m;
  require_input(std::regex_search(h, m, std::regex("'descr'\\s*:\\s*'([^']*)'")) && m[1] == "<f4",
                path + ": field 'descr' must be '<f4' (float32)");
  require_input(std::regex_search(h, m, std::regex("'fortran_order'\\s*:\\s*False")),
                path + ": field 'fortran_order' must be False");
  require_input(std::regex_search(h, m, std::regex("'shape'\\s*:\\s*\\(([^)]*)\\)")), path + ": field 'shape' missing");
  NpyF32 out;
  size_t count = 1;
  const std::string dims = m[1];
  const std::regex digits("\\d+");
  for (std::sregex_iterator it(dims.begin(), dims.end(), digits), end; it != end; ++it) {
    require_input(it->str().size() < 16, path + ": field 'shape' has an entry out of range");
    const size_t dim = std::stoull(it->str());
    require_input(dim == 0 || count <= b.size() / dim, path + ": field 'shape' does not match the file size");
    out.shape.push_back(dim);
    count *= dim;
  }
  const size_t data = start + hlen;
  require_input(b.size() - data == count * 4, path + ": " + std::to_string(b.size() - data) + " data bytes, shape needs " +
                                                  std::to_string(count * 4));
  out.values.resize(count);
  if (count) std::memcpy(out.values.data(), b.data() + data, count * 4);
  return out;
}

}  // namespace moedit
