// Rendering helpers shared by the single-fact outputs (output.cpp) and dataset mode (dataset.cpp).
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "tracing/trace.h"

namespace moedit::trace {

std::string kind_svg(const TraceReport& r, const KindResult& k);         // ROME-style heatmap (expert: dominant)
std::string expert_bars_svg(const TraceReport& r, const KindResult& k);  // per-expert bars (+ shared)
std::string html_escape(const std::string& s);
std::string html_head(const std::string& title);  // <!DOCTYPE html> … <body>
// The single-fact report: figures are (caption, file name in dir) and get inlined; jsons are linked.
std::string report_html(const TraceReport& r, const std::string& dir, const std::string& prefix,
                        const std::vector<std::pair<std::string, std::string>>& figures,
                        const std::vector<std::string>& jsons);

}  // namespace moedit::trace
