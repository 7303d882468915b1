// What `moedit edit`'s two paths share (cli/cmd_edit.cpp: ROME, one request after another; cli/edit_batch.cpp:
// MEMIT / AlphaEdit, the requests together): the arguments, the requests, key statistics, routing drift, the
// printed scores and summary, and --save.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli/editor_flags.h"
#include "editor/keystats.h"
#include "editor/rome.h"
#include "model/routing_drift.h"
#include "tokenizer/tokenizer.h"

namespace moedit::cli {

struct EditArgs {
  std::string model, subject, prompt, target_new, target_true, requests, target = "dominant", layer = "auto";
  std::vector<std::string> paraphrases, neighbors;
  std::string save, save_dtype = "checkpoint";
  bool json = false, overwrite = false, independent = false, quiet = false;
  int limit = -1;
  int drift_tokens = 512;
  EditorFlags editor;
  BatchFlags batch;  // --method and the batch editors' options
};

// The requests: --requests FILE (first --limit) or the one given by --subject/--prompt/--target-new; each validated.
std::vector<EditRequest> edit_requests(const EditArgs& a);

// Key statistics of the model (progress on a terminal) and the moment source edits read them through (a note when a
// layer is computed, a warning for an expert with fewer than 2x its key size tokens).
struct EditStats {
  std::unique_ptr<KeyStatsCache> cache;
  MomentSource moments;
};
EditStats edit_stats(const Model& m, const Tokenizer& tok, const EditArgs& a);

void print_score(const char* what, const PromptScore& s, bool has_true, bool neighbor);
void print_report(const EditReport& rep, bool has_true);  // rewrite, paraphrases, neighbours

// CounterFact rates over the edited requests (those with a target_true).
struct EditTally {
  int n_true = 0, es = 0, ps_n = 0, ns_n = 0;
  double ps = 0, ns = 0;
  void add(const EditRequest& req, const EditReport& rep);
  // {"requests", "efficacy", "paraphrase", "neighborhood"} (a rate over no prompts is null); also printed unless json.
  nlohmann::json summary(bool json) const;
};

// --save: the edited checkpoint, with the rounding report. last_rewrite: the last request's rewrite score on the
// rounded model (called only when the stored dtype rounds ΔW).
nlohmann::json save_edits(Model& m, const EditArgs& a, const std::vector<std::pair<int, int>>& edited,
                          const std::function<nlohmann::json()>& last_rewrite);

// The MEMIT / AlphaEdit path of `moedit edit` (cli/edit_batch.cpp).
void run_batch_edit(const EditArgs& a);

}  // namespace moedit::cli
