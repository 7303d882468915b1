// NumPy .npy writer (see io/npy.h).
#include "io/npy.h"

#include <stdexcept>

namespace moedit {

std::string npy_f32(const std::vector<size_t>& shape, const std::vector<float>& values) {
  size_t n = 1;
  std::string dims;
  for (size_t i = 0; i < shape.size(); ++i) {
    n *= shape[i];
    dims += (i ? ", " : "") + std::to_string(shape[i]);
  }
  if (shape.size() == 1) dims += ",";  // a Python 1-tuple
  if (n != values.size()) throw std::logic_error("npy_f32: the shape does not match the number of values");
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims + "), }";
  const size_t unpadded = 10 + header.size() + 1;
  header += std::string((64 - unpadded % 64) % 64, ' ') + "\n";
  std::string out("\x93NUMPY\x01\x00", 8);
  out += char(header.size() & 0xff);
  out += char((header.size() >> 8) & 0xff);
  out += header;
  out.append(reinterpret_cast<const char*>(values.data()), sizeof(float) * values.size());
  return out;
}

}  // namespace moedit
