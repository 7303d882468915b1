// moedit embed MODEL (--corpus FILE | --dataset FILE|bundled) [--labels FILE] [--window W] [--max-tokens N]
//              [--limit N] --out PATH [--format npy|json]
//
// Router embeddings (tracing/router_embed.h): per text, the [MoE layers, E] matrix of expert activation
// frequencies. --corpus: one text per non-blank line, or JSONL lines {"text": ..., "label": ...}; --dataset: CounterFact
// records (text = the rewrite prompt with its subject and true object, label = relation_id). npy writes a float32
// array [n, layers, E] and PATH.index.json (texts, labels, windows); json writes everything in one file.
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/common.h"
#include "datasets/counterfact.h"
#include "io/errors.h"
#include "io/files.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"
#include "tracing/router_embed.h"

namespace moedit::cli {

namespace {

struct Args {
  std::string model, corpus, dataset, labels, out, format;
  int window = 0, max_tokens = 512, limit = 0, batch_tokens = 4096;
};

struct Texts {
  std::vector<std::string> text, label;  // label empty when none
};

std::vector<std::string> lines_of(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw InputError(path + ": cannot open");
  std::vector<std::string> out;
  for (std::string line; std::getline(f, line);) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") != std::string::npos) out.push_back(line);
  }
  return out;
}

Texts read_corpus(const std::string& path) {
  Texts t;
  const bool jsonl = path.size() > 6 && path.substr(path.size() - 6) == ".jsonl";
  const auto lines = lines_of(path);
  for (size_t i = 0; i < lines.size(); ++i) {
    if (!jsonl) {
      t.text.push_back(lines[i]);
      continue;
    }
    const std::string where = path + ": line " + std::to_string(i + 1);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(lines[i]);
    } catch (const nlohmann::json::exception& e) {
      throw InputError(where + ": not JSON (" + e.what() + ")");
    }
    require_input(j.is_object() && j.contains("text") && j["text"].is_string(), where + ": field 'text' (a string) is missing");
    t.text.push_back(j["text"].get<std::string>());
    const auto& l = j.value("label", nlohmann::json());
    t.label.push_back(l.is_null() ? "" : l.is_string() ? l.get<std::string>() : l.dump());
  }
  return t;
}

void run_embed(const Args& a) {
  require_input(a.corpus.empty() != a.dataset.empty(), "give exactly one of --corpus FILE and --dataset FILE");
  const std::string format = a.format.empty() ? (a.out.size() > 4 && a.out.substr(a.out.size() - 4) == ".npy" ? "npy" : "json")
                                              : a.format;
  require_input(format == "npy" || format == "json", "--format '" + format + "': expected npy or json");
  Texts t;
  if (!a.corpus.empty()) {
    t = read_corpus(a.corpus);
  } else {
    const std::string path = a.dataset == "bundled" ? bundled_counterfact_path() : a.dataset;
    for (const auto& r : load_counterfact(path)) {
      t.text.push_back(r.rewrite_prompt() + " " + r.target_true);
      t.label.push_back(r.relation_id);
    }
  }
  if (!a.labels.empty()) {
    t.label = lines_of(a.labels);
    require_input(t.label.size() == t.text.size(), a.labels + ": " + std::to_string(t.label.size()) +
                                                       " labels for " + std::to_string(t.text.size()) + " texts");
  }
  if (a.limit > 0 && size_t(a.limit) < t.text.size()) {
    t.text.resize(size_t(a.limit));
    if (!t.label.empty()) t.label.resize(size_t(a.limit));
  }
  require_input(!t.text.empty(), (a.corpus.empty() ? a.dataset : a.corpus) + ": no texts");

  const auto m = load_model(a.model);
  const Tokenizer tok = require_tokenizer(a.model, "embed tokenizes the texts");
  std::vector<std::vector<int32_t>> ids;
  for (const auto& s : t.text) {
    auto v = tok.encode_ids(s, true);
    if (a.max_tokens > 0 && int(v.size()) > a.max_tokens) v.resize(size_t(a.max_tokens));
    require_input(!v.empty(), "text " + std::to_string(ids.size()) + " encodes to no tokens");
    ids.push_back(std::move(v));
  }
  EmbedOptions o;
  o.window = a.window;
  o.routing.max_batch_tokens = a.batch_tokens;
  o.routing.progress = stderr_counter("embedding");
  const auto emb = router_embeddings(*m, ids, o);

  nlohmann::json index;
  index["model"] = a.model;
  index["moe_layers"] = moe_layers(m->config());
  index["experts"] = m->config().n_experts;
  index["top_k"] = m->config().top_k;
  index["texts"] = t.text;
  if (!t.label.empty()) index["labels"] = t.label;
  index["items"] = nlohmann::json::array();
  for (const auto& e : emb) {
    nlohmann::json it = {{"text", e.text}, {"start", e.start}, {"tokens", e.tokens}, {"window", e.window}};
    if (format == "json") {
      nlohmann::json rows = nlohmann::json::array();
      for (Eigen::Index i = 0; i < e.freq.rows(); ++i)
        rows.push_back(std::vector<float>(e.freq.row(i).data(), e.freq.row(i).data() + e.freq.cols()));
      it["embedding"] = std::move(rows);
    }
    index["items"].push_back(std::move(it));
  }
  if (format == "npy") {
    write_file_atomic(a.out, embeddings_npy(emb));
    write_file_atomic(a.out + ".index.json", index.dump(1) + "\n");
  } else {
    write_file_atomic(a.out, index.dump() + "\n");
  }
  std::printf("%zu embeddings (%zu texts%s) of %zu MoE layers x %d experts → %s%s\n", emb.size(), t.text.size(),
              a.window > 0 ? ", with windows" : "", moe_layers(m->config()).size(), m->config().n_experts,
              a.out.c_str(), format == "npy" ? (" (+ " + a.out + ".index.json)").c_str() : "");
}

void register_embed(CLI::App& app) {
  static Args a;
  auto* cmd = add_model_command(
      app, "embed", "Router embeddings: per text, expert activation frequencies per MoE layer", a.model);
  cmd->add_option("--corpus", a.corpus, "Texts: one per non-blank line, or JSONL {\"text\", \"label\"}");
  cmd->add_option("--dataset", a.dataset, "CounterFact records (or 'bundled'): rewrite prompt + true object");
  cmd->add_option("--labels", a.labels, "One label per line, one per text");
  cmd->add_option("--window", a.window, "Also embed every window of W tokens (0: whole texts only)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--max-tokens", a.max_tokens, "Truncate each text to N tokens (0: no limit)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--limit", a.limit, "Only the first N texts")->check(CLI::NonNegativeNumber);
  cmd->add_option("--batch-tokens", a.batch_tokens, "Tokens per forward call")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--out", a.out, "Output file (.npy or .json)")->required();
  cmd->add_option("--format", a.format, "npy | json (default: from the --out extension)");
  cmd->callback([] { run_embed(a); });
}

}  // namespace

MOEDIT_COMMAND(47, register_embed)

}  // namespace moedit::cli
