// Backends by name (kernels/device.h).
#include "kernels/device.h"

#include <stdexcept>

#ifdef MOEDIT_HAS_CUDA
#include "kernels/cuda/cuda_backend.h"
#endif

namespace moedit {

namespace {

// The N of "cuda:N" (−1 for a malformed suffix).
int device_index(const std::string& name) {
  if (name == "cuda") return 0;
  const std::string digits = name.substr(5);
  if (digits.empty() || digits.size() > 6 || digits.find_first_not_of("0123456789") != std::string::npos) return -1;
  return std::stoi(digits);
}

}  // namespace

bool cuda_built() {
#ifdef MOEDIT_HAS_CUDA
  return true;
#else
  return false;
#endif
}

int gpu_count() {
#ifdef MOEDIT_HAS_CUDA
  return cuda_device_count();
#else
  return 0;
#endif
}

std::string default_device() { return gpu_count() > 0 ? "cuda" : "cpu"; }

const Backend& backend_named(const std::string& name) {
  if (name == "cpu") return cpu_backend();
  if (name.rfind("cuda", 0) != 0 || (name.size() > 4 && name[4] != ':') || device_index(name) < 0)
    throw std::invalid_argument("unknown device '" + name + "' (expected cpu, cuda or cuda:N)");
#ifdef MOEDIT_HAS_CUDA
  return cuda_backend(device_index(name));
#else
  throw std::runtime_error("moedit was built without CUDA (configure with -DMOEDIT_CUDA=ON)");
#endif
}

void set_precision_named(const Backend& be, const std::string& name) {
  if (name != "fp32" && name != "bf16")
    throw std::invalid_argument("unknown precision '" + name + "' (expected bf16 or fp32)");
  be.set_precision(name == "bf16" ? Precision::bf16 : Precision::fp32);  // a backend without bf16 refuses it
}

}  // namespace moedit
