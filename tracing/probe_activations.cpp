// layer_activations (see tracing/probe_features.h): expert and shared-expert SwiGLU activations through hooks.
#include <stdexcept>

#include "tracing/probe_features.h"

namespace moedit {

LayerActivations layer_activations(const Model& m, const std::vector<std::vector<int32_t>>& texts, int layer,
                                   int batch_tokens) {
  const ModelConfig& c = m.config();
  if (layer < 0 || layer >= c.n_layers || !c.is_moe(layer))
    throw std::invalid_argument("layer_activations: layer " + std::to_string(layer) + " is not an MoE layer");
  const int E = c.n_experts;
  LayerActivations out;
  out.expert.resize(size_t(E));
  out.expert_rows.resize(size_t(E));
  std::vector<std::vector<std::vector<float>>> rows(static_cast<size_t>(E));  // [E] × rows, appended batch by batch
  std::vector<std::vector<float>> shared;
  int width = 0, shared_width = 0, base = 0;  // base: global index of the batch's first token
  Hooks hooks;
  for (int e = 0; e < E; ++e)
    hooks.add(hook_names::expert_key(layer, e), [&, e](Eigen::Ref<MatR> act, const HookContext& ctx) {
      width = int(act.cols());
      for (Eigen::Index r = 0; r < act.rows(); ++r) {
        rows[size_t(e)].emplace_back(act.row(r).data(), act.row(r).data() + act.cols());
        out.expert_rows[size_t(e)].push_back(base + ctx.token(int(r)));
      }
    });
  hooks.add(hook_names::shared_key(layer), [&](Eigen::Ref<MatR> act, const HookContext&) {
    shared_width = int(act.cols());
    for (Eigen::Index r = 0; r < act.rows(); ++r) shared.emplace_back(act.row(r).data(), act.row(r).data() + act.cols());
  });
  ForwardOptions fo;
  fo.hooks = &hooks;
  fo.stop_after_layer = layer;
  fo.record_routing = false;
  for (size_t i = 0; i < texts.size();) {
    std::vector<std::vector<int32_t>> batch;
    int n = 0;
    while (i < texts.size() && (batch.empty() || n + int(texts[i].size()) <= batch_tokens)) {
      n += int(texts[i].size());
      batch.push_back(texts[i++]);
    }
    m.forward(batch, fo);  // packed: token r of the call is global token base + r
    base += n;
  }
  out.tokens = base;
  for (int e = 0; e < E; ++e) {
    MatR& x = out.expert[size_t(e)];
    x.resize(Eigen::Index(rows[size_t(e)].size()), width);
    for (size_t r = 0; r < rows[size_t(e)].size(); ++r) x.row(Eigen::Index(r)) = Eigen::Map<const Eigen::RowVectorXf>(rows[size_t(e)][r].data(), width);
  }
  if (!shared.empty()) {
    if (int(shared.size()) != base) throw std::logic_error("layer_activations: shared rows != tokens");
    out.shared.resize(base, shared_width);
    for (int r = 0; r < base; ++r) out.shared.row(r) = Eigen::Map<const Eigen::RowVectorXf>(shared[size_t(r)].data(), shared_width);
  }
  return out;
}

}  // namespace moedit
