// Steering report (see eval/steer_report.h).
#include "eval/steer_report.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <set>

#include "eval/counterfact_eval.h"
#include "eval/text_metrics.h"
#include "model/generate.h"

namespace moedit::eval {

double keyword_rate(const std::vector<std::string>& texts, const std::vector<std::string>& keywords) {
  std::set<std::string> kw;
  for (std::string k : keywords) {
    std::transform(k.begin(), k.end(), k.begin(), [](unsigned char ch) { return char(std::tolower(ch)); });
    kw.insert(k);
  }
  size_t hit = 0, total = 0;
  for (const auto& t : texts)
    for (const auto& w : tfidf_tokens(t)) {
      ++total;
      hit += kw.count(w);
    }
  return total ? double(hit) / double(total) : NAN;
}

std::vector<SteerReportRow> steer_report(const Model& m, const Tokenizer& tok, const Steering& steer,
                                         const std::vector<std::string>& prompts,
                                         const std::vector<std::string>& keywords,
                                         const std::vector<std::string>& reference, const SteerReportOptions& opt) {
  std::vector<SteerReportRow> out;
  for (double c : opt.coefs) {
    InterventionSpec spec;
    if (c != 0) {
      spec.steer = steer;
      spec.steer.c = float(c);
    }
    Hooks hooks;
    install_interventions(spec, m.config(), hooks);
    const Hooks* h = hooks.empty() ? nullptr : &hooks;
    SteerReportRow row;
    row.c = c;
    GenerateOptions g;
    g.max_new_tokens = opt.new_tokens;
    g.top_k = opt.top_k;
    g.hooks = h;
    if (const auto eos = tok.eos_id()) g.eos_token_id = *eos;  // stop at the end of text
    for (size_t i = 0; i < prompts.size(); ++i) {
      g.seed = opt.seed + i;
      row.generations.push_back(tok.decode(generate(m, tok.encode_ids(prompts[i], true), g)));
    }
    row.keyword_rate = keyword_rate(row.generations, keywords);
    double sum = 0;
    for (const auto& r : reference) sum += perplexity(m, tok, r, opt.ppl_tokens, h);
    row.perplexity = reference.empty() ? NAN : sum / double(reference.size());
    out.push_back(std::move(row));
  }
  return out;
}

}  // namespace moedit::eval
