// Routing drift (see model/routing_drift.h).
#include "model/routing_drift.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "kernels/route.h"

namespace moedit {

RouterSnapshot snapshot_routers(const Model& m, const std::vector<std::vector<int32_t>>& seqs) {
  const ModelConfig& c = m.config();
  RouterSnapshot s;
  Hooks h;
  std::vector<std::shared_ptr<Hooks::Capture>> z;
  for (int l = 0; l < c.n_layers; ++l)
    if (c.is_moe(l)) {
      s.layers.push_back(l);
      z.push_back(h.capture(hook_names::router_logits(l)));
    }
  ForwardOptions o;
  o.hooks = &h;
  o.stop_after_layer = s.layers.empty() ? 0 : s.layers.back();
  const ForwardOutput f = m.forward(seqs, o);
  for (size_t i = 0; i < s.layers.size(); ++i) {
    const LayerRouting& r = f.routing[size_t(s.layers[i])];
    const MatR& zl = z[i]->value;  // [N, E]
    std::vector<std::vector<int>> sets(size_t(r.ids.rows()));
    for (Eigen::Index t = 0; t < r.ids.rows(); ++t) {
      sets[size_t(t)].assign(r.ids.row(t).data(), r.ids.row(t).data() + r.ids.cols());
      std::sort(sets[size_t(t)].begin(), sets[size_t(t)].end());
    }
    MatR p = zl;
    for (Eigen::Index t = 0; t < p.rows(); ++t) ops::softmax_row(p.row(t).data(), int(p.cols()));
    s.sets.push_back(std::move(sets));
    s.probs.push_back(std::move(p));
  }
  return s;
}

RoutingDrift routing_drift(const RouterSnapshot& before, const RouterSnapshot& after, int first_layer) {
  if (before.layers != after.layers || before.sets.size() != after.sets.size())
    throw std::invalid_argument("routing_drift: snapshots of different models");
  RoutingDrift d;
  double changed = 0, kl = 0;
  for (size_t i = 0; i < before.layers.size(); ++i) {
    if (before.layers[i] < first_layer) continue;
    const auto& sb = before.sets[i];
    const auto& sa = after.sets[i];
    if (sb.size() != sa.size()) throw std::invalid_argument("routing_drift: snapshots of different prompts");
    for (size_t t = 0; t < sb.size(); ++t) {
      changed += sb[t] != sa[t];
      double k = 0;
      for (Eigen::Index e = 0; e < before.probs[i].cols(); ++e) {
        const double pb = before.probs[i](Eigen::Index(t), e), pa = after.probs[i](Eigen::Index(t), e);
        if (pb > 0) k += pb * (std::log(pb) - std::log(std::max(pa, 1e-45)));
      }
      kl += k;
      ++d.cells;
    }
  }
  if (d.cells) {
    d.changed_share = changed / double(d.cells);
    d.mean_kl = kl / double(d.cells);
  }
  return d;
}

}  // namespace moedit
