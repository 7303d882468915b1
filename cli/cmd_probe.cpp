// moedit probe MODEL --features FILE [--layers L,L] [--ks 1,2,4,...,64] [--min-positives N] [--out F.json]
// moedit probe MODEL --build-features OUT [--wiki-lines N] [--records N] [--max-tokens N]
//
// k-sparse probes (tracing/probe.h) for the binary token features of FILE (tracing/probe_features.h) on each
// routed expert's SwiGLU activations (the tokens routed to it) and on the shared expert's (every token), per MoE
// layer. A (unit, feature) pair is probed when both splits hold at least --min-positives positive tokens.
// --build-features writes the bundled feature set (WikiText-2 lines + CounterFact prompts, this model's tokenizer).
#include <cstdio>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/common.h"
#include "cli/lines.h"
#include "datasets/counterfact.h"
#include "io/errors.h"
#include "io/files.h"
#include "tracing/probe.h"
#include "tracing/probe_features.h"
#include "tracing/routing.h"

namespace moedit::cli {

namespace {

struct Args {
  std::string model, features, build, out;
  std::vector<int> layers, ks = {1, 2, 4, 8, 16, 32, 64};
  int min_positives = 5, wiki_lines = 300, records = 300, max_tokens = 64;
};

void build_features(const Args& a) {
  const Tokenizer tok = require_tokenizer(a.model, "the features are token-level");
  std::vector<std::string> wiki;
  for (const auto& l : nonblank_lines(bundled_wikitext_path(), "WikiText-2")) {
    if (int(wiki.size()) >= a.wiki_lines) break;
    const size_t b = l.find_first_not_of(' ');
    if (b != std::string::npos && l[b] != '=' && l.size() - b > 40) wiki.push_back(l.substr(b));
  }
  auto recs = load_counterfact(bundled_counterfact_path());
  if (int(recs.size()) > a.records) recs.resize(size_t(a.records));
  const FeatureSet s = build_probe_features(tok, wiki, recs, a.max_tokens);
  write_file_atomic(a.build, features_json(s));
  std::printf("%zu texts (%zu WikiText-2, %zu CounterFact), features %s → %s\n", s.texts.size(), wiki.size(),
              recs.size(), nlohmann::json(s.features).dump().c_str(), a.build.c_str());
}

// Probes one unit (rows x [n, d], global token of each row) on every feature; null when too few positives.
nlohmann::json probe_unit(const MatR& x, const std::vector<int>& token, const FeatureSet& fs,
                          const std::vector<std::vector<uint8_t>>& label, const std::vector<uint8_t>& held_out,
                          const Args& a) {
  nlohmann::json j = {{"tokens", x.rows()}, {"features", nlohmann::json::object()}};
  std::vector<uint8_t> test(token.size());
  for (size_t r = 0; r < token.size(); ++r) test[r] = held_out[size_t(token[r])];
  for (size_t f = 0; f < fs.features.size(); ++f) {
    std::vector<uint8_t> y(token.size());
    int tr = 0, te = 0;
    for (size_t r = 0; r < token.size(); ++r) {
      y[r] = label[f][size_t(token[r])];
      (test[r] ? te : tr) += y[r];
    }
    if (tr < a.min_positives || te < a.min_positives) continue;
    nlohmann::json fj = {{"train_pos", tr}, {"test_pos", te}, {"k", nlohmann::json::array()}, {"f1", nlohmann::json::array()}};
    for (const auto& p : k_sparse_probes(x, y, test, a.ks)) {
      fj["k"].push_back(p.k);
      fj["f1"].push_back(p.f1);
      if (p.k == 1) fj["top_neuron"] = p.neurons[0];
    }
    j["features"][fs.features[f]] = std::move(fj);
  }
  return j;
}

void run_probe(const Args& a) {
  if (!a.build.empty()) return build_features(a);
  require_input(!a.features.empty(), "give --features FILE (or --build-features OUT)");
  const FeatureSet fs = load_features(a.features);
  const auto m = load_model(a.model);
  const ModelConfig& c = m->config();
  std::vector<std::vector<int32_t>> ids;
  std::vector<std::vector<uint8_t>> label(fs.features.size());  // [feature][global token]
  std::vector<uint8_t> held_out;                                 // [global token]: its text i has i % 5 == 0
  for (size_t i = 0; i < fs.texts.size(); ++i) {
    const auto& t = fs.texts[i];
    for (int32_t id : t.ids)
      require_input(id >= 0 && id < c.vocab_size, a.features + ": field 'texts[" + std::to_string(i) + "].ids' holds token " +
                                                      std::to_string(id) + ", outside the vocabulary [0, " + std::to_string(c.vocab_size) + ")");
    ids.push_back(t.ids);
    for (size_t f = 0; f < fs.features.size(); ++f) label[f].insert(label[f].end(), t.labels.at(fs.features[f]).begin(), t.labels.at(fs.features[f]).end());
    held_out.insert(held_out.end(), t.ids.size(), i % 5 == 0);
  }
  const std::vector<int> layers = a.layers.empty() ? moe_layers(c) : a.layers;
  for (int l : layers)
    require_input(l >= 0 && l < c.n_layers && c.is_moe(l), "--layers: " + std::to_string(l) + " is not an MoE layer of this model");
  nlohmann::json out = {{"features", fs.features}, {"ks", a.ks}, {"layers", nlohmann::json::array()}};
  std::printf("%-16s %5s %4s %10s %10s %10s\n", "feature", "layer", "k", "expert avg", "expert max", "shared");
  for (int l : layers) {
    const LayerActivations act = layer_activations(*m, ids, l);
    nlohmann::json lj = {{"layer", l}, {"experts", nlohmann::json::array()}};
    for (int e = 0; e < c.n_experts; ++e) {
      nlohmann::json ej = probe_unit(act.expert[size_t(e)], act.expert_rows[size_t(e)], fs, label, held_out, a);
      ej["expert"] = e;
      lj["experts"].push_back(std::move(ej));
    }
    if (act.shared.rows()) {
      std::vector<int> all(size_t(act.tokens));
      for (int g = 0; g < act.tokens; ++g) all[size_t(g)] = g;
      lj["shared"] = probe_unit(act.shared, all, fs, label, held_out, a);
    }
    for (const auto& f : fs.features)
      for (size_t ki = 0; ki < a.ks.size(); ++ki) {
        double sum = 0, best = 0;
        int n = 0;
        for (const auto& ej : lj["experts"])
          if (ej["features"].contains(f) && ki < ej["features"][f]["f1"].size()) {
            const double v = ej["features"][f]["f1"][ki];
            sum += v, best = std::max(best, v), ++n;
          }
        const bool sh = lj.contains("shared") && lj["shared"]["features"].contains(f) && ki < lj["shared"]["features"][f]["f1"].size();
        if (!n && !sh) continue;
        lj["summary"][f]["experts_probed"] = n;
        lj["summary"][f]["expert_mean_f1"].push_back(n ? sum / n : NAN);
        lj["summary"][f]["expert_max_f1"].push_back(n ? best : NAN);
        if (sh) lj["summary"][f]["shared_f1"].push_back(lj["shared"]["features"][f]["f1"][ki]);
        std::printf("%-16s %5d %4d %10.3f %10.3f %10s\n", f.c_str(), l, a.ks[ki], n ? sum / n : NAN, n ? best : NAN,
                    sh ? std::to_string(lj["shared"]["features"][f]["f1"][ki].get<double>()).substr(0, 5).c_str() : "-");
      }
    out["layers"].push_back(std::move(lj));
  }
  if (!a.out.empty()) write_file_atomic(a.out, out.dump(1) + "\n");
}

void register_probe(CLI::App& app) {
  static Args a;
  auto* cmd = add_model_command(app, "probe", "k-sparse probes of token features on expert and shared-expert neurons", a.model);
  cmd->add_option("--features", a.features, "Features file (JSON; tracing/probe_features.h)");
  cmd->add_option("--build-features", a.build, "Write the bundled feature set to this file and exit");
  cmd->add_option("--layers", a.layers, "MoE layers (default: all)")->delimiter(',');
  cmd->add_option("--ks", a.ks, "Sparsities k")->delimiter(',')->capture_default_str();
  cmd->add_option("--min-positives", a.min_positives, "Positives needed in each split")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--wiki-lines", a.wiki_lines, "--build-features: WikiText-2 lines")->capture_default_str();
  cmd->add_option("--records", a.records, "--build-features: CounterFact records")->capture_default_str();
  cmd->add_option("--max-tokens", a.max_tokens, "--build-features: tokens per text")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--out", a.out, "Write every probe's F1 as JSON");
  cmd->callback([] { run_probe(a); });
}

}  // namespace

MOEDIT_COMMAND(56, register_probe)

}  // namespace moedit::cli
