// moedit tokenize [PATH] --text TEXT [--json] [--no-special]: ids, token strings and offsets of TEXT, exactly as
// Hugging Face `tokenizers` encodes it. PATH is a model folder (its tokenizer.json) or a tokenizer.json file.
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>

#include "cli/commands.h"
#include "tokenizer/tokenizer.h"

namespace moedit::cli {

namespace {

// A JSON string literal (escapes control characters, quotes), for readable pieces in the table.
std::string json_quoted(const std::string& s) {
  return nlohmann::json(s).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

// s padded with spaces to `width` characters (code points, not bytes).
std::string pad(const std::string& s, size_t width) {
  size_t chars = 0;
  for (unsigned char c : s) chars += (c & 0xC0) != 0x80;
  return chars >= width ? s : s + std::string(width - chars, ' ');
}

void register_tokenize(CLI::App& app) {
  auto* cmd = app.add_subcommand("tokenize", "Token ids, pieces and offsets of a text (Hugging Face tokenizers rules)");
  static std::string path;
  static std::string text;
  static bool as_json = false;
  static bool no_special = false;
  add_model_arg(cmd, path);
  cmd->add_option("--text", text, "Text to tokenize (UTF-8)")->required();
  cmd->add_flag("--json", as_json, "Print {\"ids\": [...], \"pieces\": [...], \"offsets\": [[b, e], ...]}");
  cmd->add_flag("--no-special", no_special, "Leave out the post-processor template (e.g. the BOS token)");
  cmd->callback([] {
    const Tokenizer tok = Tokenizer::from_file(path);
    const Tokenizer::Encoding enc = tok.encode(text, !no_special);
    if (as_json) {
      nlohmann::ordered_json j;
      j["ids"] = enc.ids;
      j["pieces"] = enc.pieces;
      nlohmann::ordered_json offs = nlohmann::ordered_json::array();
      for (const auto& [b, e] : enc.offsets) offs.push_back({b, e});
      j["offsets"] = offs;
      std::printf("%s\n", j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
      return;
    }
    std::printf("tokenizer: %s\n", tok.source().c_str());
    std::printf("tokens:    %zu (offsets are [begin, end) in characters; bytes in UTF-8)\n\n", enc.size());
    std::printf("%6s  %8s  %-24s  %-13s  %-13s  %s\n", "#", "id", "piece", "chars", "bytes", "text");
    for (size_t i = 0; i < enc.size(); ++i) {
      const auto [cb, ce] = enc.offsets[i];
      const auto [bb, be] = enc.byte_offsets[i];
      std::string span = bb <= be && be <= text.size() ? text.substr(bb, be - bb) : std::string();
      char chars[32], bytes[32];
      std::snprintf(chars, sizeof chars, "[%zu, %zu)", cb, ce);
      std::snprintf(bytes, sizeof bytes, "[%zu, %zu)", bb, be);
      std::printf("%6zu  %8d  %s  %-13s  %-13s  %s%s\n", i, enc.ids[i], pad(json_quoted(enc.pieces[i]), 24).c_str(),
                  chars, bytes, json_quoted(span).c_str(), enc.special_mask[i] ? "  (template)" : "");
    }
  });
}

}  // namespace

MOEDIT_COMMAND(20, register_tokenize)

}  // namespace moedit::cli
