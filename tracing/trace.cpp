// Causal tracing engine: noise, the clean and corrupted runs, cached and naive restorations, whole traces.
#include "tracing/trace.h"

#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <map>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <numeric>
#include <tuple>

#include "datasets/counterfact.h"
#include "io/errors.h"
#include "io/safetensors.h"
#include "tokenizer/tokenizer.h"

namespace moedit::trace {

// ================================================================================================ kinds

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::Resid: return "resid";
    case Kind::Attn: return "attn";
    case Kind::Moe: return "moe";
    case Kind::Expert: return "expert";
    case Kind::Shared: return "shared";
  }
  return "?";
}

const std::vector<Kind>& all_kinds() {
  static const std::vector<Kind> k = {Kind::Resid, Kind::Attn, Kind::Moe, Kind::Expert, Kind::Shared};
  return k;
}

Kind parse_kind(const std::string& s) {
  for (Kind k : all_kinds())
    if (s == kind_name(k)) return k;
  if (s == "hidden" || s == "state") return Kind::Resid;
  if (s == "mlp") return Kind::Moe;
  throw InputError("--kinds: unknown kind '" + s + "' (expected resid, attn, moe, expert or shared)");
}

std::vector<Kind> parse_kinds(const std::string& csv) {
  if (csv.empty() || csv == "all") return all_kinds();
  std::vector<Kind> out;
  size_t i = 0;
  while (i <= csv.size()) {
    size_t j = csv.find(',', i);
    if (j == std::string::npos) j = csv.size();
    const std::string tok = csv.substr(i, j - i);
    if (!tok.empty()) {
      const Kind k = parse_kind(tok);
      if (std::find(out.begin(), out.end(), k) == out.end()) out.push_back(k);
    }
    i = j + 1;
  }
  if (out.empty()) throw InputError("--kinds: no kind given");
  return out;
}

// ================================================================================================ noise

NumpyRandomState::NumpyRandomState(uint32_t seed) {
  // init_genrand (numpy's legacy mt19937_seed)
  mt_[0] = seed;
  for (int i = 1; i < 624; ++i) mt_[i] = 1812433253u * (mt_[i - 1] ^ (mt_[i - 1] >> 30)) + uint32_t(i);
  idx_ = 624;
}

uint32_t NumpyRandomState::next32() {
  if (idx_ >= 624) {
    for (int i = 0; i < 624; ++i) {
      const uint32_t y = (mt_[i] & 0x80000000u) | (mt_[(i + 1) % 624] & 0x7fffffffu);
      mt_[i] = mt_[(i + 397) % 624] ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
    }
    idx_ = 0;
  }
  uint32_t y = mt_[idx_++];
  y ^= y >> 11;
  y ^= (y << 7) & 0x9d2c5680u;
  y ^= (y << 15) & 0xefc60000u;
  y ^= y >> 18;
  return y;
}

double NumpyRandomState::next_double() {
  const uint32_t a = next32() >> 5, b = next32() >> 6;
  return (double(a) * 67108864.0 + double(b)) / 9007199254740992.0;
}

double NumpyRandomState::gauss() {
  if (has_gauss_) {
    has_gauss_ = false;
    return gauss_;
  }
  double x1, x2, r2;
  do {
    x1 = 2.0 * next_double() - 1.0;
    x2 = 2.0 * next_double() - 1.0;
    // Rounded separately (volatile): a fused multiply-add here would change which pairs are rejected/accepted
    // and the digits, and numpy computes x1*x1 + x2*x2 without contraction.
    const volatile double a2 = x1 * x1;
    const volatile double b2 = x2 * x2;
    r2 = a2 + b2;
  } while (r2 >= 1.0 || r2 == 0.0);
  const double f = std::sqrt(-2.0 * std::log(r2) / r2);
  gauss_ = f * x1;
  has_gauss_ = true;
  return f * x2;
}

NoiseRule parse_noise_rule(const std::string& s) {
  NoiseRule r;
  r.text = s;
  auto number = [&](const std::string& t) {
    try {
      size_t used = 0;
      const double v = std::stod(t, &used);
      if (used != t.size() || !std::isfinite(v) || v < 0) throw std::invalid_argument(t);
      return v;
    } catch (const std::exception&) {
      throw InputError("--noise: '" + s + "' is not a noise rule (s<F>, u<F> or a non-negative σ, e.g. s3, u0.5, 0.1)");
    }
  };
  if (s.empty()) throw InputError("--noise: empty noise rule");
  if (s[0] == 's') {
    r.type = NoiseRule::ScaledStd;
    r.value = s.size() > 1 ? number(s.substr(1)) : 1.0;
  } else if (s[0] == 'u') {
    r.type = NoiseRule::Uniform;
    r.value = number(s.substr(1));
  } else {
    r.type = NoiseRule::Fixed;
    r.value = number(s);
  }
  return r;
}

Noise make_noise(const NoiseRule& rule, double embedding_std, int samples, int len, int hidden, uint32_t seed) {
  if (samples < 1) throw InputError("--samples must be at least 1");
  NumpyRandomState rs(seed);
  const double scale = rule.type == NoiseRule::ScaledStd ? rule.value * embedding_std : rule.value;
  Noise n(size_t(samples), MatR(len, hidden));
  for (int s = 0; s < samples; ++s)
    for (int i = 0; i < len; ++i)
      for (int h = 0; h < hidden; ++h) {
        const double u = rule.type == NoiseRule::Uniform ? rs.uniform(-1.0, 1.0) : rs.gauss();
        n[size_t(s)](i, h) = float(scale * u);
      }
  return n;
}

Noise load_noise_file(const std::string& path, int len, int hidden) {
  SafeTensorsFile f(path);
  if (!f.has("noise")) throw InputError(path + ": no tensor named 'noise' (expected [samples, subject_len, hidden])");
  const TensorView& t = f.get("noise");
  if (t.shape.size() != 3 || t.shape[0] < 1 || t.shape[1] != len || t.shape[2] != hidden)
    throw InputError(path + ": tensor 'noise' must have shape [samples, " + std::to_string(len) + ", " +
                     std::to_string(hidden) + "] (subject length, hidden size)");
  const std::vector<float> v = t.to_f32();
  Noise n(size_t(t.shape[0]), MatR(len, hidden));
  for (size_t s = 0; s < n.size(); ++s)
    std::copy(v.begin() + std::ptrdiff_t(s * size_t(len) * size_t(hidden)),
              v.begin() + std::ptrdiff_t((s + 1) * size_t(len) * size_t(hidden)), n[s].data());
  return n;
}

void save_noise_file(const std::string& path, const Noise& noise, const std::map<std::string, std::string>& metadata) {
  if (noise.empty()) throw InputError("no noise to save");
  const int len = int(noise[0].rows()), H = int(noise[0].cols());
  std::vector<float> all;
  for (const MatR& m : noise) all.insert(all.end(), m.data(), m.data() + m.size());
  write_safetensors(path, {{"noise", make_f32_tensor({int64_t(noise.size()), len, H}, all.data())}}, metadata);
}

double embedding_std(const Model& m, const std::vector<std::vector<int32_t>>& token_lists) {
  const Weight& E = m.weights().embed;
  double sum = 0, sq = 0;
  int64_t n = 0;
  for (const auto& l : token_lists)
    for (int32_t id : l) {
      if (id < 0 || id >= E.rows()) throw InputError("token id " + std::to_string(id) + " is outside the vocabulary");
      for (int h = 0; h < E.cols(); ++h) {
        const double x = E(id, h);
        sum += x;
        sq += x * x;
      }
      n += E.cols();
    }
  if (n < 2) throw InputError("cannot compute the embedding std: fewer than 2 values");
  const double mean = sum / double(n);
  return std::sqrt(std::max(0.0, (sq - double(n) * mean * mean) / double(n - 1)));
}

// ================================================================================================ tracer

namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

double prob_of(const float* z, int V, int a) {
  double mx = z[0];
  for (int v = 1; v < V; ++v) mx = std::max(mx, double(z[v]));
  double s = 0;
  for (int v = 0; v < V; ++v) s += std::exp(double(z[v]) - mx);
  return std::exp(double(z[a]) - mx) / s;
}

// Rows of each restoration's patches, grouped for the hooks of one batch: local restoration r owns sequences
// r·samples … r·samples + samples − 1.
struct ReplaceTable {
  std::vector<std::vector<std::pair<int, const float*>>> by_r;  // r → (position, clean row)
};
struct ExpertPatch {
  int r, t, e;
  const float* clean;  // nullptr: not routed to e in the clean run
  MatR corr;           // [samples, H] this run's contribution of e at t (zero where not routed)
};
struct ExpertTable {
  std::vector<ExpertPatch> patches;
  std::vector<std::vector<int>> by_r;  // r → indices into patches
};

}  // namespace

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

  // ---- corrupted run ----
  void run_corrupted(bool with_cache, TraceStats& st) {
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

  int answer = -1;

  // ---- restorations ----
  void validate(const Restoration& r) const {
    for (const Patch& p : r) {
      if (p.token < 0 || p.token >= S)
        throw InputError("restoration token " + std::to_string(p.token) + " is outside the prompt");
      if (p.layer < 0 || p.layer >= L)
        throw InputError("restoration layer " + std::to_string(p.layer) + " is outside the model");
      const FFNWeights& w = m.weights().layers[size_t(p.layer)].ffn;
      if (p.kind == Kind::Shared && !(w.moe && w.has_shared))
        throw InputError("layer " + std::to_string(p.layer) + " has no shared expert");
      if (p.kind == Kind::Shared && p.expert >= 0 && p.expert >= int(shared_expert[size_t(p.layer)].size()))
        throw InputError("layer " + std::to_string(p.layer) + " has no shared expert " + std::to_string(p.expert) +
                         " (restoring one shared expert alone needs n_shared_experts > 1)");
      if (p.kind == Kind::Expert && (!w.moe || p.expert < 0 || p.expert >= c.n_experts))
        throw InputError("layer " + std::to_string(p.layer) + " has no routed expert " + std::to_string(p.expert));
    }
  }

  // First layer / token a restoration changes. A Resid patch at layer l changes the input of layer l + 1.
  void start_of(const Restoration& r, int& l0, int& t0) const {
    l0 = L;
    t0 = S - 1;
    for (const Patch& p : r) {
      l0 = std::min(l0, p.kind == Kind::Resid ? p.layer + 1 : p.layer);
      t0 = std::min(t0, p.token);
    }
  }

  const float* clean_row(const Patch& p) const {
    switch (p.kind) {
      case Kind::Resid: return resid_post[size_t(p.layer)].row(p.token).data();
      case Kind::Attn: return attn[size_t(p.layer)].row(p.token).data();
      case Kind::Moe: return moe[size_t(p.layer)].row(p.token).data();
      case Kind::Shared:
        return (p.expert < 0 ? shared[size_t(p.layer)] : shared_expert[size_t(p.layer)][size_t(p.expert)])
            .row(p.token)
            .data();
      case Kind::Expert: {
        const int row = expert_row[size_t(p.layer)][size_t(p.expert)][size_t(p.token)];
        return row < 0 ? nullptr : expert_cap[size_t(p.layer)][size_t(p.expert)]->value.row(row).data();
      }
    }
    return nullptr;
  }

  static std::string hook_of(const Patch& p) {
    switch (p.kind) {
      case Kind::Resid: return hook_names::resid_post(p.layer);
      case Kind::Attn: return hook_names::attn_out(p.layer);
      case Kind::Moe: return hook_names::moe_out(p.layer);
      case Kind::Shared:
        return p.expert < 0 ? hook_names::shared_out(p.layer) : hook_names::shared_expert_out(p.layer, p.expert);
      case Kind::Expert: return hook_names::moe_out(p.layer);
    }
    return {};
  }

  // Hooks applying the patches of a batch of restorations (restoration r owns sequences r·samples + n).
  // skip(r, patch) says which patches are applied otherwise (cached mode: Resid rows injected at the start).
  template <typename Skip>
  void add_patch_hooks(Hooks& hooks, const std::vector<const Restoration*>& batch, Skip&& skip) const {
    const int nr = int(batch.size()), ns = samples;
    std::map<std::string, std::shared_ptr<ReplaceTable>> rep;
    std::map<int, std::shared_ptr<ExpertTable>> exp;  // by layer
    for (int r = 0; r < nr; ++r)
      for (const Patch& p : *batch[size_t(r)]) {
        if (skip(r, p)) continue;
        if (p.kind == Kind::Expert) {
          auto& t = exp[p.layer];
          if (!t) {
            t = std::make_shared<ExpertTable>();
            t->by_r.resize(size_t(nr));
          }
          t->by_r[size_t(r)].push_back(int(t->patches.size()));
          t->patches.push_back({r, p.token, p.expert, clean_row(p), MatR::Zero(ns, H)});
        } else {
          auto& t = rep[hook_of(p)];
          if (!t) {
            t = std::make_shared<ReplaceTable>();
            t->by_r.resize(size_t(nr));
          }
          t->by_r[size_t(r)].emplace_back(p.token, clean_row(p));
        }
      }
    // Expert hooks first: they record this run's contribution, then hook_moe_out swaps it for the clean one.
    for (auto& entry : exp) {  // (no structured binding: lambdas capture t, which clang < 16 rejects)
      const int l = entry.first;
      const auto& t = entry.second;
      std::vector<int> experts;
      for (const auto& p : t->patches) experts.push_back(p.e);
      std::sort(experts.begin(), experts.end());
      experts.erase(std::unique(experts.begin(), experts.end()), experts.end());
      for (int ex : experts)
        hooks.add(hook_names::expert_out(l, ex), [t, ns](Eigen::Ref<MatR> act, const HookContext& ctx) {
          for (int i = 0; i < int(act.rows()); ++i) {
            const int tok = ctx.token(i), seq = ctx.layout.seq[size_t(tok)], pos = ctx.layout.pos[size_t(tok)];
            for (int pi : t->by_r[size_t(seq / ns)]) {
              ExpertPatch& p = t->patches[size_t(pi)];
              if (p.t == pos && p.e == ctx.expert) p.corr.row(seq % ns) = act.row(i);
            }
          }
        });
      hooks.add(hook_names::moe_out(l), [t, ns](Eigen::Ref<MatR> act, const HookContext& ctx) {
        for (int i = 0; i < int(act.rows()); ++i) {
          const int seq = ctx.layout.seq[size_t(i)], pos = ctx.layout.pos[size_t(i)];
          for (int pi : t->by_r[size_t(seq / ns)]) {
            const ExpertPatch& p = t->patches[size_t(pi)];
            if (p.t != pos) continue;
            act.row(i) -= p.corr.row(seq % ns);
            if (p.clean) act.row(i) += Eigen::Map<const Eigen::RowVectorXf>(p.clean, act.cols());
          }
        }
      });
    }
    for (auto& entry : rep)
      hooks.add(entry.first, [t = entry.second, ns](Eigen::Ref<MatR> act, const HookContext& ctx) {
        for (int i = 0; i < int(act.rows()); ++i) {
          const int tok = ctx.token(i), seq = ctx.layout.seq[size_t(tok)], pos = ctx.layout.pos[size_t(tok)];
          for (const auto& [tp, row] : t->by_r[size_t(seq / ns)])
            if (tp == pos) act.row(i) = Eigen::Map<const Eigen::RowVectorXf>(row, act.cols());
        }
      });
  }

  // Mean p(answer) per restoration from the last rows [nr·samples, H] of the final residual.
  std::vector<double> finish(const MatR& last, int nr, TraceStats& st) const {
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

  std::vector<double> run_naive(const std::vector<const Restoration*>& batch, TraceStats& st) const {
    const int nr = int(batch.size()), nseq = nr * samples;
    std::vector<std::vector<int32_t>> seqs(size_t(nseq), ids);
    Hooks h;
    h.add(hook_names::embed(), noise_hook());
    add_patch_hooks(h, batch, [](int, const Patch&) { return false; });
    ForwardOptions fo;
    fo.hooks = &h;
    fo.logits_all = false;
    fo.record_routing = false;
    ForwardOutput f = m.forward(seqs, fo);
    st.flops += full_forward_flops(nseq) - logits_flops(nseq);
    st.rows += int64_t(nseq) * S * L;
    // f.logits are [nseq, V] already; reuse finish()'s averaging on them.
    st.flops += logits_flops(nseq);
    std::vector<double> out(size_t(nr), 0.0);
    for (int r = 0; r < nr; ++r) {
      double s = 0;
      for (int n = 0; n < samples; ++n)
        s += prob_of(f.logits.row(r * samples + n).data(), int(f.logits.cols()), answer);
      out[size_t(r)] = s / samples;
    }
    return out;
  }

  // ---- cached runs ----
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

  Plan plan_of(const Restoration& r, const MatR* src = nullptr, int l0_override = -1) const {
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

  std::vector<Result> run_plans(const std::vector<Plan>& plans, TraceStats& st) {
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
    KVCache kv = lmin < L ? cache.gather(from, lens, lmin) : KVCache{};
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

  std::vector<double> run_cached(const std::vector<const Restoration*>& batch, TraceStats& st) {
    std::vector<Plan> plans;
    for (const Restoration* r : batch) plans.push_back(plan_of(*r));
    const std::vector<Result> res = run_plans(plans, st);
    std::vector<double> p;
    for (const Result& r : res) p.push_back(r.p);
    return p;
  }
};

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

// ================================================================================================ whole traces

const KindResult* TraceReport::find(Kind k) const {
  for (const KindResult& r : kinds)
    if (r.kind == k) return &r;
  return nullptr;
}

namespace {

// Progress bar on stderr (TTY only).
struct ProgressBar {
  bool on;
  std::string label;
  Clock::time_point t0 = Clock::now();
  explicit ProgressBar(bool enabled, std::string l) : on(enabled && ::isatty(2)), label(std::move(l)) {}
  void operator()(int64_t done, int64_t total) const {
    if (!on || total <= 0) return;
    const int width = 30, filled = int(double(width) * double(done) / double(total));
    std::fprintf(stderr, "\r%s [%.*s%*s] %lld/%lld %.1fs", label.c_str(), filled, "##############################",
                 width - filled, "", (long long)done, (long long)total, since(t0));
    if (done >= total) std::fprintf(stderr, "\n");
    std::fflush(stderr);
  }
};

// Limits ops and OpenMP to n threads for its lifetime (n ≤ 0: no change).
struct ThreadLimit {
  int prev_ops = 0, prev_omp = 0;
  bool on;
  explicit ThreadLimit(int n) : on(n > 0) {
    if (!on) return;
    prev_ops = ops::num_threads();
    prev_omp = omp_get_max_threads();
    ops::set_num_threads(n);
    omp_set_num_threads(n);
  }
  ~ThreadLimit() {
    if (!on) return;
    ops::set_num_threads(prev_ops);
    omp_set_num_threads(prev_omp);
  }
};

}  // namespace

TraceReport trace_ids(const Model& m, const TraceInput& in, const TraceOptions& opt) {
  const ModelConfig& c = m.config();
  const int S = int(in.ids.size()), L = c.n_layers, H = c.hidden;
  if (S == 0) throw InputError("the prompt has no tokens");
  for (int32_t id : in.ids)
    if (id < 0 || id >= c.vocab_size)
      throw InputError("token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                       std::to_string(c.vocab_size) + ")");
  if (in.subject_begin < 0 || in.subject_end > S || in.subject_begin >= in.subject_end)
    throw InputError("subject token range " + std::to_string(in.subject_begin) + ":" + std::to_string(in.subject_end) +
                     " is empty or outside the prompt's " + std::to_string(S) + " tokens");
  if (in.target >= c.vocab_size)
    throw InputError("target token " + std::to_string(in.target) + " is outside the vocabulary");
  if (opt.window < 1) throw InputError("--window must be at least 1");
  const int len = in.subject_end - in.subject_begin;
  const ThreadLimit limit(opt.threads);

  TraceReport rep;
  rep.model = m.path();
  rep.id = in.id;
  rep.prompt = in.prompt;
  rep.subject = in.subject;
  rep.target_text = in.target_text;
  rep.expected = in.expected;
  rep.ids = in.ids;
  rep.tokens = in.tokens;
  if (int(rep.tokens.size()) != S) {
    rep.tokens.clear();
    for (int32_t id : in.ids) rep.tokens.push_back(std::to_string(id));
  }
  rep.subject_begin = in.subject_begin;
  rep.subject_end = in.subject_end;
  rep.n_layers = L;
  for (int l = 0; l < L; ++l) {
    const FFNWeights& w = m.weights().layers[size_t(l)].ffn;
    rep.moe_layers.push_back(w.moe);
    rep.shared_layers.push_back(w.moe && w.has_shared);
  }
  rep.n_shared_experts = m.config().n_shared_experts;
  rep.replace = opt.replace;
  rep.seed = opt.seed;

  Noise noise;
  if (!opt.noise_file.empty()) {
    noise = load_noise_file(opt.noise_file, len, H);
    rep.noise_rule = "file";
    rep.noise_source = opt.noise_file;
  } else {
    const NoiseRule rule = parse_noise_rule(opt.noise);
    rep.noise_rule = rule.text;
    double sd = 0;
    if (rule.type == NoiseRule::ScaledStd) {
      if (opt.embedding_std >= 0) {
        sd = opt.embedding_std;
        rep.noise_source = opt.embedding_std_source.empty() ? "given" : opt.embedding_std_source;
      } else {
        sd = embedding_std(m, {std::vector<int32_t>(in.ids.begin() + in.subject_begin, in.ids.begin() + in.subject_end)});
        rep.noise_source = "prompt subject tokens";
      }
      rep.embedding_std = sd;
      rep.noise_scale = rule.value * sd;
    } else {
      rep.noise_scale = rule.value;
      rep.noise_source = rule.type == NoiseRule::Uniform ? "uniform(-1,1) x F" : "fixed sigma";
    }
    noise = make_noise(rule, sd, opt.samples, len, H, opt.seed);
  }
  rep.samples = int(noise.size());

  Tracer tr(m, in.ids, in.subject_begin, in.subject_end, std::move(noise), opt.replace, in.target);
  tr.set_pruning(opt.prune);
  rep.answer = tr.answer();
  rep.answer_source = in.target >= 0 ? "target" : "argmax";
  rep.high_score = tr.high_score();
  rep.low_score = tr.low_score();
  rep.mode = opt.naive ? "naive" : "cached";

  // Expert tokens.
  std::vector<int> etoks = opt.expert_tokens;
  if (opt.expert_all_tokens) {
    etoks.resize(size_t(S));
    std::iota(etoks.begin(), etoks.end(), 0);
  } else if (etoks.empty()) {
    etoks = {in.subject_end - 1, S - 1};
  }
  for (int t : etoks)
    if (t < 0 || t >= S) throw InputError("expert token " + std::to_string(t) + " is outside the prompt");
  std::sort(etoks.begin(), etoks.end());
  etoks.erase(std::unique(etoks.begin(), etoks.end()), etoks.end());

  // Token rows of the resid/attn/moe/shared kinds (ROME's token_range).
  std::vector<int> rows = opt.tokens;
  if (rows.empty()) {
    rows.resize(size_t(S));
    std::iota(rows.begin(), rows.end(), 0);
  }
  for (int t : rows)
    if (t < 0 || t >= S) throw InputError("token " + std::to_string(t) + " is outside the prompt");
  std::sort(rows.begin(), rows.end());
  rows.erase(std::unique(rows.begin(), rows.end()), rows.end());

  // Build every restoration of every kind, run them together, then scatter the scores.
  const double nan = std::numeric_limits<double>::quiet_NaN();
  struct Slot {
    int kind_index, row, layer;
    int expert_index = -1;         // ≥ 0: into KindResult::experts
    int shared_expert_index = -1;  // ≥ 0: into KindResult::shared_experts
  };
  const int shared_alone = rep.n_shared_experts > 1 ? rep.n_shared_experts : 0;  // shared experts restored alone
  std::vector<Restoration> rs;
  std::vector<Slot> slots;
  bool any_shared = false;
  for (bool s : rep.shared_layers) any_shared = any_shared || s;
  for (Kind k : opt.kinds) {
    if (k == Kind::Shared && !any_shared) continue;
    KindResult kr;
    kr.kind = k;
    kr.window = (k == Kind::Attn || k == Kind::Moe) ? opt.window : 1;
    const int ki = int(rep.kinds.size());
    if (k == Kind::Expert) {
      kr.rows = etoks;
      kr.scores.assign(etoks.size(), std::vector<double>(size_t(L), nan));
      kr.dominant.assign(etoks.size(), std::vector<int>(size_t(L), -1));
      for (int ri = 0; ri < int(etoks.size()); ++ri)
        for (int l = 0; l < L; ++l) {
          if (!rep.moe_layers[size_t(l)]) continue;
          const LayerRouting& rt = tr.clean_routing(l);
          for (int j = 0; j < int(rt.ids.cols()); ++j) {
            ExpertScore es;
            es.token = etoks[size_t(ri)];
            es.layer = l;
            es.expert = rt.ids(es.token, j);
            es.rank = j;
            es.weight = rt.weights(es.token, j);
            slots.push_back({ki, ri, l, int(kr.experts.size())});
            rs.push_back({Patch{Kind::Expert, es.token, l, es.expert}});
            kr.experts.push_back(es);
          }
        }
    } else {
      kr.rows = rows;
      kr.scores.assign(rows.size(), std::vector<double>(size_t(L), nan));
      for (int ri = 0; ri < int(rows.size()); ++ri)
        for (int l = 0; l < L; ++l) {
          const int t = rows[size_t(ri)];
          Restoration r;
          if (k == Kind::Attn || k == Kind::Moe) {
            const int lo = std::max(0, l - opt.window / 2), hi = std::min(L, l + (opt.window + 1) / 2);
            for (int l2 = lo; l2 < hi; ++l2) r.push_back({k, t, l2, -1});
          } else if (k == Kind::Shared) {
            if (!rep.shared_layers[size_t(l)]) continue;
            r.push_back({k, t, l, -1});
            for (int j = 0; j < shared_alone; ++j) {
              slots.push_back({ki, ri, l, -1, int(kr.shared_experts.size())});
              rs.push_back({Patch{k, t, l, j}});
              kr.shared_experts.push_back({t, l, j, 0.0});
            }
          } else {
            r.push_back({k, t, l, -1});
          }
          slots.push_back({ki, ri, l});
          rs.push_back(std::move(r));
        }
    }
    rep.kinds.push_back(std::move(kr));
  }

  ProgressBar bar(opt.progress, "trace " + (in.id.empty() ? std::string("") : in.id + " "));
  const std::vector<double> p =
      tr.run(rs, opt.naive, opt.batch_rows, [&](int64_t d, int64_t t) { bar(d, t); });
  for (size_t i = 0; i < slots.size(); ++i) {
    const Slot& s = slots[i];
    KindResult& kr = rep.kinds[size_t(s.kind_index)];
    if (s.shared_expert_index >= 0) {
      kr.shared_experts[size_t(s.shared_expert_index)].score = p[i];
    } else if (s.expert_index >= 0) {
      ExpertScore& es = kr.experts[size_t(s.expert_index)];
      es.score = p[i];
      double& best = kr.scores[size_t(s.row)][size_t(s.layer)];
      if (std::isnan(best) || p[i] > best) {
        best = p[i];
        kr.dominant[size_t(s.row)][size_t(s.layer)] = es.expert;
      }
    } else {
      kr.scores[size_t(s.row)][size_t(s.layer)] = p[i];
    }
  }
  rep.stats = tr.stats();
  return rep;
}

// ================================================================================================ text level

std::vector<std::string> counterfact_subjects(const std::string& path) {
  std::vector<std::string> out;
  std::ifstream f(path);
  if (!f) return out;
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(f);
  } catch (const std::exception& e) {
    throw InputError(path + ": malformed JSON (" + e.what() + ")");
  }
  if (!j.is_array()) return out;
  for (const auto& r : j) {
    if (r.contains("requested_rewrite") && r["requested_rewrite"].contains("subject") &&
        r["requested_rewrite"]["subject"].is_string())
      out.push_back(r["requested_rewrite"]["subject"].get<std::string>());
    else if (r.contains("subject") && r["subject"].is_string())
      out.push_back(r["subject"].get<std::string>());
  }
  return out;
}

double subject_embedding_std(const Model& m, const Tokenizer& tok, const std::vector<std::string>& subjects) {
  std::vector<std::vector<int32_t>> lists;
  for (const std::string& s : subjects) {
    const Tokenizer::Encoding enc = tok.encode(s, true);
    std::vector<int32_t> ids;
    for (size_t i = 0; i < enc.size(); ++i)
      if (!enc.special_mask[i]) ids.push_back(enc.ids[i]);
    lists.push_back(std::move(ids));
  }
  return embedding_std(m, lists);
}

std::pair<int, int> locate_subject(const Tokenizer& tok, const std::string& prompt, const std::string& subject,
                                   std::vector<int32_t>* ids) {
  if (subject.empty()) throw InputError("--subject is empty");
  const Tokenizer::Encoding enc = tok.encode(prompt, true);
  const auto span = tok.find_span(enc, prompt, subject);
  if (!span) throw InputError("subject '" + subject + "' is not in the prompt '" + prompt + "'");
  if (ids) *ids = enc.ids;
  return *span;
}

namespace {
bool ends_with_space(const std::string& s) { return !s.empty() && std::isspace((unsigned char)s.back()); }
bool starts_with_space(const std::string& s) { return !s.empty() && std::isspace((unsigned char)s.front()); }

int first_token_of_continuation(const Tokenizer& tok, const std::string& prompt, std::string text,
                                const char* what) {
  if (text.empty()) throw InputError(std::string(what) + " is empty");
  if (!ends_with_space(prompt) && !starts_with_space(text)) text = " " + text;
  const std::vector<int32_t> ids = tok.encode_ids(text, false);
  if (ids.empty()) throw InputError(std::string(what) + " '" + text + "' encodes to no tokens");
  return ids[0];
}
}  // namespace

TraceReport trace_fact(const Model& m, const Tokenizer& tok, const TraceRequest& req, const TraceOptions& opt) {
  TraceInput in;
  const auto [b, e] = locate_subject(tok, req.prompt, req.subject, &in.ids);
  in.subject_begin = b;
  in.subject_end = e;
  in.prompt = req.prompt;
  in.subject = req.subject;
  in.id = req.id;
  in.expected = req.expected;
  in.target_text = req.target;
  if (!req.target.empty()) in.target = first_token_of_continuation(tok, req.prompt, req.target, "--target");
  for (int32_t id : in.ids) in.tokens.push_back(tok.decode({id}));
  TraceOptions o = opt;
  if (o.noise_file.empty() && o.embedding_std < 0 && parse_noise_rule(o.noise).type == NoiseRule::ScaledStd) {
    const std::vector<std::string> subjects = counterfact_subjects(bundled_counterfact_path());
    if (!subjects.empty()) {
      o.embedding_std = subject_embedding_std(m, tok, subjects);
      o.embedding_std_source = "bundled CounterFact subjects (" + std::to_string(subjects.size()) + ")";
    } else {
      o.embedding_std = subject_embedding_std(m, tok, {req.subject});
      o.embedding_std_source = "prompt subject";
    }
  }
  TraceReport rep = trace_ids(m, in, o);
  rep.answer_text = tok.decode({rep.answer});
  if (!req.expected.empty()) {
    const int want = first_token_of_continuation(tok, req.prompt, req.expected, "expected answer");
    rep.correct_prediction = rep.answer == want;
  }
  return rep;
}

}  // namespace moedit::trace
