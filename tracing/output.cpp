// Trace outputs: per-kind JSON, SVG heatmaps / expert bars, and the self-contained HTML report.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "io/errors.h"
#include "io/files.h"
#include "tracing/report.h"
#include "tracing/svg.h"
#include "tracing/trace.h"

namespace moedit::trace {

namespace {

nlohmann::json num_or_null(double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); }

std::string kind_title(Kind k) {
  switch (k) {
    case Kind::Resid: return "Impact of restoring state after corrupted input";
    case Kind::Attn: return "Impact of restoring Attn after corrupted input";
    case Kind::Moe: return "Impact of restoring MoE after corrupted input";
    case Kind::Shared: return "Impact of restoring the shared expert after corrupted input";
    case Kind::Expert: return "Dominant routed expert (restored alone) after corrupted input";
  }
  return {};
}

svg::Palette kind_palette(Kind k) {
  switch (k) {
    case Kind::Resid: return svg::Palette::Purples;
    case Kind::Attn: return svg::Palette::Reds;
    case Kind::Moe: return svg::Palette::Greens;
    case Kind::Shared: return svg::Palette::Oranges;
    case Kind::Expert: return svg::Palette::Blues;
  }
  return svg::Palette::Purples;
}

std::string fmt(double v, int prec = 4) {
  if (!std::isfinite(v)) return "n/a";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", prec, v);
  return buf;
}

std::string row_label(const TraceReport& r, int t) {
  std::string s = r.tokens[size_t(t)];
  if (t >= r.subject_begin && t < r.subject_end) s += "*";
  return s;
}

}  // namespace

namespace {
// The fields every trace JSON of one fact carries.
nlohmann::json fact_json(const TraceReport& r) {
  nlohmann::json j;
  j["schema"] = "moedit.trace/1";
  j["model"] = r.model;
  if (!r.id.empty()) j["id"] = r.id;
  j["prompt"] = r.prompt;
  j["subject"] = r.subject;
  j["input_ids"] = r.ids;
  j["input_tokens"] = r.tokens;
  j["subject_range"] = {r.subject_begin, r.subject_end};
  j["answer"] = {{"id", r.answer}, {"text", r.answer_text}, {"source", r.answer_source}};
  if (!r.target_text.empty()) j["target"] = r.target_text;
  if (!r.expected.empty()) j["expected"] = r.expected;
  j["correct_prediction"] = r.correct_prediction;
  j["high_score"] = r.high_score;
  j["low_score"] = r.low_score;
  return j;
}
}  // namespace

nlohmann::json kind_json(const TraceReport& r, const KindResult& k) {
  nlohmann::json j = fact_json(r);
  j["kind"] = kind_name(k.kind);
  j["window"] = k.window;
  j["n_layers"] = r.n_layers;
  j["moe_layers"] = r.moe_layers;
  j["rows"] = k.rows;
  nlohmann::json sc = nlohmann::json::array();
  for (const auto& row : k.scores) {
    nlohmann::json jr = nlohmann::json::array();
    for (double v : row) jr.push_back(num_or_null(v));
    sc.push_back(jr);
  }
  j["scores"] = sc;
  if (k.kind == Kind::Expert) {
    nlohmann::json ex = nlohmann::json::array();
    for (const ExpertScore& e : k.experts)
      ex.push_back({{"token", e.token}, {"layer", e.layer}, {"expert", e.expert}, {"rank", e.rank},
                    {"weight", e.weight}, {"score", e.score}});
    j["experts"] = ex;
    nlohmann::json dom = nlohmann::json::array();
    for (const auto& row : k.dominant) {
      nlohmann::json jr = nlohmann::json::array();
      for (int e : row) jr.push_back(e >= 0 ? nlohmann::json(e) : nlohmann::json(nullptr));
      dom.push_back(jr);
    }
    j["dominant"] = dom;
  }
  if (k.kind == Kind::Shared) {
    j["n_shared_experts"] = r.n_shared_experts;
    if (!k.shared_experts.empty()) {
      nlohmann::json sx = nlohmann::json::array();
      for (const SharedExpertScore& e : k.shared_experts)
        sx.push_back({{"token", e.token}, {"layer", e.layer}, {"expert", e.expert}, {"score", e.score}});
      j["shared_experts"] = sx;
    }
  }
  j["noise"] = {{"rule", r.noise_rule},     {"scale", r.noise_scale}, {"embedding_std", r.embedding_std},
                {"source", r.noise_source}, {"samples", r.samples},   {"seed", r.seed},
                {"replace", r.replace},     {"generator", "numpy.random.RandomState(seed)"}};
  j["mode"] = r.mode;
  return j;
}

nlohmann::json report_json(const TraceReport& r) {
  nlohmann::json j = fact_json(r);
  j["mode"] = r.mode;
  j["stats"] = {{"restorations", r.stats.restorations}, {"computed", r.stats.computed},
                {"shared_prefixes", r.stats.shared_prefixes}, {"batches", r.stats.batches},
                {"flops", r.stats.flops},               {"setup_flops", r.stats.setup_flops},
                {"seconds", r.stats.seconds},           {"setup_seconds", r.stats.setup_seconds},
                {"traced_together", r.stats.traced_together}};
  j["kinds"] = nlohmann::json::object();
  for (const KindResult& k : r.kinds) j["kinds"][kind_name(k.kind)] = kind_json(r, k);
  return j;
}

std::string kind_svg(const TraceReport& r, const KindResult& k) {
  svg::Heatmap h;
  h.title = kind_title(k.kind);
  h.palette = kind_palette(k.kind);
  for (int t : k.rows) h.row_labels.push_back(row_label(r, t));
  for (int l = 0; l < r.n_layers; ++l) h.col_labels.push_back(std::to_string(l));
  h.values = k.scores;
  h.vmin = r.low_score;
  double mx = r.low_score;
  for (const auto& row : k.scores)
    for (double v : row)
      if (std::isfinite(v)) mx = std::max(mx, v);
  h.vmax = mx;
  if (k.kind == Kind::Attn || k.kind == Kind::Moe)
    h.xlabel = "center of interval of " + std::to_string(k.window) + " restored " +
               (k.kind == Kind::Attn ? "Attn" : "MoE") + " layers";
  else if (k.kind == Kind::Expert)
    h.xlabel = "single restored expert (label: expert id) within layer";
  else
    h.xlabel = "single restored layer within the model";
  if (k.kind == Kind::Expert)
    for (const auto& row : k.dominant) {
      std::vector<std::string> tr;
      for (int e : row) tr.push_back(e >= 0 ? std::to_string(e) : "");
      h.cell_text.push_back(tr);
    }
  return svg::heatmap(h);
}

std::string expert_bars_svg(const TraceReport& r, const KindResult& k) {
  svg::BarChart c;
  c.title = "Restoring one routed expert (or the shared experts, and each shared expert) alone";
  const KindResult* sh = r.find(Kind::Shared);
  double mx = std::max(r.high_score, r.low_score);
  for (const auto& e : k.experts) mx = std::max(mx, e.score);
  for (int ri = 0; ri < int(k.rows.size()); ++ri) {
    const int t = k.rows[size_t(ri)];
    svg::BarPanel p;
    std::string which = t == r.subject_end - 1 ? " (last subject token)"
                        : t == int(r.ids.size()) - 1 ? " (last token)"
                                                      : "";
    p.title = "token " + std::to_string(t) + " '" + r.tokens[size_t(t)] + "'" + which;
    for (int l = 0; l < r.n_layers; ++l) {
      if (!r.moe_layers[size_t(l)]) continue;
      svg::BarGroup g;
      g.label = "L" + std::to_string(l);
      for (const auto& e : k.experts) {
        if (e.token != t || e.layer != l) continue;
        const bool dom = k.dominant[size_t(ri)][size_t(l)] == e.expert;
        g.bars.push_back({"e" + std::to_string(e.expert), e.score,
                          svg::color(svg::Palette::Greens, dom ? 0.85 : 0.5),
                          "layer " + std::to_string(l) + " expert " + std::to_string(e.expert) + " (rank " +
                              std::to_string(e.rank) + ", weight " + fmt(e.weight, 3) + "): p=" + fmt(e.score)});
      }
      const size_t si = sh ? size_t(std::find(sh->rows.begin(), sh->rows.end(), t) - sh->rows.begin()) : 0;
      if (sh && si < sh->rows.size() && std::isfinite(sh->scores[si][size_t(l)])) {
        const double v = sh->scores[si][size_t(l)];
        mx = std::max(mx, v);
        g.bars.push_back({"shared", v, svg::color(svg::Palette::Oranges, 0.6),
                          "layer " + std::to_string(l) + " shared expert" + (sh->shared_experts.empty() ? "" : "s") +
                              ": p=" + fmt(v)});
        for (const SharedExpertScore& se : sh->shared_experts) {
          if (se.token != t || se.layer != l) continue;
          mx = std::max(mx, se.score);
          g.bars.push_back({"s" + std::to_string(se.expert), se.score, svg::color(svg::Palette::Oranges, 0.4),
                            "layer " + std::to_string(l) + " shared expert " + std::to_string(se.expert) +
                                " alone: p=" + fmt(se.score)});
        }
      }
      p.groups.push_back(std::move(g));
    }
    c.panels.push_back(std::move(p));
  }
  c.ymin = 0;
  c.ymax = std::min(1.0, mx * 1.1 + 1e-9);
  c.reference_lines = {{r.low_score, "low " + fmt(r.low_score, 3)}, {r.high_score, "high " + fmt(r.high_score, 3)}};
  return svg::bar_chart(c);
}

std::vector<std::string> write_trace_outputs(const TraceReport& r, const std::string& dir, const std::string& prefix) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw InputError("cannot create output folder " + dir + ": " + ec.message());
  std::vector<std::string> written;
  std::vector<std::pair<std::string, std::string>> figures;  // (caption, file)
  auto put = [&](const std::string& name, const std::string& text) {
    const std::string p = (fs::path(dir) / (prefix + name)).string();
    write_file_atomic(p, text);
    written.push_back(p);
    return prefix + name;
  };
  std::vector<std::string> jsons;
  for (const KindResult& k : r.kinds) {
    jsons.push_back(put(std::string(kind_name(k.kind)) + ".json", kind_json(r, k).dump(1) + "\n"));
    if (k.kind == Kind::Expert) {
      figures.push_back({"Per-expert restoration", put("expert.svg", expert_bars_svg(r, k))});
      figures.push_back({"Dominant expert per (token, layer)", put("expert_dominant.svg", kind_svg(r, k))});
    } else {
      figures.push_back({kind_title(k.kind), put(std::string(kind_name(k.kind)) + ".svg", kind_svg(r, k))});
    }
  }
  put("report.html", report_html(r, dir, prefix, figures, jsons));
  return written;
}

// ---- HTML ----------------------------------------------------------------------------------------------------

std::string html_escape(const std::string& s) { return svg::escape(s); }

std::string html_head(const std::string& title) {
  return "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>" + html_escape(title) +
         "</title>\n<style>body{font-family:Georgia,'Times New Roman',serif;margin:2em;max-width:1200px;color:#222}"
         "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
         "th{background:#f3f3f3}td.l,th.l{text-align:left}figure{margin:1em 0}figcaption{font-size:90%;color:#555}"
         "code{background:#f6f6f6;padding:0 3px}.svg{overflow-x:auto}</style></head><body>\n";
}

std::string report_html(const TraceReport& r, const std::string& dir, const std::string& prefix,
                        const std::vector<std::pair<std::string, std::string>>& figures,
                        const std::vector<std::string>& jsons) {
  namespace fs = std::filesystem;
  std::ostringstream o;
  o << html_head("moedit trace: " + r.prompt);
  o << "<h1>Causal trace</h1>\n<table>\n";
  auto row = [&](const std::string& k, const std::string& v) {
    o << "<tr><th class=\"l\">" << html_escape(k) << "</th><td class=\"l\">" << html_escape(v) << "</td></tr>\n";
  };
  row("model", r.model);
  if (!r.id.empty()) row("fact", r.id);
  row("prompt", r.prompt);
  row("subject", r.subject + "  (tokens " + std::to_string(r.subject_begin) + ".." + std::to_string(r.subject_end - 1) +
                     ")");
  row("answer", "'" + r.answer_text + "' (id " + std::to_string(r.answer) + ", " + r.answer_source + ")");
  if (!r.expected.empty()) row("expected", r.expected + (r.correct_prediction ? "  (predicted)" : "  (NOT predicted)"));
  row("high score (clean p)", fmt(r.high_score));
  row("low score (corrupted p)", fmt(r.low_score));
  row("noise", r.noise_rule + (r.noise_scale > 0 ? ", scale " + fmt(r.noise_scale, 5) : std::string()) +
                   (r.embedding_std > 0 ? ", embedding std " + fmt(r.embedding_std, 5) : std::string()) + ", " +
                   std::to_string(r.samples) + " samples, seed " + std::to_string(r.seed) +
                   (r.replace ? ", replace" : ", add") + " (" + r.noise_source + ")");
  row("mode", r.mode + ", " + std::to_string(r.stats.restorations) + " restorations in " +
                  std::to_string(r.stats.batches) + " batches, " + fmt(r.stats.seconds, 2) + " s");
  o << "</table>\n<p>Tokens marked * are the subject. Data: ";
  for (size_t i = 0; i < jsons.size(); ++i) o << (i ? ", " : "") << "<a href=\"" << html_escape(jsons[i]) << "\">" << html_escape(jsons[i]) << "</a>";
  o << ".</p>\n";
  for (const auto& [caption, file] : figures) {
    std::ifstream f(fs::path(dir) / file, std::ios::binary);
    const std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    o << "<figure><div class=\"svg\">" << text << "</div><figcaption>" << html_escape(caption) << " — <a href=\""
      << html_escape(file) << "\">" << html_escape(file) << "</a></figcaption></figure>\n";
  }
  // Top expert restorations.
  if (const KindResult* k = r.find(Kind::Expert)) {
    std::vector<ExpertScore> ex = k->experts;
    std::sort(ex.begin(), ex.end(), [](const ExpertScore& a, const ExpertScore& b) { return a.score > b.score; });
    o << "<h2>Strongest single-expert restorations</h2>\n<table><tr><th>token</th><th class=\"l\">text</th><th>layer</th>"
         "<th>expert</th><th>rank</th><th>weight</th><th>p(answer)</th><th>indirect effect</th></tr>\n";
    for (size_t i = 0; i < std::min<size_t>(ex.size(), 15); ++i) {
      const ExpertScore& e = ex[i];
      o << "<tr><td>" << e.token << "</td><td class=\"l\">" << html_escape(r.tokens[size_t(e.token)]) << "</td><td>"
        << e.layer << "</td><td>" << e.expert << "</td><td>" << e.rank << "</td><td>" << fmt(e.weight, 3)
        << "</td><td>" << fmt(e.score) << "</td><td>" << fmt(e.score - r.low_score) << "</td></tr>\n";
    }
    o << "</table>\n";
  }
  (void)prefix;
  o << "</body></html>\n";
  return o.str();
}

}  // namespace moedit::trace
