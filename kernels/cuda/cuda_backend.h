// The CUDA backend (kernels/cuda/, built with -DMOEDIT_CUDA=ON): the ops of kernels/backend.h on one NVIDIA GPU, in
// that device's memory, on one stream per device. kernels/device.h picks a backend by name for the CLI.
#pragma once
#include <string>

#include "kernels/backend.h"

namespace moedit {

// CUDA devices this process can use: 0 where there is no driver or no GPU (never throws).
int cuda_device_count();

// The backend of CUDA device `device`, created on first use and kept for the life of the process. Throws
// std::runtime_error naming the cause when there is no such device.
const Backend& cuda_backend(int device = 0);

// Bytes that device `device`'s resident copies of host data hold now (tests: a destroyed model's copies are gone).
size_t cuda_resident_bytes(int device = 0);

// Device memory of device `device`'s backend: held now (copies, pool, caches) and the most held since the last
// cuda_reset_peak (tests: a memory cap holds).
struct CudaMemory {
  size_t allocated = 0, peak = 0, resident = 0;
};
CudaMemory cuda_memory(int device = 0);
void cuda_reset_peak(int device = 0);

// Where a CUDA backend's solve_spd runs: "cuSOLVER (libcusolver.so.N)", or "the host (no cuSOLVER: why)" — cuSOLVER
// is opened at run time on the first solve, and without it the solve runs on the host.
std::string cuda_solver();

}  // namespace moedit
