// moedit::Tokenizer: encode (the pipeline of tokenizer_encode.cpp, then character offsets and the post-processor:
// template special tokens, ByteLevel offset trimming), token spans of a substring, and the vocabulary lookups
// (see tokenizer.h). Loading: tokenizer_load.cpp; decoding: tokenizer_decode.cpp.
#include "tokenizer/tokenizer.h"

#include <algorithm>

#include "io/errors.h"
#include "tokenizer/tokenizer_impl.h"

namespace moedit {

// ---- public API ----------------------------------------------------------------------------------------------------
using tok_detail::TokenizerImpl;

Tokenizer::Tokenizer(std::unique_ptr<TokenizerImpl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

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
