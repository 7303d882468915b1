// Reading NumPy .npy files (format 1.0/2.0/3.0) of little-endian float32 in C order — what io/npy.h writes and
// `numpy.save` writes for a float32 array. InputError naming the file on anything else.
#pragma once
#include <string>
#include <vector>

namespace moedit {

struct NpyF32 {
  std::vector<size_t> shape;
  std::vector<float> values;  // product of shape values
};
NpyF32 read_npy_f32(const std::string& path);

}  // namespace moedit
