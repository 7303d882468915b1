// moedit logits MODEL --ids 1,2,3: logits of every position and the router choices of every MoE layer.
#include <cstdio>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/ids.h"
#include "cli/interventions.h"
#include "model/model.h"

namespace moedit::cli {

namespace {

void register_logits(CLI::App& app) {
  static std::string model, ids_arg;
  static bool as_json = false;
  static int top = 5;
  static InterventionSpec iv;
  auto* cmd = add_model_command(
      app, "logits", "Logits of every position, and the experts each token is routed to", model);
  cmd->add_option("--ids", ids_arg, "Comma-separated token ids")->required();
  cmd->add_option("--top", top, "Top tokens to list per position (text output)")->check(CLI::Range(1, 100));
  add_json_flag(cmd, as_json, "{\"logits\": [[...]], \"routing\": [...]}");
  add_intervention_flags(cmd, iv);
  cmd->callback([] {
    const auto ids = parse_ids(ids_arg);
    auto m = load_model(model);
    Hooks hooks;
    install_interventions(iv, m->config(), hooks);
    ForwardOptions fo;
    fo.hooks = hooks.empty() ? nullptr : &hooks;
    ForwardOutput f = m->forward({ids}, fo);
    const ModelConfig& c = m->config();
    if (as_json) {
      nlohmann::json j;
      j["ids"] = ids;
      j["logits"] = nlohmann::json::array();
      for (int t = 0; t < int(f.logits.rows()); ++t)
        j["logits"].push_back(std::vector<float>(f.logits.row(t).data(), f.logits.row(t).data() + f.logits.cols()));
      j["routing"] = nlohmann::json::array();
      for (int l = 0; l < c.n_layers; ++l) {
        if (!c.is_moe(l)) continue;
        const LayerRouting& r = f.routing[size_t(l)];
        nlohmann::json lj = {{"layer", l}, {"expert_ids", nlohmann::json::array()},
                             {"expert_weights", nlohmann::json::array()}};
        for (int t = 0; t < int(r.ids.rows()); ++t) {
          lj["expert_ids"].push_back(std::vector<int>(r.ids.row(t).data(), r.ids.row(t).data() + r.ids.cols()));
          lj["expert_weights"].push_back(
              std::vector<float>(r.weights.row(t).data(), r.weights.row(t).data() + r.weights.cols()));
        }
        j["routing"].push_back(lj);
      }
      std::printf("%s\n", j.dump().c_str());
      return;
    }
    for (int t = 0; t < int(f.logits.rows()); ++t) {
      std::vector<int> order(size_t(f.logits.cols()));
      for (int v = 0; v < int(order.size()); ++v) order[size_t(v)] = v;
      const float* lg = f.logits.row(t).data();
      const int k = std::min<int>(top, int(order.size()));
      std::partial_sort(order.begin(), order.begin() + k, order.end(),
                        [lg](int a, int b) { return lg[a] > lg[b] || (lg[a] == lg[b] && a < b); });
      std::printf("pos %d (id %d):", t, ids[size_t(t)]);
      for (int i = 0; i < k; ++i) std::printf("  %d:%.4f", order[size_t(i)], lg[order[size_t(i)]]);
      std::printf("\n   experts:");
      for (int l = 0; l < c.n_layers; ++l) {
        if (!c.is_moe(l)) continue;
        std::printf(" L%d[", l);
        for (int j = 0; j < c.top_k; ++j)
          std::printf("%s%d", j ? "," : "", f.routing[size_t(l)].ids(t, j));
        std::printf("]");
      }
      std::printf("\n");
    }
  });
}

}  // namespace

MOEDIT_COMMAND(30, register_logits)

}  // namespace moedit::cli
