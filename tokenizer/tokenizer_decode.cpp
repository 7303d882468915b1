// Decoding: ids back to tokens (added tokens in their normalized form), then the decoders (ByteLevel, Metaspace,
// Replace, ByteFallback, Fuse, Strip) as Hugging Face `tokenizers` runs them (Tokenizer::decode).
#include "tokenizer/tokenizer.h"

#include <algorithm>

#include "tokenizer/tokenizer_impl.h"

namespace moedit {
namespace tok_detail {

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
      for (const std::string& t : toks) bytes += byte_level_bytes(t).value_or(t);
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

using tok_detail::TokenizerImpl;

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

}  // namespace moedit
