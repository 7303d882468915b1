#include "eval/counterfact_eval.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <random>
#include <utf8proc.h>

#include "io/errors.h"
#include "model/generate.h"

namespace moedit::eval {
using json = nlohmann::json;

bool TargetScore::all_correct() const {
  return std::all_of(correct.begin(), correct.end(), [](uint8_t c) { return c != 0; });
}
double TargetScore::accuracy() const {
  double s = 0;
  for (const uint8_t c : correct) s += c;
  return correct.empty() ? 0.0 : s / double(correct.size());
}

std::vector<TargetScore> score_targets(const Model& m, const std::vector<TargetQuery>& queries, int route_layer,
                                       int batch_tokens, const Hooks* hooks) {
  std::vector<TargetScore> out(queries.size());
  const int V = m.config().vocab_size;
  size_t begin = 0;
  while (begin < queries.size()) {
    // One packed batch: prompt ∘ target[:-1] per query (the last target token is never an input).
    std::vector<std::vector<int32_t>> seqs;
    size_t end = begin;
    int64_t tokens = 0;
    while (end < queries.size()) {
      const TargetQuery& q = queries[end];
      require_input(!q.target.empty() && !q.prompt.empty(), "a scored prompt or target encodes to no tokens");
      const int64_t n = int64_t(q.prompt.size() + q.target.size() - 1);
      if (end > begin && tokens + n > batch_tokens) break;
      std::vector<int32_t> s = q.prompt;
      s.insert(s.end(), q.target.begin(), q.target.end() - 1);
      seqs.push_back(std::move(s));
      tokens += n;
      ++end;
    }
    ForwardOptions fo;
    fo.record_routing = route_layer >= 0;
    fo.hooks = hooks;
    const ForwardOutput f = m.forward(seqs, fo);  // logits [tokens, V]
    int64_t row0 = 0;
    for (size_t i = begin; i < end; ++i) {
      const TargetQuery& q = queries[i];
      TargetScore& s = out[i];
      for (size_t j = 0; j < q.target.size(); ++j) {
        const float* lg = f.logits.row(long(row0 + int64_t(q.prompt.size() + j) - 1)).data();
        const Eigen::Map<const Eigen::ArrayXf> la(lg, V);
        const float mx = la.maxCoeff();
        const double z = (la.cast<double>() - double(mx)).exp().sum();  // vectorised, in fp64 as before
        s.nll += std::log(z) + mx - lg[q.target[j]];
        s.correct.push_back(argmax(lg, V) == q.target[j]);
      }
      s.nll /= double(q.target.size());
      if (q.route_token >= 0 && route_layer >= 0 && m.config().is_moe(route_layer)) {
        const LayerRouting& r = f.routing[size_t(route_layer)];
        for (long k = 0; k < r.ids.cols(); ++k) s.experts.push_back(r.ids(long(row0 + q.route_token), k));
      }
      row0 += int64_t(seqs[i - begin].size());
    }
    begin = end;
  }
  return out;
}

namespace {

// ROME's generate_fast normalises its texts with unicodedata.normalize("NFKD", ...).
std::string nfkd(const std::string& s) {
  utf8proc_uint8_t* mapped = nullptr;
  const auto n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()), utf8proc_ssize_t(s.size()), &mapped,
                              utf8proc_option_t(UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT));
  if (n < 0) return s;  // invalid UTF-8: left as decoded
  const std::string out(reinterpret_cast<const char*>(mapped), size_t(n));
  std::free(mapped);
  return out;
}

// The subject's last token in `enc` of `text` (−1 when the subject does not occur).
int subject_last_token(const Tokenizer& tok, const Tokenizer::Encoding& enc, const std::string& text,
                       const std::string& subject) {
  const auto span = tok.find_span(enc, text, subject);
  return span && span->second > span->first ? span->second - 1 : -1;
}

json probs_json(const TargetScore& n, const TargetScore& t) { return {{"target_new", n.nll}, {"target_true", t.nll}}; }

// Builds the queries of one case, remembering where each prompt group's scores land.
struct QueryPlan {
  std::vector<TargetQuery> queries;
  std::vector<int> paraphrase_first;  // index of each paraphrase's first query

  int add(TargetQuery q) {
    queries.push_back(std::move(q));
    return int(queries.size()) - 1;
  }
};

CaseMetrics counterfact_metrics(const Model& m, const Tokenizer& tok, const EvalRecord& rec, int layer) {
  const auto tn = tok.encode_ids(" " + rec.target_new, false);
  const auto tt = tok.encode_ids(" " + rec.target_true, false);
  QueryPlan plan;
  // Groups in ROME's order; each prompt contributes (new, true) at indices 2i, 2i+1 of its group.
  const std::vector<std::string> rewrite = {rec.rewrite_prompt()};
  const std::vector<std::pair<const char*, const std::vector<std::string>*>> groups = {
      {"rewrite", &rewrite},
      {"paraphrase", &rec.paraphrase_prompts},
      {"neighborhood", &rec.neighborhood_prompts},
      {"attribute", &rec.attribute_prompts}};
  std::vector<int> group_first;
  for (const auto& [name, prompts] : groups) {
    group_first.push_back(int(plan.queries.size()));
    const bool paraphrase = std::string(name) == "paraphrase";
    for (const auto& p : *prompts) {
      const auto enc = tok.encode(p, true);
      const int route = paraphrase ? subject_last_token(tok, enc, p, rec.subject) : -1;
      plan.add({enc.ids, tn, route});
      plan.add({enc.ids, tt, -1});
    }
  }
  const auto sc = score_targets(m, plan.queries, layer);
  CaseMetrics out;
  for (size_t g = 0; g < groups.size(); ++g) {
    const std::string name = groups[g].first;
    json probs = json::array(), correct = json::array();
    for (size_t i = 0; i < groups[g].second->size(); ++i) {
      const TargetScore& n = sc[size_t(group_first[g]) + 2 * i];
      const TargetScore& t = sc[size_t(group_first[g]) + 2 * i + 1];
      probs.push_back(probs_json(n, t));
      correct.push_back(name == "neighborhood" ? t.all_correct() : n.all_correct());
      if (name == "paraphrase") {
        out.paraphrase_success.push_back(t.nll > n.nll ? 1.0 : 0.0);
        out.paraphrase_experts.push_back(n.experts);
      }
    }
    out.values[name + "_prompts_probs"] = std::move(probs);
    if (name != "attribute") out.values[name + "_prompts_correct"] = std::move(correct);
  }
  return out;
}

CaseMetrics token_accuracy_metrics(const Model& m, const Tokenizer& tok, const EvalRecord& rec, int layer) {
  const auto tn = tok.encode_ids(" " + rec.target_new, false);
  QueryPlan plan;
  const auto renc = tok.encode(rec.rewrite_prompt(), true);
  plan.add({renc.ids, tn, -1});
  for (const auto& p : rec.paraphrase_prompts) {
    const auto enc = tok.encode(p, true);
    plan.paraphrase_first.push_back(plan.add({enc.ids, tn, subject_last_token(tok, enc, p, rec.subject)}));
  }
  const bool has_loc = !rec.locality_prompt.empty();
  if (has_loc) plan.add({tok.encode_ids(rec.locality_prompt, true), tok.encode_ids(" " + rec.locality_answer, false), -1});
  const auto sc = score_targets(m, plan.queries, layer);
  CaseMetrics out;
  auto flat = [](const std::vector<const TargetScore*>& v) {
    json j = json::array();
    for (const auto* s : v)
      for (const uint8_t c : s->correct) j.push_back(c != 0);
    return j;
  };
  std::vector<const TargetScore*> para;
  for (const int i : plan.paraphrase_first) {
    para.push_back(&sc[size_t(i)]);
    out.paraphrase_success.push_back(sc[size_t(i)].accuracy());
    out.paraphrase_experts.push_back(sc[size_t(i)].experts);
  }
  out.values["rewrite_prompts_correct"] = flat({&sc[0]});
  out.values["paraphrase_prompts_correct"] = flat(para);
  if (has_loc) out.values["neighborhood_prompts_correct"] = flat({&sc.back()});
  return out;
}

}  // namespace

namespace {

// One top-k draw: softmax over the k largest logits (ties → lower id first), one discrete_distribution draw.
int32_t sample_top_k(const float* lg, int V, int k, std::mt19937_64& rng) {
  // The k largest, largest first, in one pass over ascending ids: a later equal logit never displaces an earlier one.
  k = std::min(k, V);
  std::vector<int32_t> ids(static_cast<size_t>(k));
  int have = 0;
  for (int32_t v = 0; v < V; ++v) {
    if (have == k && !(lg[v] > lg[ids[size_t(k - 1)]])) continue;
    int p = have < k ? have++ : k - 1;
    for (; p > 0 && lg[v] > lg[ids[size_t(p - 1)]]; --p) ids[size_t(p)] = ids[size_t(p - 1)];
    ids[size_t(p)] = v;
  }
  std::vector<double> w(static_cast<size_t>(k));
  for (int j = 0; j < k; ++j) w[size_t(j)] = std::exp(double(lg[ids[size_t(j)]]) - double(lg[ids[0]]));
  std::discrete_distribution<int> pick(w.begin(), w.end());
  return ids[size_t(pick(rng))];
}

}  // namespace

std::vector<std::string> generate_texts(const Model& m, const Tokenizer& tok, const std::vector<std::string>& prompts,
                                        const GenerationOptions& opt, int case_id) {
  std::vector<std::vector<int32_t>> seqs;
  std::vector<std::mt19937_64> rngs;
  size_t longest = 0;
  for (size_t j = 0; j < prompts.size(); ++j) {
    seqs.push_back(tok.encode_ids(prompts[j], true));
    longest = std::max(longest, seqs.back().size());
    rngs.emplace_back(opt.seed * 1000003ULL + uint64_t(int64_t(case_id)) * 1009ULL + j);
  }
  // Prompts decode in groups of kGenerationGroup (one packed forward per step and group, sequence j continuing its
  // own KV-cache row); the groups run on separate threads. The kernels are batch-invariant, so a text depends only on
  // its prompt, case and index, not on the grouping or the thread count. Every prompt gets the same number of new
  // tokens (max_out_len − the longest prompt).
  const int new_tokens = std::max(0, opt.max_out_len - int(longest));
  const int V = m.config().vocab_size;
  const int n_groups = int((seqs.size() + kGenerationGroup - 1) / kGenerationGroup);
#pragma omp parallel for schedule(dynamic) num_threads(ops::num_threads()) if (n_groups > 1)
  for (int g = 0; g < n_groups; ++g) {
    const size_t j0 = size_t(g) * kGenerationGroup, j1 = std::min(seqs.size(), j0 + kGenerationGroup);
    KVCache cache;
    ForwardOptions fo;
    fo.cache = &cache;
    fo.logits_all = false;
    fo.record_routing = false;
    std::vector<std::vector<int32_t>> step(seqs.begin() + long(j0), seqs.begin() + long(j1));
    for (int t = 0; t < new_tokens; ++t) {
      const ForwardOutput f = m.forward(step, fo);  // logits [group size, V]
      for (size_t j = j0; j < j1; ++j) {
        const float* lg = f.logits.row(long(j - j0)).data();
        const int32_t next = opt.top_k > 0 ? sample_top_k(lg, V, opt.top_k, rngs[j]) : int32_t(argmax(lg, V));
        seqs[j].push_back(next);
        step[j - j0] = {next};
      }
    }
  }
  std::vector<std::string> out;
  for (const auto& s : seqs) {
    std::string text = nfkd(tok.decode(s, /*skip_special_tokens=*/true));
    for (size_t p = text.find("\n\n"); p != std::string::npos; p = text.find("\n\n", p + 1)) text.replace(p, 2, " ");
    out.push_back(std::move(text));
  }
  return out;
}

double perplexity(const Model& m, const Tokenizer& tok, const std::string& text, int max_tokens, const Hooks* hooks) {
  auto ids = tok.encode_ids(text, true);
  if (int(ids.size()) > max_tokens) ids.resize(size_t(max_tokens));
  require_input(ids.size() >= 2, "perplexity: text '" + text + "' is shorter than two tokens");
  const TargetQuery q{{ids[0]}, std::vector<int32_t>(ids.begin() + 1, ids.end()), -1};
  const TargetScore s = score_targets(m, {q}, -1, 4096, hooks)[0];
  // ROME divides Σ log p over |ids| − 1 predicted tokens by |ids| (the first token counted).
  return std::exp(s.nll * double(ids.size() - 1) / double(ids.size()));
}

CaseMetrics case_metrics(const Model& m, const Tokenizer& tok, const EvalRecord& rec, const CaseMetricsOptions& opt) {
  CaseMetrics out = rec.token_accuracy ? token_accuracy_metrics(m, tok, rec, opt.layer)
                                       : counterfact_metrics(m, tok, rec, opt.layer);
  if (!opt.generation || rec.generation_prompts.empty()) return out;
  const auto texts = generate_texts(m, tok, rec.generation_prompts, opt.gen, rec.case_id);
  out.values["ngram_entropy"] = ngram_entropy(texts);
  out.values["text"] = texts;
  if (!opt.snippets) return out;
  const auto& snips = opt.snippets->get(rec.relation_id, rec.target_new_id);
  if (snips.empty()) return out;
  std::string gen_joined, ref_joined, essence;
  for (const auto& t : texts) gen_joined += (gen_joined.empty() ? "" : " ") + t;
  for (const auto& s : snips) {
    ref_joined += (ref_joined.empty() ? "" : " ") + s.text;
    if (s.name == rec.subject) essence += (essence.empty() ? "" : " ") + s.text;
  }
  const double rs = opt.tfidf->similarity(gen_joined, ref_joined);
  if (!std::isnan(rs)) out.values["reference_score"] = rs;
  if (!essence.empty()) out.values["essence_score"] = perplexity(m, tok, essence);
  return out;
}

}  // namespace moedit::eval
