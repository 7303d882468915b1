// ROME at the text level: context templates (sampled from the model, or given), the prompt with {} for the
// subject, the tokenized edit inputs (the subject's last token in every template), and apply_edit() on top.
#include "editor/rome.h"

#include <utf8proc.h>

#include <algorithm>
#include <cstdlib>

#include "editor/rome_internal.h"
#include "io/errors.h"
#include "model/generate.h"
#include "tokenizer/tokenizer.h"

namespace moedit {

using namespace rome_detail;

namespace {

std::string nfkd(const std::string& s) {
  utf8proc_uint8_t* r = utf8proc_NFKD(reinterpret_cast<const utf8proc_uint8_t*>(s.c_str()));
  if (!r) return s;
  std::string out(reinterpret_cast<char*>(r));
  std::free(r);
  return out;
}

void replace_all(std::string& s, const std::string& from, const std::string& to) {
  for (size_t p = s.find(from); p != std::string::npos; p = s.find(from, p + to.size())) s.replace(p, from.size(), to);
}

}  // namespace

// ---- text level -----------------------------------------------------------------------------------------------------

std::vector<std::string> context_templates(const Model& m, const Tokenizer& tok, const EditOptions& opt) {
  std::vector<std::string> out = {"{}"};
  if (!opt.templates.empty()) {
    for (const auto& t : opt.templates) {
      const auto p = t.find("{}");
      require_input(p != std::string::npos && t.find("{}", p + 2) == std::string::npos,
                    "context template '" + t + "' must contain exactly one {}");
      if (t != "{}") out.push_back(t);
    }
    return out;
  }
  std::optional<int> start = tok.bos_id();
  if (!start) start = tok.eos_id();
  if (!start) start = tok.token_to_id("<|endoftext|>");
  require_input(bool(start), tok.source() +
                                 ": no BOS/EOS token to sample context templates from; pass a templates file instead");
  uint64_t i = 0;
  for (const auto& [len, n] : opt.template_lengths) {
    for (int j = 0; j < n; ++j, ++i) {
      GenerateOptions g;
      g.max_new_tokens = std::max(1, len - 1);  // ROME's max_out_len counts the prompt token
      g.top_k = opt.template_top_k;
      g.seed = opt.template_seed + i;
      g.eos_token_id = -1;
      const auto ids = generate(m, {int32_t(*start)}, g);
      std::string s = tok.decode(ids, true);
      replace_all(s, "\n\n", " ");
      s = nfkd(s);
      std::replace(s.begin(), s.end(), '{', ' ');
      std::replace(s.begin(), s.end(), '}', ' ');
      out.push_back(s + ". {}");
    }
  }
  return out;
}

std::string normalized_prompt(const EditRequest& req) {
  require_input(!trim(req.subject).empty(), "the subject is empty");
  require_input(!trim(req.target_new).empty(), "the new target is empty");
  require_input(!trim(req.prompt).empty(), "the prompt is empty");
  const auto p = req.prompt.find("{}");
  if (p != std::string::npos) {
    require_input(req.prompt.find("{}", p + 2) == std::string::npos,
                  "the prompt '" + req.prompt + "' has more than one {}");
    return req.prompt;
  }
  const auto s = req.prompt.find(req.subject);
  require_input(s != std::string::npos, "the subject '" + req.subject + "' is not in the prompt '" + req.prompt +
                                            "' (write {} where the subject goes)");
  std::string out = req.prompt;
  out.replace(s, req.subject.size(), "{}");
  return out;
}

namespace {
// Encodes template ∘ prompt ∘ subject; returns ids and the subject's last token.
std::pair<std::vector<int32_t>, int> encode_with_subject(const Tokenizer& tok, const std::string& tmpl,
                                                         const std::string& prompt, const std::string& subject) {
  const auto tp = tmpl.find("{}");
  const std::string t1 = tmpl.substr(0, tp) + prompt + tmpl.substr(tp + 2);
  const size_t sp = tp + prompt.find("{}");
  const std::string text = t1.substr(0, sp) + subject + t1.substr(sp + 2);
  const auto enc = tok.encode(text, true);
  const auto span = Tokenizer::span_for_bytes(enc, sp, sp + subject.size());
  require_input(bool(span) && span->second > span->first,
                "the subject '" + subject + "' does not map to tokens in '" + text + "'");
  return {enc.ids, span->second - 1};
}
}  // namespace

EditIds build_edit_ids(const Tokenizer& tok, const EditRequest& req, const std::vector<std::string>& templates,
                       const std::string& kl_prompt) {
  const std::string prompt = normalized_prompt(req);
  EditIds ids;
  ids.target = tok.encode_ids(with_space(req.target_new), false);
  require_input(!ids.target.empty(), "the new target '" + req.target_new + "' encodes to no tokens");
  require_input(!templates.empty() && templates[0] == "{}", "the first context template must be {}");
  for (const auto& t : templates) {
    auto [v, last] = encode_with_subject(tok, t, prompt, req.subject);
    ids.prompts.push_back(std::move(v));
    ids.subject_last.push_back(last);
  }
  require_input(kl_prompt.find("{}") != std::string::npos, "the KL prompt '" + kl_prompt + "' has no {}");
  auto [kv, kl] = encode_with_subject(tok, "{}", kl_prompt, req.subject);
  ids.kl_prompt = std::move(kv);
  ids.kl_subject_last = kl;
  return ids;
}

EditResult apply_edit(Model& m, const Tokenizer& tok, const EditRequest& req, const EditOptions& opt,
                      std::vector<std::string>* templates_cache) {
  std::vector<std::string> local;
  std::vector<std::string>& tm = templates_cache ? *templates_cache : local;
  normalized_prompt(req);  // validate before sampling templates
  if (tm.empty()) tm = context_templates(m, tok, opt);
  const EditIds ids = build_edit_ids(tok, req, tm, opt.kl_prompt);
  EditResult r = apply_edit_ids(m, ids, opt);
  r.templates = tm;
  return r;
}

}  // namespace moedit
