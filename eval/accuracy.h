// First-token accuracy of CounterFact facts: does the model's argmax next token after the prompt equal the first
// token of " " + target? Measured on the rewrite prompt, the paraphrase prompts and the neighborhood prompts, all
// with target_true (what the unedited model should know).
#pragma once
#include <string>
#include <vector>

#include "datasets/counterfact.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"

namespace moedit {

struct Tally {
  int correct = 0, total = 0;
  double rate() const { return total ? double(correct) / total : 0.0; }
};

struct FactAccuracy {
  Tally rewrite, paraphrase, neighborhood;
};

// One (prompt, target) pair's next-token check.
struct PromptCheck {
  std::string prompt, target;
  bool correct = false;
  int predicted = -1, expected = -1;
};

// Runs every prompt once (packed batches of `batch` prompts, last-token logits only).
std::vector<PromptCheck> check_first_tokens(const Model& m, const Tokenizer& tok,
                                            std::vector<std::pair<std::string, std::string>> prompts, int batch = 64);

FactAccuracy first_token_accuracy(const Model& m, const Tokenizer& tok, const std::vector<CounterFactRecord>& recs,
                                  int batch = 64);

}  // namespace moedit
