// Routing analysis: which experts each token uses per layer, the router's uncertainty, and whether a fact's
// paraphrases route through the same experts.
//
// Definitions (every number moedit reports about routing uses these):
//   top-k set        the k experts the router selected for a token (ForwardOutput.routing, in selection order).
//   dominant expert  the one with the highest routing weight (ties: the earlier slot). Usually the first, but not
//                    for DeepSeek-V3, whose selection-only bias orders the top-k differently from the weights.
//   router dist. p   the FULL softmax over all E experts of the router logits z (hook
//                    `blocks.{l}.moe.hook_router_logits`), for every router kind. For GraniteMoE, whose router takes
//                    the top-k of z and then a softmax over those k only, p is still softmax(z) over all E: the
//                    routing weights are a renormalised slice of it, and entropy/KL need a distribution over all
//                    experts. With interventions installed, z is the intervened logits (masked experts have p = 0).
//   entropy          H(p) = −Σ p_e ln p_e, in nats (0 ≤ H ≤ ln E).
//   overlap          |A∩B| / k for two top-k sets A, B.
//   consistent       |A∩B| ≥ k−1 (the "3-of-4" criterion; with k = 1 this is always true).
//   Jaccard          |A∩B| / |A∪B|.
//   symmetric KL     KL(p‖q) + KL(q‖p) (Jeffreys divergence), nats; terms with p_e = 0 contribute 0 to KL(p‖q).
// Dense layers (Qwen's mlp_only_layers / decoder_sparse_step) have no router and are skipped everywhere.
#pragma once
#include <algorithm>
#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "model/model.h"
#include "tracing/interventions.h"

namespace moedit {

// The slot of the dominant expert among a token's k routing weights w (see "dominant expert" above).
inline int dominant_slot(const float* w, int k) { return int(std::max_element(w, w + k) - w); }

class Tokenizer;
struct CounterFactRecord;

using IdMat = Eigen::Matrix<int, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// The routing of one sequence: per layer (n_layers entries; empty matrices for dense layers).
struct SequenceRouting {
  std::vector<int32_t> ids;    // the tokens
  std::vector<IdMat> experts;  // [T, k] expert ids, top-k order (descending weight)
  std::vector<MatR> weights;   // [T, k] routing weights
  std::vector<MatR> probs;     // [T, E] full router softmax (empty unless RoutingOptions::probabilities)
  int n_tokens() const { return int(ids.size()); }
};

using ProgressFn = std::function<void(size_t done, size_t total)>;

struct RoutingOptions {
  bool probabilities = true;                       // capture the router logits → full softmax per token
  const InterventionSpec* interventions = nullptr;  // installed before the capture
  int max_batch_tokens = 4096;                     // sequences are packed into forward calls of about this size
  ProgressFn progress;                             // called after each forward call (sequences done, total)
};

// The MoE layer indices of a model, ascending.
std::vector<int> moe_layers(const ModelConfig& cfg);

// Runs the sequences (packed into batches; no logits computed) and returns each one's routing.
std::vector<SequenceRouting> capture_routing(const Model& m, const std::vector<std::vector<int32_t>>& seqs,
                                             const RoutingOptions& opt = {});

// --- the numbers ---------------------------------------------------------------------------------------------
double router_entropy(const float* p, int E);                 // nats
double kl_divergence(const float* p, const float* q, int E);  // KL(p‖q), nats (+inf if q_e = 0 < p_e)
double symmetric_kl(const float* p, const float* q, int E);   // KL(p‖q) + KL(q‖p)

struct TopKOverlap {
  int shared = 0;  // |A∩B|
  int k = 0;
  double overlap = 0, jaccard = 0;
  bool consistent = false;  // shared ≥ k − 1
};
TopKOverlap compare_topk(const int* a, const int* b, int k);

// One layer's comparison of two tokens (possibly of different sequences).
struct LayerComparison {
  int layer = 0;
  TopKOverlap topk;
  double sym_kl = 0;  // NaN when probabilities were not captured
  std::vector<int> a_ids, b_ids;
};
// Compares token ta of a with token tb of b at every MoE layer.
std::vector<LayerComparison> compare_tokens(const SequenceRouting& a, int ta, const SequenceRouting& b, int tb,
                                            const ModelConfig& cfg);

// Per-token, per-layer description (for `moedit route`).
nlohmann::json routing_json(const SequenceRouting& r, const ModelConfig& cfg,
                            const std::vector<std::string>& pieces = {});
std::string routing_table(const SequenceRouting& r, const ModelConfig& cfg, const std::vector<std::string>& pieces = {});
nlohmann::json comparison_json(const std::vector<LayerComparison>& c);

// --- paraphrase routing consistency over a dataset ----------------------------------------------------------------
// One (prompt, paraphrase) pair. Positions are token indices; subject_last = −1 when unknown (then only the last
// token is compared for this pair).
struct ParaphrasePair {
  int case_id = -1, paraphrase = 0;
  std::string prompt_text, paraphrase_text, subject;
  std::vector<int32_t> prompt_ids, paraphrase_ids;
  int prompt_subject_last = -1, paraphrase_subject_last = -1;
};

// CounterFact: the rewrite prompt (subject filled in) against each paraphrase prompt; subject's last token found
// with Tokenizer::find_span in both (a paraphrase that does not contain the subject string gets −1). limit ≤ 0:
// every record.
std::vector<ParaphrasePair> counterfact_pairs(const std::vector<CounterFactRecord>& recs, const Tokenizer& tok,
                                              int limit = 0);

enum class Where { SubjectLast = 0, Last = 1 };
inline const char* where_name(Where w) { return w == Where::SubjectLast ? "subject_last" : "last"; }

// Per-layer sums for one position kind.
struct ConsistencyTally {
  std::vector<int> n, consistent;                         // per MoE layer (index into report.layers)
  std::vector<double> overlap_sum, jaccard_sum, sym_kl_sum;
  int n_pairs = 0, all_layers_consistent = 0;             // pairs compared; pairs consistent at every layer
  double rate(size_t i) const { return n[i] ? double(consistent[i]) / n[i] : 0.0; }
  double mean_overlap(size_t i) const { return n[i] ? overlap_sum[i] / n[i] : 0.0; }
  double mean_jaccard(size_t i) const { return n[i] ? jaccard_sum[i] / n[i] : 0.0; }
  double mean_sym_kl(size_t i) const { return n[i] ? sym_kl_sum[i] / n[i] : 0.0; }
  double overall_rate() const;       // consistent (pair, layer) cells / all cells
  double all_layers_rate() const { return n_pairs ? double(all_layers_consistent) / n_pairs : 0.0; }
};

struct ConsistencyCase {
  ParaphrasePair pair;
  std::vector<LayerComparison> subject_last, last;  // subject_last empty when the subject was not found
  double mean_overlap = 0, mean_sym_kl = 0;          // over every compared (position, layer)
};

struct ConsistencyReport {
  int k = 0, n_experts = 0;
  std::vector<int> layers;            // MoE layers
  ConsistencyTally tally[2];          // indexed by Where
  int n_pairs = 0, subject_missing = 0;
  std::vector<ConsistencyCase> most_different;  // lowest mean overlap first (ties: higher mean symmetric KL)
  std::string interventions;          // describe() of the interventions in force, "" if none

  nlohmann::json to_json() const;
  std::string table() const;  // human-readable per-layer table + overall + the most different cases
};

struct ConsistencyOptions {
  RoutingOptions routing;  // probabilities are always captured here
  int top_cases = 10;
};

ConsistencyReport paraphrase_consistency(const Model& m, const std::vector<ParaphrasePair>& pairs,
                                         const ConsistencyOptions& opt = {});

// Per-layer chart (grouped bars: consistency rate at the subject's last token and at the last token, with the mean
// overlap as a line per position), a self-contained SVG document.
std::string consistency_svg(const ConsistencyReport& rep, const std::string& title);

}  // namespace moedit
