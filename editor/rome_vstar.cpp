// ROME's v*: the residual δ added to the MoE output at the subject's last token that makes the model say the new
// target (NLL over the context templates + KL on the KL prompt + weight decay), optimized with Adam through the
// layers above the edited one (VStarProblem: loss and gradient; compute_vstar: the optimization).
#include "editor/rome.h"

#include <cmath>
#include <type_traits>

#include "editor/rome_internal.h"
#include "editor/router_guard.h"
#include "io/errors.h"
#include "model/seam_backward.h"

namespace moedit {

using namespace rome_detail;

// ---- v* -------------------------------------------------------------------------------------------------------------

namespace {
int first_above(const Model& m, int layer) {
  check_layer(m.config(), layer);
  return layer + 1;
}
}  // namespace

// Layers first.. with their backward: the backend's ops (fp32) on a device or when asked, else the taped stack.
template <class T>
struct VStarProblem<T>::Layers {
  std::unique_ptr<grad::TapedStack<T>> taped;
  std::unique_ptr<grad::SeamStack> seam;

  Layers(const Model& m, int first, bool backend_ops) {
    if constexpr (std::is_same_v<T, float>)
      if (backend_ops || !m.backend().host_memory()) {
        seam = std::make_unique<grad::SeamStack>(m, first);
        return;
      }
    taped = std::make_unique<grad::TapedStack<T>>(m, first);
  }
  void forward(MatT<T> x, const TokenLayout& layout, const grad::PrefixKV<T>* prefix = nullptr) {
    if constexpr (std::is_same_v<T, float>)
      if (seam) return seam->forward(std::move(x), layout, prefix);
    taped->forward(std::move(x), layout, prefix);
  }
  MatT<T> logits(const std::vector<int>& rows) {
    if constexpr (std::is_same_v<T, float>)
      if (seam) return seam->logits(rows);
    return taped->logits(rows);
  }
  MatT<T> backward(const MatT<T>& dlogits) const {
    if constexpr (std::is_same_v<T, float>)
      if (seam) return seam->backward(dlogits);
    return taped->backward(dlogits);
  }
  grad::PrefixKV<T> kv() const {
    if constexpr (std::is_same_v<T, float>)
      if (seam) return seam->kv();
    return taped->kv();
  }
};

template <class T>
VStarProblem<T>::VStarProblem(const Model& m, int layer, const EditIds& ids, const VStarOptions& opt,
                              const DeltaSpread& spread)
    : m_(m), layer_(layer), opt_(opt), ids_(ids), stack_(std::make_unique<Layers>(m, first_above(m, layer), opt.backend_ops)) {
  const ModelConfig& c = m.config();
  validate(ids, c);
  const int nt = int(ids.prompts.size()), nT = int(ids.target.size());
  std::vector<std::vector<int32_t>> seqs;
  std::vector<int> idx;
  for (int i = 0; i < nt; ++i) {
    auto s = ids.prompts[size_t(i)];
    s.insert(s.end(), ids.target.begin(), ids.target.end() - 1);
    seqs.push_back(std::move(s));
    idx.push_back(ids.subject_last[size_t(i)]);
  }
  seqs.push_back(ids.kl_prompt);
  idx.push_back(ids.kl_subject_last);
  const int ns = int(seqs.size());

  // Layers ≤ L once.
  const bool exact = opt.objective == VStarObjective::Exact;
  require_input(!exact || bool(spread), "the exact v* objective needs the edit's spread");
  Hooks h;
  auto mo = h.capture(hook_names::moe_out(layer));
  auto ffn_in = exact ? h.capture(hook_names::ffn_in(layer)) : nullptr;
  ForwardOptions fo;
  fo.hooks = &h;
  fo.stop_after_layer = layer;
  fo.record_routing = exact;
  ForwardOutput f = m.forward(seqs, fo);
  const auto off = offsets(seqs);
  target_init_ = mo->value.row(off[0] + idx[0]).transpose();
  ti_norm2_ = T(target_init_.squaredNorm());
  require_input(ti_norm2_ > 0, "the MoE output at the subject's last token is zero");

  // s_t per packed row: Rome 1 at each subject-last row; Exact the edit's spread.
  const int N = int(f.hidden.rows());
  VecF scale = VecF::Zero(N);
  if (exact) {
    scale = spread(ffn_in->value, f.routing[size_t(layer)]);
    require_input(scale.size() == N && scale.allFinite(), "the edit's spread must give one finite factor per token");
  } else {
    for (int s = 0; s < ns; ++s) scale[off[size_t(s)] + idx[size_t(s)]] = 1.f;
  }

  // Active rows: from each sequence's subject token, or its first token δ reaches if earlier (all tokens without
  // cache_prefix); the earlier tokens' K/V are constants.
  const size_t nsz = static_cast<size_t>(ns);
  std::vector<int> np(nsz), na(nsz), pre_rows, act_rows, act_off(nsz);
  for (int s = 0; s < ns; ++s) {
    int first = idx[size_t(s)];
    for (int p = 0; p < idx[size_t(s)]; ++p)
      if (scale[off[size_t(s)] + p] != 0.f) {
        first = p;
        break;
      }
    np[size_t(s)] = opt.cache_prefix ? first : 0;
    na[size_t(s)] = int(seqs[size_t(s)].size()) - np[size_t(s)];
    act_off[size_t(s)] = int(act_rows.size());
    for (int p = 0; p < int(seqs[size_t(s)].size()); ++p)
      (p < np[size_t(s)] ? pre_rows : act_rows).push_back(off[size_t(s)] + p);
  }
  auto gather = [&](const std::vector<int>& rows) {
    MatT<T> g(int(rows.size()), c.hidden);
    for (size_t i = 0; i < rows.size(); ++i) g.row(int(i)) = f.hidden.row(rows[i]).template cast<T>();
    return g;
  };
  base_ = gather(act_rows);
  lay_ = layout_from_lengths(na, np);
  if (!pre_rows.empty()) {
    Layers pre(m, layer + 1, opt.backend_ops);
    pre.forward(gather(pre_rows), layout_from_lengths(np, std::vector<int>(size_t(ns), 0)));
    prefix_ = pre.kv();
  }
  for (int i = 0; i < int(act_rows.size()); ++i)
    if (scale[act_rows[size_t(i)]] != 0.f) {
      delta_rows_.push_back(i);
      delta_scale_.push_back(T(scale[act_rows[size_t(i)]]));
    }
  auto act_row = [&](int s, int p) { return act_off[size_t(s)] + p - np[size_t(s)]; };
  tmpl_rows_.assign(size_t(nt), {});
  for (int i = 0; i < nt; ++i)
    for (int j = 0; j < nT; ++j) {
      const int pos = int(ids.prompts[size_t(i)].size()) - 1 + j;
      tmpl_rows_[size_t(i)].push_back(int(logit_rows_.size()));
      logit_rows_.push_back(act_row(i, pos));
    }
  logit_rows_.push_back(act_row(nt, idx[size_t(nt)]));  // the KL row: the KL prompt's subject token

  // p_0 at δ = 0.
  stack_->forward(base_, lay_, prefix_.k.empty() ? nullptr : &prefix_);
  MatT<T> lg = stack_->logits({logit_rows_.back()});
  kl_init_.resize(lg.cols());
  grad::log_softmax(lg.data(), int(lg.cols()), kl_init_.data());
}

template <class T>
VStarProblem<T>::~VStarProblem() = default;

template <class T>
int VStarProblem<T>::hidden() const {
  return m_.config().hidden;
}

template <class T>
int64_t VStarProblem<T>::tokens_per_step() const {
  return int64_t(base_.rows());
}

template <class T>
typename VStarProblem<T>::Value VStarProblem<T>::eval(const VecT<T>& delta) {
  const ModelConfig& c = m_.config();
  const T rm = T(c.residual_multiplier);
  delta_ = delta;
  MatT<T> x = base_;
  for (size_t i = 0; i < delta_rows_.size(); ++i) x.row(delta_rows_[i]) += (rm * delta_scale_[i]) * delta.transpose();
  stack_->forward(std::move(x), lay_, prefix_.k.empty() ? nullptr : &prefix_);
  const MatT<T> lg = stack_->logits(logit_rows_);
  const int V = int(lg.cols()), nt = int(tmpl_rows_.size()), nT = int(ids_.target.size());
  dlogits_ = MatT<T>::Zero(lg.rows(), V);
  Value out;
  VecT<T> ls(V);
  for (int i = 0; i < nt; ++i) {
    T s = 0;
    for (int j = 0; j < nT; ++j) {
      const int row = tmpl_rows_[size_t(i)][size_t(j)];
      const int t = ids_.target[size_t(j)];
      grad::log_softmax(lg.row(row).data(), V, ls.data());
      s -= ls[t];
      auto d = dlogits_.row(row);
      d = ls.array().exp().matrix().transpose() / T(nT * nt);
      d[t] -= T(1) / T(nT * nt);
    }
    out.nll += s / T(nT);
    out.p_target += std::exp(-s / T(nT));
  }
  out.nll /= T(nt);
  out.p_target /= T(nt);
  {
    const int row = int(lg.rows()) - 1;
    grad::log_softmax(lg.row(row).data(), V, ls.data());
    const VecT<T> p = ls.array().exp();
    const VecT<T> diff = ls - kl_init_;
    const T kl = p.dot(diff);
    out.kl = T(opt_.kl_factor) * kl;
    dlogits_.row(row) = (T(opt_.kl_factor) * p.cwiseProduct(diff.array().matrix() - VecT<T>::Constant(V, kl))).transpose();
  }
  out.wd = T(opt_.weight_decay) * delta.norm() / ti_norm2_;
  out.loss = out.nll + out.kl + out.wd;
  return out;
}

template <class T>
VecT<T> VStarProblem<T>::grad() const {
  const T rm = T(m_.config().residual_multiplier);
  const MatT<T> dx = stack_->backward(dlogits_);
  VecT<T> g = VecT<T>::Zero(delta_.size());
  for (size_t i = 0; i < delta_rows_.size(); ++i) g += (rm * delta_scale_[i]) * dx.row(delta_rows_[i]).transpose();
  const T n = delta_.norm();
  if (n > 0) g += T(opt_.weight_decay) / (n * ti_norm2_) * delta_;
  return g;
}

template class VStarProblem<float>;
template class VStarProblem<double>;

VStarResult compute_vstar(const Model& m, int layer, const EditIds& ids, const VStarOptions& opt,
                          const DeltaSpread& spread) {
  require_input(opt.steps >= 1, "--steps must be at least 1");
  VStarProblem<float> P(m, layer, ids, opt, spread);
  const int H = P.hidden();
  VStarResult r;
  r.target_init = P.target_init();
  r.tokens_per_step = P.tokens_per_step();
  Eigen::VectorXd delta = Eigen::VectorXd::Zero(H), m1 = delta, v1 = delta;
  const double b1 = 0.9, b2 = 0.999, eps = 1e-8;
  const double max_norm = opt.clamp_norm_factor * double(r.target_init.norm());
  const double lr = opt.relative_lr ? opt.lr * double(r.target_init.norm()) / std::sqrt(double(H)) : opt.lr;
  for (int it = 0; it < opt.steps; ++it) {
    const auto val = P.eval(delta.cast<float>());
    r.loss.push_back(val.loss);
    r.nll.push_back(val.nll);
    r.kl.push_back(val.kl);
    r.wd.push_back(val.wd);
    r.p_target.push_back(val.p_target);
    if (val.loss < opt.early_stop_loss || it == opt.steps - 1) break;
    const Eigen::VectorXd g = P.grad().cast<double>();
    const int t = ++r.updates;
    m1 = b1 * m1 + (1 - b1) * g;
    v1 = b2 * v1 + (1 - b2) * g.cwiseProduct(g);
    const double bc1 = 1 - std::pow(b1, t), bc2 = 1 - std::pow(b2, t);
    const Eigen::VectorXd denom = (v1.cwiseSqrt() / std::sqrt(bc2)).array() + eps;
    delta -= (lr / bc1) * m1.cwiseQuotient(denom);
    if (opt.exclude) remove_directions(*opt.exclude, delta);
    const double n = delta.norm();
    if (n > max_norm) delta *= max_norm / n;
  }
  r.delta = delta.cast<float>();
  return r;
}

}  // namespace moedit
