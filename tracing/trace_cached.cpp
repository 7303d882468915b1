// The cached engine: restorations resumed from the corrupted run's residuals and K/V cache, only on the layers and
// positions they can change, many plans packed into one batch per layer (see trace.h, "Cached mode").
#include "tracing/trace_internal.h"

#include <algorithm>
#include <stdexcept>

namespace moedit::trace {

std::vector<double> Tracer::Impl::finish(const MatR& last, int nr, TraceStats& st) const {
  TokenLayout ll;
  ll.n_seqs = int(last.rows());
  for (int i = 0; i < int(last.rows()); ++i) {
    ll.seq.push_back(i);
    ll.pos.push_back(S - 1);
  }
  const MatR z = m.logits(last, ll, nullptr);
  st.flops += logits_flops(last.rows());
  std::vector<double> out(size_t(nr), 0.0);
  for (int r = 0; r < nr; ++r) {
    double s = 0;
    for (int n = 0; n < samples; ++n) s += prob_of(z.row(r * samples + n).data(), int(z.cols()), answer);
    out[size_t(r)] = s / samples;
  }
  return out;
}

Tracer::Impl::Plan Tracer::Impl::plan_of(const Restoration& r, const MatR* src, int l0_override) const {
  Plan pl;
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

std::vector<Tracer::Impl::Result> Tracer::Impl::run_plans(const std::vector<Plan>& plans, TraceStats& st) {
  const int nr = int(plans.size()), nseq = nr * samples;
  int lmin = L, lmax = 0;
  for (const Plan& p : plans) {
    lmin = std::min(lmin, p.l0);
    lmax = std::max(lmax, p.stop);
  }
  std::vector<int> from(static_cast<size_t>(nseq)), lens(static_cast<size_t>(nseq));
  for (int j = 0; j < nseq; ++j) {
    from[size_t(j)] = j % samples;
    lens[size_t(j)] = plans[size_t(j / samples)].t0;
  }
  KVCache kv = lmin < L ? cache.gather(from, lens, lmin, S) : KVCache{};
  Hooks h;
  std::vector<const Restoration*> rs;
  for (const Plan& p : plans) rs.push_back(p.r);
  add_patch_hooks(h, rs, [&](int r, const Patch& p) { return p.layer < plans[size_t(r)].l0; });

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
          const float* rows = p.src ? p.src->row(n * (S - p.t0)).data() : corr_in[size_t(l)].row(n * S + p.t0).data();
          add[size_t(j)].emplace_back(rows, p.e0 - p.t0);
          active[size_t(j)] = 1;
        }
        changed = true;
      } else if (p.l0 + 1 == l && p.e0 < S) {
        for (int n = 0; n < samples; ++n)
          add[size_t(r * samples + n)].emplace_back(corr_in[size_t(l)].row(n * S + p.e0).data(), S - p.e0);
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
              nx.row(start + q.token - p.t0) = Eigen::Map<const Eigen::RowVectorXf>(clean_row(q), H);
      }
      x = std::move(nx);
      lay = std::move(nl);
    }
    if (l >= L || l == lmax) break;
    if (x.rows() == 0) continue;
    m.block(l, x, lay, &kv, &h, nullptr);
    int64_t pairs = 0;
    for (int j = 0; j < nseq; ++j)
      if (active[size_t(j)]) {
        const int p0 = plans[size_t(j / samples)].t0;
        pairs += attn_pairs(p0, p0 + cnt[size_t(j)]);
      }
    st.flops += block_flops(l, x.rows(), pairs);
    st.rows += x.rows();
  }
  // p(answer) for the plans that run to the end.
  std::vector<int> fin;
  for (int r = 0; r < nr; ++r)
    if (plans[size_t(r)].stop >= L) fin.push_back(r);
  if (!fin.empty()) {
    MatR last(int(fin.size()) * samples, H);
    for (size_t i = 0; i < fin.size(); ++i)
      for (int n = 0; n < samples; ++n) {
        const int j = fin[i] * samples + n;
        if (!active[size_t(j)] || cnt[size_t(j)] == 0 ||
            plans[size_t(fin[i])].t0 + cnt[size_t(j)] != S)
          throw std::logic_error("trace: a restoration did not reach the last position");
        last.row(int(i) * samples + n) = x.row(off[size_t(j)] + cnt[size_t(j)] - 1);
      }
    const std::vector<double> p = finish(last, int(fin.size()), st);
    for (size_t i = 0; i < fin.size(); ++i) out[size_t(fin[i])].p = p[i];
  }
  return out;
}

std::vector<double> Tracer::Impl::run_cached(const std::vector<const Restoration*>& batch, TraceStats& st) {
  std::vector<Plan> plans;
  for (const Restoration* r : batch) plans.push_back(plan_of(*r));
  const std::vector<Result> res = run_plans(plans, st);
  std::vector<double> p;
  for (const Result& r : res) p.push_back(r.p);
  return p;
}

}  // namespace moedit::trace
