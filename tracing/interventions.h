// Expert interventions on the router: masking (never route to an expert) and boosting (steer towards one).
//
// Both act on the raw router logits z [N, E] of an MoE layer (hook `blocks.{l}.moe.hook_router_logits`), before
// the router turns them into (ids, weights), so every router kind (softmax→top-k, top-k→softmax) honours them and
// every command that runs the model can use them:
//
//   mask  L:E          z_E ← −∞ for every token of layer L: the expert gets probability 0 and is never chosen
//                      (rejected if it would leave fewer than top_k selectable experts in the layer).
//   boost L:E=c (add)  z_E ← z_E + c.
//   boost L:E=c (norm) the norm-preserving variant: first the boosted experts' own logits are set to 0, then
//                      m = max_j z_j over that row (unmasked experts, boosted ones now 0, so m ≥ 0) and
//                      z_E ← c·m. With c > 1 and m > 0 a boosted expert outranks every other expert; the scale of
//                      the logits is tied to the row's own maximum rather than an absolute constant.
//
//   steer with a vector v_l [E] per MoE layer (a cluster's expert vector E_c, issue 20; formulas of the GigaChat
//   expert-concentration study), m = max_j z_j of the row before steering:
//     form 3   z ← z + c·v
//     form 4   z ← z + m·c·v
//     form 5   z ← Z_v(z) + m·c·v, Z_v zeroing z_e wherever v_e ≠ 0 (the stabilised form; `--boost-mode norm` is
//              the same idea for hand-picked experts, with m taken after the zeroing)
//   A steering file is JSON {"layers": [l, ...], "vector": [[v_0 .. v_{E-1}], ...]} (one row per listed MoE layer);
//   with a threshold t the vector is binarised (v_e ≥ t → 1, else 0), so a cluster's mean router embedding can be
//   given directly (the study thresholds at 3/E).
//
// Order inside one layer: steering, boosts, then masks (a mask always wins; masking and boosting the same expert is
// an error). Specs: "L:E,L:E,..." for masks and "L:E=c,..." for boosts; whitespace around items is ignored.
#pragma once
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "model/config.h"
#include "model/hooks.h"
#include "model/router_edit.h"

namespace moedit {

struct ExpertRef {
  int layer = 0, expert = 0;
  bool operator==(const ExpertRef&) const = default;
};

struct ExpertBoost {
  int layer = 0, expert = 0;
  float c = 0.f;
};

enum class BoostMode { Add, NormPreserving };

struct Steering {
  std::vector<int> layers;    // MoE layers with a row
  std::vector<VecF> vector;   // [layers.size()] rows of E
  float c = 1.f;
  int form = 3;               // 3, 4 or 5 (see above)
  std::string source;         // the file (messages)
  double threshold = -1;      // the binarising threshold it was read with (< 0: none)
  bool empty() const { return layers.empty(); }
};
// Reads a steering file; threshold ≥ 0 binarises the vector. InputError naming the file and field.
Steering load_steering(const std::string& path, double threshold = -1);

struct InterventionSpec {
  std::vector<ExpertRef> mask;
  std::vector<ExpertBoost> boost;
  BoostMode boost_mode = BoostMode::Add;
  Steering steer;
  // Flag names used in error messages.
  std::string mask_flag = "--mask", boost_flag = "--boost", steer_flag = "--steer";

  bool empty() const { return mask.empty() && boost.empty() && steer.empty(); }
};

// "1:3,2:0" → {{1,3},{2,0}}. InputError naming `flag` on malformed items (syntax only; ranges are checked against a
// model by validate_interventions).
std::vector<ExpertRef> parse_mask_spec(const std::string& s, const std::string& flag = "--mask");
// "1:3=2.5,0:1=-1" → {{1,3,2.5},{0,1,-1}}.
std::vector<ExpertBoost> parse_boost_spec(const std::string& s, const std::string& flag = "--boost");
// "add" | "norm" (also "norm-preserving").
BoostMode parse_boost_mode(const std::string& s, const std::string& flag = "--boost-mode");

// InputError naming the flag when a layer is out of range or dense (no router), an expert is out of range, an
// expert is both masked and boosted, a boost is not finite, or masks leave fewer than top_k experts in a layer.
void validate_interventions(const InterventionSpec& spec, const ModelConfig& cfg);

// Validates, then registers router_logits hooks in `hooks` (one per affected layer) that apply router_edit(spec).
// Register these before any capture of the router logits if the capture should see what the router actually used.
void install_interventions(const InterventionSpec& spec, const ModelConfig& cfg, Hooks& hooks);

// The spec as a router edit (model/router_edit.h; validated first): what the installed hooks apply, or, set on a
// model (Model::set_router_edit), a standing intervention that every forward and the taped gradient stack apply
// (`moedit eval --steer/--mask/--boost`). Its backward is exact away from ties of a row's maximum (forms 4/5 and
// norm boosts take a row's max); fingerprint(l) spells out layer l's part.
std::shared_ptr<const RouterEdit> router_edit(const InterventionSpec& spec, const ModelConfig& cfg);

// Applies the spec's edits for layer `l` to one matrix of router logits [N, E] (float: the forward; double: the
// taped stack of the finite-difference tests).
void apply_interventions(const InterventionSpec& spec, int l, Eigen::Ref<MatR> z);
void apply_interventions(const InterventionSpec& spec, int l, Eigen::Ref<MatRD> z);
// The layers the spec touches; per expert of layer l, whether it is masked [n_experts].
std::set<int> intervention_layers(const InterventionSpec& spec);
std::vector<char> masked_experts(const InterventionSpec& spec, int l, int n_experts);

// The spec as settings JSON (an evaluation's settings.json): {"mask": "L:E,...", "boost": "L:E=c,...",
// "boost_mode", "steer": {"file", "coef", "form", "threshold" (null: none), "layers"}}, each only when given.
nlohmann::json intervention_settings(const InterventionSpec& spec);

// "L3:E5" style description, for reports ("mask 1:3,2:0; boost(add) 1:2=+4").
std::string describe(const InterventionSpec& spec);

}  // namespace moedit
