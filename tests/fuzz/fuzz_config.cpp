// libFuzzer target: config.json → ModelConfig (parameter counting included).
#include <nlohmann/json.hpp>

#include "model/config.h"
#include "io/errors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto j = nlohmann::json::parse(data, data + size, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return 0;
  try {
    const moedit::ModelConfig c = moedit::parse_config(j, "config.json");
    (void)c.total_params();
    (void)c.active_params();
  } catch (const moedit::InputError&) {
  }
  return 0;
}
