// Tokenizer: exact agreement with Hugging Face `tokenizers` (ids, char offsets, pieces, encode without the template,
// decode with and without special tokens) for ten real tokenizers on every string of the fixture corpus (edge cases,
// seeded fuzz strings, all CounterFact strings, all WikiText-2 test lines, and the whole WikiText-2 file as one
// string), twelve synthetic variants covering the options the real files do not use, byte offsets, find_span, BOS/EOS,
// thread safety, and malformed tokenizer.json files through the library and the CLI (exit code 2).
// Fixtures: tests/fixtures/tokenizers, written by tools/gen_tokenizer_vectors.py (see its header for the formats).
#include <brotli/decode.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cctype>
#include <cstdio>
#include <map>
#include <nlohmann/json.hpp>
#include <thread>

#include "io/errors.h"
#include "tokenizer/tokenizer.h"
#include "test_util.h"

namespace moedit {
namespace {

using test::TempDir;
using json = nlohmann::json;

std::string fixture_path(const std::string& rel) { return test::fixture("tokenizers/" + rel); }

std::string brotli_file(const std::string& path) {
  const std::string in = test::read_file(path);
  if (in.empty()) throw std::runtime_error("missing or empty fixture " + path);
  BrotliDecoderState* st = BrotliDecoderCreateInstance(nullptr, nullptr, nullptr);
  std::string out;
  size_t avail_in = in.size();
  const uint8_t* next_in = reinterpret_cast<const uint8_t*>(in.data());
  std::vector<uint8_t> buf(1 << 20);
  BrotliDecoderResult r;
  do {
    size_t avail_out = buf.size();
    uint8_t* next_out = buf.data();
    r = BrotliDecoderDecompressStream(st, &avail_in, &next_in, &avail_out, &next_out, nullptr);
    out.append(reinterpret_cast<char*>(buf.data()), buf.size() - avail_out);
  } while (r == BROTLI_DECODER_RESULT_NEEDS_MORE_OUTPUT);
  BrotliDecoderDestroyInstance(st);
  if (r != BROTLI_DECODER_RESULT_SUCCESS) throw std::runtime_error("bad brotli stream in " + path);
  return out;
}

struct Reader {
  const std::string& s;
  size_t p = 0;
  uint64_t var() {
    uint64_t v = 0;
    for (int shift = 0;; shift += 7) {
      if (p >= s.size()) throw std::runtime_error("truncated fixture");
      uint8_t b = uint8_t(s[p++]);
      v |= uint64_t(b & 0x7F) << shift;
      if (!(b & 0x80)) return v;
    }
  }
  int64_t zig() {
    uint64_t v = var();
    return (v & 1) ? -int64_t((v + 1) >> 1) : int64_t(v >> 1);
  }
  std::string bytes() {
    size_t n = size_t(var());
    if (p + n > s.size()) throw std::runtime_error("truncated fixture");
    std::string r = s.substr(p, n);
    p += n;
    return r;
  }
  uint64_t u64() {
    if (p + 8 > s.size()) throw std::runtime_error("truncated fixture");
    uint64_t v = 0;
    for (int k = 0; k < 8; ++k) v |= uint64_t(uint8_t(s[p + k])) << (8 * k);
    p += 8;
    return v;
  }
  void magic(const char* m) {
    if (s.compare(p, 4, m) != 0) throw std::runtime_error(std::string("bad fixture magic, expected ") + m);
    p += 4;
  }
};

enum Category { kEdge = 0, kFuzz = 1, kCounterFact = 2, kWiki = 3 };
const char* kCategoryName[] = {"edge", "fuzz", "counterfact", "wikitext"};

struct Corpus {
  std::vector<std::string> text;
  std::vector<int> cat;
  std::string wiki_whole;
};

const Corpus& corpus() {
  static const Corpus c = [] {
    Corpus c;
    const std::string raw = brotli_file(fixture_path("corpus.bin.br"));
    Reader r{raw};
    r.magic("MTC1");
    const size_t n = size_t(r.var());
    bool first_wiki = true;
    for (size_t i = 0; i < n; ++i) {
      c.cat.push_back(int(r.var()));
      c.text.push_back(r.bytes());
      if (c.cat.back() == kWiki) {
        if (!first_wiki) c.wiki_whole += '\n';
        c.wiki_whole += c.text.back();
        first_wiki = false;
      }
    }
    return c;
  }();
  return c;
}

uint64_t fnv1a64(const std::vector<int32_t>& ids, const std::vector<std::pair<size_t, size_t>>& offs) {
  uint64_t h = 0xCBF29CE484222325ULL;
  auto word = [&](uint32_t w) {
    for (int k = 0; k < 4; ++k) {
      h ^= (w >> (8 * k)) & 0xFF;
      h *= 0x100000001B3ULL;
    }
  };
  for (size_t i = 0; i < ids.size(); ++i) {
    word(uint32_t(ids[i]));
    word(uint32_t(offs[i].first));
    word(uint32_t(offs[i].second));
  }
  return h;
}
uint64_t fnv1a64(const std::string& s) {
  uint64_t h = 0xCBF29CE484222325ULL;
  for (unsigned char c : s) {
    h ^= c;
    h *= 0x100000001B3ULL;
  }
  return h;
}

std::string tokenizer_json(const std::string& name) { return brotli_file(fixture_path("files/" + name + ".json.br")); }

// A tokenizer.json with the components of a variant replaced (same rules as apply_variant in the generator).
std::string variant_json(const json& v) {
  json d = json::parse(tokenizer_json(v["base"].get<std::string>()));
  if (v.contains("set")) {
    for (auto it = v["set"].begin(); it != v["set"].end(); ++it) {
      json* node = &d;
      std::string path = it.key();
      size_t dot;
      while ((dot = path.find('.')) != std::string::npos) {
        node = &(*node)[path.substr(0, dot)];
        path = path.substr(dot + 1);
      }
      (*node)[path] = it.value();
    }
  }
  if (v.contains("add"))
    for (const json& a : v["add"]) d["added_tokens"].push_back(a);
  return d.dump();
}

// Per category: strings, and how many agree on each checked item.
struct Tally {
  size_t n = 0, ids_offsets = 0, pieces = 0, no_special = 0, decode = 0, decode_skip = 0;
  size_t roundtrip_ref = 0, roundtrip_ours = 0, roundtrip_skip_ref = 0, roundtrip_skip_ours = 0;
  bool all() const { return ids_offsets == n && pieces == n && no_special == n && decode == n && decode_skip == n; }
};

// Checks `tok` against the expected-vector file; returns per-category tallies. Mismatches are reported (the first
// few in detail) as test failures.
std::map<int, Tally> check_vectors(const Tokenizer& tok, const std::string& vec_name, bool whole_trailer) {
  const Corpus& c = corpus();
  const std::string raw = brotli_file(fixture_path(vec_name + ".vec.br"));
  Reader r{raw};
  r.magic("MTV1");
  const size_t n = size_t(r.var());
  EXPECT_LE(n, c.text.size());
  std::map<int, Tally> tally;
  int reported = 0;
  auto report = [&](size_t i, const std::string& what, const std::string& detail) {
    if (++reported <= 8)
      ADD_FAILURE() << vec_name << ": string #" << i << " (" << kCategoryName[c.cat[i]] << ") "
                    << json(c.text[i]).dump(-1, ' ', false, json::error_handler_t::replace).substr(0, 160) << ": "
                    << what << " differs " << detail;
  };
  for (size_t i = 0; i < n; ++i) {
    const std::string& text = c.text[i];
    Tally& t = tally[c.cat[i]];
    ++t.n;
    const Tokenizer::Encoding enc = tok.encode(text);
    const size_t ntok = size_t(r.var());
    std::vector<int32_t> ids;
    std::vector<std::pair<size_t, size_t>> offs;
    bool match;
    if (c.cat[i] == kWiki) {
      const uint64_t h = r.u64();
      match = ntok == enc.size() && h == fnv1a64(enc.ids, enc.offsets);
    } else {
      for (size_t k = 0; k < ntok; ++k) ids.push_back(int32_t(r.var()));
      size_t prev = 0;
      for (size_t k = 0; k < ntok; ++k) {
        size_t b = size_t(int64_t(prev) + r.zig());
        size_t e = b + size_t(r.var());
        offs.emplace_back(b, e);
        prev = e;
      }
      match = ids == enc.ids && offs == enc.offsets;
      if (!match) {
        json a = ids, b = enc.ids, ao = offs, bo = enc.offsets;
        report(i, "ids/offsets",
               "\n  expected " + a.dump() + " " + ao.dump() + "\n  got      " + b.dump() + " " + bo.dump());
      }
    }
    if (match)
      ++t.ids_offsets;
    else if (c.cat[i] == kWiki)
      report(i, "ids/offsets digest", "");
    const size_t k_pre = size_t(r.var()), k_post = size_t(r.var());
    const uint64_t flags = r.var();
    // pieces
    std::vector<std::string> pieces;
    if (flags & 1) {
      for (int32_t id : enc.ids) pieces.push_back(tok.id_to_token(id));
    } else {
      for (size_t k = 0; k < ntok; ++k) pieces.push_back(r.bytes());
    }
    if (pieces == enc.pieces)
      ++t.pieces;
    else
      report(i, "pieces", "");
    // encode without the template
    const Tokenizer::Encoding ns = tok.encode(text, false);
    bool ns_ok = match && k_pre + k_post <= enc.size() &&
                 ns.ids == std::vector<int32_t>(enc.ids.begin() + long(k_pre), enc.ids.end() - long(k_post)) &&
                 ns.offsets == std::vector<std::pair<size_t, size_t>>(enc.offsets.begin() + long(k_pre),
                                                                      enc.offsets.end() - long(k_post));
    if (ns_ok)
      ++t.no_special;
    else
      report(i, "encode(add_special_tokens=false)", "");
    // decode
    auto read_decode = [&]() {
      const size_t keep = size_t(r.var());
      std::string head = r.bytes();
      return head + text.substr(text.size() - keep);
    };
    const std::string ref_dec = (flags & 2) ? text : read_decode();
    std::string ref_skip;
    if (flags & 4)
      ref_skip = text;
    else if (flags & 8)
      ref_skip = ref_dec;
    else
      ref_skip = read_decode();
    const std::string dec = tok.decode(enc.ids, false), dec_skip = tok.decode(enc.ids, true);
    if (dec == ref_dec)
      ++t.decode;
    else
      report(i, "decode", "\n  expected " + json(ref_dec).dump() + "\n  got      " + json(dec).dump());
    if (dec_skip == ref_skip)
      ++t.decode_skip;
    else
      report(i, "decode(skip_special_tokens)",
             "\n  expected " + json(ref_skip).dump() + "\n  got      " + json(dec_skip).dump());
    t.roundtrip_ref += ref_dec == text;
    t.roundtrip_ours += dec == text;
    t.roundtrip_skip_ref += ref_skip == text;
    t.roundtrip_skip_ours += dec_skip == text;
  }
  if (whole_trailer) {
    const size_t ntok = size_t(r.var());
    const uint64_t h = r.u64(), hdec = r.u64();
    const uint64_t flags = r.var();
    const Tokenizer::Encoding enc = tok.encode(c.wiki_whole);
    Tally& t = tally[100];
    t.n = 1;
    t.ids_offsets = ntok == enc.size() && h == fnv1a64(enc.ids, enc.offsets);
    t.pieces = t.no_special = 1;
    const std::string dec = tok.decode(enc.ids);
    t.decode = t.decode_skip = fnv1a64(dec) == hdec;
    t.roundtrip_ref = t.roundtrip_skip_ref = (flags & 2) ? 1 : 0;
    t.roundtrip_ours = t.roundtrip_skip_ours = dec == c.wiki_whole;
    EXPECT_EQ(ntok, enc.size()) << vec_name << ": whole WikiText-2 file";
    EXPECT_TRUE(t.ids_offsets) << vec_name << ": whole WikiText-2 file: ids/offsets digest differs";
    EXPECT_TRUE(t.decode) << vec_name << ": whole WikiText-2 file: decode digest differs";
  }
  EXPECT_EQ(r.p, raw.size()) << vec_name << ": fixture not fully consumed";
  return tally;
}

void print_tally(const std::string& name, const std::map<int, Tally>& tally) {
  for (const auto& [cat, t] : tally) {
    std::printf(
        "[ %-30s ] %-11s %6zu strings: ids+offsets %6zu, pieces %6zu, no-special %6zu, decode %6zu, "
        "decode(skip) %6zu | round-trip decode==text: tokenizers %zu, ours %zu; skip-special: tokenizers %zu, "
        "ours %zu\n",
        name.c_str(), cat == 100 ? "whole-file" : kCategoryName[cat], t.n, t.ids_offsets, t.pieces, t.no_special,
        t.decode, t.decode_skip, t.roundtrip_ref, t.roundtrip_ours, t.roundtrip_skip_ref, t.roundtrip_skip_ours);
  }
  std::fflush(stdout);
}

const char* kTokenizers[] = {
    "gpt2",       "mixtral-8x7b-v0.1", "mistral-7b-v0.1", "olmoe-1b-7b-0924",      "olmoe-1b-7b-0125",
    "qwen2-0.5b", "qwen3-0.6b",        "deepseek-r1",     "gigachat-20b-a3b-base", "granite-3.0-2b-instruct"};

class TokenizerReal : public ::testing::TestWithParam<const char*> {};

TEST_P(TokenizerReal, MatchesHuggingFaceTokenizers) {
  const std::string name = GetParam();
  const Tokenizer tok = Tokenizer::from_json(tokenizer_json(name), name + ".json");
  const auto tally = check_vectors(tok, name, true);
  print_tally(name, tally);
  for (const auto& [cat, t] : tally) {
    EXPECT_TRUE(t.all()) << name << " " << (cat == 100 ? "whole-file" : kCategoryName[cat]);
    // round trip wherever tokenizers round-trips (implied by equal decodes; checked explicitly)
    EXPECT_EQ(t.roundtrip_ref, t.roundtrip_ours);
    EXPECT_EQ(t.roundtrip_skip_ref, t.roundtrip_skip_ours);
  }
}

INSTANTIATE_TEST_SUITE_P(All, TokenizerReal, ::testing::ValuesIn(kTokenizers), [](const auto& info) {
  std::string s = info.param;
  for (char& ch : s)
    if (!isalnum(static_cast<unsigned char>(ch))) ch = '_';
  return s;
});

std::vector<std::string> variant_names() {
  std::vector<std::string> names;
  const json v = json::parse(test::read_file(fixture_path("variants.json")));
  for (const json& x : v) names.push_back(x["name"].get<std::string>());
  return names;
}

class TokenizerVariant : public ::testing::TestWithParam<std::string> {};

TEST_P(TokenizerVariant, MatchesHuggingFaceTokenizers) {
  const json all = json::parse(test::read_file(fixture_path("variants.json")));
  json v;
  for (const json& x : all)
    if (x["name"] == GetParam()) v = x;
  ASSERT_FALSE(v.is_null());
  const Tokenizer tok = Tokenizer::from_json(variant_json(v), GetParam() + ".json");
  const auto tally = check_vectors(tok, GetParam(), false);
  print_tally(GetParam(), tally);
  for (const auto& [cat, t] : tally) EXPECT_TRUE(t.all()) << GetParam() << " " << kCategoryName[cat];
}

INSTANTIATE_TEST_SUITE_P(All, TokenizerVariant, ::testing::ValuesIn(variant_names()), [](const auto& info) {
  std::string s = info.param;
  for (char& ch : s)
    if (!isalnum(static_cast<unsigned char>(ch))) ch = '_';
  return s;
});

// ---- offsets, spans, ids ---------------------------------------------------------------------------------------
const Tokenizer& gpt2() {
  static const Tokenizer t = Tokenizer::from_json(tokenizer_json("gpt2"), "gpt2.json");
  return t;
}
const Tokenizer& mixtral() {
  static const Tokenizer t =
      Tokenizer::from_json(tokenizer_json("mixtral-8x7b-v0.1"), "mixtral.json",
                           test::read_file(fixture_path("files/mixtral-8x7b-v0.1.tokenizer_config.json")));
  return t;
}

TEST(TokenizerOffsets, ByteOffsetsAreTheCharOffsetsInBytes) {
  const std::vector<std::string> texts = {"Café Mötley Crüe — 中文 😀👍🏽 done", "e\u0301 x",
                                          "<s>Hello</s> wörld"};
  for (const Tokenizer* tok : {&gpt2(), &mixtral()}) {
    for (const std::string& text : texts) {
      const auto enc = tok->encode(text);
      ASSERT_EQ(enc.byte_offsets.size(), enc.offsets.size());
      // char index of every byte boundary
      std::vector<size_t> char_at(text.size() + 1, 0);
      size_t ci = 0;
      for (size_t i = 0; i < text.size(); ++i) {
        if ((static_cast<unsigned char>(text[i]) & 0xC0) != 0x80)
          char_at[i] = ci++;
        else
          char_at[i] = char_at[i - 1];
      }
      char_at[text.size()] = ci;
      for (size_t k = 0; k < enc.size(); ++k) {
        const auto [bb, be] = enc.byte_offsets[k];
        ASSERT_LE(bb, be);
        ASSERT_LE(be, text.size());
        if (enc.special_mask[k]) {
          EXPECT_EQ(enc.offsets[k], std::make_pair(size_t(0), size_t(0)));
          continue;
        }
        EXPECT_EQ(enc.offsets[k].first, char_at[bb]) << text << " token " << k;
        EXPECT_EQ(enc.offsets[k].second, char_at[be]) << text << " token " << k;
      }
    }
  }
}

TEST(TokenizerOffsets, EncodeIdsEqualsEncode) {
  for (const std::string& s : {std::string("Hello <|endoftext|> world"), std::string(""), std::string("a\r\nb  c")}) {
    EXPECT_EQ(gpt2().encode_ids(s), gpt2().encode(s).ids);
    EXPECT_EQ(mixtral().encode_ids(s), mixtral().encode(s).ids);
    EXPECT_EQ(mixtral().encode_ids(s, false), mixtral().encode(s, false).ids);
  }
}

TEST(TokenizerSpan, RomeSubjectRange) {
  // GPT-2: "The mother tongue of Danielle Darrieux is" -> The| mother| tongue| of| Danielle| Dar|rie|ux| is
  const std::string text = "The mother tongue of Danielle Darrieux is";
  const auto enc = gpt2().encode(text);
  const auto span = gpt2().find_span(enc, text, "Danielle Darrieux");
  ASSERT_TRUE(span.has_value());
  const size_t sb = text.find("Danielle"), se = sb + std::string("Danielle Darrieux").size();
  // the rule: first token ending after the subject start .. first token reaching the subject end
  EXPECT_GT(enc.byte_offsets[size_t(span->first)].second, sb);
  EXPECT_LE(enc.byte_offsets[size_t(span->first) - 1].second, sb);
  EXPECT_GE(enc.byte_offsets[size_t(span->second) - 1].second, se);
  EXPECT_LT(enc.byte_offsets[size_t(span->second) - 2].second, se);
  EXPECT_EQ(gpt2().decode(std::vector<int32_t>(enc.ids.begin() + span->first, enc.ids.begin() + span->second)),
            " Danielle Darrieux");
  // Mixtral: the template <s> (offsets 0,0) is never part of the span; the span starts at "▁Dan..."
  const auto menc = mixtral().encode(text);
  const auto mspan = mixtral().find_span(menc, text, "Danielle Darrieux");
  ASSERT_TRUE(mspan.has_value());
  EXPECT_GE(mspan->first, 1);
  EXPECT_EQ(mixtral().decode(std::vector<int32_t>(menc.ids.begin() + mspan->first, menc.ids.begin() + mspan->second)),
            "Danielle Darrieux");
  // a subject starting mid-token takes the whole token; absent / empty subjects give nothing
  const auto part = gpt2().find_span(enc, text, "rrieux");
  ASSERT_TRUE(part.has_value());
  EXPECT_LE(enc.byte_offsets[size_t(part->first)].first, text.find("rrieux"));
  EXPECT_FALSE(gpt2().find_span(enc, text, "Paris").has_value());
  EXPECT_FALSE(gpt2().find_span(enc, text, "").has_value());
}

TEST(TokenizerSpan, EveryCounterFactSubjectIsFound) {
  const Corpus& c = corpus();
  // prompts and subjects come in pairs in the corpus: "<prompt with subject>", "<subject>"
  size_t checked = 0;
  for (size_t i = 0; i + 1 < c.text.size(); ++i) {
    if (c.cat[i] != kCounterFact || c.cat[i + 1] != kCounterFact) continue;
    const std::string& prompt = c.text[i];
    const std::string& subject = c.text[i + 1];
    if (subject.empty() || subject[0] == ' ' || prompt.find(subject) == std::string::npos || prompt == subject)
      continue;
    for (const Tokenizer* tok : {&gpt2(), &mixtral()}) {
      const auto enc = tok->encode(prompt);
      const auto span = tok->find_span(enc, prompt, subject);
      ASSERT_TRUE(span.has_value()) << prompt << " / " << subject;
      ASSERT_LT(span->first, span->second);
      const size_t sb = prompt.find(subject), se = sb + subject.size();
      EXPECT_GT(enc.byte_offsets[size_t(span->first)].second, sb);
      EXPECT_GE(enc.byte_offsets[size_t(span->second) - 1].second, se);
    }
    if (++checked >= 300) break;
  }
  EXPECT_GE(checked, 100u);
}

TEST(TokenizerIds, VocabBosEos) {
  EXPECT_EQ(mixtral().bos_id(), 1);
  EXPECT_EQ(mixtral().eos_id(), 2);
  EXPECT_EQ(mixtral().vocab_size(), 32000);
  EXPECT_EQ(mixtral().token_to_id("<s>"), 1);
  EXPECT_EQ(mixtral().id_to_token(2), "</s>");
  EXPECT_TRUE(mixtral().is_special(1));
  EXPECT_EQ(gpt2().vocab_size(), 50257);
  EXPECT_EQ(gpt2().token_to_id("<|endoftext|>"), 50256);
  EXPECT_FALSE(gpt2().bos_id().has_value());  // no config, no template
  EXPECT_EQ(gpt2().id_to_token(99999999), "");
  // unknown ids are skipped by decode, as in `tokenizers`
  EXPECT_EQ(gpt2().decode({15496, 99999999, 995}), "Hello world");
  // folder loading picks up tokenizer_config.json
  TempDir d;
  test::write_file(d / "tokenizer.json", tokenizer_json("mixtral-8x7b-v0.1"));
  test::write_file(d / "tokenizer_config.json",
                   test::read_file(fixture_path("files/mixtral-8x7b-v0.1.tokenizer_config.json")));
  const Tokenizer t = Tokenizer::from_file(d.path.string());
  EXPECT_EQ(t.bos_id(), 1);
  EXPECT_EQ(t.eos_id(), 2);
  EXPECT_EQ(t.encode("Hello world").ids, (std::vector<int32_t>{1, 22557, 1526}));
  const Tokenizer qwen = Tokenizer::from_json(tokenizer_json("qwen3-0.6b"), "qwen3.json");
  EXPECT_EQ(qwen.token_to_id("<|im_start|>"), 151644);
  EXPECT_EQ(qwen.vocab_size(), 151669);
  EXPECT_FALSE(qwen.bos_id().has_value());
}

TEST(TokenizerThreads, ConcurrentEncodeIsDeterministic) {
  const Corpus& c = corpus();
  std::vector<std::vector<int32_t>> expected;
  for (size_t i = 0; i < 400; ++i) expected.push_back(gpt2().encode(c.text[i]).ids);
  std::atomic<int> bad{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int rep = 0; rep < 3; ++rep)
        for (size_t i = size_t(t); i < expected.size(); i += 1)
          if (gpt2().encode(c.text[i]).ids != expected[i]) ++bad;
    });
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad.load(), 0);
}

TEST(TokenizerInput, InvalidUtf8IsAnInputError) {
  EXPECT_THROW(gpt2().encode(std::string("ab\xff")), InputError);
  EXPECT_THROW(gpt2().encode(std::string("\xe4\xb8")), InputError);
}

// ---- malformed tokenizer.json ----------------------------------------------------------------------------------
const char* kMini = R"({
  "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
  "normalizer": null,
  "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
  "post_processor": null, "decoder": {"type": "ByteLevel"},
  "model": {"type": "BPE", "dropout": null, "unk_token": null, "vocab": {"a": 0, "b": 1, "ab": 2, "Ġ": 3},
            "merges": ["a b"]}
})";

std::string mini_with(const std::string& path, const json& value) {
  json d = json::parse(kMini);
  json* node = &d;
  std::string p = path;
  size_t dot;
  while ((dot = p.find('.')) != std::string::npos) {
    node = &(*node)[p.substr(0, dot)];
    p = p.substr(dot + 1);
  }
  if (value.is_null() && p == "model")
    node->erase(p);
  else
    (*node)[p] = value;
  return d.dump();
}

struct BadCase {
  std::string name, text, expect_in_message;
};

std::vector<BadCase> bad_cases() {
  return {
      {"missing_model", mini_with("model", nullptr), "field 'model': missing"},
      {"unknown_pre_tokenizer", mini_with("pre_tokenizer", json{{"type", "Whatever"}}),
       "field 'pre_tokenizer.type': unknown or unsupported pre_tokenizer type 'Whatever'"},
      {"unknown_normalizer", mini_with("normalizer", json{{"type", "Lowercase2"}}), "field 'normalizer.type'"},
      {"unknown_decoder",
       mini_with("decoder", json{{"type", "Sequence"}, {"decoders", json::array({json{{"type", "Nope"}}})}}),
       "field 'decoder.decoders[0].type'"},
      {"unsupported_model", mini_with("model.type", "Unigram"), "field 'model.type': unsupported model type 'Unigram'"},
      {"merge_not_in_vocab", mini_with("model.merges", json::array({"a b", "b c"})),
       "field 'model.merges[1]': token 'c' is not in model.vocab"},
      {"merged_not_in_vocab", mini_with("model.merges", json::array({json::array({"b", "a"})})),
       "field 'model.merges[0]': merged token 'ba' is not in model.vocab"},
      {"bad_merge_line", mini_with("model.merges", json::array({"a b c"})), "field 'model.merges[0]'"},
      {"bad_regex",
       mini_with(
           "pre_tokenizer",
           json{{"type", "Split"}, {"pattern", {{"Regex", "(unclosed"}}}, {"behavior", "Isolated"}, {"invert", false}}),
       "field 'pre_tokenizer.pattern.Regex': invalid regex"},
      {"bad_behavior",
       mini_with("pre_tokenizer",
                 json{{"type", "Split"}, {"pattern", {{"String", " "}}}, {"behavior", "Sideways"}, {"invert", false}}),
       "field 'pre_tokenizer.behavior'"},
      {"vocab_not_object", mini_with("model.vocab", json::array()), "field 'model.vocab'"},
      {"bad_added_token", mini_with("added_tokens", json::array({json{{"id", 9}}})),
       "field 'added_tokens[0].content': missing"},
      {"malformed_json", std::string(kMini).substr(0, 120), "malformed JSON"},
      {"not_an_object", "[1, 2]", "expected a JSON object"},
      // a number past double's range is nlohmann's out_of_range (406), not a parse_error (found by the fuzzer)
      {"number_overflow", "{\"version\": 1e99999, \"model\": {}}", "malformed JSON"},
  };
}

TEST(TokenizerMalformed, LibraryThrowsInputErrorNamingFileAndField) {
  // the well-formed mini file works
  const Tokenizer ok = Tokenizer::from_json(kMini, "mini.json");
  EXPECT_EQ(ok.encode("ab ab").ids, (std::vector<int32_t>{2, 3, 2}));
  EXPECT_EQ(ok.decode({2, 3, 2}), "ab ab");
  for (const BadCase& bc : bad_cases()) {
    try {
      Tokenizer::from_json(bc.text, "dir/" + bc.name + ".json");
      ADD_FAILURE() << bc.name << ": no error";
    } catch (const InputError& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("dir/" + bc.name + ".json"), std::string::npos) << bc.name << ": " << msg;
      EXPECT_NE(msg.find(bc.expect_in_message), std::string::npos) << bc.name << ": " << msg;
    }
  }
}

TEST(TokenizerMalformed, CliExitsWithCode2) {
  TempDir d;
  for (const BadCase& bc : bad_cases()) {
    const std::string file = d / (bc.name + ".json");
    test::write_file(file, bc.text);
    const auto r = test::run_cli("tokenize " + file + " --text hello");
    EXPECT_EQ(r.code, 2) << bc.name << ": " << r.err;
    EXPECT_NE(r.err.find(file), std::string::npos) << bc.name << ": " << r.err;
    EXPECT_NE(r.err.find(bc.expect_in_message), std::string::npos) << bc.name << ": " << r.err;
  }
  // a folder without tokenizer.json, and a file that does not exist
  auto r = test::run_cli("tokenize " + d.path.string() + " --text hello");
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("no tokenizer.json"), std::string::npos) << r.err;
  r = test::run_cli("tokenize " + (d / "nowhere.json") + " --text hello");
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("nowhere.json"), std::string::npos) << r.err;
  // a malformed tokenizer_config.json next to a good tokenizer.json
  TempDir m;
  test::write_file(m / "tokenizer.json", kMini);
  test::write_file(m / "tokenizer_config.json", "{\"bos_token\": ");
  r = test::run_cli("tokenize " + m.path.string() + " --text hello");
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("tokenizer_config.json: malformed JSON"), std::string::npos) << r.err;
}

// ---- the CLI ---------------------------------------------------------------------------------------------------
TEST(TokenizerCli, JsonOutputMatchesLibraryAndTokenizers) {
  TempDir d;
  test::write_file(d / "tokenizer.json", tokenizer_json("mixtral-8x7b-v0.1"));
  const std::string text = "The Eiffel Tower is located in Paris.";
  auto r = test::run_cli("tokenize " + d.path.string() + " --text '" + text + "' --json");
  ASSERT_EQ(r.code, 0) << r.err;
  const json j = json::parse(r.out);
  const auto enc = mixtral().encode(text);
  EXPECT_EQ(j["ids"].get<std::vector<int32_t>>(), enc.ids);
  EXPECT_EQ(j["pieces"].get<std::vector<std::string>>(), enc.pieces);
  EXPECT_EQ((j["offsets"].get<std::vector<std::pair<size_t, size_t>>>()), enc.offsets);
  EXPECT_EQ(j["ids"][0], 1);  // <s> from the template
  EXPECT_EQ(j["offsets"][0], (json::array({0, 0})));
  // what tokenizers returns
  EXPECT_EQ(enc.ids, (std::vector<int32_t>{1, 415, 413, 2728, 301, 19895, 349, 5651, 297, 5465, 28723}));
  r = test::run_cli("tokenize " + (d / "tokenizer.json") + " --text '" + text + "' --json --no-special");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out)["ids"].get<std::vector<int32_t>>(),
            std::vector<int32_t>(enc.ids.begin() + 1, enc.ids.end()));
  // the table names the file and shows every token
  r = test::run_cli("tokenize " + d.path.string() + " --text 'Hello world'");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("tokenizer.json"), std::string::npos);
  EXPECT_NE(r.out.find("\"▁Hello\""), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("(template)"), std::string::npos) << r.out;
  // --text is required
  r = test::run_cli("tokenize " + d.path.string());
  EXPECT_EQ(r.code, 2);
}

}  // namespace
}  // namespace moedit
