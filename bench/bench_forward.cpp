// Forward-pass benchmark on a synthetic checkpoint shaped like a slice of OLMoE-1B-7B's layer stack:
// hidden 2048, 64 experts, top-8, expert width 1024, 2 layers (random weights).
//
// 1. Prefill (one sequence of N tokens) and greedy-style decode (one token at a time through the KV cache, after a
//    short prompt), with the same weights stored as fp32 and as bf16 (read in place, widened in registers), in the
//    same run: decode reads every active expert's weights once per token, so it is memory-bound and bf16 should
//    approach 2× fp32's tokens/s; prefill is compute-bound.
// 2. The achieved GFLOP/s of the expert GEMMs (the MoE block, routing and gather included) as a fraction of the
//    GFLOP/s of one plain GEMM of the same total size (the routed token-rows through one gate‖up and one down
//    matrix), same kernel and threads (fp32 weights).
//
//   bench_forward [--tokens N] [--decode D] [--reps R]
#include <chrono>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <string>

#include "model/model.h"

#include "bench_util.h"

using namespace moedit;
using bench::best_of;
using bench::Clock;

int main(int argc, char** argv) {
  int tokens = 256, decode = 32, reps = 3;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--tokens")) tokens = std::stoi(argv[i + 1]);
    if (!std::strcmp(argv[i], "--decode")) decode = std::stoi(argv[i + 1]);
    if (!std::strcmp(argv[i], "--reps")) reps = std::stoi(argv[i + 1]);
  }
  const nlohmann::json j = {{"model_type", "olmoe"},       {"vocab_size", 4096},          {"hidden_size", 2048},
                            {"num_hidden_layers", 2},      {"num_attention_heads", 16},   {"intermediate_size", 1024},
                            {"num_experts", 64},           {"num_experts_per_tok", 8}};
  const ModelConfig cfg = parse_config(j, "bench");
  std::printf("building synthetic model (OLMoE-shaped slice: H=2048, E=64, k=8, I=1024, 2 layers)...\n");
  Model m(cfg, random_weights(cfg, 42, 0.02f));
  std::vector<int32_t> ids(static_cast<size_t>(tokens));
  for (int t = 0; t < tokens; ++t) ids[size_t(t)] = (t * 2654435761u) % 4096;
  const int H = cfg.hidden, I = cfg.expert_width, k = cfg.top_k;

  // Prefill and decode, fp32 and bf16 weights.
  const std::vector<std::vector<int32_t>> batch = {ids};
  const Model m16(cfg, narrowed(m.weights(), ops::WType::BF16));
  auto prefill = [&](const Model& mm) {
    mm.forward(batch);  // warm-up
    return best_of(reps, [&] { mm.forward(batch); });
  };
  auto decode_time = [&](const Model& mm) {  // seconds per decoded token after an 8-token prompt
    return best_of(reps, [&] {
             KVCache cache;
             ForwardOptions o;
             o.cache = &cache;
             o.logits_all = false;
             mm.forward({{ids.begin(), ids.begin() + 8}}, o);
             for (int t = 0; t < decode; ++t) mm.forward({{ids[size_t(8 + t) % ids.size()]}}, o);
           }) /
           decode;
  };
  const double t_fwd = prefill(m), t_fwd16 = prefill(m16);
  const double t_dec = decode_time(m), t_dec16 = decode_time(m16);
  const WeightBytes b32 = weight_bytes(m.weights()), b16 = weight_bytes(m16.weights());

  // The MoE block alone on realistic (normalised) input.
  MatR a = MatR::Random(tokens, H);
  const TokenLayout lay = make_layout(batch, nullptr);
  const double t_moe = best_of(reps, [&] { m.ffn(0, a, lay, nullptr, nullptr); });
  const double moe_flops = 2.0 * tokens * k * (2.0 * I * H + double(H) * I);

  // Anchor: one plain GEMM of the same total size through the same kernel (ops::linear, same threads).
  const int rows = tokens * k;
  MatR x = MatR::Random(rows, H), gu(rows, 2 * I), key = MatR::Random(rows, I), y(rows, H);
  const ExpertBank& bank = m.weights().layers[0].ffn.experts;
  const double t_gemm = best_of(reps, [&] {
    expert_gate_up(bank, 0, x.data(), size_t(H), rows, gu.data());
    ops::linear(key.data(), size_t(I), rows, I, bank.down[0].kernel(), H, y.data(), size_t(H));
  });

  const double gf_moe = moe_flops / t_moe / 1e9, gf_gemm = moe_flops / t_gemm / 1e9;
  std::printf("threads                 %d\n", ops::num_threads());
  std::printf("weights                 fp32 %.2f GB, bf16 %.2f GB (+ %.2f GB fp32 norms/routers)\n",
              double(b32.owned) / 1e9, double(b16.mapped) / 1e9, double(b16.owned) / 1e9);
  std::printf("prefill (%d tokens)    fp32 %.3f s → %.1f tokens/s   bf16 %.3f s → %.1f tokens/s   bf16/fp32 %.2f\n",
              tokens, t_fwd, tokens / t_fwd, t_fwd16, tokens / t_fwd16, t_fwd / t_fwd16);
  std::printf("decode (%d steps)       fp32 %.1f tokens/s   bf16 %.1f tokens/s   bf16/fp32 %.2f\n", decode,
              1 / t_dec, 1 / t_dec16, t_dec / t_dec16);
  std::printf("MoE block (1 layer)     %.3f s  → %.1f GFLOP/s in expert GEMMs\n", t_moe, gf_moe);
  std::printf("plain GEMM, same size   %.3f s  → %.1f GFLOP/s\n", t_gemm, gf_gemm);
  std::printf("ratio (MoE / plain GEMM ceiling): %.2f   (target >= 0.60)\n", gf_moe / gf_gemm);
  return 0;
}
