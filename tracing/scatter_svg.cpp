// scatter_svg (tracing/clusters.h): a 2-D map, points coloured by group, with a legend on the right.
#include <algorithm>
#include <cstdio>
#include <sstream>

#include "tracing/clusters.h"
#include "tracing/svg.h"

namespace moedit {

namespace {

// Tableau 10, then grey for noise (group −1).
const char* const kColors[10] = {"#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
                                 "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"};

std::string group_color(int g) { return g < 0 ? "#c8c8c8" : kColors[g % 10]; }

std::string f1(double v) {
  char b[32];
  std::snprintf(b, sizeof b, "%.1f", v);
  return b;
}

}  // namespace

std::string scatter_svg(const Eigen::MatrixXd& xy, const std::vector<int>& group, const std::vector<std::string>& names,
                        const std::string& title) {
  const double plot = 480, margin = 30, legend = 230, W = margin * 2 + plot + legend, H = margin * 2 + plot + 20;
  double x0 = 0, x1 = 1, y0 = 0, y1 = 1;
  if (xy.rows() > 0) {
    x0 = xy.col(0).minCoeff(), x1 = xy.col(0).maxCoeff(), y0 = xy.col(1).minCoeff(), y1 = xy.col(1).maxCoeff();
  }
  const double sx = x1 > x0 ? plot / (x1 - x0) : 0, sy = y1 > y0 ? plot / (y1 - y0) : 0;
  std::ostringstream o;
  o << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H << "\" font-family=\"sans-serif\">\n"
    << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    << "<text x=\"" << margin << "\" y=\"20\" font-size=\"14\">" << trace::svg::escape(title) << "</text>\n"
    << "<rect x=\"" << margin << "\" y=\"" << margin + 10 << "\" width=\"" << plot << "\" height=\"" << plot
    << "\" fill=\"none\" stroke=\"#888\"/>\n";
  // Noise first, so clusters are drawn on top.
  std::vector<Eigen::Index> order(size_t(xy.rows()));
  for (Eigen::Index i = 0; i < xy.rows(); ++i) order[size_t(i)] = i;
  std::stable_sort(order.begin(), order.end(), [&](auto a, auto b) { return (group[size_t(a)] < 0) > (group[size_t(b)] < 0); });
  for (Eigen::Index i : order) {
    const double px = margin + (xy(i, 0) - x0) * sx, py = margin + 10 + plot - (xy(i, 1) - y0) * sy;
    o << "<circle cx=\"" << f1(px) << "\" cy=\"" << f1(py) << "\" r=\"2.5\" fill=\"" << group_color(group[size_t(i)])
      << "\" fill-opacity=\"0.75\"/>\n";
  }
  std::vector<int> count(names.size(), 0);
  int noise = 0;
  for (int g : group) (g >= 0 && size_t(g) < count.size() ? count[size_t(g)] : noise) += 1;
  double ly = margin + 20;
  auto entry = [&](int g, const std::string& name, int n) {
    o << "<circle cx=\"" << margin * 2 + plot << "\" cy=\"" << f1(ly - 4) << "\" r=\"5\" fill=\"" << group_color(g) << "\"/>"
      << "<text x=\"" << margin * 2 + plot + 10 << "\" y=\"" << f1(ly) << "\" font-size=\"11\">"
      << trace::svg::escape(name.size() > 34 ? name.substr(0, 33) + "…" : name) << " (" << n << ")</text>\n";
    ly += 16;
  };
  for (size_t g = 0; g < names.size() && ly < H - 10; ++g) entry(int(g), names[g], count[g]);
  if (noise) entry(-1, "noise", noise);
  o << "</svg>\n";
  return o.str();
}

}  // namespace moedit
