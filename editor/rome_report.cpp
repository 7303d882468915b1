// Reports on a ROME edit: P(new) / P(true) of the rewrite, paraphrase and neighbourhood prompts with the experts
// their subject token routes to, and the edit itself (updates, v* optimization, timings) as JSON.
#include "editor/rome.h"

#include <algorithm>
#include <cmath>

#include "editor/rome_internal.h"
#include "tokenizer/tokenizer.h"

namespace moedit {

using namespace rome_detail;

// ---- report ---------------------------------------------------------------------------------------------------------

std::vector<PromptScore> score_prompts(const Model& m, const Tokenizer& tok, const std::vector<std::string>& prompts,
                                       const std::string& subject, const std::string& target_new,
                                       const std::string& target_true, int layer,
                                       const std::vector<std::pair<int, int>>& edited) {
  const ModelConfig& c = m.config();
  const auto tn = tok.encode_ids(with_space(target_new), false);
  const bool has_true = !trim(target_true).empty();
  const auto tt = has_true ? tok.encode_ids(with_space(target_true), false) : std::vector<int32_t>{};
  std::vector<PromptScore> out(prompts.size());
  struct Item {
    size_t prompt;
    bool is_new;
    int plen;
  };
  std::vector<std::vector<int32_t>> seqs;
  std::vector<Item> items;
  for (size_t i = 0; i < prompts.size(); ++i) {
    out[i].prompt = prompts[i];
    const auto enc = tok.encode(prompts[i], true);
    if (const auto sp = prompts[i].find(subject); !subject.empty() && sp != std::string::npos)
      if (const auto span = Tokenizer::span_for_bytes(enc, sp, sp + subject.size()); span && span->second > span->first)
        out[i].subject_last = span->second - 1;
    for (int v = 0; v < (has_true ? 2 : 1); ++v) {
      auto s = enc.ids;
      const auto& t = v == 0 ? tn : tt;
      s.insert(s.end(), t.begin(), t.end());
      seqs.push_back(std::move(s));
      items.push_back({i, v == 0, int(enc.ids.size())});
    }
  }
  const bool has_shared = c.is_moe(layer) && m.weights().layers[size_t(layer)].ffn.has_shared;
  const size_t chunk = 16;
  for (size_t b = 0; b < seqs.size(); b += chunk) {
    const size_t e = std::min(seqs.size(), b + chunk);
    std::vector<std::vector<int32_t>> part(seqs.begin() + long(b), seqs.begin() + long(e));
    const ForwardOutput f = m.forward(part);
    const auto off = offsets(part);
    for (size_t q = b; q < e; ++q) {
      const Item& it = items[q];
      const auto& t = it.is_new ? tn : tt;
      double nll = 0;
      Eigen::VectorXf ls(f.logits.cols());
      for (size_t j = 0; j < t.size(); ++j) {
        const int row = off[q - b] + it.plen + int(j) - 1;
        grad::log_softmax(f.logits.row(row).data(), int(f.logits.cols()), ls.data());
        nll -= ls[t[j]];
      }
      nll /= double(t.size());
      PromptScore& ps = out[it.prompt];
      if (it.is_new) {
        ps.nll_new = nll;
        ps.p_new = std::exp(-nll);
        if (ps.subject_last >= 0 && c.is_moe(layer)) {
          const auto& r = f.routing[size_t(layer)];
          const int row = off[q - b] + ps.subject_last;
          for (int j = 0; j < c.top_k; ++j) ps.experts.push_back(r.ids(row, j));
          for (const auto& [l, ex] : edited) {
            if (l != layer) continue;
            if (is_shared_expert(ex))
              ps.edited_hits += has_shared ? 1 : 0;
            else
              ps.edited_hits += int(std::count(ps.experts.begin(), ps.experts.end(), ex));
          }
        }
      } else {
        ps.nll_true = nll;
        ps.p_true = std::exp(-nll);
      }
    }
  }
  return out;
}

namespace {
nlohmann::json score_json(const PromptScore& s, bool has_true, bool neighbor) {
  nlohmann::json j = {{"prompt", s.prompt}, {"p_new", s.p_new}};
  if (has_true) {
    j["p_true"] = s.p_true;
    // CounterFact: rewrite/paraphrase success = P(new) > P(true); neighbourhood success = P(true) > P(new).
    j["success"] = neighbor ? s.nll_true < s.nll_new : s.nll_new < s.nll_true;
  }
  if (s.subject_last >= 0) {
    j["subject_last_token"] = s.subject_last;
    j["experts"] = s.experts;
    j["routes_through_edited"] = s.edited_hits > 0;
    j["edited_experts_hit"] = s.edited_hits;
  } else {
    j["routes_through_edited"] = nullptr;  // subject not found in this prompt
  }
  return j;
}
}  // namespace

nlohmann::json EditReport::to_json(bool has_true) const {
  nlohmann::json j;
  j["rewrite"] = score_json(rewrite, has_true, false);
  j["paraphrases"] = nlohmann::json::array();
  for (const auto& p : paraphrases) j["paraphrases"].push_back(score_json(p, has_true, false));
  j["neighborhood"] = nlohmann::json::array();
  for (const auto& p : neighbors) j["neighborhood"].push_back(score_json(p, has_true, true));
  return j;
}

EditReport report_edit(const Model& m, const Tokenizer& tok, const EditRequest& req, const EditResult& r) {
  const auto edited = edited_experts(r);
  std::string rewrite = normalized_prompt(req);
  rewrite.replace(rewrite.find("{}"), 2, req.subject);
  std::vector<std::string> prompts = {rewrite};
  prompts.insert(prompts.end(), req.paraphrases.begin(), req.paraphrases.end());
  prompts.insert(prompts.end(), req.neighbors.begin(), req.neighbors.end());
  const auto sc = score_prompts(m, tok, prompts, req.subject, req.target_new, req.target_true, r.layer, edited);
  EditReport rep;
  rep.rewrite = sc[0];
  rep.paraphrases.assign(sc.begin() + 1, sc.begin() + 1 + long(req.paraphrases.size()));
  rep.neighbors.assign(sc.begin() + 1 + long(req.paraphrases.size()), sc.end());
  return rep;
}

nlohmann::json edit_json(const EditResult& r) {
  nlohmann::json j;
  j["layer"] = r.layer;
  j["target"] = target_name(r.target);
  j["routed_experts"] = r.routed;
  j["routed_weights"] = r.routed_weights;
  j["updates"] = nlohmann::json::array();
  for (const auto& u : r.updates) {
    j["updates"].push_back({{"layer", u.layer},
                            {"expert", expert_json(u.expert, r.n_shared_experts)},
                            {"weight", u.weight},
                            {"residual_norm", u.r.norm()},
                            {"update_norm", double(u.r.norm()) * double(u.u.norm())},
                            {"key_norm", u.k.norm()},
                            {"stats_tokens", u.stats_count}});
  }
  j["vstar"] = {{"loss", r.vstar.loss},
                {"nll", r.vstar.nll},
                {"kl", r.vstar.kl},
                {"weight_decay", r.vstar.wd},
                {"p_target", r.vstar.p_target},
                {"updates", r.vstar.updates},
                {"delta_norm", r.vstar.delta.norm()},
                {"target_init_norm", r.vstar.target_init.norm()},
                {"tokens_per_step", r.vstar.tokens_per_step}};
  j["template_route_share"] = r.template_route_share;
  j["template_hits"] = r.template_hits;
  j["seconds"] = r.seconds;
  j["vstar_seconds"] = r.vstar_seconds;
  return j;
}

}  // namespace moedit
