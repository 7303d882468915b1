// Backends by name, for the CLI's --device: "cpu", "cuda" (device 0) and "cuda:N"; precisions by name (--precision).
// Compiles with and without CUDA (MOEDIT_HAS_CUDA); without it, asking for a CUDA device says how to build one.
#pragma once
#include <string>

#include "kernels/backend.h"

namespace moedit {

// The backend called `name`. Throws std::invalid_argument for a name that is none of the above, and
// std::runtime_error for a CUDA device this build or this machine does not have.
const Backend& backend_named(const std::string& name);

// Whether this build has the CUDA backend, and the CUDA devices it sees (0 without CUDA, a driver or a GPU).
bool cuda_built();
int gpu_count();

// "cuda" where this build has CUDA and a GPU is present, else "cpu" (the default --device).
std::string default_device();

// `name` (bf16 or fp32) set on `be` (--precision): std::invalid_argument for another name, and for bf16 on a backend
// that computes in fp32 only (the CPU).
void set_precision_named(const Backend& be, const std::string& name);

}  // namespace moedit
