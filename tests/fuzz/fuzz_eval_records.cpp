// libFuzzer target: the evaluation-record readers (zsRE, EasyEdit, CounterFact via auto-detection).
// The first input byte picks the format, the rest is the file.
#include "datasets/eval_records.h"
#include "fuzz_util.h"
#include "io/errors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string path = moedit::fuzz::scratch("records.json");
  if (size == 0) return 0;
  static const moedit::DatasetFormat formats[] = {moedit::DatasetFormat::Auto, moedit::DatasetFormat::ZsRE,
                                                  moedit::DatasetFormat::EasyEdit, moedit::DatasetFormat::CounterFact};
  const auto format = formats[data[0] % 4];
  moedit::fuzz::write(path, data + 1, size - 1);
  try {
    for (const auto& r : moedit::load_eval_records(path, format)) (void)r.rewrite_prompt();
  } catch (const moedit::InputError&) {
  }
  return 0;
}
