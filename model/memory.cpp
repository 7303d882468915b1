// Memory needs of a checkpoint and what the machine offers (see model/memory.h).
#include "model/memory.h"

#include <sys/resource.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "io/errors.h"

namespace fs = std::filesystem;

namespace moedit {

MachineMemory machine_memory() {
  MachineMemory m;
  std::ifstream in("/proc/meminfo");
  std::string key, unit;
  uint64_t kb = 0;
  while (in >> key >> kb) {
    std::getline(in, unit);
    if (key == "MemTotal:") m.ram = kb * 1024;
    if (key == "MemAvailable:") m.available = kb * 1024;
  }
  rlimit r{};
  if (getrlimit(RLIMIT_AS, &r) == 0 && r.rlim_cur != RLIM_INFINITY) m.as_limit = uint64_t(r.rlim_cur);
  return m;
}

std::string gb(uint64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f GB", double(bytes) / 1e9);
  return buf;
}

namespace {

// The safetensors files the loader maps: the shards of model.safetensors.index.json, or model.safetensors, or the
// path itself when it is a file.
std::vector<fs::path> weight_files(const std::string& path) {
  const fs::path p(path);
  if (fs::is_regular_file(p)) return {p};
  if (fs::exists(p / "model.safetensors.index.json")) {
    std::ifstream in(p / "model.safetensors.index.json");
    const auto j = nlohmann::json::parse(in, nullptr, false);
    std::set<std::string> shards;
    if (j.is_object() && j.contains("weight_map") && j["weight_map"].is_object())
      for (const auto& [k, v] : j["weight_map"].items())
        if (v.is_string()) shards.insert(v.get<std::string>());
    std::vector<fs::path> out;
    for (const auto& s : shards) out.push_back(p / s);
    return out;
  }
  return {p / "model.safetensors"};
}

}  // namespace

CheckpointMemory checkpoint_memory(const ModelConfig& c, const std::string& path) {
  CheckpointMemory m;
  std::error_code ec;
  for (const auto& f : weight_files(path)) {
    const auto n = fs::file_size(f, ec);
    if (!ec) m.file_bytes += n;
  }
  const uint64_t H = uint64_t(c.hidden), f4 = sizeof(float);
  // Always copied: norms and biases (≈ a few H per layer), routers [E, H] of MoE layers.
  m.fp32_bytes = uint64_t(c.n_layers) * 8 * H * f4 + uint64_t(c.n_moe_layers()) * uint64_t(c.n_experts) * H * f4;
  // FP8 matrices are read in place with their block scales, like bf16/f16/f32 ones.
  const bool readable = c.dtype.empty() || c.dtype == "bfloat16" || c.dtype == "float16" || c.dtype == "float32";
  if (!readable) {
    m.fp32_bytes += uint64_t(c.total_params()) * f4;  // every matrix widened to fp32
  } else if (c.arch->attention == AttentionKind::MLA && c.rope_interleave) {  // de-interleaved q and kv_a rows
    const uint64_t q_in = c.q_lora_rank ? uint64_t(c.q_lora_rank) : H;
    m.fp32_bytes += uint64_t(c.n_layers) * f4 *
                    (uint64_t(c.n_heads) * uint64_t(c.qk_dim()) * q_in + uint64_t(c.kv_lora_rank + c.qk_rope_dim) * H);
  }
  return m;
}

void check_fits(const std::string& path, const CheckpointMemory& need, const MachineMemory& have) {
  const uint64_t total = need.file_bytes + need.fp32_bytes;
  if (have.as_limit && total > have.as_limit)
    throw ResourceError(path + ": the model needs " + gb(total) + " of address space (" + gb(need.file_bytes) +
                        " of mapped weights + " + gb(need.fp32_bytes) +
                        " of fp32 copies) but the address-space limit (ulimit -v) is " + gb(have.as_limit));
  if (have.available && need.fp32_bytes > have.available)
    throw ResourceError(path + ": the model needs " + gb(need.fp32_bytes) +
                        " of RAM for fp32 copies (weights of other dtypes are widened at load) but only " +
                        gb(have.available) + " of " + gb(have.ram) + " is available");
}

void check_training_fits(const std::string& path, uint64_t trainable_params, const CheckpointMemory& need,
                         const MachineMemory& have) {
  const uint64_t state = trainable_params * kTrainBytesPerParam;
  const std::string what = path + ": training " + std::to_string(trainable_params) + " parameters needs " + gb(state) +
                           " (fp32 weight, gradient and two AdamW moments each)";
  if (have.as_limit && need.file_bytes + need.fp32_bytes + state > have.as_limit)
    throw ResourceError(what + " besides the " + gb(need.file_bytes + need.fp32_bytes) +
                        " the model takes, but the address-space limit (ulimit -v) is " + gb(have.as_limit));
  if (have.available && state > have.available)
    throw ResourceError(what + " but only " + gb(have.available) + " of " + gb(have.ram) +
                        " is available: train fewer parameters (fewer --experts, no --full)");
}

}  // namespace moedit
