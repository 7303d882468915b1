// The GPU benchmarks of issues 22 and 23 on random bf16 weights of a real config, built in memory (no checkpoint
// file: a bf16 checkpoint's size in host RAM, filled in parallel), timed on one backend:
//
//   bench_gpu CONFIG_DIR [--device cuda] [--precision bf16|fp32] [--max-gpu-memory BYTES] [--layers N]
//             [--what forward,trace,expert,dataset,prefill,decode,keystats,edit,eval] [--tokenizer tokenizer.json]
//             [--corpus FILE] [--keystats-tokens 100000] [--eval-cases 20] [--dataset-facts 8] [--reps 3]
//             [--json FILE]
//
//   forward   one forward of 11 × 16 tokens (ROME's trace batch: 1 clean + 10 corrupted rows), best of reps + 2
//   trace     a full causal trace of a 16-token fact (subject tokens 3..5), kinds resid, attn, moe; 10 samples,
//             window 10 (the prefix-reuse algorithm, every restoration of a kind batched), best of reps (after a
//             warm-up run when reps > 1; the others below are best of max(1, reps − 1))
//   expert    the same fact's single-expert kind (every routed expert at the last subject token and the last token)
//   dataset   --dataset-facts facts of 10–16 tokens (kinds resid, attn, moe as `trace`) traced one at a time, then
//             together (trace_ids_together: `moedit trace --dataset`'s --together), facts per second each
//   prefill   4 × 2048 tokens, last-token logits: tokens/s and TFLOP/s (2 FLOPs per active weight per token plus
//             causal attention's QKᵀ and PV)
//   decode    greedy decoding at batch 1 with the KV cache (64 new tokens after a 16-token prompt, minus the 1-token
//             run): tokens/s, and the active weight bytes read per token (the HBM bound is those ÷ the bandwidth)
//   keystats  key statistics of the middle MoE layer over --keystats-tokens WikiText tokens (windows of 1024)
//   edit      a ROME edit of the dominant expert at the middle MoE layer with its statistics cached (computed first,
//             untimed, over 32k random tokens): ROME's 21 prompts (the bare one, 20 with a 10-token prefix) of a
//             10-token fact, a 2-token target, v* with ROME's defaults (20 steps, lr 0.5); the whole edit and its v*
//             part, best of max(1, reps − 1), reverted after each
//   eval      `moedit eval`'s loop over the first --eval-cases (20) bundled CounterFact records, tokenized with
//             --tokenizer: per case a ROME edit at the middle MoE layer (dominant expert, v* and statistics as `edit`),
//             the rewrite, paraphrase and neighbourhood scores, generation every 10th case, routing drift (512
//             WikiText-2 tokens), revert; cases per minute over the whole run (statistics computed before, untimed)
//
// --layers N keeps the first N layers (a model larger than the host's RAM); what is timed is then that model, and the
// output says so. Nothing is compared here: the HF anchor (../shared/bench/hf_trace_anchor.py) runs in the same GPU
// session and tools/gpu_check.sh puts both in one report.
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "bench_util.h"
#include "datasets/counterfact.h"
#include "datasets/eval_records.h"
#include "editor/keystats.h"
#include "editor/rome.h"
#include "eval/run.h"
#include "io/text.h"
#include "kernels/device.h"
#include "model/config.h"
#include "model/generate.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"
#include "tracing/trace.h"

#ifdef MOEDIT_HAS_CUDA
#include "kernels/cuda/cuda_backend.h"
#endif

using namespace moedit;
using bench::best_of;
using bench::Clock;
using bench::seconds_since;

namespace {

// Weights a token's forward reads: every attention matrix, the router, top_k routed experts, the shared block and
// dense MLPs (elements), per layer summed; the output matrix once (prefill: per sequence; decode: per token).
struct Active {
  double per_token = 0, output = 0, attn_flops_per_pair = 0;  // elements; 2·(QK + PV) FLOPs per (query, key)
};
Active active_weights(const Model& m) {
  const ModelConfig& c = m.config();
  const Weights& w = m.weights();
  Active a;
  for (int l = 0; l < c.n_layers; ++l) {
    const LayerWeights& L = w.layers[size_t(l)];
    for (const Weight* x : {&L.attn.wq, &L.attn.wk, &L.attn.wv, &L.attn.wo, &L.attn.wq_a, &L.attn.wq_b,
                            &L.attn.wkv_a, &L.attn.wkv_b})
      a.per_token += double(x->size());
    const auto bank = [](const ExpertBank& b) { return b.E ? 3.0 * double(b.I) * double(b.H) : 0.0; };
    if (L.ffn.moe) {
      a.per_token += double(L.ffn.router.size()) + double(c.top_k) * bank(L.ffn.experts);
      if (L.ffn.has_shared) a.per_token += bank(L.ffn.shared);
    } else {
      a.per_token += bank(L.ffn.experts);
    }
    const double dk = c.arch->attention == AttentionKind::MLA ? c.qk_dim() : c.head_dim;
    const double dv = c.arch->attention == AttentionKind::MLA ? c.v_head_dim : c.head_dim;
    a.attn_flops_per_pair += 2.0 * double(c.n_heads) * (dk + dv);
  }
  a.output = double(w.output_matrix().size());
  return a;
}

// n token ids in [3, V − 3): fixed, so every run times the same input.
std::vector<int32_t> ids_of(int n, int V, uint64_t seed) {
  std::vector<int32_t> v;
  uint64_t s = seed;
  for (int i = 0; i < n; ++i) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    v.push_back(int32_t(3 + (s >> 33) % uint64_t(V - 6)));
  }
  return v;
}

std::string read_file(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) throw std::runtime_error(p + ": cannot open");
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

}  // namespace

int main(int argc, char** argv) {
  std::string config_dir, device = "cuda", precision = "bf16", cap, what = "forward,trace,expert,prefill,decode",
              tokenizer, corpus, json_out;
  int layers = 0, reps = 3, eval_cases = 20, dataset_facts = 8;
  int64_t ks_tokens = 100000;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&] { return bench::flag_value(argc, argv, i, "missing value for %s\n"); };
    if (a == "--device") device = next();
    else if (a == "--precision") precision = next();
    else if (a == "--max-gpu-memory") cap = next();
    else if (a == "--layers") layers = std::stoi(next());
    else if (a == "--what") what = next();
    else if (a == "--tokenizer") tokenizer = next();
    else if (a == "--corpus") corpus = next();
    else if (a == "--keystats-tokens") ks_tokens = std::stoll(next());
    else if (a == "--eval-cases") eval_cases = std::max(1, std::stoi(next()));
    else if (a == "--dataset-facts") dataset_facts = std::max(1, std::stoi(next()));
    else if (a == "--json") json_out = next();
    else if (a == "--reps") reps = std::max(1, std::stoi(next()));
    else if (a == "-h" || a == "--help") {
      std::printf("usage: bench_gpu CONFIG_DIR [--device D] [--precision bf16|fp32] [--max-gpu-memory BYTES] "
                  "[--layers N] [--what forward,trace,expert,dataset,prefill,decode,keystats,edit,eval] "
                  "[--tokenizer F] [--corpus F] [--keystats-tokens N] [--eval-cases N] [--dataset-facts N] [--reps N] "
                  "[--json FILE]\n");
      return 0;
    } else if (!a.empty() && a[0] != '-') config_dir = a;
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  if (config_dir.empty()) {
    std::fprintf(stderr, "bench_gpu: a CONFIG_DIR (holding config.json) is required\n");
    return 2;
  }
  const auto wants = [&](const char* x) {
    return ("," + what + ",").find("," + std::string(x) + ",") != std::string::npos;
  };
  nlohmann::json out;
  try {
    nlohmann::json cj = nlohmann::json::parse(read_file(config_dir + "/config.json"));
    const int full_layers = cj.value("num_hidden_layers", 0);
    if (layers > 0 && layers < full_layers) cj["num_hidden_layers"] = layers;
    const ModelConfig cfg = parse_config(cj, config_dir + "/config.json");
    const Backend& be = backend_named(device);
    set_precision_named(be, precision);
    if (!cap.empty()) be.set_memory_limit(size_t(std::stod(cap)));

    auto t0 = Clock::now();
    const auto m = std::make_shared<Model>(cfg, random_weights(cfg, 1, 0.02f, ops::WType::BF16));
    const double t_weights = seconds_since(t0);
    m->set_backend(be);
    const WeightBytes wb = weight_bytes(m->weights());
    const Active act = active_weights(*m);
    out = {{"config", config_dir}, {"model_type", cj.value("model_type", "")}, {"layers", cfg.n_layers},
           {"full_layers", full_layers}, {"device", be.name()}, {"precision", precision},
           {"max_gpu_memory", cap.empty() ? 0.0 : std::stod(cap)}, {"weight_bytes", double(wb.mapped + wb.owned)},
           {"random_weights_s", t_weights}};
    std::printf("%s: %d of %d layers, %.2f GB of weights (random bf16, built in %.1f s), %s, %s%s\n",
                config_dir.c_str(), cfg.n_layers, full_layers, double(wb.mapped + wb.owned) / 1e9, t_weights,
                be.name().c_str(), precision.c_str(), cap.empty() ? "" : (", --max-gpu-memory " + cap).c_str());
    t0 = Clock::now();
    m->forward({ids_of(16, cfg.vocab_size, 1)});  // uploads the weights (or streams them under a cap)
    out["first_forward_s"] = seconds_since(t0);
    std::printf("first forward (uploads): %.2f s\n", double(out["first_forward_s"]));

    if (wants("forward")) {
      std::vector<std::vector<int32_t>> rows(11, ids_of(16, cfg.vocab_size, 2));
      const double t = best_of(reps + 2, [&] { m->forward(rows); });
      out["forward_11x16_ms"] = 1e3 * t;
      std::printf("forward 11 x 16 tokens: %.1f ms\n", 1e3 * t);
    }
    // The MoE layer keystats and edit use: the first at or above the middle.
    const auto middle_moe_layer = [&] {
      int layer = cfg.n_layers / 2;
      while (layer < cfg.n_layers && !cfg.is_moe(layer)) ++layer;
      if (layer >= cfg.n_layers) throw std::runtime_error("no MoE layer at or above the middle");
      return layer;
    };
    trace::TraceInput in;
    in.ids = ids_of(16, cfg.vocab_size, 3);
    in.subject_begin = 3;
    in.subject_end = 6;
    trace::TraceOptions o;
    o.samples = 10;
    o.window = 10;
    if (wants("trace")) {
      o.kinds = {trace::Kind::Resid, trace::Kind::Attn, trace::Kind::Moe};
      trace::TraceReport r;
      if (reps > 1) r = trace::trace_ids(*m, in, o);  // warm
      const double t = best_of(reps, [&] { r = trace::trace_ids(*m, in, o); });
      out["trace_3kinds_s"] = t;
      out["trace_restorations"] = r.stats.computed;
      out["trace_batches"] = r.stats.batches;
      std::printf("trace resid+attn+moe (16 tokens, 10 samples, window 10): %.3f s (%lld restorations run in %lld "
                  "batches)\n", t, static_cast<long long>(r.stats.computed), static_cast<long long>(r.stats.batches));
    }
    if (wants("expert")) {
      o.kinds = {trace::Kind::Expert};
      trace::TraceReport r;
      const double t = best_of(std::max(1, reps - 1), [&] { r = trace::trace_ids(*m, in, o); });
      out["trace_expert_s"] = t;
      out["trace_expert_restorations"] = r.kinds.empty() ? 0 : r.kinds[0].experts.size();
      std::printf("trace single-expert kind: %.3f s (%zu expert restorations)\n", t,
                  r.kinds.empty() ? size_t(0) : r.kinds[0].experts.size());
    }
    if (wants("dataset")) {  // many facts: one at a time vs traced together (dataset mode's --together)
      o.kinds = {trace::Kind::Resid, trace::Kind::Attn, trace::Kind::Moe};
      std::vector<trace::TraceInput> facts(static_cast<size_t>(dataset_facts));
      for (int k = 0; k < dataset_facts; ++k) {
        facts[size_t(k)].ids = ids_of(10 + k % 7, cfg.vocab_size, 100 + uint64_t(k));
        facts[size_t(k)].subject_begin = 2;
        facts[size_t(k)].subject_end = 4 + k % 3;
      }
      const double t_alone = best_of(std::max(1, reps - 1), [&] {
        for (const trace::TraceInput& f : facts) trace::trace_ids(*m, f, o);
      });
      const double t_together = best_of(std::max(1, reps - 1), [&] { trace::trace_ids_together(*m, facts, o); });
      out["dataset_facts"] = dataset_facts;
      out["dataset_alone_facts_per_s"] = dataset_facts / t_alone;
      out["dataset_together_facts_per_s"] = dataset_facts / t_together;
      std::printf("trace %d facts (10-16 tokens, resid+attn+moe): one at a time %.3f s (%.2f facts/s), together "
                  "%.3f s (%.2f facts/s, x%.2f)\n", dataset_facts, t_alone, dataset_facts / t_alone, t_together,
                  dataset_facts / t_together, t_alone / t_together);
    }
    if (wants("prefill")) {
      std::vector<std::vector<int32_t>> seqs;
      for (int s = 0; s < 4; ++s) seqs.push_back(ids_of(2048, cfg.vocab_size, 10 + uint64_t(s)));
      ForwardOptions fo;
      fo.logits_all = false;
      m->forward({seqs[0]}, fo);  // warm (the activations' pool)
      const double t = best_of(std::max(1, reps - 1), [&] { m->forward(seqs, fo); });
      const double tokens = 4 * 2048.0;
      const double flops = 2 * act.per_token * tokens + 2 * act.output * 4 +
                           act.attn_flops_per_pair * 4 * (2048.0 * 2049.0 / 2);
      out["prefill_s"] = t;
      out["prefill_tok_s"] = tokens / t;
      out["prefill_tflops"] = flops / t / 1e12;
      std::printf("prefill 4 x 2048: %.3f s, %.0f tok/s, %.1f TFLOP/s\n", t, tokens / t, flops / t / 1e12);
    }
    if (wants("decode")) {
      GenerateOptions g;
      const auto prompt = ids_of(16, cfg.vocab_size, 20);
      g.max_new_tokens = 1;
      generate(*m, prompt, g);  // warm
      const double t1 = best_of(std::max(1, reps - 1), [&] { generate(*m, prompt, g); });
      g.max_new_tokens = 65;
      const double t65 = best_of(std::max(1, reps - 1), [&] { generate(*m, prompt, g); });
      const double per = (t65 - t1) / 64;
      const double bytes = 2 * (act.per_token + act.output);  // bf16
      out["decode_tok_s"] = 1 / per;
      out["decode_active_bytes"] = bytes;
      std::printf("greedy decode, batch 1: %.1f tok/s (%.2f GB of active weights per token)\n", 1 / per,
                  bytes / 1e9);
    }
    if (wants("keystats")) {
      if (tokenizer.empty()) throw std::runtime_error("keystats needs --tokenizer");
      const Tokenizer tok = Tokenizer::from_file(tokenizer);
      const auto windows =
          corpus_windows(tok, read_file(corpus.empty() ? default_corpus_path() : corpus), 1024, ks_tokens);
      int64_t n = 0;
      for (const auto& w : windows) n += int64_t(w.size());
      const int layer = middle_moe_layer();
      t0 = Clock::now();
      const auto stats = compute_key_stats(*m, layer, windows);
      const double t = seconds_since(t0);
      out["keystats_s"] = t;
      out["keystats_tokens"] = n;
      out["keystats_layer"] = layer;
      std::printf("key statistics, layer %d, %lld tokens, %zu experts: %.2f s\n", layer, static_cast<long long>(n),
                  stats.size(), t);
    }
    // Key statistics of a layer over 32k random tokens (untimed), as the moment source of an edit.
    const auto cached_moments = [&](int layer) -> MomentSource {
      std::vector<std::vector<int32_t>> windows;
      for (int w = 0; w < 32; ++w) windows.push_back(ids_of(1024, cfg.vocab_size, 100 + uint64_t(w)));
      auto stats = std::make_shared<std::vector<SecondMoment>>(compute_key_stats(*m, layer, windows));
      return [stats](int l, int e) -> std::shared_ptr<const SecondMoment> {
        for (const auto& st : *stats)
          if (st.layer == l && st.expert == e) return std::make_shared<SecondMoment>(st);
        return nullptr;
      };
    };
    if (wants("edit")) {
      const int layer = middle_moe_layer();
      EditIds ids;
      const auto fact = ids_of(10, cfg.vocab_size, 30);  // subject = tokens 2..4
      ids.prompts.push_back(fact);
      ids.subject_last.push_back(4);
      for (int t = 0; t < 20; ++t) {
        auto p = ids_of(10, cfg.vocab_size, 40 + uint64_t(t));
        p.insert(p.end(), fact.begin(), fact.end());
        ids.prompts.push_back(p);
        ids.subject_last.push_back(14);
      }
      ids.kl_prompt = {fact[2], fact[3], fact[4], 3, 4};
      ids.kl_subject_last = 2;
      ids.target = ids_of(2, cfg.vocab_size, 60);
      EditOptions eo;
      eo.layer = layer;
      eo.target = parse_edit_target("dominant");
      eo.moments = cached_moments(layer);
      EditResult r;
      double vstar = 1e300;
      const double t = best_of(std::max(1, reps - 1), [&] {
        r = apply_edit_ids(*m, ids, eo);
        vstar = std::min(vstar, r.vstar_seconds);
        revert(*m, r);
      });
      out["edit_s"] = t;
      out["edit_vstar_s"] = vstar;
      out["edit_layer"] = layer;
      out["edit_vstar_steps"] = r.vstar.updates;
      std::printf("ROME edit, layer %d, dominant expert, statistics cached: %.3f s (v* %.3f s, %d steps, on %s)\n",
                  layer, t, vstar, int(r.vstar.updates), be.name().c_str());
#ifdef MOEDIT_HAS_CUDA
      if (!be.host_memory()) {
        out["edit_solver"] = cuda_solver();
        std::printf("  C⁻¹k* solved on %s\n", cuda_solver().c_str());
      }
#endif
    }
    if (wants("eval")) {
      if (tokenizer.empty()) throw std::runtime_error("eval needs --tokenizer");
      const Tokenizer tok = Tokenizer::from_file(tokenizer);
      const int layer = middle_moe_layer();
      eval::RunOptions o;
      o.limit = eval_cases;
      o.generation_interval = 10;
      o.edit.layer = layer;
      o.edit.target = parse_edit_target("dominant");
      o.edit.moments = cached_moments(layer);
      o.settings = {{"bench", "bench_gpu eval"}};
      const std::filesystem::path dir =
          std::filesystem::temp_directory_path() / ("bench_gpu_eval_" + std::to_string(::getpid()));
      o.out_dir = dir.string();
      const auto records = load_eval_records(bundled_counterfact_path());
      t0 = Clock::now();
      const eval::RunResult r = eval::run_eval(*m, tok, records, o);
      const double t = seconds_since(t0);
      std::filesystem::remove_all(dir);
      out["eval_s"] = t;
      out["eval_cases"] = r.evaluated;
      out["eval_cases_per_min"] = 60.0 * r.evaluated / t;
      out["eval_layer"] = layer;
      std::printf("eval, layer %d, dominant expert, generation every 10th case: %d cases in %.1f s, %.1f cases/min\n",
                  layer, r.evaluated, t, 60.0 * r.evaluated / t);
    }
#ifdef MOEDIT_HAS_CUDA
    if (!be.host_memory()) {
      const CudaMemory mem = cuda_memory();
      out["gpu_peak_bytes"] = double(mem.peak);
      std::printf("device memory: peak %.2f GB, held %.2f GB\n", double(mem.peak) / 1e9,
                  double(mem.allocated) / 1e9);
    }
#endif
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_gpu: %s\n", e.what());
    out["error"] = e.what();
    if (!json_out.empty()) std::ofstream(json_out) << out.dump(1) << "\n";
    return 1;
  }
  if (!json_out.empty()) std::ofstream(json_out) << out.dump(1) << "\n";
  return 0;
}
