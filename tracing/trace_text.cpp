// Causal tracing at the text level: the prompt tokenized, the subject located through the offsets, the target's
// first token, the embedding std over CounterFact subjects; trace_fact() on top of trace_ids().
#include "tracing/trace.h"
#include "tracing/trace_internal.h"

#include <cctype>
#include <fstream>

#include "datasets/counterfact.h"
#include "io/errors.h"
#include "tokenizer/tokenizer.h"

namespace moedit::trace {

std::vector<std::string> counterfact_subjects(const std::string& path) {
  std::vector<std::string> out;
  std::ifstream f(path);
  if (!f) return out;
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(f);
  } catch (const std::exception& e) {
    throw InputError(path + ": malformed JSON (" + e.what() + ")");
  }
  if (!j.is_array()) return out;
  for (const auto& r : j) {
    if (r.contains("requested_rewrite") && r["requested_rewrite"].contains("subject") &&
        r["requested_rewrite"]["subject"].is_string())
      out.push_back(r["requested_rewrite"]["subject"].get<std::string>());
    else if (r.contains("subject") && r["subject"].is_string())
      out.push_back(r["subject"].get<std::string>());
  }
  return out;
}

double subject_embedding_std(const Model& m, const Tokenizer& tok, const std::vector<std::string>& subjects) {
  std::vector<std::vector<int32_t>> lists;
  for (const std::string& s : subjects) {
    const Tokenizer::Encoding enc = tok.encode(s, true);
    std::vector<int32_t> ids;
    for (size_t i = 0; i < enc.size(); ++i)
      if (!enc.special_mask[i]) ids.push_back(enc.ids[i]);
    lists.push_back(std::move(ids));
  }
  return embedding_std(m, lists);
}

std::pair<int, int> locate_subject(const Tokenizer& tok, const std::string& prompt, const std::string& subject,
                                   std::vector<int32_t>* ids) {
  if (subject.empty()) throw InputError("--subject is empty");
  const Tokenizer::Encoding enc = tok.encode(prompt, true);
  const auto span = tok.find_span(enc, prompt, subject);
  if (!span) throw InputError("subject '" + subject + "' is not in the prompt '" + prompt + "'");
  if (ids) *ids = enc.ids;
  return *span;
}

namespace {
bool ends_with_space(const std::string& s) { return !s.empty() && std::isspace((unsigned char)s.back()); }
bool starts_with_space(const std::string& s) { return !s.empty() && std::isspace((unsigned char)s.front()); }

int first_token_of_continuation(const Tokenizer& tok, const std::string& prompt, std::string text,
                                const char* what) {
  if (text.empty()) throw InputError(std::string(what) + " is empty");
  if (!ends_with_space(prompt) && !starts_with_space(text)) text = " " + text;
  const std::vector<int32_t> ids = tok.encode_ids(text, false);
  if (ids.empty()) throw InputError(std::string(what) + " '" + text + "' encodes to no tokens");
  return ids[0];
}
}  // namespace

std::vector<TraceReport> trace_facts_together(const Model& m, const Tokenizer& tok,
                                              const std::vector<TraceRequest>& reqs, const TraceOptions& opt,
                                              std::vector<std::string>* errors) {
  const size_t n = reqs.size();
  if (errors) errors->assign(n, "");
  // Text → tokens: the subject's range, the target's and the expected answer's first tokens.
  std::vector<TraceInput> ins;
  std::vector<size_t> index;  // ins[j] is reqs[index[j]]
  std::vector<int> want;      // expected answer's first token, −1: none given
  for (size_t i = 0; i < n; ++i) {
    const TraceRequest& req = reqs[i];
    try {
      TraceInput in;
      const auto [b, e] = locate_subject(tok, req.prompt, req.subject, &in.ids);
      in.subject_begin = b;
      in.subject_end = e;
      in.prompt = req.prompt;
      in.subject = req.subject;
      in.id = req.id;
      in.expected = req.expected;
      in.target_text = req.target;
      if (!req.target.empty()) in.target = first_token_of_continuation(tok, req.prompt, req.target, "--target");
      for (int32_t id : in.ids) in.tokens.push_back(tok.decode({id}));
      want.push_back(req.expected.empty() ? -1
                                          : first_token_of_continuation(tok, req.prompt, req.expected,
                                                                        "expected answer"));
      ins.push_back(std::move(in));
      index.push_back(i);
    } catch (const InputError& e) {
      fact_failed(e, i, n, req.id, errors);
    }
  }
  std::vector<TraceReport> out(n);
  if (ins.empty()) return out;
  TraceOptions o = opt;
  if (o.noise_file.empty() && o.embedding_std < 0 && parse_noise_rule(o.noise).type == NoiseRule::ScaledStd) {
    const std::vector<std::string> subjects = counterfact_subjects(bundled_counterfact_path());
    if (!subjects.empty()) {
      o.embedding_std = subject_embedding_std(m, tok, subjects);
      o.embedding_std_source = "bundled CounterFact subjects (" + std::to_string(subjects.size()) + ")";
    } else {
      std::vector<std::string> own;
      for (const TraceInput& in : ins) own.push_back(in.subject);
      o.embedding_std = subject_embedding_std(m, tok, own);
      o.embedding_std_source = own.size() == 1 ? "prompt subject" : "the traced prompts' subjects";
    }
  }
  std::vector<std::string> errs;
  std::vector<TraceReport> reps = trace_ids_together(m, ins, o, errors ? &errs : nullptr);
  for (size_t j = 0; j < ins.size(); ++j) {
    const size_t i = index[j];
    if (errors && !errs[j].empty()) {
      (*errors)[i] = errs[j];
      continue;
    }
    TraceReport& rep = reps[j];
    rep.answer_text = tok.decode({rep.answer});
    if (want[j] >= 0) rep.correct_prediction = rep.answer == want[j];
    out[i] = std::move(rep);
  }
  return out;
}

TraceReport trace_fact(const Model& m, const Tokenizer& tok, const TraceRequest& req, const TraceOptions& opt) {
  return std::move(trace_facts_together(m, tok, {req}, opt).front());
}

}  // namespace moedit::trace
