// The batch editors' options parsed from their command-line names, and their reports: each request scored as a ROME
// edit is, the batch (updates, residuals, timings) and each request's part of it as JSON (see editor/memit.h).
#include <algorithm>

#include "editor/memit.h"
#include "editor/rome_internal.h"
#include "io/errors.h"
#include "io/text.h"

namespace moedit {

using namespace rome_detail;

BatchMethod parse_batch_method(const std::string& s) {
  if (s == "memit") return BatchMethod::Memit;
  if (s == "alphaedit") return BatchMethod::AlphaEdit;
  if (s == "moeedit") return BatchMethod::MoeEdit;
  throw InputError("--method '" + s + "': expected rome, memit, alphaedit or moeedit");
}

std::string method_name(BatchMethod m) {
  switch (m) {
    case BatchMethod::Memit: return "memit";
    case BatchMethod::AlphaEdit: return "alphaedit";
    case BatchMethod::MoeEdit: return "moeedit";
  }
  return "?";
}

KeyColumns parse_key_columns(const std::string& s) {
  if (s == "mean") return KeyColumns::Mean;
  if (s == "templates") return KeyColumns::Templates;
  throw InputError("--key-columns '" + s + "': expected mean or templates");
}

std::string key_columns_name(KeyColumns k) { return k == KeyColumns::Mean ? "mean" : "templates"; }

namespace {
int layer_number(const std::string& s, const std::string& all) {
  try {
    size_t used = 0;
    const int v = std::stoi(s, &used);
    if (used == s.size() && v >= 0) return v;
  } catch (const std::exception&) {
  }
  throw InputError("--layers '" + all + "': '" + s + "' is not a layer index (expected e.g. 3,4,5 or 3-5)");
}
}  // namespace

std::vector<int> parse_layer_list(const std::string& s) {
  std::vector<int> out;
  for (const std::string& piece : split_list(s)) {
    const auto dash = piece.find('-');
    if (dash == std::string::npos) {
      out.push_back(layer_number(trim(piece), s));
      continue;
    }
    const int a = layer_number(trim(piece.substr(0, dash)), s), b = layer_number(trim(piece.substr(dash + 1)), s);
    require_input(a <= b, "--layers '" + s + "': the range " + piece + " is empty");
    for (int l = a; l <= b; ++l) out.push_back(l);
  }
  require_input(!out.empty(), "--layers '" + s + "': no layers given");
  for (size_t i = 1; i < out.size(); ++i)
    require_input(out[i] > out[i - 1], "--layers '" + s + "': layers must be ascending and distinct");
  return out;
}

EditReport report_request(const Model& m, const Tokenizer& tok, const EditRequest& req, const BatchEditResult& r,
                          int request) {
  EditResult view;  // what report_edit reads: the layer its routing is read at, the experts edited
  view.layer = r.layers.empty() ? 0 : r.layers.back();
  for (const auto& [l, e] : edited_experts(r, request)) {
    ExpertUpdate u;
    u.layer = l;
    u.expert = e;
    view.updates.push_back(std::move(u));
  }
  return report_edit(m, tok, req, view);
}

nlohmann::json batch_edit_json(const BatchEditResult& r) {
  nlohmann::json j;
  j["method"] = method_name(r.method);
  j["target"] = target_name(r.target);
  j["layers"] = r.layers;
  j[r.method == BatchMethod::Memit ? "mom2_weight" : "l2"] = r.lambda;
  j["requests"] = r.vstar.size();
  j["bare_key_weight"] = r.bare_key_weight < 0 ? nlohmann::json("mean") : nlohmann::json(r.bare_key_weight);
  j["key_columns"] = key_columns_name(r.key_columns);
  j["passes"] = r.passes;
  if (r.method == BatchMethod::MoeEdit) {
    j["bcd_sweeps"] = r.bcd_sweeps;
    j["bcd_objective"] = r.bcd_objective;
  }
  if (!r.router_guard_dims.empty()) {  // layer → the directions its updates keep out of
    nlohmann::json g;
    for (const auto& [l, d] : r.router_guard_dims) g[std::to_string(l)] = d;
    j["router_guard_dims"] = g;
  }
  j["updates"] = nlohmann::json::array();
  for (const BatchExpertUpdate& u : r.updates) {
    nlohmann::json x = {{"layer", u.layer},
                        {"expert", expert_json(u.expert, r.n_shared_experts)},
                        {"pass", u.pass},
                        {"columns", u.requests.size()},
                        {"update_norm", u.delta_norm},
                        {"residual_norm", u.R.norm()},
                        {"stats_tokens", u.stats_count}};
    if (u.null_dim >= 0) x["null_space_dim"] = u.null_dim;
    j["updates"].push_back(std::move(x));
  }
  // Mean ‖z* − h(cur)‖ over the requests before each layer's update (pass by pass), and after the last.
  std::vector<double> mean;
  for (const auto& step : r.residual_norms) {
    double s = 0;
    for (double v : step) s += v;
    mean.push_back(step.empty() ? 0.0 : s / double(step.size()));
  }
  j["mean_residual_norm"] = mean;
  j["seconds"] = r.seconds;
  j["vstar_seconds"] = r.vstar_seconds;
  j["seconds_per_request"] = r.vstar.empty() ? 0.0 : r.seconds / double(r.vstar.size());
  return j;
}

nlohmann::json batch_request_json(const BatchEditResult& r, int request) {
  const VStarResult& v = r.vstar[size_t(request)];
  nlohmann::json j;
  j["vstar"] = {{"loss", v.loss},
                {"p_target", v.p_target},
                {"updates", v.updates},
                {"delta_norm", v.delta.norm()},
                {"target_init_norm", v.target_init.norm()}};
  j["experts"] = nlohmann::json::array();
  for (const BatchExpertUpdate& u : r.updates) {
    const auto it = std::find(u.requests.begin(), u.requests.end(), request);
    if (it == u.requests.end()) continue;
    const auto c = it - u.requests.begin();
    j["experts"].push_back({{"layer", u.layer},
                            {"expert", expert_json(u.expert, r.n_shared_experts)},
                            {"pass", u.pass},
                            {"weight", u.weights[size_t(c)]},
                            {"residual_norm", u.R.col(c).norm() / u.scales[size_t(c)]}});  // r's share
  }
  std::vector<double> res;
  for (const auto& step : r.residual_norms) res.push_back(step[size_t(request)]);
  j["residual_norms"] = res;  // ‖z* − h(cur)‖ before each layer's update (pass by pass) and after the last
  return j;
}

}  // namespace moedit
