// Internals of the causal tracer (not a public header): Tracer::Impl, the state of one traced prompt (the clean
// run's captures, the corrupted run's cache) and the engines that run restorations on it. Split by responsibility:
//   tracer.cpp         the Tracer class: the clean run, the corrupted run, pruning and batching of restorations
//   trace_patches.cpp  restoration sites: validation, clean values, the hooks that patch them in
//   trace_naive.cpp    the naive engine: every restoration re-run from the embeddings (the test reference)
//   trace_cached.cpp   the cached engine: restorations resumed from the corrupted run's cache
#pragma once
#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "tracing/trace.h"

namespace moedit::trace {

using Clock = std::chrono::steady_clock;
inline double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// p(a) under softmax(z[0..V)).
inline double prob_of(const float* z, int V, int a) {
  double mx = z[0];
  for (int v = 1; v < V; ++v) mx = std::max(mx, double(z[v]));
  double s = 0;
  for (int v = 0; v < V; ++v) s += std::exp(double(z[v]) - mx);
  return std::exp(double(z[a]) - mx) / s;
}

struct Tracer::Impl {
  const Model& m;
  const ModelConfig& c;
  int S = 0, b = 0, e = 0, L = 0, H = 0, samples = 0;
  bool replace = false;
  const Noise* noise = nullptr;
  std::vector<int32_t> ids;

  // clean run
  std::vector<MatR> resid_post, attn, moe, shared;                       // [L] × [S, H]
  std::vector<std::vector<MatR>> shared_expert;                          // [L][n_shared] × [S, H] (n_shared > 1)
  std::vector<std::vector<std::shared_ptr<Hooks::Capture>>> expert_cap;  // [L][E]
  std::vector<std::vector<std::vector<int>>> expert_row;                 // [L][E][S] capture row or −1

  // corrupted run
  bool have_cache = false;
  bool have_low = false;
  double low = 0;
  std::vector<MatR> corr_in;  // [L + 1] × [samples·S, H]: residual entering block l (corr_in[L]: final)
  KVCache cache;

  Impl(const Model& model) : m(model), c(model.config()) {}

  HookFn noise_hook() const {
    return [this](Eigen::Ref<MatR> act, const HookContext& ctx) {
      for (int i = 0; i < int(act.rows()); ++i) {
        const int p = ctx.layout.pos[size_t(i)];
        if (p < b || p >= e) continue;
        const MatR& nz = (*noise)[size_t(ctx.layout.seq[size_t(i)] % samples)];
        if (replace)
          act.row(i) = nz.row(p - b);
        else
          act.row(i) += nz.row(p - b);
      }
    };
  }

  // ---- analytic FLOPs ----
  int64_t attn_pairs(int p0, int p1) const {  // queries at positions p0..p1-1, causal (+ sliding window)
    int64_t s = 0;
    for (int p = p0; p < p1; ++p) s += c.sliding_window > 0 ? std::min(p + 1, c.sliding_window) : p + 1;
    return s;
  }
  double block_flops(int l, int64_t rows, int64_t pairs) const {
    const double D = c.head_dim, Hq = c.n_heads, Hkv = c.n_kv_heads, Hd = H;
    double f = double(rows) * (2 * Hd * (Hq * D + 2 * Hkv * D) + 2 * Hq * D * Hd);
    f += double(pairs) * 4 * Hq * D;
    const FFNWeights& w = m.weights().layers[size_t(l)].ffn;
    if (w.moe) {
      f += double(rows) * (2 * Hd * c.n_experts + double(c.top_k) * 6 * Hd * w.experts.I);
      if (w.has_shared) f += double(rows) * (6 * Hd * w.shared.I + (w.shared_gate.size() ? 2 * Hd : 0));
    } else {
      f += double(rows) * 6 * Hd * w.experts.I;
    }
    return f;
  }
  double logits_flops(int64_t rows) const { return double(rows) * 2 * H * c.vocab_size; }
  double full_forward_flops(int nseq) const {
    double f = 0;
    for (int l = 0; l < L; ++l) f += block_flops(l, int64_t(nseq) * S, int64_t(nseq) * attn_pairs(0, S));
    return f + logits_flops(nseq);
  }

  // ---- corrupted run (tracer.cpp) ----
  void run_corrupted(bool with_cache, TraceStats& st);

  int answer = -1;

  // ---- restorations (trace_patches.cpp) ----
  void validate(const Restoration& r) const;

  // First layer / token a restoration changes. A Resid patch at layer l changes the input of layer l + 1.
  void start_of(const Restoration& r, int& l0, int& t0) const;

  const float* clean_row(const Patch& p) const;

  static std::string hook_of(const Patch& p);

  // Hooks applying the patches of a batch of restorations (restoration r owns sequences r·samples + n).
  // skip(r, patch) says which patches are applied otherwise (cached mode: Resid rows injected at the start).
  void add_patch_hooks(Hooks& hooks, const std::vector<const Restoration*>& batch,
                       const std::function<bool(int, const Patch&)>& skip) const;

  // ---- naive runs (trace_naive.cpp) ----
  std::vector<double> run_naive(const std::vector<const Restoration*>& batch, TraceStats& st) const;

  // ---- cached runs (trace_cached.cpp) ----
  // A plan runs one restoration from the corrupted cache. Its sequences (one per sample) join the batch at layer
  // l0 with positions [t0, e0) — at l0 only the patched positions (and those between) can differ from the corrupted
  // run — and positions [e0, S) join at l0 + 1. Rows start from the corrupted residual (Resid patches at l0 − 1
  // injected), or from `src` (the output of a shared earlier stage). Patches below l0 are not hooked.
  struct Plan {
    const Restoration* r = nullptr;
    int l0 = 0, t0 = 0, e0 = 0;
    const MatR* src = nullptr;  // [samples·(S − t0), H] residual entering l0, or nullptr: corr_in[l0]
    int stop = 0;               // L: p(answer); < L: return the residual entering layer `stop`
  };
  struct Result {
    double p = 0;
    MatR rows;  // stop < L: [samples·(S − t0), H]
  };

  // Mean p(answer) per restoration from the last rows [nr·samples, H] of the final residual.
  std::vector<double> finish(const MatR& last, int nr, TraceStats& st) const;

  Plan plan_of(const Restoration& r, const MatR* src = nullptr, int l0_override = -1) const;

  std::vector<Result> run_plans(const std::vector<Plan>& plans, TraceStats& st);

  std::vector<double> run_cached(const std::vector<const Restoration*>& batch, TraceStats& st);
};

}  // namespace moedit::trace
