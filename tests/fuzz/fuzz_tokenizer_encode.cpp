// libFuzzer target: encode arbitrary text with the real tokenizers (the first byte picks one), then decode.
#include <filesystem>
#include <memory>
#include <string_view>
#include <vector>

#include "io/errors.h"
#include "tokenizer/tokenizer.h"

namespace {
std::vector<std::unique_ptr<moedit::Tokenizer>> load_all() {
  std::vector<std::unique_ptr<moedit::Tokenizer>> v;
  const std::string dir = std::string(MOEDIT_SOURCE_DIR) + "/models/moedit-demo/tokenizer.json";
  if (std::filesystem::exists(dir)) v.push_back(std::make_unique<moedit::Tokenizer>(moedit::Tokenizer::from_file(dir)));
  const char* env = std::getenv("MOEDIT_FUZZ_TOKENIZERS");  // extra tokenizer.json paths, ':'-separated
  std::string s = env ? env : "";
  size_t i = 0;
  while (i < s.size()) {
    size_t j = s.find(':', i);
    if (j == std::string::npos) j = s.size();
    v.push_back(std::make_unique<moedit::Tokenizer>(moedit::Tokenizer::from_file(s.substr(i, j - i))));
    i = j + 1;
  }
  return v;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const auto toks = load_all();
  if (toks.empty() || size == 0) return 0;
  const auto& tok = *toks[data[0] % toks.size()];
  try {
    const auto enc = tok.encode(std::string_view(reinterpret_cast<const char*>(data + 1), size - 1));
    (void)tok.decode(enc.ids);
  } catch (const moedit::InputError&) {  // invalid UTF-8
  }
  return 0;
}
