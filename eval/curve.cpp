#include "eval/curve.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "io/errors.h"

#include "tracing/svg.h"

namespace moedit::eval {
using json = nlohmann::json;

namespace {

struct Panel {
  std::string title;
  std::function<double(const json&)> value;  // NaN: the point has no such value
};

double summary_mean(const json& p, const char* key) {
  return p.contains(key) ? p[key][0].get<double>() : std::nan("");
}

double wiki_drift(const json& p) {
  if (!p.contains("routing_drift")) return p.value("edits", 0) == 0 ? 0.0 : std::nan("");
  const json& d = p["routing_drift"];
  return d.contains("wikitext") ? 100 * d["wikitext"]["changed_share"].get<double>() : std::nan("");
}

std::string num(double x) {
  char b[32];
  std::snprintf(b, sizeof b, "%.4g", x);
  return b;
}

}  // namespace

std::string curve_svg(const std::vector<std::pair<std::string, json>>& runs) {
  namespace svg = trace::svg;
  const std::vector<Panel> panels = {
      {"ES (efficacy, %)", [](const json& p) { return summary_mean(p, "post_rewrite_success"); }},
      {"PS (paraphrase, %)", [](const json& p) { return summary_mean(p, "post_paraphrase_success"); }},
      {"NS (neighbourhood, %)", [](const json& p) { return summary_mean(p, "post_neighborhood_success"); }},
      {"routing drift, WikiText-2 (% cells)", wiki_drift},
      {"perplexity, WikiText-2",
       [](const json& p) { return p.contains("perplexity_wikitext") ? p["perplexity_wikitext"].get<double>()
                                                                    : std::nan(""); }}};
  const char* colors[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"};
  const double pw = 300, ph = 200, ml = 60, mt = 40, gap = 50;
  const double width = ml + panels.size() * (pw + gap), height = mt + ph + 70 + 18 * double(runs.size());
  double max_edits = 1;
  for (const auto& [label, curve] : runs)
    for (const auto& p : curve) max_edits = std::max(max_edits, p.value("edits", 0.0));
  std::ostringstream o;
  o << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << width << "\" height=\"" << height
    << "\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  for (size_t k = 0; k < panels.size(); ++k) {
    const double x0 = ml + double(k) * (pw + gap), y0 = mt;
    double lo = std::numeric_limits<double>::infinity(), hi = -lo;
    for (const auto& [label, curve] : runs)
      for (const auto& p : curve)
        if (const double v = panels[k].value(p); std::isfinite(v)) lo = std::min(lo, v), hi = std::max(hi, v);
    if (!std::isfinite(lo)) lo = 0, hi = 1;
    if (k < 4) lo = 0, hi = std::max(hi, k < 3 ? 100.0 : 1.0);  // rates from 0
    if (hi - lo < 1e-9) hi = lo + 1;
    auto X = [&](double e) { return x0 + pw * e / max_edits; };
    auto Y = [&](double v) { return y0 + ph - ph * (v - lo) / (hi - lo); };
    o << "<text x=\"" << x0 + pw / 2 << "\" y=\"" << y0 - 12 << "\" text-anchor=\"middle\" font-weight=\"bold\">"
      << svg::escape(panels[k].title) << "</text>\n";
    o << "<rect x=\"" << x0 << "\" y=\"" << y0 << "\" width=\"" << pw << "\" height=\"" << ph
      << "\" fill=\"none\" stroke=\"#444\"/>\n";
    for (int t = 0; t <= 4; ++t) {
      const double v = lo + (hi - lo) * t / 4, e = max_edits * t / 4;
      o << "<text x=\"" << x0 - 5 << "\" y=\"" << Y(v) + 4 << "\" text-anchor=\"end\">" << num(v) << "</text>\n";
      o << "<text x=\"" << X(e) << "\" y=\"" << y0 + ph + 16 << "\" text-anchor=\"middle\">" << num(e) << "</text>\n";
    }
    o << "<text x=\"" << x0 + pw / 2 << "\" y=\"" << y0 + ph + 34 << "\" text-anchor=\"middle\">edits</text>\n";
    for (size_t r = 0; r < runs.size(); ++r) {
      std::string pts;
      for (const auto& p : runs[r].second)
        if (const double v = panels[k].value(p); std::isfinite(v))
          pts += (pts.empty() ? "" : " ") + num(X(p.value("edits", 0.0))) + "," + num(Y(v));
      o << "<polyline fill=\"none\" stroke=\"" << colors[r % 6] << "\" stroke-width=\"2\" points=\"" << pts
        << "\"/>\n";
    }
  }
  for (size_t r = 0; r < runs.size(); ++r) {
    const double y = mt + ph + 56 + 18 * double(r);
    o << "<line x1=\"" << ml << "\" x2=\"" << ml + 24 << "\" y1=\"" << y - 4 << "\" y2=\"" << y - 4 << "\" stroke=\""
      << colors[r % 6] << "\" stroke-width=\"3\"/><text x=\"" << ml + 30 << "\" y=\"" << y << "\">"
      << svg::escape(runs[r].first.empty() ? "this run" : runs[r].first) << "</text>\n";
  }
  o << "</svg>\n";
  return o.str();
}

std::vector<std::pair<std::string, json>> read_curves(const std::vector<std::string>& dirs,
                                                      const std::vector<std::string>& labels) {
  require_input(labels.empty() || labels.size() == dirs.size(),
                "--labels: " + std::to_string(labels.size()) + " labels for " + std::to_string(dirs.size()) + " runs");
  std::vector<std::pair<std::string, json>> runs;
  for (size_t i = 0; i < dirs.size(); ++i) {
    const std::string path = dirs[i] + "/summary.json";
    std::ifstream in(path);
    require_input(bool(in), path + ": cannot open (not a finished eval run?)");
    const json s = json::parse(in, nullptr, false);
    require_input(!s.is_discarded(), path + ": not valid JSON");
    require_input(s.contains("sequential") && s["sequential"].is_array(),
                  path + ": no \"sequential\" curve (the run was not --sequential)");
    const std::string name = std::filesystem::path(dirs[i]).lexically_normal().filename().string();
    runs.emplace_back(labels.empty() ? name : labels[i], s["sequential"]);
  }
  return runs;
}

}  // namespace moedit::eval
