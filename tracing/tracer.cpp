// The Tracer: the clean run (every restorable site captured), the corrupted run (and its cache), and Tracer::run,
// which prunes, deduplicates and shares prefixes of restorations before batching them to an engine.
#include "tracing/trace_internal.h"

#include <algorithm>
#include <array>
#include <map>
#include <numeric>
#include <tuple>

#include "io/errors.h"

namespace moedit::trace {

void Tracer::Impl::run_corrupted(bool with_cache, TraceStats& st) {
  const auto t0 = Clock::now();
  std::vector<std::vector<int32_t>> seqs(size_t(samples), ids);
  Hooks h;
  h.add(hook_names::embed(), noise_hook());
  std::vector<std::shared_ptr<Hooks::Capture>> caps;
  if (with_cache) {
    for (int l = 0; l < L; ++l) caps.push_back(h.capture(hook_names::resid_pre(l)));
    cache.clear();
  }
  ForwardOptions fo;
  fo.hooks = &h;
  fo.cache = with_cache ? &cache : nullptr;
  fo.logits_all = false;
  fo.record_routing = false;
  ForwardOutput f = m.forward(seqs, fo);
  double s = 0;
  for (int n = 0; n < samples; ++n) s += prob_of(f.logits.row(n).data(), int(f.logits.cols()), answer);
  low = s / samples;
  have_low = true;
  if (with_cache) {
    corr_in.resize(size_t(L + 1));
    for (int l = 0; l < L; ++l) corr_in[size_t(l)] = std::move(caps[size_t(l)]->value);
    corr_in[size_t(L)] = std::move(f.hidden);
    have_cache = true;
  }
  st.setup_flops += full_forward_flops(samples);
  st.setup_seconds += since(t0);
}

Tracer::Tracer(const Model& m, std::vector<int32_t> ids, int subject_begin, int subject_end, Noise noise,
               bool replace, int answer)
    : impl_(std::make_unique<Impl>(m)), ids_(std::move(ids)), noise_(std::move(noise)) {
  const auto t_start = Clock::now();
  Impl& I = *impl_;
  const ModelConfig& c = m.config();
  I.S = int(ids_.size());
  I.L = c.n_layers;
  I.H = c.hidden;
  I.b = subject_begin;
  I.e = subject_end;
  I.samples = int(noise_.size());
  I.replace = replace;
  I.noise = &noise_;
  I.ids = ids_;
  if (I.S == 0) throw InputError("the prompt has no tokens");
  if (subject_begin < 0 || subject_end > I.S || subject_begin >= subject_end)
    throw InputError("subject token range [" + std::to_string(subject_begin) + ", " + std::to_string(subject_end) +
                     ") is empty or outside the prompt's " + std::to_string(I.S) + " tokens");
  if (noise_.empty()) throw InputError("no noise samples");
  for (const MatR& n : noise_)
    if (n.rows() != subject_end - subject_begin || n.cols() != I.H)
      throw InputError("noise must be [samples, " + std::to_string(subject_end - subject_begin) + ", " +
                       std::to_string(I.H) + "]");
  if (answer >= c.vocab_size) throw InputError("answer token " + std::to_string(answer) + " is outside the vocabulary");

  // Clean run: capture every site any kind may restore.
  Hooks h;
  std::vector<std::shared_ptr<Hooks::Capture>> rp, at, mo, sh(size_t(I.L));
  std::vector<std::vector<std::shared_ptr<Hooks::Capture>>> she(size_t(I.L));
  I.expert_cap.assign(size_t(I.L), {});
  for (int l = 0; l < I.L; ++l) {
    rp.push_back(h.capture(hook_names::resid_post(l)));
    at.push_back(h.capture(hook_names::attn_out(l)));
    mo.push_back(h.capture(hook_names::moe_out(l)));
    const FFNWeights& w = m.weights().layers[size_t(l)].ffn;
    if (w.moe) {
      if (w.has_shared) sh[size_t(l)] = h.capture(hook_names::shared_out(l));
      for (int j = 0; w.has_shared && c.n_shared_experts > 1 && j < c.n_shared_experts; ++j)
        she[size_t(l)].push_back(h.capture(hook_names::shared_expert_out(l, j)));
      for (int ex = 0; ex < c.n_experts; ++ex) I.expert_cap[size_t(l)].push_back(h.capture(hook_names::expert_out(l, ex)));
    }
  }
  ForwardOptions fo;
  fo.hooks = &h;
  fo.logits_all = false;
  ForwardOutput f = m.forward({ids_}, fo);
  const float* z = f.logits.row(0).data();
  const int V = int(f.logits.cols());
  if (answer < 0) answer = int(std::max_element(z, z + V) - z);
  answer_ = answer;
  I.answer = answer;
  high_ = prob_of(z, V, answer);
  clean_routing_ = std::move(f.routing);
  I.resid_post.resize(size_t(I.L));
  I.attn.resize(size_t(I.L));
  I.moe.resize(size_t(I.L));
  I.shared.resize(size_t(I.L));
  I.shared_expert.resize(size_t(I.L));
  I.expert_row.assign(size_t(I.L), {});
  for (int l = 0; l < I.L; ++l) {
    I.resid_post[size_t(l)] = std::move(rp[size_t(l)]->value);
    I.attn[size_t(l)] = std::move(at[size_t(l)]->value);
    I.moe[size_t(l)] = std::move(mo[size_t(l)]->value);
    if (sh[size_t(l)]) I.shared[size_t(l)] = std::move(sh[size_t(l)]->value);
    for (const auto& cap : she[size_t(l)]) I.shared_expert[size_t(l)].push_back(std::move(cap->value));
    for (const auto& cap : I.expert_cap[size_t(l)]) {
      std::vector<int> rows(size_t(I.S), -1);
      for (int r = 0; r < int(cap->tokens.size()); ++r) rows[size_t(cap->tokens[size_t(r)])] = r;
      I.expert_row[size_t(l)].push_back(std::move(rows));
    }
  }
  stats_.setup_flops += I.full_forward_flops(1);
  stats_.setup_seconds += since(t_start);
}

Tracer::~Tracer() = default;

double Tracer::low_score() {
  if (!impl_->have_low) impl_->run_corrupted(true, stats_);
  return impl_->low;
}

const float* Tracer::clean_expert_row(int layer, int expert, int token) const {
  Patch p{Kind::Expert, token, layer, expert};
  impl_->validate({p});
  return impl_->clean_row(p);
}

std::vector<double> Tracer::run(const std::vector<Restoration>& rs_in, bool naive, int batch_rows,
                                const ProgressFn& progress) {
  Impl& I = *impl_;
  for (const Restoration& r : rs_in) I.validate(r);
  if (!naive && !I.have_cache) I.run_corrupted(true, stats_);
  const auto t_start = Clock::now();
  std::vector<double> out(rs_in.size(), 0.0);
  stats_.restorations += int64_t(rs_in.size());

  // Cached mode computes each distinct restoration once, without its no-op patches (exact, see trace.h); a
  // restoration left empty scores low_score. Naive mode runs every restoration as given.
  std::vector<Restoration> distinct;
  std::vector<int> which(rs_in.size(), -1);  // rs_in[i] → distinct index, −1: nothing left to restore
  if (naive || !prune_) {
    distinct = rs_in;
    std::iota(which.begin(), which.end(), 0);
  } else {
    std::map<std::vector<std::array<int, 4>>, int> seen;
    for (size_t i = 0; i < rs_in.size(); ++i) {
      std::vector<std::array<int, 4>> key;
      Restoration r;
      for (const Patch& p : rs_in[i]) {
        if (p.token < I.b) continue;                           // before the subject: clean == corrupted
        if (p.layer == I.L - 1 && p.token < I.S - 1) continue;  // last layer, not the last token: never read
        key.push_back({int(p.kind), p.layer, p.token, p.expert});
        r.push_back(p);
      }
      if (r.empty()) {
        out[i] = I.low;
        continue;
      }
      std::sort(key.begin(), key.end());
      key.erase(std::unique(key.begin(), key.end()), key.end());
      auto [it, fresh] = seen.emplace(key, int(distinct.size()));
      if (fresh) distinct.push_back(std::move(r));
      which[i] = it->second;
    }
  }
  stats_.computed += int64_t(distinct.size());

  std::vector<double> res(distinct.size(), 0.0);
  if (naive) {
    size_t i = 0;
    while (i < distinct.size()) {
      std::vector<const Restoration*> batch;
      int64_t rows = 0;
      const size_t first = i;
      do {
        batch.push_back(&distinct[i++]);
        rows += int64_t(I.samples) * I.S;
      } while (i < distinct.size() && batch_rows > 0 && rows + int64_t(I.samples) * I.S <= batch_rows);
      const std::vector<double> p = I.run_naive(batch, stats_);
      std::copy(p.begin(), p.end(), res.begin() + std::ptrdiff_t(first));
      stats_.batches += 1;
      if (progress) progress(int64_t(i), int64_t(distinct.size()));
    }
  } else {
    using Plan = Impl::Plan;
    // Shared prefixes (with pruning): restorations without Resid patches that start at the same (layer, token)
    // and patch the same sites on layers [l0, k), k ≥ l0 + 2 — attn/moe windows clipped at layer 0 — run those
    // layers once (stage A) and continue separately from layer k (stage B).
    std::vector<Restoration> prefixes;       // stage A restorations
    std::vector<int> prefix_k;               // their stop layer
    std::vector<int> group_of(distinct.size(), -1);
    if (prune_) {
      using Key = std::vector<std::array<int, 4>>;
      auto sites_at = [](const Restoration& r, int layer) {
        Key k;
        for (const Patch& p : r)
          if (p.layer == layer) k.push_back({int(p.kind), p.layer, p.token, p.expert});
        std::sort(k.begin(), k.end());
        return k;
      };
      std::map<std::tuple<int, int, Key>, std::vector<int>> groups;
      for (size_t i = 0; i < distinct.size(); ++i) {
        const Restoration& r = distinct[i];
        if (std::any_of(r.begin(), r.end(), [](const Patch& p) { return p.kind == Kind::Resid; })) continue;
        int l0, t0;
        I.start_of(r, l0, t0);
        groups[{l0, t0, sites_at(r, l0)}].push_back(int(i));
      }
      for (const auto& [key, members] : groups) {
        if (members.size() < 2) continue;
        const int l0 = std::get<0>(key);
        int k = l0 + 1;
        while (k < I.L) {
          const Key ref = sites_at(distinct[size_t(members[0])], k);
          bool same = !ref.empty();
          for (size_t m = 1; m < members.size() && same; ++m) same = sites_at(distinct[size_t(members[m])], k) == ref;
          if (!same) break;
          ++k;
        }
        if (k < l0 + 2 || k >= I.L) continue;
        Restoration pre;
        for (const Patch& p : distinct[size_t(members[0])])
          if (p.layer < k) pre.push_back(p);
        for (int mbr : members) group_of[size_t(mbr)] = int(prefixes.size());
        prefixes.push_back(std::move(pre));
        prefix_k.push_back(k);
      }
    }
    auto run_batched = [&](std::vector<Plan>& plans, auto&& done) {
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
        do {
          const int k = order[i++];
          batch.push_back(plans[size_t(k)]);
          idx.push_back(k);
          rows += int64_t(I.samples) * (I.S - plans[size_t(k)].t0);
        } while (i < order.size() && batch_rows > 0 && rows + int64_t(I.samples) * I.S <= batch_rows);
        std::vector<Impl::Result> r = I.run_plans(batch, stats_);
        for (size_t j = 0; j < idx.size(); ++j) done(idx[j], std::move(r[j]));
        stats_.batches += 1;
      }
    };
    stats_.shared_prefixes += int64_t(prefixes.size());
    std::vector<MatR> stage_a(prefixes.size());
    {
      std::vector<Plan> plans;
      for (size_t g = 0; g < prefixes.size(); ++g) {
        plans.push_back(I.plan_of(prefixes[g]));
        plans.back().stop = prefix_k[g];
      }
      run_batched(plans, [&](int k, Impl::Result&& r) { stage_a[size_t(k)] = std::move(r.rows); });
    }
    std::vector<Plan> plans;
    for (size_t i = 0; i < distinct.size(); ++i) {
      const int g = group_of[i];
      plans.push_back(g < 0 ? I.plan_of(distinct[i]) : I.plan_of(distinct[i], &stage_a[size_t(g)], prefix_k[size_t(g)]));
    }
    int64_t ndone = 0;
    run_batched(plans, [&](int k, Impl::Result&& r) {
      res[size_t(k)] = r.p;
      if (progress) progress(++ndone, int64_t(plans.size()));
    });
  }
  for (size_t j = 0; j < rs_in.size(); ++j)
    if (which[j] >= 0) out[j] = res[size_t(which[j])];
  stats_.seconds += since(t_start);
  return out;
}

}  // namespace moedit::trace
