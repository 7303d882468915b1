// The backward of the attention projections (see model/backward.h; the forward is model/block.cpp): q/k/v (+ bias,
// q/k-norm, clip_qkv, RoPE), and multi-head latent attention:
//
//   q    = (q_lora ? rmsnorm(a·Wq_aᵀ + b) · Wq_bᵀ : a·Wqᵀ)             [N, Hq·(dn + dr)]
//   ckv  = a·Wkv_aᵀ + b = [latent rkv ‖ k_pe dr]                       [N, rkv + dr]
//   kv   = rmsnorm(latent)·Wkv_bᵀ = per head [k_nope dn ‖ v dv]        [N, Hq·(dn + dv)]
//   RoPE on each query head's last dr dims and on k_pe (one head shared by all);
//   k    = per head [k_nope ‖ k_pe],  v = per head v.
#include "model/backward.h"

namespace moedit::grad {

template <class T>
void qkv_backward(const Model& m, int l, const BlockTape<T>& tp, const int* pos, MatT<T>& dq, MatT<T>& dk,
                  MatT<T>& dv, MatT<T>& da1) {
  const ModelConfig& c = m.config();
  const AttnWeights& at = m.weights().layers[size_t(l)].attn;
  const int N = int(dq.rows()), H = c.hidden, D = c.head_dim, Hq = c.n_heads, Hkv = c.n_kv_heads;
  rope(dq.data(), N, Hq * D, Hq, D, D, pos, m.inv_freq().data(), true, c.rope_attn_factor);
  rope(dk.data(), N, Hkv * D, Hkv, D, D, pos, m.inv_freq().data(), true, c.rope_attn_factor);
  if (c.clip_qkv > 0.f) {
    const T cl = T(c.clip_qkv);
    auto mask = [cl](MatT<T>& d, const MatT<T>& pre) {
      for (Eigen::Index i = 0; i < d.size(); ++i)
        if (pre.data()[i] < -cl || pre.data()[i] > cl) d.data()[i] = T(0);
    };
    mask(dq, tp.q_pre);
    mask(dk, tp.k_pre);
    mask(dv, tp.v_pre);
  }
  if (c.arch->qk_norm != QKNorm::None) {
    MatT<T> dqr(N, Hq * D), dkr(N, Hkv * D);
    if (c.arch->qk_norm == QKNorm::PerHead) {
      rmsnorm_backward(tp.q_raw.data(), at.q_norm.data(), dq.data(), dqr.data(), N * Hq, D, c.rms_eps, false);
      rmsnorm_backward(tp.k_raw.data(), at.k_norm.data(), dk.data(), dkr.data(), N * Hkv, D, c.rms_eps, false);
    } else {
      rmsnorm_backward(tp.q_raw.data(), at.q_norm.data(), dq.data(), dqr.data(), N, Hq * D, c.rms_eps, false);
      rmsnorm_backward(tp.k_raw.data(), at.k_norm.data(), dk.data(), dkr.data(), N, Hkv * D, c.rms_eps, false);
    }
    dq = std::move(dqr);
    dk = std::move(dkr);
  }
  linear_backward(dq.data(), N, H, at.wq, da1.data(), true);
  linear_backward(dk.data(), N, H, at.wk, da1.data(), true);
  linear_backward(dv.data(), N, H, at.wv, da1.data(), true);
}

template <class T>
void mla_backward(const Model& m, int l, const BlockTape<T>& tp, const int* pos, MatT<T>& dq, const MatT<T>& dk,
                  const MatT<T>& dv, MatT<T>& da1) {
  const ModelConfig& c = m.config();
  const AttnWeights& at = m.weights().layers[size_t(l)].attn;
  const int N = int(dq.rows()), H = c.hidden, Hq = c.n_heads, dn = c.qk_nope_dim, dr = c.qk_rope_dim,
            dv_ = c.v_head_dim, dqk = dn + dr, rkv = c.kv_lora_rank, rq = c.q_lora_rank;
  // k and v come from kv (k_nope, v per head) and the shared k_pe (summed over heads).
  MatT<T> dkv(N, Hq * (dn + dv_)), dkpe = MatT<T>::Zero(N, dr);
  for (int h = 0; h < Hq; ++h) {
    dkv.middleCols(h * (dn + dv_), dn) = dk.middleCols(h * dqk, dn);
    dkv.middleCols(h * (dn + dv_) + dn, dv_) = dv.middleCols(h * dv_, dv_);
    dkpe += dk.middleCols(h * dqk + dn, dr);
  }
  rope(dq.data() + dn, N, Hq * dqk, Hq, dqk, dr, pos, m.inv_freq().data(), true, c.rope_attn_factor);
  rope(dkpe.data(), N, dr, 1, dr, dr, pos, m.inv_freq().data(), true, c.rope_attn_factor);
  MatT<T> dlat(N, rkv), dckv(N, rkv + dr);
  linear_backward(dkv.data(), N, rkv, at.wkv_b, dlat.data(), false);
  const MatT<T> lat_raw = tp.mla_ckv.leftCols(rkv);
  MatT<T> dlat_raw(N, rkv);
  rmsnorm_backward(lat_raw.data(), at.kv_a_norm.data(), dlat.data(), dlat_raw.data(), N, rkv, kMlaLatentEps, false);
  dckv << dlat_raw, dkpe;
  linear_backward(dckv.data(), N, H, at.wkv_a, da1.data(), true);
  if (rq) {
    MatT<T> dqan(N, rq), dqa(N, rq);
    linear_backward(dq.data(), N, rq, at.wq_b, dqan.data(), false);
    rmsnorm_backward(tp.mla_qa.data(), at.q_a_norm.data(), dqan.data(), dqa.data(), N, rq, kMlaLatentEps, false);
    linear_backward(dqa.data(), N, H, at.wq_a, da1.data(), true);
  } else {
    linear_backward(dq.data(), N, H, at.wq, da1.data(), true);
  }
}

#define MOEDIT_QKV_INSTANTIATE(T)                                                                               \
  template void qkv_backward<T>(const Model&, int, const BlockTape<T>&, const int*, MatT<T>&, MatT<T>&, MatT<T>&, \
                                MatT<T>&);                                                                      \
  template void mla_backward<T>(const Model&, int, const BlockTape<T>&, const int*, MatT<T>&, const MatT<T>&,  \
                                const MatT<T>&, MatT<T>&);

MOEDIT_QKV_INSTANTIATE(float)
MOEDIT_QKV_INSTANTIATE(double)

}  // namespace moedit::grad
