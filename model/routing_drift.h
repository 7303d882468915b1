// Routing drift: how an edit moves the routers. The same prompts are run before and after; for every (token, MoE
// layer) cell the top-k expert set and the router's distribution over all experts are compared:
//
//   changed share = #cells whose top-k set (ignoring order) changed / #cells   (MoEEdit's routing similarity is 1 − it)
//   mean KL       = mean over cells of KL(p_before ‖ p_after), p = softmax(z) over all E router logits for every
//                   router kind (the router distribution of tracing/routing.h)
//
// An edit of layer L's experts cannot move the routers of layers ≤ L (their inputs do not change), so drift is
// reported over every MoE layer and over the layers after the earliest edited one.
#pragma once
#include <vector>

#include "model/model.h"

namespace moedit {

// The routers' view of a set of prompts: per MoE layer, every token's top-k set (sorted ids) and distribution.
struct RouterSnapshot {
  std::vector<int> layers;                      // MoE layers, ascending
  std::vector<std::vector<std::vector<int>>> sets;  // [layer index][token] sorted top-k ids
  std::vector<MatR> probs;                      // [layer index] [tokens, E]
};
RouterSnapshot snapshot_routers(const Model& m, const std::vector<std::vector<int32_t>>& seqs);

struct RoutingDrift {
  int64_t cells = 0;          // (token, MoE layer) pairs compared
  double changed_share = 0;   // share of cells whose top-k set changed
  double mean_kl = 0;         // mean KL(before ‖ after) over the cells
};
// Drift between two snapshots of the same prompts, over MoE layers ≥ first_layer.
RoutingDrift routing_drift(const RouterSnapshot& before, const RouterSnapshot& after, int first_layer = 0);

}  // namespace moedit
