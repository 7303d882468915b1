#include "eval/accuracy.h"

#include <algorithm>

#include "io/errors.h"
#include "model/generate.h"

namespace moedit {

std::vector<PromptCheck> check_first_tokens(const Model& m, const Tokenizer& tok,
                                            std::vector<std::pair<std::string, std::string>> prompts, int batch) {
  std::vector<PromptCheck> out;
  out.reserve(prompts.size());
  for (size_t i = 0; i < prompts.size(); i += size_t(batch)) {
    const size_t end = std::min(prompts.size(), i + size_t(batch));
    std::vector<std::vector<int32_t>> seqs;
    for (size_t j = i; j < end; ++j) {
      PromptCheck c;
      c.prompt = prompts[j].first;
      c.target = prompts[j].second;
      const auto t = tok.encode_ids(" " + c.target, /*add_special_tokens=*/false);
      if (t.empty()) throw InputError("target '" + c.target + "' encodes to no tokens");
      c.expected = t[0];
      seqs.push_back(tok.encode_ids(c.prompt));
      out.push_back(std::move(c));
    }
    ForwardOptions o;
    o.logits_all = false;
    o.record_routing = false;
    const ForwardOutput f = m.forward(seqs, o);
    for (size_t j = i; j < end; ++j) {
      PromptCheck& c = out[j];
      c.predicted = argmax(f.logits.row(long(j - i)).data(), int(f.logits.cols()));
      c.correct = c.predicted == c.expected;
    }
  }
  return out;
}

FactAccuracy first_token_accuracy(const Model& m, const Tokenizer& tok, const std::vector<CounterFactRecord>& recs,
                                  int batch) {
  std::vector<std::pair<std::string, std::string>> p;
  std::vector<int> kind;  // 0 rewrite, 1 paraphrase, 2 neighborhood
  for (const auto& r : recs) {
    p.emplace_back(r.rewrite_prompt(), r.target_true);
    kind.push_back(0);
    for (const auto& s : r.paraphrase_prompts) {
      p.emplace_back(s, r.target_true);
      kind.push_back(1);
    }
    for (const auto& s : r.neighborhood_prompts) {
      p.emplace_back(s, r.target_true);
      kind.push_back(2);
    }
  }
  const auto checks = check_first_tokens(m, tok, std::move(p), batch);
  FactAccuracy a;
  for (size_t i = 0; i < checks.size(); ++i) {
    Tally& t = kind[i] == 0 ? a.rewrite : kind[i] == 1 ? a.paraphrase : a.neighborhood;
    t.correct += checks[i].correct;
    ++t.total;
  }
  return a;
}

}  // namespace moedit
