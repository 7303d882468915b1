// ROME on MoE experts, the edit itself: the targets and their residual shares, the keys and C⁻¹k* of each target
// expert, v* with the edit's spread, the rank-one updates of the experts' down projections, and revert (see
// editor/rome.h). Requests: rome_request.cpp; v*: rome_vstar.cpp; text level: rome_text.cpp; report: rome_report.cpp.
// The target split, keys, moments and copy-on-write helpers are shared with the batch editors (rome_internal.h).
#include "editor/rome.h"

#include <Eigen/Cholesky>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <set>

#include "editor/rome_internal.h"
#include "io/errors.h"

namespace moedit {

using namespace rome_detail;

namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Keys k = silu(x·Gᵀ) ⊙ (x·Uᵀ) of expert e of a bank for rows x [n, H] → [n, I].
MatR bank_keys(const ExpertBank& b, int e, const MatR& x) {
  MatR k(x.rows(), b.I);
  expert_key(b, e, x.data(), size_t(x.cols()), int(x.rows()), k.data());
  return k;
}

std::string joined(const std::vector<int>& v) {
  std::string s;
  for (int e : v) s += (s.empty() ? "" : ",") + std::to_string(e);
  return s;
}

}  // namespace

// ---- helpers shared with the batch editors (rome_internal.h) ------------------------------------------------------

namespace rome_detail {

std::pair<int, int> shared_columns(const Model& m, int layer, int expert) {
  const int n = shared_expert_count(m, layer);
  require_input(shared_index(expert) < n, "layer " + std::to_string(layer) + " has no shared expert " +
                                              std::to_string(shared_index(expert)));
  return n == 1 ? std::pair<int, int>{0, m.weights().layers[size_t(layer)].ffn.shared.I}
                : m.config().shared_slice(shared_index(expert));
}

double shared_gate(const FFNWeights& f, const Eigen::Ref<const Eigen::RowVectorXf>& x) {
  return f.shared_gate.size() ? 1.0 / (1.0 + std::exp(-double(x.dot(f.shared_gate.transpose())))) : 1.0;
}

MatR target_keys(const Model& m, int layer, int expert, const MatR& x) {
  const FFNWeights& fw = m.weights().layers[size_t(layer)].ffn;
  if (!is_shared_expert(expert)) return bank_keys(fw.experts, expert, x);
  const auto [b, e] = shared_columns(m, layer, expert);
  return MatR(bank_keys(fw.shared, 0, x).middleCols(b, e - b));
}

std::vector<TargetShare> target_shares(const Model& m, int layer, const EditTarget& t, const std::vector<int>& routed,
                                       const std::vector<float>& weights,
                                       const Eigen::Ref<const Eigen::RowVectorXf>& x) {
  const FFNWeights& f = m.weights().layers[size_t(layer)].ffn;
  const int K = int(routed.size());
  std::vector<TargetShare> tg;
  switch (t.kind) {
    case TargetKind::Dominant: {  // the largest routing weight (DeepSeek-V3 orders its top-k by the biased score)
      const size_t j = size_t(std::max_element(weights.begin(), weights.end()) - weights.begin());
      tg.push_back({routed[j], weights[j], 1.0 / weights[j]});
      break;
    }
    case TargetKind::Expert: {
      const auto it = std::find(routed.begin(), routed.end(), t.expert);
      require_input(it != routed.end(), "expert " + std::to_string(t.expert) + " of layer " + std::to_string(layer) +
                                            " is not routed at the subject's last token (its top-" +
                                            std::to_string(K) + " there: " + joined(routed) +
                                            "); editing it would not change this fact");
      const double w = weights[size_t(it - routed.begin())];
      tg.push_back({t.expert, w, 1.0 / w});
      break;
    }
    case TargetKind::Routed: {
      double s2 = 0;
      for (float w : weights) s2 += double(w) * w;
      for (int j = 0; j < K; ++j) tg.push_back({routed[size_t(j)], weights[size_t(j)], weights[size_t(j)] / s2});
      break;
    }
    case TargetKind::Shared: {  // each shared expert j takes r_j = δ/(n·g): the minimum-norm split of Σ g·r_j = δ
      require_input(f.has_shared,
                    "--target shared: this model has no shared expert (model_type " + m.config().model_type + ")");
      const int n_shared = shared_expert_count(m, layer);
      const double g = shared_gate(f, x);
      for (int j = 0; j < n_shared; ++j) tg.push_back({shared_expert_id(j), g, 1.0 / (g * n_shared)});
      break;
    }
  }
  for (const TargetShare& s : tg)
    require_input(std::isfinite(s.share) && s.weight > 0, "routing weight of the target is zero");
  return tg;
}

Eigen::MatrixXd moment_matrix(const EditOptions& opt, int layer, int expert, int I, int n_shared, int64_t* count) {
  auto mom = opt.moments(layer, expert);
  require_input(mom && mom->mom2.rows() == I && mom->mom2.cols() == I,
                "key statistics for layer " + std::to_string(layer) + " expert " + expert_label(expert, n_shared) +
                    " are missing or have the wrong size");
  if (count) *count = mom->count;
  Eigen::MatrixXd C = mom->mom2.cast<double>();
  if (opt.ridge > 0) C.diagonal().array() += opt.ridge * std::max(C.diagonal().mean(), 1e-30);
  return C;
}

DownMap save_down(Model& m, int layer, int expert, std::vector<float>* original) {
  DownMap Wd = expert_down(m, layer, expert);
  original->resize(size_t(Wd.rows()) * size_t(Wd.cols()));
  Eigen::Map<MatR>(original->data(), Wd.rows(), Wd.cols()) = Wd;
  return Wd;
}

void restore_down(Model& m, int layer, int expert, const std::vector<float>& original) {
  if (original.empty()) return;  // not applied (an edit that failed part-way)
  DownMap dn = expert_down(m, layer, expert);
  dn = CMapMatR(original.data(), dn.rows(), dn.cols());
  down_weight(m.mutable_weights(), layer, expert).drop_copy_if_unchanged();  // back to the checkpoint's own bytes
}

}  // namespace rome_detail

// ---- the edit -------------------------------------------------------------------------------------------------------

EditResult apply_edit_ids(Model& m, const EditIds& ids, const EditOptions& opt) {
  const auto t0 = Clock::now();
  const ModelConfig& c = m.config();
  EditResult res;
  res.target = opt.target;
  int layer = opt.layer;
  if (opt.target.kind == TargetKind::Expert) {
    require_input(layer < 0 || layer == opt.target.layer,
                  "--layer " + std::to_string(layer) + " disagrees with --target " + target_name(opt.target));
    layer = opt.target.layer;
  }
  require_input(layer >= 0, "no layer to edit: give --layer L (or a target LAYER:EXPERT)");
  check_layer(c, layer);
  res.layer = layer;
  const FFNWeights& f0 = m.weights().layers[size_t(layer)].ffn;
  if (opt.target.kind == TargetKind::Expert)
    require_input(opt.target.expert < c.n_experts, "expert " + std::to_string(opt.target.expert) +
                                                       " does not exist: layer " + std::to_string(layer) + " has " +
                                                       std::to_string(c.n_experts) + " experts");
  if (opt.target.kind == TargetKind::Shared)
    require_input(f0.has_shared, "--target shared: this model has no shared expert (model_type " + c.model_type + ")");
  const int n_shared = shared_expert_count(m, layer);
  res.n_shared_experts = n_shared;
  require_input(!opt.mom2_adjustment || bool(opt.moments), "key statistics are required (mom2 adjustment is on)");
  validate(ids, c);

  // Keys and routing at L for every template's subject token (bare prompt first).
  Hooks h;
  auto ffn_in = h.capture(hook_names::ffn_in(layer));
  ForwardOptions fo;
  fo.hooks = &h;
  fo.stop_after_layer = layer;
  ForwardOutput f = m.forward(ids.prompts, fo);
  const auto off = offsets(ids.prompts);
  std::vector<int> rows;
  for (size_t i = 0; i < ids.prompts.size(); ++i) rows.push_back(off[i] + ids.subject_last[i]);
  MatR a2(int(rows.size()), c.hidden);  // the FFN inputs at the subject tokens
  for (size_t i = 0; i < rows.size(); ++i) a2.row(int(i)) = ffn_in->value.row(rows[i]);
  const LayerRouting& rt = f.routing[size_t(layer)];
  const int K = c.top_k;
  for (int j = 0; j < K; ++j) {
    res.routed.push_back(rt.ids(rows[0], j));
    res.routed_weights.push_back(rt.weights(rows[0], j));
  }

  // Targets and their residual shares (r = share·δ).
  const std::vector<TargetShare> tg = target_shares(m, layer, opt.target, res.routed, res.routed_weights, a2.row(0));

  // Keys and C⁻¹k* per target expert (ROME's compute_u), before v*: the exact objective needs them.
  const FFNWeights& fw = m.weights().layers[size_t(layer)].ffn;
  auto expert_keys = [&](int expert, const MatR& x) { return target_keys(m, layer, expert, x); };  // [rows, I]
  for (const TargetShare& t : tg) {
    const MatR keys = expert_keys(t.expert, a2);  // [templates, I]
    const int I = int(keys.cols());
    ExpertUpdate up;
    up.layer = layer;
    up.expert = t.expert;
    up.weight = t.weight;
    const Eigen::VectorXd k = keys.row(0).transpose().cast<double>();
    const Eigen::VectorXd kstar = keys.cast<double>().colwise().mean().transpose();
    Eigen::VectorXd ck;
    if (opt.mom2_adjustment) {
      const Eigen::MatrixXd C = moment_matrix(opt, layer, t.expert, I, n_shared, &up.stats_count);
      if (std::optional<Eigen::MatrixXd> x = solve_spd(m.backend(), C, kstar)) {  // Cholesky where the model runs
        ck = x->col(0);
      } else {
        Eigen::LDLT<Eigen::MatrixXd> ldlt(C);
        const auto d = ldlt.vectorD();
        require_input(ldlt.info() == Eigen::Success && d.minCoeff() > 1e-12 * std::max(d.maxCoeff(), 1e-300),
                      "the key statistics of layer " + std::to_string(layer) + " expert " +
                          expert_label(t.expert, n_shared) + " are singular (" + std::to_string(up.stats_count) +
                          " tokens for a key of size " + std::to_string(I) + "): use a larger corpus or --ridge");
        ck = ldlt.solve(kstar);
      }
    } else {
      ck = kstar;
    }
    const double denom = ck.dot(opt.keys == KeyMode::Rome ? k : kstar);
    if (!(std::abs(denom) > 0) || !std::isfinite(denom) || !ck.allFinite())
      throw std::runtime_error("rank-one update: (C⁻¹k*)ᵀk is zero or not finite for expert " +
                               expert_label(t.expert, n_shared));
    up.u = (ck / denom).cast<float>();
    up.k = (opt.keys == KeyMode::Rome ? k : kstar).cast<float>();
    up.k_star = kstar.cast<float>();
    res.updates.push_back(std::move(up));
  }

  // v*; the exact objective spreads δ as the updates will: s_t = Σ_j gate_j(t)·share_j·u_jᵀk_j(t).
  const DeltaSpread spread = [&](const MatR& x, const LayerRouting& routing) {
    VecF s = VecF::Zero(x.rows());
    for (size_t j = 0; j < tg.size(); ++j) {
      const VecF uk = expert_keys(tg[j].expert, x) * res.updates[j].u;  // [rows]
      for (int i = 0; i < int(x.rows()); ++i) {
        double gate = 0;
        if (is_shared_expert(tg[j].expert)) {
          gate = shared_gate(fw, x.row(i));
        } else {
          for (int q = 0; q < K; ++q)
            if (routing.ids(i, q) == tg[j].expert) gate = routing.weights(i, q);
        }
        s[i] += float(gate * tg[j].share * double(uk[i]));
      }
    }
    return s;
  };
  const auto tv = Clock::now();
  res.vstar = compute_vstar(m, layer, ids, opt.v, spread);
  res.vstar_seconds = since(tv);

  // Rank-one updates: ΔW = r·uᵀ, r = share·δ.
  try {  // all or nothing: a failing target reverts the ones already applied
    for (size_t j = 0; j < tg.size(); ++j) {
      ExpertUpdate& up = res.updates[j];
      up.r = (res.vstar.delta.cast<double>() * tg[j].share).cast<float>();
      DownMap Wd = save_down(m, layer, up.expert, &up.original);
      Wd.noalias() += up.r * up.u.transpose();
    }
  } catch (...) {
    revert(m, res);
    throw;
  }

  // Which templates route through the edited experts.
  for (size_t i = 0; i < rows.size(); ++i) {
    int hits = 0;
    for (const TargetShare& t : tg)
      if (is_shared_expert(t.expert))
        ++hits;
      else
        for (int j = 0; j < K; ++j) hits += rt.ids(rows[i], j) == t.expert;
    res.template_hits.push_back(hits);
    res.template_route_share += hits > 0 ? 1.0 : 0.0;
  }
  res.template_route_share /= double(rows.size());
  res.seconds = since(t0);
  return res;
}

DownMap expert_down(Model& m, int layer, int expert) {
  Weight& w = down_weight(m.mutable_weights(), layer, expert);
  const auto [b, e] = is_shared_expert(expert) ? shared_columns(m, layer, expert)
                                               : std::pair<int, int>{0, int(w.cols())};
  float* data = w.mutable_f32();
  // The caller writes through the map before the next forward, and restore_down may free the copy: a device must
  // upload these bytes again, not run on a copy of what was here before (or of a freed copy at a reused address).
  m.forget_device_copies(data);
  return DownMap(data + b, w.rows(), e - b, Eigen::OuterStride<>(w.cols()));
}

void set_expert_down(Model& m, int layer, int expert, const std::vector<float>& values) {
  restore_down(m, layer, expert, values);
}

void revert(Model& m, const EditResult& r) {
  for (auto it = r.updates.rbegin(); it != r.updates.rend(); ++it) restore_down(m, r.layer, it->expert, it->original);
}

void revert_all(Model& m, const std::vector<EditResult>& edits) {
  for (auto it = edits.rbegin(); it != edits.rend(); ++it) revert(m, *it);
}

std::vector<std::pair<int, int>> edited_experts(const EditResult& edit) {
  return edited_experts(std::span<const EditResult>(&edit, 1));
}

std::vector<std::pair<int, int>> edited_experts(std::span<const EditResult> edits) {
  std::set<std::pair<int, int>> s;
  for (const auto& e : edits)
    for (const auto& u : e.updates) s.insert({u.layer, u.expert});
  return {s.begin(), s.end()};
}

}  // namespace moedit
