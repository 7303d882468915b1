// Token features for `moedit probe` (issue 20): the features file, the activations probed, and the bundled set.
//
// Features file (JSON):
//   {"features": ["digit", ...],                       the binary features, in order
//    "texts": [{"ids": [int, ...],                     token ids as the model reads them (BOS included, if any)
//               "text": "...",                         optional, for people
//               "labels": {"digit": [0, 1, ...], ...}}  per feature, one 0/1 per id
//             ...]}
// Every text must label every listed feature. Tokens of texts whose index i has i % 5 == 0 are held out (the test
// split); the probes are fitted on the others, so no text is split between the two.
//
// The bundled set (build_probe_features; `moedit probe --build-features F`): WikiText-2 lines and CounterFact
// prompts (rewrite prompt + true object), tokenized by the model's tokenizer, with
//   digit            the token's text holds an ASCII digit
//   sentence_start   the first token of a sentence: the text's first non-special token, or a token with a letter or
//                    digit right after a token ending in . ! or ? (whitespace ignored)
//   subject          the token lies inside the CounterFact subject (tokenizer find_span; 0 on WikiText-2 lines)
//   closing_bracket  the token's text holds ) ] or }
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "datasets/counterfact.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"

namespace moedit {

struct FeatureText {
  std::vector<int32_t> ids;
  std::string text;
  std::map<std::string, std::vector<uint8_t>> labels;  // feature → [ids.size()]
};
struct FeatureSet {
  std::vector<std::string> features;
  std::vector<FeatureText> texts;
};

// InputError naming the file and the field.
FeatureSet load_features(const std::string& path);
std::string features_json(const FeatureSet& f);

FeatureSet build_probe_features(const Tokenizer& tok, const std::vector<std::string>& wiki_lines,
                                const std::vector<CounterFactRecord>& records, int max_tokens = 64);

// The SwiGLU activations act(gate)·up (the input of down_proj) of one MoE layer over the texts, token by token in
// the order of the texts (global token index g).
struct LayerActivations {
  std::vector<MatR> expert;                  // [E] × [n_e, I]: rows = the tokens routed to expert e
  std::vector<std::vector<int>> expert_rows; // [E] × [n_e]: global token index of each row
  MatR shared;                               // [tokens, shared width]; empty without a shared expert
  int tokens = 0;
};
// Runs blocks 0..layer in batches of about batch_tokens tokens (hooks experts.{e}.hook_key and shared key).
LayerActivations layer_activations(const Model& m, const std::vector<std::vector<int32_t>>& texts, int layer,
                                   int batch_tokens = 4096);

}  // namespace moedit
