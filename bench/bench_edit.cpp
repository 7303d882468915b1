// ROME edit benchmark: moedit's whole edit (v* with 20 steps, keys, C⁻¹k* solve, apply; key statistics cached,
// not timed) against the PyTorch/transformers implementation of the same edit (tools/rome_reference.py --bench),
// measured in the same run on the same requests, model, statistics corpus and thread count.
//
//   bench_edit [MODEL] [--requests N] [--repeat R] [--layer L] [--target dominant|routed|shared]
//              [--python PYTHON] [--no-anchor]
//
// MODEL defaults to the bundled demo model (models/moedit-demo) when present, else the qwen2_moe test fixture
// (which has no tokenizer: fixed id-level requests). With a tokenizer, the requests are the first N bundled
// CounterFact records with moedit's seeded context templates; the statistics corpus is the first windows of the
// bundled WikiText-2 test split. Both sides get identical ids (a JSON spec handed to the Python script).
// Prints the median seconds per edit of each side and the speed-up (anchor / moedit). Then the same requests edited
// together by MEMIT at that one layer (editor/memit.h, same v* settings and statistics): its seconds per edit against
// the mean of the ROME edits above (issue 18's bar: a batch costs less per edit than one-by-one ROME edits).
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "bench_util.h"
#include "editor/keystats.h"
#include "editor/memit.h"
#include "editor/rome.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"

using namespace moedit;
using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : (v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]));
}

nlohmann::json ids_json(const EditIds& ids) {
  return {{"prompts", ids.prompts},
          {"subject_last", ids.subject_last},
          {"kl_prompt", ids.kl_prompt},
          {"kl_subject_last", ids.kl_subject_last},
          {"target", ids.target}};
}

}  // namespace

int main(int argc, char** argv) {
  std::string model = std::string(MOEDIT_SOURCE_DIR) + "/models/moedit-demo";
  if (!fs::exists(model + "/config.json")) model = std::string(MOEDIT_SOURCE_DIR) + "/tests/fixtures/models/qwen2_moe";
  std::string target = "dominant", python = "python3";
  int n_req = 5, repeat = 1, layer = -1;
  bool anchor = true;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&] { return bench::flag_value(argc, argv, i, "%s needs a value\n"); };
    if (a == "--requests") n_req = std::stoi(next());
    else if (a == "--repeat") repeat = std::stoi(next());
    else if (a == "--layer") layer = std::stoi(next());
    else if (a == "--target") target = next();
    else if (a == "--python") python = next();
    else if (a == "--no-anchor") anchor = false;
    else if (a[0] != '-') model = a;
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  auto m = Model::load(model);
  const ModelConfig& c = m->config();
  if (layer < 0)
    for (int l = c.n_layers / 2; l < c.n_layers && layer < 0; ++l)
      if (c.is_moe(l)) layer = l;
  std::printf("model %s (%s, H=%d, %d layers, E=%d, top-%d, V=%d), layer %d, target %s, threads %d\n", model.c_str(),
              c.model_type.c_str(), c.hidden, c.n_layers, c.n_experts, c.top_k, c.vocab_size, layer, target.c_str(),
              ops::num_threads());

  // Requests and statistics corpus (identical for both sides).
  std::vector<EditIds> reqs;
  std::vector<std::vector<int32_t>> corpus;
  EditOptions opt;
  opt.layer = layer;
  opt.target = parse_edit_target(target);
  const bool has_tok = fs::exists(model + "/tokenizer.json");
  if (has_tok) {
    const Tokenizer tok = Tokenizer::from_file(model);
    const auto cf = load_requests(std::string(MOEDIT_SOURCE_DIR) + "/datasets/data/counterfact/counterfact_preknown.json");
    const auto templates = context_templates(*m, tok, opt);
    for (int i = 0; i < n_req && i < int(cf.size()); ++i) reqs.push_back(build_edit_ids(tok, cf[size_t(i)], templates, opt.kl_prompt));
    std::ifstream in(default_corpus_path());
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    corpus = corpus_windows(tok, text, 128, 32 * 128);
  } else {
    EditIds ids;
    ids.prompts = {{11, 12, 13, 14, 15}, {3, 4, 5, 6, 11, 12, 13, 14, 15}, {7, 8, 11, 12, 13, 14, 15}};
    ids.subject_last = {1, 5, 3};
    ids.kl_prompt = {11, 12, 30, 31};
    ids.kl_subject_last = 1;
    ids.target = {40, 41};
    for (int i = 0; i < n_req; ++i) {
      ids.target = {40 + i, 41};
      reqs.push_back(ids);
    }
    for (int s = 0; s < 32; ++s) {
      std::vector<int32_t> w;
      for (int t = 0; t < 64; ++t) w.push_back(int32_t((uint64_t(s * 64 + t) * 2654435761u) % uint64_t(c.vocab_size)));
      corpus.push_back(std::move(w));
    }
  }
  const auto t_stats = Clock::now();
  auto stats = std::make_shared<std::vector<SecondMoment>>(compute_key_stats(*m, layer, corpus));
  const double stats_s = std::chrono::duration<double>(Clock::now() - t_stats).count();
  opt.moments = [stats](int l, int e) -> std::shared_ptr<const SecondMoment> {
    for (const auto& s : *stats)
      if (s.layer == l && s.expert == e) return std::make_shared<SecondMoment>(s);
    return nullptr;
  };

  // moedit (warm-up once, then timed).
  { revert(*m, apply_edit_ids(*m, reqs[0], opt)); }
  std::vector<double> ours, ours_v, ours_noprefix;
  std::vector<double> final_loss;
  int64_t tokens_step = 0;
  for (const auto& ids : reqs)
    for (int r = 0; r < repeat; ++r) {
      const auto t0 = Clock::now();
      EditResult res = apply_edit_ids(*m, ids, opt);
      ours.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
      ours_v.push_back(res.vstar_seconds);
      final_loss.push_back(res.vstar.loss.back());
      tokens_step += res.vstar.tokens_per_step;
      revert(*m, res);
    }
  {
    EditOptions o = opt;
    o.v.cache_prefix = false;
    for (const auto& ids : reqs) {
      const auto t0 = Clock::now();
      EditResult res = apply_edit_ids(*m, ids, o);
      ours_noprefix.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
      revert(*m, res);
    }
  }
  const double med = median(ours);
  std::printf("moedit: median %.4f s per edit (v* %.4f s; %zu edits; %.0f token rows per v* step; "
              "without the prefix cache %.4f s); statistics (not timed) %.2f s\n",
              med, median(ours_v), ours.size(), double(tokens_step) / double(ours.size()), median(ours_noprefix),
              stats_s);

  // MEMIT: all requests as one batch at the same layer (warm-up above), timed once.
  double memit_per_edit = -1, rome_mean = 0;
  for (double t : ours) rome_mean += t / double(ours.size());
  if (opt.target.kind != TargetKind::Expert && layer + 1 < c.n_layers) {
    BatchOptions bo;
    bo.edit = opt;
    bo.layers = {layer};
    const auto t0 = Clock::now();
    const BatchEditResult br = apply_batch_edit_ids(*m, reqs, bo);
    memit_per_edit = std::chrono::duration<double>(Clock::now() - t0).count() / double(reqs.size());
    revert(*m, br);
    std::printf("memit: %.4f s per edit over a batch of %zu (v* %.4f s per edit); ROME one by one: mean %.4f s per "
                "edit; memit / ROME = %.3f\n", memit_per_edit, reqs.size(), br.vstar_seconds / double(reqs.size()),
                rome_mean, memit_per_edit / rome_mean);
  }

  nlohmann::json out = {{"model", model},          {"layer", layer},
                        {"target", target},        {"threads", ops::num_threads()},
                        {"moedit_seconds", ours},  {"moedit_median", med},
                        {"moedit_vstar_median", median(ours_v)}, {"moedit_no_prefix_cache_median", median(ours_noprefix)},
                        {"moedit_final_loss", final_loss}, {"rome_mean", rome_mean},
                        {"memit_per_edit", memit_per_edit}};
  if (anchor) {
    const std::string dir = "/tmp/moedit_bench_edit_" + std::to_string(::getpid());
    fs::create_directories(dir);
    nlohmann::json spec = {{"layer", layer}, {"target", target}, {"corpus", corpus}, {"requests", nlohmann::json::array()}};
    for (const auto& ids : reqs) spec["requests"].push_back(ids_json(ids));
    std::ofstream(dir + "/spec.json") << spec.dump();
    const std::string cmd = python + " " + MOEDIT_SOURCE_DIR + "/tools/rome_reference.py --bench --model " + model +
                            " --ids " + dir + "/spec.json --repeat " + std::to_string(repeat) + " --threads " +
                            std::to_string(ops::num_threads()) + " > " + dir + "/out.json 2> " + dir + "/err.txt";
    std::printf("anchor: %s\n", cmd.c_str());
    const int rc = std::system(cmd.c_str());
    std::ifstream res(dir + "/out.json");
    nlohmann::json pj;
    try {
      if (rc == 0) res >> pj;
    } catch (const std::exception&) {
    }
    if (pj.contains("seconds")) {
      const double pm = median(pj["seconds"].get<std::vector<double>>());
      std::printf("PyTorch %s (transformers, same ids/statistics/threads): median %.4f s per edit\n",
                  pj.value("torch", std::string("?")).c_str(), pm);
      std::printf("speed-up: %.1fx (target >= 10x)\n", pm / med);
      out["pytorch_seconds"] = pj["seconds"];
      out["pytorch_median"] = pm;
      out["pytorch_final_loss"] = pj["final_loss"];
      out["speedup"] = pm / med;
    } else {
      std::printf("anchor unavailable (exit %d; see %s/err.txt): no ratio reported\n", rc, dir.c_str());
    }
    if (pj.contains("seconds")) fs::remove_all(dir);
  }
  std::printf("%s\n", out.dump().c_str());
  return 0;
}
