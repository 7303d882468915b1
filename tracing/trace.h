// Causal tracing for Mixture-of-Experts LMs: ROME's procedure (spec/rome.md §1), extended to single routed experts
// and the shared expert, computed with a cache of the corrupted run.
//
// One fact = a prompt (token ids), the subject's token range [b, e) and an answer token. The clean run gives the
// answer (its argmax, unless a target is given) and high_score = p(answer). `samples` corrupted runs add noise to
// the subject's token embeddings (hook_embed, before any embedding multiplier); low_score = mean p(answer) over them.
// A restoration copies clean values into every corrupted sample at chosen sites and measures the mean p(answer)
// again (probabilities are averaged, not log-probabilities, as in ROME).
//
// Sites (Patch::kind):
//   Resid   blocks.{l}.hook_resid_post at token t (ROME's "hidden state" = output of block l)
//   Attn    blocks.{l}.hook_attn_out at token t
//   Moe     blocks.{l}.hook_moe_out at token t (whole FFN/MoE output, shared part included)
//   Shared  blocks.{l}.moe.hook_shared_out at token t (all shared experts together), or, with Patch::expert = j,
//           shared expert j alone at blocks.{l}.moe.shared_experts.{j}.hook_out: its contribution
//           g·W_down[:, slice_j]·k[slice_j] (ModelConfig::shared_slice) replaced by the clean one (models with
//           n_shared_experts > 1). Restoring every shared expert alone at once restores the shared output.
//   Expert  routed expert e's contribution w_e·E_e(x) at token t: MoE output − (this run's contribution of e at t,
//           0 if t is not routed to e here) + (clean contribution of e at t, 0 if t was not routed to e in the
//           clean run). Restoring every expert and the shared expert at (t, l) restores the MoE output at (t, l).
//
// Cached mode (default): restoring sites at tokens ≥ t0 and layers ≥ l0 leaves positions < t0 and layers < l0 equal
// to the corrupted run. The corrupted run is made once (residual stream entering every layer, K/V of every layer);
// a restoration re-runs only blocks ≥ l0 on positions ≥ t0 (continuing the cached K/V prefix), with all noise
// samples — and several restorations — packed in one batch. A Resid patch at layer l starts at l0 = l + 1 with
// the clean row injected; at l0 itself only the patched positions of sublayer patches can change, so the other
// positions join at l0 + 1. Patches that cannot change the result are dropped (tokens before the subject, where the
// clean and corrupted runs agree; non-last tokens at the last layer), identical restorations (e.g. clipped
// attn/moe windows) run once, and restorations sharing their patches on the first layers (windows clipped at
// layer 0) run those layers once. Naive mode re-runs the whole corrupted batch from the embeddings for every restoration
// (kept as the test reference); both modes run the same hooks and agree to float rounding.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "model/model.h"

namespace moedit {
class Tokenizer;
}

namespace moedit::trace {

enum class Kind { Resid, Attn, Moe, Expert, Shared };
const char* kind_name(Kind k);                    // "resid", "attn", "moe", "expert", "shared"
Kind parse_kind(const std::string& s);            // InputError for anything else
std::vector<Kind> parse_kinds(const std::string& csv);  // "resid,attn" (or "all"); InputError
const std::vector<Kind>& all_kinds();

// One site whose clean value is restored in every corrupted sample.
struct Patch {
  Kind kind = Kind::Resid;
  int token = 0;
  int layer = 0;
  int expert = -1;  // Expert: the routed expert; Shared: −1 = the whole shared block, j ≥ 0 = shared expert j alone
};
using Restoration = std::vector<Patch>;  // empty: restore nothing (gives low_score)

// ---- noise --------------------------------------------------------------------------------------------------

// numpy.random.RandomState(seed) (legacy MT19937 seeding, legacy polar Gaussian), reproduced bit for bit: ROME
// draws its noise from RandomState(1).randn(samples, e − b, H) on every trace.
class NumpyRandomState {
 public:
  explicit NumpyRandomState(uint32_t seed);
  uint32_t next32();
  double next_double();   // legacy random_sample(): 53-bit from two 32-bit draws
  double gauss();         // legacy randn() element
  double uniform(double low, double high) { return low + (high - low) * next_double(); }

 private:
  uint32_t mt_[624];
  int idx_ = 624;
  bool has_gauss_ = false;
  double gauss_ = 0.0;
};

// --noise rule: "s<F>" (F × std of subject-token embeddings; "s" = s1), a number (fixed σ), "u<F>" (uniform in
// (−F, F)). `replace` (separate flag) makes the noise replace the subject embeddings instead of being added.
struct NoiseRule {
  enum Type { ScaledStd, Fixed, Uniform } type = ScaledStd;
  double value = 3.0;
  std::string text = "s3";
};
NoiseRule parse_noise_rule(const std::string& s);  // InputError

// Noise [samples] × [subject_len, H] (fp32).
using Noise = std::vector<MatR>;
// ROME's draw: RandomState(seed).randn(samples, len, H) × σ (σ = F·embedding_std or the fixed σ), or
// RandomState(seed).uniform(−1, 1, shape) × F; computed in double, rounded to fp32.
Noise make_noise(const NoiseRule& rule, double embedding_std, int samples, int len, int hidden, uint32_t seed = 1);
// A safetensors file holding tensor "noise" [samples, len, H] (F32/F64/F16/BF16). InputError naming the file when
// absent or misshapen (len and hidden must match; any sample count).
Noise load_noise_file(const std::string& path, int len, int hidden);
void save_noise_file(const std::string& path, const Noise& noise,
                     const std::map<std::string, std::string>& metadata = {});

// ROME's collect_embedding_std: the std (unbiased, over all elements) of the token-embedding outputs (hook_embed:
// no multiplier) of every token of every list.
double embedding_std(const Model& m, const std::vector<std::vector<int32_t>>& token_lists);

// ---- the tracer ---------------------------------------------------------------------------------------------

struct TraceStats {
  double flops = 0;          // analytic FLOPs (2 per multiply-add) of the restoration runs
  double setup_flops = 0;    // ... of the clean run and the corrupted run (and its cache)
  double seconds = 0;        // wall time of the restoration runs
  double setup_seconds = 0;  // wall time of the clean run and the corrupted run
  int64_t restorations = 0;  // requested
  int64_t computed = 0;      // actually run (cached mode: distinct, after dropping no-op patches)
  int64_t shared_prefixes = 0;  // cached mode: stage-A runs shared by restorations with a common prefix
  int64_t batches = 0;
  int64_t rows = 0;          // token rows × layers run by the restorations
  // Prompts traced together (Tracer::together): batches counts those holding any of this prompt's restorations,
  // flops and rows are this prompt's own, seconds and setup_seconds an equal share of the shared runs' time.
  int64_t traced_together = 1;
};

using ProgressFn = std::function<void(int64_t done, int64_t total)>;

// Traces one prompt. Construction runs the clean pass (and, lazily, the cached corrupted pass).
class Tracer {
 public:
  // ids: prompt tokens; [subject_begin, subject_end): the subject; noise: [samples] × [subject_len, H];
  // answer: the token whose probability is measured, −1 = the clean argmax at the last position.
  Tracer(const Model& m, std::vector<int32_t> ids, int subject_begin, int subject_end, Noise noise, bool replace,
         int answer = -1);
  Tracer(Tracer&&) noexcept;
  Tracer& operator=(Tracer&&) noexcept;
  ~Tracer();

  // Several prompts traced together (dataset runs): their clean runs in one forward, their corrupted runs in one
  // forward (eagerly) whose K/V cache they share, and, through run_together, their restorations packed into
  // shared batches. Every score equals what each prompt's own Tracer gives — bit for bit on the CPU, whose
  // kernels are batch-invariant. The prompts must have the same number of noise samples (InputError).
  struct Prompt {
    std::vector<int32_t> ids;
    int subject_begin = 0, subject_end = 0;
    Noise noise;
    int answer = -1;
  };
  static std::vector<Tracer> together(const Model& m, std::vector<Prompt> prompts, bool replace);

  int answer() const;
  double high_score() const;
  double low_score();
  int n_tokens() const;
  int samples() const;
  const LayerRouting& clean_routing(int layer) const;
  // The clean contribution of expert e at (token, layer), or nullptr if the token was not routed to e.
  const float* clean_expert_row(int layer, int expert, int token) const;

  // Mean p(answer) for each restoration. naive: full re-run per restoration (still batched by batch_rows).
  // batch_rows: target packed rows per forward (≤ 0: one restoration per forward).
  std::vector<double> run(const std::vector<Restoration>& rs, bool naive, int batch_rows = 1024,
                          const ProgressFn& progress = {});
  // run() for several tracers at once: rs[i] on tracers[i]. Cached mode packs restorations of tracers made by one
  // together() call into shared batches (others run one tracer after another); naive mode runs each tracer alone.
  static std::vector<std::vector<double>> run_together(const std::vector<Tracer*>& tracers,
                                                       const std::vector<std::vector<Restoration>>& rs, bool naive,
                                                       int batch_rows = 1024, const ProgressFn& progress = {});
  const TraceStats& stats() const;
  void reset_stats();
  // Cached mode only (default on): drop patches that cannot change the result — tokens before the subject (clean
  // and corrupted runs agree there: causal attention) and non-last tokens at the last layer (never read by the
  // last position) — score a restoration left empty as low_score, and run identical restorations once.
  void set_pruning(bool on) { prune_ = on; }

 private:
  struct Impl;
  struct Work;
  explicit Tracer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
  bool prune_ = true;
};

// ---- whole traces ---------------------------------------------------------------------------------------------

struct TraceOptions {
  std::vector<Kind> kinds = all_kinds();
  int samples = 10;
  std::string noise = "s3";       // NoiseRule text
  bool replace = false;
  uint32_t seed = 1;              // numpy RandomState seed (ROME: 1)
  std::string noise_file;         // exact noise tensor (overrides noise/seed/samples)
  double embedding_std = -1;      // for s<F>; < 0: computed (trace_ids: over the prompt's subject tokens;
                                  // trace_fact: over the bundled CounterFact subjects, else the prompt's subject)
  std::string embedding_std_source;  // how embedding_std was obtained (reported)
  int window = 10;                // attn/moe: layers [l − window/2, l + ceil(window/2)) ∩ [0, L)
  bool naive = false;
  bool prune = true;              // cached mode: skip no-op patches and duplicate restorations (Tracer::set_pruning)
  bool expert_all_tokens = false; // expert kind at every token (default: last subject token and last token)
  std::vector<int> expert_tokens; // explicit token list for the expert kind (overrides the default)
  std::vector<int> tokens;        // resid/attn/moe/shared rows (ROME's token_range); empty: every token
  int batch_rows = 1024;
  int threads = 0;                // > 0: run with this many threads (ops and OpenMP), restored afterwards
  bool progress = false;          // progress bar on stderr (only when stderr is a TTY)
};

// One fact at the token level (the fixture entry point: no tokenizer).
struct TraceInput {
  std::vector<int32_t> ids;
  int subject_begin = 0, subject_end = 0;
  int target = -1;                  // answer token id; −1: the clean argmax
  std::vector<std::string> tokens;  // display text per token (default: the ids)
  std::string prompt, subject, target_text, expected;  // for the report only
  std::string id;                   // fact id (dataset mode)
};

struct ExpertScore {
  int token = 0, layer = 0, expert = 0;
  int rank = 0;        // position in the clean top-k (0 = largest routing weight)
  float weight = 0;    // clean routing weight
  double score = 0;    // p(answer) with this expert's clean contribution restored
};

struct SharedExpertScore {
  int token = 0, layer = 0, expert = 0;  // expert: shared expert j (slice j of the shared block)
  double score = 0;                      // p(answer) with shared expert j's clean contribution restored alone
};

struct KindResult {
  Kind kind = Kind::Resid;
  int window = 1;
  std::vector<int> rows;                     // token index of each row of `scores`
  std::vector<std::vector<double>> scores;   // [rows][layers]; NaN where the kind does not exist at that layer
  // Expert kind: every clean-routed expert at the traced tokens, and the dominant one per (row, layer)
  // (scores then holds the dominant expert's score).
  std::vector<ExpertScore> experts;
  std::vector<std::vector<int>> dominant;    // [rows][layers] expert id, −1 where none
  // Shared kind with n_shared_experts > 1: every shared expert restored alone at every (row, shared layer).
  std::vector<SharedExpertScore> shared_experts;
};

struct TraceReport {
  std::string model, id, prompt, subject, target_text, expected;
  std::vector<int32_t> ids;
  std::vector<std::string> tokens;
  int subject_begin = 0, subject_end = 0;
  int answer = -1;
  std::string answer_text, answer_source;  // "argmax" | "target"
  bool correct_prediction = true;          // dataset mode: the argmax starts the expected answer
  double high_score = 0, low_score = 0;
  int n_layers = 0;
  std::vector<bool> moe_layers, shared_layers;
  int n_shared_experts = 0;  // shared experts per shared layer (config)
  // noise
  std::string noise_rule, noise_source;
  double noise_scale = 0;  // σ (gaussian) or F (uniform); 0 with a noise file
  double embedding_std = 0;
  int samples = 0;
  uint32_t seed = 1;
  bool replace = false;
  std::string mode;  // "cached" | "naive"
  std::vector<KindResult> kinds;
  TraceStats stats;
  const KindResult* find(Kind k) const;
};

TraceReport trace_ids(const Model& m, const TraceInput& in, const TraceOptions& opt);
// Several facts traced together (dataset runs): their clean runs in one forward, their corrupted runs in one
// forward whose K/V cache they share, their restorations packed into shared batches (Tracer::together). Report i
// equals trace_ids(m, in[i], opt) — bit for bit on the CPU — except stats (see TraceStats::traced_together). A bad
// input: InputError naming the fact (its id, else its index), or, with `errors`, its message in (*errors)[i] and an
// empty report while the others are traced.
std::vector<TraceReport> trace_ids_together(const Model& m, const std::vector<TraceInput>& in, const TraceOptions& opt,
                                            std::vector<std::string>* errors = nullptr);

// Text level: the prompt is tokenized (special tokens as the tokenizer adds them), the subject located through the
// offsets (ROME's token range; InputError when absent), the target (optional) becomes its first token, with a
// leading space added when neither the prompt ends nor the target starts with whitespace.
struct TraceRequest {
  std::string prompt, subject, target;
  std::string expected;  // dataset mode: the true answer (correct_prediction)
  std::string id;
};
TraceReport trace_fact(const Model& m, const Tokenizer& tok, const TraceRequest& req, const TraceOptions& opt);
// trace_fact for several facts, traced together as trace_ids_together does (same `errors` convention). Without
// opt.embedding_std and the bundled CounterFact file, s<F> noise scales by the std over all the facts' subjects.
std::vector<TraceReport> trace_facts_together(const Model& m, const Tokenizer& tok,
                                              const std::vector<TraceRequest>& reqs, const TraceOptions& opt,
                                              std::vector<std::string>* errors = nullptr);

// Token range of `subject` in `prompt` (InputError naming both when absent) and the prompt's encoding.
std::pair<int, int> locate_subject(const Tokenizer& tok, const std::string& prompt, const std::string& subject,
                                   std::vector<int32_t>* ids = nullptr);
// The std of the subject-token embeddings over `subjects` (each tokenized alone, special tokens excluded).
double subject_embedding_std(const Model& m, const Tokenizer& tok, const std::vector<std::string>& subjects);
// requested_rewrite.subject of each record of a CounterFact file (empty if the file is absent).
std::vector<std::string> counterfact_subjects(const std::string& path);

// ---- outputs (tracing/output.cpp) -------------------------------------------------------------------------------

// One kind of one fact as JSON (schema: tracing/README.md).
nlohmann::json kind_json(const TraceReport& r, const KindResult& k);
// {"model", ..., "kinds": {name: kind_json}} — what `moedit trace --json` prints.
nlohmann::json report_json(const TraceReport& r);
// Writes <prefix><kind>.json per kind, <prefix><kind>.svg heatmaps (resid purple, moe green, attn red, shared
// orange), <prefix>expert.svg (per-expert bars) and <prefix>expert_dominant.svg, and <prefix>report.html (self
// contained: SVGs inlined, files linked). Creates `dir`. Returns the written paths.
std::vector<std::string> write_trace_outputs(const TraceReport& r, const std::string& dir,
                                             const std::string& prefix = "trace_");

// ---- dataset mode (tracing/dataset.cpp) -----------------------------------------------------------------------

struct DatasetOptions {
  int limit = -1;           // first N records (−1: all)
  std::string out_dir;      // required
  int plots = 200;          // per-fact SVG/HTML for the first N facts (ROME: known_id ≤ 200)
  bool resume = true;       // reuse per-fact JSONs already in out_dir/cases
  bool only_correct = true; // average only facts whose clean argmax is the expected answer's first token (ROME)
  int together = 8;         // facts traced together (trace_facts_together); the scores do not depend on it
};
struct DatasetSummary {
  int facts = 0, traced = 0, correct = 0, skipped = 0;
  nlohmann::json json;      // the summary (also written to out_dir/summary.json)
};
// Traces every record of a CounterFact (requested_rewrite.{prompt,subject,target_true}) or known-facts
// ({prompt, subject, attribute}) JSON list; writes out_dir/cases/<id>_<kind>.json, out_dir/summary.json (average
// indirect effects in ROME's six token groups, per kind, plus the last-subject-token per-expert table),
// out_dir/summary_<kind>.svg and out_dir/report.html.
DatasetSummary trace_dataset(const Model& m, const Tokenizer& tok, const std::string& file, const TraceOptions& opt,
                             const DatasetOptions& dopt);

}  // namespace moedit::trace
