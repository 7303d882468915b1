// Restoration sites: validating patches, where a restoration starts, the clean value of a site, and the hooks
// that copy clean values into a batch of corrupted runs (routed experts: this run's contribution swapped for the
// clean one).
#include "tracing/trace_internal.h"

#include <algorithm>
#include <map>
#include <string>

#include "io/errors.h"

namespace moedit::trace {

namespace {

// Rows of each restoration's patches, grouped for the hooks of one batch: local restoration r owns sequences
// r·samples … r·samples + samples − 1.
struct ReplaceTable {
  std::vector<std::vector<std::pair<int, const float*>>> by_r;  // r → (position, clean row)
};
struct ExpertPatch {
  int r, t, e;
  const float* clean;  // nullptr: not routed to e in the clean run
  MatR corr;           // [samples, H] this run's contribution of e at t (zero where not routed)
};
struct ExpertTable {
  std::vector<ExpertPatch> patches;
  std::vector<std::vector<int>> by_r;  // r → indices into patches
};

}  // namespace

void Tracer::Impl::validate(const Restoration& r) const {
  for (const Patch& p : r) {
    if (p.token < 0 || p.token >= S)
      throw InputError("restoration token " + std::to_string(p.token) + " is outside the prompt");
    if (p.layer < 0 || p.layer >= L)
      throw InputError("restoration layer " + std::to_string(p.layer) + " is outside the model");
    const FFNWeights& w = m.weights().layers[size_t(p.layer)].ffn;
    if (p.kind == Kind::Shared && !(w.moe && w.has_shared))
      throw InputError("layer " + std::to_string(p.layer) + " has no shared expert");
    if (p.kind == Kind::Shared && p.expert >= 0 && p.expert >= int(shared_expert[size_t(p.layer)].size()))
      throw InputError("layer " + std::to_string(p.layer) + " has no shared expert " + std::to_string(p.expert) +
                       " (restoring one shared expert alone needs n_shared_experts > 1)");
    if (p.kind == Kind::Expert && (!w.moe || p.expert < 0 || p.expert >= c.n_experts))
      throw InputError("layer " + std::to_string(p.layer) + " has no routed expert " + std::to_string(p.expert));
  }
}

void Tracer::Impl::start_of(const Restoration& r, int& l0, int& t0) const {
  l0 = L;
  t0 = S - 1;
  for (const Patch& p : r) {
    l0 = std::min(l0, p.kind == Kind::Resid ? p.layer + 1 : p.layer);
    t0 = std::min(t0, p.token);
  }
}

const float* Tracer::Impl::clean_row(const Patch& p) const {
  switch (p.kind) {
    case Kind::Resid: return resid_post[size_t(p.layer)].row(p.token).data();
    case Kind::Attn: return attn[size_t(p.layer)].row(p.token).data();
    case Kind::Moe: return moe[size_t(p.layer)].row(p.token).data();
    case Kind::Shared:
      return (p.expert < 0 ? shared[size_t(p.layer)] : shared_expert[size_t(p.layer)][size_t(p.expert)])
          .row(p.token)
          .data();
    case Kind::Expert: {
      const int row = expert_row[size_t(p.layer)][size_t(p.expert)][size_t(p.token)];
      return row < 0 ? nullptr : expert_cap[size_t(p.layer)][size_t(p.expert)]->value.row(row).data();
    }
  }
  return nullptr;
}

std::string Tracer::Impl::hook_of(const Patch& p) {
  switch (p.kind) {
    case Kind::Resid: return hook_names::resid_post(p.layer);
    case Kind::Attn: return hook_names::attn_out(p.layer);
    case Kind::Moe: return hook_names::moe_out(p.layer);
    case Kind::Shared:
      return p.expert < 0 ? hook_names::shared_out(p.layer) : hook_names::shared_expert_out(p.layer, p.expert);
    case Kind::Expert: return hook_names::moe_out(p.layer);
  }
  return {};
}

void Tracer::Impl::add_patch_hooks(Hooks& hooks, const std::vector<Item>& batch,
                                   const std::function<bool(int, const Patch&)>& skip) {
  if (batch.empty()) return;
  const int nr = int(batch.size()), ns = batch[0].f->samples, H = batch[0].f->H;
  std::map<std::string, std::shared_ptr<ReplaceTable>> rep;
  std::map<int, std::shared_ptr<ExpertTable>> exp;  // by layer
  for (int r = 0; r < nr; ++r)
    for (const Patch& p : *batch[size_t(r)].r) {
      if (skip(r, p)) continue;
      const float* clean = batch[size_t(r)].f->clean_row(p);
      if (p.kind == Kind::Expert) {
        auto& t = exp[p.layer];
        if (!t) {
          t = std::make_shared<ExpertTable>();
          t->by_r.resize(size_t(nr));
        }
        t->by_r[size_t(r)].push_back(int(t->patches.size()));
        t->patches.push_back({r, p.token, p.expert, clean, MatR::Zero(ns, H)});
      } else {
        auto& t = rep[hook_of(p)];
        if (!t) {
          t = std::make_shared<ReplaceTable>();
          t->by_r.resize(size_t(nr));
        }
        t->by_r[size_t(r)].emplace_back(p.token, clean);
      }
    }
  // Expert hooks first: they record this run's contribution, then hook_moe_out swaps it for the clean one.
  for (auto& entry : exp) {  // (no structured binding: lambdas capture t, which clang < 16 rejects)
    const int l = entry.first;
    const auto& t = entry.second;
    std::vector<int> experts;
    for (const auto& p : t->patches) experts.push_back(p.e);
    std::sort(experts.begin(), experts.end());
    experts.erase(std::unique(experts.begin(), experts.end()), experts.end());
    for (int ex : experts)
      hooks.add(hook_names::expert_out(l, ex), [t, ns](Eigen::Ref<MatR> act, const HookContext& ctx) {
        for (int i = 0; i < int(act.rows()); ++i) {
          const int tok = ctx.token(i), seq = ctx.layout.seq[size_t(tok)], pos = ctx.layout.pos[size_t(tok)];
          for (int pi : t->by_r[size_t(seq / ns)]) {
            ExpertPatch& p = t->patches[size_t(pi)];
            if (p.t == pos && p.e == ctx.expert) p.corr.row(seq % ns) = act.row(i);
          }
        }
      });
    hooks.add(hook_names::moe_out(l), [t, ns](Eigen::Ref<MatR> act, const HookContext& ctx) {
      for (int i = 0; i < int(act.rows()); ++i) {
        const int seq = ctx.layout.seq[size_t(i)], pos = ctx.layout.pos[size_t(i)];
        for (int pi : t->by_r[size_t(seq / ns)]) {
          const ExpertPatch& p = t->patches[size_t(pi)];
          if (p.t != pos) continue;
          act.row(i) -= p.corr.row(seq % ns);
          if (p.clean) act.row(i) += Eigen::Map<const Eigen::RowVectorXf>(p.clean, act.cols());
        }
      }
    });
  }
  for (auto& entry : rep)
    hooks.add(entry.first, [t = entry.second, ns](Eigen::Ref<MatR> act, const HookContext& ctx) {
      for (int i = 0; i < int(act.rows()); ++i) {
        const int tok = ctx.token(i), seq = ctx.layout.seq[size_t(tok)], pos = ctx.layout.pos[size_t(tok)];
        for (const auto& [tp, row] : t->by_r[size_t(seq / ns)])
          if (tp == pos) act.row(i) = Eigen::Map<const Eigen::RowVectorXf>(row, act.cols());
      }
    });
}

}  // namespace moedit::trace
