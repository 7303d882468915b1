#include "tracing/svg.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>

namespace moedit::trace::svg {

namespace {

const char* const kStops[5][9] = {
    {"#fcfbfd", "#efedf5", "#dadaeb", "#bcbddc", "#9e9ac8", "#807dba", "#6a51a3", "#54278f", "#3f007d"},  // Purples
    {"#f7fcf5", "#e5f5e0", "#c7e9c0", "#a1d99b", "#74c476", "#41ab5d", "#238b45", "#006d2c", "#00441b"},  // Greens
    {"#fff5f0", "#fee0d2", "#fcbba1", "#fc9272", "#fb6a4a", "#ef3b2c", "#cb181d", "#a50f15", "#67000d"},  // Reds
    {"#fff5eb", "#fee6ce", "#fdd0a2", "#fdae6b", "#fd8d3c", "#f16913", "#d94801", "#a63603", "#7f2704"},  // Oranges
    {"#f7fbff", "#deebf7", "#c6dbef", "#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c", "#08306b"},  // Blues
};

void rgb(const char* hex, int& r, int& g, int& b) { std::sscanf(hex + 1, "%02x%02x%02x", &r, &g, &b); }

std::string fmt(double v, int prec = 3) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", prec, v);
  return buf;
}
std::string num(double v) {  // coordinates
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", v);
  return buf;
}

// Approximate text width (px) of a label at font size fs.
double text_width(const std::string& s, double fs) {
  size_t chars = 0;
  for (unsigned char ch : s)
    if ((ch & 0xC0) != 0x80) ++chars;
  return double(chars) * fs * 0.6;
}

const char* kFont = "font-family=\"Times New Roman, Times, serif\"";

// The opening <svg> element of a chart (width × height, the common font at size fs).
void open_svg(std::ostringstream& o, double width, double height, double fs) {
  o << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << num(width) << "\" height=\"" << num(height)
    << "\" viewBox=\"0 0 " << num(width) << " " << num(height) << "\" " << kFont << " font-size=\"" << fs << "\">\n";
}

// A white background and the title centred at the top (the bar and line charts).
void background_and_title(std::ostringstream& o, double width, const std::string& title) {
  o << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  o << "<text x=\"" << num(width / 2) << "\" y=\"18\" text-anchor=\"middle\" font-size=\"13\">" << escape(title)
    << "</text>\n";
}

}  // namespace

std::string color(Palette p, double t) {
  if (!std::isfinite(t)) t = 0;
  t = std::clamp(t, 0.0, 1.0);
  const double x = t * 8.0;
  const int i = std::min(7, int(x));
  const double f = x - i;
  int r0, g0, b0, r1, g1, b1;
  rgb(kStops[int(p)][i], r0, g0, b0);
  rgb(kStops[int(p)][i + 1], r1, g1, b1);
  char buf[8];
  std::snprintf(buf, sizeof buf, "#%02x%02x%02x", int(std::lround(r0 + f * (r1 - r0))),
                int(std::lround(g0 + f * (g1 - g0))), int(std::lround(b0 + f * (b1 - b0))));
  return buf;
}

std::string escape(const std::string& s) {
  std::string o;
  for (char ch : s) {
    switch (ch) {
      case '&': o += "&amp;"; break;
      case '<': o += "&lt;"; break;
      case '>': o += "&gt;"; break;
      case '"': o += "&quot;"; break;
      case '\'': o += "&#39;"; break;
      case '\n': o += "\\n"; break;
      case '\t': o += "\\t"; break;
      case '\r': o += "\\r"; break;
      default:
        if ((unsigned char)ch < 0x20) break;
        o += ch;
    }
  }
  return o;
}

std::string heatmap(const Heatmap& h) {
  const int R = int(h.row_labels.size()), C = int(h.col_labels.size());
  const double cw = 22, ch = 18, fs = 11;
  double label_w = 20;
  for (const auto& l : h.row_labels) label_w = std::max(label_w, text_width(l, fs) + 8);
  const double left = label_w + 10, top = 40, grid_w = cw * C, grid_h = ch * R;
  const double cb_x = left + grid_w + 20, cb_w = 14;
  const double width = std::max({cb_x + cb_w + 60, text_width(h.title, 13) + 20, left + text_width(h.xlabel, fs) + 20}),
               height = top + grid_h + 50;
  const double span = h.vmax > h.vmin ? h.vmax - h.vmin : 1.0;
  std::ostringstream o;
  open_svg(o, width, height, fs);
  o << "<defs><pattern id=\"na\" width=\"6\" height=\"6\" patternUnits=\"userSpaceOnUse\">"
       "<rect width=\"6\" height=\"6\" fill=\"#eeeeee\"/><path d=\"M0,6 L6,0\" stroke=\"#bbbbbb\"/></pattern></defs>\n";
  o << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  o << "<text x=\"" << num(std::max(left + grid_w / 2, text_width(h.title, 13) / 2 + 10))
    << "\" y=\"20\" text-anchor=\"middle\" font-size=\"13\">" << escape(h.title) << "</text>\n";
  for (int r = 0; r < R; ++r) {
    o << "<text x=\"" << num(left - 6) << "\" y=\"" << num(top + ch * r + ch * 0.7)
      << "\" text-anchor=\"end\" xml:space=\"preserve\">" << escape(h.row_labels[size_t(r)]) << "</text>\n";
    for (int c = 0; c < C; ++c) {
      const double v = (size_t(r) < h.values.size() && size_t(c) < h.values[size_t(r)].size())
                           ? h.values[size_t(r)][size_t(c)]
                           : std::nan("");
      const std::string fill = std::isnan(v) ? "url(#na)" : color(h.palette, (v - h.vmin) / span);
      o << "<rect x=\"" << num(left + cw * c) << "\" y=\"" << num(top + ch * r) << "\" width=\"" << cw
        << "\" height=\"" << ch << "\" fill=\"" << fill << "\"><title>" << escape(h.row_labels[size_t(r)])
        << " / layer " << escape(h.col_labels[size_t(c)]) << ": " << (std::isnan(v) ? "n/a" : fmt(v, 4))
        << "</title></rect>\n";
      if (size_t(r) < h.cell_text.size() && size_t(c) < h.cell_text[size_t(r)].size() &&
          !h.cell_text[size_t(r)][size_t(c)].empty()) {
        const bool dark = !std::isnan(v) && (v - h.vmin) / span > 0.55;
        o << "<text x=\"" << num(left + cw * c + cw / 2) << "\" y=\"" << num(top + ch * r + ch * 0.68)
          << "\" text-anchor=\"middle\" font-size=\"8\" fill=\"" << (dark ? "white" : "black") << "\">"
          << escape(h.cell_text[size_t(r)][size_t(c)]) << "</text>\n";
      }
    }
  }
  o << "<rect x=\"" << num(left) << "\" y=\"" << num(top) << "\" width=\"" << num(grid_w) << "\" height=\""
    << num(grid_h) << "\" fill=\"none\" stroke=\"#444\" stroke-width=\"0.5\"/>\n";
  const int step = C > 24 ? (C + 11) / 12 : 1;
  for (int c = 0; c < C; c += step)
    o << "<text x=\"" << num(left + cw * c + cw / 2) << "\" y=\"" << num(top + grid_h + 13)
      << "\" text-anchor=\"middle\">" << escape(h.col_labels[size_t(c)]) << "</text>\n";
  o << "<text x=\"" << num(std::max(left + grid_w / 2, left + text_width(h.xlabel, fs) / 2)) << "\" y=\""
    << num(top + grid_h + 32) << "\" text-anchor=\"middle\">" << escape(h.xlabel) << "</text>\n";
  // colour bar
  const int steps = 32;
  for (int i = 0; i < steps; ++i) {
    const double y = top + grid_h * (1.0 - double(i + 1) / steps);
    o << "<rect x=\"" << num(cb_x) << "\" y=\"" << num(y) << "\" width=\"" << cb_w << "\" height=\""
      << num(grid_h / steps + 0.5) << "\" fill=\"" << color(h.palette, (i + 0.5) / steps) << "\"/>\n";
  }
  o << "<rect x=\"" << num(cb_x) << "\" y=\"" << num(top) << "\" width=\"" << cb_w << "\" height=\"" << num(grid_h)
    << "\" fill=\"none\" stroke=\"#444\" stroke-width=\"0.5\"/>\n";
  const int ticks = grid_h < 80 ? 2 : 4;
  for (int i = 0; i <= ticks; ++i) {
    const double y = top + grid_h * (1.0 - double(i) / ticks);
    o << "<text x=\"" << num(cb_x + cb_w + 4) << "\" y=\"" << num(y + 4) << "\" font-size=\"9\">"
      << fmt(h.vmin + span * i / ticks, 3) << "</text>\n";
  }
  o << "<text x=\"" << num(cb_x + cb_w / 2) << "\" y=\"" << num(top - 8) << "\" text-anchor=\"middle\" font-size=\"10\">"
    << escape(h.colorbar_title) << "</text>\n";
  o << "</svg>\n";
  return o.str();
}

std::string bar_chart(const BarChart& c) {
  const double fs = 10, bw = 10, gap = 14, panel_h = 150, left = 50, top = 34;
  double plot_w = 0;
  for (const auto& p : c.panels) {
    double w = 0;
    for (const auto& g : p.groups) w += bw * double(g.bars.size()) + gap;
    plot_w = std::max(plot_w, w);
  }
  plot_w = std::max(plot_w, 200.0);
  const double panel_total = panel_h + 58;
  const double width = std::max(left + plot_w + 130, text_width(c.title, 13) + 20),
               height = top + panel_total * double(c.panels.size()) + 10;
  const double span = c.ymax > c.ymin ? c.ymax - c.ymin : 1.0;
  std::ostringstream o;
  open_svg(o, width, height, fs);
  background_and_title(o, width, c.title);
  for (size_t pi = 0; pi < c.panels.size(); ++pi) {
    const BarPanel& p = c.panels[pi];
    const double y0 = top + panel_total * double(pi) + 16;  // top of the plot area
    auto Y = [&](double v) { return y0 + panel_h * (1.0 - (std::clamp(v, c.ymin, c.ymax) - c.ymin) / span); };
    o << "<text x=\"" << num(left) << "\" y=\"" << num(y0 - 5) << "\" font-size=\"11\" xml:space=\"preserve\">"
      << escape(p.title) << "</text>\n";
    // axis + ticks
    o << "<line x1=\"" << num(left) << "\" y1=\"" << num(y0) << "\" x2=\"" << num(left) << "\" y2=\""
      << num(y0 + panel_h) << "\" stroke=\"#444\"/>\n";
    o << "<line x1=\"" << num(left) << "\" y1=\"" << num(y0 + panel_h) << "\" x2=\"" << num(left + plot_w)
      << "\" y2=\"" << num(y0 + panel_h) << "\" stroke=\"#444\"/>\n";
    for (int i = 0; i <= 4; ++i) {
      const double v = c.ymin + span * i / 4.0;
      o << "<text x=\"" << num(left - 4) << "\" y=\"" << num(Y(v) + 3) << "\" text-anchor=\"end\" font-size=\"9\">"
        << fmt(v, 2) << "</text>\n";
    }
    o << "<text transform=\"translate(" << num(left - 34) << "," << num(y0 + panel_h / 2)
      << ") rotate(-90)\" text-anchor=\"middle\">" << escape(c.ylabel) << "</text>\n";
    double x = left + gap / 2;
    for (const BarGroup& g : p.groups) {
      const double gx = x;
      for (const Bar& b : g.bars) {
        const double yv = Y(b.value), yb = Y(c.ymin);
        o << "<rect x=\"" << num(x) << "\" y=\"" << num(yv) << "\" width=\"" << num(bw - 1) << "\" height=\""
          << num(std::max(0.0, yb - yv)) << "\" fill=\"" << b.fill << "\"><title>" << escape(b.tooltip)
          << "</title></rect>\n";
        o << "<text transform=\"translate(" << num(x + bw / 2 + 2) << "," << num(y0 + panel_h + 4)
          << ") rotate(90)\" font-size=\"7\">" << escape(b.label) << "</text>\n";
        x += bw;
      }
      o << "<text x=\"" << num((gx + x) / 2) << "\" y=\"" << num(y0 + panel_h + 34)
        << "\" text-anchor=\"middle\" font-size=\"9\">" << escape(g.label) << "</text>\n";
      x += gap;
    }
    for (const auto& [v, label] : c.reference_lines) {
      o << "<line x1=\"" << num(left) << "\" y1=\"" << num(Y(v)) << "\" x2=\"" << num(left + plot_w) << "\" y2=\""
        << num(Y(v)) << "\" stroke=\"#666\" stroke-dasharray=\"4,3\"/>\n";
      o << "<text x=\"" << num(left + plot_w + 4) << "\" y=\"" << num(Y(v) + 3) << "\" font-size=\"9\">"
        << escape(label) << "</text>\n";
    }
  }
  o << "</svg>\n";
  return o.str();
}

std::string line_chart(const LineChart& c) {
  const double fs = 10, left = 64, top = 34, plot_h = 200, right = 20;
  const size_t n = c.x_labels.size();
  const double step = n > 1 ? std::max(28.0, 360.0 / double(n - 1)) : 40.0;
  const double pad = 20, plot_w = step * double(n > 1 ? n - 1 : 1) + 2 * pad;  // points keep off the frame
  double lo = 0, hi = 0;
  for (const Series& s : c.series)
    for (double v : s.y)
      if (std::isfinite(v)) lo = std::min(lo, v), hi = std::max(hi, v);
  if (hi - lo < 1e-12) hi = lo + 1;
  const double margin = 0.05 * (hi - lo);
  lo -= margin, hi += margin;
  const double legend_h = 16 * double(c.series.size());
  const double width = std::max(left + plot_w + right, text_width(c.title, 13) + 20),
               height = top + plot_h + 46 + legend_h;
  auto X = [&](size_t i) { return left + (n > 1 ? pad + step * double(i) : plot_w / 2); };
  auto Y = [&](double v) { return top + plot_h * (hi - v) / (hi - lo); };
  std::ostringstream o;
  open_svg(o, width, height, fs);
  background_and_title(o, width, c.title);
  o << "<rect x=\"" << num(left) << "\" y=\"" << num(top) << "\" width=\"" << num(plot_w) << "\" height=\""
    << num(plot_h) << "\" fill=\"none\" stroke=\"#444\"/>\n";
  for (int t = 0; t <= 4; ++t) {
    const double v = lo + (hi - lo) * t / 4.0;
    o << "<text x=\"" << num(left - 4) << "\" y=\"" << num(Y(v) + 3) << "\" text-anchor=\"end\" font-size=\"9\">"
      << fmt(v, 4) << "</text>\n";
  }
  o << "<line x1=\"" << num(left) << "\" y1=\"" << num(Y(0)) << "\" x2=\"" << num(left + plot_w) << "\" y2=\""
    << num(Y(0)) << "\" stroke=\"#666\" stroke-dasharray=\"4,3\"/>\n";
  for (size_t i = 0; i < n; ++i)
    o << "<text x=\"" << num(X(i)) << "\" y=\"" << num(top + plot_h + 14) << "\" text-anchor=\"middle\">"
      << escape(c.x_labels[i]) << "</text>\n";
  o << "<text x=\"" << num(left + plot_w / 2) << "\" y=\"" << num(top + plot_h + 30) << "\" text-anchor=\"middle\">"
    << escape(c.xlabel) << "</text>\n";
  o << "<text transform=\"translate(14," << num(top + plot_h / 2) << ") rotate(-90)\" text-anchor=\"middle\">"
    << escape(c.ylabel) << "</text>\n";
  for (size_t si = 0; si < c.series.size(); ++si) {
    const Series& s = c.series[si];
    std::string pts;
    for (size_t i = 0; i < n && i < s.y.size(); ++i) {
      if (!std::isfinite(s.y[i])) continue;
      pts += (pts.empty() ? "" : " ") + num(X(i)) + "," + num(Y(s.y[i]));
      o << "<circle cx=\"" << num(X(i)) << "\" cy=\"" << num(Y(s.y[i])) << "\" r=\"3\" fill=\"" << s.stroke
        << "\"><title>" << escape(s.label + " @ " + c.x_labels[i] + ": " + fmt(s.y[i], 6)) << "</title></circle>\n";
    }
    o << "<polyline fill=\"none\" stroke=\"" << s.stroke << "\" stroke-width=\"2\" points=\"" << pts << "\"/>\n";
    const double ly = top + plot_h + 46 + 16 * double(si);
    o << "<line x1=\"" << num(left) << "\" x2=\"" << num(left + 24) << "\" y1=\"" << num(ly - 4) << "\" y2=\""
      << num(ly - 4) << "\" stroke=\"" << s.stroke << "\" stroke-width=\"3\"/><text x=\"" << num(left + 30)
      << "\" y=\"" << num(ly) << "\">" << escape(s.label) << "</text>\n";
  }
  o << "</svg>\n";
  return o.str();
}

}  // namespace moedit::trace::svg
