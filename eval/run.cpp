#include "eval/run.h"
#include "io/files.h"

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <stdexcept>

#include "eval/curve.h"
#include "eval/drift_probe.h"
#include "eval/edit_step.h"
#include "eval/sequential_state.h"
#include "eval/summary.h"
#include "io/errors.h"

namespace moedit::eval {
using json = nlohmann::json;
namespace fs = std::filesystem;

std::string case_path(const std::string& dir, int case_id) {
  return dir + "/cases/case_" + std::to_string(case_id) + ".json";
}

namespace {

json read_json(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw InputError(path + ": cannot open");
  json j = json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) throw InputError(path + ": not valid JSON");
  return j;
}

// Settings that must agree between a run and its resumption or its sibling shards.
json comparable(json s) {
  for (const char* k : {"shard", "limit", "out"}) s.erase(k);
  return s;
}

std::vector<json> read_cases(const std::string& dir, const std::vector<int>* ids) {
  std::vector<std::pair<int, json>> found;
  if (ids) {
    for (const int id : *ids)
      if (fs::exists(case_path(dir, id))) found.emplace_back(id, read_json(case_path(dir, id)));
  } else if (fs::exists(dir + "/cases")) {
    for (const auto& e : fs::directory_iterator(dir + "/cases")) {
      const std::string name = e.path().filename().string();
      if (!name.starts_with("case_") || !name.ends_with(".json")) continue;  // skips *.tmp.<pid> leftovers
      json j = read_json(e.path().string());
      found.emplace_back(j.at("case_id").get<int>(), std::move(j));
    }
  }
  std::sort(found.begin(), found.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<json> out;
  for (auto& [id, j] : found) out.push_back(std::move(j));
  return out;
}

// A case without its wall-clock entries (what two runs of the same case must agree on).
json without_timing(json c) {
  c.erase("time");
  if (c.contains("edit")) {
    c["edit"].erase("seconds");
    c["edit"].erase("vstar_seconds");
  }
  return c;
}

json requested_rewrite(const EvalRecord& r) {
  return {{"prompt", r.prompt},
          {"subject", r.subject},
          {"relation_id", r.relation_id},
          {"target_new", {{"str", r.target_new}, {"id", r.target_new_id}}},
          {"target_true", {{"str", r.target_true}, {"id", r.target_true_id}}}};
}

// FNV-1a over the values (widened to fp32) of the down-projections (routed and shared) of the given layers.
uint64_t fingerprint(const Model& m, const std::set<int>& layers) {
  uint64_t h = 1469598103934665603ULL;
  std::vector<float> row;
  auto mix = [&](const std::vector<Weight>& bank) {
    for (const Weight& w : bank)
      for (int64_t r = 0; r < w.rows(); ++r) {
        row.resize(size_t(w.cols()));
        w.row(r, row.data());
        const auto* p = reinterpret_cast<const unsigned char*>(row.data());
        for (size_t i = 0; i < row.size() * sizeof(float); ++i) h = (h ^ p[i]) * 1099511628211ULL;
      }
  };
  for (const int l : layers) {
    const FFNWeights& f = m.weights().layers[size_t(l)].ffn;
    mix(f.experts.down);
    if (f.has_shared) mix(f.shared.down);
  }
  return h;
}

// The edits of a run (ROME one record at a time, or batches), the scoring around them and the case files.
class Evaluator {
 public:
  Evaluator(Model& m, const Tokenizer& tok, const RunOptions& opt)
      : m_(m), tok_(tok), opt_(opt), layers_(edited_layers(opt.edit, opt.batch)) {
    wiki_ = wikitext_windows(tok, opt.drift_tokens);
  }

  CaseMetrics metrics(const EvalRecord& rec) const {
    CaseMetricsOptions o;
    o.layer = routing_layer(opt_.edit, opt_.batch);
    o.generation = opt_.generation_interval > 0 && rec.case_id % opt_.generation_interval == 0;
    o.gen = opt_.gen;
    o.snippets = opt_.snippets;
    o.tfidf = opt_.tfidf;
    return case_metrics(m_, tok_, rec, o);
  }
  // One step over `recs` (one record for ROME); `keep_keys`: AlphaEdit's earlier-batch keys carry over (sequential).
  EditStep edit(const std::vector<const EvalRecord*>& recs, bool keep_keys) {
    if (opt_.batch) return EditStep::batch(m_, tok_, recs, *opt_.batch, templates_, keep_keys ? &keys_ : nullptr);
    return EditStep::rome(m_, tok_, *recs[0], opt_.edit, templates_);
  }
  uint64_t fingerprint() const { return eval::fingerprint(m_, layers_); }
  void check_revert(uint64_t before, int case_id) const {
    if (fingerprint() != before)
      throw std::runtime_error("case " + std::to_string(case_id) +
                               ": the weights differ from the clean model after the revert");
  }
  json case_json(const EditStep& s, size_t i, const CaseMetrics& pre, const CaseMetrics& post,
                 const json& drift) const {
    const EvalRecord& rec = s.record(i);
    json c = {{"case_id", rec.case_id},
              {"requested_rewrite", requested_rewrite(rec)},
              {"time", s.seconds() / double(s.size())},  // a batch's wall time shared by its records
              {"pre", pre.values},
              {"post", post.values},
              {"edit", s.edit_json(i)},
              {"moe", s.moe_json(i, pre, post)}};
    if (!drift.empty()) c["routing_drift"] = drift;
    return c;
  }
  // The records' neighbourhood prompts (routing drift).
  Sequences neighbourhood(const std::vector<const EvalRecord*>& recs) const {
    Sequences seqs;
    for (const auto* r : recs)
      for (const auto& p : r->neighborhood_prompts) seqs.push_back(tok_.encode_ids(p, true));
    return seqs;
  }
  const Sequences& wiki() const { return wiki_; }
  // What a sequential run's state carries over (eval/sequential_state.h).
  std::vector<std::string>& templates() { return templates_; }
  KeyCache& keys() { return keys_; }

 private:
  Model& m_;
  const Tokenizer& tok_;
  const RunOptions& opt_;
  std::set<int> layers_;
  Sequences wiki_;
  std::vector<std::string> templates_;  // sampled once from the clean model
  KeyCache keys_;                       // AlphaEdit, sequential: Σ K Kᵀ of the batches so far
};

// {"neighborhood": drift, "wikitext": drift} of the probes that have prompts.
json drift_entry(const Model& m, const DriftProbe& neigh, const DriftProbe& wiki) {
  json d = json::object();
  if (!neigh.empty()) d["neighborhood"] = drift_json(neigh.measure(m));
  if (!wiki.empty()) d["wikitext"] = drift_json(wiki.measure(m));
  return d;
}

void prepare_dir(const RunOptions& opt, const std::vector<int>& ids) {
  fs::create_directories(opt.out_dir + "/cases");
  const std::string sp = opt.out_dir + "/settings.json";
  if (fs::exists(sp)) {
    if (!opt.resume) {
      for (const int id : ids)
        if (fs::exists(case_path(opt.out_dir, id)))
          throw InputError(opt.out_dir + " already holds results of a run; pass --resume to continue it or choose "
                                         "another --out");
    } else if (comparable(read_json(sp)) != comparable(opt.settings)) {
      throw InputError(sp + ": the run in " + opt.out_dir +
                       " used different settings; --resume needs the same model, dataset and options");
    }
  }
  write_file_atomic(sp, opt.settings.dump(2) + "\n");
}

// The records in steps of batch_size (one for ROME).
std::vector<std::vector<const EvalRecord*>> chunks(const std::vector<const EvalRecord*>& recs, int size) {
  std::vector<std::vector<const EvalRecord*>> out;
  for (size_t b = 0; b < recs.size(); b += size_t(size))
    out.emplace_back(recs.begin() + long(b), recs.begin() + long(std::min(recs.size(), b + size_t(size))));
  return out;
}

// Independent steps: each on the clean model, scored before and after, reverted (checked bit for bit).
void run_independent(Evaluator& ev, Model& m, const std::vector<const EvalRecord*>& recs, const RunOptions& opt,
                     RunResult& res) {
  const DriftProbe wiki(m, ev.wiki());
  size_t done = 0;
  for (const auto& chunk : chunks(recs, opt.batch_size)) {
    const bool have = std::all_of(chunk.begin(), chunk.end(),
                                  [&](const auto* r) { return fs::exists(case_path(opt.out_dir, r->case_id)); });
    if (opt.resume && have) {
      res.skipped += int(chunk.size());
    } else {
      const uint64_t clean = ev.fingerprint();
      std::vector<CaseMetrics> pre;
      for (const auto* r : chunk) pre.push_back(ev.metrics(*r));
      const DriftProbe neigh(m, ev.neighbourhood(chunk));
      const EditStep step = ev.edit(chunk, false);
      std::vector<CaseMetrics> post;
      for (const auto* r : chunk) post.push_back(ev.metrics(*r));
      const json drift = drift_entry(m, neigh, wiki);
      step.revert(m);
      ev.check_revert(clean, chunk.front()->case_id);
      for (size_t i = 0; i < chunk.size(); ++i)
        write_file_atomic(case_path(opt.out_dir, chunk[i]->case_id),
                          ev.case_json(step, i, pre[i], post[i], drift).dump(1) + "\n");
      res.evaluated += int(chunk.size());
    }
    done += chunk.size();
    if (opt.progress) opt.progress(int(done), int(recs.size()));
  }
}

// Sequential steps: the edits accumulate. After every `sequential_every` edits and after the last, all cases
// edited so far are re-scored on the current model; each point also gets the routing drift against the clean
// model (every record's neighbourhood prompts, the WikiText-2 sample) and the WikiText-2 perplexity, and the run's
// state is saved (eval/sequential_state.h). --resume loads the last state and goes on from there. Returns the
// points; at the end every step is reverted (checked bit for bit).
json run_sequential(Model& m, Evaluator& ev, const std::vector<const EvalRecord*>& recs, const RunOptions& opt,
                    RunResult& res) {
  const uint64_t clean = ev.fingerprint();
  std::vector<CaseMetrics> pre;
  for (const auto* r : recs) pre.push_back(ev.metrics(*r));
  const DriftProbe neigh(m, ev.neighbourhood(recs)), wiki(m, ev.wiki());
  json curve = json::array();
  json start = {{"edits", 0}};
  if (!ev.wiki().empty()) start["perplexity_wikitext"] = windows_perplexity(m, ev.wiki());
  curve.push_back(start);
  std::vector<EditStep> applied;
  std::vector<json> cases;
  std::set<std::pair<int, int>> touched;
  std::map<std::pair<int, int>, std::vector<float>> resumed_clean;  // what the loaded state replaced
  size_t done = 0;
  double seconds = 0;
  fs::create_directories(opt.out_dir + "/sequential");
  if (opt.resume) {
    if (auto st = load_sequential_state(opt.out_dir)) {
      const std::string path = sequential_state_path(opt.out_dir);
      require_input(st->records == recs.size(),
                    path + ": written by a run of " + std::to_string(st->records) + " records, this one has " +
                        std::to_string(recs.size()) + " (a sequential run resumes with the same --limit)");
      require_input(st->edits % size_t(opt.batch_size) == 0 && st->edits <= recs.size(),
                    path + ": " + std::to_string(st->edits) + " edits do not fit this run's batch size");
      resumed_clean = apply_sequential_state(m, *st, path);
      for (const auto& [le, v] : st->down) touched.insert(le);
      ev.templates() = st->templates;
      ev.keys() = st->keys;
      done = st->edits;
      seconds = st->seconds;
      for (size_t k = 0; k < done; ++k) {
        const std::string cp = case_path(opt.out_dir, recs[k]->case_id);
        require_input(fs::exists(cp), path + " holds " + std::to_string(done) + " edits but " + cp + " is missing");
        cases.push_back(read_json(cp));
      }
      for (size_t n = size_t(opt.sequential_every); n <= done; n += size_t(opt.sequential_every))
        curve.push_back(read_json(opt.out_dir + "/sequential/after_" + std::to_string(n) + ".json"));
      res.skipped += int(done);
    }
  }
  const auto all = chunks(recs, opt.batch_size);
  for (size_t c = done / size_t(opt.batch_size); c < all.size(); ++c) {
    const auto& chunk = all[c];
    applied.push_back(ev.edit(chunk, true));
    seconds += applied.back().seconds();
    for (const auto& le : applied.back().touched()) touched.insert(le);
    for (size_t i = 0; i < chunk.size(); ++i) {
      const CaseMetrics post = ev.metrics(*chunk[i]);
      cases.push_back(ev.case_json(applied.back(), i, pre[done + i], post, json::object()));
      write_file_atomic(case_path(opt.out_dir, chunk[i]->case_id), cases.back().dump(1) + "\n");
    }
    done += chunk.size();
    res.evaluated += int(chunk.size());
    if (opt.progress) opt.progress(int(done), int(recs.size()));
    if (done % size_t(opt.sequential_every) != 0 && done != recs.size()) continue;
    // Every case edited so far, re-scored on the model carrying all `done` edits.
    std::vector<json> now = cases;
    for (size_t k = 0; k < done; ++k) now[k]["post"] = ev.metrics(*recs[k]).values;
    json point = summarize(now);
    point["edits"] = done;
    point["edit_seconds"] = seconds;
    point["routing_drift"] = drift_entry(m, neigh, wiki);
    if (!ev.wiki().empty()) point["perplexity_wikitext"] = windows_perplexity(m, ev.wiki());
    write_file_atomic(opt.out_dir + "/sequential/after_" + std::to_string(done) + ".json", point.dump(2) + "\n");
    if (done % size_t(opt.sequential_every) == 0)  // resume points fall on the curve's regular points
      save_sequential_state(opt.out_dir, m, touched, done, recs.size(), seconds, ev.templates(), ev.keys());
    curve.push_back(std::move(point));
  }
  for (auto it = applied.rbegin(); it != applied.rend(); ++it) it->revert(m);
  for (const auto& [le, v] : resumed_clean) set_expert_down(m, le.first, le.second, v);
  ev.check_revert(clean, -1);
  write_file_atomic(opt.out_dir + "/sequential/curve.svg", curve_svg({{"", curve}}));
  return curve;
}

}  // namespace

EditRequest edit_request(const EvalRecord& r) {
  return {r.prompt, r.subject, r.target_new, r.target_true, r.paraphrase_prompts, r.neighborhood_prompts,
          std::to_string(r.case_id)};
}

json write_reports(const std::string& dir, const json& settings, const std::vector<int>* case_ids) {
  const auto cases = read_cases(dir, case_ids);
  json s = summarize(cases);
  s["settings"] = settings;
  write_file_atomic(dir + "/summary.json", s.dump(2) + "\n");
  write_file_atomic(dir + "/summary.md", summary_markdown(s, settings));
  write_file_atomic(dir + "/distributions.svg", distributions_svg(cases));
  return s;
}

RunResult run_eval(Model& m, const Tokenizer& tok, const std::vector<EvalRecord>& records, const RunOptions& opt) {
  require_input(opt.n_shards >= 1 && opt.shard >= 0 && opt.shard < opt.n_shards, "--shard i/n needs 0 <= i < n");
  require_input(opt.sequential_every == 0 || opt.n_shards == 1,
                "--sequential runs cannot be sharded (the edits accumulate in one process; --resume goes on from the "
                "last curve point)");
  require_input(opt.batch_size >= 1 && (opt.batch || opt.batch_size == 1),
                "--batch-size B needs B >= 1 (and B > 1 needs --method memit|alphaedit|moeedit)");
  require_input(opt.sequential_every == 0 || opt.sequential_every % opt.batch_size == 0,
                "--sequential N must be a multiple of --batch-size (curve points fall between batches)");
  const size_t n = opt.limit >= 0 ? std::min(records.size(), size_t(opt.limit)) : records.size();
  std::vector<const EvalRecord*> mine;
  std::vector<int> ids;
  // Shards take whole steps: step j (records jB .. jB + B − 1) belongs to shard j mod n, so shards merge to one run.
  for (size_t i = 0; i < n; ++i)
    if (int((i / size_t(opt.batch_size)) % size_t(opt.n_shards)) == opt.shard) {
      mine.push_back(&records[i]);
      ids.push_back(records[i].case_id);
    }
  for (const auto* r : mine) normalized_prompt(edit_request(*r));  // every request validated before any work
  prepare_dir(opt, ids);

  Evaluator ev(m, tok, opt);
  RunResult res;
  json curve;
  if (opt.sequential_every > 0)
    curve = run_sequential(m, ev, mine, opt, res);
  else
    run_independent(ev, m, mine, opt, res);
  res.summary = write_reports(opt.out_dir, opt.settings, &ids);
  if (!curve.is_null()) {
    res.summary["sequential"] = std::move(curve);
    write_file_atomic(opt.out_dir + "/summary.json", res.summary.dump(2) + "\n");
  }
  return res;
}

json merge_runs(const std::vector<std::string>& dirs, const std::string& out_dir) {
  require_input(!dirs.empty(), "merge: no run directories given");
  json settings;
  std::map<int, std::pair<std::string, json>> cases;  // case_id → (source dir, case)
  for (const auto& d : dirs) {
    const json s = read_json(d + "/settings.json");
    if (settings.is_null())
      settings = s;
    else if (comparable(s) != comparable(settings))
      throw InputError(d + "/settings.json: settings differ from " + dirs[0] + "/settings.json; only shards of one "
                                                                                 "run can be merged");
    for (auto& c : read_cases(d, nullptr)) {
      const int id = c.at("case_id").get<int>();
      if (const auto it = cases.find(id); it != cases.end()) {
        if (without_timing(it->second.second) != without_timing(c))
          throw InputError("merge: case " + std::to_string(id) + " differs between " + it->second.first + " and " + d);
        continue;
      }
      cases.emplace(id, std::make_pair(d, std::move(c)));
    }
  }
  fs::create_directories(out_dir + "/cases");
  for (const auto& [id, c] : cases) write_file_atomic(case_path(out_dir, id), c.second.dump(1) + "\n");
  settings.erase("shard");
  write_file_atomic(out_dir + "/settings.json", settings.dump(2) + "\n");
  return write_reports(out_dir, settings);
}

}  // namespace moedit::eval
