// Text-level metrics of ROME's CounterFact evaluation (spec/rome.md §4.2): n-gram entropy of generated text
// (fluency), TF-IDF cosine against reference snippets (consistency), and the harmonic mean behind "Score".
#pragma once
#include <map>
#include <string>
#include <vector>

namespace moedit::eval {

// Word tokenizer approximating NLTK's word_tokenize (Punkt sentence split + Treebank word rules), which ROME uses.
// Exactly what it does, in order:
//   1. split on whitespace into chunks;
//   2. in each chunk, a leading '"' becomes the token ``, a trailing '"' the token '';
//   3. leading ( [ { < ` are split off one by one; trailing ) ] } > , ; : ! ? ' are split off one by one ("..."
//      at the end is one token);
//   4. a trailing '.' is split off when the chunk is the text's last, or the next chunk starts with an uppercase
//      ASCII letter, a digit or a quote (Punkt's sentence break, approximated), unless the rest of the chunk holds
//      another '.', is a single letter, or is one of Mr Mrs Ms Dr Prof St Jr Sr vs etc Inc Ltd Co Mt Gen Col Lt Sgt
//      (any case) — abbreviations Punkt's English model knows: "U.S.", "J.", "Mr.";
//   5. inside what remains: ; @ # $ % & ! ? are tokens of their own, ',' and ':' too unless between two digits,
//      "--" is a token, and clitics are split as Treebank does: n't, 's, 'm, 'd, 're, 've, 'll (any case) start a
//      token ("don't" → do n't, "It's" → It 's), "cannot" → can not.
// Known differences from NLTK: no Punkt abbreviation or collocation statistics beyond rule 4, no handling of single quotes used as
// quotation marks inside words, no Unicode quote normalisation.
std::vector<std::string> word_tokenize(const std::string& text);

// ROME's compute_n_gram_entropy: mean over n ∈ {2, 3} of weight_n·H_n, weights 2/3 and 4/3, where
// H_n = −Σ f·log2 f over the relative frequencies of the text's word n-grams (H_n = 0 with no n-gram).
double ngram_entropy(const std::string& text);
// ROME's n_gram_entropy: the arithmetic mean over texts (NaN for no texts).
double ngram_entropy(const std::vector<std::string>& texts);

// scikit-learn's TfidfVectorizer with default settings, fit on a corpus: lowercase, tokens = runs of ≥ 2 word
// characters (ASCII letters, digits, '_', and every non-ASCII byte, approximating Unicode \w), smooth idf
// idf(t) = ln((1 + n) / (1 + df(t))) + 1, raw counts × idf, L2 normalised; terms outside the corpus are dropped.
class TfIdf {
 public:
  explicit TfIdf(const std::vector<std::string>& corpus);
  std::map<std::string, double> transform(const std::string& text) const;  // sparse, L2 normalised
  // ROME's tfidf_similarity: cosine of the two vectors; NaN when either has no known term.
  double similarity(const std::string& a, const std::string& b) const;
  size_t vocabulary_size() const { return idf_.size(); }

 private:
  std::map<std::string, double> idf_;
};
std::vector<std::string> tfidf_tokens(const std::string& text);

// scipy.stats.hmean for non-negative values: 0 when any is 0.
double harmonic_mean(const std::vector<double>& v);

}  // namespace moedit::eval
