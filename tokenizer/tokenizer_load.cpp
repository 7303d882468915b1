// Loading a tokenizer: tokenizer.json parsed stage by stage (normalizer, pre_tokenizer, BPE model, post_processor,
// decoder, added_tokens) with errors naming the file and the field, and BOS/EOS from tokenizer_config.json
// (Tokenizer::from_file, Tokenizer::from_json).
#include "tokenizer/tokenizer.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "io/errors.h"
#include "tokenizer/tokenizer_impl.h"

namespace moedit {
namespace tok_detail {

using json = nlohmann::json;

// ---- JSON loading -------------------------------------------------------------------------------------------------
namespace {

const char* const kGpt2Pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

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

  // A pipeline stage `what` (normalizer, pre_tokenizer, post_processor, decoder): nothing when null, the members of
  // the list `list_key` of a "Sequence" in order, else the one step that step(j, path, type) reads (nullopt: a type
  // not among `supported`).
  template <typename Step>
  void stage(const json& j, const std::string& path, const char* what, const char* list_key, const char* supported,
             std::vector<Step>& out,
             std::optional<Step> (Loader::*step)(const json&, const std::string&, const std::string&) const) const {
    if (j.is_null()) return;
    const std::string t = type_of(j, path);
    if (t == "Sequence") {
      each_in_list(j, list_key, path, [&](const json& item, const std::string& at) {
        stage(item, at, what, list_key, supported, out, step);
      });
      return;
    }
    std::optional<Step> st = (this->*step)(j, path, t);
    if (!st)
      fail(join(path, "type"),
           std::string("unknown or unsupported ") + what + " type '" + t + "' (supported: " + supported + ")");
    out.push_back(std::move(*st));
  }

  void normalizer(const json& j, const std::string& path, std::vector<NormStep>& out) const {
    stage(j, path, "normalizer", "normalizers", "NFC, NFD, NFKC, NFKD, Prepend, Replace, Strip, Sequence", out,
          &Loader::normalizer_step);
  }
  std::optional<NormStep> normalizer_step(const json& j, const std::string& path, const std::string& t) const {
    NormStep st;
    if (t == "NFC" || t == "NFD" || t == "NFKC" || t == "NFKD") {
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
      return std::nullopt;
    }
    return st;
  }

  void pre_tokenizer(const json& j, const std::string& path, std::vector<PreStep>& out) const {
    stage(j, path, "pre_tokenizer", "pretokenizers", "ByteLevel, Split, Metaspace, Sequence", out,
          &Loader::pre_tokenizer_step);
  }
  std::optional<PreStep> pre_tokenizer_step(const json& j, const std::string& path, const std::string& t) const {
    PreStep st;
    if (t == "ByteLevel") {
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
      return std::nullopt;
    }
    return st;
  }

  void post_processor(const json& j, const std::string& path, std::vector<PostStep>& out) const {
    stage(j, path, "post_processor", "processors", "TemplateProcessing, ByteLevel, Sequence", out,
          &Loader::post_processor_step);
  }
  std::optional<PostStep> post_processor_step(const json& j, const std::string& path, const std::string& t) const {
    PostStep st;
    if (t == "ByteLevel") {
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
      return std::nullopt;
    }
    return st;
  }

  void decoder(const json& j, const std::string& path, std::vector<DecStep>& out) const {
    stage(j, path, "decoder", "decoders", "ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip, Sequence", out,
          &Loader::decoder_step);
  }
  std::optional<DecStep> decoder_step(const json& j, const std::string& path, const std::string& t) const {
    DecStep st;
    if (t == "ByteLevel") {
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
      return std::nullopt;
    }
    return st;
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
  } catch (const json::exception& e) {  // a syntax error, or a number out of range (406: overflow)
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
}  // namespace tok_detail

using tok_detail::TokenizerImpl;

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

}  // namespace moedit
