// The block backward over the backend's ops and its stack (see model/seam_backward.h). The math is model/backward.cpp's
// (and backward_qkv.cpp's), op for op; here each op is the backend's.
#include "model/seam_backward.h"

#include <stdexcept>

#include "model/block.h"

namespace moedit::grad {

namespace {

using Rows = Act<float>;

// A zero activation.
Rows zeros(const Ops<float>& op, int rows, int cols) {
  Rows r = op.act(rows, cols);
  op.be.fill(r.data(), r.size(), 0.f);
  return r;
}

// Host rows in the backend's memory, and back.
Rows upload(const Ops<float>& op, const MatR& h) {
  Rows r = op.act(int(h.rows()), int(h.cols()));
  op.be.to_device(r.data(), h.data(), sizeof(float) * r.size());
  return r;
}

// An fp32 host matrix [out, in] (router, shared gate) as a weight view in the backend's memory.
ops::WeightView small(const Ops<float>& op, const float* host, int out, int in) {
  return ops::WeightView(op.on(host, size_t(out) * size_t(in)), size_t(in));
}

// The experts of a bank as views in the backend's memory (e ∈ [0, E)).
struct BankView {
  std::vector<ops::WeightView> v;
  ExpertsView ex;
  BankView(const Ops<float>& op, const ExpertBank& b) : v(3 * size_t(b.E)) {
    for (int e = 0; e < b.E; ++e) {
      v[size_t(e)] = b.gate[size_t(e)].on(op.be);
      v[size_t(b.E + e)] = b.up[size_t(e)].on(op.be);
      v[size_t(2 * b.E + e)] = b.down[size_t(e)].on(op.be);
    }
    ex = {b.E, b.I, b.H, v.data(), v.data() + b.E, v.data() + 2 * b.E};
  }
};

// da [N, H] (= or +=) the backward of a one-expert bank (dense FFN, shared experts) applied to every row of a: the
// routed experts' backward with every token on expert 0 at weight 1 (exactly the expert's own backward).
void bank_backward(const Ops<float>& op, const ExpertBank& b, const Rows& a, const Rows& dy, const Rows& da,
                   bool accumulate) {
  const int N = a.rows;
  const BankView bank(op, b);
  const std::vector<int> zero_ids(size_t(N), 0);
  Buf ids(op.be, sizeof(int) * size_t(N));
  op.be.to_device(ids.as<int>(), zero_ids.data(), sizeof(int) * size_t(N));
  Rows w = op.act(N, 1), dw = op.act(N, 1);
  op.be.fill(w.data(), w.size(), 1.f);
  op.be.moe_experts_backward(a.data(), N, bank.ex, ids.as<int>(), w.data(), 1, dy.data(), da.data(), dw.data(),
                             accumulate);
}

// RoPE's backward in place: the rotation at the negated positions (npos, in the backend's memory).
void rope_backward(const Ops<float>& op, float* d, int rows, int row_stride, int heads, int head_stride, int rot,
                   const int* npos) {
  op.rope(d, rows, row_stride, heads, head_stride, rot, npos);
}

// ---- attention projections (model/backward_qkv.cpp's math) --------------------------------------------------------

// Standard attention: dq, dk, dv after RoPE (modified) → da1 [N, H] (=).
void qkv_backward(const Ops<float>& op, int l, const SeamTape& tp, const int* npos, Rows& dq, Rows& dk, Rows& dv,
                  const Rows& da1) {
  const ModelConfig& c = op.m.config();
  const AttnWeights& at = op.m.weights().layers[size_t(l)].attn;
  const Backend& be = op.be;
  const int N = dq.rows, H = c.hidden, D = c.head_dim, Hq = c.n_heads, Hkv = c.n_kv_heads;
  rope_backward(op, dq.data(), N, Hq * D, Hq, D, D, npos);
  rope_backward(op, dk.data(), N, Hkv * D, Hkv, D, D, npos);
  if (c.clip_qkv > 0.f) {
    be.clamp_backward(dq.data(), tp.q_pre.data(), dq.size(), c.clip_qkv);
    be.clamp_backward(dk.data(), tp.k_pre.data(), dk.size(), c.clip_qkv);
    be.clamp_backward(dv.data(), tp.v_pre.data(), dv.size(), c.clip_qkv);
  }
  if (c.arch->qk_norm != QKNorm::None) {
    // PerHead: every head's D values normalised with the shared [D] weight; WholeProjection: the whole row.
    const bool per_head = c.arch->qk_norm == QKNorm::PerHead;
    Rows dqr = op.act(N, Hq * D), dkr = op.act(N, Hkv * D);
    be.rmsnorm_backward(tp.q_raw.data(), op.on(at.q_norm), dq.data(), dqr.data(), per_head ? N * Hq : N,
                        per_head ? D : Hq * D, c.rms_eps, false);
    be.rmsnorm_backward(tp.k_raw.data(), op.on(at.k_norm), dk.data(), dkr.data(), per_head ? N * Hkv : N,
                        per_head ? D : Hkv * D, c.rms_eps, false);
    dq = std::move(dqr);
    dk = std::move(dkr);
  }
  be.linear_backward(dq.data(), size_t(dq.cols), N, dq.cols, at.wq.on(be), H, da1.data(), size_t(H), false);
  be.linear_backward(dk.data(), size_t(dk.cols), N, dk.cols, at.wk.on(be), H, da1.data(), size_t(H), true);
  be.linear_backward(dv.data(), size_t(dv.cols), N, dv.cols, at.wv.on(be), H, da1.data(), size_t(H), true);
}

// Multi-head latent attention: dq (modified), dk, dv after RoPE → da1 [N, H] (=).
void mla_backward(const Ops<float>& op, int l, const SeamTape& tp, const int* npos, Rows& dq, const Rows& dk,
                  const Rows& dv, const Rows& da1) {
  const ModelConfig& c = op.m.config();
  const AttnWeights& at = op.m.weights().layers[size_t(l)].attn;
  const Backend& be = op.be;
  const int N = dq.rows, H = c.hidden, Hq = c.n_heads, dn = c.qk_nope_dim, dr = c.qk_rope_dim, dv_ = c.v_head_dim,
            dqk = dn + dr, rkv = c.kv_lora_rank, rq = c.q_lora_rank;
  const size_t ldkv = size_t(Hq) * (dn + dv_), ldk = size_t(dk.cols), ldv = size_t(dv.cols);
  // k and v come from kv (k_nope, v per head) and the shared k_pe (summed over heads, in head order).
  Rows dkv = op.act(N, int(ldkv)), dkpe = zeros(op, N, dr), part = op.act(N, dr);
  for (int h = 0; h < Hq; ++h) {
    op.copy2d(dk.data() + size_t(h) * dqk, ldk, dkv.data() + size_t(h) * (dn + dv_), ldkv, N, dn);
    op.copy2d(dv.data() + size_t(h) * dv_, ldv, dkv.data() + size_t(h) * (dn + dv_) + dn, ldkv, N, dv_);
    op.copy2d(dk.data() + size_t(h) * dqk + dn, ldk, part.data(), size_t(dr), N, dr);
    op.add(dkpe, part);
  }
  rope_backward(op, dq.data() + dn, N, Hq * dqk, Hq, dqk, dr, npos);
  rope_backward(op, dkpe.data(), N, dr, 1, dr, dr, npos);
  Rows dlat = op.act(N, rkv), lat_raw = op.act(N, rkv), dlat_raw = op.act(N, rkv), dckv = op.act(N, rkv + dr);
  be.linear_backward(dkv.data(), ldkv, N, int(ldkv), at.wkv_b.on(be), rkv, dlat.data(), size_t(rkv), false);
  op.copy2d(tp.mla_ckv.data(), size_t(rkv + dr), lat_raw.data(), size_t(rkv), N, rkv);
  be.rmsnorm_backward(lat_raw.data(), op.on(at.kv_a_norm), dlat.data(), dlat_raw.data(), N, rkv, kMlaLatentEps,
                      false);
  op.copy2d(dlat_raw.data(), size_t(rkv), dckv.data(), size_t(rkv + dr), N, rkv);
  op.copy2d(dkpe.data(), size_t(dr), dckv.data() + rkv, size_t(rkv + dr), N, dr);
  be.linear_backward(dckv.data(), size_t(rkv + dr), N, rkv + dr, at.wkv_a.on(be), H, da1.data(), size_t(H), false);
  if (rq) {
    Rows dqan = op.act(N, rq), dqa = op.act(N, rq);
    be.linear_backward(dq.data(), size_t(dq.cols), N, dq.cols, at.wq_b.on(be), rq, dqan.data(), size_t(rq), false);
    be.rmsnorm_backward(tp.mla_qa.data(), op.on(at.q_a_norm), dqan.data(), dqa.data(), N, rq, kMlaLatentEps, false);
    be.linear_backward(dqa.data(), size_t(rq), N, rq, at.wq_a.on(be), H, da1.data(), size_t(H), true);
  } else {
    be.linear_backward(dq.data(), size_t(dq.cols), N, dq.cols, at.wq.on(be), H, da1.data(), size_t(H), true);
  }
}

// ---- the FFN (model/backward.cpp's math) ----------------------------------------------------------------------------

// ∂/∂(FFN input) da2 [N, H] (=) from ∂/∂(FFN output) dm [N, H].
void ffn_backward(const Ops<float>& op, int l, const SeamTape& tp, const Rows& dm, const Rows& da2) {
  const ModelConfig& c = op.m.config();
  const FFNWeights& f = op.m.weights().layers[size_t(l)].ffn;
  const Backend& be = op.be;
  const int N = dm.rows, H = c.hidden;
  if (!f.moe) return bank_backward(op, f.experts, tp.a2, dm, da2, false);
  const int E = c.n_experts, k = c.top_k;
  Rows dw = op.act(N, k), dz = op.act(N, E);
  be.moe_experts_backward(tp.a2.data(), N, BankView(op, f.experts).ex, tp.ids.as<int>(), tp.w.data(), k, dm.data(),
                          da2.data(), dw.data(), false);
  be.route_backward(tp.z.data(), N, op.m.route_spec(), tp.ids.as<int>(), dw.data(), dz.data());
  if (const RouterEdit* re = op.m.router_edit(); re && re->touches(l)) {  // → ∂/∂(raw z), on the host
    MatR dzh = op.host(dz);
    re->backward(l, op.host(tp.z_raw), dzh);
    be.to_device(dz.data(), dzh.data(), sizeof(float) * dz.size());
  }
  be.linear_backward(dz.data(), size_t(E), N, E, small(op, f.router.data(), E, H), H, da2.data(), size_t(H), true);
  if (!f.has_shared) return;
  if (!f.shared_gate.size()) return bank_backward(op, f.shared, tp.a2, dm, da2, true);
  Rows ds = op.act(N, 1), dys = op.copy(dm);  // ∂/∂(gate logit); ∂/∂(shared output before its gate)
  be.sigmoid_gate_backward(dm.data(), tp.s_y.data(), tp.s_gate.data(), N, H, ds.data());
  be.scale_rows(dys.data(), N, H, tp.s_gate.data());
  be.linear_backward(ds.data(), 1, N, 1, small(op, f.shared_gate.data(), 1, H), H, da2.data(), size_t(H), true);
  bank_backward(op, f.shared, tp.a2, dys, da2, true);
}

}  // namespace

void seam_block_forward(const Model& m, int l, MatR& x, const TokenLayout& layout, const PrefixKV<float>* prefix,
                        SeamTape& tape) {
  BlockIO<float> io;
  io.prefix = prefix;
  io.seam = &tape;
  run_block(m, l, x, layout, io);
}

void seam_block_backward(const Model& m, int l, const SeamTape& tp, MatR& dx_host) {
  const Ops<float> op{m, m.backend()};
  const Backend& be = op.be;
  const ModelConfig& c = m.config();
  const LayerWeights& L = m.weights().layers[size_t(l)];
  const int N = int(dx_host.rows()), H = c.hidden, Hq = c.n_heads;
  if (N != tp.x_in.rows) throw std::logic_error("seam_block_backward: rows differ from the tape's");
  const float rm = c.residual_multiplier;
  Rows dx = upload(op, dx_host);

  // ---- FFN: dx += norm backward of ∂/∂(FFN input) ----
  Rows dm = op.copy(dx), da2 = op.act(N, H);
  if (rm != 1.f) op.scale(dm, rm);
  ffn_backward(op, l, tp, dm, da2);
  be.rmsnorm_backward(tp.x_mid.data(), op.on(L.ln_post), da2.data(), dx.data(), N, H, c.rms_eps, true);

  // ---- attention ----
  const ops::AttnShape shape = attn_shape(c);
  const int qw = tp.q.cols, kw = tp.kf.empty() ? 0 : tp.kf[0].cols, vw = tp.vf.empty() ? 0 : tp.vf[0].cols,
            ow = Hq * shape.Dv;
  Rows datt = op.copy(dx), dout = op.act(N, ow);
  if (rm != 1.f) op.scale(datt, rm);
  be.linear_backward(datt.data(), size_t(H), N, H, L.attn.wo.on(be), ow, dout.data(), size_t(ow), false);
  Rows dq = op.act(N, qw), dk = op.act(N, kw), dv = op.act(N, vw);
  for (size_t g = 0; g < tp.seg_begin.size(); ++g) {
    const int b = tp.seg_begin[g], n = tp.seg_end[g] - b, nk = tp.kf[g].rows, np = nk - n;
    Rows dkf = zeros(op, nk, kw), dvf = zeros(op, nk, vw);
    be.attention_backward(tp.q.row(b), n, qw, np, tp.kf[g].data(), kw, tp.vf[g].data(), vw, nk, shape, dout.row(b),
                          ow, dq.row(b), dkf.data(), dvf.data());
    op.copy2d(dkf.row(np), size_t(kw), dk.row(b), size_t(kw), n, kw);  // the prefix's K/V are constants
    op.copy2d(dvf.row(np), size_t(vw), dv.row(b), size_t(vw), n, vw);
  }
  std::vector<int> neg(tp.pos.size());
  for (size_t i = 0; i < neg.size(); ++i) neg[i] = -tp.pos[i];
  Buf npos(be, sizeof(int) * neg.size());
  be.to_device(npos.as<int>(), neg.data(), sizeof(int) * neg.size());
  Rows da1 = op.act(N, H);
  if (c.arch->attention == AttentionKind::MLA)
    mla_backward(op, l, tp, npos.as<int>(), dq, dk, dv, da1);
  else
    qkv_backward(op, l, tp, npos.as<int>(), dq, dk, dv, da1);
  be.rmsnorm_backward(tp.x_in.data(), op.on(L.ln_in), da1.data(), dx.data(), N, H, c.rms_eps, true);
  be.to_host(dx_host.data(), dx.data(), sizeof(float) * dx.size());
}

// ---- the stack --------------------------------------------------------------------------------------------------

SeamStack::SeamStack(const Model& m, int first_layer) : m_(m), first_(first_layer) {
  if (first_layer < 0 || first_layer > m.config().n_layers)
    throw std::logic_error("SeamStack: first layer out of range");
}

void SeamStack::forward(MatR x, const TokenLayout& layout, const PrefixKV<float>* prefix) {
  const int n = m_.config().n_layers;
  tapes_.clear();
  tapes_.resize(size_t(n - first_));
  for (int l = first_; l < n; ++l) seam_block_forward(m_, l, x, layout, prefix, tapes_[size_t(l - first_)]);
  h_ = std::move(x);
  rows_.clear();
}

MatR SeamStack::logits(const std::vector<int>& rows) {
  const Ops<float> op{m_, m_.backend()};
  const ModelConfig& c = m_.config();
  const int H = c.hidden, R = int(rows.size());
  rows_ = rows;
  MatR xr(R, H);
  for (int i = 0; i < R; ++i) xr.row(i) = h_.row(rows[size_t(i)]);
  xr_ = upload(op, xr);
  const Weight& W = m_.weights().output_matrix();
  Rows hn = op.act(R, H), out = op.act(R, int(W.rows()));
  op.rmsnorm(xr_.data(), m_.weights().final_norm, hn.data(), R, H, c.rms_eps);
  op.linear(hn.data(), R, H, W, out.data());
  if (c.logits_scaling != 1.f) op.scale(out, 1.f / c.logits_scaling);
  return op.host(out);
}

MatR SeamStack::backward(const MatR& dlogits) const {
  const Ops<float> op{m_, m_.backend()};
  const ModelConfig& c = m_.config();
  const int H = c.hidden, R = int(rows_.size());
  if (dlogits.rows() != R) throw std::logic_error("SeamStack::backward: dlogits rows differ from logits()");
  const Weight& W = m_.weights().output_matrix();
  const int V = int(W.rows());
  Rows dl = upload(op, dlogits), dhn = op.act(R, H), dxr = op.act(R, H);
  if (c.logits_scaling != 1.f) op.scale(dl, 1.f / c.logits_scaling);
  op.be.linear_backward(dl.data(), size_t(V), R, V, W.on(op.be), H, dhn.data(), size_t(H), false);
  op.be.rmsnorm_backward(xr_.data(), op.on(m_.weights().final_norm), dhn.data(), dxr.data(), R, H, c.rms_eps, false);
  const MatR dxr_h = op.host(dxr);
  MatR dx = MatR::Zero(h_.rows(), H);
  for (int i = 0; i < R; ++i) dx.row(rows_[size_t(i)]) += dxr_h.row(i);
  for (int l = c.n_layers - 1; l >= first_; --l) seam_block_backward(m_, l, tapes_[size_t(l - first_)], dx);
  return dx;
}

PrefixKV<float> SeamStack::kv() const {
  const Ops<float> op{m_, m_.backend()};
  const int n = m_.config().n_layers;
  PrefixKV<float> p = prefix_of<float>(n, first_, tapes_, [&](const Rows& rows) { return op.host(rows); });
  auto dev = std::make_shared<DevicePrefix>();
  dev->k.resize(size_t(n));
  dev->v.resize(size_t(n));
  for (int l = first_; l < n; ++l) {
    const SeamTape& tp = tapes_[size_t(l - first_)];
    dev->k[size_t(l)].resize(p.k[size_t(l)].size());
    dev->v[size_t(l)].resize(p.v[size_t(l)].size());
    for (size_t g = 0; g < tp.seg_seq.size(); ++g) {
      dev->k[size_t(l)][size_t(tp.seg_seq[g])] = op.copy(tp.kf[g]);
      dev->v[size_t(l)][size_t(tp.seg_seq[g])] = op.copy(tp.vf[g]);
    }
  }
  p.dev = std::move(dev);
  return p;
}

}  // namespace moedit::grad
