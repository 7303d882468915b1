// Expert-level routing statistics: activation profiles, corpus comparison, domain experts (entropy-based) and
// driver experts (causal).
//
//   activation frequency  f[l][e] = (tokens routed to expert e at layer l) / tokens: the fraction of tokens whose
//                         top-k set contains e. Σ_e f[l][e] = k for an MoE layer.
//   load                  f[l][e] / k: expert e's share of layer l's routed (token, slot) assignments (Σ_e = 1;
//                         uniform = 1/E).
//   domain experts        for D labelled corpora, expert (l, e) has activation rate r_d = f_d[l][e] in domain d.
//                         Its distribution across domains is q_d = r_d / Σ r; H = −Σ q_d ln q_d; certainty
//                         c = 1 − H / ln D (1: used in one domain only, 0: evenly). Score for domain d:
//                         s_d = q_d · c. The expert "strongly prefers" its argmax domain d* when s_{d*} ≥ min_score
//                         and r_{d*} ≥ min_rate. Rates (not counts) make corpora of different sizes comparable.
//   driver experts        for each MoE expert (l, e): perturb its router logit (mask: z_e ← −∞; scale: z_e ← s·z_e)
//                         and measure KL(P_clean ‖ P_perturbed) of the next-token distribution at every position of
//                         a text set; rank by the mean over positions. Layers below l are computed once (the run
//                         resumes from the cached residual at layer l), so every (l, e) costs only layers ≥ l.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "model/model.h"
#include "tracing/interventions.h"
#include "tracing/routing.h"

namespace moedit {

class Tokenizer;

// --- corpora -------------------------------------------------------------------------------------------------------
struct CorpusOptions {
  int max_seq_len = 128;        // documents longer than this are cut into chunks of this many tokens
  int64_t max_tokens = 100000;  // stop after this many tokens (≤ 0: no limit)
  int max_docs = 0;             // stop after this many documents (≤ 0: no limit)
};
// Reads a corpus into token sequences. Formats, by content and extension:
//   *.ids          one sequence per non-empty line, comma-separated token ids (no tokenizer needed)
//   *.jsonl        one JSON object per line with a "text" string (or a bare JSON string)
//   *.json         a list of strings, or a list of CounterFact records (their rewrite and neighborhood prompts)
//   anything else  plain text: every non-empty line is a document (WikiText's paragraphs)
// Text formats need `tok` (InputError otherwise). Empty result → InputError naming the file.
std::vector<std::vector<int32_t>> load_corpus(const std::string& path, const Tokenizer* tok,
                                              const CorpusOptions& opt = {});

// --- activation profiles -------------------------------------------------------------------------------------------
struct ActivationProfile {
  int n_layers = 0, n_experts = 0, top_k = 0;
  std::vector<int> layers;      // MoE layers (rows of the matrices below)
  int64_t tokens = 0;
  Eigen::MatrixXd counts;       // [layers.size(), E] tokens routed to each expert
  Eigen::MatrixXd weight_sum;   // [layers.size(), E] summed routing weights

  static ActivationProfile empty_for(const ModelConfig& cfg);
  void add(const SequenceRouting& r);
  void add(const ActivationProfile& other);
  Eigen::MatrixXd frequency() const;  // counts / tokens
  Eigen::MatrixXd load() const;       // counts / (tokens · k)
  // Imbalance per layer: max load / uniform load (1 = perfectly balanced).
  std::vector<double> max_over_uniform() const;

  nlohmann::json to_json() const;
  std::string to_csv() const;            // header "layer,e0,e1,..."; one row of frequencies per MoE layer
  void write_npy(const std::string& path) const;  // float32 [layers.size(), E] frequencies (NumPy .npy v1.0)
  std::string table() const;
};

// Adds tokens [t0, t1) of one routed sequence to counts [layers.size(), E]: at MoE layer layers[i], the tokens whose
// top-k set holds each expert; with weight_sum, also their routing weights (same shape).
void count_experts(const SequenceRouting& r, const std::vector<int>& layers, int t0, int t1, Eigen::MatrixXd& counts,
                   Eigen::MatrixXd* weight_sum = nullptr);

// Routes the sequences (no logits) and counts.
ActivationProfile activation_profile(const Model& m, const std::vector<std::vector<int32_t>>& seqs,
                                     const RoutingOptions& opt = {});

struct ExpertDiff {
  int layer = 0, expert = 0;
  double freq_a = 0, freq_b = 0, diff = 0;  // diff = freq_a − freq_b
  double log2_ratio = 0;                    // log2((freq_a + ε) / (freq_b + ε)), ε = 1e-4
};
struct ProfileComparison {
  std::string name_a, name_b;
  int64_t tokens_a = 0, tokens_b = 0;
  std::vector<ExpertDiff> experts;  // every (layer, expert), sorted by diff descending (A-preferring first)
  std::vector<ExpertDiff> more_in(bool a, int n) const;  // the n experts A (or B) uses most beyond the other
  nlohmann::json to_json(int top) const;
  std::string table(int top) const;
};
ProfileComparison compare_profiles(const ActivationProfile& a, const ActivationProfile& b,
                                   const std::string& name_a = "A", const std::string& name_b = "B");

// --- domain experts ------------------------------------------------------------------------------------------------
struct DomainExpertScore {
  int layer = 0, expert = 0;
  int domain = 0;               // argmax q_d
  std::vector<double> rates;    // r_d per domain
  std::vector<double> share;    // q_d per domain
  double entropy = 0, certainty = 0, score = 0;  // score = q_{domain} · certainty
  bool strong = false;
};
struct DomainAnalysis {
  std::vector<std::string> domains;
  std::vector<int64_t> tokens;
  double min_score = 0, min_rate = 0;
  std::vector<DomainExpertScore> experts;  // every (layer, expert), by score descending
  std::vector<DomainExpertScore> strong_for(int domain) const;
  nlohmann::json to_json() const;
  std::string table(int top) const;
};
DomainAnalysis domain_experts(const std::vector<std::string>& names, const std::vector<ActivationProfile>& profiles,
                              double min_score = 0.2, double min_rate = 0.0);

// --- driver experts ------------------------------------------------------------------------------------------------
enum class Perturbation { Mask, Scale };
struct DriverOptions {
  Perturbation kind = Perturbation::Mask;
  float scale = 0.f;                                // Scale: z_e ← scale · z_e
  const InterventionSpec* interventions = nullptr;  // the baseline's interventions (kept in both runs)
  int max_batch_tokens = 2048;
  std::vector<int> layers;                          // MoE layers to perturb (empty: all)
  ProgressFn progress;                              // (experts done, total)
};
struct DriverExpert {
  int layer = 0, expert = 0;
  double mean_kl = 0, max_kl = 0;  // over every position of the text set, nats
  double activation_rate = 0;      // clean activation frequency f[l][e] on the same texts
  bool skipped = false;            // mask not applicable (already masked, or would leave < k experts)
};
struct DriverAnalysis {
  int64_t tokens = 0;
  Perturbation kind = Perturbation::Mask;
  float scale = 0.f;
  std::vector<DriverExpert> experts;  // ranked by mean_kl descending
  nlohmann::json to_json(int top) const;
  std::string table(int top) const;
};
DriverAnalysis driver_experts(const Model& m, const std::vector<std::vector<int32_t>>& seqs,
                              const DriverOptions& opt = {});

// log-softmax rows in double; KL(P‖Q) per row of two logit matrices.
std::vector<double> next_token_kl(const MatR& clean_logits, const MatR& perturbed_logits);

}  // namespace moedit
