// Aggregation of per-case results, as ROME's experiments/summarize.py does it (spec/rome.md §4.3), plus the MoE
// extras and the human-readable reports (summary.md, distributions.svg).
//
// Per case and prefix (pre/post): {rewrite,paraphrase}_success = mean[NLL_true > NLL_new],
// {rewrite,paraphrase}_diff = mean[e^−NLL_new − e^−NLL_true], neighborhood_success = mean[NLL_true < NLL_new],
// neighborhood_diff = mean[e^−NLL_true − e^−NLL_new], {rewrite,paraphrase,neighborhood}_acc = mean of
// *_prompts_correct, and ngram_entropy / reference_score / essence_score as stored. Over cases: [mean, std]
// (population std, numpy's default), ×100 and rounded to 2 decimals except essence_score and time;
// {pre,post}_score = [hmean(ES, PS, NS) of the rounded means, null], or hmean of the three _acc means when the
// _success keys are absent (zsRE).
#pragma once
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace moedit::eval {

// One case's per-case values, keyed as in the summary ("pre_rewrite_success", ..., "time").
std::map<std::string, double> case_values(const nlohmann::json& c);

// The summary of case JSONs (ROME's keys, "num_cases", and "moe": edited experts, routing overlap of the
// paraphrases with them, paraphrase success split by routing through an edited expert).
nlohmann::json summarize(const std::vector<nlohmann::json>& cases);

// summary.md: the settings and a table of the metrics (pre and post, mean ± std).
std::string summary_markdown(const nlohmann::json& summary, const nlohmann::json& settings);
// distributions.svg: per metric, histograms of the per-case values before and after the edit.
std::string distributions_svg(const std::vector<nlohmann::json>& cases);

}  // namespace moedit::eval
