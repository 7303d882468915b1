// Causal tracing, whole traces: the kinds of sites, and trace_ids(), which draws the noise, builds every
// restoration of every kind, runs them on a Tracer and assembles the report. (Noise: noise.cpp; the Tracer and
// its engines: tracer.cpp, trace_patches.cpp, trace_naive.cpp, trace_cached.cpp; text level: trace_text.cpp.)
#include "tracing/trace_internal.h"

#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <numeric>

#include "io/errors.h"
#include "io/text.h"

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
  for (const std::string& tok : split_list(csv)) {
    if (tok.empty()) continue;
    const Kind k = parse_kind(tok);
    if (std::find(out.begin(), out.end(), k) == out.end()) out.push_back(k);
  }
  if (out.empty()) throw InputError("--kinds: no kind given");
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

// A fact before its trace: its report with every field the input and options give, its noise, and the token rows
// of each kind. InputError for a bad input.
struct Prepared {
  TraceReport rep;
  Tracer::Prompt prompt;
  std::vector<int> rows, etoks;  // resid/attn/moe/shared rows; expert-kind tokens
};

Prepared prepare(const Model& m, const TraceInput& in, const TraceOptions& opt) {
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
  const int len = in.subject_end - in.subject_begin;

  Prepared pr;
  TraceReport& rep = pr.rep;
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
  rep.mode = opt.naive ? "naive" : "cached";
  rep.answer_source = in.target >= 0 ? "target" : "argmax";

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
  pr.prompt = {in.ids, in.subject_begin, in.subject_end, std::move(noise), in.target};

  // Expert tokens.
  std::vector<int>& etoks = pr.etoks;
  etoks = opt.expert_tokens;
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
  std::vector<int>& rows = pr.rows;
  rows = opt.tokens;
  if (rows.empty()) {
    rows.resize(size_t(S));
    std::iota(rows.begin(), rows.end(), 0);
  }
  for (int t : rows)
    if (t < 0 || t >= S) throw InputError("token " + std::to_string(t) + " is outside the prompt");
  std::sort(rows.begin(), rows.end());
  rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
  return pr;
}

// Where a restoration's score goes in the report.
struct Slot {
  int kind_index, row, layer;
  int expert_index = -1;         // ≥ 0: into KindResult::experts
  int shared_expert_index = -1;  // ≥ 0: into KindResult::shared_experts
};

// Every restoration of every kind of one fact (rep.kinds gets its rows and experts), and where each score goes.
void build_restorations(const Tracer& tr, const Prepared& pr, TraceReport& rep, const TraceOptions& opt,
                        std::vector<Restoration>& rs, std::vector<Slot>& slots) {
  const int L = rep.n_layers;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const int shared_alone = rep.n_shared_experts > 1 ? rep.n_shared_experts : 0;  // shared experts restored alone
  bool any_shared = false;
  for (bool s : rep.shared_layers) any_shared = any_shared || s;
  for (Kind k : opt.kinds) {
    if (k == Kind::Shared && !any_shared) continue;
    KindResult kr;
    kr.kind = k;
    kr.window = (k == Kind::Attn || k == Kind::Moe) ? opt.window : 1;
    const int ki = int(rep.kinds.size());
    if (k == Kind::Expert) {
      const std::vector<int>& etoks = pr.etoks;
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
      const std::vector<int>& rows = pr.rows;
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
}

void scatter(const std::vector<Slot>& slots, const std::vector<double>& p, TraceReport& rep) {
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
}

}  // namespace

std::vector<TraceReport> trace_ids_together(const Model& m, const std::vector<TraceInput>& ins,
                                            const TraceOptions& opt, std::vector<std::string>* errors) {
  if (opt.window < 1) throw InputError("--window must be at least 1");
  const ThreadLimit limit(opt.threads);
  std::vector<TraceReport> out(ins.size());
  if (errors) errors->assign(ins.size(), "");
  std::vector<Prepared> prep;
  std::vector<size_t> index;  // prep[i] is ins[index[i]]
  for (size_t i = 0; i < ins.size(); ++i) {
    try {
      prep.push_back(prepare(m, ins[i], opt));
      index.push_back(i);
    } catch (const InputError& e) {
      fact_failed(e, i, ins.size(), ins[i].id, errors);
    }
  }
  if (prep.empty()) return out;

  std::vector<Tracer::Prompt> prompts;
  for (Prepared& pr : prep) prompts.push_back(std::move(pr.prompt));
  std::vector<Tracer> tracers = Tracer::together(m, std::move(prompts), opt.replace);
  std::vector<Tracer*> tp;
  std::vector<std::vector<Restoration>> rs(prep.size());
  std::vector<std::vector<Slot>> slots(prep.size());
  for (size_t i = 0; i < prep.size(); ++i) {
    Tracer& tr = tracers[i];
    TraceReport& rep = prep[i].rep;
    tr.set_pruning(opt.prune);
    rep.answer = tr.answer();
    rep.high_score = tr.high_score();
    rep.low_score = tr.low_score();
    build_restorations(tr, prep[i], rep, opt, rs[i], slots[i]);
    tp.push_back(&tr);
  }
  const std::string label = prep.size() > 1 ? std::to_string(prep.size()) + " facts "
                            : prep[0].rep.id.empty() ? std::string("") : prep[0].rep.id + " ";
  ProgressBar bar(opt.progress, "trace " + label);
  const std::vector<std::vector<double>> p =
      Tracer::run_together(tp, rs, opt.naive, opt.batch_rows, [&](int64_t d, int64_t t) { bar(d, t); });
  for (size_t i = 0; i < prep.size(); ++i) {
    TraceReport& rep = prep[i].rep;
    scatter(slots[i], p[i], rep);
    rep.stats = tracers[i].stats();
    out[index[i]] = std::move(rep);
  }
  return out;
}

TraceReport trace_ids(const Model& m, const TraceInput& in, const TraceOptions& opt) {
  return std::move(trace_ids_together(m, {in}, opt).front());
}

}  // namespace moedit::trace
