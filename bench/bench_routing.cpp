// Routing-analysis benchmark: what routing capture costs on top of the forward pass, over ~1,000 prompts.
//
// Model: the bundled demo model with its tokenizer and the bundled CounterFact prompts (rewrite prompt + its
// paraphrase prompts, records taken in order until --prompts sequences), or, when the demo model is absent (or
// --synthetic), a random-weight Qwen2-MoE shaped like it (H 128, 4 layers, 16 experts, top-2, shared expert) on
// random prompts of CounterFact-like lengths (8–24 tokens).
//
// Timings (best of --reps, same packed batches of --batch-tokens tokens, same threads):
//   anchor A  plain forward, last-token logits only (what any prompt-scoring run does)
//   anchor B  plain forward up to the last MoE layer, no logits (the same work capture_routing asks of the model)
//   capture   capture_routing: routing ids/weights + router-logit hooks + full softmax per token, split per prompt
//   dataset   paraphrase_consistency over the (prompt, paraphrase) pairs (capture + all comparisons + ranking);
//             its anchor is the plain forward of the same distinct sequences (anchor B on them)
// Ratios capture/B and dataset/B are the cost of routing analysis (target ≤ 1.10); capture/A is shown too.
//
//   bench_routing [--model DIR] [--synthetic] [--prompts N] [--reps R] [--batch-tokens T]
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <string>

#include "datasets/counterfact.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"
#include "tracing/routing.h"

#include "bench_util.h"

using namespace moedit;
using bench::batches_of;
using bench::best_of;
using bench::Clock;

int main(int argc, char** argv) {
  std::string model_dir = std::string(MOEDIT_SOURCE_DIR) + "/models/moedit-demo";
  bool synthetic = false;
  int n_prompts = 1000, reps = 5, batch_tokens = 4096;
  for (int i = 1; i < argc; ++i) {
    const bool has = i + 1 < argc;
    if (!std::strcmp(argv[i], "--synthetic")) synthetic = true;
    else if (!std::strcmp(argv[i], "--model") && has) model_dir = argv[++i];
    else if (!std::strcmp(argv[i], "--prompts") && has) n_prompts = std::stoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--reps") && has) reps = std::stoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--batch-tokens") && has) batch_tokens = std::stoi(argv[++i]);
    else {
      std::fprintf(stderr, "usage: bench_routing [--model DIR] [--synthetic] [--prompts N] [--reps R] [--batch-tokens T]\n");
      return 2;
    }
  }
  if (!synthetic && !std::filesystem::exists(std::filesystem::path(model_dir) / "tokenizer.json")) {
    std::printf("no demo model with tokenizer at %s: using the synthetic demo-shaped model\n", model_dir.c_str());
    synthetic = true;
  }

  std::shared_ptr<Model> m;
  std::vector<ParaphrasePair> pairs;
  std::vector<std::vector<int32_t>> prompts;  // distinct sequences, in order
  if (synthetic) {
    nlohmann::json j = {{"model_type", "qwen2_moe"},
                        {"vocab_size", 8192},
                        {"hidden_size", 128},
                        {"num_hidden_layers", 4},
                        {"num_attention_heads", 4},
                        {"num_key_value_heads", 4},
                        {"intermediate_size", 256},
                        {"moe_intermediate_size", 128},
                        {"shared_expert_intermediate_size", 256},
                        {"num_experts", 16},
                        {"num_experts_per_tok", 2}};
    j["mlp_only_layers"] = nlohmann::json::array();
    const ModelConfig cfg = parse_config(j, "bench_routing synthetic");
    m = std::make_shared<Model>(cfg, random_weights(cfg, 7, 0.05f));
    std::mt19937 rng(1234);
    auto seq = [&](int lo, int hi) {
      std::vector<int32_t> s(size_t(std::uniform_int_distribution<int>(lo, hi)(rng)));
      for (auto& t : s) t = std::uniform_int_distribution<int32_t>(0, 8191)(rng);
      return s;
    };
    for (int r = 0; int(prompts.size()) < n_prompts; ++r) {
      const auto p = seq(8, 16);
      prompts.push_back(p);
      for (int q = 0; q < 2 && int(prompts.size()) < n_prompts; ++q) {
        ParaphrasePair pp;
        pp.case_id = r;
        pp.paraphrase = q;
        pp.prompt_ids = p;
        pp.paraphrase_ids = seq(12, 24);
        pp.prompt_subject_last = int(p.size()) / 2;
        pp.paraphrase_subject_last = int(pp.paraphrase_ids.size()) / 2;
        prompts.push_back(pp.paraphrase_ids);
        pairs.push_back(std::move(pp));
      }
    }
  } else {
    m = Model::load(model_dir);
    const Tokenizer tok = Tokenizer::from_file(model_dir + "/tokenizer.json");
    const auto recs = load_counterfact(bundled_counterfact_path());
    for (size_t r = 0; r < recs.size() && int(prompts.size()) < n_prompts; ++r) {
      const auto ps = counterfact_pairs({recs[r]}, tok);
      if (ps.empty()) continue;
      prompts.push_back(ps[0].prompt_ids);
      for (const auto& p : ps) {
        if (int(prompts.size()) >= n_prompts) break;
        prompts.push_back(p.paraphrase_ids);
        pairs.push_back(p);
      }
    }
  }
  const ModelConfig& c = m->config();
  size_t ntok = 0;
  for (const auto& p : prompts) ntok += p.size();
  std::printf("model: %s (%s, H=%d, %d layers, %d experts, top-%d)\n", synthetic ? "synthetic" : model_dir.c_str(),
              c.model_type.c_str(), c.hidden, c.n_layers, c.n_experts, c.top_k);
  std::printf("prompts: %zu sequences, %zu tokens, %zu (prompt, paraphrase) pairs; threads %d; best of %d\n",
              prompts.size(), ntok, pairs.size(), ops::num_threads(), reps);

  const auto batches = batches_of(prompts, size_t(batch_tokens));
  const std::vector<int> moe = moe_layers(c);
  ForwardOptions fa;
  fa.logits_all = false;
  ForwardOptions fb = fa;
  fb.stop_after_layer = moe.back();
  auto run_forward = [&](const ForwardOptions& o) {
    for (const auto& b : batches) m->forward(b, o);
  };
  RoutingOptions ro;
  ro.max_batch_tokens = batch_tokens;
  run_forward(fa);  // warm-up
  // Interleave the measurements so that load from other processes hits them alike.
  double tA = 1e300, tB = 1e300, tC = 1e300, tD = 1e300;
  ConsistencyOptions co;
  co.routing = ro;
  ConsistencyReport rep;
  for (int r = 0; r < reps; ++r) {
    tA = std::min(tA, best_of(1, [&] { run_forward(fa); }));
    tB = std::min(tB, best_of(1, [&] { run_forward(fb); }));
    tC = std::min(tC, best_of(1, [&] { capture_routing(*m, prompts, ro); }));
    tD = std::min(tD, best_of(1, [&] { rep = paraphrase_consistency(*m, pairs, co); }));
  }
  std::printf("anchor A  forward, last-token logits      %8.3f s  %9.0f tokens/s\n", tA, ntok / tA);
  std::printf("anchor B  forward to last MoE layer       %8.3f s  %9.0f tokens/s\n", tB, ntok / tB);
  std::printf("capture   capture_routing (+softmax)      %8.3f s  %9.0f tokens/s\n", tC, ntok / tC);
  std::printf("dataset   paraphrase_consistency          %8.3f s  (%zu pairs)\n", tD, pairs.size());
  std::printf("ratio capture / anchor B: %.3f   capture / anchor A: %.3f   dataset / anchor B: %.3f   (target <= 1.10)\n",
              tC / tB, tC / tA, tD / tB);
  std::printf("(last-token consistency, overall: %.3f; subject-last: %.3f)\n", rep.tally[1].overall_rate(),
              rep.tally[0].overall_rate());
  return 0;
}
