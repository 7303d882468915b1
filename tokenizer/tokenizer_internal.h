// Internals of the tokenizer/*.cpp files (not a public header). Mirrors the data model of Hugging Face `tokenizers`:
// a "normalized string" is text plus, for every byte of it, the [begin, end) byte span of the original input it
// came from. Here alignments are kept in global coordinates (offsets into the whole input), which makes slicing
// free: a View is a window onto some buffer of text + alignments.
#pragma once
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#ifndef PCRE2_CODE_UNIT_WIDTH
#define PCRE2_CODE_UNIT_WIDTH 8
#endif
#include <pcre2.h>

namespace moedit::tok_detail {

// ---- UTF-8 / Unicode helpers (tokenizer_text.cpp) ------------------------------------------------------------
// Decodes the code point starting at s[i] (s must be valid UTF-8); sets len to its byte length.
inline char32_t utf8_decode(const char* s, size_t i, unsigned& len) {
  const auto* u = reinterpret_cast<const unsigned char*>(s) + i;
  unsigned char c = u[0];
  if (c < 0x80) {
    len = 1;
    return c;
  }
  if (c < 0xE0) {
    len = 2;
    return (char32_t(c & 0x1F) << 6) | (u[1] & 0x3F);
  }
  if (c < 0xF0) {
    len = 3;
    return (char32_t(c & 0x0F) << 12) | (char32_t(u[1] & 0x3F) << 6) | (u[2] & 0x3F);
  }
  len = 4;
  return (char32_t(c & 0x07) << 18) | (char32_t(u[1] & 0x3F) << 12) | (char32_t(u[2] & 0x3F) << 6) | (u[3] & 0x3F);
}
inline unsigned utf8_len_of_lead(unsigned char c) { return c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4; }
inline unsigned utf8_len(char32_t c) { return c < 0x80 ? 1 : c < 0x800 ? 2 : c < 0x10000 ? 3 : 4; }
void utf8_append(std::string& out, char32_t c);
// Returns the byte offset of the first invalid sequence, or npos when `s` is valid UTF-8.
size_t utf8_find_invalid(std::string_view s);
// Rust's String::from_utf8_lossy: each maximal invalid subsequence becomes U+FFFD.
std::string utf8_lossy(std::string_view bytes);
// Rust char::is_whitespace (Unicode White_Space).
bool is_white_space(char32_t c);
// Rust regex `\w` (Unicode word character).
bool is_word_char(char32_t c);

// ---- regex: Oniguruma semantics through PCRE2 ------------------------------------------------------------------
// Rewrites the escapes whose meaning differs between Oniguruma (Ruby syntax) and PCRE2+UCP.
std::string onig_to_pcre2(std::string_view pattern);
// Escapes a literal for use as a pattern (Rust regex::escape + onig, i.e. match the string literally).
std::string regex_escape(std::string_view literal);

class Regex {
 public:
  // Throws std::invalid_argument with PCRE2's message (callers turn it into InputError naming file and field).
  explicit Regex(std::string_view onig_pattern);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;
  // All matches in s[0..n), as the Rust `onig` crate's find_iter yields them (empty matches right after a match
  // are skipped by advancing one character). f(begin, end).
  template <class F>
  void find_iter(const char* s, size_t n, F&& f) const {
    size_t last_end = 0;
    bool have_last = false;
    size_t last_match_end = 0;
    while (last_end <= n) {
      size_t b, e;
      if (!search(s, n, last_end, b, e)) return;
      if (b == e && have_last && last_match_end == e) {
        if (last_end < n) {
          last_end += utf8_len_of_lead(static_cast<unsigned char>(s[last_end]));
        } else {
          last_end += 1;
        }
        continue;
      }
      last_end = e;
      have_last = true;
      last_match_end = e;
      f(b, e);
    }
  }

 private:
  bool search(const char* s, size_t n, size_t start, size_t& b, size_t& e) const;
  pcre2_code* code_ = nullptr;
  bool jit_ = false;
};

// A `tokenizers` Pattern: a literal string or a regex. find_matches covers the input with (begin, end, is_match).
struct Span {
  uint32_t b, e;
  bool match;
};
class Pattern {
 public:
  static std::unique_ptr<Pattern> literal(std::string s);
  static std::unique_ptr<Pattern> regex(std::string_view onig_pattern);  // throws std::invalid_argument
  static std::unique_ptr<Pattern> single_char(char32_t c);               // Rust `char` pattern
  // Appends to `out` (does not clear it).
  void find_matches(const char* s, size_t n, std::vector<Span>& out) const;

 private:
  std::string lit_;
  std::unique_ptr<Regex> re_;
  bool is_char_ = false;
};

// ---- hashing ------------------------------------------------------------------------------------------------------
inline uint64_t hash_bytes(const char* p, size_t n) {
  // FNV-1a over 8-byte words, then a final mix: fast on short keys, good enough for hash tables
  uint64_t h = 0xcbf29ce484222325ULL ^ n;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    __builtin_memcpy(&w, p + i, 8);
    h = (h ^ w) * 0x100000001b3ULL;
    h ^= h >> 29;
  }
  uint64_t w = 0;
  for (size_t k = 0; i < n; ++i, ++k) w |= uint64_t(static_cast<unsigned char>(p[i])) << (8 * k);
  h = (h ^ w) * 0x9E3779B97F4A7C15ULL;
  h ^= h >> 32;
  return h;
}
struct StrHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return hash_bytes(s.data(), s.size()); }
  size_t operator()(const std::string& s) const { return hash_bytes(s.data(), s.size()); }
};
struct StrEq {
  using is_transparent = void;
  bool operator()(std::string_view a, std::string_view b) const { return a == b; }
};
template <class V>
using StrMap = std::unordered_map<std::string, V, StrHash, StrEq>;

// ---- BPE model (tokenizer_bpe.cpp) ------------------------------------------------------------------------------
struct BpeToken {
  int32_t id;
  uint32_t b, e;  // byte range inside the piece
};

// (left id, right id) -> (rank, merged id); open addressing.
class MergeMap {
 public:
  void reserve(size_t n);
  void insert(uint32_t a, uint32_t b, uint32_t rank, int32_t merged);  // overwrites an existing pair
  bool find(uint32_t a, uint32_t b, uint32_t& rank, int32_t& merged) const {
    if (mask_ == 0) return false;
    const uint64_t key = (uint64_t(a) << 32) | b;
    size_t i = slot(key);
    while (true) {
      const Entry& en = table_[i];
      if (en.key == key) {
        rank = en.rank;
        merged = en.merged;
        return true;
      }
      if (en.key == kEmpty) return false;
      i = (i + 1) & mask_;
    }
  }
  size_t size() const { return size_; }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t(0);
  struct Entry {
    uint64_t key = kEmpty;
    uint32_t rank = 0;
    int32_t merged = 0;
  };
  size_t slot(uint64_t key) const { return size_t((key * 0x9E3779B97F4A7C15ULL) >> shift_) & mask_; }
  std::vector<Entry> table_;
  size_t mask_ = 0, size_ = 0;
  unsigned shift_ = 64;
};

struct Bpe {
  StrMap<int32_t> vocab;
  std::vector<std::string> vocab_r;  // id -> token ("" where no token has that id)
  std::vector<uint8_t> has_id;
  size_t vocab_count = 0;  // number of vocab entries (BPE::get_vocab_size)
  MergeMap merges;
  std::optional<std::string> unk_token;
  std::optional<std::string> prefix;  // continuing_subword_prefix
  std::optional<std::string> suffix;  // end_of_word_suffix
  bool fuse_unk = false, byte_fallback = false, ignore_merges = false;
  int32_t fallback_ids[256];      // "<0xHH>" ids, -1 if absent
  std::vector<int32_t> char_ids;  // code point -> id of the single-char token, -1 if absent
  // Byte-level mode: pieces arrive as raw bytes (before the ByteLevel char mapping) and each byte starts as the
  // token of its byte-level char. Enabled when ByteLevel is the last pre-tokenization step and the vocab has the
  // byte-level char of every byte that can occur in UTF-8 text; bytes that can never occur (C0, C1, F5-FF) may be
  // missing. If some other byte is missing (raw_needs_check), pieces containing it take the generic path.
  bool raw_bytes = false;
  bool raw_needs_check = false;
  int32_t raw_byte_ids[256];
  StrMap<int32_t> raw_vocab;  // vocab keyed by raw bytes (only for ignore_merges)
  uint64_t uid = 0;           // identifies this model's per-thread word cache

  // Boundaries no merge can cross: a merge joining symbols X|Y makes a token containing the char pair
  // (last char of X, first char of Y); if no vocab token contains that pair, the word can be cut there and the
  // parts merged independently (same result, far less work on very long words). Built on first use.
  mutable std::once_flag bigram_once;
  mutable std::vector<uint64_t> bigrams;            // open-addressing set of (c1 << 32 | c2), 0 = empty
  mutable std::vector<char32_t> first_cp, last_cp;  // per id: first / last char of the token
  void build_bigrams() const;
  bool has_bigram(char32_t a, char32_t b) const;

  void finalize();          // builds char_ids / fallback ids; call after vocab, merges and options are set
  void enable_raw_bytes();  // tries to switch to byte-level mode
  // Tokenizes one pre-tokenized piece (raw bytes when `raw`, else normalized text); appends to out.
  void tokenize(std::string_view piece, std::vector<BpeToken>& out, bool raw) const;
  // True when a raw piece holds a byte whose byte-level char is not in the vocab (generic path needed).
  bool raw_piece_needs_generic(std::string_view piece) const {
    if (!raw_needs_check) return false;
    for (char c : piece)
      if (raw_byte_ids[static_cast<unsigned char>(c)] < 0) return true;
    return false;
  }

 private:
  void merge_word(std::string_view piece, std::vector<BpeToken>& out, bool raw) const;
};

// ---- normalized strings ------------------------------------------------------------------------------------
struct Align {
  uint32_t b, e;
};

// A window onto normalized text with per-byte alignments (global original offsets). `shift` is the start of the
// original span this piece was cut from (NormalizedString::original_shift).
struct View {
  const char* s = nullptr;
  const Align* al = nullptr;
  uint32_t n = 0;
  uint32_t shift = 0;
  std::string_view str() const { return {s, n}; }
};

// Owns the buffers created by transformations during one encode call.
class Arena {
 public:
  // A fresh buffer pair; pointers stay valid until the arena dies.
  std::pair<std::string*, std::vector<Align>*> make() {
    strs_.emplace_back();
    als_.emplace_back();
    return {&strs_.back(), &als_.back()};
  }
  void clear() {
    strs_.clear();
    als_.clear();
  }

 private:
  std::deque<std::string> strs_;
  std::deque<std::vector<Align>> als_;
};

// Sub-range [nb, ne) of v (NormalizedString::slice with a normalized range).
View slice(const View& v, uint32_t nb, uint32_t ne);
// The original span of normalized bytes [tb, te) of v (convert_offsets + shift, with `tokenizers`' fallbacks).
std::pair<size_t, size_t> original_span(const View& v, size_t tb, size_t te);

// A transformation as `tokenizers` expresses it: each output char with its change (1 = inserted, 0 = replaces
// the next input char, -N = replaces it and removes the N following).
struct CharChange {
  char32_t c;
  int change;
};
// NormalizedString::transform_range over the normalized range [nb, ne) of v, writing into arena buffers.
View transform(const View& v, uint32_t nb, uint32_t ne, const std::vector<CharChange>& dest, size_t initial_offset,
               Arena& arena);
// NormalizedString::prepend / replace.
View prepend(const View& v, std::string_view s, Arena& arena);
View replace(const View& v, const Pattern& pat, std::string_view content, Arena& arena);
// Unicode normalization forms with `unicode-normalization-alignments` change tracking.
enum class NormForm { NFC, NFD, NFKC, NFKD };
View unicode_normalize(const View& v, NormForm form, Arena& arena);
// lstrip/rstrip of white space (NormalizedString::lrstrip).
View lrstrip(const View& v, bool left, bool right, Arena& arena);

// The GPT-2 byte <-> unicode map used by ByteLevel.
const char32_t* bytes_to_chars();  // [256]
int char_to_byte(char32_t c);      // -1 if c is not in the byte-level alphabet
// The raw bytes a byte-level token stands for (each char through char_to_byte); nullopt when one is not in the alphabet.
std::optional<std::string> byte_level_bytes(std::string_view tok);

}  // namespace moedit::tok_detail
