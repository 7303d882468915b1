// MEMIT over a range of MoE layers, and AlphaEdit's null-space variant (issue 18): N requests edited together in
// the experts of layers L_1 < … < L_m (spec/rome.md §3, per expert as MoEEdit / MoTE; closed forms in
// editor/batch_update.h; formulas and defaults in editor/README.md).
//
// 1. Targets z*: for each request i, δ_i = compute_vstar at L_m (rome.h step 1: δ added to L_m's MoE output at the
//    subject's last token, ROME's objective) and h_i = the residual stream after block L_m at the bare prompt's
//    subject last token, both on the model as it was before the batch; z*_i = h_i + ρ·δ_i (ρ: the config's
//    residual_multiplier, 1 but for Granite; MEMIT adds δ to the block output, the same residual at that token).
// 2. For each layer l = L_j (j = 1..m) in ascending order, on the current (partly edited) model:
//      r_i = (z*_i − h_i(cur)) / (ρ·(m − j + 1))      MEMIT's spread over the layers left, incl. l (MoE-output units)
//    split over request i's targets at l, read at its bare prompt's subject token exactly as ROME splits δ (rome.h
//    step 2: dominant r/w_e, routed the minimum-norm split, shared r/g), each target e with the key
//    k*_ie = Σ_t a_t k_iet, e's keys at the templates' subject tokens with weights a_t (the mean, a_t = 1/T: ROME's
//    k*, rome.h step 3; or the bare prompt's key weighted by bare_key_weight, the others sharing the rest), one
//    column (r, k*) per (request, target); with key_columns = Templates one column (√a_t·r, √a_t·k_iet) per template
//    instead, so the update fits every template's key in the least-squares sense rather than their mean.
//    Per expert e with n_e > 0 columns, R_e [H, n_e] and K_e [I, n_e]:
//      memit      ΔW_e = R_e K_eᵀ (λ C_e + K_e K_eᵀ)⁻¹                       λ = mom2_weight; C_e = I with no mom2
//      alphaedit  ΔW_e = R_e K_eᵀ P_e (K_e K_eᵀ P_e + A_e P_e + λ₂ I)⁻¹    P_e = null_space(C_e, threshold)
//      moeedit    the experts are coupled instead (MoEEdit): one column per (request i, template t) wants the layer
//                 output to move by √a_t·r_i through every routed expert e of that template's top-k at its subject
//                 token, key √a_t·w_ite·k_ite (w: routing weight), and block-coordinate descent over those experts
//                 solves the null-space problem of editor/batch_update.h (coupled_bcd, bcd_sweeps sweeps; P_e as
//                 alphaedit's, λ = l2) — no split of r_i over targets, each template with its own routing
//    (A_e: Σ K Kᵀ of the earlier batches given in a KeyCache, else 0), added to e's down-projection
//    (copy-on-write, the previous matrix kept: revert is bit-exact). Every expert of layer l is solved from the same
//    forward, before any of them changes.
//    With the router guard, r_i ← (I − U_l U_lᵀ) r_i (U_l: editor/router_guard.h) before the columns are built: every
//    closed form above is linear in R, so each ΔW_e's columns then lie in the complement of U_l, and v*'s δ is kept
//    in the complement of U_{L_m} so that z* stays reachable.
// 3. passes > 1 sweeps the layers again: each later sweep solves for the residual z*_i − h_i(cur) the earlier ones
//    left (block-coordinate descent over the edited experts, as MoEEdit iterates), its updates added on top.
// One request at one layer, one pass, mean keys: ΔW = ROME's update with --keys consistent times k*ᵀC⁻¹k* / (λ + k*ᵀC⁻¹k*).
#pragma once
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "editor/batch_update.h"
#include "editor/rome.h"

namespace moedit {

enum class BatchMethod { Memit, AlphaEdit, MoeEdit };
enum class KeyColumns { Mean, Templates };  // one column per (request, target) with k*, or one per template key
BatchMethod parse_batch_method(const std::string& s);  // "memit" | "alphaedit" | "moeedit"; InputError otherwise
std::string method_name(BatchMethod m);
// "3,4,5", "3-5" or a mix ("0,2-3"): ascending, distinct, non-negative; InputError naming --layers otherwise.
std::vector<int> parse_layer_list(const std::string& s);

struct BatchOptions {
  EditOptions edit;                   // target (dominant | routed | shared), v*, templates, moments, ridge, mom2
  std::vector<int> layers;            // MoE layers, ascending; z* at the last one
  BatchMethod method = BatchMethod::Memit;
  double mom2_weight = 15000;         // λ: MEMIT's mom2_update_weight (GPT-J; EasyEdit's Llama-7B)
  double nullspace_threshold = 2e-2;  // AlphaEdit's nullspace_threshold, on the eigenvalues of C_e
  // > 0: the threshold of expert e is this times the mean eigenvalue of C_e (tr C_e / I) instead — scale-free, for
  // experts whose keys are on another scale than AlphaEdit's (an absolute 2e-2 keeps 1–7 of the demo model's 128
  // directions); nullspace_threshold is then unused.
  double nullspace_relative = 0;
  double l2 = 10;                     // λ₂: AlphaEdit's L2
  // The bare prompt's weight w in k* = w·k_bare + (1 − w)·mean of the other templates' keys; < 0: the plain mean over
  // all templates (ROME's k*). MEMIT's compute_ks gives "{}" ½ (its templates: "{}" and one group of five).
  double bare_key_weight = -1;
  KeyColumns key_columns = KeyColumns::Mean;
  int passes = 1;                     // sweeps over the layers (step 3 above)
  int bcd_sweeps = 5;                 // moeedit: block-coordinate sweeps over a layer's experts per solve
  // The router guard (editor/router_guard.h): every update's output changes, and v*'s δ, kept out of the directions
  // the routers after its layer read (the next router_guard_layers MoE layers; 0: all of them).
  bool router_guard = false;
  int router_guard_layers = 0;
  int forward_requests = 16;          // requests per forward when reading keys and residuals
};
KeyColumns parse_key_columns(const std::string& s);  // "mean" | "templates"; InputError otherwise
std::string key_columns_name(KeyColumns k);

// AlphaEdit across sequential batches: Σ K Kᵀ [I, I] of the earlier batches per (layer, expert).
using KeyCache = std::map<std::pair<int, int>, MatD>;

struct BatchExpertUpdate {
  int layer = -1;
  int expert = 0;                // shared_expert_id(j) for shared expert j
  int pass = 0;                  // the sweep it belongs to
  std::vector<int> requests;     // the request behind each column (several with template columns)
  std::vector<double> weights;   // its routing weight (or shared gate) at that request's subject token
  std::vector<double> scales;    // √a_t of each column (1 for a k* column): R.col(c) / scales[c] is r's share
  MatD R;                        // [H, n] residuals the expert's output must gain (moeedit: the columns' residual
                                 // of the whole layer output, before the coupled solve)
  MatD K;                        // [I, n] keys k* (moeedit: √a_t·w·k, the key times its routing weight)
  int64_t stats_count = 0;       // tokens behind C (0 without mom2 adjustment)
  int null_dim = -1;             // alphaedit: rank of P_e
  double delta_norm = 0;         // ‖ΔW_e‖_F
  std::vector<float> original;   // the down-projection [H, I] before the update (bit-exact revert)
};

struct BatchEditResult {
  BatchMethod method = BatchMethod::Memit;
  EditTarget target;
  std::vector<int> layers;
  double lambda = 0;                          // mom2_weight (memit) or l2 (alphaedit)
  double bare_key_weight = -1;
  KeyColumns key_columns = KeyColumns::Mean;
  int passes = 1;
  int n_shared_experts = 0;                   // at the last layer (expert labels)
  std::vector<VStarResult> vstar;             // per request, at layers.back()
  std::vector<VecF> z;                        // per request z*_i [H]
  // [step][request] ‖z*_i − h_i(cur)‖ before each layer's update (step < passes·m, pass by pass) and after the last.
  std::vector<std::vector<double>> residual_norms;
  std::vector<BatchExpertUpdate> updates;     // applied in this order
  int bcd_sweeps = 0;                         // moeedit
  std::map<int, int> router_guard_dims;       // router guard: layer → directions kept out (empty: no guard)
  std::vector<std::vector<double>> bcd_objective;  // moeedit: per solve (pass by pass, layer by layer), the coupled
                                                   // objective at ΔW = 0 and after each sweep
  std::vector<std::string> templates;         // text API only
  double seconds = 0, vstar_seconds = 0;
};

// The whole batch on ids: z*, then layer by layer keys, residuals, solves and updates. `cache` (alphaedit) gives A
// and gains this batch's K Kᵀ. All or nothing: a failure reverts what was applied.
BatchEditResult apply_batch_edit_ids(Model& m, const std::vector<EditIds>& ids, const BatchOptions& opt,
                                     KeyCache* cache = nullptr);
// Text level: templates (generated once, cached in `templates_cache` when given), ids per request, the batch.
BatchEditResult apply_batch_edit(Model& m, const Tokenizer& tok, const std::vector<EditRequest>& reqs,
                                 const BatchOptions& opt, std::vector<std::string>* templates_cache = nullptr,
                                 KeyCache* cache = nullptr);
// Restores every matrix the batch changed, bit for bit.
void revert(Model& m, const BatchEditResult& r);
// The (layer, expert) pairs the batch changed; request ≥ 0: those with a column of that request.
std::vector<std::pair<int, int>> edited_experts(const BatchEditResult& r, int request = -1);

// Report of request i as report_edit gives it for ROME (routing read at the last layer).
EditReport report_request(const Model& m, const Tokenizer& tok, const EditRequest& req, const BatchEditResult& r,
                          int request);
nlohmann::json batch_edit_json(const BatchEditResult& r);              // the batch: updates, residuals, timings
nlohmann::json batch_request_json(const BatchEditResult& r, int request);  // request i: v*, its experts

}  // namespace moedit
