#include "eval/text_metrics.h"

#include <cctype>
#include <cmath>
#include <limits>
#include <set>
#include <sstream>

namespace moedit::eval {

namespace {

bool is_digit(char c) { return c >= '0' && c <= '9'; }
bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}
std::string lower(std::string s) {
  for (char& c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// Rule 5's clitics: "don't" → do n't, "it's" → it 's, "cannot" → can not.
void push_word(std::vector<std::string>& out, const std::string& w) {
  if (w.empty()) return;
  const std::string lw = lower(w);
  if (lw == "cannot") {
    out.push_back(w.substr(0, 3));
    out.push_back(w.substr(3));
    return;
  }
  for (const char* suf : {"n't", "'ll", "'re", "'ve", "'s", "'m", "'d"}) {
    const std::string s = suf;
    if (lw.size() > s.size() && ends_with(lw, s)) {
      out.push_back(w.substr(0, w.size() - s.size()));
      out.push_back(w.substr(w.size() - s.size()));
      return;
    }
  }
  out.push_back(w);
}

// Rule 5: separators inside a chunk's core.
void split_core(std::vector<std::string>& out, const std::string& core) {
  std::string cur;
  auto flush = [&] {
    push_word(out, cur);
    cur.clear();
  };
  for (size_t i = 0; i < core.size(); ++i) {
    const char c = core[i];
    const bool between_digits = i > 0 && i + 1 < core.size() && is_digit(core[i - 1]) && is_digit(core[i + 1]);
    if (std::string(";@#$%&!?").find(c) != std::string::npos || ((c == ',' || c == ':') && !between_digits)) {
      flush();
      out.emplace_back(1, c);
    } else if (c == '-' && i + 1 < core.size() && core[i + 1] == '-') {
      flush();
      out.emplace_back("--");
      ++i;
    } else {
      cur += c;
    }
  }
  flush();
}

bool sentence_break_after(const std::vector<std::string>& chunks, size_t i) {
  if (i + 1 == chunks.size()) return true;
  const char c = chunks[i + 1][0];
  return (c >= 'A' && c <= 'Z') || is_digit(c) || c == '"' || c == '\'' || c == '`';
}

}  // namespace

std::vector<std::string> word_tokenize(const std::string& text) {
  std::vector<std::string> chunks;
  {
    std::istringstream in(text);
    for (std::string w; in >> w;) chunks.push_back(w);
  }
  std::vector<std::string> out;
  for (size_t i = 0; i < chunks.size(); ++i) {
    std::string core = chunks[i];
    if (core[0] == '"') {  // rule 2
      out.emplace_back("``");
      core.erase(0, 1);
    }
    while (!core.empty() && std::string("([{<`").find(core[0]) != std::string::npos) {  // rule 3, leading
      out.emplace_back(1, core[0]);
      core.erase(0, 1);
    }
    std::vector<std::string> tail;  // split-off suffix tokens, last first
    for (bool changed = true; changed && !core.empty();) {
      changed = true;
      if (ends_with(core, "...")) {
        tail.emplace_back("...");
        core.resize(core.size() - 3);
      } else if (core.back() == '"') {
        tail.emplace_back("''");
        core.pop_back();
      } else if (std::string(")]}>,;:!?'").find(core.back()) != std::string::npos) {
        tail.emplace_back(1, core.back());
        core.pop_back();
      } else if (core.back() == '.' && core.size() > 1 && sentence_break_after(chunks, i)) {  // rule 4
        const std::string rest = core.substr(0, core.size() - 1);
        static const std::set<std::string> titles = {"mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs",
                                                      "etc", "inc", "ltd", "co", "mt", "gen", "col", "lt", "sgt"};
        const bool abbreviation = rest.find('.') != std::string::npos || titles.count(lower(rest)) > 0 ||
                                  (rest.size() == 1 && std::isalpha(static_cast<unsigned char>(rest[0])));
        changed = !abbreviation;
        if (changed) {
          tail.emplace_back(".");
          core = rest;
        }
      } else {
        changed = false;
      }
    }
    split_core(out, core);
    out.insert(out.end(), tail.rbegin(), tail.rend());
  }
  return out;
}

double ngram_entropy(const std::string& text) {
  const auto words = word_tokenize(text);
  const double weights[2] = {2.0 / 3.0, 4.0 / 3.0};
  double sum = 0;
  for (int k = 0; k < 2; ++k) {
    const size_t n = size_t(k + 2);
    std::map<std::string, int> freq;
    for (size_t i = 0; i + n <= words.size(); ++i) {
      std::string g;
      for (size_t j = 0; j < n; ++j) g += words[i + j] + '\x1f';
      ++freq[g];
    }
    double total = 0, h = 0;
    for (const auto& [g, c] : freq) total += c;
    for (const auto& [g, c] : freq) h -= (c / total) * std::log2(c / total);
    sum += weights[k] * h;
  }
  return sum / 2;
}

double ngram_entropy(const std::vector<std::string>& texts) {
  if (texts.empty()) return std::numeric_limits<double>::quiet_NaN();
  double s = 0;
  for (const auto& t : texts) s += ngram_entropy(t);
  return s / double(texts.size());
}

std::vector<std::string> tfidf_tokens(const std::string& text) {
  std::vector<std::string> out;
  std::string cur;
  auto flush = [&] {
    if (cur.size() >= 2) out.push_back(cur);
    cur.clear();
  };
  for (const char ch : text) {
    const auto c = static_cast<unsigned char>(ch);
    if (std::isalnum(c) || c == '_' || c >= 0x80)
      cur += char(std::tolower(c));
    else
      flush();
  }
  flush();
  return out;
}

TfIdf::TfIdf(const std::vector<std::string>& corpus) {
  std::map<std::string, int> df;
  for (const auto& doc : corpus) {
    const auto t = tfidf_tokens(doc);
    for (const auto& w : std::set<std::string>(t.begin(), t.end())) ++df[w];
  }
  const double n = double(corpus.size());
  for (const auto& [w, d] : df) idf_[w] = std::log((1 + n) / (1 + d)) + 1;
}

std::map<std::string, double> TfIdf::transform(const std::string& text) const {
  std::map<std::string, double> v;
  for (const auto& w : tfidf_tokens(text))
    if (const auto it = idf_.find(w); it != idf_.end()) v[w] += it->second;
  double norm = 0;
  for (const auto& [w, x] : v) norm += x * x;
  norm = std::sqrt(norm);
  for (auto& [w, x] : v) x /= norm;
  return v;
}

double TfIdf::similarity(const std::string& a, const std::string& b) const {
  const auto va = transform(a), vb = transform(b);
  if (va.empty() || vb.empty()) return std::numeric_limits<double>::quiet_NaN();
  double dot = 0;
  for (const auto& [w, x] : va)
    if (const auto it = vb.find(w); it != vb.end()) dot += x * it->second;
  return dot;
}

double harmonic_mean(const std::vector<double>& v) {
  double inv = 0;
  for (const double x : v) {
    if (x <= 0) return 0;
    inv += 1 / x;
  }
  return v.empty() ? std::numeric_limits<double>::quiet_NaN() : double(v.size()) / inv;
}

}  // namespace moedit::eval
