// moedit experts MODEL: expert-level routing statistics. Exactly one mode:
//   (--text T | --ids 1,2,3 | --corpus FILE)    activation profile: layers × experts frequency (+ load for a corpus)
//   --compare FILE_A FILE_B                     which experts one corpus uses more than the other
//   --domain NAME=FILE (twice or more)          domain experts (entropy-based)
//   --drivers FILE                              driver experts (causal: mask or scale each router logit, KL)
//   --triggers L:E,... with --text/--ids/--corpus  tokens that activate those experts (count, lift), position rates
//   --examples N with --text/--ids/--corpus --out F  every expert's N top-activating contexts + keywords (JSONL)
//   --context-faithful --data TASK [--base BASE] [--out CE.json]   Router Lens's context-faithful (CE) experts: the
//                                               --top K (default: the model's top-k) most activated per MoE layer
//                                               on a context task, vs the base model's (OE); with --score or
//                                               --mask-set ce|oe --experts CE.json, the task score (EM, p(answer))
//                                               unmasked and with that set masked (eval/context_task_eval.h)
// Output: a table, or --format json|csv|npy (npy/csv: the profile's frequency matrix; npy needs --out).
// Corpora: see load_corpus in tracing/routing_profile.h (.ids lines of token ids need no tokenizer).
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>

#include "cli/commands.h"
#include "cli/common.h"
#include "cli/ids.h"
#include "cli/interventions.h"
#include "datasets/context_task.h"
#include "eval/context_task_eval.h"
#include "io/errors.h"
#include "io/files.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"
#include "tracing/expert_triggers.h"
#include "tracing/routing_profile.h"

namespace moedit::cli {

namespace {

struct Args {
  std::string model, text, ids, corpus, drivers, format = "table", out, perturb = "mask", triggers, svg;
  int examples = 0, context = 12;
  std::vector<std::string> compare, domains;
  std::vector<int> layers;
  bool as_json = false;
  int top = 10, max_seq_len = 128, max_docs = 0, batch_tokens = 4096;
  int64_t max_tokens = 100000;
  double min_score = 0.2, min_rate = 0.0;
  float scale = 0.f;
  InterventionSpec iv;
  bool context_faithful = false, score = false;
  std::string data, base, experts_file, mask_set;
};

// Prints text to stdout, or writes it to --out.
void emit(const Args& a, const std::string& text) {
  if (a.out.empty()) std::printf("%s", text.c_str());
  else write_file_atomic(a.out, text);
}

// --triggers: which tokens activate the given experts, and where in a sequence.
void run_triggers(const Args& a, const std::string& fmt, const Model& m, const Tokenizer* tok,
                  const std::vector<std::vector<int32_t>>& seqs, const RoutingOptions& ro) {
  TriggerOptions o;
  o.top = a.top;
  o.routing = ro;
  const auto ts = expert_triggers(m, seqs, parse_mask_spec(a.triggers, "--triggers"), o);
  std::vector<std::string> pieces;
  if (tok)
    for (int id = 0; id < m.config().vocab_size; ++id) pieces.push_back(tok->id_to_token(id));
  if (!a.svg.empty()) write_file_atomic(a.svg, triggers_svg(ts, "Expert activation rate by token position"));
  if (fmt == "json") {
    nlohmann::json j = {{"model", a.model}, {"interventions", describe(a.iv)}, {"experts", triggers_json(ts, pieces)}};
    emit(a, j.dump() + "\n");
    return;
  }
  std::string out;
  char b[256];
  for (const auto& t : ts) {
    std::snprintf(b, sizeof b, "layer %d expert %d: active on %lld of %lld tokens (%.1f%%)\n  %-16s %8s %8s %7s\n",
                  t.layer, t.expert, static_cast<long long>(t.active), static_cast<long long>(t.tokens),
                  t.tokens ? 100.0 * double(t.active) / double(t.tokens) : 0.0, "token", "count", "seen", "lift");
    out += b;
    for (const auto& k : t.top) {
      const std::string piece = size_t(k.id) < pieces.size() ? pieces[size_t(k.id)] : std::to_string(k.id);
      std::snprintf(b, sizeof b, "  %-16s %8lld %8lld %7.2f\n", piece.c_str(), static_cast<long long>(k.count),
                    static_cast<long long>(k.occurrences), k.lift);
      out += b;
    }
    out += "  rate by position:";
    for (size_t p = 0; p < t.tokens_at.size() && p < 12; ++p) {
      std::snprintf(b, sizeof b, " %zu:%.2f", p, t.rate_at(p));
      out += b;
    }
    out += "\n  rate by relative position (tenths):";
    for (size_t r = 0; r < t.tokens_rel.size(); ++r) {
      std::snprintf(b, sizeof b, " %.2f", t.rate_rel(r));
      out += b;
    }
    out += "\n";
  }
  emit(a, out);
}

// --examples N: one JSONL line per expert with its top-activating contexts and keywords.
void run_examples(const Args& a, const Model& m, const Tokenizer* tok, const std::vector<std::vector<int32_t>>& seqs,
                  const RoutingOptions& ro) {
  const auto xs = expert_examples(m, seqs, a.examples, 10, ro);
  auto text = [&](const std::vector<int32_t>& ids) {
    if (tok) return tok->decode(ids);
    std::string s;
    for (size_t i = 0; i < ids.size(); ++i) s += (i ? "," : "") + std::to_string(ids[i]);
    return s;
  };
  std::string out;
  for (const auto& x : xs) {
    nlohmann::json j = {{"layer", x.layer}, {"expert", x.expert}, {"active_tokens", x.active}};
    j["examples"] = nlohmann::json::array();
    for (const auto& ex : x.top) {
      const auto& s = seqs[size_t(ex.seq)];
      const size_t b = size_t(std::max(0, ex.pos - a.context)), e = std::min(s.size(), size_t(ex.pos) + 3);
      j["examples"].push_back({{"sequence", ex.seq}, {"position", ex.pos}, {"weight", ex.weight},
                               {"before", text({s.begin() + long(b), s.begin() + ex.pos})},
                               {"token", text({s[size_t(ex.pos)]})},
                               {"after", text({s.begin() + ex.pos + 1, s.begin() + long(e)})}});
    }
    j["keywords"] = nlohmann::json::array();
    for (const auto& [id, n] : x.keywords) j["keywords"].push_back({{"token", text({id})}, {"count", n}});
    out += j.dump() + "\n";
  }
  write_file_atomic(a.out, out);
  std::printf("%zu experts, up to %d contexts each → %s\n", xs.size(), a.examples, a.out.c_str());
}

// --context-faithful: CE experts (counting) or the task score with a CE/OE set masked (scoring).
void run_context_faithful(const Args& a, const std::string& fmt, bool top_given) {
  require_input(!a.data.empty(), "--context-faithful needs --data FILE (a context task, datasets/data/context_task/)");
  require_input(a.mask_set.empty() == a.experts_file.empty(), "--mask-set ce|oe and --experts CE.json go together");
  const bool scoring = a.score || !a.mask_set.empty();
  require_input(!scoring || a.base.empty(), "--base is for counting experts; --score and --mask-set run one model");
  const std::vector<ContextExample> examples = load_context_task(a.data);
  std::vector<ExpertRef> masked;
  if (!a.mask_set.empty()) masked = eval::read_expert_set(a.experts_file, a.mask_set);
  auto m = load_model(a.model);
  const Tokenizer tok = require_tokenizer(a.model, "--context-faithful tokenizes the task");
  const std::vector<eval::TaskItem> items = eval::tokenize_task(examples, tok, a.data);
  if (!a.iv.empty()) validate_interventions(a.iv, m->config());
  if (scoring) {
    auto score = [&](const InterventionSpec& spec) {
      Hooks hooks;
      if (!spec.empty()) install_interventions(spec, m->config(), hooks);
      return eval::score_task(*m, items, &hooks, tok.eos_id().value_or(-1), a.batch_tokens);
    };
    auto line = [](const std::string& what, const eval::TaskScore& s) { return what + ": " + s.line() + "\n"; };
    const eval::TaskScore plain = score(a.iv);
    nlohmann::json j = {{"model", a.model}, {"data", a.data}, {"interventions", describe(a.iv)},
                        {"score", plain.summary()}, {"per_example", plain.examples_json(items, tok)}};
    std::string text = line(a.model + " on " + a.data + (a.iv.empty() ? "" : " with " + describe(a.iv)), plain);
    if (!a.mask_set.empty()) {
      InterventionSpec spec = a.iv;
      spec.mask_flag = "--experts " + a.experts_file + " (" + a.mask_set + ")";
      spec.mask.insert(spec.mask.end(), masked.begin(), masked.end());
      const eval::TaskScore s = score(spec);
      j["masked"] = {
          {"set", a.mask_set}, {"experts", a.experts_file}, {"mask", describe(spec)}, {"score", s.summary()},
          {"per_example", s.examples_json(items, tok)}};
      text += line("with the " + std::to_string(masked.size()) + " " + a.mask_set + " experts of " + a.experts_file +
                       " masked",
                   s);
    }
    emit(a, fmt == "json" ? j.dump() + "\n" : text);
    return;
  }
  RoutingOptions ro;
  ro.interventions = a.iv.empty() ? nullptr : &a.iv;
  ro.max_batch_tokens = a.batch_tokens;
  ro.progress = stderr_counter("routing");
  const int K = top_given ? a.top : m->config().top_k;
  const ActivationProfile tuned = eval::count_task_experts(*m, items, ro);
  std::optional<ActivationProfile> base;
  if (!a.base.empty()) {
    m.reset();
    m = load_model(a.base);
    if (!a.iv.empty()) validate_interventions(a.iv, m->config());
    base = eval::count_task_experts(*m, items, ro);
  }
  nlohmann::json j = eval::context_faithful_json(tuned, base ? &*base : nullptr, K);
  j["model"] = a.model;
  j["data"] = a.data;
  j["examples"] = items.size();
  j["interventions"] = describe(a.iv);
  if (base) j["base"] = a.base;
  if (!a.out.empty()) write_file_atomic(a.out, j.dump(1) + "\n");
  if (fmt == "json") std::printf("%s\n", j.dump().c_str());
  else std::printf("%s", eval::context_faithful_table(j).c_str());
}

void register_experts(CLI::App& app) {
  static Args a;
  auto* cmd = add_model_command(
      app, "experts", "Expert statistics: activation profiles, corpus comparison, domain and driver experts", a.model);
  auto* text = cmd->add_option("--text", a.text, "Profile: one text (needs the model's tokenizer.json)");
  auto* ids = cmd->add_option("--ids", a.ids, "Profile: one sequence of comma-separated token ids");
  auto* corpus = cmd->add_option("--corpus", a.corpus, "Profile: a corpus file (.txt/.raw lines, .jsonl, .json, .ids)")
                     ->check(CLI::ExistingFile);
  auto* compare = cmd->add_option("--compare", a.compare, "Compare two corpora: FILE_A FILE_B")
                      ->expected(2)
                      ->check(CLI::ExistingFile);
  auto* domain = cmd->add_option("--domain", a.domains, "Domain text set NAME=FILE (repeat for each domain, ≥ 2)")
                     ->expected(1)
                     ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  auto* drivers = cmd->add_option("--drivers", a.drivers, "Driver experts over this text set (causal, KL)")
                      ->check(CLI::ExistingFile);
  for (auto* o : {text, ids, corpus, compare, domain, drivers})
    for (auto* p : {text, ids, corpus, compare, domain, drivers})
      if (o != p) o->excludes(p);
  cmd->add_option("--format", a.format, "table | json | csv | npy (csv/npy: profile only; npy needs --out)")
      ->check(CLI::IsMember({"table", "json", "csv", "npy"}));
  cmd->add_flag("--json", a.as_json, "Same as --format json");
  cmd->add_option("--out", a.out, "Write the output to this file instead of stdout");
  static CLI::Option* top_opt = nullptr;
  top_opt = cmd->add_option("--top", a.top, "How many experts to list per group (--context-faithful: CE experts per "
                                            "layer, default the model's top-k)")
                ->check(CLI::Range(1, 1 << 20));
  static CLI::Option* max_tokens_opt = nullptr;
  max_tokens_opt = cmd->add_option("--max-tokens", a.max_tokens,
                                   "Read at most this many tokens of each corpus (0: all; default 100000, "
                                   "--drivers 4096)")
      ->check(CLI::Range(int64_t(0), int64_t(1) << 40));
  cmd->add_option("--max-seq-len", a.max_seq_len, "Cut documents into sequences of at most this many tokens")
      ->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--max-docs", a.max_docs, "Read at most this many documents of each corpus (0: all)")
      ->check(CLI::Range(0, 1 << 30));
  cmd->add_option("--batch-tokens", a.batch_tokens, "Tokens per forward call")->check(CLI::Range(1, 1 << 24));
  cmd->add_option("--min-score", a.min_score, "Domain experts: certainty-weighted score threshold")
      ->check(CLI::Range(0.0, 1.0));
  cmd->add_option("--min-rate", a.min_rate, "Domain experts: minimum activation rate in the preferred domain")
      ->check(CLI::Range(0.0, 1e9));
  cmd->add_option("--perturb", a.perturb, "Driver experts: mask (logit → −inf) or scale (logit × --scale)")
      ->check(CLI::IsMember({"mask", "scale"}));
  cmd->add_option("--scale", a.scale, "Driver experts: the factor for --perturb scale");
  cmd->add_option("--layers", a.layers, "Driver experts: only these MoE layers (comma-separated)")->delimiter(',');
  cmd->add_option("--triggers", a.triggers,
                  "Token triggers and position rates of these experts (L:E,...) on --text/--ids/--corpus");
  cmd->add_option("--svg", a.svg, "--triggers: also write the activation rate by position as an SVG heatmap");
  cmd->add_option("--examples", a.examples,
                  "Each expert's N top-activating contexts as JSONL (for labelling experts elsewhere), with keywords")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--context", a.context, "--examples: tokens of context before the token (2 after)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  auto* cf = cmd->add_flag("--context-faithful", a.context_faithful,
                           "Context-faithful experts (Router Lens) on --data: counts, or the score with --score / "
                           "--mask-set");
  for (auto* o : {text, ids, corpus, compare, domain, drivers}) cf->excludes(o);
  cmd->add_option("--data", a.data, "--context-faithful: the context task (JSON list of {context, question, answer})");
  cmd->add_option("--base", a.base, "--context-faithful: also count on this base model (OE experts, comparison)");
  cmd->add_flag("--score", a.score, "--context-faithful: the task score (EM, p(first answer token)) instead of counts");
  cmd->add_option("--mask-set", a.mask_set, "--context-faithful: score with this set of --experts masked")
      ->check(CLI::IsMember({"ce", "oe"}));
  cmd->add_option("--experts", a.experts_file, "--context-faithful: a CE file (written by --out)");
  add_intervention_flags(cmd, a.iv);

  cmd->callback([] {
    const std::string fmt = a.as_json ? "json" : a.format;
    if (!a.context_faithful && (!a.data.empty() || !a.base.empty() || a.score || !a.mask_set.empty() ||
                                !a.experts_file.empty()))
      throw InputError("--data, --base, --score, --mask-set and --experts need --context-faithful");
    if (a.context_faithful) {
      require_input(fmt == "table" || fmt == "json", "--context-faithful prints a table or JSON (--format table|json)");
      run_context_faithful(a, fmt, top_opt->count() > 0);
      return;
    }
    const bool profile_mode = !a.text.empty() || !a.ids.empty() || !a.corpus.empty();
    if (a.examples > 0 && (!profile_mode || a.out.empty()))
      throw InputError("--examples needs texts (--text, --ids or --corpus) and --out FILE.jsonl");
    if (!a.triggers.empty() && !profile_mode)
      throw InputError("--triggers needs the texts to count on: --text, --ids or --corpus");
    if (!a.triggers.empty() && (fmt == "csv" || fmt == "npy"))
      throw InputError("--triggers prints a table or JSON (--format table|json)");
    if (!profile_mode && a.compare.empty() && a.domains.empty() && a.drivers.empty())
      throw InputError("experts: give one of --text, --ids, --corpus, --compare, --domain, --drivers");
    if ((fmt == "csv" || fmt == "npy") && !profile_mode)
      throw InputError("--format " + fmt + " is for activation profiles (--text, --ids, --corpus)");
    if (fmt == "npy" && a.out.empty()) throw InputError("--format npy needs --out FILE");
    auto m = load_model(a.model);
    const ModelConfig& c = m->config();
    if (a.iv.empty() == false) validate_interventions(a.iv, c);
    const std::optional<Tokenizer> tok = model_tokenizer(a.model);
    CorpusOptions co;
    co.max_seq_len = a.max_seq_len;
    // Driver experts run the model once per expert: a smaller default text budget.
    co.max_tokens = !a.drivers.empty() && max_tokens_opt->count() == 0 ? 4096 : a.max_tokens;
    co.max_docs = a.max_docs;
    RoutingOptions ro;
    ro.interventions = a.iv.empty() ? nullptr : &a.iv;
    ro.max_batch_tokens = a.batch_tokens;
    ro.progress = stderr_counter("routing");
    auto corpus_of = [&](const std::string& path) { return load_corpus(path, tok ? &*tok : nullptr, co); };

    if (profile_mode) {
      std::vector<std::vector<int32_t>> seqs;
      if (!a.ids.empty()) seqs.push_back(parse_ids(a.ids));
      else if (!a.text.empty()) {
        if (!tok) throw InputError(a.model + ": no tokenizer.json (--text needs one; use --ids)");
        seqs.push_back(tok->encode(a.text).ids);
        if (seqs[0].empty()) throw InputError("--text: the text encodes to no tokens");
      } else {
        seqs = corpus_of(a.corpus);
      }
      if (!a.triggers.empty()) {
        run_triggers(a, fmt, *m, tok ? &*tok : nullptr, seqs, ro);
        return;
      }
      if (a.examples > 0) {
        run_examples(a, *m, tok ? &*tok : nullptr, seqs, ro);
        return;
      }
      const ActivationProfile p = activation_profile(*m, seqs, ro);
      if (fmt == "npy") p.write_npy(a.out);
      else if (fmt == "csv") emit(a, p.to_csv());
      else if (fmt == "json") {
        nlohmann::json j = p.to_json();
        j["model"] = a.model;
        j["interventions"] = describe(a.iv);
        j["sequences"] = seqs.size();
        emit(a, j.dump() + "\n");
      } else {
        emit(a, p.table());
      }
      return;
    }
    if (!a.compare.empty()) {
      const ActivationProfile pa = activation_profile(*m, corpus_of(a.compare[0]), ro);
      const ActivationProfile pb = activation_profile(*m, corpus_of(a.compare[1]), ro);
      const ProfileComparison cmp = compare_profiles(pa, pb, a.compare[0], a.compare[1]);
      if (fmt == "json") {
        nlohmann::json j = cmp.to_json(a.top);
        j["model"] = a.model;
        j["interventions"] = describe(a.iv);
        j["profile_a"] = pa.to_json();
        j["profile_b"] = pb.to_json();
        emit(a, j.dump() + "\n");
      } else {
        emit(a, cmp.table(a.top));
      }
      return;
    }
    if (!a.domains.empty()) {
      if (a.domains.size() < 2) throw InputError("--domain: give at least two text sets (NAME=FILE each)");
      std::vector<std::string> names;
      std::vector<ActivationProfile> profiles;
      for (const auto& d : a.domains) {
        const size_t eq = d.find('=');
        const std::string name = eq == std::string::npos ? std::filesystem::path(d).stem().string() : d.substr(0, eq);
        const std::string file = eq == std::string::npos ? d : d.substr(eq + 1);
        if (name.empty()) throw InputError("--domain: '" + d + "' has an empty name");
        if (!std::filesystem::is_regular_file(file)) throw InputError("--domain: " + file + ": no such file");
        for (const auto& n : names)
          if (n == name) throw InputError("--domain: the name '" + name + "' is given twice");
        names.push_back(name);
        profiles.push_back(activation_profile(*m, corpus_of(file), ro));
      }
      const DomainAnalysis da = domain_experts(names, profiles, a.min_score, a.min_rate);
      if (fmt == "json") {
        nlohmann::json j = da.to_json();
        j["model"] = a.model;
        j["interventions"] = describe(a.iv);
        emit(a, j.dump() + "\n");
      } else {
        emit(a, da.table(a.top));
      }
      return;
    }
    // Driver experts.
    DriverOptions d;
    d.kind = a.perturb == "scale" ? Perturbation::Scale : Perturbation::Mask;
    d.scale = a.scale;
    d.interventions = ro.interventions;
    d.max_batch_tokens = std::min(a.batch_tokens, 2048);
    d.layers = a.layers;
    d.progress = stderr_counter("experts perturbed");
    const DriverAnalysis da = driver_experts(*m, corpus_of(a.drivers), d);
    if (fmt == "json") {
      nlohmann::json j = da.to_json(0);
      j["model"] = a.model;
      j["interventions"] = describe(a.iv);
      emit(a, j.dump() + "\n");
    } else {
      emit(a, da.table(a.top));
    }
  });
}

}  // namespace

MOEDIT_COMMAND(46, register_experts)

}  // namespace moedit::cli
