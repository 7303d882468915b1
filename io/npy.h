// NumPy .npy (format 1.0) for float32 arrays in C order: what `numpy.load` reads.
#pragma once
#include <string>
#include <vector>

namespace moedit {

// The file's bytes: magic, version, header {'descr': '<f4', 'fortran_order': False, 'shape': (...)} padded with
// spaces to a multiple of 64 bytes and ending in '\n', then the values (little-endian, as this machine stores them).
// values holds the product of shape floats.
std::string npy_f32(const std::vector<size_t>& shape, const std::vector<float>& values);

}  // namespace moedit
