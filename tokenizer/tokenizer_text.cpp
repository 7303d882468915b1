// Text machinery of the tokenizer: UTF-8, Oniguruma-compatible regexes over PCRE2, and the alignment-tracking
// string transformations of `tokenizers`' NormalizedString (transform, prepend, replace, NFC/NFD/NFKC/NFKD, strip).
#include <utf8proc.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <stdexcept>

#include "tokenizer/tokenizer_internal.h"

namespace moedit::tok_detail {

// ---- UTF-8 -----------------------------------------------------------------------------------------------------
void utf8_append(std::string& out, char32_t c) {
  if (c < 0x80) {
    out.push_back(static_cast<char>(c));
  } else if (c < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (c >> 6)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else if (c < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (c >> 12)));
    out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (c >> 18)));
    out.push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  }
}

// Length of the valid UTF-8 sequence at s[i], or 0 if invalid; `prefix` gets the length of the maximal prefix of a
// valid sequence (at least 1) when invalid (the unit that from_utf8_lossy replaces by one U+FFFD).
static unsigned utf8_valid_len(const unsigned char* s, size_t n, size_t i, unsigned& prefix) {
  unsigned char c = s[i];
  prefix = 1;
  if (c < 0x80) return 1;
  unsigned need;
  unsigned char lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) {
    need = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    need = 3;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    need = 4;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  for (unsigned k = 1; k < need; ++k) {
    if (i + k >= n) return 0;
    unsigned char d = s[i + k];
    unsigned char l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
    if (d < l || d > h) return 0;
    prefix = k + 1;
  }
  return need;
}

size_t utf8_find_invalid(std::string_view s) {
  const auto* u = reinterpret_cast<const unsigned char*>(s.data());
  size_t n = s.size(), i = 0;
  while (i < n) {
    // fast ASCII skip, 8 bytes at a time
    while (i + 8 <= n) {
      uint64_t w;
      std::memcpy(&w, u + i, 8);
      if (w & 0x8080808080808080ULL) break;
      i += 8;
    }
    if (i >= n) break;
    if (u[i] < 0x80) {
      ++i;
      continue;
    }
    unsigned prefix;
    unsigned len = utf8_valid_len(u, n, i, prefix);
    if (len == 0) return i;
    i += len;
  }
  return std::string_view::npos;
}

std::string utf8_lossy(std::string_view bytes) {
  const auto* u = reinterpret_cast<const unsigned char*>(bytes.data());
  size_t n = bytes.size(), i = 0;
  std::string out;
  out.reserve(n);
  while (i < n) {
    unsigned prefix;
    unsigned len = utf8_valid_len(u, n, i, prefix);
    if (len) {
      out.append(bytes.data() + i, len);
      i += len;
    } else {
      out.append("\xEF\xBF\xBD");
      i += prefix;
    }
  }
  return out;
}

bool is_white_space(char32_t c) {
  if (c <= 0x20) return c == 0x20 || (c >= 0x09 && c <= 0x0D);
  if (c < 0x85) return false;
  switch (c) {
    case 0x85:
    case 0xA0:
    case 0x1680:
    case 0x2028:
    case 0x2029:
    case 0x202F:
    case 0x205F:
    case 0x3000: return true;
    default: return c >= 0x2000 && c <= 0x200A;
  }
}

bool is_word_char(char32_t c) {
  if (c < 0x80) return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
  if (c == 0x200C || c == 0x200D) return true;  // Join_Control
  switch (utf8proc_category(static_cast<utf8proc_int32_t>(c))) {
    case UTF8PROC_CATEGORY_LU:
    case UTF8PROC_CATEGORY_LL:
    case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO:
    case UTF8PROC_CATEGORY_MN:
    case UTF8PROC_CATEGORY_MC:
    case UTF8PROC_CATEGORY_ME:
    case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_NL:
    case UTF8PROC_CATEGORY_PC: return true;
    default:
      // Other_Alphabetic symbols (circled / squared Latin letters) are Alphabetic, hence \w in Rust.
      return (c >= 0x24B6 && c <= 0x24E9) || (c >= 0x1F130 && c <= 0x1F149) || (c >= 0x1F150 && c <= 0x1F169) ||
             (c >= 0x1F170 && c <= 0x1F189);
  }
}

// ---- regexes -----------------------------------------------------------------------------------------------------
// Oniguruma (Ruby syntax, UTF-8) vs PCRE2 with UCP:
//   \s  Oniguruma: U+0009-000D, U+0085, Zs, Zl, Zp.  PCRE2: the same plus U+180E (via \h).
//   \w  Oniguruma: Alphabetic, M, Nd, Pc (+ Join_Control). PCRE2 10.42: L, N, underscore.
//   \d  Oniguruma: Nd.  PCRE2: Nd (same; rewritten anyway for clarity).
//   \h  Oniguruma: hexadecimal digit.  PCRE2: horizontal white space.
// Negated forms are rewritten outside character classes; inside a class only the positive forms are (a negated
// escape cannot be inlined into a class); there PCRE2's meaning stays (differs only on U+180E / rare marks).
std::string onig_to_pcre2(std::string_view p) {
  static const char* kS = "\\t-\\r\\x{85}\\p{Z}";
  static const char* kW = "\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}\\x{200C}\\x{200D}";
  static const char* kH = "0-9a-fA-F";
  std::string out;
  out.reserve(p.size() + 16);
  bool in_class = false;
  size_t class_start = 0;
  for (size_t i = 0; i < p.size(); ++i) {
    char c = p[i];
    if (c == '\\' && i + 1 < p.size()) {
      char d = p[i + 1];
      const char* set = nullptr;
      bool neg = false;
      switch (d) {
        case 's': set = kS; break;
        case 'S':
          set = kS;
          neg = true;
          break;
        case 'w': set = kW; break;
        case 'W':
          set = kW;
          neg = true;
          break;
        case 'h': set = kH; break;
        case 'H':
          set = kH;
          neg = true;
          break;
        case 'd': set = "\\p{Nd}"; break;
        case 'D':
          set = "\\p{Nd}";
          neg = true;
          break;
        default: break;
      }
      if (set && in_class && !neg) {
        out += set;
      } else if (set && !in_class) {
        out += neg ? "[^" : "[";
        out += set;
        out += ']';
      } else {
        out += c;
        out += d;
      }
      ++i;
      continue;
    }
    if (!in_class) {
      if (c == '[') {
        in_class = true;
        out += c;
        class_start = out.size();
        if (i + 1 < p.size() && p[i + 1] == '^') {
          out += '^';
          ++i;
          class_start = out.size();
        }
        // a ']' right after '[' or '[^' is literal
        if (i + 1 < p.size() && p[i + 1] == ']') {
          out += "\\]";
          ++i;
        }
        continue;
      }
      out += c;
    } else {
      if (c == ']' && out.size() > class_start) {
        in_class = false;
      } else if (c == '[' && i + 1 < p.size() && p[i + 1] == ':') {
        // POSIX bracket [:alpha:] — copy through to the closing ":]"
        size_t close = p.find(":]", i + 2);
        if (close != std::string_view::npos) {
          out.append(p.substr(i, close + 2 - i));
          i = close + 1;
          continue;
        }
      }
      out += c;
    }
  }
  return out;
}

std::string regex_escape(std::string_view literal) {
  std::string out;
  for (char c : literal) {
    unsigned char u = static_cast<unsigned char>(c);
    bool plain =
        u >= 0x80 || (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ' ';
    if (plain) {
      out += c;
    } else if (u < 0x20 || u == 0x7F) {
      char buf[12];
      std::snprintf(buf, sizeof buf, "\\x{%X}", u);
      out += buf;
    } else {
      out += '\\';
      out += c;
    }
  }
  return out;
}

namespace {
struct MatchScratch {
  pcre2_match_data* md = nullptr;
  pcre2_match_context* mctx = nullptr;
  pcre2_jit_stack* stack = nullptr;
  MatchScratch() {
    md = pcre2_match_data_create(1, nullptr);
    mctx = pcre2_match_context_create(nullptr);
    stack = pcre2_jit_stack_create(64 * 1024, 8 * 1024 * 1024, nullptr);
    if (stack) pcre2_jit_stack_assign(mctx, nullptr, stack);
  }
  ~MatchScratch() {
    if (md) pcre2_match_data_free(md);
    if (mctx) pcre2_match_context_free(mctx);
    if (stack) pcre2_jit_stack_free(stack);
  }
};
MatchScratch& match_scratch() {
  thread_local MatchScratch s;
  return s;
}
}  // namespace

Regex::Regex(std::string_view onig_pattern) {
  std::string pat = onig_to_pcre2(onig_pattern);
  int err = 0;
  PCRE2_SIZE erroff = 0;
  code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pat.data()), pat.size(),
                        PCRE2_UTF | PCRE2_UCP | PCRE2_MULTILINE | PCRE2_NO_UTF_CHECK, &err, &erroff, nullptr);
  if (!code_) {
    PCRE2_UCHAR buf[256];
    pcre2_get_error_message(err, buf, sizeof buf);
    throw std::invalid_argument(std::string(reinterpret_cast<char*>(buf)) + " at offset " + std::to_string(erroff));
  }
  jit_ = pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE) == 0;
}

Regex::~Regex() {
  if (code_) pcre2_code_free(code_);
}

bool Regex::search(const char* s, size_t n, size_t start, size_t& b, size_t& e) const {
  MatchScratch& ms = match_scratch();
  int rc;
  if (jit_) {
    rc = pcre2_jit_match(code_, reinterpret_cast<PCRE2_SPTR>(s), n, start, 0, ms.md, ms.mctx);
  } else {
    rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(s), n, start, PCRE2_NO_UTF_CHECK, ms.md, ms.mctx);
  }
  if (rc == PCRE2_ERROR_NOMATCH) return false;
  if (rc < 0) {
    PCRE2_UCHAR buf[256];
    pcre2_get_error_message(rc, buf, sizeof buf);
    throw std::runtime_error(std::string("tokenizer regex match failed: ") + reinterpret_cast<char*>(buf));
  }
  const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(ms.md);
  b = ov[0];
  e = ov[1];
  return true;
}

std::unique_ptr<Pattern> Pattern::literal(std::string s) {
  auto p = std::make_unique<Pattern>();
  if (s.empty()) {
    p->re_ = std::make_unique<Regex>("");
  } else {
    p->lit_ = std::move(s);
  }
  return p;
}

std::unique_ptr<Pattern> Pattern::regex(std::string_view onig_pattern) {
  auto p = std::make_unique<Pattern>();
  p->re_ = std::make_unique<Regex>(onig_pattern);
  return p;
}

std::unique_ptr<Pattern> Pattern::single_char(char32_t c) {
  auto p = std::make_unique<Pattern>();
  utf8_append(p->lit_, c);
  p->is_char_ = true;
  return p;
}

void Pattern::find_matches(const char* s, size_t n, std::vector<Span>& out) const {
  if (n == 0) {
    out.push_back({0, 0, false});
    return;
  }
  size_t prev = 0;
  auto on_match = [&](size_t b, size_t e) {
    if (prev != b) out.push_back({uint32_t(prev), uint32_t(b), false});
    out.push_back({uint32_t(b), uint32_t(e), true});
    prev = e;
  };
  if (re_) {
    re_->find_iter(s, n, on_match);
  } else {
    // non-overlapping leftmost occurrences of a non-empty literal (what a regex of the escaped literal finds; a
    // single char pattern gives the same spans)
    std::string_view hay(s, n);
    size_t pos = 0;
    const size_t L = lit_.size();
    while (pos <= n) {
      size_t f = L == 1 ? hay.find(lit_[0], pos) : hay.find(lit_, pos);
      if (f == std::string_view::npos) break;
      on_match(f, f + L);
      pos = f + L;
    }
  }
  if (prev != n) out.push_back({uint32_t(prev), uint32_t(n), false});
}

// ---- normalized-string operations -------------------------------------------------------------------------------
View slice(const View& v, uint32_t nb, uint32_t ne) {
  View r;
  r.s = v.s + nb;
  r.al = v.al + nb;
  r.n = ne - nb;
  // original_shift of a slice: start of the original span its alignments cover (convert_offsets)
  r.shift = nb < ne ? v.al[nb].b : v.shift + nb;
  return r;
}

std::pair<size_t, size_t> original_span(const View& v, size_t tb, size_t te) {
  if (tb == te) return {size_t(v.shift) + tb, size_t(v.shift) + te};
  if (tb > te || te > v.n) return {tb, te};
  return {v.al[tb].b, v.al[te - 1].e};
}

static inline unsigned char_len_at(const char* s, size_t i) {
  return utf8_len_of_lead(static_cast<unsigned char>(s[i]));
}

// Appends v's bytes from `from` on (with their alignments) to the rewritten text and returns it as a View.
static View finish_rewrite(const View& v, size_t from, std::string* str, std::vector<Align>* al) {
  str->append(v.s + from, v.n - from);
  al->insert(al->end(), v.al + from, v.al + v.n);
  View r;
  r.s = str->data();
  r.al = al->data();
  r.n = static_cast<uint32_t>(str->size());
  r.shift = v.shift;
  return r;
}

View transform(const View& v, uint32_t nb, uint32_t ne, const std::vector<CharChange>& dest, size_t initial_offset,
               Arena& arena) {
  auto [str, al] = arena.make();
  str->reserve(v.n + dest.size() * 2);
  al->reserve(v.n + dest.size() * 2);
  str->append(v.s, nb);
  al->insert(al->end(), v.al, v.al + nb);
  size_t rp = nb;  // position of the next replaced char
  for (size_t k = 0; k < initial_offset && rp < ne; ++k) rp += char_len_at(v.s, rp);
  size_t offset = rp;
  const Align origin{v.shift, v.shift};
  for (const CharChange& cc : dest) {
    size_t idx = offset;
    Align a;
    if (cc.change > 0) {
      a = idx < 1 ? origin : v.al[std::min<size_t>(idx - 1, v.n - 1)];
    } else {
      a = idx < v.n ? v.al[idx] : (v.n ? v.al[v.n - 1] : origin);
    }
    size_t rsize = 0;
    if (cc.change <= 0 && rp < ne) {
      rsize = char_len_at(v.s, rp);
      rp += rsize;
    }
    size_t removed = 0;
    if (cc.change < 0) {
      for (int k = 0; k < -cc.change && rp < ne; ++k) {
        unsigned l = char_len_at(v.s, rp);
        removed += l;
        rp += l;
      }
    }
    offset += rsize + removed;
    size_t before = str->size();
    utf8_append(*str, cc.c);
    al->insert(al->end(), str->size() - before, a);
  }
  return finish_rewrite(v, ne, str, al);
}

View prepend(const View& v, std::string_view s, Arena& arena) {
  if (v.n == 0 || s.empty()) return v;
  unsigned first_len;
  char32_t first = utf8_decode(v.s, 0, first_len);
  std::vector<CharChange> dest;
  size_t i = 0;
  bool is_first = true;
  while (i < s.size()) {
    unsigned l;
    char32_t c = utf8_decode(s.data(), i, l);
    dest.push_back({c, is_first ? 0 : 1});
    is_first = false;
    i += l;
  }
  dest.push_back({first, 1});
  return transform(v, 0, first_len, dest, 0, arena);
}

View replace(const View& v, const Pattern& pat, std::string_view content, Arena& arena) {
  thread_local std::vector<Span> spans;
  spans.clear();
  pat.find_matches(v.s, v.n, spans);
  bool any = false;
  for (const Span& sp : spans) any |= sp.match;
  if (!any) return v;
  auto [str, al] = arena.make();
  str->reserve(v.n + content.size() * 4);
  al->reserve(v.n + content.size() * 4);
  const Align origin{v.shift, v.shift};
  size_t last_end = 0;
  for (const Span& sp : spans) {
    if (!sp.match) continue;
    str->append(v.s + last_end, sp.b - last_end);
    al->insert(al->end(), v.al + last_end, v.al + sp.b);
    // every content char is "inserted" after the removed match: alignment of the match's last byte
    size_t idx = sp.e;
    Align a = idx < 1 ? origin : v.al[idx - 1];
    str->append(content);
    al->insert(al->end(), content.size(), a);
    last_end = sp.e;
  }
  return finish_rewrite(v, last_end, str, al);
}

View lrstrip(const View& v, bool left, bool right, Arena& arena) {
  std::vector<char32_t> chars;
  for (size_t i = 0; i < v.n;) {
    unsigned l;
    chars.push_back(utf8_decode(v.s, i, l));
    i += l;
  }
  size_t leading = 0, trailing = 0;
  if (left)
    while (leading < chars.size() && is_white_space(chars[leading])) ++leading;
  if (right)
    while (trailing < chars.size() && is_white_space(chars[chars.size() - 1 - trailing])) ++trailing;
  if (leading == 0 && trailing == 0) return v;
  const size_t count = chars.size();
  std::vector<CharChange> dest;
  for (size_t i = 0; i < count; ++i) {
    if (i < leading || i >= count - trailing) continue;
    // `tokenizers` compares the char index with the *byte* length here; reproduced as is.
    if (i + trailing + 1 == size_t(v.n)) {
      dest.push_back({chars[i], -static_cast<int>(trailing)});
    } else {
      dest.push_back({chars[i], 0});
    }
  }
  return transform(v, 0, v.n, dest, leading, arena);
}

// ---- Unicode normalization with change tracking ---------------------------------------------------------------
// The change semantics are those of the `unicode-normalization-alignments` crate that `tokenizers` uses:
// decomposition emits (first char, 0), (following chars, +1) per input char, canonical reordering moves the pairs
// with their chars, and recomposition of (k, ck) with (ch, cc) yields (composite, ck + cc - 1). Unicode data
// (decompositions, combining classes, composition pairs) comes from utf8proc.
namespace {

struct CC {
  char32_t c;
  int change;
  int ccc;
};

inline int ccc_of(char32_t c) {
  if (c < 0x300) return 0;
  return utf8proc_get_property(static_cast<utf8proc_int32_t>(c))->combining_class;
}

constexpr char32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr int kLCount = 19, kVCount = 21, kTCount = 28, kNCount = kVCount * kTCount, kSCount = kLCount * kNCount;

// Primary composite of (a, b), or 0.
char32_t compose_pair(char32_t a, char32_t b) {
  if (a >= kLBase && a < kLBase + kLCount && b >= kVBase && b < kVBase + kVCount)
    return kSBase + ((a - kLBase) * kVCount + (b - kVBase)) * kTCount;
  if (a >= kSBase && a < kSBase + kSCount && (a - kSBase) % kTCount == 0 && b > kTBase && b < kTBase + kTCount)
    return a + (b - kTBase);
  if (b < 0x300) return 0;  // no composition has a second element below U+0300
  utf8proc_int32_t buf[2] = {static_cast<utf8proc_int32_t>(a), static_cast<utf8proc_int32_t>(b)};
  utf8proc_ssize_t n =
      utf8proc_normalize_utf32(buf, 2, static_cast<utf8proc_option_t>(UTF8PROC_COMPOSE | UTF8PROC_STABLE));
  return n == 1 ? static_cast<char32_t>(buf[0]) : 0;
}

void decompose_into(char32_t c, bool compat, std::vector<CC>& out) {
  if (c < 0xC0) {  // nothing below U+00C0 decomposes canonically; compat: U+00A0, U+00A8, ... handled by utf8proc
    if (!compat || c < 0xA0) {
      out.push_back({c, 0, 0});
      return;
    }
  }
  utf8proc_int32_t buf[32];
  int bc = 0;
  utf8proc_option_t opt = compat ? static_cast<utf8proc_option_t>(UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT)
                                 : static_cast<utf8proc_option_t>(UTF8PROC_DECOMPOSE);
  utf8proc_ssize_t n = utf8proc_decompose_char(static_cast<utf8proc_int32_t>(c), buf, 32, opt, &bc);
  if (n <= 0 || n > 32) {
    out.push_back({c, 0, ccc_of(c)});
    return;
  }
  for (utf8proc_ssize_t k = 0; k < n; ++k) {
    char32_t d = static_cast<char32_t>(buf[k]);
    out.push_back({d, k == 0 ? 0 : 1, ccc_of(d)});
  }
}

// Decomposition (+ canonical ordering) of chars[from, to) appended to `out`.
void decompose_seq(const std::vector<char32_t>& chars, size_t from, size_t to, bool compat, std::vector<CC>& out) {
  size_t start = out.size();
  for (size_t i = from; i < to; ++i) decompose_into(chars[i], compat, out);
  // stable sort every run of non-starters by combining class
  size_t i = start;
  while (i < out.size()) {
    if (out[i].ccc == 0) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < out.size() && out[j].ccc != 0) ++j;
    if (j - i > 1)
      std::stable_sort(out.begin() + long(i), out.begin() + long(j),
                       [](const CC& a, const CC& b) { return a.ccc < b.ccc; });
    i = j;
  }
}

void recompose(const std::vector<CC>& in, std::vector<CharChange>& out) {
  std::optional<CharChange> composee;
  std::optional<int> last_ccc;
  std::vector<CharChange> buffer;
  for (const CC& x : in) {
    const int cls = x.ccc;
    if (!composee) {
      if (cls != 0) {
        out.push_back({x.c, x.change});
        continue;
      }
      composee = CharChange{x.c, x.change};
      continue;
    }
    CharChange k = *composee;
    if (!last_ccc) {
      if (char32_t r = compose_pair(k.c, x.c)) {
        composee = CharChange{r, k.change + x.change - 1};
        continue;
      }
      if (cls == 0) {
        composee = CharChange{x.c, x.change};
        out.push_back(k);
        continue;
      }
      buffer.push_back({x.c, x.change});
      last_ccc = cls;
    } else {
      int l_class = *last_ccc;
      if (l_class >= cls) {
        if (cls == 0) {
          composee = CharChange{x.c, x.change};
          last_ccc.reset();
          out.push_back(k);
          out.insert(out.end(), buffer.begin(), buffer.end());
          buffer.clear();
          continue;
        }
        buffer.push_back({x.c, x.change});
        last_ccc = cls;
        continue;
      }
      if (char32_t r = compose_pair(k.c, x.c)) {
        composee = CharChange{r, k.change + x.change - 1};
        continue;
      }
      buffer.push_back({x.c, x.change});
      last_ccc = cls;
    }
  }
  if (composee) out.push_back(*composee);
  out.insert(out.end(), buffer.begin(), buffer.end());
}

}  // namespace

View unicode_normalize(const View& v, NormForm form, Arena& arena) {
  const bool compat = form == NormForm::NFKC || form == NormForm::NFKD;
  const bool compose = form == NormForm::NFC || form == NormForm::NFKC;
  // ASCII never changes, and an ASCII char always starts a new independent segment (it is a starter that is never
  // the second element of a composition). So only segments [previous ASCII char?][non-ASCII run] need the work.
  std::vector<char32_t> chars;
  std::vector<CC> dec;
  std::vector<CharChange> seg_out;
  bool changed = false;
  size_t i = 0;
  while (i < v.n && !changed) {
    if (static_cast<unsigned char>(v.s[i]) < 0x80) {
      ++i;
      continue;
    }
    size_t seg_b = i > 0 ? i - 1 : 0;  // the preceding ASCII char may compose with what follows
    size_t j = i;
    while (j < v.n && static_cast<unsigned char>(v.s[j]) >= 0x80) j += char_len_at(v.s, j);
    chars.clear();
    for (size_t p = seg_b; p < j;) {
      unsigned l;
      chars.push_back(utf8_decode(v.s, p, l));
      p += l;
    }
    dec.clear();
    decompose_seq(chars, 0, chars.size(), compat, dec);
    seg_out.clear();
    if (compose) {
      recompose(dec, seg_out);
    } else {
      for (const CC& x : dec) seg_out.push_back({x.c, x.change});
    }
    if (seg_out.size() != chars.size()) {
      changed = true;
    } else {
      for (size_t k = 0; k < chars.size(); ++k)
        if (seg_out[k].c != chars[k] || seg_out[k].change != 0) changed = true;
    }
    i = j;
  }
  if (!changed) return v;
  // Rare path: redo the whole string and apply it as one transformation.
  chars.clear();
  for (size_t p = 0; p < v.n;) {
    unsigned l;
    chars.push_back(utf8_decode(v.s, p, l));
    p += l;
  }
  dec.clear();
  decompose_seq(chars, 0, chars.size(), compat, dec);
  std::vector<CharChange> dest;
  if (compose) {
    recompose(dec, dest);
  } else {
    for (const CC& x : dec) dest.push_back({x.c, x.change});
  }
  return transform(v, 0, v.n, dest, 0, arena);
}

// ---- byte-level alphabet ------------------------------------------------------------------------------------------
namespace {
struct ByteMap {
  char32_t to_char[256];
  int16_t from_char[512];  // chars used are all below U+0200
  ByteMap() {
    for (auto& x : from_char) x = -1;
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      to_char[b] = printable ? char32_t(b) : char32_t(256 + n++);
      from_char[to_char[b]] = static_cast<int16_t>(b);
    }
  }
};
const ByteMap& byte_map() {
  static const ByteMap m;
  return m;
}
}  // namespace

const char32_t* bytes_to_chars() { return byte_map().to_char; }
int char_to_byte(char32_t c) { return c < 512 ? byte_map().from_char[c] : -1; }

std::optional<std::string> byte_level_bytes(std::string_view tok) {
  std::string raw;
  for (size_t i = 0; i < tok.size();) {
    unsigned l;
    const int byte = char_to_byte(utf8_decode(tok.data(), i, l));
    if (byte < 0) return std::nullopt;
    raw.push_back(static_cast<char>(byte));
    i += l;
  }
  return raw;
}

}  // namespace moedit::tok_detail
