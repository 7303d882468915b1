// libFuzzer target: model.safetensors.index.json (sharded checkpoints) next to one valid shard.
#include <filesystem>

#include "fuzz_util.h"
#include "io/errors.h"
#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string dir = [] {
    const std::string d = moedit::fuzz::scratch("index");
    std::filesystem::create_directories(d);
    const float v[4] = {1, 2, 3, 4};
    moedit::write_safetensors(d + "/model-00001-of-00001.safetensors", {{"a", moedit::make_f32_tensor({2, 2}, v)}});
    return d;
  }();
  moedit::fuzz::write(dir + "/model.safetensors.index.json", data, size);
  try {
    moedit::TensorStore s(dir);
    for (const auto& n : s.names()) (void)s.get(n).numel();
  } catch (const moedit::InputError&) {
  }
  return 0;
}
