// CUDA error checks for kernels/cuda/: every runtime call and every launch goes through MOEDIT_CUDA_CHECK, which
// throws std::runtime_error naming the call, the file and the line (asynchronous faults surface at the next checked
// call that waits: to_host, synchronize, or any call when MOEDIT_CUDA_SYNC=1 makes every op wait).
#pragma once
#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

namespace moedit::cuda {

[[noreturn]] inline void fail(cudaError_t e, const char* call, const char* file, int line) {
  throw std::runtime_error(std::string("CUDA error: ") + call + " failed with " + cudaGetErrorName(e) + " (" +
                           cudaGetErrorString(e) + ") at " + file + ":" + std::to_string(line));
}

}  // namespace moedit::cuda

#define MOEDIT_CUDA_CHECK(call)                                                          \
  do {                                                                                   \
    const cudaError_t moedit_cuda_err_ = (call);                                         \
    if (moedit_cuda_err_ != cudaSuccess) ::moedit::cuda::fail(moedit_cuda_err_, #call, __FILE__, __LINE__); \
  } while (0)

// After a <<<...>>> launch: a bad configuration is reported here, at the launch's line.
#define MOEDIT_CUDA_LAUNCHED() MOEDIT_CUDA_CHECK(cudaGetLastError())
