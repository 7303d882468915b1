// Plain SVG charts for trace outputs: ROME-style heatmaps and grouped bar charts (no dependencies, no scripts).
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

}  // namespace moedit::trace::svg
