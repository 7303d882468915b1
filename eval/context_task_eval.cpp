#include "eval/context_task_eval.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <numeric>
#include <set>

#include "eval/counterfact_eval.h"
#include "io/errors.h"
#include "model/generate.h"

namespace moedit::eval {
using json = nlohmann::json;

namespace {
std::string example_name(const std::string& source, size_t i, int case_id) {
  return source + ": example " + std::to_string(i) + " (case_id " + std::to_string(case_id) + ")";
}
}  // namespace

std::vector<int32_t> TaskItem::full() const {
  std::vector<int32_t> s = prompt;
  s.insert(s.end(), answer.begin(), answer.end());
  return s;
}

std::vector<TaskItem> tokenize_task(const std::vector<ContextExample>& examples, const Tokenizer& tok,
                                    const std::string& source) {
  std::vector<TaskItem> items;
  items.reserve(examples.size());
  for (size_t i = 0; i < examples.size(); ++i) {
    const ContextExample& e = examples[i];
    const std::string where = example_name(source, i, e.case_id);
    const std::string text = e.prompt();
    const Tokenizer::Encoding enc = tok.encode(text);
    TaskItem it;
    it.case_id = e.case_id;
    it.prompt = enc.ids;
    it.answer = tok.encode_ids(" " + e.answer, /*add_special_tokens=*/false);
    require_input(!it.answer.empty(), where + ": field 'answer' encodes to no tokens");
    const auto ctx = Tokenizer::span_for_bytes(enc, 0, e.context.size());
    require_input(ctx.has_value(), where + ": field 'context' is covered by no token of the prompt");
    it.ctx_begin = ctx->first;
    it.ctx_end = ctx->second;
    if (const size_t p = e.context.rfind(e.answer); p != std::string::npos) {
      if (const auto a = Tokenizer::span_for_bytes(enc, p, p + e.answer.size())) {
        it.ans_begin = a->first;
        it.ans_end = a->second;
      }
    }
    items.push_back(std::move(it));
  }
  return items;
}

void require_answer_in_context(const std::vector<TaskItem>& items, const std::string& source) {
  for (size_t i = 0; i < items.size(); ++i)
    require_input(items[i].ans_begin >= 0, example_name(source, i, items[i].case_id) +
                                               ": field 'answer' does not occur in field 'context' (the answer "
                                               "attention gain needs the answer's tokens in the context)");
}

double TaskScore::em() const {
  if (exact.empty()) return 0;
  return 100.0 * double(std::count(exact.begin(), exact.end(), uint8_t(1))) / double(exact.size());
}

double TaskScore::mean_first_prob() const {
  if (first_prob.empty()) return 0;
  return std::accumulate(first_prob.begin(), first_prob.end(), 0.0) / double(first_prob.size());
}

json TaskScore::summary() const {
  return {{"examples", exact.size()},
          {"exact_match", std::count(exact.begin(), exact.end(), uint8_t(1))},
          {"em", em()},
          {"p_first", mean_first_prob()}};
}

std::string TaskScore::line() const {
  char b[160];
  std::snprintf(b, sizeof b, "EM %.2f%% (%lld/%zu), mean p(first answer token) %.4f", em(),
                static_cast<long long>(std::count(exact.begin(), exact.end(), uint8_t(1))), exact.size(),
                mean_first_prob());
  return b;
}

json TaskScore::examples_json(const std::vector<TaskItem>& items, const Tokenizer& tok) const {
  json out = json::array();
  for (size_t i = 0; i < exact.size(); ++i)
    out.push_back({{"case_id", items[i].case_id}, {"exact", bool(exact[i])}, {"p_first", first_prob[i]},
                   {"prediction", tok.decode(predicted[i])}});
  return out;
}

TaskScore score_task(const Model& m, const std::vector<TaskItem>& items, const Hooks* hooks, int eos_token_id,
                     int batch_tokens) {
  TaskScore s;
  std::vector<TargetQuery> first(items.size());
  for (size_t i = 0; i < items.size(); ++i) first[i] = {items[i].prompt, {items[i].answer[0]}};
  for (const TargetScore& t : score_targets(m, first, -1, batch_tokens, hooks))
    s.first_prob.push_back(std::exp(-t.nll));
  GenerateOptions g;
  g.eos_token_id = eos_token_id;
  g.hooks = hooks;
  for (const TaskItem& it : items) {
    g.max_new_tokens = int(it.answer.size());
    s.predicted.push_back(generate(m, it.prompt, g));
    s.exact.push_back(s.predicted.back() == it.answer);
  }
  return s;
}

ActivationProfile count_task_experts(const Model& m, const std::vector<TaskItem>& items, const RoutingOptions& ro) {
  std::vector<std::vector<int32_t>> seqs;
  seqs.reserve(items.size());
  for (const TaskItem& it : items) seqs.push_back(it.full());
  RoutingOptions o = ro;
  o.probabilities = false;  // counts need the top-k sets only
  return activation_profile(m, seqs, o);
}

std::vector<std::vector<int>> most_activated(const ActivationProfile& p, int K) {
  require_input(K >= 1 && K <= p.n_experts, "--top " + std::to_string(K) + ": expected 1.." +
                                                std::to_string(p.n_experts) + " (the model's experts per layer)");
  std::vector<std::vector<int>> out;
  for (size_t i = 0; i < p.layers.size(); ++i) {
    std::vector<int> e(size_t(p.n_experts));
    std::iota(e.begin(), e.end(), 0);
    std::stable_sort(e.begin(), e.end(), [&](int a, int b) { return p.counts(long(i), a) > p.counts(long(i), b); });
    e.resize(size_t(K));
    out.push_back(std::move(e));
  }
  return out;
}

namespace {
json counts_json(const ActivationProfile& p) {
  json j = json::object();
  for (size_t i = 0; i < p.layers.size(); ++i) {
    std::vector<int64_t> c;
    for (int e = 0; e < p.n_experts; ++e) c.push_back(int64_t(std::llround(p.counts(long(i), e))));
    j[std::to_string(p.layers[i])] = c;
  }
  return j;
}
json sets_json(const ActivationProfile& p, const std::vector<std::vector<int>>& sets) {
  json j = json::object();
  for (size_t i = 0; i < p.layers.size(); ++i) j[std::to_string(p.layers[i])] = sets[i];
  return j;
}
}  // namespace

json context_faithful_json(const ActivationProfile& tuned, const ActivationProfile* base, int K) {
  const auto ce = most_activated(tuned, K);
  json j = {{"format", "moedit-context-faithful-experts/1"}, {"tokens", tuned.tokens}, {"top", K},
            {"top_k", tuned.top_k}, {"layers", tuned.layers}, {"ce", sets_json(tuned, ce)},
            {"counts", counts_json(tuned)}};
  if (!base) return j;
  require_input(base->layers == tuned.layers && base->n_experts == tuned.n_experts,
                "--base: the base model's MoE layers or expert count differ from the model's");
  const auto oe = most_activated(*base, K);
  j["oe"] = sets_json(*base, oe);
  j["base_tokens"] = base->tokens;
  j["base_counts"] = counts_json(*base);
  json shared = json::object();
  for (size_t i = 0; i < tuned.layers.size(); ++i) {
    const std::set<int> a(ce[i].begin(), ce[i].end());
    shared[std::to_string(tuned.layers[i])] =
        std::count_if(oe[i].begin(), oe[i].end(), [&](int e) { return a.count(e) != 0; });
  }
  j["shared"] = shared;
  return j;
}

std::string context_faithful_table(const json& ce) {
  std::string out;
  char b[64];
  const bool has_base = ce.contains("oe");
  std::snprintf(b, sizeof b, "top %d experts per MoE layer", ce["top"].get<int>());
  out += std::string(b) + (has_base ? " (CE: this model, OE: the base model; count = tokens selecting it)\n"
                                    : " (CE; count = tokens selecting it)\n");
  auto list = [&](const char* set, const char* counts, const std::string& l) {
    std::string s;
    for (int e : ce[set][l]) {
      std::snprintf(b, sizeof b, " %d (%lld)", e, static_cast<long long>(ce[counts][l][size_t(e)].get<int64_t>()));
      s += b;
    }
    return s;
  };
  for (int l : ce["layers"]) {
    const std::string k = std::to_string(l);
    out += "layer " + k + "  CE:" + list("ce", "counts", k);
    if (has_base)
      out += "  | OE:" + list("oe", "base_counts", k) + "  | shared " + std::to_string(ce["shared"][k].get<int>());
    out += "\n";
  }
  return out;
}

std::vector<ExpertRef> read_expert_set(const std::string& path, const std::string& which) {
  std::ifstream in(path);
  require_input(bool(in), path + ": cannot open the expert file");
  const json j = json::parse(in, nullptr, /*allow_exceptions=*/false);
  require_input(!j.is_discarded(), path + ": not valid JSON");
  require_input(j.is_object(), path + ": expected a JSON object (moedit experts --context-faithful --out)");
  require_input(j.contains(which), path + ": no field '" + which + "'" +
                                       (which == "oe" ? " (written only with --base BASE_MODEL)" : ""));
  const json& s = j[which];
  require_input(s.is_object(), path + ": field '" + which + "' is not an object {layer: [experts]}");
  std::vector<ExpertRef> out;
  for (auto kv = s.begin(); kv != s.end(); ++kv) {
    const std::string key = kv.key();
    const json& list = kv.value();
    const std::string f = path + ": field '" + which + "." + key + "'";
    size_t used = 0;
    int layer = -1;
    try {
      layer = std::stoi(key, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    require_input(used == key.size() && layer >= 0, f + ": the key is not a layer number");
    require_input(list.is_array(), f + " is not a list of experts");
    for (const json& e : list) {
      require_input(e.is_number_integer() && e.get<int>() >= 0, f + " holds something other than an expert id");
      out.push_back({layer, e.get<int>()});
    }
  }
  return out;
}

}  // namespace moedit::eval
