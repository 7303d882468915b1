// The evaluation driver: ROME's experiments/evaluate.py loop (spec/rome.md §4.4), resumable and shardable.
//
// Per case (independent mode): "pre" on the clean model; the edit (editor/rome.h); "post"; revert; then the
// edited layers' down-projections are fingerprinted and must equal the fingerprint taken before the edit (bit-exact
// revert, checked; a mismatch is a runtime error). The case is written to OUT/cases/case_<id>.json with ROME's
// keys (case_id, requested_rewrite, time = the edit's wall time, pre, post) plus "edit" (editor/rome.h edit_json)
// and "moe" (edited experts, the paraphrases' experts at the edited layer and whether they include an edited one).
// Every file is written to a temporary name and renamed, so a killed run leaves only whole case files; --resume
// skips the cases whose file exists. Summaries are always recomputed from the case files on disk, so a resumed
// run, a merge of shards and one uninterrupted run give the same summary.json (up to the "time" entry).
//
// Sequential mode (every > 0): pre for all cases on the clean model, then the edits accumulate (no revert);
// after every `every` edits and after the last, all cases edited so far are re-scored on the current model and
// summarised into OUT/sequential/after_<n>.json; at the end every edit is reverted and checked.
//
// Batches (`batch` set: MEMIT / AlphaEdit, editor/memit.h): a step edits `batch_size` consecutive records together;
// each record's case file has its batch's "edit" entry (the request's z*, experts, and the batch's size, time and
// first case) and "time" = the batch's wall time / its size. Independent batches are reverted like single edits;
// sequential batches accumulate (AlphaEdit's earlier-batch keys carried over).
//
// Routing drift (eval/drift_probe.h): every case records "routing_drift" of its step — the routers on its step's
// neighbourhood prompts and on `drift_tokens` WikiText-2 tokens before vs after the edit; summaries average it.
// Sequential curve points carry the drift of the accumulated edits against the clean model (every record's
// neighbourhood prompts, WikiText-2) and the WikiText-2 perplexity; sequential/curve.svg plots them.
//
// Sharding: the selected records (first `limit`) are split by step, step j (records jB .. jB + B − 1; B = 1 for
// ROME) belongs to shard j mod n, so the shards of a batch run merge to the same cases as one run.
#pragma once
#include <optional>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "datasets/eval_records.h"
#include "editor/memit.h"
#include "editor/rome.h"
#include "eval/counterfact_eval.h"

namespace moedit::eval {

struct RunOptions {
  std::string out_dir;
  int limit = -1;                   // first N records (−1: all)
  int shard = 0, n_shards = 1;
  bool resume = false;
  int sequential_every = 0;         // > 0: sequential mode
  int generation_interval = 1;      // generation when case_id % interval == 0; 0: never
  GenerationOptions gen;
  const AttributeSnippets* snippets = nullptr;
  const TfIdf* tfidf = nullptr;
  EditOptions edit;                 // ROME's options; with `batch` only the key statistics' source
  // MEMIT / AlphaEdit (editor/memit.h): `batch_size` records edited together per step; unset: ROME, one per step.
  std::optional<BatchOptions> batch;
  int batch_size = 1;
  int drift_tokens = 512;           // WikiText-2 tokens for routing drift and perplexity (0: neighbourhood only)
  nlohmann::json settings;          // written to settings.json; must match on --resume (shard/limit aside)
  std::function<void(int done, int total)> progress;  // cases finished (skipped ones included) of this shard
};

// The edit a record asks for (its rewrite, paraphrases and neighbours; case_id as the request id).
EditRequest edit_request(const EvalRecord& r);

struct RunResult {
  nlohmann::json summary;
  int evaluated = 0, skipped = 0;
};
RunResult run_eval(Model& m, const Tokenizer& tok, const std::vector<EvalRecord>& records, const RunOptions& opt);

// Collects the case files of several run directories (same settings up to shard/limit) into `out_dir` and writes
// its reports. InputError for mismatched settings or the same case with different results.
nlohmann::json merge_runs(const std::vector<std::string>& dirs, const std::string& out_dir);

// summary.json, summary.md and distributions.svg of the cases in DIR/cases (all of them, or only `case_ids`).
nlohmann::json write_reports(const std::string& dir, const nlohmann::json& settings,
                             const std::vector<int>* case_ids = nullptr);

// The case_id → file of DIR/cases.
std::string case_path(const std::string& dir, int case_id);

}  // namespace moedit::eval
