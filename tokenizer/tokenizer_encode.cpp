// The encode pipeline up to the post-processor (TokenizerImpl::run): added tokens split out of the raw text, the
// normalizers, the added tokens of the normalized text, the pre-tokenizers (ByteLevel, Split, Metaspace) and the
// BPE model, with every token's byte offsets in the input — following Hugging Face `tokenizers` step by step.
#include "tokenizer/tokenizer_impl.h"

#include <algorithm>
#include <cstring>

#include "io/errors.h"

namespace moedit::tok_detail {

namespace {

// Keeps each span as its own range, or folds it into the last kept one where merge(s.match, previous match);
// backwards: walks from the end and folds into the range after it (MergedWithNext).
template <class Merge>
void fold_spans(const std::vector<Span>& spans, bool backwards, Merge merge, std::vector<Span>& out) {
  bool prev = false;
  for (size_t n = 0; n < spans.size(); ++n) {
    const Span& s = spans[backwards ? spans.size() - 1 - n : n];
    if (!merge(s.match, prev) || out.empty())
      out.push_back({s.b, s.e, false});
    else if (backwards)
      out.back().b = s.b;
    else
      out.back().e = s.e;
    prev = s.match;
  }
  if (backwards) std::reverse(out.begin(), out.end());
}

// Apply a split behaviour to the spans of find_matches (NormalizedString::split); returns kept [b, e) ranges.
void apply_behavior(std::vector<Span>& spans, Behavior behavior, std::vector<Span>& out) {
  out.clear();
  const auto starts_match = [](bool match, bool prev) { return match && !prev; };
  switch (behavior) {
    case Behavior::Isolated:
      for (const Span& s : spans) out.push_back({s.b, s.e, false});
      break;
    case Behavior::Removed:
      for (const Span& s : spans)
        if (!s.match) out.push_back({s.b, s.e, false});
      break;
    case Behavior::Contiguous:
      fold_spans(spans, false, [](bool match, bool prev) { return match == prev; }, out);
      break;
    case Behavior::MergedWithPrevious:
      fold_spans(spans, false, starts_match, out);
      break;
    case Behavior::MergedWithNext:
      fold_spans(spans, true, starts_match, out);
      break;
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

  // Splits v by pat (matches inverted with `invert`) with a behaviour, in this step's buffers, and calls f on every
  // non-empty kept piece.
  template <class F>
  void each_piece(const View& v, const Pattern& pat, bool invert, Behavior behavior, size_t step, F f) {
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
      if (s.e > s.b) f(slice(v, s.b, s.e));
    }
  }

  void split_by(const View& v, const Pattern& pat, bool invert, Behavior behavior, size_t step) {
    each_piece(v, pat, invert, behavior, step, [&](const View& piece) { pretok(piece, step + 1); });
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
            each_piece(w, *st.pat, false, Behavior::Isolated, step, raw_model);
          } else if (w.n) {
            raw_model(w);
          }
          return;
        }
        if (st.use_regex) {
          // split first, then map every piece to byte-level chars
          each_piece(w, *st.pat, false, Behavior::Isolated, step,
                     [&](const View& piece) { pretok(byte_level_map(piece), step + 1); });
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

}  // namespace moedit::tok_detail
