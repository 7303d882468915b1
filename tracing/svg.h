// Plain SVG charts for trace outputs: ROME-style heatmaps, grouped bar charts and line charts (no dependencies, no
// scripts).
#pragma once
#include <string>
#include <vector>

namespace moedit::trace::svg {

// ColorBrewer 9-class sequential palettes (matplotlib's Purples, Greens, Reds, Oranges, Blues).
enum class Palette { Purples, Greens, Reds, Oranges, Blues };
// "#rrggbb" for t in [0, 1] (clamped), linear interpolation between the 9 stops.
std::string color(Palette p, double t);
std::string escape(const std::string& s);  // XML text/attribute escaping (also drops control characters)

struct Heatmap {
  std::string title, xlabel, colorbar_title = "p(answer)";
  std::vector<std::string> row_labels;               // top to bottom (y axis inverted, as ROME)
  std::vector<std::string> col_labels;               // left to right
  std::vector<std::vector<double>> values;           // [rows][cols]; NaN = not applicable (hatched grey)
  std::vector<std::vector<std::string>> cell_text;   // optional text drawn in each cell
  double vmin = 0, vmax = 1;
  Palette palette = Palette::Purples;
};
std::string heatmap(const Heatmap& h);

struct Bar {
  std::string label;  // drawn under the bar
  double value = 0;
  std::string fill;   // "#rrggbb"
  std::string tooltip;
};
struct BarGroup {
  std::string label;  // drawn under the group
  std::vector<Bar> bars;
};
struct BarPanel {
  std::string title;
  std::vector<BarGroup> groups;
};
struct BarChart {
  std::string title, ylabel = "p(answer)";
  std::vector<BarPanel> panels;  // stacked vertically, shared y range
  double ymin = 0, ymax = 1;
  std::vector<std::pair<double, std::string>> reference_lines;  // (y, label), dashed
};
std::string bar_chart(const BarChart& c);

// A line chart of one or more series over the same categorical x positions (e.g. layers), y range from the data
// (0 always included, a dashed line at 0); each point carries a tooltip with its value.
struct Series {
  std::string label;
  std::vector<double> y;     // [x_labels.size()]; NaN: no point
  std::string stroke = "#1f77b4";
};
struct LineChart {
  std::string title, xlabel = "layer", ylabel;
  std::vector<std::string> x_labels;
  std::vector<Series> series;
};
std::string line_chart(const LineChart& c);

}  // namespace moedit::trace::svg
