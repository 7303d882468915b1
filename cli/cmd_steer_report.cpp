// moedit steer-report MODEL --steer E_c.json [--steer-form 3|4|5] [--steer-threshold t] [--coefs 0,0.5,1,2]
//                     [--keywords w,w,...] [--prompts FILE] [--reference FILE] [--n-reference N] [--new-tokens N]
//                     [--out F.json]
//
// For each coefficient c (eval/steer_report.h): continuations of the prompts with the routers steered by c·E_c
// (c = 0: unsteered), the rate of the cluster's keywords in them, and the mean perplexity of a WikiText-2 sample.
// Keywords default to the "keywords" of the steering file (what `moedit clusters --vectors` writes). Prompts: one
// per non-blank line (default: five generic openings). Reference: the first N lines of ≥ 20 words of the file
// (default the bundled WikiText-2 test split), headings skipped.
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli/commands.h"
#include "cli/common.h"
#include "cli/lines.h"
#include "datasets/counterfact.h"
#include "eval/steer_report.h"
#include "io/errors.h"
#include "io/files.h"

namespace moedit::cli {

namespace {

struct Args {
  std::string model, steer, keywords, prompts, reference, out;
  std::vector<double> coefs = {0, 0.5, 1, 2};
  int form = 5, n_reference = 20, new_tokens = 40;
  double threshold = -1;
};

std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string w; std::getline(ss, w, ',');)
    if (!w.empty()) out.push_back(w);
  return out;
}

// The "keywords" field of a steering file written by `moedit clusters --vectors` ([{"term", "score"}] or strings).
std::vector<std::string> file_keywords(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  const auto j = nlohmann::json::parse(f, nullptr, false);
  std::vector<std::string> out;
  if (!j.is_object() || !j.contains("keywords") || !j["keywords"].is_array()) return out;
  for (const auto& k : j["keywords"]) {
    if (k.is_string()) out.push_back(k.get<std::string>());
    if (k.is_object() && k.contains("term") && k["term"].is_string()) out.push_back(k["term"].get<std::string>());
  }
  return out;
}

void run_steer_report(const Args& a) {
  const Steering st = load_steering(a.steer, a.threshold);
  std::vector<std::string> kw = a.keywords.empty() ? file_keywords(a.steer) : split_commas(a.keywords);
  require_input(!kw.empty(), "--keywords: none given and " + a.steer + " has no field 'keywords'");
  const std::vector<std::string> prompts =
      a.prompts.empty() ? std::vector<std::string>{"The", "In the first", "It is known that", "One of the", "She said"}
                        : nonblank_lines(a.prompts, "--prompts");
  require_input(!prompts.empty(), a.prompts + ": no prompts");
  std::vector<std::string> ref;
  const std::string rpath = a.reference.empty() ? bundled_wikitext_path() : a.reference;
  for (const auto& l : nonblank_lines(rpath, "--reference")) {
    if (int(ref.size()) >= a.n_reference) break;
    const size_t first = l.find_first_not_of(' ');
    if (l[first] == '=' || std::count(l.begin(), l.end(), ' ') < 20) continue;
    ref.push_back(l.substr(first));
  }
  const auto m = load_model(a.model);
  const Tokenizer tok = require_tokenizer(a.model, "steer-report generates text");
  InterventionSpec check;  // ranges against this model: InputError naming --steer
  check.steer = st;
  check.steer.form = a.form;
  validate_interventions(check, m->config());
  eval::SteerReportOptions o;
  o.coefs = a.coefs;
  o.new_tokens = a.new_tokens;
  const auto rows = eval::steer_report(*m, tok, check.steer, prompts, kw, ref, o);

  nlohmann::json out = {{"steer", a.steer}, {"form", a.form}, {"keywords", kw}, {"prompts", prompts},
                        {"reference_texts", ref.size()}, {"rows", nlohmann::json::array()}};
  std::printf("steering %s (form %d), keywords: %zu, %zu prompts, perplexity on %zu texts\n%8s %14s %12s\n",
              a.steer.c_str(), a.form, kw.size(), prompts.size(), ref.size(), "c", "keyword rate", "perplexity");
  for (const auto& r : rows) {
    out["rows"].push_back({{"c", r.c}, {"keyword_rate", r.keyword_rate}, {"perplexity", r.perplexity},
                           {"generations", r.generations}});
    std::printf("%8.3g %14.4f %12.3f   %s\n", r.c, r.keyword_rate, r.perplexity,
                r.generations.empty() ? "" : nlohmann::json(r.generations[0]).dump().substr(0, 70).c_str());
  }
  if (!a.out.empty()) write_file_atomic(a.out, out.dump(1) + "\n");
}

void register_steer_report(CLI::App& app) {
  static Args a;
  auto* cmd = add_model_command(app, "steer-report", "Keyword rate and perplexity when steering with E_c, per c", a.model);
  cmd->add_option("--steer", a.steer, "Steering file {layers, vector} (e.g. from `moedit clusters --vectors`)")->required();
  cmd->add_option("--steer-form", a.form, "3: z + c·v; 4: z + max(z)·c·v; 5: zero v's experts, + max(z)·c·v")
      ->capture_default_str();
  cmd->add_option("--steer-threshold", a.threshold, "Binarise the vector: v ≥ t → 1, else 0 (e.g. 3/E)");
  cmd->add_option("--coefs", a.coefs, "Coefficients c (0: unsteered)")->delimiter(',')->capture_default_str();
  cmd->add_option("--keywords", a.keywords, "Comma-separated keywords (default: the steering file's)");
  cmd->add_option("--prompts", a.prompts, "Prompts, one per line");
  cmd->add_option("--reference", a.reference, "Perplexity texts (default: bundled WikiText-2 test)");
  cmd->add_option("--n-reference", a.n_reference, "Reference lines used")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--new-tokens", a.new_tokens, "Tokens generated per prompt")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--out", a.out, "Write the report as JSON");
  cmd->callback([] { run_steer_report(a); });
}

}  // namespace

MOEDIT_COMMAND(49, register_steer_report)

}  // namespace moedit::cli
