// The Tracer: the clean run (every restorable site captured), the corrupted run (and its cache), and Tracer::run,
// which prunes, deduplicates and shares prefixes of restorations before batching them to an engine.
#include "tracing/trace_internal.h"

#include <algorithm>
#include <array>
#include <map>
#include <numeric>
#include <stdexcept>
#include <tuple>

#include "io/errors.h"

namespace moedit::trace {

namespace {

// Rows of each sequence of a forward's layout: sequence s holds rows [off[s], off[s] + its length).
std::vector<int> sequence_offsets(const TokenLayout& lay) {
  std::vector<int> off(size_t(lay.n_seqs), -1);
  for (int i = 0; i < int(lay.seq.size()); ++i) {
    int& o = off[size_t(lay.seq[size_t(i)])];
    if (o < 0) o = i;
    if (o + lay.pos[size_t(i)] != i) throw std::logic_error("trace: a sequence's rows are not consecutive");
  }
  return off;
}

// Rows [off, off + n) of v: moved out when they are all of it (one prompt), copied otherwise.
MatR take_rows(MatR& v, int off, int n) {
  if (off == 0 && n == v.rows()) return std::move(v);
  return v.middleRows(off, n);
}

}  // namespace

HookFn Tracer::Impl::noise_hook(const std::vector<Impl*>& fs, const std::vector<std::pair<int, int>>& owner) {
  return [fs, owner](Eigen::Ref<MatR> act, const HookContext& ctx) {
    for (int i = 0; i < int(act.rows()); ++i) {
      const auto [k, n] = owner[size_t(ctx.layout.seq[size_t(i)])];
      const Impl& f = *fs[size_t(k)];
      const int p = ctx.layout.pos[size_t(i)];
      if (p < f.b || p >= f.e) continue;
      const MatR& nz = f.noise[size_t(n)];
      if (f.replace)
        act.row(i) = nz.row(p - f.b);
      else
        act.row(i) += nz.row(p - f.b);
    }
  };
}

void Tracer::Impl::run_clean(const std::vector<Impl*>& fs) {
  const auto t0 = Clock::now();
  const Model& m = fs[0]->m;
  const int L = fs[0]->L, E = fs[0]->c.n_experts, n_shared = fs[0]->c.n_shared_experts;
  // Capture every site any kind may restore.
  Hooks h;
  std::vector<std::shared_ptr<Hooks::Capture>> rp, at, mo, sh(static_cast<size_t>(L));
  std::vector<std::vector<std::shared_ptr<Hooks::Capture>>> she(static_cast<size_t>(L)), ex(static_cast<size_t>(L));
  for (int l = 0; l < L; ++l) {
    rp.push_back(h.capture(hook_names::resid_post(l)));
    at.push_back(h.capture(hook_names::attn_out(l)));
    mo.push_back(h.capture(hook_names::moe_out(l)));
    const FFNWeights& w = m.weights().layers[size_t(l)].ffn;
    if (!w.moe) continue;
    if (w.has_shared) sh[size_t(l)] = h.capture(hook_names::shared_out(l));
    for (int j = 0; w.has_shared && n_shared > 1 && j < n_shared; ++j)
      she[size_t(l)].push_back(h.capture(hook_names::shared_expert_out(l, j)));
    for (int x = 0; x < E; ++x) ex[size_t(l)].push_back(h.capture(hook_names::expert_out(l, x)));
  }
  std::vector<std::vector<int32_t>> seqs;
  for (const Impl* f : fs) seqs.push_back(f->ids);
  ForwardOptions fo;
  fo.hooks = &h;
  fo.logits_all = false;
  ForwardOutput out = m.forward(seqs, fo);
  const std::vector<int> off = sequence_offsets(out.layout);
  const int V = int(out.logits.cols());
  for (size_t k = 0; k < fs.size(); ++k) {
    Impl& f = *fs[k];
    const int o = off[k], S = f.S;
    const float* z = out.logits.row(int(k)).data();
    if (f.answer < 0) f.answer = int(std::max_element(z, z + V) - z);
    f.high = prob_of(z, V, f.answer);
    f.clean_routing.resize(size_t(L));
    f.resid_post.resize(size_t(L));
    f.attn.resize(size_t(L));
    f.moe.resize(size_t(L));
    f.shared.resize(size_t(L));
    f.shared_expert.assign(size_t(L), {});
    f.expert_cap = ex;
    f.expert_row.assign(size_t(L), {});
    for (int l = 0; l < L; ++l) {
      const LayerRouting& rt = out.routing[size_t(l)];
      if (rt.ids.rows() > 0) {
        f.clean_routing[size_t(l)].ids = rt.ids.middleRows(o, S);
        f.clean_routing[size_t(l)].weights = rt.weights.middleRows(o, S);
      }
      f.resid_post[size_t(l)] = take_rows(rp[size_t(l)]->value, o, S);
      f.attn[size_t(l)] = take_rows(at[size_t(l)]->value, o, S);
      f.moe[size_t(l)] = take_rows(mo[size_t(l)]->value, o, S);
      if (sh[size_t(l)]) f.shared[size_t(l)] = take_rows(sh[size_t(l)]->value, o, S);
      for (const auto& cap : she[size_t(l)]) f.shared_expert[size_t(l)].push_back(take_rows(cap->value, o, S));
      f.expert_row[size_t(l)].assign(ex[size_t(l)].size(), std::vector<int>(size_t(S), -1));
    }
    f.stats.setup_flops += f.full_forward_flops(1);
  }
  // An expert's capture holds its routed rows of every prompt: map each prompt's positions to them.
  for (int l = 0; l < L; ++l)
    for (size_t x = 0; x < ex[size_t(l)].size(); ++x) {
      const Hooks::Capture& cap = *ex[size_t(l)][x];
      for (int r = 0; r < int(cap.tokens.size()); ++r) {
        const int tok = cap.tokens[size_t(r)];
        fs[size_t(out.layout.seq[size_t(tok)])]->expert_row[size_t(l)][x][size_t(out.layout.pos[size_t(tok)])] = r;
      }
    }
  const double share = since(t0) / double(fs.size());
  for (Impl* f : fs) f->stats.setup_seconds += share;
}

void Tracer::Impl::run_corrupted(const std::vector<Impl*>& fs) {
  const auto t0 = Clock::now();
  const Model& m = fs[0]->m;
  const int L = fs[0]->L;
  std::vector<std::vector<int32_t>> seqs;
  std::vector<std::pair<int, int>> owner;
  for (size_t k = 0; k < fs.size(); ++k) {
    fs[k]->cache_base = int(seqs.size());
    for (int n = 0; n < fs[k]->samples; ++n) {
      seqs.push_back(fs[k]->ids);
      owner.emplace_back(int(k), n);
    }
  }
  auto cache = std::make_shared<KVCache>();
  Hooks h;
  h.add(hook_names::embed(), noise_hook(fs, owner));
  std::vector<std::shared_ptr<Hooks::Capture>> caps;
  for (int l = 0; l < L; ++l) caps.push_back(h.capture(hook_names::resid_pre(l)));
  ForwardOptions fo;
  fo.hooks = &h;
  fo.cache = cache.get();
  fo.logits_all = false;
  fo.record_routing = false;
  ForwardOutput out = m.forward(seqs, fo);
  const std::vector<int> off = sequence_offsets(out.layout);
  for (Impl* f : fs) {
    double s = 0;
    for (int n = 0; n < f->samples; ++n)
      s += prob_of(out.logits.row(f->cache_base + n).data(), int(out.logits.cols()), f->answer);
    f->low = s / f->samples;
    f->corr_in.resize(size_t(L + 1));
    f->cache = cache;
    f->have_cache = true;
    f->stats.setup_flops += f->full_forward_flops(f->samples);
  }
  for (int l = 0; l <= L; ++l) {  // layer by layer, each capture dropped once split
    MatR& v = l < L ? caps[size_t(l)]->value : out.hidden;
    for (Impl* f : fs) f->corr_in[size_t(l)] = take_rows(v, off[size_t(f->cache_base)], f->samples * f->S);
    v = MatR();
  }
  const double share = since(t0) / double(fs.size());
  for (Impl* f : fs) f->stats.setup_seconds += share;
}

std::unique_ptr<Tracer::Impl> Tracer::Impl::make(const Model& m, Prompt p, bool replace) {
  const ModelConfig& c = m.config();
  auto I = std::make_unique<Tracer::Impl>(m);
  I->S = int(p.ids.size());
  I->L = c.n_layers;
  I->H = c.hidden;
  I->b = p.subject_begin;
  I->e = p.subject_end;
  I->samples = int(p.noise.size());
  I->replace = replace;
  if (I->S == 0) throw InputError("the prompt has no tokens");
  if (I->b < 0 || I->e > I->S || I->b >= I->e)
    throw InputError("subject token range [" + std::to_string(I->b) + ", " + std::to_string(I->e) +
                     ") is empty or outside the prompt's " + std::to_string(I->S) + " tokens");
  if (p.noise.empty()) throw InputError("no noise samples");
  for (const MatR& n : p.noise)
    if (n.rows() != I->e - I->b || n.cols() != I->H)
      throw InputError("noise must be [samples, " + std::to_string(I->e - I->b) + ", " + std::to_string(I->H) + "]");
  if (p.answer >= c.vocab_size)
    throw InputError("answer token " + std::to_string(p.answer) + " is outside the vocabulary");
  I->ids = std::move(p.ids);
  I->noise = std::move(p.noise);
  I->answer = p.answer;
  return I;
}

Tracer::Tracer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Tracer::Tracer(const Model& m, std::vector<int32_t> ids, int subject_begin, int subject_end, Noise noise,
               bool replace, int answer)
    : impl_(Impl::make(m, {std::move(ids), subject_begin, subject_end, std::move(noise), answer}, replace)) {
  Impl::run_clean({impl_.get()});
}

std::vector<Tracer> Tracer::together(const Model& m, std::vector<Prompt> prompts, bool replace) {
  std::vector<Tracer> out;
  std::vector<Impl*> fs;
  for (size_t k = 0; k < prompts.size(); ++k) {
    out.push_back(Tracer(Impl::make(m, std::move(prompts[k]), replace)));
    fs.push_back(out.back().impl_.get());
    if (fs.back()->samples != fs[0]->samples)
      throw InputError("prompts traced together need the same number of noise samples (prompt " + std::to_string(k) +
                       " has " + std::to_string(fs.back()->samples) + ", prompt 0 has " +
                       std::to_string(fs[0]->samples) + ")");
  }
  if (fs.empty()) return out;
  Impl::run_clean(fs);
  Impl::run_corrupted(fs);
  for (Impl* f : fs) f->stats.traced_together = int64_t(fs.size());
  return out;
}

Tracer::Tracer(Tracer&&) noexcept = default;
Tracer& Tracer::operator=(Tracer&&) noexcept = default;
Tracer::~Tracer() = default;

int Tracer::answer() const { return impl_->answer; }
double Tracer::high_score() const { return impl_->high; }
int Tracer::n_tokens() const { return impl_->S; }
int Tracer::samples() const { return impl_->samples; }
const LayerRouting& Tracer::clean_routing(int layer) const { return impl_->clean_routing[size_t(layer)]; }
const TraceStats& Tracer::stats() const { return impl_->stats; }
void Tracer::reset_stats() {
  const int64_t together = impl_->stats.traced_together;
  impl_->stats = {};
  impl_->stats.traced_together = together;
}

double Tracer::low_score() {
  if (!impl_->have_cache) Impl::run_corrupted({impl_.get()});
  return impl_->low;
}

const float* Tracer::clean_expert_row(int layer, int expert, int token) const {
  Patch p{Kind::Expert, token, layer, expert};
  impl_->validate({p});
  return impl_->clean_row(p);
}

std::vector<double> Tracer::run(const std::vector<Restoration>& rs, bool naive, int batch_rows,
                                const ProgressFn& progress) {
  return run_together({this}, {rs}, naive, batch_rows, progress)[0];
}

namespace {

using Key = std::vector<std::array<int, 4>>;

Key sites_at(const Restoration& r, int layer) {
  Key k;
  for (const Patch& p : r)
    if (p.layer == layer) k.push_back({int(p.kind), p.layer, p.token, p.expert});
  std::sort(k.begin(), k.end());
  return k;
}

}  // namespace

// One tracer's share of run_together: its distinct restorations and the shared prefixes among them.
struct Tracer::Work {
  Impl* f = nullptr;
  std::vector<double> out;         // per requested restoration
  std::vector<Restoration> distinct;
  std::vector<int> which;          // requested → distinct index, −1: nothing left to restore (low_score)
  std::vector<double> res;         // per distinct restoration
  std::vector<Restoration> prefixes;  // stage A restorations
  std::vector<int> prefix_k;          // their stop layer
  std::vector<int> group_of;          // distinct → prefix, −1: none
  std::vector<MatR> stage_a;          // prefix → its residual entering prefix_k

  // Cached mode computes each distinct restoration once, without its no-op patches (exact, see trace.h); a
  // restoration left empty scores low_score. Naive mode (or no pruning) runs every restoration as given.
  void dedupe(const std::vector<Restoration>& rs, bool as_given) {
    out.assign(rs.size(), 0.0);
    which.assign(rs.size(), -1);
    if (as_given) {
      distinct = rs;
      std::iota(which.begin(), which.end(), 0);
    } else {
      std::map<Key, int> seen;
      for (size_t i = 0; i < rs.size(); ++i) {
        Key key;
        Restoration r;
        for (const Patch& p : rs[i]) {
          if (p.token < f->b) continue;                            // before the subject: clean == corrupted
          if (p.layer == f->L - 1 && p.token < f->S - 1) continue;  // last layer, not the last token: never read
          key.push_back({int(p.kind), p.layer, p.token, p.expert});
          r.push_back(p);
        }
        if (r.empty()) {
          out[i] = f->low;
          continue;
        }
        std::sort(key.begin(), key.end());
        key.erase(std::unique(key.begin(), key.end()), key.end());
        auto [it, fresh] = seen.emplace(key, int(distinct.size()));
        if (fresh) distinct.push_back(std::move(r));
        which[i] = it->second;
      }
    }
    res.assign(distinct.size(), 0.0);
    group_of.assign(distinct.size(), -1);
  }

  // Shared prefixes (with pruning): restorations without Resid patches that start at the same (layer, token)
  // and patch the same sites on layers [l0, k), k ≥ l0 + 2 — attn/moe windows clipped at layer 0 — run those
  // layers once (stage A) and continue separately from layer k (stage B).
  void share_prefixes() {
    std::map<std::tuple<int, int, Key>, std::vector<int>> groups;
    for (size_t i = 0; i < distinct.size(); ++i) {
      const Restoration& r = distinct[i];
      if (std::any_of(r.begin(), r.end(), [](const Patch& p) { return p.kind == Kind::Resid; })) continue;
      int l0, t0;
      f->start_of(r, l0, t0);
      groups[{l0, t0, sites_at(r, l0)}].push_back(int(i));
    }
    for (const auto& [key, members] : groups) {
      if (members.size() < 2) continue;
      const int l0 = std::get<0>(key);
      int k = l0 + 1;
      while (k < f->L) {
        const Key ref = sites_at(distinct[size_t(members[0])], k);
        bool same = !ref.empty();
        for (size_t m = 1; m < members.size() && same; ++m) same = sites_at(distinct[size_t(members[m])], k) == ref;
        if (!same) break;
        ++k;
      }
      if (k < l0 + 2 || k >= f->L) continue;
      Restoration pre;
      for (const Patch& p : distinct[size_t(members[0])])
        if (p.layer < k) pre.push_back(p);
      for (int mbr : members) group_of[size_t(mbr)] = int(prefixes.size());
      prefixes.push_back(std::move(pre));
      prefix_k.push_back(k);
    }
    stage_a.resize(prefixes.size());
  }

  std::vector<double> scores() {
    for (size_t j = 0; j < out.size(); ++j)
      if (which[j] >= 0) out[j] = res[size_t(which[j])];
    return std::move(out);
  }
};

std::vector<std::vector<double>> Tracer::run_together(const std::vector<Tracer*>& tracers,
                                                      const std::vector<std::vector<Restoration>>& rs, bool naive,
                                                      int batch_rows, const ProgressFn& progress) {
  if (tracers.size() != rs.size()) throw std::invalid_argument("Tracer::run_together: one restoration list per tracer");
  std::vector<Work> work(tracers.size());
  int64_t total = 0, ndone = 0;
  for (size_t i = 0; i < tracers.size(); ++i) {
    Impl& I = *tracers[i]->impl_;
    for (const Restoration& r : rs[i]) I.validate(r);
    if (!naive && !I.have_cache) Impl::run_corrupted({&I});
    work[i].f = &I;
    work[i].dedupe(rs[i], naive || !tracers[i]->prune_);
    if (!naive && tracers[i]->prune_) work[i].share_prefixes();
    I.stats.restorations += int64_t(rs[i].size());
    I.stats.computed += int64_t(work[i].distinct.size());
    I.stats.shared_prefixes += int64_t(work[i].prefixes.size());
    total += int64_t(work[i].distinct.size());
  }

  if (naive) {  // the reference: each tracer alone, whole forwards
    for (Work& w : work) {
      const auto t_start = Clock::now();
      Impl& I = *w.f;
      size_t i = 0;
      while (i < w.distinct.size()) {
        std::vector<const Restoration*> batch;
        int64_t rows = 0;
        const size_t first = i;
        do {
          batch.push_back(&w.distinct[i++]);
          rows += int64_t(I.samples) * I.S;
        } while (i < w.distinct.size() && batch_rows > 0 && rows + int64_t(I.samples) * I.S <= batch_rows);
        const std::vector<double> p = I.run_naive(batch);
        std::copy(p.begin(), p.end(), w.res.begin() + std::ptrdiff_t(first));
        I.stats.batches += 1;
        ndone += int64_t(batch.size());
        if (progress) progress(ndone, total);
      }
      I.stats.seconds += since(t_start);
    }
  } else {
    // Tracers that share a corrupted cache (one together() call) share batches; plans are packed by start layer
    // and token.
    using Plan = Impl::Plan;
    struct Ref {
      size_t w;
      int k;  // prefix (stage A) or distinct restoration (stage B)
    };
    auto run_batched = [&](const std::vector<Plan>& plans, const std::vector<Ref>& refs, auto&& done) {
      std::vector<int> order(plans.size());
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
        const Plan &x = plans[size_t(a)], &y = plans[size_t(b)];
        return x.l0 != y.l0 ? x.l0 < y.l0 : x.t0 < y.t0;
      });
      size_t i = 0;
      while (i < order.size()) {
        std::vector<Plan> batch;
        std::vector<int> idx;
        int64_t rows = 0;
        while (i < order.size()) {
          const Plan& p = plans[size_t(order[i])];
          if (!batch.empty() && (batch_rows <= 0 || rows + int64_t(p.f->samples) * p.f->S > batch_rows)) break;
          batch.push_back(p);
          idx.push_back(order[i++]);
          rows += int64_t(p.f->samples) * (p.f->S - p.t0);
        }
        std::vector<Impl::Result> r = Impl::run_plans(batch);
        std::vector<Impl*> in_batch;
        for (size_t j = 0; j < idx.size(); ++j) {
          done(refs[size_t(idx[j])], std::move(r[j]));
          in_batch.push_back(batch[j].f);
        }
        std::sort(in_batch.begin(), in_batch.end());
        in_batch.erase(std::unique(in_batch.begin(), in_batch.end()), in_batch.end());
        for (Impl* f : in_batch) f->stats.batches += 1;
      }
    };
    std::map<const KVCache*, std::vector<size_t>> by_cache;
    for (size_t i = 0; i < work.size(); ++i) by_cache[work[i].f->cache.get()].push_back(i);
    for (const auto& [cache, members] : by_cache) {
      const auto t_start = Clock::now();
      std::vector<Plan> plans;
      std::vector<Ref> refs;
      for (size_t wi : members) {
        Work& w = work[wi];
        for (size_t g = 0; g < w.prefixes.size(); ++g) {
          plans.push_back(w.f->plan_of(w.prefixes[g]));
          plans.back().stop = w.prefix_k[g];
          refs.push_back({wi, int(g)});
        }
      }
      run_batched(plans, refs, [&](const Ref& r, Impl::Result&& res) { work[r.w].stage_a[size_t(r.k)] = std::move(res.rows); });
      plans.clear();
      refs.clear();
      for (size_t wi : members) {
        Work& w = work[wi];
        for (size_t i = 0; i < w.distinct.size(); ++i) {
          const int g = w.group_of[i];
          plans.push_back(g < 0 ? w.f->plan_of(w.distinct[i])
                                : w.f->plan_of(w.distinct[i], &w.stage_a[size_t(g)], w.prefix_k[size_t(g)]));
          refs.push_back({wi, int(i)});
        }
      }
      run_batched(plans, refs, [&](const Ref& r, Impl::Result&& res) {
        work[r.w].res[size_t(r.k)] = res.p;
        if (progress) progress(++ndone, total);
      });
      const double share = since(t_start) / double(members.size());
      for (size_t wi : members) work[wi].f->stats.seconds += share;
    }
  }
  std::vector<std::vector<double>> out;
  for (Work& w : work) out.push_back(w.scores());
  return out;
}

}  // namespace moedit::trace
