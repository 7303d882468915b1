// ROME's rank-one edit (spec/rome.md §2) applied to the experts of one MoE layer.
//
// The MoE output at a token is y = Σ_{e∈topk} w_e·W_down^e·k_e(x) + g(x)·W_down^s·k_s(x), k = silu(W_gate x) ⊙ (W_up x).
//
// 1. v*: δ ∈ ℝ^H is added to the MoE-block output (blocks.{L}.hook_moe_out) at the subject's last token of every
//    rewriting prompt (one per context template) and of the KL prompt; Adam (lr 0.5) minimises
//      NLL (mean over templates of −Σ log p(target tokens)/|target|)
//      + kl_factor · KL(p_δ ‖ p_0) (next-token distribution at the KL prompt's subject last token, p_0 at δ = 0)
//      + weight_decay · ‖δ‖ / ‖target_init‖²        (target_init = MoE output at the bare prompt's subject token)
//    for at most `steps` iterations (stop when loss < 5e-2; the last iteration does not step, so ≤ steps−1
//    updates), projecting ‖δ‖ ≤ clamp_norm_factor·‖target_init‖ after each step. Layers < L run once (cached); each
//    step runs layers > L on the tokens at or after each prompt's subject token only (the earlier tokens' K/V are
//    constants — cache_prefix), forward and backward (model/backward.h).
//    VStarObjective::Exact instead adds s_t·δ at every token t, s_t being the factor with which the rank-one updates
//    of step 3 (computed first, as ROME's compute_u) will move t's MoE output per unit of δ: the loss is then the
//    edited model's own loss (spill-over onto the prompt's other tokens, templates not routed through the expert).
// 2. Targets: the experts whose down-projection absorbs δ, with residuals r_e in their output space, measured at
//    the bare prompt's subject last token:
//      dominant  the routed expert with the largest weight:          r = δ / w_e
//      routed    every expert of the top-k, minimum-norm split of δ:  r_e = w_e·δ / Σ_j w_j²   (Σ w_e·r_e = δ)
//      shared    the shared expert:                                   r = δ / g(x)  (ungated: r = δ)
//                n > 1 shared experts (DeepSeek): each shared expert j's slice of the shared down-projection,
//                minimum-norm split of δ over them: r_j = δ / (n·g(x))   (Σ_j g·r_j = δ; ungated g = 1)
//      L:E       expert E of layer L (must be routed there):          r = δ / w_E
// 3. Update per target expert: ΔW = r·(C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k), C = E[k kᵀ] of that expert's keys (editor/keystats.h;
//    shared expert j: W = W_down[:, slice_j], k = k[slice_j], C over its slice of every token's key)
//    plus an optional ridge, solved by Cholesky (LDLT fallback) in fp64; k* = mean over the context templates of
//    the expert's key at the subject's last token. KeyMode::Rome uses the bare-prompt key k in the denominator
//    (ROME's code); KeyMode::Consistent uses k* there too (r-ROME), so W′k* = Wk* + r. Without mom2 adjustment
//    C = I. After the update W′k = W k + r for the denominator's key, exactly up to fp32 rounding.
//
// Context templates: ROME samples 10 texts of 4 and 10 of 9 new tokens (top-k 5) from the BOS/EOS token; here the
// sampling is model/generate.h's seeded top-k sampling, sample i (0-based over all lengths) seeded with
// template_seed + i, so runs are deterministic. Each text: special tokens skipped, "\n\n" → " ", NFKD, braces →
// spaces, then ". {}" appended; "{}" (the bare prompt) is always first. A templates list can replace them.
//
// Tokenisation (text API): a rewriting prompt is encode(template ∘ prompt ∘ subject) (special tokens as the
// tokenizer adds them) followed by the target's ids minus the last; the target is encode(" " + target_new) without
// special tokens (ROME adds the space when missing); the subject's last token comes from the encoding's offsets
// (ROME's find_token_range). The ids API (EditIds) takes all of these directly.
#pragma once
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "editor/keystats.h"
#include "model/backward.h"
#include "model/model.h"

namespace moedit {

class Tokenizer;

// ---- requests and options ---------------------------------------------------------------------------------------

enum class TargetKind { Dominant, Routed, Shared, Expert };
struct EditTarget {
  TargetKind kind = TargetKind::Dominant;
  int layer = -1;   // Expert only ("L:E")
  int expert = -1;  // Expert only
};
// "dominant" | "routed" | "shared" | "L:E"; InputError otherwise.
EditTarget parse_edit_target(const std::string& s);
std::string target_name(const EditTarget& t);

enum class KeyMode { Rome, Consistent };
KeyMode parse_key_mode(const std::string& s);  // "rome" | "consistent"

// A CounterFact requested_rewrite (+ the record's paraphrase / neighbourhood prompts for the report).
struct EditRequest {
  std::string prompt;       // contains "{}" where the subject goes (or the subject itself, replaced)
  std::string subject;
  std::string target_new;
  std::string target_true;  // optional (report)
  std::vector<std::string> paraphrases, neighbors;
  std::string case_id;      // optional
};
// A CounterFact record ({"requested_rewrite": {...}, "paraphrase_prompts": [...], ...}) or a bare
// requested_rewrite object ({"prompt", "subject", "target_new": {"str"} | "...", "target_true"}). InputError
// names `where` and the field.
EditRequest parse_request(const nlohmann::json& j, const std::string& where);
// A JSON list of the above (or a single object).
std::vector<EditRequest> load_requests(const std::string& path);

// Where δ enters the v* objective. Rome: at each prompt's subject last token only (ROME's compute_v). Exact: where
// the rank-one update will put it — at every token t of every prompt (target tokens included), scaled by
// s_t = Σ_j gate_j(t)·share_j·u_jᵀk_j(t) over the target experts j (gate: routing weight, 0 when j is not in t's
// top-k; shared gate for a shared expert), so the objective is the edited model's loss exactly: it sees the edit's
// spill-over onto the prompt's other tokens and the templates whose subject token does not route through j.
enum class VStarObjective { Rome, Exact };
VStarObjective parse_objective(const std::string& s);  // "rome" | "exact"

struct VStarOptions {
  int steps = 20;                  // v_num_grad_steps
  double lr = 0.5;                 // v_lr (Adam, betas 0.9/0.999, eps 1e-8)
  // false: lr is ROME's absolute step per coordinate. true: lr is in units of the MoE output's RMS entry,
  // ‖target_init‖/√H (the step is lr·‖target_init‖/√H per coordinate, ≈ lr·‖target_init‖ in norm), so the same lr
  // suits models whose hidden states are on other scales (ROME's 0.5 was tuned on GPT-2/GPT-J).
  bool relative_lr = false;
  double weight_decay = 0.5;       // v_weight_decay
  double kl_factor = 0.0625;
  double clamp_norm_factor = 4.0;
  double early_stop_loss = 5e-2;
  bool cache_prefix = true;        // run only tokens at/after the subject in layers > L (exact; faster)
  VStarObjective objective = VStarObjective::Rome;
  // When set: U [H, m] with orthonormal columns; δ is kept in their complement (δ ← δ − U Uᵀδ after every step:
  // projected Adam), e.g. the router guard's directions (editor/router_guard.h).
  std::shared_ptr<const Eigen::MatrixXd> exclude;
  // The layers above L through the model backend's ops even where the backend is the host's (what a device runs:
  // the tests compare it with the taped stack the host uses). fp32 only.
  bool backend_ops = false;
};

// Supplies C for (layer, expert); shared_expert_id(j) for shared expert j (kSharedExpert for a single one).
using MomentSource = std::function<std::shared_ptr<const SecondMoment>(int layer, int expert)>;

struct EditOptions {
  int layer = -1;                  // MoE layer to edit (required unless the target is "L:E")
  EditTarget target;
  VStarOptions v;
  KeyMode keys = KeyMode::Rome;
  bool mom2_adjustment = true;     // false: C = I
  double ridge = 0.0;              // C + ridge·mean(diag C)·I
  MomentSource moments;            // required when mom2_adjustment
  // Context templates
  std::vector<std::string> templates;  // non-empty: use these ("{}" is put first if absent)
  std::vector<std::pair<int, int>> template_lengths = {{5, 10}, {10, 10}};  // (max_out_len incl. prompt, count)
  int template_top_k = 5;
  uint64_t template_seed = 1;
  std::string kl_prompt = "{} is a";
};

// ---- the token level (no tokenizer needed) ----------------------------------------------------------------------

struct EditIds {
  std::vector<std::vector<int32_t>> prompts;  // one per template, subject filled in, no target; [0] = bare prompt
  std::vector<int> subject_last;              // index of the subject's last token in each prompt
  std::vector<int32_t> kl_prompt;             // "{subject} is a"
  int kl_subject_last = 0;
  std::vector<int32_t> target;                // target_new ids (non-empty)
};
// InputError for empty prompts/target, indices out of range, ids outside the vocabulary.
void validate(const EditIds& ids, const ModelConfig& c);

// VStarObjective::Exact: given the FFN input of layer L [N, H] and its routing for every row of the packed batch
// (prompts ∘ target[:-1] per template, then the KL prompt), the factor s_t [N] with which δ reaches each row's MoE
// output.
using DeltaSpread = std::function<VecF(const MatR& ffn_in, const LayerRouting& routing)>;

// The v* objective at a given δ (ROME's loss), forward and gradient; templated for float64 checks. The layers above L
// run where the model's weights are: on a device through the backend's ops (grad::SeamStack, model/seam_backward.h:
// attention and experts recompute their rows in the backward), on the host through the taped stack
// (grad::TapedStack, model/backward.h: every expert's rows kept, nothing recomputed), which is also the float64
// reference. VStarOptions::backend_ops runs the backend's ops on the host too.
template <class T>
class VStarProblem {
 public:
  // `spread` is required with VStarObjective::Exact and ignored otherwise.
  VStarProblem(const Model& m, int layer, const EditIds& ids, const VStarOptions& opt,
               const DeltaSpread& spread = nullptr);
  ~VStarProblem();
  struct Value {
    T loss = 0, nll = 0, kl = 0, wd = 0;
    T p_target = 0;  // mean over templates of exp(−mean NLL of the target tokens)
  };
  Value eval(const VecT<T>& delta);   // runs the forward; remembers it for grad()
  VecT<T> grad() const;               // ∂loss/∂δ at the last eval()
  const VecF& target_init() const { return target_init_; }
  int hidden() const;
  int64_t tokens_per_step() const;    // token rows each step runs through layers > L

 private:
  const Model& m_;
  int layer_;
  VStarOptions opt_;
  EditIds ids_;
  VecF target_init_;
  T ti_norm2_ = 0;
  MatT<T> base_;                          // active rows' input of layer L+1 at δ = 0
  TokenLayout lay_;
  grad::PrefixKV<T> prefix_;
  std::vector<int> delta_rows_;           // active rows δ reaches (Rome: each sequence's subject-last row)
  std::vector<T> delta_scale_;            // the factor s_t of each (Rome: 1)
  std::vector<int> logit_rows_;           // rows given to logits(): templates' target positions, then the KL row
  std::vector<std::vector<int>> tmpl_rows_;  // per template: indices into logit_rows_
  VecT<T> kl_init_;                       // log p_0 at the KL row
  struct Layers;  // the taped stack or the backend's ops (rome_vstar.cpp)
  std::unique_ptr<Layers> stack_;
  MatT<T> dlogits_;
  VecT<T> delta_;
};

struct VStarResult {
  VecF delta;        // δ (added to the MoE output)
  VecF target_init;  // MoE output at the bare prompt's subject token (δ = 0)
  std::vector<double> loss, nll, kl, wd, p_target;  // per iteration (the last without a step)
  int updates = 0;   // Adam steps taken
  int64_t tokens_per_step = 0;
};
VStarResult compute_vstar(const Model& m, int layer, const EditIds& ids, const VStarOptions& opt,
                          const DeltaSpread& spread = nullptr);

// ---- edits --------------------------------------------------------------------------------------------------------

struct ExpertUpdate {
  int layer = -1;
  int expert = 0;               // shared_expert_id(j) for shared expert j
  double weight = 1.0;          // routing weight (or shared gate) at the bare prompt's subject token
  VecF r;                       // residual in the expert's output space [H]
  VecF u;                       // C⁻¹k* / ((C⁻¹k*)ᵀ k) [I]: ΔW = r·uᵀ
  VecF k;                       // the denominator's key
  VecF k_star;                  // template-averaged key
  std::vector<float> original;  // the down-projection [H, I] (expert_down) before the update (bit-exact revert)
  int64_t stats_count = 0;      // tokens behind C (0 without mom2 adjustment)
};

struct EditResult {
  int layer = -1;
  EditTarget target;
  VStarResult vstar;
  std::vector<ExpertUpdate> updates;  // applied in this order
  int n_shared_experts = 0;           // shared experts at the edited layer (expert_label)
  std::vector<int> routed;            // top-k experts at the bare prompt's subject token (top-k order)
  std::vector<float> routed_weights;
  std::vector<int> template_hits;     // per template: edited experts in its subject token's top-k
  double template_route_share = 0;    // share of templates routing through an edited expert (shared: 1)
  std::vector<std::string> templates; // text API only
  double seconds = 0;                 // wall time of the whole edit (v*, keys, solve, apply)
  double vstar_seconds = 0;
};

// The down-projection an expert id's edit changes: routed e → W_down^e [H, I]; shared expert j → the columns
// shared_slice(j) of the shared block's [H, n·I] (the whole block for a single shared expert). Copy-on-write: the
// first call makes an fp32 copy of that matrix (a checkpoint view stays untouched); revert drops the copy again
// once the matrix equals the checkpoint.
using DownMap = Eigen::Map<MatR, 0, Eigen::OuterStride<>>;
DownMap expert_down(Model& m, int layer, int expert);

// Writes `values` ([H, I] row-major, as ExpertUpdate::original) into that down-projection; one that is back at the
// checkpoint's bytes drops its copy, as a revert does.
void set_expert_down(Model& m, int layer, int expert, const std::vector<float>& values);

// The whole edit on ids: v*, keys, C⁻¹k*, ΔW applied in place.
EditResult apply_edit_ids(Model& m, const EditIds& ids, const EditOptions& opt);
// Restores the weights this edit changed, bit for bit (revert several edits in reverse order).
void revert(Model& m, const EditResult& r);
void revert_all(Model& m, const std::vector<EditResult>& edits);  // reverse order
// The experts (layer, expert) an edit (or several) changed.
std::vector<std::pair<int, int>> edited_experts(const EditResult& edit);
std::vector<std::pair<int, int>> edited_experts(std::span<const EditResult> edits);

// ---- the text level -----------------------------------------------------------------------------------------------

// ROME's context templates ("{}" first), deterministic (see the header comment).
std::vector<std::string> context_templates(const Model& m, const Tokenizer& tok, const EditOptions& opt);
// The prompt with "{}" located (the subject is substituted for it when the prompt holds the subject instead);
// InputError when neither is present, or for an empty subject / target.
std::string normalized_prompt(const EditRequest& req);
EditIds build_edit_ids(const Tokenizer& tok, const EditRequest& req, const std::vector<std::string>& templates,
                       const std::string& kl_prompt);
// Templates (generated once per options and cached in `templates_cache` when given), ids, edit.
EditResult apply_edit(Model& m, const Tokenizer& tok, const EditRequest& req, const EditOptions& opt,
                      std::vector<std::string>* templates_cache = nullptr);

// ---- report -------------------------------------------------------------------------------------------------------

struct PromptScore {
  std::string prompt;
  double p_new = 0, p_true = 0;   // exp(−mean NLL) of " target" after the prompt (ROME's scoring)
  double nll_new = 0, nll_true = 0;
  int subject_last = -1;          // −1: subject not found in the prompt
  std::vector<int> experts;       // top-k at layer L at the subject's last token
  int edited_hits = 0;            // how many of them were edited (shared: 1 when the layer has a shared expert)
};
// Scores every prompt against both targets in batched forwards; routing read at `layer`.
std::vector<PromptScore> score_prompts(const Model& m, const Tokenizer& tok, const std::vector<std::string>& prompts,
                                       const std::string& subject, const std::string& target_new,
                                       const std::string& target_true, int layer,
                                       const std::vector<std::pair<int, int>>& edited);

struct EditReport {
  PromptScore rewrite;
  std::vector<PromptScore> paraphrases, neighbors;
  nlohmann::json to_json(bool has_true) const;
};
EditReport report_edit(const Model& m, const Tokenizer& tok, const EditRequest& req, const EditResult& r);
nlohmann::json edit_json(const EditResult& r);

}  // namespace moedit
