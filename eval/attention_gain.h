// What the context-faithful experts change inside the model (Router Lens, Bai et al., EMNLP 2025, §"how CE experts
// work"; issue 19): per layer, how much the prompt's last token attends to the context and to the answer inside the
// context, and how probable the answer already is there (logit lens) — on one model, and the gains of a tuned
// checkpoint over its base on the same examples.
//
// Definitions. q = the prompt's last token (the position that predicts the answer's first token); a_l(j) = the
// attention probability from q to key j in layer l, averaged over the Hq query heads; h_l = the residual stream
// after block l at q. Per example and layer:
//   context attention   C_l = Σ_{j in the context's tokens} a_l(j)
//   answer attention    A_l = Σ_{j in the tokens of the answer's occurrence inside the context} a_l(j)
//                        (eval/context_task_eval.h TaskItem::ans_begin/ans_end; NaN when the context lacks it)
//   answer probability  P_l = softmax(lm_head(final_norm(h_l)))[the gold answer's first token]   (logit lens;
//                        P of the last layer is the model's own output probability)
// Gains, per layer, averaged over the examples (those with a finite value on both models):
//   CAG_l = mean(C_l^tuned − C_l^base),  AAG_l = mean(A_l^tuned − A_l^base),  APG_l = mean(P_l^tuned − P_l^base).
// The RouterLens repository has no code for these figures; the paper's text was not available here, so these
// definitions follow the issue and the figure captions (attention gain on the context and on the answer of the
// router-tuned over the untuned model, per layer; answer probability gain by logit lens). Attention probabilities
// come from the taped forward of model/backward.h (grad::block_forward records them), the same block code as
// Model::forward.
#pragma once
#include <string>
#include <vector>

#include <Eigen/Dense>
#include <nlohmann/json.hpp>

#include "eval/context_task_eval.h"
#include "model/model.h"

namespace moedit::eval {

struct LensMeasures {
  Eigen::MatrixXd context, answer, prob;  // [examples, n_layers]: C_l, A_l, P_l
};
// Runs the items' prompts (packed, about batch_tokens tokens per taped forward).
LensMeasures measure_lens(const Model& m, const std::vector<TaskItem>& items, int batch_tokens = 2048);

struct AttentionGain {
  int examples = 0;
  std::vector<double> cag, aag, apg;                        // [n_layers]
  std::vector<double> base_context, tuned_context;          // [n_layers] mean C_l
  std::vector<double> base_answer, tuned_answer;            // mean A_l
  std::vector<double> base_prob, tuned_prob;                // mean P_l
  nlohmann::json to_json() const;
  std::string table() const;
  // One metric ("cag", "aag" or "apg") per layer as an SVG line chart.
  std::string svg(const std::string& metric) const;
};
AttentionGain attention_gain(const LensMeasures& base, const LensMeasures& tuned);

}  // namespace moedit::eval
