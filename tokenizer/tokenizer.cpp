// moedit::Tokenizer: loading tokenizer.json, the encode pipeline (added tokens -> normalizer -> pre-tokenizer ->
// BPE -> post-processor) and decode, following Hugging Face `tokenizers` step by step (see tokenizer.h).
#include "tokenizer/tokenizer.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

#include "io/errors.h"
#include "tokenizer/tokenizer_internal.h"

namespace moedit {
namespace tok_detail {

using json = nlohmann::json;

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

// ---- the encode pipeline -----------------------------------------------------------------------------------------
namespace {

const char* const kGpt2Pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

bool is_ascii(std::string_view s) {
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

// Apply a split behaviour to the spans of find_matches (NormalizedString::split); returns kept [b, e) ranges.
void apply_behavior(std::vector<Span>& spans, Behavior behavior, std::vector<Span>& out) {
  out.clear();
  switch (behavior) {
    case Behavior::Isolated:
      for (const Span& s : spans) out.push_back({s.b, s.e, false});
      break;
    case Behavior::Removed:
      for (const Span& s : spans)
        if (!s.match) out.push_back({s.b, s.e, false});
      break;
    case Behavior::Contiguous: {
      bool prev = false;
      for (const Span& s : spans) {
        if (s.match == prev) {
          if (!out.empty())
            out.back().e = s.e;
          else
            out.push_back({s.b, s.e, false});
        } else {
          out.push_back({s.b, s.e, false});
        }
        prev = s.match;
      }
      break;
    }
    case Behavior::MergedWithPrevious: {
      bool prev = false;
      for (const Span& s : spans) {
        if (s.match && !prev) {
          if (!out.empty())
            out.back().e = s.e;
          else
            out.push_back({s.b, s.e, false});
        } else {
          out.push_back({s.b, s.e, false});
        }
        prev = s.match;
      }
      break;
    }
    case Behavior::MergedWithNext: {
      bool prev = false;
      for (size_t k = spans.size(); k-- > 0;) {
        const Span& s = spans[k];
        if (s.match && !prev) {
          if (!out.empty())
            out.back().b = s.b;
          else
            out.push_back({s.b, s.e, false});
        } else {
          out.push_back({s.b, s.e, false});
        }
        prev = s.match;
      }
      std::reverse(out.begin(), out.end());
      break;
    }
  }
}

struct Runner {
  const TokenizerImpl& T;
  TokenizerImpl::Raw& out;
  Arena arena;
  std::vector<std::vector<Span>> spans, kept;  // per pre-tokenizer step
  std::vector<BpeToken> toks;

  Runner(const TokenizerImpl& t, TokenizerImpl::Raw& o) : T(t), out(o) {
    spans.resize(t.pre.size() + 1);
    kept.resize(t.pre.size() + 1);
  }

  void emit(int32_t id, std::pair<size_t, size_t> off, std::string_view piece) {
    out.ids.push_back(id);
    out.boffs.push_back(off);
    if (out.want_pieces) out.pieces.emplace_back(piece);
  }

  void model(const View& v, bool raw) {
    toks.clear();
    T.bpe.tokenize(v.str(), toks, raw);
    for (const BpeToken& t : toks) {
      const std::string& piece = T.bpe.vocab_r[size_t(t.id)];
      emit(t.id, original_span(v, t.b, t.e), piece);
    }
  }

  void split_by(const View& v, const Pattern& pat, bool invert, Behavior behavior, size_t step) {
    std::vector<Span>& sp = spans[step];
    std::vector<Span>& kp = kept[step];
    sp.clear();
    pat.find_matches(v.s, v.n, sp);
    if (invert)
      for (Span& s : sp) s.match = !s.match;
    apply_behavior(sp, behavior, kp);
    // kp must not be touched by deeper steps: they use their own buffers
    for (size_t k = 0; k < kp.size(); ++k) {
      const Span s = kp[k];
      if (s.e > s.b) pretok(slice(v, s.b, s.e), step + 1);
    }
  }

  void pretok(const View& v, size_t step) {
    if (step == T.pre.size()) {
      // raw pieces reach here from a raw ByteLevel step (handled there); anything else is normalized text
      model(v, false);
      return;
    }
    const PreStep& st = T.pre[step];
    switch (st.kind) {
      case PreStep::ByteLevel: {
        View w = v;
        if (st.add_prefix_space && !(w.n > 0 && w.s[0] == ' ')) w = prepend(w, " ", arena);
        if (st.raw) {
          auto raw_model = [&](const View& piece) {
            if (T.bpe.raw_piece_needs_generic(piece.str()))
              model(byte_level_map(piece), false);
            else
              model(piece, true);
          };
          if (st.use_regex) {
            std::vector<Span>& sp = spans[step];
            std::vector<Span>& kp = kept[step];
            sp.clear();
            st.pat->find_matches(w.s, w.n, sp);
            apply_behavior(sp, Behavior::Isolated, kp);
            for (size_t k = 0; k < kp.size(); ++k) {
              const Span s = kp[k];
              if (s.e > s.b) raw_model(slice(w, s.b, s.e));
            }
          } else if (w.n) {
            raw_model(w);
          }
          return;
        }
        if (st.use_regex) {
          // split first, then map every piece to byte-level chars
          std::vector<Span>& sp = spans[step];
          std::vector<Span>& kp = kept[step];
          sp.clear();
          st.pat->find_matches(w.s, w.n, sp);
          apply_behavior(sp, Behavior::Isolated, kp);
          for (size_t k = 0; k < kp.size(); ++k) {
            const Span s = kp[k];
            if (s.e > s.b) pretok(byte_level_map(slice(w, s.b, s.e)), step + 1);
          }
        } else if (w.n) {
          pretok(byte_level_map(w), step + 1);
        }
        return;
      }
      case PreStep::Split: split_by(v, *st.pat, st.invert, st.behavior, step); return;
      case PreStep::Metaspace: {
        View w = replace(v, *st.space_pat, st.rep_str, arena);
        bool starts = w.n >= st.rep_str.size() && std::memcmp(w.s, st.rep_str.data(), st.rep_str.size()) == 0;
        if (st.scheme == Scheme::Always && !starts) w = prepend(w, st.rep_str, arena);
        if (st.scheme == Scheme::First && !starts && w.shift == 0) w = prepend(w, st.rep_str, arena);
        if (st.split) {
          split_by(w, *st.rep_pat, false, Behavior::MergedWithNext, step);
        } else if (w.n) {
          pretok(w, step + 1);
        }
        return;
      }
    }
  }

  View byte_level_map(const View& v) {
    std::vector<CharChange> dest;
    dest.reserve(v.n);
    const char32_t* b2c = bytes_to_chars();
    for (size_t i = 0; i < v.n;) {
      unsigned l = utf8_len_of_lead(static_cast<unsigned char>(v.s[i]));
      for (unsigned k = 0; k < l; ++k) dest.push_back({b2c[static_cast<unsigned char>(v.s[i + k])], k > 0 ? 1 : 0});
      i += l;
    }
    return transform(v, 0, v.n, dest, 0, arena);
  }

  // find_matches of the added vocabulary (AddedVocabulary::find_matches) over view v; calls
  // on_token(id, b, e) / on_gap(b, e) in order.
  template <class Tok, class Gap>
  void added_split(const View& v, const Trie& trie, Tok&& on_token, Gap&& on_gap) {
    if (v.n == 0) return;
    if (trie.empty()) {
      on_gap(0, v.n);
      return;
    }
    size_t start_offset = 0;
    const char* s = v.s;
    const size_t n = v.n;
    trie.find_iter(s, n, [&](size_t mb, size_t me, int32_t id) {
      size_t start = mb, stop = me;
      const AddedTok& at = T.added_r.at(id);
      if (at.single_word) {
        bool start_space = start == 0 || !ends_with_word(s, start);
        bool stop_space = stop == n || !starts_with_word(s + stop, n - stop);
        if (!stop_space || !start_space) return;
      }
      if (at.lstrip) {
        size_t newstart = space_leftmost_at_end(s, start);
        start = std::max(newstart, start_offset);
      }
      if (at.rstrip) stop += space_rightmost_at_start(s + stop, n - stop);
      if (start_offset < start) on_gap(start_offset, start);
      on_token(id, start, stop);
      start_offset = stop;
    });
    if (start_offset != n) on_gap(start_offset, n);
  }

  static bool ends_with_word(const char* s, size_t end) {
    // last char of s[0..end)
    size_t i = end;
    do {
      --i;
    } while (i > 0 && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80);
    unsigned l;
    return is_word_char(utf8_decode(s, i, l));
  }
  static bool starts_with_word(const char* s, size_t n) {
    if (n == 0) return false;
    unsigned l;
    return is_word_char(utf8_decode(s, 0, l));
  }
  static size_t space_leftmost_at_end(const char* s, size_t end) {
    size_t i = end;
    while (i > 0) {
      size_t j = i;
      do {
        --j;
      } while (j > 0 && (static_cast<unsigned char>(s[j]) & 0xC0) == 0x80);
      unsigned l;
      if (!is_white_space(utf8_decode(s, j, l))) break;
      i = j;
    }
    return i;
  }
  static size_t space_rightmost_at_start(const char* s, size_t n) {
    size_t i = 0;
    while (i < n) {
      unsigned l;
      if (!is_white_space(utf8_decode(s, i, l))) break;
      i += l;
    }
    return i;
  }

  void gap(const View& g) {
    View ng = T.normalize(g, arena);
    if (ng.n == 0) return;
    added_split(
        ng, T.norm_trie,
        [&](int32_t id, size_t b, size_t e) {
          View sl = slice(ng, uint32_t(b), uint32_t(e));
          emit(id, original_span(sl, 0, sl.n), sl.str());
        },
        [&](size_t b, size_t e) { pretok(slice(ng, uint32_t(b), uint32_t(e)), 0); });
  }
};

}  // namespace

void TokenizerImpl::run(std::string_view text, Raw& out) const {
  if (text.size() >= 0xFFFFFFF0ULL) throw InputError("tokenizer: text too long (4 GiB or more)");
  if (text.empty()) return;
  thread_local std::vector<Align> ident;
  ident.resize(text.size());
  if (is_ascii(text)) {
    for (uint32_t i = 0; i < text.size(); ++i) ident[i] = {i, i + 1};
  } else {
    for (uint32_t i = 0; i < text.size();) {
      unsigned l = utf8_len_of_lead(static_cast<unsigned char>(text[i]));
      for (unsigned k = 0; k < l; ++k) ident[i + k] = {i, i + l};
      i += l;
    }
  }
  Runner r(*this, out);
  View whole{text.data(), ident.data(), uint32_t(text.size()), 0};
  r.added_split(
      whole, raw_trie,
      [&](int32_t id, size_t b, size_t e) {
        View sl = slice(whole, uint32_t(b), uint32_t(e));
        r.emit(id, original_span(sl, 0, sl.n), sl.str());
      },
      [&](size_t b, size_t e) { r.gap(slice(whole, uint32_t(b), uint32_t(e))); });
}

// ---- JSON loading -------------------------------------------------------------------------------------------------
namespace {

class Loader {
 public:
  explicit Loader(std::string src) : src_(std::move(src)) {}
  [[noreturn]] void fail(const std::string& field, const std::string& msg) const {
    throw InputError(src_ + ": field '" + field + "': " + msg);
  }
  const json& need(const json& obj, const char* key, const std::string& path) const {
    auto it = obj.find(key);
    if (it == obj.end()) fail(join(path, key), "missing");
    return *it;
  }
  // Calls f(item, item_path) for each entry of the list obj[key] (a "Sequence" stage's members).
  template <typename F>
  void each_in_list(const json& obj, const char* key, const std::string& path, F&& f) const {
    const json& list = need(obj, key, path);
    if (!list.is_array()) fail(join(path, key), "expected a list");
    for (size_t i = 0; i < list.size(); ++i) f(list[i], join(path, key) + "[" + std::to_string(i) + "]");
  }
  static std::string join(const std::string& path, const std::string& key) {
    return path.empty() ? key : path + "." + key;
  }
  std::string str(const json& obj, const char* key, const std::string& path) const {
    const json& v = need(obj, key, path);
    if (!v.is_string()) fail(join(path, key), "expected a string");
    return v.get<std::string>();
  }
  bool boolean(const json& obj, const char* key, const std::string& path, std::optional<bool> dflt) const {
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) {
      if (dflt) return *dflt;
      fail(join(path, key), "missing");
    }
    if (!it->is_boolean()) fail(join(path, key), "expected true or false");
    return it->get<bool>();
  }
  std::string type_of(const json& obj, const std::string& path) const {
    if (!obj.is_object()) fail(path, "expected an object");
    return str(obj, "type", path);
  }
  char32_t one_char(const json& obj, const char* key, const std::string& path) const {
    std::string s = str(obj, key, path);
    if (s.empty() || utf8_find_invalid(s) != std::string::npos) fail(join(path, key), "expected one character");
    unsigned l;
    char32_t c = utf8_decode(s.data(), 0, l);
    if (l != s.size()) fail(join(path, key), "expected one character, got '" + s + "'");
    return c;
  }
  std::unique_ptr<Pattern> pattern(const json& obj, const char* key, const std::string& path) const {
    const json& p = need(obj, key, path);
    std::string f = join(path, key);
    if (!p.is_object() || p.size() != 1) fail(f, "expected {\"String\": ...} or {\"Regex\": ...}");
    try {
      if (p.contains("String")) {
        if (!p["String"].is_string()) fail(f + ".String", "expected a string");
        return Pattern::literal(p["String"].get<std::string>());
      }
      if (p.contains("Regex")) {
        if (!p["Regex"].is_string()) fail(f + ".Regex", "expected a string");
        return Pattern::regex(p["Regex"].get<std::string>());
      }
    } catch (const std::invalid_argument& e) {
      fail(f + ".Regex", std::string("invalid regex: ") + e.what());
    }
    fail(f, "expected {\"String\": ...} or {\"Regex\": ...}");
  }
  Scheme scheme(const json& obj, const std::string& path) const {
    auto it = obj.find("prepend_scheme");
    Scheme sc = Scheme::Always;
    if (it != obj.end() && !it->is_null()) {
      if (!it->is_string()) fail(join(path, "prepend_scheme"), "expected a string");
      std::string s = it->get<std::string>();
      if (s == "first")
        sc = Scheme::First;
      else if (s == "always")
        sc = Scheme::Always;
      else if (s == "never")
        sc = Scheme::Never;
      else
        fail(join(path, "prepend_scheme"), "unknown value '" + s + "' (first, always, never)");
    }
    auto ap = obj.find("add_prefix_space");
    if (ap != obj.end() && ap->is_boolean() && !ap->get<bool>()) {
      if (sc != Scheme::Never && it != obj.end() && !it->is_null())
        fail(join(path, "add_prefix_space"), "add_prefix_space does not match declared prepend_scheme");
      sc = Scheme::Never;
    }
    return sc;
  }

  void normalizer(const json& j, const std::string& path, std::vector<NormStep>& out) const {
    if (j.is_null()) return;
    std::string t = type_of(j, path);
    NormStep st;
    if (t == "Sequence") {
      each_in_list(j, "normalizers", path, [&](const json& item, const std::string& at) { normalizer(item, at, out); });
      return;
    } else if (t == "NFC" || t == "NFD" || t == "NFKC" || t == "NFKD") {
      st.kind = NormStep::Unicode;
      st.form = t == "NFC" ? NormForm::NFC : t == "NFD" ? NormForm::NFD : t == "NFKC" ? NormForm::NFKC : NormForm::NFKD;
    } else if (t == "Prepend") {
      st.kind = NormStep::Prepend;
      st.str = str(j, "prepend", path);
    } else if (t == "Replace") {
      st.kind = NormStep::Replace;
      st.pat = pattern(j, "pattern", path);
      st.str = str(j, "content", path);
    } else if (t == "Strip") {
      st.kind = NormStep::Strip;
      st.left = boolean(j, "strip_left", path, true);
      st.right = boolean(j, "strip_right", path, true);
    } else {
      fail(join(path, "type"), "unknown or unsupported normalizer type '" + t +
                                   "' (supported: NFC, NFD, NFKC, NFKD, Prepend, Replace, Strip, Sequence)");
    }
    out.push_back(std::move(st));
  }

  void pre_tokenizer(const json& j, const std::string& path, std::vector<PreStep>& out) const {
    if (j.is_null()) return;
    std::string t = type_of(j, path);
    PreStep st;
    if (t == "Sequence") {
      each_in_list(j, "pretokenizers", path, [&](const json& item, const std::string& at) { pre_tokenizer(item, at, out); });
      return;
    } else if (t == "ByteLevel") {
      st.kind = PreStep::ByteLevel;
      st.add_prefix_space = boolean(j, "add_prefix_space", path, true);
      boolean(j, "trim_offsets", path, true);
      st.use_regex = boolean(j, "use_regex", path, true);
      if (st.use_regex) st.pat = Pattern::regex(kGpt2Pattern);
    } else if (t == "Split") {
      st.kind = PreStep::Split;
      st.pat = pattern(j, "pattern", path);
      std::string b = str(j, "behavior", path);
      if (b == "Removed")
        st.behavior = Behavior::Removed;
      else if (b == "Isolated")
        st.behavior = Behavior::Isolated;
      else if (b == "MergedWithPrevious")
        st.behavior = Behavior::MergedWithPrevious;
      else if (b == "MergedWithNext")
        st.behavior = Behavior::MergedWithNext;
      else if (b == "Contiguous")
        st.behavior = Behavior::Contiguous;
      else
        fail(join(path, "behavior"), "unknown behavior '" + b + "'");
      st.invert = boolean(j, "invert", path, std::nullopt);
    } else if (t == "Metaspace") {
      st.kind = PreStep::Metaspace;
      st.rep = one_char(j, "replacement", path);
      utf8_append(st.rep_str, st.rep);
      st.scheme = scheme(j, path);
      st.split = boolean(j, "split", path, true);
      st.space_pat = Pattern::single_char(' ');
      st.rep_pat = Pattern::single_char(st.rep);
    } else {
      fail(join(path, "type"),
           "unknown or unsupported pre_tokenizer type '" + t + "' (supported: ByteLevel, Split, Metaspace, Sequence)");
    }
    out.push_back(std::move(st));
  }

  void post_processor(const json& j, const std::string& path, std::vector<PostStep>& out) const {
    if (j.is_null()) return;
    std::string t = type_of(j, path);
    PostStep st;
    if (t == "Sequence") {
      each_in_list(j, "processors", path, [&](const json& item, const std::string& at) { post_processor(item, at, out); });
      return;
    } else if (t == "ByteLevel") {
      st.kind = PostStep::ByteLevel;
      st.add_prefix_space = boolean(j, "add_prefix_space", path, true);
      st.trim_offsets = boolean(j, "trim_offsets", path, true);
    } else if (t == "TemplateProcessing") {
      st.kind = PostStep::Template;
      const json& sp = need(j, "special_tokens", path);
      const std::string spath = join(path, "special_tokens");
      if (!sp.is_object()) fail(spath, "expected an object");
      for (auto it = sp.begin(); it != sp.end(); ++it) {
        const std::string f = spath + "." + it.key();
        const json& v = it.value();
        if (!v.is_object()) fail(f, "expected an object");
        TemplSpecial ts;
        const json& ids = need(v, "ids", f);
        const json& toks = need(v, "tokens", f);
        if (!ids.is_array() || !toks.is_array() || ids.size() != toks.size())
          fail(f, "'ids' and 'tokens' must be lists of the same length");
        for (size_t k = 0; k < ids.size(); ++k) {
          if (!ids[k].is_number_integer() || ids[k].get<int64_t>() < 0 || ids[k].get<int64_t>() > INT32_MAX)
            fail(f + ".ids[" + std::to_string(k) + "]", "expected a non-negative integer");
          if (!toks[k].is_string()) fail(f + ".tokens[" + std::to_string(k) + "]", "expected a string");
          ts.ids.push_back(static_cast<int32_t>(ids[k].get<int64_t>()));
          ts.tokens.push_back(toks[k].get<std::string>());
        }
        st.specials.emplace(it.key(), std::move(ts));
      }
      const json& single = need(j, "single", path);
      const std::string f = join(path, "single");
      if (single.is_string()) {
        // "$A <s> ..." string form
        std::istringstream is(single.get<std::string>());
        std::string w;
        while (is >> w) {
          TemplPiece p;
          std::string name = w.substr(0, w.find(':'));
          if (!name.empty() && name[0] == '$') {
            p.special = false;
            p.seq = (name == "$B" || name == "$b") ? 1 : 0;
          } else {
            p.special = true;
            p.name = name;
          }
          st.single.push_back(p);
        }
      } else if (single.is_array()) {
        for (size_t k = 0; k < single.size(); ++k) {
          const json& pc = single[k];
          const std::string pf = f + "[" + std::to_string(k) + "]";
          TemplPiece p;
          if (pc.is_object() && pc.contains("SpecialToken")) {
            p.special = true;
            p.name = str(pc["SpecialToken"], "id", pf + ".SpecialToken");
          } else if (pc.is_object() && pc.contains("Sequence")) {
            std::string id = str(pc["Sequence"], "id", pf + ".Sequence");
            if (id != "A" && id != "B") fail(pf + ".Sequence.id", "expected \"A\" or \"B\"");
            p.seq = id == "B" ? 1 : 0;
          } else {
            fail(pf, "expected {\"SpecialToken\": ...} or {\"Sequence\": ...}");
          }
          st.single.push_back(p);
        }
      } else {
        fail(f, "expected a list");
      }
      for (const TemplPiece& p : st.single)
        if (p.special && !st.specials.count(p.name))
          fail(f, "special token '" + p.name + "' is missing from special_tokens");
    } else {
      fail(join(path, "type"), "unknown or unsupported post_processor type '" + t +
                                   "' (supported: TemplateProcessing, ByteLevel, Sequence)");
    }
    out.push_back(std::move(st));
  }

  void decoder(const json& j, const std::string& path, std::vector<DecStep>& out) const {
    if (j.is_null()) return;
    std::string t = type_of(j, path);
    DecStep st;
    if (t == "Sequence") {
      each_in_list(j, "decoders", path, [&](const json& item, const std::string& at) { decoder(item, at, out); });
      return;
    } else if (t == "ByteLevel") {
      st.kind = DecStep::ByteLevel;
    } else if (t == "Metaspace") {
      st.kind = DecStep::Metaspace;
      st.ch = one_char(j, "replacement", path);
      st.scheme = scheme(j, path);
    } else if (t == "Replace") {
      st.kind = DecStep::Replace;
      st.pat = pattern(j, "pattern", path);
      st.content = str(j, "content", path);
    } else if (t == "ByteFallback") {
      st.kind = DecStep::ByteFallback;
    } else if (t == "Fuse") {
      st.kind = DecStep::Fuse;
    } else if (t == "Strip") {
      st.kind = DecStep::Strip;
      st.ch = one_char(j, "content", path);
      const json& a = need(j, "start", path);
      const json& b = need(j, "stop", path);
      if (!a.is_number_unsigned()) fail(join(path, "start"), "expected a non-negative integer");
      if (!b.is_number_unsigned()) fail(join(path, "stop"), "expected a non-negative integer");
      st.start = a.get<size_t>();
      st.stop = b.get<size_t>();
    } else {
      fail(join(path, "type"), "unknown or unsupported decoder type '" + t +
                                   "' (supported: ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip, Sequence)");
    }
    out.push_back(std::move(st));
  }

  void model(const json& j, Bpe& bpe) const {
    const std::string path = "model";
    if (!j.is_object()) fail(path, "expected an object");
    auto ty = j.find("type");
    if (ty != j.end()) {
      if (!ty->is_string()) fail("model.type", "expected a string");
      std::string t = ty->get<std::string>();
      if (t != "BPE") fail("model.type", "unsupported model type '" + t + "' (only BPE is supported)");
    }
    auto opt_str = [&](const char* key) -> std::optional<std::string> {
      auto it = j.find(key);
      if (it == j.end() || it->is_null()) return std::nullopt;
      if (!it->is_string()) fail(join(path, key), "expected a string or null");
      return it->get<std::string>();
    };
    bpe.unk_token = opt_str("unk_token");
    bpe.prefix = opt_str("continuing_subword_prefix");
    bpe.suffix = opt_str("end_of_word_suffix");
    bpe.fuse_unk = boolean(j, "fuse_unk", path, false);
    bpe.byte_fallback = boolean(j, "byte_fallback", path, false);
    bpe.ignore_merges = boolean(j, "ignore_merges", path, false);
    auto dr = j.find("dropout");
    if (dr != j.end() && !dr->is_null()) {
      if (!dr->is_number()) fail("model.dropout", "expected a number or null");
      double d = dr->get<double>();
      if (d < 0.0 || d > 1.0) fail("model.dropout", "must be between 0 and 1");
      if (d != 0.0) fail("model.dropout", "BPE dropout is random; only null or 0 is supported");
    }
    const json& vocab = need(j, "vocab", path);
    if (!vocab.is_object()) fail("model.vocab", "expected an object {token: id}");
    bpe.vocab.reserve(vocab.size());
    int64_t max_id = -1;
    for (auto it = vocab.begin(); it != vocab.end(); ++it) {
      if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 || it.value().get<int64_t>() > INT32_MAX)
        fail("model.vocab." + it.key(), "expected a non-negative integer id");
      int32_t id = static_cast<int32_t>(it.value().get<int64_t>());
      bpe.vocab[it.key()] = id;
      max_id = std::max<int64_t>(max_id, id);
    }
    bpe.vocab_count = bpe.vocab.size();
    bpe.vocab_r.assign(size_t(max_id + 1), std::string());
    bpe.has_id.assign(size_t(max_id + 1), 0);
    for (const auto& [tok, id] : bpe.vocab) {
      bpe.vocab_r[size_t(id)] = tok;
      bpe.has_id[size_t(id)] = 1;
    }
    const json& merges = need(j, "merges", path);
    if (!merges.is_array()) fail("model.merges", "expected a list");
    bpe.merges.reserve(merges.size());
    const size_t prefix_len = bpe.prefix ? bpe.prefix->size() : 0;
    std::string merged;
    uint32_t rank = 0;
    bool legacy = !merges.empty() && merges[0].is_string();
    for (size_t i = 0; i < merges.size(); ++i) {
      const json& m = merges[i];
      const std::string f = "model.merges[" + std::to_string(i) + "]";
      std::string_view a, b;
      std::string line;
      if (legacy) {
        if (!m.is_string()) fail(f, "expected a string \"a b\" like the other merges");
        line = m.get<std::string>();
        if (line.rfind("#version", 0) == 0) continue;
        size_t sp = line.find(' ');
        if (sp == std::string::npos || line.find(' ', sp + 1) != std::string::npos)
          fail(f, "expected two tokens separated by one space, got '" + line + "'");
        a = std::string_view(line).substr(0, sp);
        b = std::string_view(line).substr(sp + 1);
      } else {
        if (!m.is_array() || m.size() != 2 || !m[0].is_string() || !m[1].is_string())
          fail(f, "expected a pair [\"a\", \"b\"] like the other merges");
        a = m[0].get_ref<const std::string&>();
        b = m[1].get_ref<const std::string&>();
      }
      auto ia = bpe.vocab.find(a);
      if (ia == bpe.vocab.end()) fail(f, "token '" + std::string(a) + "' is not in model.vocab");
      auto ib = bpe.vocab.find(b);
      if (ib == bpe.vocab.end()) fail(f, "token '" + std::string(b) + "' is not in model.vocab");
      if (b.size() < prefix_len) fail(f, "token '" + std::string(b) + "' is shorter than continuing_subword_prefix");
      merged.assign(a);
      merged.append(b.substr(prefix_len));
      auto im = bpe.vocab.find(std::string_view(merged));
      if (im == bpe.vocab.end()) fail(f, "merged token '" + merged + "' is not in model.vocab");
      bpe.merges.insert(uint32_t(ia->second), uint32_t(ib->second), rank, im->second);
      ++rank;
    }
    bpe.finalize();
  }

  std::string src_;
};

std::string read_file(const std::string& path, bool& exists) {
  std::ifstream f(path, std::ios::binary);
  exists = static_cast<bool>(f);
  if (!f) return {};
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

json parse_json(std::string_view text, const std::string& source) {
  try {
    return json::parse(text.begin(), text.end());
  } catch (const json::parse_error& e) {
    throw InputError(source + ": malformed JSON: " + e.what());
  }
}

std::optional<std::string> config_token(const json& cfg, const char* key, const std::string& src) {
  auto it = cfg.find(key);
  if (it == cfg.end() || it->is_null()) return std::nullopt;
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object()) {
    auto c = it->find("content");
    if (c != it->end() && c->is_string()) return c->get<std::string>();
  }
  throw InputError(src + ": field '" + key + "': expected a string or an object with \"content\"");
}

}  // namespace

// ---- decode -------------------------------------------------------------------------------------------------------
namespace {

bool parse_hex_byte(std::string_view t, uint8_t& out) {
  // "<0xHH>" — u8::from_str_radix(&t[3..5], 16); Rust also accepts a leading '+'
  if (t.size() != 6 || t.substr(0, 3) != "<0x" || t[5] != '>') return false;
  auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  char c1 = t[3], c2 = t[4];
  if (c1 == '+') {
    int v = hex(c2);
    if (v < 0) return false;
    out = uint8_t(v);
    return true;
  }
  int h = hex(c1), l = hex(c2);
  if (h < 0 || l < 0) return false;
  out = uint8_t(h * 16 + l);
  return true;
}

void decode_step(const DecStep& st, std::vector<std::string>& toks) {
  switch (st.kind) {
    case DecStep::ByteLevel: {
      std::string bytes;
      for (const std::string& t : toks) {
        std::string mapped;
        bool ok = true;
        for (size_t i = 0; i < t.size() && ok;) {
          unsigned l;
          char32_t c = utf8_decode(t.data(), i, l);
          int b = char_to_byte(c);
          if (b < 0)
            ok = false;
          else
            mapped.push_back(static_cast<char>(b));
          i += l;
        }
        bytes += ok ? mapped : t;
      }
      toks.assign(1, utf8_lossy(bytes));
      return;
    }
    case DecStep::Metaspace: {
      for (size_t i = 0; i < toks.size(); ++i) {
        std::string out;
        const std::string& t = toks[i];
        for (size_t k = 0; k < t.size();) {
          unsigned l;
          char32_t c = utf8_decode(t.data(), k, l);
          if (c == st.ch) {
            if (!(i == 0 && st.scheme != Scheme::Never)) out.push_back(' ');
          } else {
            out.append(t, k, l);
          }
          k += l;
        }
        toks[i] = std::move(out);
      }
      return;
    }
    case DecStep::Replace: {
      std::vector<Span> spans;
      for (std::string& t : toks) {
        spans.clear();
        st.pat->find_matches(t.data(), t.size(), spans);
        std::string out;
        for (const Span& s : spans) {
          if (s.match)
            out += st.content;
          else
            out.append(t, s.b, s.e - s.b);
        }
        t = std::move(out);
      }
      return;
    }
    case DecStep::ByteFallback: {
      std::vector<std::string> out;
      std::string pending;
      auto flush = [&]() {
        if (pending.empty()) return;
        if (utf8_find_invalid(pending) == std::string::npos) {
          out.push_back(pending);
        } else {
          for (size_t k = 0; k < pending.size(); ++k) out.emplace_back("\xEF\xBF\xBD");
        }
        pending.clear();
      };
      for (std::string& t : toks) {
        uint8_t b;
        if (parse_hex_byte(t, b)) {
          pending.push_back(static_cast<char>(b));
        } else {
          flush();
          out.push_back(std::move(t));
        }
      }
      flush();
      toks = std::move(out);
      return;
    }
    case DecStep::Fuse: {
      std::string all;
      for (const std::string& t : toks) all += t;
      toks.assign(1, std::move(all));
      return;
    }
    case DecStep::Strip: {
      for (std::string& t : toks) {
        std::vector<std::pair<size_t, size_t>> chars;  // (byte pos, len)
        std::vector<char32_t> cps;
        for (size_t k = 0; k < t.size();) {
          unsigned l;
          cps.push_back(utf8_decode(t.data(), k, l));
          chars.emplace_back(k, l);
          k += l;
        }
        size_t start_cut = 0;
        for (size_t i = 0; i < std::min(st.start, cps.size()); ++i) {
          if (cps[i] == st.ch)
            start_cut = i + 1;
          else
            break;
        }
        size_t stop_cut = cps.size();
        for (size_t i = 0; i < st.stop && i < cps.size(); ++i) {
          size_t index = cps.size() - i - 1;
          if (cps[index] == st.ch)
            stop_cut = index;
          else
            break;
        }
        if (stop_cut < start_cut) stop_cut = start_cut;
        size_t bb = start_cut < chars.size() ? chars[start_cut].first : t.size();
        size_t be = stop_cut < chars.size() ? chars[stop_cut].first : t.size();
        t = t.substr(bb, be - bb);
      }
      return;
    }
  }
}

}  // namespace
}  // namespace tok_detail

// ---- public API ----------------------------------------------------------------------------------------------------
using tok_detail::TokenizerImpl;

Tokenizer::Tokenizer(std::unique_ptr<TokenizerImpl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::from_file(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path p(path);
  fs::path file = fs::is_directory(p, ec) ? p / "tokenizer.json" : p;
  bool exists = false;
  std::string text = tok_detail::read_file(file.string(), exists);
  if (!exists) {
    if (fs::is_directory(p, ec)) throw InputError(path + ": no tokenizer.json in this folder");
    throw InputError(file.string() + ": cannot read file");
  }
  fs::path cfg_path = file.parent_path() / "tokenizer_config.json";
  bool cfg_exists = false;
  std::string cfg = tok_detail::read_file(cfg_path.string(), cfg_exists);
  return from_json(text, file.string(), cfg_exists ? std::string_view(cfg) : std::string_view(), cfg_path.string());
}

Tokenizer Tokenizer::from_json(std::string_view tokenizer_json, std::string_view source, std::string_view config_json,
                               std::string_view config_source) {
  using namespace tok_detail;
  const std::string src(source);
  json j = parse_json(tokenizer_json, src);
  if (!j.is_object()) throw InputError(src + ": expected a JSON object at the top level");
  Loader L(src);
  auto impl = std::make_unique<TokenizerImpl>();
  impl->source = src;
  if (auto v = j.find("version"); v != j.end() && !v->is_null()) {
    if (!v->is_string() || v->get<std::string>() != "1.0")
      L.fail("version", "unknown tokenizer version (expected \"1.0\")");
  }
  if (!j.contains("model")) L.fail("model", "missing");
  const json null_json;
  auto get = [&](const char* key) -> const json& {
    auto it = j.find(key);
    return it == j.end() ? null_json : *it;
  };
  L.normalizer(get("normalizer"), "normalizer", impl->norms);
  L.pre_tokenizer(get("pre_tokenizer"), "pre_tokenizer", impl->pre);
  L.model(j["model"], impl->bpe);
  if (!impl->pre.empty() && impl->pre.back().kind == PreStep::ByteLevel) {
    impl->bpe.enable_raw_bytes();
    impl->pre.back().raw = impl->bpe.raw_bytes;
  }
  L.post_processor(get("post_processor"), "post_processor", impl->post);
  const json& dj = get("decoder");
  impl->has_decoder = !dj.is_null();
  L.decoder(dj, "decoder", impl->dec);

  // added tokens: AddedVocabulary::add_tokens (ids come from the vocab or are assigned after it; the JSON "id" is
  // only a hint in `tokenizers`, reproduced here)
  const json& added = get("added_tokens");
  if (!added.is_null() && !added.is_array()) L.fail("added_tokens", "expected a list");
  TokenizerImpl& T = *impl;
  int64_t next_id = int64_t(T.bpe.vocab_count);
  if (added.is_array()) {
    for (size_t i = 0; i < added.size(); ++i) {
      const json& a = added[i];
      const std::string f = "added_tokens[" + std::to_string(i) + "]";
      if (!a.is_object()) L.fail(f, "expected an object");
      AddedTok at;
      at.content = L.str(a, "content", f);
      at.single_word = L.boolean(a, "single_word", f, false);
      at.lstrip = L.boolean(a, "lstrip", f, false);
      at.rstrip = L.boolean(a, "rstrip", f, false);
      at.special = L.boolean(a, "special", f, false);
      at.normalized = L.boolean(a, "normalized", f, !at.special);
      if (at.content.empty()) continue;
      if (utf8_find_invalid(at.content) != std::string::npos) L.fail(f + ".content", "not valid UTF-8");
      if (auto it = T.added_map.find(at.content); it != T.added_map.end()) {
        auto r = T.added_r.find(it->second);
        if (r != T.added_r.end() && r->second == at) continue;
      }
      int32_t id;
      if (auto it = T.added_map.find(at.content); it != T.added_map.end()) {
        id = it->second;
      } else if (auto v = T.bpe.vocab.find(at.content); v != T.bpe.vocab.end()) {
        id = v->second;
      } else {
        id = static_cast<int32_t>(next_id++);
      }
      if (at.normalized && !T.norms.empty()) {
        std::string normed = T.normalize_string(at.content);
        if (normed != at.content) T.norm_cache[id] = normed;
      }
      T.added_map[at.content] = id;
      if (at.special) T.special_set.emplace(at.content, 1);
      T.added_r[id] = at;
    }
  }
  for (const auto& [id, at] : T.added_r) {
    if (at.normalized) {
      auto c = T.norm_cache.find(id);
      T.norm_trie.insert(c != T.norm_cache.end() ? std::string_view(c->second) : std::string_view(at.content), id);
    } else {
      T.raw_trie.insert(at.content, id);
    }
  }
  int64_t n_ids = int64_t(T.bpe.vocab_r.size());
  for (const auto& [id, at] : T.added_r) n_ids = std::max<int64_t>(n_ids, int64_t(id) + 1);
  T.n_ids = static_cast<int>(n_ids);

  // BOS / EOS
  if (!config_json.empty()) {
    const std::string csrc = config_source.empty() ? std::string("tokenizer_config.json") : std::string(config_source);
    json cfg = parse_json(config_json, csrc);
    if (!cfg.is_object()) throw InputError(csrc + ": expected a JSON object at the top level");
    Tokenizer tmp(std::move(impl));
    if (auto b = config_token(cfg, "bos_token", csrc)) tmp.impl_->bos = tmp.token_to_id(*b);
    if (auto e = config_token(cfg, "eos_token", csrc)) tmp.impl_->eos = tmp.token_to_id(*e);
    impl = std::move(tmp.impl_);
  }
  if (!impl->bos) {
    for (const PostStep& ps : impl->post) {
      if (ps.kind != PostStep::Template || ps.single.empty() || !ps.single[0].special) continue;
      const auto& sp = ps.specials.at(ps.single[0].name);
      if (!sp.ids.empty()) impl->bos = sp.ids[0];
      break;
    }
  }
  return Tokenizer(std::move(impl));
}

Tokenizer::Encoding Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  using namespace tok_detail;
  if (size_t bad = utf8_find_invalid(text); bad != std::string_view::npos)
    throw InputError("tokenizer: text is not valid UTF-8 (byte " + std::to_string(bad) + ")");
  const TokenizerImpl& T = *impl_;
  TokenizerImpl::Raw raw;
  T.run(text, raw);

  // byte -> char offsets (BytesToCharOffsetConverter)
  const size_t n = text.size();
  const bool ascii = is_ascii(text);
  std::vector<uint32_t> char_of;  // byte -> index of the char containing it
  std::vector<uint32_t> byte_of;  // char index -> byte offset (size nchars + 1)
  if (!ascii) {
    char_of.resize(n);
    uint32_t ci = 0;
    for (size_t i = 0; i < n;) {
      unsigned l = utf8_len_of_lead(static_cast<unsigned char>(text[i]));
      for (unsigned k = 0; k < l; ++k) char_of[i + k] = ci;
      byte_of.push_back(uint32_t(i));
      ++ci;
      i += l;
    }
    byte_of.push_back(uint32_t(n));
  }
  auto to_char = [&](std::pair<size_t, size_t> o) -> std::pair<size_t, size_t> {
    if (o.first >= n) return o;  // start not in the map: `tokenizers` keeps the byte offsets
    size_t start = ascii ? o.first : char_of[o.first];
    if (o.second < n) return {start, ascii ? o.second : char_of[o.second]};
    size_t last = o.second >= 1 && o.second - 1 < n ? (ascii ? o.second - 1 : char_of[o.second - 1]) : start + 1;
    return {start, last + 1};
  };

  Encoding enc;
  const size_t m = raw.ids.size();
  std::vector<std::pair<size_t, size_t>> coffs(m);
  for (size_t i = 0; i < m; ++i) coffs[i] = to_char(raw.boffs[i]);

  // post-processing
  enc.ids = std::move(raw.ids);
  enc.pieces = std::move(raw.pieces);
  enc.offsets = std::move(coffs);
  enc.byte_offsets = std::move(raw.boffs);
  enc.special_mask.assign(enc.ids.size(), 0);
  for (const PostStep& ps : T.post) {
    if (ps.kind == PostStep::Template) {
      if (!add_special_tokens) continue;
      Encoding out;
      for (const TemplPiece& p : ps.single) {
        if (p.special) {
          const TemplSpecial& sp = ps.specials.at(p.name);
          for (size_t k = 0; k < sp.ids.size(); ++k) {
            out.ids.push_back(sp.ids[k]);
            out.pieces.push_back(sp.tokens[k]);
            out.offsets.emplace_back(0, 0);
            out.byte_offsets.emplace_back(0, 0);
            out.special_mask.push_back(1);
          }
        } else if (p.seq == 0) {
          out.ids.insert(out.ids.end(), enc.ids.begin(), enc.ids.end());
          out.pieces.insert(out.pieces.end(), enc.pieces.begin(), enc.pieces.end());
          out.offsets.insert(out.offsets.end(), enc.offsets.begin(), enc.offsets.end());
          out.byte_offsets.insert(out.byte_offsets.end(), enc.byte_offsets.begin(), enc.byte_offsets.end());
          out.special_mask.insert(out.special_mask.end(), enc.special_mask.begin(), enc.special_mask.end());
        }
      }
      enc = std::move(out);
    } else if (ps.kind == PostStep::ByteLevel && ps.trim_offsets) {
      for (size_t i = 0; i < enc.ids.size(); ++i) {
        const std::string& tok = enc.pieces[i];
        std::vector<char32_t> cps;
        for (size_t k = 0; k < tok.size();) {
          unsigned l;
          cps.push_back(utf8_decode(tok.data(), k, l));
          k += l;
        }
        auto spacey = [](char32_t c) { return c == 0x120 || is_white_space(c); };
        size_t leading = 0, trailing = 0;
        while (leading < cps.size() && spacey(cps[leading])) ++leading;
        while (trailing < cps.size() && spacey(cps[cps.size() - 1 - trailing])) ++trailing;
        auto& o = enc.offsets[i];
        auto before = o;
        if (leading > 0) {
          bool is_first = i == 0 || o.first == 0;
          if (is_first && ps.add_prefix_space && leading == 1) leading = 0;
          o.first = std::min(o.first + leading, o.second);
        }
        if (trailing > 0 && o.second >= trailing) o.second = std::max(o.second - trailing, o.first);
        if (o != before) {
          auto to_byte = [&](size_t c) -> size_t { return ascii ? c : (c < byte_of.size() ? byte_of[c] : n); };
          enc.byte_offsets[i] = {to_byte(o.first), to_byte(o.second)};
        }
      }
    }
  }
  return enc;
}

std::vector<int32_t> Tokenizer::encode_ids(std::string_view text, bool add_special_tokens) const {
  using namespace tok_detail;
  if (size_t bad = utf8_find_invalid(text); bad != std::string_view::npos)
    throw InputError("tokenizer: text is not valid UTF-8 (byte " + std::to_string(bad) + ")");
  const TokenizerImpl& T = *impl_;
  TokenizerImpl::Raw raw;
  raw.want_pieces = false;
  T.run(text, raw);
  std::vector<int32_t> ids = std::move(raw.ids);
  for (const PostStep& ps : T.post) {
    if (ps.kind != PostStep::Template || !add_special_tokens) continue;
    std::vector<int32_t> out;
    for (const TemplPiece& p : ps.single) {
      if (p.special) {
        const TemplSpecial& sp = ps.specials.at(p.name);
        out.insert(out.end(), sp.ids.begin(), sp.ids.end());
      } else if (p.seq == 0) {
        out.insert(out.end(), ids.begin(), ids.end());
      }
    }
    ids = std::move(out);
  }
  return ids;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const {
  using namespace tok_detail;
  const TokenizerImpl& T = *impl_;
  std::vector<std::string> toks;
  toks.reserve(ids.size());
  for (int32_t id : ids) {
    std::string tok;
    if (auto it = T.added_r.find(id); it != T.added_r.end()) {
      auto c = T.norm_cache.find(id);
      tok = c != T.norm_cache.end() ? c->second : it->second.content;
    } else if (id >= 0 && size_t(id) < T.bpe.has_id.size() && T.bpe.has_id[size_t(id)]) {
      tok = T.bpe.vocab_r[size_t(id)];
    } else {
      continue;
    }
    if (skip_special_tokens && T.special_set.count(tok)) continue;
    toks.push_back(std::move(tok));
  }
  if (!T.has_decoder) {
    std::string out;
    for (size_t i = 0; i < toks.size(); ++i) {
      if (i) out += ' ';
      out += toks[i];
    }
    return out;
  }
  for (const DecStep& st : T.dec) decode_step(st, toks);
  std::string out;
  for (const std::string& t : toks) out += t;
  return out;
}

std::optional<std::pair<int, int>> Tokenizer::span_for_bytes(const Encoding& enc, size_t byte_begin, size_t byte_end) {
  if (byte_end <= byte_begin) return std::nullopt;
  int first = -1, last = -1;
  for (size_t i = 0; i < enc.byte_offsets.size(); ++i) {
    if (enc.special_mask.size() == enc.byte_offsets.size() && enc.special_mask[i]) continue;
    const auto& o = enc.byte_offsets[i];
    if (first < 0 && o.second > byte_begin) first = static_cast<int>(i);
    if (first >= 0 && o.second >= byte_end) {
      last = static_cast<int>(i);
      break;
    }
  }
  if (first < 0 || last < 0) return std::nullopt;
  return std::make_pair(first, last + 1);
}

std::optional<std::pair<int, int>> Tokenizer::find_span(const Encoding& enc, std::string_view text,
                                                        std::string_view substring) const {
  if (substring.empty()) return std::nullopt;
  size_t pos = text.find(substring);
  if (pos == std::string_view::npos) return std::nullopt;
  return span_for_bytes(enc, pos, pos + substring.size());
}

int Tokenizer::vocab_size() const { return impl_->n_ids; }

std::optional<int> Tokenizer::token_to_id(std::string_view token) const {
  if (auto it = impl_->added_map.find(token); it != impl_->added_map.end()) return it->second;
  if (auto it = impl_->bpe.vocab.find(token); it != impl_->bpe.vocab.end()) return it->second;
  return std::nullopt;
}

std::string Tokenizer::id_to_token(int id) const {
  if (auto it = impl_->added_r.find(id); it != impl_->added_r.end()) {
    // like `tokenizers`: a normalized added token reads back in its normalized form
    auto c = impl_->norm_cache.find(id);
    return c != impl_->norm_cache.end() ? c->second : it->second.content;
  }
  if (id >= 0 && size_t(id) < impl_->bpe.has_id.size() && impl_->bpe.has_id[size_t(id)])
    return impl_->bpe.vocab_r[size_t(id)];
  return {};
}

bool Tokenizer::is_special(int id) const {
  auto it = impl_->added_r.find(id);
  return it != impl_->added_r.end() && it->second.special;
}

std::optional<int> Tokenizer::bos_id() const { return impl_->bos; }
std::optional<int> Tokenizer::eos_id() const { return impl_->eos; }
const std::string& Tokenizer::source() const { return impl_->source; }

}  // namespace moedit
