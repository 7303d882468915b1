// The cached engine: restorations resumed from the corrupted run's residuals and K/V cache, only on the layers and
// positions they can change, many plans packed into one batch per layer (see trace.h, "Cached mode").
#include "tracing/trace_internal.h"

#include <algorithm>
#include <map>
#include <stdexcept>

namespace moedit::trace {

Tracer::Impl::Plan Tracer::Impl::plan_of(const Restoration& r, const MatR* src, int l0_override) {
  Plan pl;
  pl.f = this;
  pl.r = &r;
  pl.stop = L;
  start_of(r, pl.l0, pl.t0);
  pl.src = src;
  if (l0_override >= 0) pl.l0 = l0_override;
  bool inject = false;
  int emax = pl.t0;
  for (const Patch& p : r) {
    if (p.kind == Kind::Resid && p.layer + 1 == pl.l0) inject = true;
    if (p.layer == pl.l0) emax = std::max(emax, p.token + 1);
  }
  pl.e0 = (src || inject || pl.l0 >= L) ? S : emax;
  return pl;
}

std::vector<Tracer::Impl::Result> Tracer::Impl::run_plans(const std::vector<Plan>& plans) {
  if (plans.empty()) return {};
  const Impl& f0 = *plans[0].f;
  const Model& m = f0.m;
  const int nr = int(plans.size()), samples = f0.samples, nseq = nr * samples, L = f0.L, H = f0.H;
  int lmin = L, lmax = 0, smax = 0;
  for (const Plan& p : plans) {
    if (p.f->cache != f0.cache || p.f->samples != samples)
      throw std::logic_error("trace: plans of one batch must share a corrupted cache and a sample count");
    lmin = std::min(lmin, p.l0);
    lmax = std::max(lmax, p.stop);
    smax = std::max(smax, p.f->S);
  }
  std::vector<int> from(static_cast<size_t>(nseq)), lens(static_cast<size_t>(nseq));
  for (int j = 0; j < nseq; ++j) {
    const Plan& p = plans[size_t(j / samples)];
    from[size_t(j)] = p.f->cache_base + j % samples;
    lens[size_t(j)] = p.t0;
  }
  KVCache kv = lmin < L ? f0.cache->gather(from, lens, lmin, smax) : KVCache{};
  Hooks h;
  std::vector<Item> items;
  for (const Plan& p : plans) items.push_back({p.f, p.r});
  add_patch_hooks(h, items, [&](int r, const Patch& p) { return p.layer < plans[size_t(r)].l0; });

  // Per sequence: its rows in x (contiguous), first position, active flag.
  std::vector<int> off(static_cast<size_t>(nseq), 0), cnt(static_cast<size_t>(nseq), 0);
  std::vector<char> active(static_cast<size_t>(nseq), 0);
  std::vector<Result> out(static_cast<size_t>(nr));
  MatR x(0, H);
  TokenLayout lay;
  lay.n_seqs = nseq;
  for (int l = lmin; l <= lmax; ++l) {
    // Finish plans that stop here; join and extend the others; rebuild x if anything changed.
    bool changed = false;
    std::vector<std::vector<std::pair<const float*, int>>> add(static_cast<size_t>(nseq));  // (rows, count)
    for (int r = 0; r < nr; ++r) {
      const Plan& p = plans[size_t(r)];
      const int S = p.f->S;
      if (p.stop == l && p.stop < L) {
        out[size_t(r)].rows.resize(samples * (S - p.t0), H);
        for (int n = 0; n < samples; ++n) {
          const int j = r * samples + n;
          out[size_t(r)].rows.middleRows(n * (S - p.t0), S - p.t0) = x.middleRows(off[size_t(j)], cnt[size_t(j)]);
          active[size_t(j)] = 0;
        }
        changed = true;
        continue;
      }
      if (p.l0 == l) {
        for (int n = 0; n < samples; ++n) {
          const int j = r * samples + n;
          const float* rows =
              p.src ? p.src->row(n * (S - p.t0)).data() : p.f->corr_in[size_t(l)].row(n * S + p.t0).data();
          add[size_t(j)].emplace_back(rows, p.e0 - p.t0);
          active[size_t(j)] = 1;
        }
        changed = true;
      } else if (p.l0 + 1 == l && p.e0 < S) {
        for (int n = 0; n < samples; ++n)
          add[size_t(r * samples + n)].emplace_back(p.f->corr_in[size_t(l)].row(n * S + p.e0).data(), S - p.e0);
        changed = true;
      }
    }
    if (changed) {
      int total = 0;
      for (int j = 0; j < nseq; ++j) {
        if (!active[size_t(j)]) continue;
        total += cnt[size_t(j)];
        for (const auto& a : add[size_t(j)]) total += a.second;
      }
      MatR nx(total, H);
      TokenLayout nl;
      nl.n_seqs = nseq;
      int row = 0;
      for (int j = 0; j < nseq; ++j) {
        if (!active[size_t(j)]) continue;
        const int start = row;
        if (cnt[size_t(j)] > 0) {
          nx.middleRows(row, cnt[size_t(j)]) = x.middleRows(off[size_t(j)], cnt[size_t(j)]);
          row += cnt[size_t(j)];
        }
        for (const auto& [ptr, c] : add[size_t(j)]) {
          nx.middleRows(row, c) = Eigen::Map<const MatR>(ptr, c, H);
          row += c;
        }
        const Plan& p = plans[size_t(j / samples)];
        off[size_t(j)] = start;
        cnt[size_t(j)] = row - start;
        for (int i = 0; i < row - start; ++i) {
          nl.seq.push_back(j);
          nl.pos.push_back(p.t0 + i);
        }
        if (p.l0 == l && !p.src)  // Resid patches at l0 − 1: inject the clean rows
          for (const Patch& q : *p.r)
            if (q.kind == Kind::Resid && q.layer + 1 == l)
              nx.row(start + q.token - p.t0) = Eigen::Map<const Eigen::RowVectorXf>(p.f->clean_row(q), H);
      }
      x = std::move(nx);
      lay = std::move(nl);
    }
    if (l >= L || l == lmax) break;
    if (x.rows() == 0) continue;
    m.block(l, x, lay, &kv, &h, nullptr);
    // Each prompt's share of this block: its rows and attention pairs.
    std::map<Impl*, std::pair<int64_t, int64_t>> share;  // prompt → (rows, pairs)
    for (int j = 0; j < nseq; ++j)
      if (active[size_t(j)]) {
        const Plan& p = plans[size_t(j / samples)];
        auto& [rows, pairs] = share[p.f];
        rows += cnt[size_t(j)];
        pairs += p.f->attn_pairs(p.t0, p.t0 + cnt[size_t(j)]);
      }
    for (const auto& [f, rp] : share) {
      f->stats.flops += f->block_flops(l, rp.first, rp.second);
      f->stats.rows += rp.first;
    }
  }
  // p(answer) for the plans that run to the end, from the last rows of the final residual.
  std::vector<int> fin;
  for (int r = 0; r < nr; ++r)
    if (plans[size_t(r)].stop >= L) fin.push_back(r);
  if (!fin.empty()) {
    MatR last(int(fin.size()) * samples, H);
    TokenLayout ll;
    ll.n_seqs = int(last.rows());
    for (size_t i = 0; i < fin.size(); ++i)
      for (int n = 0; n < samples; ++n) {
        const Plan& p = plans[size_t(fin[i])];
        const int j = fin[i] * samples + n;
        if (!active[size_t(j)] || cnt[size_t(j)] == 0 || p.t0 + cnt[size_t(j)] != p.f->S)
          throw std::logic_error("trace: a restoration did not reach the last position");
        last.row(int(i) * samples + n) = x.row(off[size_t(j)] + cnt[size_t(j)] - 1);
        ll.seq.push_back(int(i) * samples + n);
        ll.pos.push_back(p.f->S - 1);
      }
    const MatR z = m.logits(last, ll, nullptr);
    for (size_t i = 0; i < fin.size(); ++i) {
      Impl& f = *plans[size_t(fin[i])].f;
      double s = 0;
      for (int n = 0; n < samples; ++n)
        s += prob_of(z.row(int(i) * samples + n).data(), int(z.cols()), f.answer);
      out[size_t(fin[i])].p = s / samples;
      f.stats.flops += f.logits_flops(samples);
    }
  }
  return out;
}

}  // namespace moedit::trace
