// Token triggers of chosen experts (see tracing/expert_triggers.h).
#include "tracing/expert_triggers.h"

#include <algorithm>
#include <map>

#include "io/errors.h"
#include "tracing/svg.h"

namespace moedit {

std::vector<ExpertTriggers> expert_triggers(const Model& m, const std::vector<std::vector<int32_t>>& seqs,
                                            const std::vector<ExpertRef>& experts, const TriggerOptions& opt) {
  const ModelConfig& c = m.config();
  for (const auto& x : experts) {
    require_input(x.layer >= 0 && x.layer < c.n_layers && c.is_moe(x.layer),
                  "--triggers: layer " + std::to_string(x.layer) + " is not a MoE layer of this model");
    require_input(x.expert >= 0 && x.expert < c.n_experts,
                  "--triggers: expert " + std::to_string(x.expert) + " out of range (0.." +
                      std::to_string(c.n_experts - 1) + ")");
  }
  RoutingOptions ro = opt.routing;
  ro.probabilities = false;
  const std::vector<SequenceRouting> routing = capture_routing(m, seqs, ro);
  std::map<int32_t, int64_t> occ;
  int64_t tokens = 0;
  for (const auto& s : seqs) {
    tokens += int64_t(s.size());
    for (int32_t id : s) ++occ[id];
  }
  std::vector<ExpertTriggers> out;
  for (const auto& x : experts) {
    ExpertTriggers t;
    t.layer = x.layer;
    t.expert = x.expert;
    t.tokens = tokens;
    t.tokens_at.assign(size_t(opt.max_pos), 0);
    t.active_at.assign(size_t(opt.max_pos), 0);
    t.tokens_rel.assign(size_t(opt.rel_bins), 0);
    t.active_rel.assign(size_t(opt.rel_bins), 0);
    std::map<int32_t, int64_t> count;
    for (const auto& r : routing) {
      const IdMat& ids = r.experts[size_t(x.layer)];
      const int T = r.n_tokens();
      for (int p = 0; p < T; ++p) {
        bool on = false;
        for (Eigen::Index j = 0; j < ids.cols(); ++j) on |= ids(p, j) == x.expert;
        const size_t ab = size_t(std::min(p, opt.max_pos - 1)), rb = size_t(int64_t(p) * opt.rel_bins / T);
        ++t.tokens_at[ab];
        ++t.tokens_rel[rb];
        if (!on) continue;
        ++t.active;
        ++t.active_at[ab];
        ++t.active_rel[rb];
        ++count[r.ids[size_t(p)]];
      }
    }
    for (const auto& [id, n] : count) {
      const int64_t o = occ[id];
      if (o < opt.min_occurrences) continue;
      t.top.push_back({id, n, o, (double(n) / double(t.active)) / (double(o) / double(tokens))});
    }
    std::sort(t.top.begin(), t.top.end(), [](const TriggerToken& a, const TriggerToken& b) {
      return a.count != b.count ? a.count > b.count : a.lift != b.lift ? a.lift > b.lift : a.id < b.id;
    });
    if (int(t.top.size()) > opt.top) t.top.resize(size_t(opt.top));
    out.push_back(std::move(t));
  }
  return out;
}

std::vector<ExpertExamples> expert_examples(const Model& m, const std::vector<std::vector<int32_t>>& seqs, int n,
                                            int n_keywords, const RoutingOptions& routing) {
  const ModelConfig& c = m.config();
  RoutingOptions ro = routing;
  ro.probabilities = false;
  const std::vector<SequenceRouting> r = capture_routing(m, seqs, ro);
  std::vector<ExpertExamples> out;
  for (int l : moe_layers(c))
    for (int e = 0; e < c.n_experts; ++e) {
      ExpertExamples x;
      x.layer = l;
      x.expert = e;
      std::map<int32_t, int64_t> count;
      for (size_t s = 0; s < r.size(); ++s) {
        const IdMat& ids = r[s].experts[size_t(l)];
        const MatR& w = r[s].weights[size_t(l)];
        for (int p = 0; p < r[s].n_tokens(); ++p)
          for (Eigen::Index j = 0; j < ids.cols(); ++j)
            if (ids(p, j) == e) {
              ++x.active;
              ++count[r[s].ids[size_t(p)]];
              x.top.push_back({int(s), p, w(p, j)});
            }
      }
      // Largest weight first; the sort is stable, so ties keep corpus order.
      std::stable_sort(x.top.begin(), x.top.end(),
                       [](const ExpertExample& a, const ExpertExample& b) { return a.weight > b.weight; });
      if (int(x.top.size()) > n) x.top.resize(size_t(n));
      x.keywords.assign(count.begin(), count.end());
      std::stable_sort(x.keywords.begin(), x.keywords.end(),
                       [](const auto& a, const auto& b) { return a.second > b.second; });
      if (int(x.keywords.size()) > n_keywords) x.keywords.resize(size_t(n_keywords));
      out.push_back(std::move(x));
    }
  return out;
}

nlohmann::json triggers_json(const std::vector<ExpertTriggers>& ts, const std::vector<std::string>& pieces) {
  nlohmann::json j = nlohmann::json::array();
  for (const auto& t : ts) {
    nlohmann::json e = {{"layer", t.layer}, {"expert", t.expert}, {"active", t.active}, {"tokens", t.tokens}};
    for (const auto& k : t.top) {
      nlohmann::json tk = {{"id", k.id}, {"count", k.count}, {"occurrences", k.occurrences}, {"lift", k.lift}};
      if (size_t(k.id) < pieces.size()) tk["text"] = pieces[size_t(k.id)];
      e["triggers"].push_back(std::move(tk));
    }
    for (size_t p = 0; p < t.tokens_at.size(); ++p) e["rate_by_position"].push_back(t.rate_at(p));
    for (size_t b = 0; b < t.tokens_rel.size(); ++b) e["rate_by_relative_position"].push_back(t.rate_rel(b));
    e["tokens_by_position"] = t.tokens_at;
    j.push_back(std::move(e));
  }
  return j;
}

std::string triggers_svg(const std::vector<ExpertTriggers>& ts, const std::string& title) {
  trace::svg::Heatmap h;
  h.title = title;
  h.xlabel = "token position (last column: this position and later)";
  h.colorbar_title = "activation rate";
  h.palette = trace::svg::Palette::Blues;
  double vmax = 1e-9;
  for (const auto& t : ts) {
    h.row_labels.push_back("L" + std::to_string(t.layer) + " E" + std::to_string(t.expert));
    std::vector<double> row;
    for (size_t p = 0; p < t.tokens_at.size(); ++p) {
      row.push_back(t.tokens_at[p] ? t.rate_at(p) : std::nan(""));
      if (t.tokens_at[p]) vmax = std::max(vmax, t.rate_at(p));
    }
    h.values.push_back(std::move(row));
  }
  if (!ts.empty())
    for (size_t p = 0; p < ts[0].tokens_at.size(); ++p) h.col_labels.push_back(std::to_string(p));
  h.vmax = vmax;
  return trace::svg::heatmap(h);
}

}  // namespace moedit
