// libFuzzer target: tokenizer.json loading, then encode/decode of a fixed text with whatever loaded.
#include <string_view>

#include "io/errors.h"
#include "tokenizer/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const auto tok = moedit::Tokenizer::from_json(std::string_view(reinterpret_cast<const char*>(data), size));
    const auto enc = tok.encode("Hello world! 12345 naïve 日本語 \n\n  x");
    (void)tok.decode(enc.ids);
  } catch (const moedit::InputError&) {
  }
  return 0;
}
