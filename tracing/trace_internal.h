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

#include "io/errors.h"
#include "tracing/trace.h"

namespace moedit::trace {

using Clock = std::chrono::steady_clock;
inline double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Fact i of n (id: its name, else its index) cannot be traced: with `errors`, its message is kept in (*errors)[i];
// otherwise the error is rethrown — as it is for a single fact, naming the fact among several.
inline void fact_failed(const InputError& e, size_t i, size_t n, const std::string& id,
                        std::vector<std::string>* errors) {
  if (errors) {
    (*errors)[i] = e.what();
    return;
  }
  if (n == 1) throw e;
  throw InputError("fact " + (id.empty() ? std::to_string(i) : id) + ": " + e.what());
}

// p(a) under softmax(z[0..V)).
inline double prob_of(const float* z, int V, int a) {
  double mx = z[0];
  for (int v = 1; v < V; ++v) mx = std::max(mx, double(z[v]));
  double s = 0;
  for (int v = 0; v < V; ++v) s += std::exp(double(z[v]) - mx);
  return std::exp(double(z[a]) - mx) / s;
}

// One traced prompt. Prompts traced together (Tracer::together) share one corrupted K/V cache, their sequences
// side by side: prompt k's sample n is cache sequence cache_base + n.
struct Tracer::Impl {
  const Model& m;
  const ModelConfig& c;
  int S = 0, b = 0, e = 0, L = 0, H = 0, samples = 0;
  bool replace = false;
  Noise noise;  // [samples] × [e − b, H]
  std::vector<int32_t> ids;
  int answer = -1;
  double high = 0;
  TraceStats stats;

  // clean run
  std::vector<LayerRouting> clean_routing;                               // [L] × [S, k]
  std::vector<MatR> resid_post, attn, moe, shared;                       // [L] × [S, H]
  std::vector<std::vector<MatR>> shared_expert;                          // [L][n_shared] × [S, H] (n_shared > 1)
  std::vector<std::vector<std::shared_ptr<Hooks::Capture>>> expert_cap;  // [L][E] (shared by prompts run together)
  std::vector<std::vector<std::vector<int>>> expert_row;                 // [L][E][S] capture row or −1

  // corrupted run
  bool have_cache = false;
  double low = 0;
  std::vector<MatR> corr_in;  // [L + 1] × [samples·S, H]: residual entering block l (corr_in[L]: final)
  std::shared_ptr<KVCache> cache;
  int cache_base = 0;

  Impl(const Model& model) : m(model), c(model.config()) {}
  // A prompt, validated (InputError); no forward run yet.
  static std::unique_ptr<Impl> make(const Model& m, Prompt p, bool replace);

  // The clean runs of several prompts in one forward (every restorable site captured), and their corrupted runs in
  // another (residual entering every layer, one K/V cache for all). Row for row what each prompt's own runs give.
  static void run_clean(const std::vector<Impl*>& fs);
  static void run_corrupted(const std::vector<Impl*>& fs);

  // Noise added to (or replacing) the subject's embeddings; the forward's sequence s is sample n of fs[k]
  // where owner[s] = (k, n).
  static HookFn noise_hook(const std::vector<Impl*>& fs, const std::vector<std::pair<int, int>>& owner);
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

  // ---- restorations (trace_patches.cpp) ----
  void validate(const Restoration& r) const;

  // First layer / token a restoration changes. A Resid patch at layer l changes the input of layer l + 1.
  void start_of(const Restoration& r, int& l0, int& t0) const;

  const float* clean_row(const Patch& p) const;

  static std::string hook_of(const Patch& p);

  // One restoration of one prompt in a batch; item r of a batch owns sequences r·samples … r·samples + samples − 1
  // (every prompt of a batch has the same number of samples).
  struct Item {
    const Impl* f = nullptr;
    const Restoration* r = nullptr;
  };
  // Hooks applying the patches of a batch. skip(r, patch) says which patches are applied otherwise (cached mode:
  // Resid rows injected at the start).
  static void add_patch_hooks(Hooks& hooks, const std::vector<Item>& batch,
                              const std::function<bool(int, const Patch&)>& skip);

  // ---- naive runs (trace_naive.cpp) ----
  std::vector<double> run_naive(const std::vector<const Restoration*>& batch);

  // ---- cached runs (trace_cached.cpp) ----
  // A plan runs one restoration from the corrupted cache. Its sequences (one per sample) join the batch at layer
  // l0 with positions [t0, e0) — at l0 only the patched positions (and those between) can differ from the corrupted
  // run — and positions [e0, S) join at l0 + 1. Rows start from the corrupted residual (Resid patches at l0 − 1
  // injected), or from `src` (the output of a shared earlier stage). Patches below l0 are not hooked. Plans of
  // prompts traced together may share a batch.
  struct Plan {
    Impl* f = nullptr;  // the prompt
    const Restoration* r = nullptr;
    int l0 = 0, t0 = 0, e0 = 0;
    const MatR* src = nullptr;  // [samples·(S − t0), H] residual entering l0, or nullptr: corr_in[l0]
    int stop = 0;               // L: p(answer); < L: return the residual entering layer `stop`
  };
  struct Result {
    double p = 0;
    MatR rows;  // stop < L: [samples·(S − t0), H]
  };

  Plan plan_of(const Restoration& r, const MatR* src = nullptr, int l0_override = -1);

  // Runs a batch of plans; each prompt's stats get its own rows and FLOPs.
  static std::vector<Result> run_plans(const std::vector<Plan>& plans);
};

}  // namespace moedit::trace
