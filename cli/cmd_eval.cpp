// moedit eval MODEL --dataset FILE --layer L|auto --out DIR [--limit N] [--target dominant|routed|shared|L:E]
//              [--resume] [--shard i/n|auto | --mpi] [--sequential N] [--snippets FILE [--idf-corpus FILE]]
//              [--steer FILE [--steer-coef c] [--steer-form 3|4|5] [--steer-threshold t]] [--mask ...] [--boost ...]
//              [editor options]
// moedit eval merge DIR... --out DIR
// --shard auto takes the shard from a Slurm job array or an MPI launcher's environment (cli/shard.h); under mpirun,
// --mpi evaluates rank r's shard into OUT/shards/r-of-n and rank 0 merges them into OUT when all are done.
// CounterFact-style evaluation of ROME edits (eval/run.h): per-case JSON, summary.json/.md, distributions.svg.
// --steer/--mask/--boost (cli/interventions.h) set a standing router edit on the model: every forward of the run —
// layer choice, key statistics, the edit (k*, v* and its gradient), scores, generations, drift and perplexity —
// runs on the steered model; settings.json records the interventions, so --resume refuses other ones.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <optional>

#include "cli/commands.h"
#include "cli/editor_flags.h"
#include "cli/interventions.h"
#include "cli/mpi.h"
#include "cli/shard.h"
#include "editor/keystats.h"
#include "eval/curve.h"
#include "eval/run.h"
#include "io/files.h"
#include "io/errors.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"

namespace moedit::cli {

namespace {

struct EvalArgs {
  std::string model, dataset, format = "auto", out, target = "dominant", shard, snippets, idf_corpus, layer;
  int auto_cases = 50, limit = -1, sequential = 0, generation_interval = 1, gen_len = 100, gen_top_k = 5;
  uint64_t gen_seed = 1;
  bool resume = false, quiet = false, mpi = false;
  EditorFlags editor;
  BatchFlags batch;
  InterventionSpec interventions;
  int batch_size = 1, drift_tokens = 512;
  std::vector<std::string> merge_dirs, curve_dirs, curve_labels;
  std::string curve_out;
  std::string merge_out;
};

std::vector<std::string> corpus_lines(const std::string& path) {
  std::ifstream in(path);
  require_input(bool(in), "--idf-corpus '" + path + "' cannot be read");
  std::vector<std::string> docs;
  for (std::string line; std::getline(in, line);)
    if (line.find_first_not_of(" \t\r") != std::string::npos) docs.push_back(line);
  require_input(!docs.empty(), "--idf-corpus '" + path + "' holds no documents");
  return docs;
}

std::string duration(double s) {
  char buf[32];
  if (s >= 3600)
    std::snprintf(buf, sizeof buf, "%dh%02dm", int(s / 3600), int(s / 60) % 60);
  else
    std::snprintf(buf, sizeof buf, "%dm%02ds", int(s / 60), int(s) % 60);
  return buf;
}

void print_file(const std::string& path) {
  std::ifstream in(path);
  std::printf("%s", std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()).c_str());
}

nlohmann::json eval_batch_settings(const EvalArgs& a) {
  nlohmann::json j = batch_settings(a.batch);
  j["batch_size"] = a.batch_size;
  j["drift_tokens"] = a.drift_tokens;
  return j;
}

// The standing router edit of --steer/--mask/--boost on the model, and its settings: the flags and a hash of what
// the edit does to each layer (the steering vector's values included).
void set_interventions(Model& m, const InterventionSpec& spec, nlohmann::json& settings) {
  auto edit = router_edit(spec, m.config());  // validates: exit 2 naming the flag or the steering file
  std::string fp;
  for (int l = 0; l < m.config().n_layers; ++l) fp += std::to_string(l) + ":" + edit->fingerprint(l) + "\n";
  nlohmann::json j = intervention_settings(spec);
  j["hash"] = hex64(hash_bytes(fp.data(), fp.size()));
  settings["interventions"] = j;
  m.set_router_edit(std::move(edit));
}

void run(const EvalArgs& a) {
  const Shard shard = parse_shard(a.shard.empty() ? "0/1" : a.shard);
  if (a.shard == "auto" && !a.quiet)
    std::fprintf(stderr, "moedit: --shard auto: shard %s (%s)\n", shard.str().c_str(), shard.source.c_str());
  require_input(!a.dataset.empty(), "--dataset FILE is required");
  require_input(!a.out.empty(), "--out DIR is required");
  const auto records = load_eval_records(a.dataset, parse_dataset_format(a.format));
  require_input(!records.empty(), a.dataset + ": no records");
  eval::RunOptions o;
  o.out_dir = a.out;
  o.limit = a.limit;
  o.shard = shard.index;
  o.n_shards = shard.count;
  o.resume = a.resume;
  require_input(a.sequential >= 0, "--sequential N needs N >= 1");
  o.sequential_every = a.sequential;
  require_input(a.generation_interval >= 0, "--generation-interval must be >= 0");
  o.generation_interval = a.generation_interval;
  o.gen = {a.gen_len, a.gen_top_k, a.gen_seed};

  EditOptions& e = o.edit;
  e = editor_options(a.editor);
  e.target = parse_edit_target(a.target);
  const bool batch = a.batch.batch();
  if (batch) check_batch_flags(a.batch, a.target);  // fails before the model loads
  require_input(batch || !a.batch.router_guard, "--router-guard is for --method memit|alphaedit|moeedit");
  const bool auto_layer = !batch && e.target.kind != TargetKind::Expert && a.layer == "auto";
  if (batch) {
    // --layers (or one --layer) are read with the model's config below
  } else if (e.target.kind == TargetKind::Expert) {
    e.layer = e.target.layer;
  } else if (!auto_layer) {
    require_input(!a.layer.empty(), "--layer L|auto is required (the MoE layer to edit)");
    e.layer = parse_layer_index(a.layer);
  }
  require_input(a.auto_cases >= 1, "--auto-layer-cases must be >= 1");

  std::optional<AttributeSnippets> snips;
  std::unique_ptr<eval::TfIdf> tfidf;
  if (!a.snippets.empty()) {
    snips = AttributeSnippets::load(a.snippets);
    // IDF: the named corpus (one document per line), else ROME's own fallback, a refit on every snippet text.
    tfidf = std::make_unique<eval::TfIdf>(a.idf_corpus.empty() ? snips->all_texts() : corpus_lines(a.idf_corpus));
    o.snippets = &*snips;
    o.tfidf = tfidf.get();
  } else {
    require_input(a.idf_corpus.empty(), "--idf-corpus needs --snippets (the reference score's snippets)");
  }

  o.settings = {{"model", a.model},
                {"dataset", a.dataset},
                {"format", a.format},
                {"limit", a.limit},
                {"shard", shard.str()},
                {"target", a.target},
                {"layer", auto_layer ? nlohmann::json("auto") : nlohmann::json(e.layer)},
                {"editor", editor_settings(a.editor)},
                {"sequential", a.sequential},
                {"batch", eval_batch_settings(a)},
                {"generation", {{"interval", a.generation_interval},
                                {"max_out_len", a.gen_len},
                                {"top_k", a.gen_top_k},
                                {"seed", a.gen_seed}}},
                {"snippets", a.snippets},
                {"idf_corpus", a.snippets.empty() ? "" : a.idf_corpus.empty() ? "snippets" : a.idf_corpus}};

  auto m = load_model(a.model);
  const ModelConfig& c = m->config();
  if (!a.interventions.empty()) set_interventions(*m, a.interventions, o.settings);
  const Tokenizer tok = Tokenizer::from_file(a.model);
  // --layer auto / --layers auto: one layer or range for the whole run (as ROME's evaluations use), from the mean
  // indirect effect of the MoE block at the subject's last token over the dataset's first --auto-layer-cases records
  // (the same for every shard).
  std::vector<double> mean_effects;
  const size_t n_auto = std::min(records.size(), size_t(a.auto_cases));
  if (auto_layer || (batch && auto_layers(a.batch))) {
    std::vector<EditRequest> first;
    for (size_t i = 0; i < n_auto; ++i) first.push_back(eval::edit_request(records[i]));
    mean_effects = mean_layer_effects(*m, tok, first, n_auto);
    o.settings["layer_auto"] = {{"cases", n_auto}, {"mean_indirect_effect", mean_effects}};
  }
  if (auto_layer) {
    e.layer = best_effect_layer(mean_effects);
    o.settings["layer_auto"]["layer"] = e.layer;
    if (!a.quiet)
      std::fprintf(stderr, "moedit: --layer auto: layer %d (mean MoE indirect effect %.4f at the subject's last token "
                           "over %zu cases)\n", e.layer, mean_effects[size_t(e.layer)], n_auto);
  }
  KeyStatsCache stats(*m, tok, key_stats_options(a.editor));
  e.moments = [&stats](int layer, int expert) { return stats.get(layer, expert); };
  if (batch) {
    o.batch = batch_options(a.batch, a.layer, a.editor, a.target, c, e.moments, &mean_effects);
    e.layer = o.batch->layers.back();
    if (auto_layers(a.batch)) {
      o.settings["layer_auto"]["layers"] = o.batch->layers;
      if (!a.quiet)
        std::fprintf(stderr, "moedit: --layers %s: layers %s (mean MoE indirect effects at the subject's last token)\n",
                     a.batch.layers.c_str(), o.settings["layer_auto"]["layers"].dump().c_str());
    }
  }
  require_input(e.layer >= 0 && e.layer < c.n_layers && c.is_moe(e.layer),
                "--layer " + std::to_string(e.layer) + " is not an MoE layer of this model");
  o.batch_size = a.batch_size;
  o.drift_tokens = a.drift_tokens;

  if (::isatty(2) && !a.quiet) {
    const auto t0 = std::chrono::steady_clock::now();
    auto first = std::make_shared<int>(-1);  // cases already done when the clock started (resume)
    o.progress = [t0, first](int done, int total) {
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (*first < 0) *first = done - 1;
      const int fresh = done - *first;
      const double per = fresh > 0 ? s / fresh : 0;
      const int w = 30, filled = total ? w * done / total : w;
      std::fprintf(stderr, "\reval [%s%s] %d/%d  %.2f s/case  ETA %s ", std::string(size_t(filled), '#').c_str(),
                   std::string(size_t(w - filled), '.').c_str(), done, total, per,
                   duration(per * (total - done)).c_str());
      if (done == total) std::fprintf(stderr, "\n");
    };
  }
  const auto res = eval::run_eval(*m, tok, records, o);
  if (a.quiet) return;
  std::printf("%d cases evaluated, %d already done (--resume); results in %s\n", res.evaluated, res.skipped,
              a.out.c_str());
  print_file(a.out + "/summary.md");
}

// --mpi: rank r of n evaluates shard r/n into OUT/shards/r-of-n; when every rank is done, rank 0 merges them into OUT
// (eval::merge_runs, as `moedit eval merge`): the summary of one process.
void run_mpi(const EvalArgs& a) {
  require_input(a.shard.empty(), "--mpi takes the shard from the MPI rank: drop --shard " + a.shard);
  require_input(!a.out.empty(), "--out DIR is required");
  const auto shard_dir = [&a](int r, int n) {
    return a.out + "/shards/" + std::to_string(r) + "-of-" + std::to_string(n);
  };
  mpi::run_then_merge(
      [&](int rank, int size) {
        EvalArgs s = a;
        s.shard = std::to_string(rank) + "/" + std::to_string(size);
        s.out = shard_dir(rank, size);
        s.quiet = true;
        run(s);
      },
      [&](int size) {
        std::vector<std::string> dirs;
        for (int r = 0; r < size; ++r) dirs.push_back(shard_dir(r, size));
        const auto summary = eval::merge_runs(dirs, a.out);
        if (a.quiet) return;
        std::printf("%d MPI ranks: %d cases merged into %s\n", size, summary.value("num_cases", 0), a.out.c_str());
        print_file(a.out + "/summary.md");
      });
}

void register_eval(CLI::App& app) {
  static EvalArgs a;
  auto* cmd = add_model_command(
      app, "eval", "CounterFact-style evaluation of ROME edits (ES/PS/NS, magnitudes, fluency)", a.model);
  cmd->add_option("--dataset", a.dataset, "CounterFact / MEMIT mcf / zsRE / EasyEdit JSON list");
  cmd->add_option("--format", a.format, "auto | counterfact | mcf | zsre | easyedit")->capture_default_str();
  cmd->add_option("--out", a.out, "Output directory (cases/, summary.json, summary.md, distributions.svg)");
  cmd->add_option("--limit", a.limit, "Only the first N records");
  cmd->add_option("--shard", a.shard,
                  "Evaluate shard i of n (records i, i+n, ...; default 0/1); merge with `moedit eval merge`. auto: "
                  "from a Slurm job array (SLURM_ARRAY_TASK_ID/COUNT/MIN) or an MPI launcher (OMPI_COMM_WORLD_RANK/"
                  "SIZE, PMI_RANK/SIZE)");
  cmd->add_flag("--mpi", a.mpi,
                "Under mpirun: each rank evaluates its shard into OUT/shards/, rank 0 merges them into OUT");
  cmd->add_flag("--resume", a.resume,
                "Skip the cases already written to --out (a --sequential run goes on from its last curve point)");
  cmd->add_option("--sequential", a.sequential,
                  "Accumulate edits (no revert); re-score all edited cases every N edits");
  cmd->add_option("--target", a.target, "dominant | routed | shared | LAYER:EXPERT")->capture_default_str();
  cmd->add_option("--layer", a.layer,
                  "MoE layer to edit, or auto: the layer whose MoE block has the largest mean indirect effect at the "
                  "subject's last token in causal traces of the first --auto-layer-cases records");
  cmd->add_option("--auto-layer-cases", a.auto_cases, "Records traced for --layer auto")->capture_default_str();
  cmd->add_option("--generation-interval", a.generation_interval,
                  "Generate (fluency, reference score) for cases with case_id % N == 0; 0: never")
      ->capture_default_str();
  cmd->add_option("--gen-length", a.gen_len, "Generated length, prompt included (ROME: 100)")->capture_default_str();
  cmd->add_option("--gen-top-k", a.gen_top_k, "Top-k sampling of the generations")->capture_default_str();
  cmd->add_option("--gen-seed", a.gen_seed, "Seed of the generations")->capture_default_str();
  cmd->add_option("--snippets", a.snippets, "ROME's attribute_snippets.json (enables reference and essence scores)");
  cmd->add_option("--idf-corpus", a.idf_corpus, "TF-IDF corpus, one document per line (default: the snippets)");
  add_editor_flags(cmd->add_option_group("editor", "Editor options (as in `moedit edit`)"), a.editor);
  add_batch_flags(cmd->add_option_group("batch editors", "MEMIT / AlphaEdit / MoEEdit (as in `moedit edit`)"), a.batch);
  add_intervention_flags(cmd, a.interventions);
  cmd->add_option("--batch-size", a.batch_size,
                  "memit/alphaedit: records edited together per step (MEMIT style); --sequential N: steps accumulate")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--drift-tokens", a.drift_tokens,
                  "Routing drift (and, sequentially, perplexity) on this many WikiText-2 tokens besides the "
                  "neighbourhood prompts (0: neighbourhood only)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_flag("--quiet", a.quiet, "No progress bar, no table");
  cmd->callback([] {
    if (!a.merge_dirs.empty() || !a.curve_dirs.empty()) return;  // a subcommand ran
    a.mpi ? run_mpi(a) : run(a);
  });

  auto* merge = cmd->add_subcommand("merge", "Merge the run directories of shards into one");
  merge->add_option("dirs", a.merge_dirs, "Run directories")->required();
  merge->add_option("--out", a.merge_out, "Output directory")->required();
  merge->callback([] {
    const auto s = eval::merge_runs(a.merge_dirs, a.merge_out);
    std::printf("merged %d cases into %s\n", s.value("num_cases", 0), a.merge_out.c_str());
  });

  auto* curve = cmd->add_subcommand("curve", "Plot the sequential curves of several runs (ES/PS/NS, drift, perplexity)");
  curve->add_option("dirs", a.curve_dirs, "Run directories of --sequential runs")->required();
  curve->add_option("--labels", a.curve_labels, "One label per run (default: the directory names)")->delimiter(',');
  curve->add_option("--out", a.curve_out, "Output SVG")->required();
  curve->callback([] {
    write_file_atomic(a.curve_out, eval::curve_svg(eval::read_curves(a.curve_dirs, a.curve_labels)));
    std::printf("wrote %s (%zu runs)\n", a.curve_out.c_str(), a.curve_dirs.size());
  });
}

}  // namespace

MOEDIT_COMMAND(70, register_eval)

}  // namespace moedit::cli
