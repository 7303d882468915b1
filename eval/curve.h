// The sequential-editing curve (issue 18): ES / PS / NS of the cases edited so far, routing drift on WikiText-2 and
// WikiText-2 perplexity against the number of edits, one line per run (e.g. rome, memit, alphaedit), as SVG.
#pragma once
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

namespace moedit::eval {

// runs: (label, the run's curve: summary.json's "sequential" list of points with "edits").
std::string curve_svg(const std::vector<std::pair<std::string, nlohmann::json>>& runs);
// The curves of --sequential run directories (DIR/summary.json's "sequential"), labelled by `labels` (one per
// directory) or the directory names; InputError naming the file for a run without a curve.
std::vector<std::pair<std::string, nlohmann::json>> read_curves(const std::vector<std::string>& dirs,
                                                                const std::vector<std::string>& labels);

}  // namespace moedit::eval
