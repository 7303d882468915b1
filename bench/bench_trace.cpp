// Causal-tracing benchmark: cached vs naive restorations (all kinds) on one prompt; reports wall-time and FLOP
// ratios measured in the same run (the anchor is the naive mode), and checks that both give the same scores.
//
//   bench_trace [MODEL_DIR] [--ids 1,2,...] [--subject-range B:E] [--samples 10] [--window 10] [--reps 1]
//               [--noise-file PATH] [--save-noise PATH] [--unbatched] [--no-prune] [--json]
//
// Without MODEL_DIR a random Qwen2-MoE-shaped model is built in memory (tools/trace_reference.py make-model's
// default shape: H 256, 12 layers, 16 experts top-4, expert width 256, shared width 512, vocab 4096).
// --unbatched also times the naive mode with one restoration per forward (ROME's loop); --no-prune keeps the
// no-op patches and duplicate restorations in cached mode (pure prefix caching). Wall and CPU times are reported.
// bench/bench_trace.sh runs this and the HF-transformers script on the same checkpoint.
#include <sys/resource.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>

#include "bench_util.h"
#include "io/text.h"
#include "model/model.h"
#include "tracing/trace.h"

using namespace moedit;

namespace {

std::vector<int32_t> parse_list(const std::string& s) {
  std::vector<int32_t> v;
  for (const std::string& t : split_list(s)) v.push_back(std::stoi(t));
  return v;
}

double cpu_seconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return double(u.ru_utime.tv_sec + u.ru_stime.tv_sec) + 1e-6 * double(u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

double max_diff(const trace::TraceReport& a, const trace::TraceReport& b) {
  double d = 0;
  for (size_t k = 0; k < a.kinds.size(); ++k) {
    for (size_t i = 0; i < a.kinds[k].scores.size(); ++i)
      for (size_t l = 0; l < a.kinds[k].scores[i].size(); ++l) {
        const double x = a.kinds[k].scores[i][l], y = b.kinds[k].scores[i][l];
        if (std::isfinite(x) && std::isfinite(y)) d = std::max(d, std::abs(x - y));
      }
    for (size_t i = 0; i < a.kinds[k].experts.size(); ++i)
      d = std::max(d, std::abs(a.kinds[k].experts[i].score - b.kinds[k].experts[i].score));
  }
  return d;
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_dir, ids_arg = "11,203,57,981,4000,12,77,310,2048,5,640,99,1500,7", range = "3:6",
                          noise_file, save_noise;
  int samples = 10, window = 10, reps = 1;
  bool unbatched = false, as_json = false, prune = true;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&] { return bench::flag_value(argc, argv, i, "missing value for %s\n"); };
    if (a == "--ids") ids_arg = next();
    else if (a == "--subject-range") range = next();
    else if (a == "--samples") samples = std::stoi(next());
    else if (a == "--window") window = std::stoi(next());
    else if (a == "--reps") reps = std::stoi(next());
    else if (a == "--noise-file") noise_file = next();
    else if (a == "--save-noise") save_noise = next();
    else if (a == "--unbatched") unbatched = true;
    else if (a == "--no-prune") prune = false;
    else if (a == "--json") as_json = true;
    else if (a == "-h" || a == "--help") {
      std::printf("usage: bench_trace [MODEL_DIR] [--ids ..] [--subject-range B:E] [--samples N] [--window W] "
                  "[--reps R] [--noise-file P] [--save-noise P] [--unbatched] [--json]\n");
      return 0;
    } else if (!a.empty() && a[0] != '-') model_dir = a;
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  try {
    std::shared_ptr<Model> m;
    if (!model_dir.empty()) {
      m = Model::load(model_dir);
    } else {
      nlohmann::json j = {{"model_type", "qwen2_moe"},   {"vocab_size", 4096},        {"hidden_size", 256},
                          {"num_hidden_layers", 12},     {"num_attention_heads", 8},  {"num_key_value_heads", 8},
                          {"intermediate_size", 512},    {"moe_intermediate_size", 256},
                          {"shared_expert_intermediate_size", 512}, {"num_experts", 16},
                          {"num_experts_per_tok", 4},    {"rms_norm_eps", 1e-6}};
      const ModelConfig cfg = parse_config(j, "bench");
      m = std::make_shared<Model>(cfg, random_weights(cfg, 7, 0.06f));
    }
    trace::TraceInput in;
    in.ids = parse_list(ids_arg);
    const size_t c = range.find(':');
    in.subject_begin = std::stoi(range.substr(0, c));
    in.subject_end = std::stoi(range.substr(c + 1));
    trace::TraceOptions o;
    o.samples = samples;
    o.window = window;
    o.noise_file = noise_file;
    o.prune = prune;
    if (!save_noise.empty()) {
      const double sd = trace::embedding_std(
          *m, {std::vector<int32_t>(in.ids.begin() + in.subject_begin, in.ids.begin() + in.subject_end)});
      trace::save_noise_file(save_noise, trace::make_noise(trace::parse_noise_rule("s3"), sd, samples,
                                                           in.subject_end - in.subject_begin, m->config().hidden, 1));
    }
    const ModelConfig& cfg = m->config();
    struct Timing {
      double wall = 1e30, cpu = 1e30;
    };
    auto time_trace = [&](bool naive, int batch_rows, trace::TraceReport* keep) {
      o.naive = naive;
      o.batch_rows = batch_rows;
      Timing t;
      for (int r = 0; r < reps; ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        const double c0 = cpu_seconds();
        trace::TraceReport rep = trace::trace_ids(*m, in, o);
        t.cpu = std::min(t.cpu, cpu_seconds() - c0);
        t.wall = std::min(t.wall, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        if (keep) *keep = std::move(rep);
      }
      return t;
    };
    trace::trace_ids(*m, in, o);  // warm-up (page in weights, OpenMP pool)
    trace::TraceReport cached, naive, naive1;
    const Timing tc = time_trace(false, 1024, &cached);
    const Timing tn = time_trace(true, 1024, &naive);
    Timing tn1;
    if (unbatched) tn1 = time_trace(true, 0, &naive1);
    const double t_cached = tc.wall, t_naive = tn.wall, t_naive1 = tn1.wall;
    const double diff = max_diff(cached, naive);
    const double f_cached = cached.stats.flops + cached.stats.setup_flops;
    const double f_naive = naive.stats.flops + naive.stats.setup_flops;
    nlohmann::json j = {
        {"model", model_dir.empty() ? "random qwen2_moe (in memory)" : model_dir},
        {"layers", cfg.n_layers},
        {"hidden", cfg.hidden},
        {"experts", cfg.n_experts},
        {"top_k", cfg.top_k},
        {"tokens", in.ids.size()},
        {"subject_range", {in.subject_begin, in.subject_end}},
        {"samples", cached.samples},
        {"window", window},
        {"restorations", cached.stats.restorations},
        {"threads", ops::num_threads()},
        {"computed", cached.stats.computed},
        {"pruning", prune},
        {"cached_seconds", t_cached},
        {"naive_seconds", t_naive},
        {"time_ratio", t_cached / t_naive},
        {"cached_cpu_seconds", tc.cpu},
        {"naive_cpu_seconds", tn.cpu},
        {"cpu_time_ratio", tc.cpu / tn.cpu},
        {"cached_gflops", f_cached / 1e9},
        {"naive_gflops", f_naive / 1e9},
        {"flop_ratio", f_cached / f_naive},
        {"restoration_flop_ratio", cached.stats.flops / naive.stats.flops},
        {"cached_gflops_per_s", f_cached / t_cached / 1e9},
        {"naive_gflops_per_s", f_naive / t_naive / 1e9},
        {"max_abs_score_diff", diff},
        {"high_score", cached.high_score},
        {"low_score", cached.low_score},
        {"answer", cached.answer}};
    if (unbatched) {
      j["naive_unbatched_seconds"] = t_naive1;
      j["naive_unbatched_cpu_seconds"] = tn1.cpu;
      j["time_ratio_vs_unbatched"] = t_cached / t_naive1;
    }
    if (as_json) {
      std::printf("%s\n", j.dump().c_str());
    } else {
      std::printf("causal trace, all kinds: %d tokens, %d layers, %d samples, %lld restorations, %d threads\n",
                  int(in.ids.size()), cfg.n_layers, cached.samples, (long long)cached.stats.restorations,
                  ops::num_threads());
      std::printf("  cached %.3f s  naive %.3f s  time ratio %.3f   (CPU time %.3f s / %.3f s = %.3f)\n", t_cached,
                  t_naive, t_cached / t_naive, tc.cpu, tn.cpu, tc.cpu / tn.cpu);
      std::printf("  %lld of %lld restorations computed in cached mode (pruning %s)\n", (long long)cached.stats.computed,
                  (long long)cached.stats.restorations, prune ? "on" : "off");
      std::printf("  cached %.2f GFLOP  naive %.2f GFLOP  FLOP ratio %.3f (restorations only %.3f)\n", f_cached / 1e9,
                  f_naive / 1e9, f_cached / f_naive, cached.stats.flops / naive.stats.flops);
      if (unbatched)
        std::printf("  naive, one restoration per forward: %.3f s (cached/that = %.3f)\n", t_naive1, t_cached / t_naive1);
      std::printf("  max |cached - naive| = %.2e\n", diff);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_trace: %s\n", e.what());
    return 1;
  }
  return 0;
}
