// moedit trace MODEL --prompt P --subject S: ROME's causal tracing, extended to routed and shared experts.
// moedit trace MODEL --dataset FILE --out DIR: the same over a CounterFact / known-facts file, with averages.
#include <cmath>
#include <cstdio>
#include <filesystem>

#include "cli/commands.h"
#include "cli/ids.h"
#include "io/errors.h"
#include "io/text.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"
#include "tracing/trace.h"

namespace moedit::cli {

namespace {

struct TraceArgs {
  std::string model, prompt, subject, target, ids, subject_range, dataset, out, kinds = "all", noise = "s3",
      noise_file, expert_tokens, tokens;
  int target_id = -1, samples = 10, window = 10, limit = -1, batch_rows = 1024, plots = 200, threads = 0,
      together = 8;
  uint32_t seed = 1;
  bool replace = false, naive = false, json = false, include_wrong = false, no_resume = false;
  double embedding_std = -1;
};

std::pair<int, int> parse_range(const std::string& s) {
  const size_t c = s.find(':');
  try {
    if (c == std::string::npos) throw std::invalid_argument(s);
    size_t u1 = 0, u2 = 0;
    const std::string a = s.substr(0, c), b = s.substr(c + 1);
    const int x = std::stoi(a, &u1), y = std::stoi(b, &u2);
    if (u1 != a.size() || u2 != b.size()) throw std::invalid_argument(s);
    return {x, y};
  } catch (const std::exception&) {
    throw InputError("--subject-range: '" + s + "' is not BEGIN:END (token indices, END exclusive)");
  }
}

// --tokens: subject_last | last | i,j,... (comma list may mix names and indices).
std::vector<int> resolve_tokens(const std::string& spec, int subject_end, int n_tokens) {
  std::vector<int> out;
  for (const std::string& t : split_list(spec)) {
    if (t == "subject_last") out.push_back(subject_end - 1);
    else if (t == "last") out.push_back(n_tokens - 1);
    else if (t == "all") for (int k = 0; k < n_tokens; ++k) out.push_back(k);
    else if (!t.empty()) out.push_back(int(parse_ids(t, "--tokens")[0]));
  }
  if (out.empty()) throw InputError("--tokens: no token given");
  return out;
}

void print_text(const trace::TraceReport& r) {
  std::printf("answer '%s' (id %d, %s)   high %.4f   low %.4f   [%s, %lld restorations, %.2fs]\n",
              r.answer_text.c_str(), r.answer, r.answer_source.c_str(), r.high_score, r.low_score, r.mode.c_str(),
              (long long)r.stats.restorations, r.stats.seconds);
  for (const trace::KindResult& k : r.kinds) {
    double best = -1;
    int bt = -1, bl = -1;
    for (size_t i = 0; i < k.scores.size(); ++i)
      for (size_t l = 0; l < k.scores[i].size(); ++l)
        if (std::isfinite(k.scores[i][l]) && k.scores[i][l] > best) {
          best = k.scores[i][l];
          bt = k.rows[i];
          bl = int(l);
        }
    if (bt < 0) continue;
    std::printf("  %-6s best %.4f at token %d '%s'%s, layer %d", trace::kind_name(k.kind), best, bt,
                r.tokens[size_t(bt)].c_str(), bt >= r.subject_begin && bt < r.subject_end ? "*" : "", bl);
    if (k.kind == trace::Kind::Expert) {
      const size_t ri = size_t(std::find(k.rows.begin(), k.rows.end(), bt) - k.rows.begin());
      std::printf(" (expert %d)", k.dominant[ri][size_t(bl)]);
    }
    std::printf("\n");
  }
}

void register_trace(CLI::App& app) {
  static TraceArgs a;
  auto* cmd = add_model_command(
      app, "trace", "Causal tracing (ROME) for MoE: restore hidden states, attention, MoE blocks, single experts",
      a.model);
  cmd->add_option("--prompt", a.prompt, "Prompt text (needs tokenizer.json in MODEL)");
  cmd->add_option("--subject", a.subject, "Subject string (must occur in the prompt)");
  cmd->add_option("--target", a.target, "Answer text whose first token is measured (default: the clean argmax)");
  cmd->add_option("--ids", a.ids, "Prompt as comma-separated token ids (instead of --prompt)");
  cmd->add_option("--subject-range", a.subject_range, "With --ids: subject tokens BEGIN:END (END exclusive)");
  cmd->add_option("--target-id", a.target_id, "With --ids: answer token id (default: the clean argmax)");
  cmd->add_option("--dataset", a.dataset, "CounterFact or known-facts JSON: trace every record (needs --out)");
  cmd->add_option("--limit", a.limit, "Dataset mode: first N records")->check(CLI::NonNegativeNumber);
  cmd->add_option("--kinds", a.kinds, "Comma list of resid,attn,moe,expert,shared (default: all)");
  cmd->add_option("--samples", a.samples, "Corrupted samples (default 10)")->check(CLI::Range(1, 1000));
  cmd->add_option("--noise", a.noise, "s<F> (F x subject embedding std, default s3), a fixed sigma, or u<F> (uniform)");
  cmd->add_flag("--replace", a.replace, "Replace the subject embeddings by the noise instead of adding it");
  cmd->add_option("--seed", a.seed, "Noise seed: numpy.random.RandomState(seed) (default 1, as ROME)");
  cmd->add_option("--noise-file", a.noise_file, "safetensors with tensor 'noise' [samples, subject_len, hidden]");
  cmd->add_option("--embedding-std", a.embedding_std, "Embedding std for s<F> (default: computed)");
  cmd->add_option("--window", a.window, "Layers restored together by attn/moe (default 10)")->check(CLI::Range(1, 4096));
  cmd->add_option("--expert-tokens", a.expert_tokens,
                  "Tokens for the expert kind: 'all' or comma-separated indices (default: last subject token, last)");
  cmd->add_option("--tokens", a.tokens,
                  "Rows of resid/attn/moe/shared: 'subject_last', 'last' or comma-separated indices (default: all)");
  cmd->add_flag("--naive", a.naive, "Re-run the whole model for every restoration (reference mode)");
  cmd->add_option("--batch-rows", a.batch_rows, "Packed rows per forward (default 1024; 0 = one restoration each)");
  cmd->add_option("--threads", a.threads, "Compute threads (default: all; 1 is faster for tiny models on a busy machine)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_flag("--json", a.json, "Print the result as JSON on stdout");
  cmd->add_option("--out", a.out, "Write JSON per kind, SVG heatmaps, expert chart and report.html to DIR");
  cmd->add_flag("--include-wrong", a.include_wrong, "Dataset mode: average facts the model gets wrong too");
  cmd->add_option("--plots", a.plots, "Dataset mode: per-fact figures for the first N facts (default 200)");
  cmd->add_flag("--no-resume", a.no_resume, "Dataset mode: re-trace facts already in DIR/cases");
  cmd->add_option("--together", a.together,
                  "Dataset mode: facts traced together — shared forwards and batches, same scores (default 8)")
      ->check(CLI::Range(1, 4096));
  cmd->callback([] {
    trace::TraceOptions o;
    o.kinds = trace::parse_kinds(a.kinds);
    o.samples = a.samples;
    o.noise = a.noise;
    trace::parse_noise_rule(o.noise);  // validate early
    o.replace = a.replace;
    o.seed = a.seed;
    o.noise_file = a.noise_file;
    if (!o.noise_file.empty() && !std::filesystem::exists(o.noise_file))
      throw InputError("--noise-file: " + o.noise_file + " does not exist");
    o.embedding_std = a.embedding_std;
    if (a.embedding_std >= 0) o.embedding_std_source = "--embedding-std";
    o.window = a.window;
    o.naive = a.naive;
    o.batch_rows = a.batch_rows;
    o.threads = a.threads;
    o.progress = true;
    if (a.expert_tokens == "all") {
      o.expert_all_tokens = true;
    } else if (!a.expert_tokens.empty()) {
      for (int32_t t : parse_ids(a.expert_tokens, "--expert-tokens")) o.expert_tokens.push_back(int(t));
    }
    const int modes = int(!a.prompt.empty()) + int(!a.ids.empty()) + int(!a.dataset.empty());
    if (!a.tokens.empty() && !a.dataset.empty()) throw InputError("--tokens: dataset mode traces every token");
    if (modes != 1) throw InputError("give exactly one of --prompt/--subject, --ids/--subject-range or --dataset");

    auto m = load_model(a.model);
    bool has_shared = false;
    for (const auto& l : m->weights().layers) has_shared = has_shared || (l.ffn.moe && l.ffn.has_shared);
    if (a.kinds != "all" && !has_shared &&
        std::find(o.kinds.begin(), o.kinds.end(), trace::Kind::Shared) != o.kinds.end())
      throw InputError("--kinds shared: " + a.model + " has no shared expert");

    if (!a.dataset.empty()) {
      if (a.out.empty()) throw InputError("--dataset needs --out DIR");
      const Tokenizer tok = Tokenizer::from_file(a.model);
      trace::DatasetOptions d;
      d.limit = a.limit;
      d.out_dir = a.out;
      d.plots = a.plots;
      d.resume = !a.no_resume;
      d.together = a.together;
      d.only_correct = !a.include_wrong;
      const trace::DatasetSummary s = trace::trace_dataset(*m, tok, a.dataset, o, d);
      if (a.json) {
        std::printf("%s\n", s.json.dump().c_str());
      } else {
        std::printf("%d facts: %d traced, %d correctly predicted, %d skipped; summary in %s/summary.json, report %s/report.html\n",
                    s.facts, s.traced, s.correct, s.skipped, a.out.c_str(), a.out.c_str());
        if (s.json.contains("average_total_effect") && s.json["average_total_effect"].is_number())
          std::printf("average total effect %.4f\n", s.json["average_total_effect"].get<double>());
        for (auto& [k, kj] : s.json["kinds"].items()) {
          const auto& bs = kj["best_aie_last_subject"];
          const auto& bl = kj["best_aie_last_token"];
          if (bs["aie"].is_number() && bl["aie"].is_number())
            std::printf("  %-6s best AIE at last subject token %.4f (layer %d), at last token %.4f (layer %d)\n",
                        k.c_str(), bs["aie"].get<double>(), bs["layer"].get<int>(), bl["aie"].get<double>(),
                        bl["layer"].get<int>());
        }
      }
      return;
    }

    trace::TraceReport r;
    if (!a.prompt.empty()) {
      if (a.subject.empty()) throw InputError("--prompt needs --subject");
      if (!a.subject_range.empty() || a.target_id >= 0) throw InputError("--subject-range/--target-id go with --ids");
      const Tokenizer tok = Tokenizer::from_file(a.model);
      if (!a.tokens.empty()) {
        std::vector<int32_t> ids;
        const auto [b, e] = trace::locate_subject(tok, a.prompt, a.subject, &ids);
        o.tokens = resolve_tokens(a.tokens, e, int(ids.size()));
      }
      r = trace::trace_fact(*m, tok, {a.prompt, a.subject, a.target, "", ""}, o);
    } else {
      if (a.subject_range.empty()) throw InputError("--ids needs --subject-range BEGIN:END");
      if (!a.subject.empty() || !a.target.empty()) throw InputError("--subject/--target go with --prompt");
      trace::TraceInput in;
      in.ids = parse_ids(a.ids);
      std::tie(in.subject_begin, in.subject_end) = parse_range(a.subject_range);
      in.target = a.target_id;
      if (!a.tokens.empty()) o.tokens = resolve_tokens(a.tokens, in.subject_end, int(in.ids.size()));
      r = trace::trace_ids(*m, in, o);
      r.answer_text = std::to_string(r.answer);
    }
    if (!a.out.empty()) trace::write_trace_outputs(r, a.out);
    if (a.json)
      std::printf("%s\n", trace::report_json(r).dump().c_str());
    else
      print_text(r);
    if (!a.out.empty() && !a.json) std::printf("wrote %s/trace_report.html\n", a.out.c_str());
  });
}

}  // namespace

MOEDIT_COMMAND(50, register_trace)

}  // namespace moedit::cli
