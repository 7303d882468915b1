// Router-embedding benchmark (issue 20): what `moedit embed` costs over a plain forward of the same corpus.
//
// Corpus: the bundled WikiText-2 test split, one text per non-heading line (at most --texts texts, each truncated to
// 512 tokens as `moedit embed` does), tokenized by the demo model's tokenizer.
// Timings (best of --reps, interleaved, the same packed batches of --batch-tokens tokens, same threads):
//   anchor A  plain forward, last-token logits only
//   anchor B  plain forward up to the last MoE layer, no logits (the work embed asks of the model)
//   embed     router_embeddings: routing capture + per-text frequency counts (whole texts)
//   embed+W   the same with --window 32 (every 32-token window as well)
// Target: embed / anchor A ≤ 1.10.
//
//   bench_embed [--model DIR] [--texts N] [--reps R] [--batch-tokens T]
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>

#include "datasets/counterfact.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"
#include "tracing/router_embed.h"

#include "bench_util.h"

using namespace moedit;
using bench::batches_of;
using bench::best_of;

int main(int argc, char** argv) {
  std::string model_dir = std::string(MOEDIT_SOURCE_DIR) + "/models/moedit-demo";
  int n_texts = 1000, reps = 5, batch_tokens = 4096;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--model")) model_dir = bench::flag_value(argc, argv, i, "%s needs a value\n");
    else if (!std::strcmp(argv[i], "--texts")) n_texts = std::stoi(bench::flag_value(argc, argv, i, "%s needs a value\n"));
    else if (!std::strcmp(argv[i], "--reps")) reps = std::stoi(bench::flag_value(argc, argv, i, "%s needs a value\n"));
    else if (!std::strcmp(argv[i], "--batch-tokens"))
      batch_tokens = std::stoi(bench::flag_value(argc, argv, i, "%s needs a value\n"));
    else {
      std::fprintf(stderr, "usage: bench_embed [--model DIR] [--texts N] [--reps R] [--batch-tokens T]\n");
      return 2;
    }
  }
  const auto m = Model::load(model_dir);
  const Tokenizer tok = Tokenizer::from_file(model_dir + "/tokenizer.json");
  std::vector<std::vector<int32_t>> texts;
  std::ifstream f(bundled_wikitext_path());
  size_t ntok = 0;
  for (std::string l; std::getline(f, l) && int(texts.size()) < n_texts;) {
    const size_t b = l.find_first_not_of(' ');
    if (b == std::string::npos || l[b] == '=') continue;
    auto ids = tok.encode_ids(l, true);
    if (ids.size() > 512) ids.resize(512);
    ntok += ids.size();
    texts.push_back(std::move(ids));
  }
  const ModelConfig& c = m->config();
  std::printf("model: %s (%s, H=%d, %d layers, %d experts, top-%d); %zu texts, %zu tokens; threads %d; best of %d\n",
              model_dir.c_str(), c.model_type.c_str(), c.hidden, c.n_layers, c.n_experts, c.top_k, texts.size(), ntok,
              ops::num_threads(), reps);
  const auto batches = batches_of(texts, size_t(batch_tokens));
  ForwardOptions fa;
  fa.logits_all = false;
  ForwardOptions fb = fa;
  fb.stop_after_layer = moe_layers(c).back();
  fb.record_routing = false;
  auto run_forward = [&](const ForwardOptions& o) {
    for (const auto& b : batches) m->forward(b, o);
  };
  EmbedOptions eo, ew;
  eo.routing.max_batch_tokens = ew.routing.max_batch_tokens = batch_tokens;
  ew.window = 32;
  run_forward(fa);  // warm-up
  double tA = 1e300, tB = 1e300, tE = 1e300, tW = 1e300;
  size_t n_emb = 0, n_win = 0;
  for (int r = 0; r < reps; ++r) {
    tA = std::min(tA, best_of(1, [&] { run_forward(fa); }));
    tB = std::min(tB, best_of(1, [&] { run_forward(fb); }));
    tE = std::min(tE, best_of(1, [&] { n_emb = router_embeddings(*m, texts, eo).size(); }));
    tW = std::min(tW, best_of(1, [&] { n_win = router_embeddings(*m, texts, ew).size(); }));
  }
  std::printf("anchor A  forward, last-token logits   %8.3f s  %9.0f tokens/s\n", tA, double(ntok) / tA);
  std::printf("anchor B  forward to last MoE layer    %8.3f s  %9.0f tokens/s\n", tB, double(ntok) / tB);
  std::printf("embed     router_embeddings            %8.3f s  (%zu embeddings)\n", tE, n_emb);
  std::printf("embed+W   router_embeddings, window 32 %8.3f s  (%zu embeddings)\n", tW, n_win);
  std::printf("ratio embed / anchor A: %.3f   embed / anchor B: %.3f   embed+W / anchor A: %.3f   (target <= 1.10)\n",
              tE / tA, tE / tB, tW / tA);
  return 0;
}
