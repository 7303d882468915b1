// libFuzzer target: the safetensors header and tensor-table parser, then conversion of every tensor it accepts.
#include <vector>

#include "fuzz_util.h"
#include "io/errors.h"
#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string path = moedit::fuzz::scratch("st.safetensors");
  moedit::fuzz::write(path, data, size);
  try {
    moedit::SafeTensorsFile f(path);
    for (const auto& [name, t] : f.tensors()) {
      if (t.numel() > (1 << 20)) continue;  // accepted, but too big to convert per input
      std::vector<float> v = t.to_f32();
      (void)v;
    }
  } catch (const moedit::InputError&) {
  }
  return 0;
}
