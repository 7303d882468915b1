// libFuzzer target: the CounterFact reader.
#include "datasets/counterfact.h"
#include "fuzz_util.h"
#include "io/errors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string path = moedit::fuzz::scratch("cf.json");
  moedit::fuzz::write(path, data, size);
  try {
    for (const auto& r : moedit::load_counterfact(path)) (void)r.rewrite_prompt();
  } catch (const moedit::InputError&) {
  }
  return 0;
}
