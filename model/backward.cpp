// Backward passes and the taped block stack (see model/backward.h).
#include "model/backward.h"

#include "model/block.h"
#include "model/weight_grads.h"

#include "io/errors.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <type_traits>

namespace moedit::grad {

template <class T>
void linear(const T* X, int n, int in, const Weight& W, T* Y, const float* b) {
  if constexpr (std::is_same_v<T, float>) {
    ops::linear(X, size_t(in), n, in, W.kernel(), int(W.rows()), Y, size_t(W.rows()), b);
  } else {
    const MatR w = W.to_f32();
    linear(X, n, in, w.data(), int(W.rows()), Y, b);
  }
}

template <class T>
void linear_backward(const T* dY, int n, int in, const Weight& W, T* dX, bool accumulate) {
  if (const float* p = W.f32()) return linear_backward(dY, n, in, p, int(W.rows()), dX, accumulate);
  const MatR w = W.to_f32();
  linear_backward(dY, n, in, w.data(), int(W.rows()), dX, accumulate);
}

// ---- blocks -----------------------------------------------------------------------------------------------------

template <class T>
int PrefixKV<T>::n_prefix(int l, int s) const {
  if (l >= int(k.size()) || s >= int(k[size_t(l)].size())) return 0;
  return int(k[size_t(l)][size_t(s)].rows());
}

namespace {

// ∂/∂(expert input) [n, H] (=) given ∂/∂(unweighted output) dy [n, H]. With g, adds the expert's weight gradients:
// down [H, I] += dyᵀ·key, gate‖up [2I, H] += dguᵀ·x, from its input rows x [n, H] and keys key [n, I].
template <class T>
MatT<T> expert_backward(const ExpertBank& b, int e, const MatT<T>& gu, const MatT<T>& dy,
                        typename WeightGrads<T>::Expert* g = nullptr, const MatT<T>* x = nullptr,
                        const MatT<T>* key = nullptr) {
  const int n = int(dy.rows());
  MatT<T> dkey(n, b.I), dgu(n, 2 * b.I), dx(n, b.H);
  linear_backward(dy.data(), n, b.I, b.down[size_t(e)], dkey.data(), false);
  swiglu_backward(gu.data(), dkey.data(), n, b.I, dgu.data());
  MatR gate_up(2 * b.I, b.H);  // [G; U]: one product over 2I, as the gradient was always summed
  gate_up << b.gate[size_t(e)].to_f32(), b.up[size_t(e)].to_f32();
  linear_backward(dgu.data(), n, b.H, gate_up.data(), 2 * b.I, dx.data(), false);
  if (g) {
    g->down.noalias() += dy.transpose() * *key;
    g->gate.noalias() += dgu.leftCols(b.I).transpose() * *x;
    g->up.noalias() += dgu.rightCols(b.I).transpose() * *x;
  }
  return dx;
}

}  // namespace

template <class T>
void block_forward(const Model& m, int l, MatT<T>& x, const TokenLayout& layout, const PrefixKV<T>* prefix,
                   BlockTape<T>& tp) {
  BlockIO<T> io;
  io.prefix = prefix;
  io.tape = &tp;
  run_block(m, l, x, layout, io);
}

template <class T>
void block_backward(const Model& m, int l, const BlockTape<T>& tp, MatT<T>& dx, WeightGrads<T>* grads) {
  const ModelConfig& c = m.config();
  const LayerWeights& L = m.weights().layers[size_t(l)];
  const AttnWeights& at = L.attn;
  const FFNWeights& f = L.ffn;
  const int N = int(dx.rows()), H = c.hidden, Hq = c.n_heads;
  const T rm = T(c.residual_multiplier);

  // ---- FFN ----
  MatT<T> dm = dx * rm;  // ∂/∂(FFN output)
  MatT<T> da2 = MatT<T>::Zero(N, H);
  auto expert_grads = [&](int e) { return grads ? grads->expert(l, e) : nullptr; };
  if (!f.moe) {
    da2 = expert_backward(f.experts, 0, tp.gu[0], dm, expert_grads(0), &tp.a2, &tp.key[0]);
  } else {
    const int E = c.n_experts, kk = c.top_k;
    MatT<T> dw = MatT<T>::Zero(N, kk);
    std::vector<MatT<T>> dxe(static_cast<size_t>(E));
    const bool par = !omp_in_parallel() && double(N) * kk * 6.0 * H * f.experts.I > 2e6;
#pragma omp parallel for schedule(dynamic) num_threads(ops::num_threads()) if (par)
    for (int e = 0; e < E; ++e) {
      const auto& ts = tp.tok[size_t(e)];
      if (ts.empty()) continue;
      const int n = int(ts.size());
      MatT<T> dy(n, H);
      for (int j = 0; j < n; ++j) {
        const int t = ts[size_t(j)], s = tp.slot[size_t(e)][size_t(j)];
        dy.row(j) = dm.row(t) * tp.w(t, s);
        dw(t, s) = dm.row(t).dot(tp.y[size_t(e)].row(j));  // (t, s) pairs are distinct across experts
      }
      typename WeightGrads<T>::Expert* g = expert_grads(e);
      MatT<T> xe;  // the expert's input rows [n, H], for its weight gradients
      if (g) {
        xe.resize(n, H);
        for (int j = 0; j < n; ++j) xe.row(j) = tp.a2.row(ts[size_t(j)]);
      }
      dxe[size_t(e)] = expert_backward(f.experts, e, tp.gu[size_t(e)], dy, g, &xe, &tp.key[size_t(e)]);
    }
    for (int e = 0; e < E; ++e)
      for (size_t j = 0; j < tp.tok[size_t(e)].size(); ++j) da2.row(tp.tok[size_t(e)][j]) += dxe[size_t(e)].row(int(j));
    MatT<T> dz(N, E);
    for (int t = 0; t < N; ++t)
      ops::route_row_backward(m.route_spec(), tp.z.row(t).data(), tp.ids.row(t).data(), dw.row(t).data(),
                              dz.row(t).data());
    if (const RouterEdit* re = m.router_edit(); re && re->touches(l)) re->backward(l, tp.z_raw, dz);  // → ∂/∂(raw z)
    if (MatT<T>* g = grads ? grads->router(l) : nullptr) g->noalias() += dz.transpose() * tp.a2;  // [E, H]
    linear_backward(dz.data(), N, H, f.router.data(), E, da2.data(), true);
    if (f.has_shared) {
      MatT<T> dys = dm;
      if (f.shared_gate.size()) {
        VecT<T> dlogit(N);
        for (int t = 0; t < N; ++t) {
          const T s = sigmoid_t(tp.s_logit[t]);
          dlogit[t] = dm.row(t).dot(tp.s_y.row(t)) * s * (T(1) - s);
          dys.row(t) *= s;
        }
        da2 += dlogit * f.shared_gate.template cast<T>().transpose();
        if (MatT<T>* g = grads ? grads->shared_gate(l) : nullptr) g->noalias() += dlogit.transpose() * tp.a2;  // [1, H]
      }
      da2 += expert_backward(f.shared, 0, tp.s_gu, dys, expert_grads(kSharedBlock), &tp.a2, &tp.s_key);
    }
  }
  // dx (= ∂/∂x_mid through the residual) += norm backward
  rmsnorm_backward(tp.x_mid.data(), L.ln_post.data(), da2.data(), dx.data(), N, H, c.rms_eps, true);

  // ---- attention ----
  const ops::AttnShape shape = attn_shape(c);
  const int qw = Hq * shape.Dk, kw = shape.Hkv * shape.Dk, vw = shape.Hkv * shape.Dv, ow = Hq * shape.Dv;
  MatT<T> datt = dx * rm;
  MatT<T> dout(N, ow);
  linear_backward(datt.data(), N, ow, at.wo, dout.data(), false);
  MatT<T> dq(N, qw), dk(N, kw), dv(N, vw);
  for (size_t g = 0; g < tp.seg_begin.size(); ++g) {
    const int b = tp.seg_begin[g], e = tp.seg_end[g], n = e - b;
    const int nk = int(tp.kf[g].rows());
    MatT<T> dkf = MatT<T>::Zero(nk, kw), dvf = MatT<T>::Zero(nk, vw);
    attention_backward(tp.q.data() + size_t(b) * qw, n, qw, tp.kf[g].data(), kw, tp.vf[g].data(), vw, nk, shape,
                       tp.probs[g].data(), dout.data() + size_t(b) * ow, ow, dq.data() + size_t(b) * qw, dkf.data(),
                       dvf.data());
    dk.middleRows(b, n) = dkf.bottomRows(n);  // the prefix's K/V are constants
    dv.middleRows(b, n) = dvf.bottomRows(n);
  }
  // The layout's positions are needed for the RoPE transpose: recover them from the tape (first position of a
  // segment = its prefix length; positions are consecutive).
  std::vector<int> pos(static_cast<size_t>(N));
  for (size_t g = 0; g < tp.seg_begin.size(); ++g) {
    const int b = tp.seg_begin[g], e = tp.seg_end[g], np = int(tp.kf[g].rows()) - (e - b);
    for (int r = b; r < e; ++r) pos[size_t(r)] = np + (r - b);
  }
  MatT<T> da1 = MatT<T>::Zero(N, H);
  if (c.arch->attention == AttentionKind::MLA)
    mla_backward(m, l, tp, pos.data(), dq, dk, dv, da1);
  else
    qkv_backward(m, l, tp, pos.data(), dq, dk, dv, da1);
  rmsnorm_backward(tp.x_in.data(), L.ln_in.data(), da1.data(), dx.data(), N, H, c.rms_eps, true);
}

// ---- the stack --------------------------------------------------------------------------------------------------

template <class T>
TapedStack<T>::TapedStack(const Model& m, int first_layer) : m_(m), first_(first_layer) {
  if (first_layer < 0 || first_layer > m.config().n_layers)
    throw std::logic_error("TapedStack: first layer out of range");
}

template <class T>
void TapedStack<T>::forward(MatT<T> x, const TokenLayout& layout, const PrefixKV<T>* prefix) {
  const int n = m_.config().n_layers;
  tapes_.assign(size_t(n - first_), {});
  for (int l = first_; l < n; ++l) block_forward(m_, l, x, layout, prefix, tapes_[size_t(l - first_)]);
  h_ = std::move(x);
  rows_.clear();
}

template <class T>
MatT<T> TapedStack<T>::logits(const std::vector<int>& rows) {
  const ModelConfig& c = m_.config();
  const int H = c.hidden, R = int(rows.size());
  rows_ = rows;
  MatT<T> xr(R, H);
  for (int i = 0; i < R; ++i) xr.row(i) = h_.row(rows[size_t(i)]);
  hn_.resize(R, H);
  rmsnorm(xr.data(), m_.weights().final_norm.data(), hn_.data(), R, H, c.rms_eps);
  const Weight& W = m_.weights().output_matrix();
  MatT<T> out(R, W.rows());
  linear(hn_.data(), R, H, W, out.data());
  if (c.logits_scaling != 1.f) out /= T(c.logits_scaling);
  return out;
}

template <class T>
MatT<T> TapedStack<T>::backward(const MatT<T>& dlogits, WeightGrads<T>* grads) const {
  return backward_to(dlogits, grads, first_);
}

template <class T>
void TapedStack<T>::backward_weights(const MatT<T>& dlogits, WeightGrads<T>& grads) const {
  backward_to(dlogits, &grads, std::max(first_, grads.lowest_layer()));
}

template <class T>
MatT<T> TapedStack<T>::backward_to(const MatT<T>& dlogits, WeightGrads<T>* grads, int stop) const {
  const ModelConfig& c = m_.config();
  if (grads && grads->lowest_layer() < first_)
    throw std::logic_error("TapedStack::backward: a selected parameter lies below the stack's first layer");
  const int H = c.hidden, R = int(rows_.size());
  if (dlogits.rows() != R) throw std::logic_error("TapedStack::backward: dlogits rows differ from logits()");
  const Weight& W = m_.weights().output_matrix();
  MatT<T> dl = dlogits;
  if (c.logits_scaling != 1.f) dl /= T(c.logits_scaling);
  MatT<T> dhn(R, H);
  linear_backward(dl.data(), R, H, W, dhn.data(), false);
  MatT<T> xr(R, H), dxr(R, H);
  for (int i = 0; i < R; ++i) xr.row(i) = h_.row(rows_[size_t(i)]);
  rmsnorm_backward(xr.data(), m_.weights().final_norm.data(), dhn.data(), dxr.data(), R, H, c.rms_eps, false);
  MatT<T> dx = MatT<T>::Zero(h_.rows(), H);
  for (int i = 0; i < R; ++i) dx.row(rows_[size_t(i)]) += dxr.row(i);
  for (int l = c.n_layers - 1; l >= stop; --l) block_backward(m_, l, tapes_[size_t(l - first_)], dx, grads);
  return dx;
}

template <class T>
PrefixKV<T> TapedStack<T>::kv() const {
  return prefix_of<T>(m_.config().n_layers, first_, tapes_, [](const MatT<T>& rows) { return rows; });
}

// ---- instantiations ---------------------------------------------------------------------------------------------

#define MOEDIT_GRAD_INSTANTIATE(T)                                                                                  \
  template void linear<T>(const T*, int, int, const Weight&, T*, const float*);                                   \
  template void linear_backward<T>(const T*, int, int, const Weight&, T*, bool);                                  \
  template struct PrefixKV<T>;                                                                                    \
  template void block_forward<T>(const Model&, int, MatT<T>&, const TokenLayout&, const PrefixKV<T>*,             \
                                 BlockTape<T>&);                                                                  \
  template void block_backward<T>(const Model&, int, const BlockTape<T>&, MatT<T>&, WeightGrads<T>*);             \
  template class TapedStack<T>;

MOEDIT_GRAD_INSTANTIATE(float)
MOEDIT_GRAD_INSTANTIATE(double)

}  // namespace moedit::grad
