// The one block forward (see model/block.h).
#include "model/block.h"

#include <omp.h>

#include <numeric>
#include <type_traits>

#include "model/router.h"

namespace moedit {

namespace {

constexpr bool kF32 = true;

// The ops of a block run: fp32 through the model's backend; double through the reference ops of model/backward.h.
template <class T>
struct Ops {
  const Model& m;
  const Backend& be;
  static constexpr bool f32 = std::is_same_v<T, float>;

  // y [n, W.rows()] = x [n, in]·Wᵀ (+ b)
  void linear(const T* x, int n, int in, const Weight& W, T* y, const VecF& b = VecF()) const {
    const float* bp = b.size() ? b.data() : nullptr;
    if constexpr (f32)
      be.linear(x, size_t(in), n, in, W.kernel(), int(W.rows()), y, size_t(W.rows()), bp);
    else
      grad::linear(x, n, in, W, y, bp);
  }
  // y [n, out] = x [n, in]·Wᵀ for a small fp32 matrix (router, shared-expert gate)
  void linear(const T* x, int n, int in, const float* W, int out, T* y) const {
    if constexpr (f32)
      be.linear(x, size_t(in), n, in, ops::WeightView(W, size_t(in)), out, y, size_t(out));
    else
      grad::linear(x, n, in, W, out, y);
  }
  void rmsnorm(const T* x, const float* w, T* y, int rows, int dim, float eps) const {
    if constexpr (f32)
      be.rmsnorm(x, w, y, rows, dim, eps);
    else
      grad::rmsnorm(x, w, y, rows, dim, eps);
  }
  void rope(T* x, int rows, int row_stride, int heads, int head_stride, int rot, const int* pos) const {
    const ModelConfig& c = m.config();
    if constexpr (f32)
      be.rope(x, rows, row_stride, heads, head_stride, rot, pos, m.inv_freq().data(), c.rope_attn_factor);
    else
      grad::rope(x, rows, row_stride, heads, head_stride, rot, pos, m.inv_freq().data(), false, c.rope_attn_factor);
  }
  void silu_mul(const T* gu, int rows, int I, T* key) const {
    if constexpr (f32)
      be.silu_mul(gu, rows, I, key);
    else
      grad::swiglu(gu, rows, I, key);
  }
  void route(const T* z, int N, const float* bias, int* ids, T* w) const {
    const ops::RouteSpec& spec = m.route_spec();
    if constexpr (f32)
      be.route(z, N, spec, bias, ids, w);
    else
      for (int t = 0; t < N; ++t) ops::route_row(spec, z + size_t(t) * spec.E, bias, ids + size_t(t) * spec.k, w + size_t(t) * spec.k);
  }
  // Expert e of a bank on rows x [n, H]: gate‖up gu [n, 2I] and key [n, I].
  void gate_up_key(const ExpertBank& b, int e, const T* x, int n, MatT<T>& gu, MatT<T>& key) const {
    gu.resize(n, 2 * b.I);
    key.resize(n, b.I);
    if constexpr (f32) {
      be.linear(x, size_t(b.H), n, b.H, b.gate[size_t(e)].kernel(), b.I, gu.data(), 2 * size_t(b.I));
      be.linear(x, size_t(b.H), n, b.H, b.up[size_t(e)].kernel(), b.I, gu.data() + b.I, 2 * size_t(b.I));
    } else {
      MatT<T> g(n, b.I), u(n, b.I);
      grad::linear(x, n, b.H, b.gate[size_t(e)], g.data());
      grad::linear(x, n, b.H, b.up[size_t(e)], u.data());
      gu << g, u;
    }
    silu_mul(gu.data(), n, b.I, key.data());
  }
};

void run_hook(const Hooks* h, const std::string& name, Eigen::Ref<MatR> act, int l, int e, const TokenLayout& lay,
              const std::vector<int>* tokens = nullptr) {
  h->run(name, act, {name, l, e, lay, tokens});
}

// ---- attention ---------------------------------------------------------------------------------------------------

// q [N, Hq·Dk], k [N, Hkv·Dk], v [N, Hkv·Dv] after bias, q/k-norm, clip_qkv and RoPE (standard attention).
template <class T>
void qkv(const Ops<T>& op, int l, const MatT<T>& a, const int* pos, grad::BlockTape<T>* tp, MatT<T>& q, MatT<T>& k,
         MatT<T>& v) {
  const ModelConfig& c = op.m.config();
  const AttnWeights& at = op.m.weights().layers[size_t(l)].attn;
  const int N = int(a.rows()), H = c.hidden, D = c.head_dim, Hq = c.n_heads, Hkv = c.n_kv_heads;
  q.resize(N, Hq * D);
  k.resize(N, Hkv * D);
  v.resize(N, Hkv * D);
  op.linear(a.data(), N, H, at.wq, q.data(), at.bq);
  op.linear(a.data(), N, H, at.wk, k.data(), at.bk);
  op.linear(a.data(), N, H, at.wv, v.data(), at.bv);
  if (c.arch->qk_norm != QKNorm::None) {
    if (tp) {
      tp->q_raw = q;
      tp->k_raw = k;
    }
    // PerHead: every head's D values normalised with the shared [D] weight; WholeProjection: the whole row.
    const bool per_head = c.arch->qk_norm == QKNorm::PerHead;
    op.rmsnorm(q.data(), at.q_norm.data(), q.data(), per_head ? N * Hq : N, per_head ? D : Hq * D, c.rms_eps);
    op.rmsnorm(k.data(), at.k_norm.data(), k.data(), per_head ? N * Hkv : N, per_head ? D : Hkv * D, c.rms_eps);
  }
  if (c.clip_qkv > 0.f) {
    if (tp) {
      tp->q_pre = q;
      tp->k_pre = k;
      tp->v_pre = v;
    }
    const T cl = T(c.clip_qkv);
    q = q.cwiseMax(-cl).cwiseMin(cl);
    k = k.cwiseMax(-cl).cwiseMin(cl);
    v = v.cwiseMax(-cl).cwiseMin(cl);
  }
  op.rope(q.data(), N, Hq * D, Hq, D, D, pos);
  op.rope(k.data(), N, Hkv * D, Hkv, D, D, pos);
}

// Multi-head latent attention (DeepSeek-V2/V3): q [N, Hq·dq], k [N, Hq·dq] (per head k_nope ‖ the shared k_pe),
// v [N, Hq·dv], RoPE applied (formulas in model/backward_qkv.cpp).
template <class T>
void mla_qkv(const Ops<T>& op, int l, const MatT<T>& a, const int* pos, grad::BlockTape<T>* tp, MatT<T>& q,
             MatT<T>& k, MatT<T>& v) {
  const ModelConfig& c = op.m.config();
  const AttnWeights& at = op.m.weights().layers[size_t(l)].attn;
  const int N = int(a.rows()), H = c.hidden, Hq = c.n_heads, dn = c.qk_nope_dim, dr = c.qk_rope_dim,
            dv = c.v_head_dim, dq = dn + dr, rkv = c.kv_lora_rank, rq = c.q_lora_rank;
  q.resize(N, Hq * dq);  // per head [nope dn | rope dr]
  if (rq) {
    MatT<T> qa(N, rq);
    op.linear(a.data(), N, H, at.wq_a, qa.data(), at.bq_a);
    if (tp) tp->mla_qa = qa;
    op.rmsnorm(qa.data(), at.q_a_norm.data(), qa.data(), N, rq, kMlaLatentEps);
    op.linear(qa.data(), N, rq, at.wq_b, q.data());
  } else {
    op.linear(a.data(), N, H, at.wq, q.data());
  }
  MatT<T> ckv(N, rkv + dr);  // [latent rkv | shared k_pe dr]
  op.linear(a.data(), N, H, at.wkv_a, ckv.data(), at.bkv_a);
  if (tp) tp->mla_ckv = ckv;
  MatT<T> lat = ckv.leftCols(rkv);  // [N, rkv]
  op.rmsnorm(lat.data(), at.kv_a_norm.data(), lat.data(), N, rkv, kMlaLatentEps);
  MatT<T> kv(N, Hq * (dn + dv));  // per head [k_nope dn | v dv]
  op.linear(lat.data(), N, rkv, at.wkv_b, kv.data());
  // RoPE on each query head's rope part and on the single k_pe head (not normalised).
  op.rope(q.data() + dn, N, Hq * dq, Hq, dq, dr, pos);
  op.rope(ckv.data() + rkv, N, rkv + dr, 1, dr, dr, pos);
  k.resize(N, Hq * dq);
  v.resize(N, Hq * dv);
  for (int h = 0; h < Hq; ++h) {
    k.middleCols(h * dq, dn) = kv.middleCols(h * (dn + dv), dn);
    k.middleCols(h * dq + dn, dr) = ckv.rightCols(dr);
    v.middleCols(h * dv, dv) = kv.middleCols(h * (dn + dv) + dn, dv);
  }
}

// Attention of layer l on its input a [N, H] → o_proj output [N, H]. Keys of a sequence: its cached or prefix rows,
// then this call's rows.
template <class T>
MatT<T> attention(const Ops<T>& op, int l, const MatT<T>& a, const TokenLayout& layout, const BlockIO<T>& io) {
  const ModelConfig& c = op.m.config();
  const AttnWeights& at = op.m.weights().layers[size_t(l)].attn;
  grad::BlockTape<T>* tp = io.tape;
  const int N = int(a.rows()), H = c.hidden, Hq = c.n_heads;
  const ops::AttnShape shape = attn_shape(c);
  MatT<T> q, k, v;  // [N, Hq·Dk], [N, Hkv·Dk], [N, Hkv·Dv]
  if (c.arch->attention == AttentionKind::MLA)
    mla_qkv(op, l, a, layout.pos.data(), tp, q, k, v);
  else
    qkv(op, l, a, layout.pos.data(), tp, q, k, v);
  const int qw = int(q.cols()), kw = int(k.cols()), vw = int(v.cols()), ow = Hq * shape.Dv;

  MatT<T> o(N, ow);
  KVCache* cache = io.cache;
  if (tp) {
    tp->seg_begin.clear();
    tp->seg_end.clear();
    tp->seg_seq.clear();
    tp->kf.clear();
    tp->vf.clear();
    tp->probs.clear();
  }
  // Tokens of one sequence are contiguous in the packed batch.
  for (int start = 0; start < N;) {
    const int s = layout.seq[size_t(start)];
    int end = start;
    while (end < N && layout.seq[size_t(end)] == s) ++end;
    const int n = end - start, p0 = layout.pos[size_t(start)];
    const T* qs = q.data() + size_t(start) * qw;
    T* os = o.data() + size_t(start) * ow;
    const int np = io.prefix ? io.prefix->n_prefix(l, s) : cache ? cache->length(s) : 0;
    if (p0 != np) throw std::logic_error("a sequence's first position must equal its cached length");
    if (cache) {
      if constexpr (Ops<T>::f32) {
        if (!cache->holds_layer(l)) throw std::logic_error("this KV cache holds no layer " + std::to_string(l));
        if (p0 + n > cache->capacity()) cache->grow(cache->n_seqs(), p0 + n);
        std::copy_n(k.data() + size_t(start) * kw, size_t(n) * kw, cache->k_row(l, s, p0));
        std::copy_n(v.data() + size_t(start) * vw, size_t(n) * vw, cache->v_row(l, s, p0));
      } else {
        throw std::logic_error("a KV cache holds fp32 rows");
      }
    }
    if (tp) {  // keys and values prefix ‖ this call's rows, probabilities kept
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
      kf.bottomRows(n) = k.middleRows(start, n);
      vf.bottomRows(n) = v.middleRows(start, n);
      MatT<T> probs(size_t(Hq) * n, np + n);
      grad::attention(qs, n, qw, np, kf.data(), kw, vf.data(), vw, np + n, shape, os, ow, probs.data());
      tp->seg_begin.push_back(start);
      tp->seg_end.push_back(end);
      tp->seg_seq.push_back(s);
      tp->kf.push_back(std::move(kf));
      tp->vf.push_back(std::move(vf));
      tp->probs.push_back(std::move(probs));
    } else if constexpr (Ops<T>::f32) {
      if (cache)
        op.be.attention(qs, n, qw, p0, cache->k_row(l, s, 0), kw, cache->v_row(l, s, 0), vw, p0 + n, shape, os, ow);
      else
        op.be.attention(qs, n, qw, 0, k.data() + size_t(start) * kw, kw, v.data() + size_t(start) * vw, vw, n, shape,
                        os, ow);
    } else {
      throw std::logic_error("double-precision blocks run with a tape");
    }
    start = end;
  }
  MatT<T> out(N, H);
  op.linear(o.data(), N, ow, at.wo, out.data(), at.bo);
  if (tp) {
    tp->q = std::move(q);
    tp->o = std::move(o);
  }
  return out;
}

// ---- FFN --------------------------------------------------------------------------------------------------------

// The routed experts with a tape: tokens grouped by expert (ascending), each expert's gate‖up, key and unweighted
// output kept; y [N, H] = Σ weight · output in ascending expert id per token (the backend's moe_experts order).
template <class T>
void experts_taped(const Ops<T>& op, const ExpertBank& b, const MatT<T>& a, grad::BlockTape<T>& tp, MatT<T>& y) {
  const int N = int(a.rows()), H = b.H, E = b.E, kk = int(tp.ids.cols());
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
    op.gate_up_key(b, e, xe.data(), n, tp.gu[size_t(e)], tp.key[size_t(e)]);
    tp.y[size_t(e)].resize(n, H);
    op.linear(tp.key[size_t(e)].data(), n, b.I, b.down[size_t(e)], tp.y[size_t(e)].data());
  }
  y = MatT<T>::Zero(N, H);
  for (int e = 0; e < E; ++e)
    for (size_t j = 0; j < tp.tok[size_t(e)].size(); ++j) {
      const int t = tp.tok[size_t(e)][j];
      y.row(t) += tp.y[size_t(e)].row(int(j)) * tp.w(t, tp.slot[size_t(e)][j]);
    }
}

// The routed experts through the backend, per-expert hooks as taps.
void experts_backend(const Ops<float>& op, int l, const ExpertBank& b, const MatR& a, const LayerRouting& r,
                     const TokenLayout& layout, const Hooks* hooks, MatR& y) {
  const int E = b.E;
  std::vector<ops::WeightView> views(3 * size_t(E));
  for (int e = 0; e < E; ++e) {
    views[size_t(e)] = b.gate[size_t(e)].kernel();
    views[size_t(E + e)] = b.up[size_t(e)].kernel();
    views[size_t(2 * E + e)] = b.down[size_t(e)].kernel();
  }
  const ExpertsView ex{E, b.I, b.H, views.data(), views.data() + E, views.data() + 2 * E};
  MoeTaps taps;
  if (hooks) {
    auto tap = [&](std::string (*name_of)(int, int)) {
      return [&, name_of](int e, MapMatR rows, const std::vector<int>& tokens) {
        run_hook(hooks, name_of(l, e), rows, l, e, layout, &tokens);
      };
    };
    taps.key = tap(&hook_names::expert_key);
    taps.out = tap(&hook_names::expert_out);
  }
  y.resize(a.rows(), b.H);
  op.be.moe_experts(a.data(), int(a.rows()), ex, r.ids.data(), r.weights.data(), int(r.ids.cols()), y.data(),
                    hooks ? &taps : nullptr);
}

}  // namespace

template <class T>
MatT<T> run_ffn(const Model& m, int l, const MatT<T>& a, const TokenLayout& layout, const BlockIO<T>& io) {
  const Ops<T> op{m, m.backend()};
  const ModelConfig& c = m.config();
  const FFNWeights& f = m.weights().layers[size_t(l)].ffn;
  grad::BlockTape<T>* tp = io.tape;
  const Hooks* hooks = io.hooks && !io.hooks->empty() ? io.hooks : nullptr;
  const int N = int(a.rows()), H = c.hidden;
  MatT<T> y;
  if (!f.moe) {  // dense SwiGLU: expert 0 of a one-expert bank, every token
    MatT<T> gu, key;
    op.gate_up_key(f.experts, 0, a.data(), N, gu, key);
    y.resize(N, H);
    op.linear(key.data(), N, f.experts.I, f.experts.down[0], y.data());
    if (tp) {
      tp->tok.assign(1, std::vector<int>(size_t(N)));
      std::iota(tp->tok[0].begin(), tp->tok[0].end(), 0);
      tp->gu.assign(1, std::move(gu));
      tp->key.assign(1, std::move(key));
      tp->y.assign(1, y);
    }
    return y;
  }

  // Router: z = a·Wrᵀ [N, E] → top-k ids and weights [N, k].
  const int E = c.n_experts, k = c.top_k;
  MatT<T> z(N, E);
  op.linear(a.data(), N, H, f.router.data(), E, z.data());
  const float* bias = f.router_bias.size() ? f.router_bias.data() : nullptr;
  LayerRouting local;
  if constexpr (std::is_same_v<T, float>) {
    if (hooks) run_hook(hooks, hook_names::router_logits(l), z, l, -1, layout);
    LayerRouting& r = io.routing ? *io.routing : local;
    r.ids.resize(N, k);
    r.weights.resize(N, k);
    op.route(z.data(), N, bias, r.ids.data(), r.weights.data());
    if (hooks) {
      MatR ids = r.ids.cast<float>();
      run_hook(hooks, hook_names::expert_ids(l), ids, l, -1, layout);
      run_hook(hooks, hook_names::expert_weights(l), r.weights, l, -1, layout);
    }
    if (tp) {
      tp->z = z;
      tp->ids = r.ids;
      tp->w = r.weights;
      experts_taped(op, f.experts, a, *tp, y);
    } else {
      experts_backend(op, l, f.experts, a, r, layout, hooks, y);
    }
  } else {
    tp->z = z;
    tp->ids.resize(N, k);
    tp->w.resize(N, k);
    op.route(z.data(), N, bias, tp->ids.data(), tp->w.data());
    experts_taped(op, f.experts, a, *tp, y);
  }

  if (f.has_shared) {
    const int Is = f.shared.I;
    MatT<T> gu, key, s(N, H);
    op.gate_up_key(f.shared, 0, a.data(), N, gu, key);  // key [N, Is]
    if constexpr (std::is_same_v<T, float>)
      if (hooks) run_hook(hooks, hook_names::shared_key(l), key, l, -1, layout);
    op.linear(key.data(), N, Is, f.shared.down[0], s.data());
    if (tp) {
      tp->s_gu = std::move(gu);
      tp->s_key = key;
      tp->s_y = s;
    }
    VecT<T> g;  // sigmoid gate per token, empty when ungated
    if (f.shared_gate.size()) {
      g.resize(N);  // a·gate [N]: through linear, so each token's gate is the same whatever its batch
      op.linear(a.data(), N, H, f.shared_gate.data(), 1, g.data());
      if (tp) tp->s_logit = g;
      for (int t = 0; t < N; ++t) s.row(t) *= (g[t] = T(1) / (T(1) + std::exp(-g[t])));
    }
    if constexpr (std::is_same_v<T, float>) {
      if (hooks) {
        // Shared expert j alone (only where hooked): its slice of the down projection on its slice of the key.
        const ops::WeightView dn = f.shared.down[0].kernel();  // [H, Is]
        for (int j = 0; j < c.n_shared_experts; ++j) {
          const std::string name = hook_names::shared_expert_out(l, j);
          if (!hooks->has(name)) continue;
          const auto [b, e] = c.shared_slice(j);
          MatR out(N, H);  // key[:, b:e] · dn[:, b:e]ᵀ, both slices read in place
          op.be.linear(key.data() + b, size_t(Is), N, e - b, dn.at(0, b), H, out.data(), size_t(H));
          if (g.size()) out.array().colwise() *= g.array();
          const MatR before = out;
          run_hook(hooks, name, out, l, j, layout);
          s += out - before;
        }
        run_hook(hooks, hook_names::shared_out(l), s, l, -1, layout);
      }
    }
    y += s;
  }
  return y;
}

template <class T>
void run_block(const Model& m, int l, MatT<T>& x, const TokenLayout& layout, const BlockIO<T>& io) {
  const Ops<T> op{m, m.backend()};
  const ModelConfig& c = m.config();
  const LayerWeights& L = m.weights().layers[size_t(l)];
  grad::BlockTape<T>* tp = io.tape;
  const Hooks* hooks = io.hooks && !io.hooks->empty() ? io.hooks : nullptr;
  const int N = int(x.rows()), H = c.hidden;
  const T rm = T(c.residual_multiplier);
  if (int(layout.seq.size()) != N) throw std::logic_error("run_block: layout and rows disagree");
  auto hook = [&](std::string (*name_of)(int), MatT<T>& act) {
    if constexpr (std::is_same_v<T, float>)
      if (hooks) run_hook(hooks, name_of(l), act, l, -1, layout);
  };
  hook(&hook_names::resid_pre, x);
  if (tp) tp->x_in = x;
  MatT<T> a(N, H);
  op.rmsnorm(x.data(), L.ln_in.data(), a.data(), N, H, c.rms_eps);
  MatT<T> att = attention(op, l, a, layout, io);
  if (tp) tp->a1 = std::move(a);
  hook(&hook_names::attn_out, att);
  if (rm != T(1)) att *= rm;
  x += att;
  if (tp) tp->x_mid = x;
  a.resize(N, H);
  op.rmsnorm(x.data(), L.ln_post.data(), a.data(), N, H, c.rms_eps);
  hook(&hook_names::ffn_in, a);
  MatT<T> mo = run_ffn(m, l, a, layout, io);
  if (tp) tp->a2 = std::move(a);
  hook(&hook_names::moe_out, mo);
  if (rm != T(1)) mo *= rm;
  x += mo;
  hook(&hook_names::resid_post, x);
}

#define MOEDIT_BLOCK_INSTANTIATE(T)                                                                            \
  template void run_block<T>(const Model&, int, MatT<T>&, const TokenLayout&, const BlockIO<T>&);             \
  template MatT<T> run_ffn<T>(const Model&, int, const MatT<T>&, const TokenLayout&, const BlockIO<T>&);

MOEDIT_BLOCK_INSTANTIATE(float)
MOEDIT_BLOCK_INSTANTIATE(double)

}  // namespace moedit
