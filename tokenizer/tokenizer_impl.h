// Internals of moedit::Tokenizer (not a public header): the stages of the pipeline as loaded from tokenizer.json —
// normalizers, pre-tokenizers, post-processors, decoders, the added tokens and their trie — and TokenizerImpl,
// which holds them. Loading: tokenizer_load.cpp; the encode pipeline: tokenizer_encode.cpp; decoding:
// tokenizer_decode.cpp; the Tokenizer class (post-processing, offsets, vocabulary): tokenizer.cpp.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "tokenizer/tokenizer_internal.h"

namespace moedit::tok_detail {

// ---- components -------------------------------------------------------------------------------------------------
struct NormStep {
  enum Kind { Unicode, Prepend, Replace, Strip } kind = Unicode;
  NormForm form = NormForm::NFC;
  std::string str;  // Prepend text / Replace content
  std::unique_ptr<Pattern> pat;
  bool left = false, right = false;
};

enum class Behavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };
enum class Scheme { First, Always, Never };

struct PreStep {
  enum Kind { ByteLevel, Split, Metaspace } kind = ByteLevel;
  // ByteLevel
  bool add_prefix_space = false, use_regex = true;
  bool raw = false;  // last step and the BPE runs on raw bytes: no char mapping needed
  // Split (pattern), ByteLevel (GPT-2 regex)
  std::unique_ptr<Pattern> pat;
  Behavior behavior = Behavior::Isolated;
  bool invert = false;
  // Metaspace
  char32_t rep = 0x2581;
  std::string rep_str;
  Scheme scheme = Scheme::Always;
  bool split = true;
  std::unique_ptr<Pattern> space_pat, rep_pat;
};

struct TemplPiece {
  bool special = false;
  std::string name;  // special token key
  int seq = 0;       // 0 = A, 1 = B
};
struct TemplSpecial {
  std::vector<int32_t> ids;
  std::vector<std::string> tokens;
};
struct PostStep {
  enum Kind { Template, ByteLevel } kind = Template;
  std::vector<TemplPiece> single;
  std::unordered_map<std::string, TemplSpecial> specials;
  bool trim_offsets = false, add_prefix_space = false;
};

struct DecStep {
  enum Kind { ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip } kind = Fuse;
  char32_t ch = 0;
  std::string content;
  std::unique_ptr<Pattern> pat;
  Scheme scheme = Scheme::Always;
  size_t start = 0, stop = 0;
};

struct AddedTok {
  std::string content;
  bool single_word = false, lstrip = false, rstrip = false, normalized = true, special = false;
  bool operator==(const AddedTok& o) const {
    return content == o.content && single_word == o.single_word && lstrip == o.lstrip && rstrip == o.rstrip &&
           normalized == o.normalized && special == o.special;
  }
};

// Byte trie for the added tokens; leftmost-longest, non-overlapping matches (daachorse MatchKind::LeftmostLongest).
class Trie {
 public:
  Trie() { std::fill(std::begin(root_), std::end(root_), -1); }
  bool empty() const { return nodes_.empty(); }
  void insert(std::string_view pat, int32_t value) {
    if (pat.empty()) return;
    int32_t node = root_[static_cast<unsigned char>(pat[0])];
    if (node < 0) {
      node = new_node();
      root_[static_cast<unsigned char>(pat[0])] = node;
    }
    for (size_t i = 1; i < pat.size(); ++i) {
      unsigned char c = static_cast<unsigned char>(pat[i]);
      int32_t nxt = child(node, c);
      if (nxt < 0) {
        nxt = new_node();
        nodes_[node].kids.emplace_back(c, nxt);
      }
      node = nxt;
    }
    nodes_[node].value = value;
  }
  template <class F>
  void find_iter(const char* s, size_t n, F&& f) const {
    size_t i = 0;
    while (i < n) {
      int32_t node = root_[static_cast<unsigned char>(s[i])];
      if (node < 0) {
        ++i;
        continue;
      }
      size_t best_end = 0;
      int32_t best_val = -1;
      size_t j = i + 1;
      while (true) {
        if (nodes_[node].value >= 0) {
          best_end = j;
          best_val = nodes_[node].value;
        }
        if (j >= n) break;
        node = child(node, static_cast<unsigned char>(s[j]));
        if (node < 0) break;
        ++j;
      }
      if (best_val >= 0) {
        f(i, best_end, best_val);
        i = best_end;
      } else {
        ++i;
      }
    }
  }

 private:
  struct Node {
    std::vector<std::pair<unsigned char, int32_t>> kids;
    int32_t value = -1;
  };
  int32_t new_node() {
    nodes_.emplace_back();
    return static_cast<int32_t>(nodes_.size() - 1);
  }
  int32_t child(int32_t node, unsigned char c) const {
    for (const auto& [k, v] : nodes_[node].kids)
      if (k == c) return v;
    return -1;
  }
  int32_t root_[256];
  std::vector<Node> nodes_;
};

struct TokenizerImpl {
  std::string source;
  std::vector<NormStep> norms;
  std::vector<PreStep> pre;
  Bpe bpe;
  std::vector<PostStep> post;
  std::vector<DecStep> dec;
  bool has_decoder = false;
  // added vocabulary
  std::unordered_map<int32_t, AddedTok> added_r;
  StrMap<int32_t> added_map;
  StrMap<char> special_set;
  std::unordered_map<int32_t, std::string> norm_cache;
  Trie raw_trie, norm_trie;
  std::optional<int> bos, eos;
  int n_ids = 0;

  // Encoding before post-processing.
  struct Raw {
    std::vector<int32_t> ids;
    std::vector<std::pair<size_t, size_t>> boffs;
    std::vector<std::string> pieces;
    bool want_pieces = true;
  };
  void run(std::string_view text, Raw& out) const;
  View normalize(View v, Arena& arena) const {
    for (const NormStep& st : norms) {
      switch (st.kind) {
        case NormStep::Unicode: v = unicode_normalize(v, st.form, arena); break;
        case NormStep::Prepend:
          if (v.n) v = prepend(v, st.str, arena);
          break;
        case NormStep::Replace: v = replace(v, *st.pat, st.str, arena); break;
        case NormStep::Strip: v = lrstrip(v, st.left, st.right, arena); break;
      }
    }
    return v;
  }
  std::string normalize_string(std::string_view s) const {
    std::vector<Align> al(s.size());
    for (size_t i = 0; i < s.size();) {
      unsigned l = utf8_len_of_lead(static_cast<unsigned char>(s[i]));
      for (unsigned k = 0; k < l && i + k < s.size(); ++k) al[i + k] = {uint32_t(i), uint32_t(i + l)};
      i += l;
    }
    Arena arena;
    View v{s.data(), al.data(), uint32_t(s.size()), 0};
    v = normalize(v, arena);
    return std::string(v.str());
  }
};

// Whether every byte of s is ASCII (checked 8 bytes at a time).
inline bool is_ascii(std::string_view s) {
  size_t i = 0;
  for (; i + 8 <= s.size(); i += 8) {
    uint64_t w;
    std::memcpy(&w, s.data() + i, 8);
    if (w & 0x8080808080808080ULL) return false;
  }
  for (; i < s.size(); ++i)
    if (static_cast<unsigned char>(s[i]) >= 0x80) return false;
  return true;
}

}  // namespace moedit::tok_detail
