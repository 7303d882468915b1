// The expert-intervention flags every command that runs the model can take:
//   --mask L:E,...      never route to these experts (repeatable)
//   --boost L:E=c,...   add c to these experts' router logits (repeatable)
//   --boost-mode add|norm   norm: zero the boosted logits, then set them to c·max(row) (see tracing/interventions.h)
//   --steer FILE [--steer-coef c] [--steer-form 3|4|5] [--steer-threshold t]   add a cluster's expert vector
// Parsing happens while CLI11 parses (syntax errors exit 2 naming the flag); ranges are checked against the model
// when the command installs them: install_interventions(spec, model.config(), hooks), or, for a standing
// intervention (`eval`), model.set_router_edit(router_edit(spec, model.config())).
#pragma once
#include <CLI/CLI.hpp>
#include <string>
#include <vector>

#include "tracing/interventions.h"

namespace moedit::cli {

// A repeatable flag whose every value parse(value) turns into items appended to `out`.
template <class T, class Parse>
void add_list_flag(CLI::App* cmd, const std::string& name, std::vector<T>& out, Parse parse, const std::string& help,
                   const std::string& type) {
  cmd->add_option_function<std::vector<std::string>>(
         name,
         [&out, parse](const std::vector<std::string>& v) {
           for (const auto& s : v)
             for (const auto& x : parse(s)) out.push_back(x);
         },
         help)
      ->type_name(type)
      ->expected(1)
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
}

inline void add_intervention_flags(CLI::App* cmd, InterventionSpec& spec) {
  add_list_flag(cmd, "--mask", spec.mask, [&spec](const std::string& s) { return parse_mask_spec(s, spec.mask_flag); },
                "Never route to these experts: LAYER:EXPERT[,LAYER:EXPERT...] (repeatable)", "L:E,...");
  add_list_flag(cmd, "--boost", spec.boost,
                [&spec](const std::string& s) { return parse_boost_spec(s, spec.boost_flag); },
                "Boost these experts' router logits: LAYER:EXPERT=C[,...] (repeatable; see --boost-mode)", "L:E=C,...");
  cmd->add_option_function<std::string>(
         "--boost-mode", [&spec](const std::string& s) { spec.boost_mode = parse_boost_mode(s); },
         "add: logit += C (default); norm: boosted logits zeroed, then set to C·max(logits of that token)")
      ->type_name("add|norm");
  // The steering file is read once every flag is parsed (its threshold may come after it).
  static std::string steer_file;
  static double steer_threshold = -1;
  cmd->add_option("--steer", steer_file, "Steer the routers with a cluster's expert vector: JSON {layers, vector}");
  cmd->add_option("--steer-coef", spec.steer.c, "Steering coefficient c")->capture_default_str();
  cmd->add_option("--steer-form", spec.steer.form, "3: z + c·v; 4: z + max(z)·c·v; 5: zero v's experts, + max(z)·c·v")
      ->capture_default_str();
  cmd->add_option("--steer-threshold", steer_threshold, "Binarise the vector: v ≥ t → 1, else 0 (e.g. 3/E)");
  cmd->preparse_callback([](size_t) {
    steer_file.clear();
    steer_threshold = -1;
  });
  cmd->parse_complete_callback([&spec] {
    if (!steer_file.empty()) {
      const Steering s = load_steering(steer_file, steer_threshold);
      spec.steer.layers = s.layers;
      spec.steer.vector = s.vector;
      spec.steer.source = s.source;
      spec.steer.threshold = s.threshold;
    }
  });
}

}  // namespace moedit::cli
