// The forward pass: one code path for every family in the architecture table.
#include "model/model.h"

#include <omp.h>

#include <algorithm>
#include <cmath>

#include "model/block.h"
#include "model/memory.h"
#include "model/router.h"
#include "io/errors.h"
#include "io/safetensors.h"

namespace moedit {

void Model::set_backend(const Backend& b) {
  be_ = &b;
  if (!b.host_memory() && std::find(devices_.begin(), devices_.end(), &b) == devices_.end()) devices_.push_back(&b);
}

void Model::forget_device_copies(const void* host) const {
  if (host)
    for (const Backend* be : devices_) be->forget(host);
}

Model::~Model() {
  if (devices_.empty()) return;
  for_each_tensor(
      w_,
      [&](const Weight& W) {
        if (W.empty()) return;
        const ops::WeightView v = W.kernel();
        forget_device_copies(v.data);
        forget_device_copies(v.scales.data);
      },
      [&](const VecF& v) { forget_device_copies(v.data()); },
      [&](const MatR& m) { forget_device_copies(m.data()); });
  forget_device_copies(inv_freq_.data());
}

void Model::linear(const float* x, int n, int in, const Weight& W, float* y, const VecF& b) const {
  host_backend().linear(x, size_t(in), n, in, W.kernel(), int(W.rows()), y, size_t(W.rows()), b.size() ? b.data() : nullptr);
}

void Model::rmsnorm(const MatR& x, const VecF& w, MatR& y) const {
  y.resize(x.rows(), x.cols());
  host_backend().rmsnorm(x.data(), w.data(), y.data(), int(x.rows()), int(x.cols()), cfg_.rms_eps);
}

// The key of expert e of a bank on x [N, H]: silu(x·gateᵀ) ⊙ x·upᵀ [N, I], the input of its down projection.
void Model::expert_key(const ExpertBank& b, int e, const MatR& x, MatR& key) const {
  const int N = int(x.rows());
  MatR gu(N, 2 * b.I);
  host_backend().linear(x.data(), size_t(b.H), N, b.H, b.gate[size_t(e)].kernel(), b.I, gu.data(), 2 * size_t(b.I));
  host_backend().linear(x.data(), size_t(b.H), N, b.H, b.up[size_t(e)].kernel(), b.I, gu.data() + b.I, 2 * size_t(b.I));
  key.resize(N, b.I);
  host_backend().silu_mul(gu.data(), N, b.I, key.data());
}

// The whole SwiGLU of expert e on x [N, H] → [N, H].
MatR Model::swiglu(const ExpertBank& b, int e, const MatR& x) const {
  MatR key, y(x.rows(), b.H);
  expert_key(b, e, x, key);
  linear(key.data(), int(x.rows()), b.I, b.down[size_t(e)], y.data());
  return y;
}

TokenLayout layout_from_lengths(const std::vector<int>& lengths, const std::vector<int>& first_pos) {
  TokenLayout t;
  t.n_seqs = int(lengths.size());
  for (size_t s = 0; s < lengths.size(); ++s)
    for (int i = 0; i < lengths[s]; ++i) {
      t.seq.push_back(int(s));
      t.pos.push_back(first_pos[s] + i);
    }
  return t;
}

TokenLayout make_layout(const std::vector<std::vector<int32_t>>& seqs, const KVCache* cache) {
  std::vector<int> lengths, first;
  for (size_t b = 0; b < seqs.size(); ++b) {
    lengths.push_back(int(seqs[b].size()));
    first.push_back(cache ? cache->length(int(b)) : 0);
  }
  return layout_from_lengths(lengths, first);
}

void KVCache::reserve(int n_layers, int n_seqs, int tokens, int kw, int vw, const Backend& be) {
  if (layers_.empty()) {
    layers_.resize(size_t(n_layers));
    kw_ = kw;
    vw_ = vw;
    be_ = &be;
  }
  if (int(layers_.size()) != n_layers || kw_ != kw || vw_ != vw)
    throw std::invalid_argument("KVCache: this cache belongs to a model of another shape");
  if (be_ != &be) throw std::invalid_argument("KVCache: this cache lives on backend " + be_->name());
  if (std::none_of(layers_.begin(), layers_.end(), [](const Layer& L) { return L.k.bytes() != 0; })) {
    // Nothing allocated yet: every layer (a gathered cache keeps its empty lower layers, and has others).
    cap_ = std::max(cap_, tokens);
    len_.resize(size_t(std::max(n_seqs, int(len_.size()))), 0);
    for (auto& L : layers_) {
      L.k = Buf(be, sizeof(float) * len_.size() * size_t(cap_) * size_t(kw_));
      L.v = Buf(be, sizeof(float) * len_.size() * size_t(cap_) * size_t(vw_));
    }
    return;
  }
  grow(n_seqs, tokens);
}

Buf KVCache::relayout(const Buf& b, int w, int n_new, int cap_new) const {
  Buf out(*be_, sizeof(float) * size_t(n_new) * size_t(cap_new) * size_t(w));
  const int n_old = int(len_.size());  // every row, cached or written by this forward's earlier layers
  be_->copy2d(b.as<float>(), size_t(cap_) * w, out.as<float>(), size_t(cap_new) * w, n_old, cap_ * w);
  return out;
}

void KVCache::grow(int n_seqs, int tokens) {
  const int n_old = int(len_.size());
  const int n_new = std::max(n_old, n_seqs);
  const int cap_new = tokens > cap_ ? std::max(tokens, 2 * cap_) : cap_;
  if (n_new == n_old && cap_new == cap_) return;
  for (auto& L : layers_) {
    if (!L.k.bytes()) continue;  // a layer this (gathered) cache may not run stays empty
    L.k = relayout(L.k, kw_, n_new, cap_new);
    L.v = relayout(L.v, vw_, n_new, cap_new);
  }
  len_.resize(size_t(n_new), 0);
  cap_ = cap_new;
}

KVCache KVCache::gather(const std::vector<int>& from, const std::vector<int>& lengths, int first_layer,
                        int capacity) const {
  if (from.size() != lengths.size()) throw std::invalid_argument("KVCache::gather: from/lengths size mismatch");
  const size_t n = from.size();
  for (size_t i = 0; i < n; ++i) {
    const int s = from[i];
    if (s < 0 || s >= n_seqs() || lengths[i] < 0 || lengths[i] > len_[size_t(s)])
      throw std::invalid_argument("KVCache::gather: sequence or length out of range");
  }
  KVCache c;
  c.kw_ = kw_;
  c.vw_ = vw_;
  c.be_ = be_;
  c.len_ = lengths;
  c.cap_ = std::max({1, capacity, n ? *std::max_element(lengths.begin(), lengths.end()) : 0});
  c.layers_.resize(layers_.size());
  // One scattered copy per layer and tensor: destination row i·cap + p takes source row from[i]·cap_ + p for
  // p < lengths[i] (−1: a row past the prefix, left for the continuation to write).
  std::vector<int> src(n * size_t(c.cap_), -1);
  for (size_t i = 0; i < n; ++i)
    for (int p = 0; p < lengths[i]; ++p) src[i * size_t(c.cap_) + size_t(p)] = from[i] * cap_ + p;
  Buf rows(*be_, sizeof(int) * src.size());
  be_->to_device(rows.as<int>(), src.data(), sizeof(int) * src.size());
  for (int l = std::max(first_layer, 0); l < int(layers_.size()); ++l) {
    if (!holds_layer(l)) continue;
    Layer& D = c.layers_[size_t(l)];
    D.k = Buf(*be_, sizeof(float) * n * size_t(c.cap_) * size_t(kw_));
    D.v = Buf(*be_, sizeof(float) * n * size_t(c.cap_) * size_t(vw_));
    be_->copy_rows(k_row(l, 0, 0), size_t(kw_), rows.as<int>(), int(src.size()), c.k_row(l, 0, 0), size_t(kw_), kw_);
    be_->copy_rows(v_row(l, 0, 0), size_t(vw_), rows.as<int>(), int(src.size()), c.v_row(l, 0, 0), size_t(vw_), vw_);
  }
  return c;
}

std::shared_ptr<Model> Model::load(const std::string& path, const LoadOptions& opt) {
  ModelConfig cfg = load_config(path);
  if (opt.deepseek_v2_transformers_norm && cfg.model_type == "deepseek_v2") cfg.norm_topk_prob = false;
  const CheckpointMemory need = checkpoint_memory(cfg, path);
  const MachineMemory have = machine_memory();
  check_fits(path, need, have);
  Weights w;
  std::shared_ptr<const TensorStore> store;
  try {
    store = std::make_shared<const TensorStore>(path);
    w = load_weights(cfg, store);
  } catch (const std::bad_alloc&) {
    throw ResourceError(path + ": out of memory while loading (needs about " + gb(need.fp32_bytes) +
                        " of fp32 copies besides " + gb(need.file_bytes) + " of mapped weights; " +
                        gb(have.available) + " of " + gb(have.ram) + " RAM was available)");
  }
  if (opt.mlock)
    for (const auto& f : store->files()) f->lock();
  auto m = std::make_shared<Model>(std::move(cfg), std::move(w));
  m->path_ = path;
  m->prefetch_ = opt.prefetch;
  return m;
}

namespace {
// RoPE inverse frequencies [d/2] in fp32 as transformers computes them: default 1/θ^(2i/d) (linear scaling divides),
// or YaRN (_compute_yarn_parameters): a ramp between interpolated (÷factor) and original frequencies.
std::vector<float> rope_inv_freq(const ModelConfig& c) {
  const int d = c.head_dim;
  std::vector<float> inv(size_t(d / 2));
  const ModelConfig::Yarn& y = c.yarn;
  double low = 0, high = 0;
  if (y.on) {
    auto corr = [&](double rot) {
      return d * std::log(double(y.original_max) / (rot * 2 * M_PI)) / (2 * std::log(double(c.rope_theta)));
    };
    low = std::max(std::floor(corr(y.beta_fast)), 0.0);
    high = std::min(std::ceil(corr(y.beta_slow)), double(d - 1));
    if (low == high) high += 0.001;
  }
  for (int i = 0; i < d / 2; ++i) {
    const float pos_freq = std::pow(c.rope_theta, float(2 * i) / float(d));
    if (!y.on) {
      inv[size_t(i)] = 1.f / pos_freq / c.rope_linear_factor;
      continue;
    }
    const float extrapolation = 1.f / pos_freq, interpolation = 1.f / (float(y.factor) * pos_freq);
    const float ramp = std::clamp((float(i) - float(low)) / (float(high) - float(low)), 0.f, 1.f);
    const float extra = 1.f - ramp;
    inv[size_t(i)] = interpolation * (1.f - extra) + extrapolation * extra;
  }
  return inv;
}
}  // namespace

Model::Model(ModelConfig cfg, Weights w)
    : cfg_(std::move(cfg)), w_(std::move(w)), inv_freq_(rope_inv_freq(cfg_)), route_(moedit::route_spec(cfg_)) {}

MatR Model::embed(const std::vector<int32_t>& ids, const TokenLayout& layout, const Hooks* hooks) const {
  const int N = int(ids.size()), H = cfg_.hidden;
  MatR x(N, H);
  for (int i = 0; i < N; ++i) {
    const int32_t id = ids[size_t(i)];
    if (id < 0 || id >= cfg_.vocab_size)
      throw InputError("token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                       std::to_string(cfg_.vocab_size) + ")");
    w_.embed.row(id, x.row(i).data());
  }
  if (hooks && !hooks->empty()) hooks->run(hook_names::embed(), x, {hook_names::embed(), -1, -1, layout, nullptr});
  if (cfg_.embedding_multiplier != 1.f) x *= cfg_.embedding_multiplier;
  return x;
}

ops::AttnShape attn_shape(const ModelConfig& c) {
  if (c.arch->attention == AttentionKind::MLA) return {c.n_heads, c.n_heads, c.qk_dim(), c.v_head_dim, c.attn_scale, 0};
  return {c.n_heads, c.n_kv_heads, c.head_dim, c.head_dim, c.attn_scale, c.sliding_window};
}

void Model::route(const MatR& z, LayerRouting& r, int layer) const {
  const int N = int(z.rows()), k = cfg_.top_k;
  r.ids.resize(N, k);
  r.weights.resize(N, k);
  const VecF* bias = layer >= 0 ? &w_.layers[size_t(layer)].ffn.router_bias : nullptr;
  host_backend().route(z.data(), N, route_, bias && bias->size() ? bias->data() : nullptr, r.ids.data(), r.weights.data());
}

MatR Model::ffn(int l, const MatR& a, const TokenLayout& layout, const Hooks* hooks, LayerRouting* routing) const {
  BlockIO<float> io;
  io.hooks = hooks;
  io.routing = routing;
  return run_ffn(*this, l, a, layout, io);
}

MatR Model::ffn_reference(int l, const MatR& a) const {
  const FFNWeights& f = w_.layers[size_t(l)].ffn;
  const int N = int(a.rows()), H = cfg_.hidden;
  if (!f.moe) return swiglu(f.experts, 0, a);
  MatR z = a * f.router.transpose();
  LayerRouting r;
  route(z, r, l);
  MatR y = MatR::Zero(N, H);
  const int I = f.experts.I;
  for (int t = 0; t < N; ++t) {
    std::vector<int> order(static_cast<size_t>(cfg_.top_k));
    for (int j = 0; j < cfg_.top_k; ++j) order[size_t(j)] = j;
    std::sort(order.begin(), order.end(), [&](int x, int w) { return r.ids(t, x) < r.ids(t, w); });
    for (int j : order) {
      const int e = r.ids(t, j);
      const MatR G = f.experts.gate[size_t(e)].to_f32(), U = f.experts.up[size_t(e)].to_f32();
      const MatR dn = f.experts.down[size_t(e)].to_f32();
      const Eigen::VectorXf g = G * a.row(t).transpose(), u = U * a.row(t).transpose();
      Eigen::VectorXf key(I);
      for (int i = 0; i < I; ++i) key[i] = ops::silu(g[i]) * u[i];
      y.row(t) += r.weights(t, j) * (dn * key).transpose();
    }
  }
  if (f.has_shared) {
    MatR s = swiglu(f.shared, 0, a);
    if (f.shared_gate.size())
      for (int t = 0; t < N; ++t) s.row(t) *= ops::sigmoid(a.row(t).dot(f.shared_gate.transpose()));
    y += s;
  }
  return y;
}

void Model::block(int l, MatR& x, const TokenLayout& layout, KVCache* cache, const Hooks* hooks,
                  LayerRouting* routing) const {
  if (prefetch_ && l + 1 < cfg_.n_layers) prefetch_layer(w_, l + 1);
  if (be_->memory_limit()) {  // streaming: this layer's weights stay while it runs, the next one's upload meanwhile
    std::vector<Backend::HostRange> now = layer_ranges(w_, l), next;
    if (!inv_freq_.empty()) now.push_back({inv_freq_.data(), sizeof(float) * inv_freq_.size()});
    if (l + 1 < cfg_.n_layers) next = layer_ranges(w_, l + 1);
    be_->stage(now, next);
  }
  BlockIO<float> io;
  io.cache = cache;
  io.hooks = hooks;
  io.routing = routing;
  run_block(*this, l, x, layout, io);
}

MatR Model::logits(const MatR& x, const TokenLayout& layout, const Hooks* hooks) const {
  MatR h;
  rmsnorm(x, w_.final_norm, h);
  if (hooks && !hooks->empty())
    hooks->run(hook_names::final_norm(), h, {hook_names::final_norm(), -1, -1, layout, nullptr});
  const Weight& W = w_.output_matrix();
  MatR out(h.rows(), W.rows());
  linear(h.data(), int(h.rows()), cfg_.hidden, W, out.data());
  if (cfg_.logits_scaling != 1.f) out /= cfg_.logits_scaling;
  return out;
}

ForwardOutput Model::forward(const std::vector<std::vector<int32_t>>& seqs, const ForwardOptions& opt) const {
  if (seqs.empty()) throw InputError("no sequences to run");
  // With a cache a sequence may sit out a step (no new tokens); otherwise every sequence needs tokens.
  size_t total = 0;
  for (size_t b = 0; b < seqs.size(); ++b) {
    total += seqs[b].size();
    if (seqs[b].empty() && (!opt.cache || !opt.logits_all))
      throw InputError("sequence " + std::to_string(b) + " is empty");
  }
  if (total == 0) throw InputError("no tokens to run");
  KVCache* cache = opt.cache;
  if (cache) {  // room for every sequence's new tokens
    int need = 0;
    for (size_t b = 0; b < seqs.size(); ++b) need = std::max(need, cache->length(int(b)) + int(seqs[b].size()));
    const ops::AttnShape sh = attn_shape(cfg_);
    cache->reserve(cfg_.n_layers, int(seqs.size()), need, sh.Hkv * sh.Dk, sh.Hkv * sh.Dv, *be_);
  }
  ForwardOutput out;
  out.layout = make_layout(seqs, cache);
  std::vector<int32_t> flat;
  for (const auto& s : seqs) flat.insert(flat.end(), s.begin(), s.end());
  MatR x = embed(flat, out.layout, opt.hooks);
  const int last = opt.stop_after_layer >= 0 ? std::min(opt.stop_after_layer, cfg_.n_layers - 1) : cfg_.n_layers - 1;
  out.routing.resize(size_t(cfg_.n_layers));
  for (int l = 0; l <= last; ++l)
    block(l, x, out.layout, cache, opt.hooks, opt.record_routing ? &out.routing[size_t(l)] : nullptr);
  if (cache)
    for (size_t b = 0; b < seqs.size(); ++b) cache->len_[b] += int(seqs[b].size());
  if (opt.stop_after_layer < 0) {
    if (opt.logits_all) {
      out.logits = logits(x, out.layout, opt.hooks);
    } else {
      MatR lastrows(int(seqs.size()), cfg_.hidden);
      TokenLayout ll;
      ll.n_seqs = int(seqs.size());
      int t = 0;
      for (size_t b = 0; b < seqs.size(); ++b) {
        t += int(seqs[b].size());
        lastrows.row(int(b)) = x.row(t - 1);
        ll.seq.push_back(int(b));
        ll.pos.push_back(out.layout.pos[size_t(t - 1)]);
      }
      out.logits = logits(lastrows, ll, opt.hooks);
    }
  }
  out.hidden = std::move(x);
  return out;
}

}  // namespace moedit
