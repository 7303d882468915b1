// Hugging Face `tokenizers`-compatible tokenizer (tokenizer.json), BPE models only.
//
// Reproduces `tokenizers.Tokenizer.from_file(p).encode(text)` exactly: ids, token strings and offsets. Supported
// components (everything the MoE checkpoints moedit targets use):
//   model          BPE (legacy "a b" and pair ["a","b"] merges, ignore_merges, byte_fallback, fuse_unk, unk_token,
//                  continuing_subword_prefix, end_of_word_suffix; dropout must be null/0)
//   added_tokens   leftmost-longest matching, lstrip, rstrip, single_word, normalized, special
//   normalizer     NFC, Prepend, Replace (String/Regex), Sequence, null
//   pre_tokenizer  ByteLevel (add_prefix_space, use_regex), Split (String/Regex; Removed, Isolated,
//                  MergedWithPrevious, MergedWithNext, Contiguous; invert), Metaspace (prepend_scheme
//                  first/always/never, split), Sequence, null
//   post_processor TemplateProcessing, ByteLevel (trim_offsets), Sequence, null
//   decoder        ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip, Sequence, null
// Regexes are Oniguruma patterns in tokenizer.json; they run through PCRE2 (UTF + UCP, JIT) after rewriting the
// few escapes whose meaning differs (\s \S \w \W \d \D \h \H) to Oniguruma's definitions. NFC uses utf8proc for the
// Unicode data and replays the alignment bookkeeping of `unicode-normalization-alignments`, so offsets of composed
// characters match too. `truncation` and `padding` in tokenizer.json are ignored (encode never truncates or pads).
//
// Offsets: `offsets` are what Python's `Encoding.offsets` holds — Unicode code-point (char) offsets into the input
// text; `byte_offsets` are the same spans in UTF-8 bytes. Tokens added by the post-processor template get (0, 0).
// A token that covers only part of a multi-byte character (byte-level BPE, byte fallback) gets the whole
// character's span, as in `tokenizers`.
//
// encode() and decode() are const and thread-safe (the BPE word cache is per thread).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace moedit {

namespace tok_detail {
struct TokenizerImpl;
}

class Tokenizer {
 public:
  struct Encoding {
    std::vector<int32_t> ids;
    std::vector<std::string> pieces;                      // token strings as `tokenizers` reports them
    std::vector<std::pair<size_t, size_t>> offsets;       // [begin, end) in Unicode code points (as Python)
    std::vector<std::pair<size_t, size_t>> byte_offsets;  // [begin, end) in UTF-8 bytes of the input
    std::vector<uint8_t> special_mask;                    // 1 for tokens added by the post-processor template
    size_t size() const { return ids.size(); }
  };

  // PATH: a tokenizer.json file, or a folder holding tokenizer.json. A tokenizer_config.json next to it (same
  // folder) is read for bos_token / eos_token. Throws moedit::InputError naming the file and the field on
  // malformed input (missing/unreadable file, bad JSON, unknown component type, merges naming tokens not in the
  // vocab, bad regex, ...).
  static Tokenizer from_file(const std::string& path);
  // Same, from in-memory JSON texts; `source` names the origin in error messages. `config_json` may be empty.
  static Tokenizer from_json(std::string_view tokenizer_json, std::string_view source = "tokenizer.json",
                             std::string_view config_json = {}, std::string_view config_source = {});

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // `tokenizers`' Tokenizer.encode(text, add_special_tokens=...). `text` must be valid UTF-8 (InputError if not).
  Encoding encode(std::string_view text, bool add_special_tokens = true) const;
  // Only the ids (same result as encode(text).ids; skips the token strings and the char-offset conversion).
  std::vector<int32_t> encode_ids(std::string_view text, bool add_special_tokens = true) const;

  // `tokenizers`' Tokenizer.decode(ids, skip_special_tokens=...). Unknown ids are skipped, as in `tokenizers`.
  std::string decode(const std::vector<int32_t>& ids, bool skip_special_tokens = false) const;

  // Token range [first, last) covering the first occurrence of `substring` in `text`, where `enc` is
  // encode(text, ...): first = first token whose end > substring start, last = 1 + first token whose end reaches
  // the substring end (ROME's subject lookup). nullopt when the substring is empty or absent, or no token covers it.
  std::optional<std::pair<int, int>> find_span(const Encoding& enc, std::string_view text,
                                               std::string_view substring) const;
  // Same for a known byte range [byte_begin, byte_end) of `text`.
  static std::optional<std::pair<int, int>> span_for_bytes(const Encoding& enc, size_t byte_begin, size_t byte_end);

  // Number of ids: max id + 1 over the model vocab and the added tokens.
  int vocab_size() const;
  std::optional<int> token_to_id(std::string_view token) const;  // added tokens first, then the model vocab
  // "" for an unknown id; an added token with normalized:true comes back in its normalized form (as in `tokenizers`)
  std::string id_to_token(int id) const;
  bool is_special(int id) const;      // an added token marked special
  std::optional<int> bos_id() const;  // from tokenizer_config.json bos_token, else the template's first special
  std::optional<int> eos_id() const;  // from tokenizer_config.json eos_token, else none
  const std::string& source() const;  // the file it was loaded from

 private:
  explicit Tokenizer(std::unique_ptr<tok_detail::TokenizerImpl> impl);
  std::unique_ptr<tok_detail::TokenizerImpl> impl_;
};

}  // namespace moedit
