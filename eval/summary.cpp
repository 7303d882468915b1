#include "eval/summary.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>

#include "eval/text_metrics.h"
#include "tracing/svg.h"

namespace moedit::eval {
using json = nlohmann::json;

namespace {

double mean_of(const json& list, double (*f)(const json&)) {
  double s = 0;
  for (const auto& x : list) s += f(x);
  return s / double(list.size());
}
double nll(const json& x, const char* key) { return x.at(key).get<double>(); }

double round2(double x) { return std::round(x * 100.0) / 100.0; }

// The metrics of summary.md and the SVG: (summary key suffix, short name).
const std::vector<std::pair<std::string, std::string>>& table_rows() {
  static const std::vector<std::pair<std::string, std::string>> rows = {
      {"rewrite_success", "ES (efficacy)"},       {"paraphrase_success", "PS (paraphrase)"},
      {"neighborhood_success", "NS (neighborhood)"}, {"rewrite_diff", "EM (efficacy magnitude)"},
      {"paraphrase_diff", "PM (paraphrase magnitude)"}, {"neighborhood_diff", "NM (neighborhood magnitude)"},
      {"rewrite_acc", "rewrite_acc"},             {"paraphrase_acc", "paraphrase_acc"},
      {"neighborhood_acc", "neighborhood_acc"},   {"ngram_entropy", "GE (n-gram entropy)"},
      {"reference_score", "RS (reference score)"}, {"essence_score", "essence (perplexity)"},
      {"score", "Score = hmean(ES, PS, NS)"},
      {"drift_neighborhood", "routing drift, neighbourhood (% cells)"},
      {"router_kl_neighborhood", "router KL, neighbourhood"},
      {"drift_wikitext", "routing drift, WikiText-2 (% cells)"},
      {"router_kl_wikitext", "router KL, WikiText-2"}};
  return rows;
}

}  // namespace

std::map<std::string, double> case_values(const json& c) {
  std::map<std::string, double> v;
  if (c.contains("time")) v["time"] = c["time"].get<double>();
  // Routing drift of the case's edit (or of its batch): "post_drift_<prompts>" = changed share, "post_router_kl_…".
  if (c.contains("routing_drift"))
    for (const auto& [prompts, d] : c["routing_drift"].items()) {
      v["post_drift_" + prompts] = d.at("changed_share").get<double>();
      v["post_router_kl_" + prompts] = d.at("mean_kl").get<double>();
    }
  for (const char* prefix : {"pre", "post"}) {
    if (!c.contains(prefix)) continue;
    const json& d = c[prefix];
    const std::string p = std::string(prefix) + "_";
    for (const char* key : {"rewrite", "paraphrase"}) {
      const std::string k = std::string(key) + "_prompts_probs";
      if (!d.contains(k) || d[k].empty()) continue;  // numpy's mean of nothing is NaN: the case is left out
      v[p + key + "_success"] =
          mean_of(d[k], [](const json& x) { return nll(x, "target_true") > nll(x, "target_new") ? 1.0 : 0.0; });
      v[p + key + "_diff"] = mean_of(
          d[k], [](const json& x) { return std::exp(-nll(x, "target_new")) - std::exp(-nll(x, "target_true")); });
    }
    if (d.contains("neighborhood_prompts_probs") && !d["neighborhood_prompts_probs"].empty()) {
      const json& n = d["neighborhood_prompts_probs"];
      v[p + "neighborhood_success"] =
          mean_of(n, [](const json& x) { return nll(x, "target_true") < nll(x, "target_new") ? 1.0 : 0.0; });
      v[p + "neighborhood_diff"] =
          mean_of(n, [](const json& x) { return std::exp(-nll(x, "target_true")) - std::exp(-nll(x, "target_new")); });
    }
    for (const char* key : {"rewrite", "paraphrase", "neighborhood"}) {
      const std::string k = std::string(key) + "_prompts_correct";
      if (d.contains(k) && !d[k].empty())
        v[p + key + "_acc"] = mean_of(d[k], [](const json& x) { return x.get<bool>() ? 1.0 : 0.0; });
    }
    for (const char* key : {"ngram_entropy", "reference_score", "essence_score"})
      if (d.contains(key) && d[key].is_number()) v[p + key] = d[key].get<double>();
  }
  return v;
}

json summarize(const std::vector<json>& cases) {
  std::map<std::string, std::vector<double>> all;
  for (const auto& c : cases)
    for (const auto& [k, x] : case_values(c)) all[k].push_back(x);
  json s = json::object();
  for (const auto& [k, xs] : all) {
    double mean = 0, var = 0;
    for (const double x : xs) mean += x;
    mean /= double(xs.size());
    for (const double x : xs) var += (x - mean) * (x - mean);
    const double sd = std::sqrt(var / double(xs.size()));
    const bool raw = k.find("essence_score") != std::string::npos || k.find("router_kl") != std::string::npos ||
                     k == "time";
    s[k] = raw ? json::array({mean, sd}) : json::array({round2(mean * 100), round2(sd * 100)});
  }
  for (const char* prefix : {"pre", "post"}) {
    const std::string p = prefix;
    for (const auto& keys : {std::vector<std::string>{"rewrite_success", "paraphrase_success", "neighborhood_success"},
                             std::vector<std::string>{"rewrite_acc", "paraphrase_acc", "neighborhood_acc"}}) {
      std::vector<double> means;
      for (const auto& k : keys)
        if (s.contains(p + "_" + k)) means.push_back(s[p + "_" + k][0].get<double>());
      if (means.size() == keys.size()) {
        s[p + "_score"] = json::array({harmonic_mean(means), nullptr});
        break;
      }
    }
  }
  s["num_cases"] = cases.size();

  // MoE extras.
  std::map<std::string, int> edited;
  double overlap = 0;
  int overlap_n = 0, through = 0, found = 0;
  struct Split {
    double sum = 0;
    int n = 0;
  };
  std::map<std::string, Split> split;  // "{pre,post}_{routed,not_routed}"
  for (const auto& c : cases) {
    if (!c.contains("moe")) continue;
    const json& m = c["moe"];
    for (const auto& e : m["edited_experts"]) ++edited[e.get<std::string>()];
    if (m["routing_overlap"].is_number()) {
      overlap += m["routing_overlap"].get<double>();
      ++overlap_n;
    }
    const json& routes = m["paraphrase_routes_through_edited"];
    for (size_t j = 0; j < routes.size(); ++j) {
      if (routes[j].is_null()) continue;
      ++found;
      const bool r = routes[j].get<bool>();
      through += r;
      for (const char* prefix : {"pre", "post"}) {
        Split& sp = split[std::string(prefix) + (r ? "_routed" : "_not_routed")];
        sp.sum += m["paraphrase_success"][prefix][j].get<double>();
        ++sp.n;
      }
    }
  }
  json moe = {{"edited_experts", edited},
              {"paraphrases_with_subject", found},
              {"paraphrase_routes_through_edited", found ? json(round2(100.0 * through / found)) : json(nullptr)},
              {"paraphrase_routing_overlap", overlap_n ? json(round2(100.0 * overlap / overlap_n)) : json(nullptr)}};
  for (const auto& [k, sp] : split)
    moe["paraphrase_success_" + k] = {{"n", sp.n}, {"mean", round2(100.0 * sp.sum / sp.n)}};
  s["moe"] = std::move(moe);
  return s;
}

std::string summary_markdown(const json& summary, const json& settings) {
  std::ostringstream o;
  o << "# moedit eval\n\n";
  o << "| setting | value |\n|---|---|\n";
  for (const auto& [k, v] : settings.items()) o << "| " << k << " | `" << v.dump() << "` |\n";
  o << "\n" << summary.value("num_cases", 0) << " cases. Values ×100 (mean ± std over cases), as ROME's summarize.py;"
    << " essence is a raw perplexity.\n\n";
  o << "| metric | pre (unedited) | post (edited) |\n|---|---|---|\n";
  auto cell = [&](const std::string& key) -> std::string {
    if (!summary.contains(key)) return "–";
    const json& v = summary[key];
    char buf[64];
    if (v[1].is_null())
      std::snprintf(buf, sizeof buf, "%.2f", v[0].get<double>());
    else
      std::snprintf(buf, sizeof buf, "%.2f ± %.2f", v[0].get<double>(), v[1].get<double>());
    return buf;
  };
  for (const auto& [key, name] : table_rows())
    if (summary.contains("pre_" + key) || summary.contains("post_" + key))
      o << "| " << name << " | " << cell("pre_" + key) << " | " << cell("post_" + key) << " |\n";
  if (summary.contains("time")) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.3f ± %.3f", summary["time"][0].get<double>(), summary["time"][1].get<double>());
    o << "| edit time (s) | | " << buf << " |\n";
  }
  const json& m = summary["moe"];
  o << "\n## MoE\n\n";
  o << "- edited experts (layer:expert → cases): ";
  for (const auto& [k, v] : m["edited_experts"].items()) o << k << " → " << v.get<int>() << "; ";
  o << "\n- paraphrases whose subject token routes through an edited expert: " << m["paraphrase_routes_through_edited"].dump()
    << "% of " << m["paraphrases_with_subject"].dump() << " (mean share of edited experts in their top-k: "
    << m["paraphrase_routing_overlap"].dump() << "%)\n";
  for (const char* r : {"routed", "not_routed"}) {
    const std::string k = std::string("paraphrase_success_post_") + r;
    if (m.contains(k))
      o << "- paraphrase success, " << (std::string(r) == "routed" ? "routes through" : "avoids")
        << " the edited expert(s): post " << m[k]["mean"].dump() << " (pre "
        << m["paraphrase_success_pre_" + std::string(r)]["mean"].dump() << ") over " << m[k]["n"].dump()
        << " paraphrases\n";
  }
  return o.str();
}

std::string distributions_svg(const std::vector<json>& cases) {
  namespace svg = trace::svg;
  std::map<std::string, std::vector<double>> all;
  for (const auto& c : cases)
    for (const auto& [k, x] : case_values(c)) all[k].push_back(x);
  svg::BarChart chart;
  chart.title = "Per-case metric distributions (" + std::to_string(cases.size()) + " cases): pre vs post";
  chart.ylabel = "share of cases";
  const int bins = 10;
  for (const auto& [key, name] : table_rows()) {
    const auto pre = all.find("pre_" + key), post = all.find("post_" + key);
    if (post == all.end() || key == "essence_score") continue;
    double lo = key.ends_with("_diff") ? -1 : 0, hi = 1;
    if (key == "ngram_entropy" || key.starts_with("router_kl")) {
      hi = *std::max_element(post->second.begin(), post->second.end());
      if (pre != all.end()) hi = std::max(hi, *std::max_element(pre->second.begin(), pre->second.end()));
      hi = std::max(hi, 1e-9);
    }
    auto histogram = [&](const std::vector<double>& xs) {
      std::vector<double> h(bins, 0.0);
      for (const double x : xs) {
        const int b = std::clamp(int((x - lo) / (hi - lo) * bins), 0, bins - 1);
        h[size_t(b)] += 1.0 / double(xs.size());
      }
      return h;
    };
    const auto hp = pre != all.end() ? histogram(pre->second) : std::vector<double>();
    const auto hq = histogram(post->second);
    svg::BarPanel panel;
    panel.title = name;
    for (int b = 0; b < bins; ++b) {
      char label[32];
      std::snprintf(label, sizeof label, "%.2g", lo + (hi - lo) * b / bins);
      svg::BarGroup g;
      g.label = label;
      if (!hp.empty()) g.bars.push_back({"pre", hp[size_t(b)], svg::color(svg::Palette::Blues, 0.5), "pre"});
      g.bars.push_back({"post", hq[size_t(b)], svg::color(svg::Palette::Oranges, 0.7), "post"});
      panel.groups.push_back(std::move(g));
    }
    chart.panels.push_back(std::move(panel));
  }
  return svg::bar_chart(chart);
}

}  // namespace moedit::eval
