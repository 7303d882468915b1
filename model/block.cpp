// The one block forward (see model/block.h).
#include "model/block.h"

#include <omp.h>

#include <numeric>
#include <type_traits>

#include "model/block_ops.h"
#include "model/router.h"
#include "model/seam_backward.h"

namespace moedit {

namespace {

// A copy of an fp32 activation kept in the seam tape's `field` (double runs have no seam tape).
template <class T>
void keep(const Ops<T>& op, grad::SeamTape* st, Act<float> grad::SeamTape::*field, const Act<T>& a) {
  if constexpr (Ops<T>::f32)
    if (st) st->*field = op.copy(a);
}

// Hook `name` on an fp32 activation: in place on the host; through a host copy (down and back) on a device.
void run_hook(const Ops<float>& op, const Hooks* h, const std::string& name, const Act<float>& act, int l, int e,
              const TokenLayout& lay, const std::vector<int>* tokens = nullptr) {
  const HookContext ctx{name, l, e, lay, tokens};
  if (op.be.host_memory()) {
    MapMatR rows(act.data(), act.rows, act.cols);
    h->run(name, rows, ctx);
  } else if (h->has(name)) {
    MatR rows = op.host(act);
    h->run(name, rows, ctx);
    op.be.to_device(act.data(), rows.data(), sizeof(float) * act.size());
  }
}

// The model's standing router edit on layer l's logits z [N, E]: in place on the host; through a host copy on a
// device.
template <class T>
void edit_router_logits(const Ops<T>& op, const RouterEdit& re, int l, const Act<T>& z) {
  if (op.mem().host_memory()) {
    Eigen::Map<MatT<T>> rows(z.data(), z.rows, z.cols);
    re.apply(l, rows);
  } else {
    MatT<T> rows = op.host(z);
    re.apply(l, rows);
    op.mem().to_device(z.data(), rows.data(), sizeof(T) * z.size());
  }
}

// ---- attention ---------------------------------------------------------------------------------------------------

// q [N, Hq·Dk], k [N, Hkv·Dk], v [N, Hkv·Dv] after bias, q/k-norm, clip_qkv and RoPE (standard attention).
template <class T>
void qkv(const Ops<T>& op, int l, const Act<T>& a, const int* pos, grad::BlockTape<T>* tp, grad::SeamTape* st,
         Act<T>& q, Act<T>& k, Act<T>& v) {
  const ModelConfig& c = op.m.config();
  const AttnWeights& at = op.m.weights().layers[size_t(l)].attn;
  const int N = a.rows, H = c.hidden, D = c.head_dim, Hq = c.n_heads, Hkv = c.n_kv_heads;
  q = op.act(N, Hq * D);
  k = op.act(N, Hkv * D);
  v = op.act(N, Hkv * D);
  op.linear(a.data(), N, H, at.wq, q.data(), at.bq);
  op.linear(a.data(), N, H, at.wk, k.data(), at.bk);
  op.linear(a.data(), N, H, at.wv, v.data(), at.bv);
  if (c.arch->qk_norm != QKNorm::None) {
    if (tp) {
      tp->q_raw = op.host(q);
      tp->k_raw = op.host(k);
    }
    keep(op, st, &grad::SeamTape::q_raw, q);
    keep(op, st, &grad::SeamTape::k_raw, k);
    // PerHead: every head's D values normalised with the shared [D] weight; WholeProjection: the whole row.
    const bool per_head = c.arch->qk_norm == QKNorm::PerHead;
    op.rmsnorm(q.data(), at.q_norm, q.data(), per_head ? N * Hq : N, per_head ? D : Hq * D, c.rms_eps);
    op.rmsnorm(k.data(), at.k_norm, k.data(), per_head ? N * Hkv : N, per_head ? D : Hkv * D, c.rms_eps);
  }
  if (c.clip_qkv > 0.f) {
    if (tp) {
      tp->q_pre = op.host(q);
      tp->k_pre = op.host(k);
      tp->v_pre = op.host(v);
    }
    keep(op, st, &grad::SeamTape::q_pre, q);
    keep(op, st, &grad::SeamTape::k_pre, k);
    keep(op, st, &grad::SeamTape::v_pre, v);
    for (const Act<T>* x : {&q, &k, &v}) op.clamp(*x, T(c.clip_qkv));
  }
  op.rope(q.data(), N, Hq * D, Hq, D, D, pos);
  op.rope(k.data(), N, Hkv * D, Hkv, D, D, pos);
}

// Multi-head latent attention (DeepSeek-V2/V3): q [N, Hq·dq], k [N, Hq·dq] (per head k_nope ‖ the shared k_pe),
// v [N, Hq·dv], RoPE applied (formulas in model/backward_qkv.cpp).
template <class T>
void mla_qkv(const Ops<T>& op, int l, const Act<T>& a, const int* pos, grad::BlockTape<T>* tp, grad::SeamTape* st,
             Act<T>& q, Act<T>& k, Act<T>& v) {
  const ModelConfig& c = op.m.config();
  const AttnWeights& at = op.m.weights().layers[size_t(l)].attn;
  const int N = a.rows, H = c.hidden, Hq = c.n_heads, dn = c.qk_nope_dim, dr = c.qk_rope_dim, dv = c.v_head_dim,
            dq = dn + dr, rkv = c.kv_lora_rank, rq = c.q_lora_rank;
  q = op.act(N, Hq * dq);  // per head [nope dn | rope dr]
  if (rq) {
    Act<T> qa = op.act(N, rq);
    op.linear(a.data(), N, H, at.wq_a, qa.data(), at.bq_a);
    if (tp) tp->mla_qa = op.host(qa);
    keep(op, st, &grad::SeamTape::mla_qa, qa);
    op.rmsnorm(qa.data(), at.q_a_norm, qa.data(), N, rq, kMlaLatentEps);
    op.linear(qa.data(), N, rq, at.wq_b, q.data());
  } else {
    op.linear(a.data(), N, H, at.wq, q.data());
  }
  Act<T> ckv = op.act(N, rkv + dr);  // [latent rkv | shared k_pe dr]
  op.linear(a.data(), N, H, at.wkv_a, ckv.data(), at.bkv_a);
  if (tp) tp->mla_ckv = op.host(ckv);
  keep(op, st, &grad::SeamTape::mla_ckv, ckv);
  Act<T> lat = op.act(N, rkv);  // [N, rkv]
  op.copy2d(ckv.data(), size_t(rkv + dr), lat.data(), size_t(rkv), N, rkv);
  op.rmsnorm(lat.data(), at.kv_a_norm, lat.data(), N, rkv, kMlaLatentEps);
  Act<T> kv = op.act(N, Hq * (dn + dv));  // per head [k_nope dn | v dv]
  op.linear(lat.data(), N, rkv, at.wkv_b, kv.data());
  // RoPE on each query head's rope part and on the single k_pe head (not normalised).
  op.rope(q.data() + dn, N, Hq * dq, Hq, dq, dr, pos);
  op.rope(ckv.data() + rkv, N, rkv + dr, 1, dr, dr, pos);
  k = op.act(N, Hq * dq);
  v = op.act(N, Hq * dv);
  const size_t ldkv = size_t(Hq) * (dn + dv);
  for (int h = 0; h < Hq; ++h) {
    op.copy2d(kv.data() + size_t(h) * (dn + dv), ldkv, k.data() + size_t(h) * dq, size_t(k.cols), N, dn);
    op.copy2d(ckv.data() + rkv, size_t(rkv + dr), k.data() + size_t(h) * dq + dn, size_t(k.cols), N, dr);
    op.copy2d(kv.data() + size_t(h) * (dn + dv) + dn, ldkv, v.data() + size_t(h) * dv, size_t(v.cols), N, dv);
  }
}

// Attention of layer l on its input a [N, H] → o_proj output [N, H]. Keys of a sequence: its cached or prefix rows,
// then this call's rows.
template <class T>
Act<T> attention(const Ops<T>& op, int l, const Act<T>& a, const TokenLayout& layout, const int* pos,
                 const BlockIO<T>& io) {
  const ModelConfig& c = op.m.config();
  const AttnWeights& at = op.m.weights().layers[size_t(l)].attn;
  grad::BlockTape<T>* tp = io.tape;
  const int N = a.rows, H = c.hidden, Hq = c.n_heads;
  const ops::AttnShape shape = attn_shape(c);
  Act<T> q, k, v;  // [N, Hq·Dk], [N, Hkv·Dk], [N, Hkv·Dv]
  if (c.arch->attention == AttentionKind::MLA)
    mla_qkv(op, l, a, pos, tp, io.seam, q, k, v);
  else
    qkv(op, l, a, pos, tp, io.seam, q, k, v);
  const int qw = q.cols, kw = k.cols, vw = v.cols, ow = Hq * shape.Dv;

  Act<T> o = op.act(N, ow);
  KVCache* cache = io.cache;
  if (tp) {
    tp->seg_begin.clear();
    tp->seg_end.clear();
    tp->seg_seq.clear();
    tp->kf.clear();
    tp->vf.clear();
    tp->probs.clear();
  }
  if constexpr (Ops<T>::f32)
    if (grad::SeamTape* st = io.seam) st->clear_segments();
  // Tokens of one sequence are contiguous in the packed batch.
  for (int start = 0; start < N;) {
    const int s = layout.seq[size_t(start)];
    int end = start;
    while (end < N && layout.seq[size_t(end)] == s) ++end;
    const int n = end - start, p0 = layout.pos[size_t(start)];
    const int np = io.prefix ? io.prefix->n_prefix(l, s) : cache ? cache->length(s) : 0;
    if (p0 != np) throw std::logic_error("a sequence's first position must equal its cached length");
    if (cache) {
      if constexpr (Ops<T>::f32) {
        if (!cache->holds_layer(l)) throw std::logic_error("this KV cache holds no layer " + std::to_string(l));
        if (p0 + n > cache->capacity()) cache->grow(cache->n_seqs(), p0 + n);
        op.copy2d(k.row(start), size_t(kw), cache->k_row(l, s, p0), size_t(kw), n, kw);
        op.copy2d(v.row(start), size_t(vw), cache->v_row(l, s, p0), size_t(vw), n, vw);
      } else {
        throw std::logic_error("a KV cache holds fp32 rows");
      }
    }
    if (tp) {  // keys and values prefix ‖ this call's rows, probabilities kept (host memory)
      MatT<T> kf(np + n, kw), vf(np + n, vw);
      if (np && io.prefix) {
        kf.topRows(np) = io.prefix->k[size_t(l)][size_t(s)];
        vf.topRows(np) = io.prefix->v[size_t(l)][size_t(s)];
      } else if (np) {
        if constexpr (Ops<T>::f32) {
          kf.topRows(np) = Eigen::Map<const MatR>(cache->k_row(l, s, 0), np, kw);
          vf.topRows(np) = Eigen::Map<const MatR>(cache->v_row(l, s, 0), np, vw);
        }
      }
      kf.bottomRows(n) = Eigen::Map<const MatT<T>>(k.row(start), n, kw);
      vf.bottomRows(n) = Eigen::Map<const MatT<T>>(v.row(start), n, vw);
      MatT<T> probs(size_t(Hq) * n, np + n);
      grad::attention(q.row(start), n, qw, np, kf.data(), kw, vf.data(), vw, np + n, shape, o.row(start), ow,
                      probs.data());
      tp->seg_begin.push_back(start);
      tp->seg_end.push_back(end);
      tp->seg_seq.push_back(s);
      tp->kf.push_back(std::move(kf));
      tp->vf.push_back(std::move(vf));
      tp->probs.push_back(std::move(probs));
    } else if constexpr (Ops<T>::f32) {
      if (grad::SeamTape* st = io.seam) {  // keys and values prefix ‖ this call's rows kept (the backend's memory)
        Act<float> kf = op.act(np + n, kw), vf = op.act(np + n, vw);
        if (np && io.prefix && io.prefix->dev) {  // already in the backend's memory
          const grad::DevicePrefix& d = *io.prefix->dev;
          op.copy2d(d.k[size_t(l)][size_t(s)].data(), size_t(kw), kf.data(), size_t(kw), np, kw);
          op.copy2d(d.v[size_t(l)][size_t(s)].data(), size_t(vw), vf.data(), size_t(vw), np, vw);
        } else if (np && io.prefix) {
          op.be.to_device(kf.data(), io.prefix->k[size_t(l)][size_t(s)].data(), sizeof(float) * size_t(np) * kw);
          op.be.to_device(vf.data(), io.prefix->v[size_t(l)][size_t(s)].data(), sizeof(float) * size_t(np) * vw);
        } else if (np) {
          op.copy2d(cache->k_row(l, s, 0), size_t(kw), kf.data(), size_t(kw), np, kw);
          op.copy2d(cache->v_row(l, s, 0), size_t(vw), vf.data(), size_t(vw), np, vw);
        }
        op.copy2d(k.row(start), size_t(kw), kf.row(np), size_t(kw), n, kw);
        op.copy2d(v.row(start), size_t(vw), vf.row(np), size_t(vw), n, vw);
        op.be.attention(q.row(start), n, qw, np, kf.data(), kw, vf.data(), vw, np + n, shape, o.row(start), ow);
        st->seg_begin.push_back(start);
        st->seg_end.push_back(end);
        st->seg_seq.push_back(s);
        st->kf.push_back(std::move(kf));
        st->vf.push_back(std::move(vf));
      } else if (cache)
        op.be.attention(q.row(start), n, qw, p0, cache->k_row(l, s, 0), kw, cache->v_row(l, s, 0), vw, p0 + n, shape,
                        o.row(start), ow);
      else
        op.be.attention(q.row(start), n, qw, 0, k.row(start), kw, v.row(start), vw, n, shape, o.row(start), ow);
    } else {
      throw std::logic_error("double-precision blocks run with a tape");
    }
    start = end;
  }
  Act<T> out = op.act(N, H);
  op.linear(o.data(), N, ow, at.wo, out.data(), at.bo);
  if (tp) {
    tp->q = op.host(q);
    tp->o = op.host(o);
  }
  if constexpr (Ops<T>::f32)
    if (io.seam) io.seam->q = std::move(q);
  return out;
}

// ---- FFN --------------------------------------------------------------------------------------------------------

// The routed experts with a tape (host memory): tokens grouped by expert (ascending), each expert's gate‖up, key and
// unweighted output kept; y [N, H] = Σ weight · output in ascending expert id per token (the backend's moe_experts
// order).
template <class T>
void experts_taped(const Ops<T>& op, const ExpertBank& b, const Act<T>& a_rows, grad::BlockTape<T>& tp,
                   const Act<T>& y_rows) {
  const Eigen::Map<const MatT<T>> a(a_rows.data(), a_rows.rows, a_rows.cols);
  const int N = a_rows.rows, H = b.H, E = b.E, kk = int(tp.ids.cols());
  tp.tok.assign(size_t(E), {});
  tp.slot.assign(size_t(E), {});
  for (int t = 0; t < N; ++t)
    for (int j = 0; j < kk; ++j) {
      tp.tok[size_t(tp.ids(t, j))].push_back(t);
      tp.slot[size_t(tp.ids(t, j))].push_back(j);
    }
  tp.gu.assign(size_t(E), {});
  tp.key.assign(size_t(E), {});
  tp.y.assign(size_t(E), {});
  const bool par = !omp_in_parallel() && double(N) * kk * 6.0 * H * b.I > 2e6;
#pragma omp parallel for schedule(dynamic) num_threads(ops::num_threads()) if (par)
  for (int e = 0; e < E; ++e) {
    const auto& ts = tp.tok[size_t(e)];
    if (ts.empty()) continue;
    const int n = int(ts.size());
    MatT<T> xe(n, H);
    for (int j = 0; j < n; ++j) xe.row(j) = a.row(ts[size_t(j)]);
    Act<T> gu, key;
    op.gate_up_key(b, e, xe.data(), n, gu, key);
    tp.gu[size_t(e)] = op.host(gu);
    tp.key[size_t(e)] = op.host(key);
    tp.y[size_t(e)].resize(n, H);
    op.linear(key.data(), n, b.I, b.down[size_t(e)], tp.y[size_t(e)].data());
  }
  Eigen::Map<MatT<T>> y(y_rows.data(), N, H);
  y.setZero();
  for (int e = 0; e < E; ++e)
    for (size_t j = 0; j < tp.tok[size_t(e)].size(); ++j) {
      const int t = tp.tok[size_t(e)][j];
      y.row(t) += tp.y[size_t(e)].row(int(j)) * tp.w(t, tp.slot[size_t(e)][j]);
    }
}

// The routed experts through the backend (ids [N, k], weights w [N, k] in its memory), per-expert hooks as taps.
void experts_backend(const Ops<float>& op, int l, const ExpertBank& b, const Act<float>& a, const int* ids,
                     const Act<float>& w, const TokenLayout& layout, const Hooks* hooks, const Act<float>& y) {
  const int E = b.E;
  std::vector<ops::WeightView> views(3 * size_t(E));
  for (int e = 0; e < E; ++e) {
    views[size_t(e)] = b.gate[size_t(e)].on(op.be);
    views[size_t(E + e)] = b.up[size_t(e)].on(op.be);
    views[size_t(2 * E + e)] = b.down[size_t(e)].on(op.be);
  }
  const ExpertsView ex{E, b.I, b.H, views.data(), views.data() + E, views.data() + 2 * E};
  MoeTaps taps;
  if (hooks) {
    // Only the stages some expert's hook or reader asks for (a device copies a tapped stage to the host and back).
    auto any = [&](std::string (*name_of)(int, int), bool reader) {
      for (int e = 0; e < E; ++e)
        if (reader ? hooks->has_reader(name_of(l, e)) : hooks->has(name_of(l, e))) return true;
      return false;
    };
    auto tap = [&](std::string (*name_of)(int, int)) {
      return [&, name_of](int e, MapMatR rows, const std::vector<int>& tokens) {
        const std::string name = name_of(l, e);
        hooks->run(name, rows, {name, l, e, layout, &tokens});
      };
    };
    if (any(&hook_names::expert_key, false)) taps.key = tap(&hook_names::expert_key);
    if (any(&hook_names::expert_out, false)) taps.out = tap(&hook_names::expert_out);
    if (any(&hook_names::expert_key, true))
      taps.key_rows = [&](int e, const float* rows, int n) {
        hooks->read(hook_names::expert_key(l, e), rows, n, b.I, size_t(b.I));
      };
  }
  op.be.moe_experts(a.data(), a.rows, ex, ids, w.data(), w.cols, y.data(), hooks ? &taps : nullptr);
}

// The FFN/MoE block of layer l on a [N, H] → [N, H].
template <class T>
Act<T> ffn(const Ops<T>& op, int l, const Act<T>& a, const TokenLayout& layout, const BlockIO<T>& io) {
  constexpr bool f32 = Ops<T>::f32;
  const ModelConfig& c = op.m.config();
  const FFNWeights& f = op.m.weights().layers[size_t(l)].ffn;
  grad::BlockTape<T>* tp = io.tape;
  const Hooks* hooks = io.hooks && !io.hooks->empty() ? io.hooks : nullptr;
  const int N = a.rows, H = c.hidden;
  Act<T> y = op.act(N, H);
  if (!f.moe) {  // dense SwiGLU: expert 0 of a one-expert bank, every token
    Act<T> gu, key;
    op.gate_up_key(f.experts, 0, a.data(), N, gu, key);
    op.linear(key.data(), N, f.experts.I, f.experts.down[0], y.data());
    if (tp) {
      tp->tok.assign(1, std::vector<int>(size_t(N)));
      std::iota(tp->tok[0].begin(), tp->tok[0].end(), 0);
      tp->gu.assign(1, op.host(gu));
      tp->key.assign(1, op.host(key));
      tp->y.assign(1, op.host(y));
    }
    return y;
  }

  // Router: z = a·Wrᵀ [N, E] → top-k ids and weights [N, k], in the activations' memory.
  const int E = c.n_experts, k = c.top_k;
  Act<T> z = op.act(N, E), w = op.act(N, k);
  op.linear(a.data(), N, H, f.router.data(), E, z.data());
  if (const RouterEdit* re = op.m.router_edit(); re && re->touches(l)) {
    if (tp) tp->z_raw = op.host(z);
    keep(op, io.seam, &grad::SeamTape::z_raw, z);
    edit_router_logits(op, *re, l, z);
  }
  if constexpr (f32)
    if (hooks) run_hook(op, hooks, hook_names::router_logits(l), z, l, -1, layout);
  Buf ids(op.mem(), sizeof(int) * size_t(N) * k);
  op.route(z.data(), N, f.router_bias, ids.as<int>(), w.data());
  // The choices on the host where someone reads them (the caller, hooks, the tape); a weights hook may change them.
  LayerRouting local;
  LayerRouting* r = io.routing ? io.routing : (hooks || tp) ? &local : nullptr;
  IdxMat ids_h;
  MatT<T> w_h;
  if (r || tp) {
    ids_h.resize(N, k);
    w_h.resize(N, k);
    op.mem().to_host(ids_h.data(), ids.as<int>(), sizeof(int) * ids_h.size());
    op.mem().to_host(w_h.data(), w.data(), sizeof(T) * w_h.size());
  }
  if constexpr (f32) {
    if (r) {
      r->ids = ids_h;
      r->weights = w_h;
    }
    if (hooks) {
      MatR idf = r->ids.cast<float>();
      hooks->run(hook_names::expert_ids(l), idf, {hook_names::expert_ids(l), l, -1, layout, nullptr});
      hooks->run(hook_names::expert_weights(l), r->weights,
                 {hook_names::expert_weights(l), l, -1, layout, nullptr});
      op.be.to_device(w.data(), r->weights.data(), sizeof(float) * w.size());
      w_h = r->weights;
    }
  }
  if (tp) {
    tp->z = op.host(z);
    tp->ids = ids_h;
    tp->w = w_h;
    experts_taped(op, f.experts, a, *tp, y);
  } else if constexpr (f32) {
    experts_backend(op, l, f.experts, a, ids.as<int>(), w, layout, hooks, y);
    if (grad::SeamTape* st = io.seam) {
      st->z = std::move(z);
      st->ids = std::move(ids);
      st->w = std::move(w);
    }
  } else {
    throw std::logic_error("double-precision blocks run with a tape");
  }

  if (f.has_shared) {
    const int Is = f.shared.I;
    Act<T> gu, key, s = op.act(N, H);
    op.gate_up_key(f.shared, 0, a.data(), N, gu, key);  // key [N, Is]
    if constexpr (f32)
      if (hooks) {
        hooks->read(hook_names::shared_key(l), key.data(), N, Is, size_t(Is));
        run_hook(op, hooks, hook_names::shared_key(l), key, l, -1, layout);
      }
    op.linear(key.data(), N, Is, f.shared.down[0], s.data());
    if (tp) {
      tp->s_gu = op.host(gu);
      tp->s_key = op.host(key);
      tp->s_y = op.host(s);
    }
    keep(op, io.seam, &grad::SeamTape::s_y, s);
    Act<T> g;  // sigmoid gate per token [N, 1], empty when ungated
    if (f.shared_gate.size()) {
      g = op.act(N, 1);  // a·gate: through linear, so each token's gate is the same whatever its batch
      op.linear(a.data(), N, H, f.shared_gate.data(), 1, g.data());
      if (tp) tp->s_logit = op.host(g).col(0);
      op.sigmoid_gate(s, g);
      keep(op, io.seam, &grad::SeamTape::s_gate, g);
    }
    if constexpr (f32) {
      if (hooks) {
        // Shared expert j alone (only where hooked): its slice of the down projection on its slice of the key.
        const ops::WeightView dn = f.shared.down[0].on(op.be);  // [H, Is]
        for (int j = 0; j < c.n_shared_experts; ++j) {
          const std::string name = hook_names::shared_expert_out(l, j);
          if (!hooks->has(name)) continue;
          const auto [b, e] = c.shared_slice(j);
          Act<float> out = op.act(N, H), change = op.act(N, H);  // key[:, b:e] · dn[:, b:e]ᵀ, read in place
          op.be.linear(key.data() + b, size_t(Is), N, e - b, dn.at(0, b), H, out.data(), size_t(H));
          if (g.size()) op.be.scale_rows(out.data(), N, H, g.data());
          op.copy2d(out.data(), size_t(H), change.data(), size_t(H), N, H);
          run_hook(op, hooks, name, out, l, j, layout);
          op.scale(change, -1.f);  // change = out after the hook − out before it
          op.add(change, out);
          op.add(s, change);
        }
        run_hook(op, hooks, hook_names::shared_out(l), s, l, -1, layout);
      }
    }
    op.add(y, s);
  }
  return y;
}

// Block l on the rows x [N, H] (in the activations' memory) in place; pos: their positions, in the same memory.
template <class T>
void block(const Ops<T>& op, int l, const Act<T>& x, const TokenLayout& layout, const int* pos,
           const BlockIO<T>& io) {
  const ModelConfig& c = op.m.config();
  const LayerWeights& L = op.m.weights().layers[size_t(l)];
  grad::BlockTape<T>* tp = io.tape;
  const Hooks* hooks = io.hooks && !io.hooks->empty() ? io.hooks : nullptr;
  const int N = x.rows, H = c.hidden;
  const T rm = T(c.residual_multiplier);
  auto hook = [&](std::string (*name_of)(int), const Act<T>& act) {
    if constexpr (Ops<T>::f32)
      if (hooks) run_hook(op, hooks, name_of(l), act, l, -1, layout);
  };
  hook(&hook_names::resid_pre, x);
  if (tp) tp->x_in = op.host(x);
  keep(op, io.seam, &grad::SeamTape::x_in, x);
  if constexpr (Ops<T>::f32)
    if (io.seam) io.seam->pos = layout.pos;
  Act<T> a = op.act(N, H);
  op.rmsnorm(x.data(), L.ln_in, a.data(), N, H, c.rms_eps);
  Act<T> att = attention(op, l, a, layout, pos, io);
  if (tp) tp->a1 = op.host(a);
  keep(op, io.seam, &grad::SeamTape::a1, a);
  hook(&hook_names::attn_out, att);
  if (rm != T(1)) op.scale(att, rm);
  op.add(x, att);
  if (tp) tp->x_mid = op.host(x);
  keep(op, io.seam, &grad::SeamTape::x_mid, x);
  op.rmsnorm(x.data(), L.ln_post, a.data(), N, H, c.rms_eps);
  hook(&hook_names::ffn_in, a);
  Act<T> mo = ffn(op, l, a, layout, io);
  if (tp) tp->a2 = op.host(a);
  keep(op, io.seam, &grad::SeamTape::a2, a);
  hook(&hook_names::moe_out, mo);
  if (rm != T(1)) op.scale(mo, rm);
  op.add(x, mo);
  hook(&hook_names::resid_post, x);
}

// n host elements in `mem`: the elements themselves where its memory is the host's, else a copy uploaded into `copy`.
template <class E>
E* staged(const Backend& mem, E* host, size_t n, Buf& copy) {
  if (mem.host_memory()) return host;
  copy = Buf(mem, sizeof(E) * n);
  mem.to_device(copy.as<void>(), host, sizeof(E) * n);
  return copy.as<E>();
}

// Taped runs (v*) keep their tape in host memory: on a device backend they run on the CPU's.
template <class T>
Ops<T> ops_of(const Model& m, const BlockIO<T>& io) {
  return {m, io.tape ? m.host_backend() : m.backend()};
}

}  // namespace

template <class T>
MatT<T> run_ffn(const Model& m, int l, const MatT<T>& a, const TokenLayout& layout, const BlockIO<T>& io) {
  const Ops<T> op = ops_of(m, io);
  Buf copy;  // the FFN only reads its input: the rows themselves on the host
  const Act<T> in =
      Act<T>::view(staged(op.mem(), const_cast<T*>(a.data()), size_t(a.size()), copy), int(a.rows()), int(a.cols()));
  return op.host(ffn(op, l, in, layout, io));
}

template <class T>
void run_block(const Model& m, int l, MatT<T>& x, const TokenLayout& layout, const BlockIO<T>& io) {
  const Ops<T> op = ops_of(m, io);
  if (int(layout.seq.size()) != int(x.rows())) throw std::logic_error("run_block: layout and rows disagree");
  Buf x_copy, pos_copy;
  const Act<T> xs = Act<T>::view(staged(op.mem(), x.data(), size_t(x.size()), x_copy), int(x.rows()), int(x.cols()));
  const int* pos = staged(op.mem(), layout.pos.data(), layout.pos.size(), pos_copy);
  block(op, l, xs, layout, pos, io);
  if (x_copy.bytes()) op.mem().to_host(x.data(), xs.data(), sizeof(T) * xs.size());
}

#define MOEDIT_BLOCK_INSTANTIATE(T)                                                                            \
  template void run_block<T>(const Model&, int, MatT<T>&, const TokenLayout&, const BlockIO<T>&);             \
  template MatT<T> run_ffn<T>(const Model&, int, const MatT<T>&, const TokenLayout&, const BlockIO<T>&);

MOEDIT_BLOCK_INSTANTIATE(float)
MOEDIT_BLOCK_INSTANTIATE(double)

}  // namespace moedit
