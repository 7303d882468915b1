#include "model/hooks.h"

#include <algorithm>

namespace moedit {

int TokenLayout::index_of(int row, int position) const {
  for (size_t i = 0; i < seq.size(); ++i)
    if (seq[i] == row && pos[i] == position) return int(i);
  return -1;
}

void Hooks::run(const std::string& name, Eigen::Ref<MatR> act, const HookContext& ctx) const {
  auto it = fns_.find(name);
  if (it == fns_.end()) return;
  for (const auto& fn : it->second) fn(act, ctx);
}

void Hooks::read(const std::string& name, const float* rows, int n, int cols, size_t ld) const {
  auto it = readers_.find(name);
  if (it == readers_.end()) return;
  for (const auto& fn : it->second) fn(rows, n, cols, ld);
}

std::shared_ptr<Hooks::Capture> Hooks::capture(const std::string& name) {
  auto cap = std::make_shared<Capture>();
  add(name, [cap](Eigen::Ref<MatR> act, const HookContext& ctx) {
    cap->value = act;
    cap->tokens.resize(size_t(act.rows()));
    for (int r = 0; r < int(act.rows()); ++r) cap->tokens[size_t(r)] = ctx.token(r);
  });
  return cap;
}

namespace {
// Calls f(activation_row) for every activation row that holds one of the sites.
template <typename F>
void for_sites(const std::vector<Site>& sites, Eigen::Ref<MatR> act, const HookContext& ctx, F&& f) {
  // Last position seen per sequence in this call, for negative positions.
  std::vector<int> last(size_t(ctx.layout.n_seqs), -1);
  for (size_t i = 0; i < ctx.layout.seq.size(); ++i)
    last[size_t(ctx.layout.seq[i])] = std::max(last[size_t(ctx.layout.seq[i])], ctx.layout.pos[i]);
  for (int r = 0; r < int(act.rows()); ++r) {
    const int t = ctx.token(r);
    const int s = ctx.layout.seq[size_t(t)], p = ctx.layout.pos[size_t(t)];
    for (const Site& site : sites) {
      const int want = site.pos >= 0 ? site.pos : last[size_t(s)] + 1 + site.pos;
      if (site.row == s && want == p) f(act.row(r));
    }
  }
}
}  // namespace

void Hooks::replace(const std::string& name, std::vector<Site> sites, VecF value) {
  add(name, [sites = std::move(sites), value = std::move(value)](Eigen::Ref<MatR> act, const HookContext& ctx) {
    for_sites(sites, act, ctx, [&](auto row) { row = value.transpose(); });
  });
}

void Hooks::add_delta(const std::string& name, std::vector<Site> sites, VecF delta) {
  add(name, [sites = std::move(sites), delta = std::move(delta)](Eigen::Ref<MatR> act, const HookContext& ctx) {
    for_sites(sites, act, ctx, [&](auto row) { row += delta.transpose(); });
  });
}

namespace hook_names {
std::string resid_pre(int l) { return "blocks." + std::to_string(l) + ".hook_resid_pre"; }
std::string attn_out(int l) { return "blocks." + std::to_string(l) + ".hook_attn_out"; }
std::string moe_out(int l) { return "blocks." + std::to_string(l) + ".hook_moe_out"; }
std::string resid_post(int l) { return "blocks." + std::to_string(l) + ".hook_resid_post"; }
std::string router_logits(int l) { return "blocks." + std::to_string(l) + ".moe.hook_router_logits"; }
std::string expert_ids(int l) { return "blocks." + std::to_string(l) + ".moe.hook_expert_ids"; }
std::string expert_weights(int l) { return "blocks." + std::to_string(l) + ".moe.hook_expert_weights"; }
std::string shared_out(int l) { return "blocks." + std::to_string(l) + ".moe.hook_shared_out"; }
std::string ffn_in(int l) { return "blocks." + std::to_string(l) + ".hook_ffn_in"; }
std::string shared_key(int l) { return "blocks." + std::to_string(l) + ".moe.hook_shared_key"; }
std::string shared_expert_out(int l, int j) {
  return "blocks." + std::to_string(l) + ".moe.shared_experts." + std::to_string(j) + ".hook_out";
}
std::string expert_out(int l, int e) {
  return "blocks." + std::to_string(l) + ".moe.experts." + std::to_string(e) + ".hook_out";
}
std::string expert_key(int l, int e) {
  return "blocks." + std::to_string(l) + ".moe.experts." + std::to_string(e) + ".hook_key";
}
}  // namespace hook_names

}  // namespace moedit
