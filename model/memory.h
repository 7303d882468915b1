// What a checkpoint needs in memory and what this machine offers: weights are mapped in place (page cache; a model
// larger than RAM runs with the kernel paging them in), and only norms, routers, FP8-dequantised and edited
// matrices are fp32 copies. A model whose mapping cannot fit the address-space limit, or whose copies cannot fit in
// RAM, stops before loading with a message that says both numbers (exit 1), not with std::bad_alloc.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

#include "model/config.h"

namespace moedit {

// Not enough memory for what was asked (a runtime failure: exit 1).
class ResourceError : public std::runtime_error {
 public:
  explicit ResourceError(const std::string& msg) : std::runtime_error(msg) {}
};

struct MachineMemory {
  uint64_t ram = 0;        // MemTotal
  uint64_t available = 0;  // MemAvailable (free + reclaimable page cache)
  uint64_t as_limit = 0;   // RLIMIT_AS (ulimit -v, prlimit --as); 0 = unlimited
};
MachineMemory machine_memory();

struct CheckpointMemory {
  uint64_t file_bytes = 0;  // the safetensors files, mapped
  uint64_t fp32_bytes = 0;  // fp32 copies made at load: norms, biases, routers, FP8 weights, de-interleaved MLA rows
};
// From config.json and the safetensors headers' sizes (the dtype decides what is mapped and what is copied).
CheckpointMemory checkpoint_memory(const ModelConfig& c, const std::string& path);

// "13.84 GB"
std::string gb(uint64_t bytes);

// Throws ResourceError naming the model, what it needs and what is available when the mapping exceeds the
// address-space limit or the fp32 copies exceed the available RAM.
void check_fits(const std::string& path, const CheckpointMemory& need, const MachineMemory& have);

// Training state per trainable parameter: an fp32 copy of the weight, its gradient and AdamW's two moments.
inline constexpr uint64_t kTrainBytesPerParam = 16;
// Throws ResourceError naming the model, the trainable parameters, the bytes their state needs and what is available
// when that state exceeds the available RAM (or, with the mapping, the address-space limit); before any allocation.
void check_training_fits(const std::string& path, uint64_t trainable_params, const CheckpointMemory& need,
                         const MachineMemory& have);

}  // namespace moedit
