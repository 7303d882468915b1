#include "eval/run.h"
#include "io/files.h"

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <stdexcept>

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

std::set<int> edit_layers(const EditOptions& o) {
  return {o.target.kind == TargetKind::Expert ? o.target.layer : o.layer};
}

std::string expert_label(int layer, int expert) {
  if (!is_shared_expert(expert)) return std::to_string(layer) + ":" + std::to_string(expert);
  const int j = shared_index(expert);
  return std::to_string(layer) + ":shared" + (j > 0 ? std::to_string(j) : std::string());
}

// The MoE extras of one case: which experts were edited and how the paraphrases route relative to them.
json moe_extras(const EditResult& r, const CaseMetrics& pre, const CaseMetrics& post) {
  std::vector<std::string> labels;
  std::set<int> routed_edits;
  bool shared_edit = false;
  for (const auto& u : r.updates) {
    labels.push_back(expert_label(u.layer, u.expert));
    if (u.layer != r.layer) continue;
    if (is_shared_expert(u.expert))
      shared_edit = true;
    else
      routed_edits.insert(u.expert);
  }
  json routes = json::array();
  double overlap = 0;
  int found = 0;
  for (const auto& ex : post.paraphrase_experts) {
    if (ex.empty()) {
      routes.push_back(nullptr);
      continue;
    }
    int hits = 0;
    for (const int e : ex) hits += int(routed_edits.count(e));
    const size_t n_edited = routed_edits.size() + (shared_edit ? 1 : 0);
    routes.push_back(shared_edit || hits > 0);
    overlap += n_edited ? double(hits + (shared_edit ? 1 : 0)) / double(n_edited) : 0.0;
    ++found;
  }
  return {{"layer", r.layer},
          {"target", target_name(r.target)},
          {"edited_experts", labels},
          {"rewrite_experts", r.routed},
          {"paraphrase_experts", post.paraphrase_experts},
          {"paraphrase_routes_through_edited", routes},
          {"routing_overlap", found ? json(overlap / found) : json(nullptr)},
          {"paraphrase_success", {{"pre", pre.paraphrase_success}, {"post", post.paraphrase_success}}}};
}

class Evaluator {
 public:
  Evaluator(Model& m, const Tokenizer& tok, const RunOptions& opt) : m_(m), tok_(tok), opt_(opt) {}

  CaseMetrics metrics(const EvalRecord& rec) const {
    CaseMetricsOptions o;
    o.layer = *edit_layers(opt_.edit).begin();
    o.generation = opt_.generation_interval > 0 && rec.case_id % opt_.generation_interval == 0;
    o.gen = opt_.gen;
    o.snippets = opt_.snippets;
    o.tfidf = opt_.tfidf;
    return case_metrics(m_, tok_, rec, o);
  }
  EditResult edit(const EvalRecord& rec) { return apply_edit(m_, tok_, edit_request(rec), opt_.edit, &templates_); }
  void check_revert(uint64_t before, const std::set<int>& layers, int case_id) const {
    if (fingerprint(m_, layers) != before)
      throw std::runtime_error("case " + std::to_string(case_id) +
                               ": the weights differ from the clean model after the revert");
  }
  json case_json(const EvalRecord& rec, const EditResult& r, const CaseMetrics& pre, const CaseMetrics& post) const {
    return {{"case_id", rec.case_id},     {"requested_rewrite", requested_rewrite(rec)},
            {"time", r.seconds},          {"pre", pre.values},
            {"post", post.values},        {"edit", edit_json(r)},
            {"moe", moe_extras(r, pre, post)}};
  }

 private:
  Model& m_;
  const Tokenizer& tok_;
  const RunOptions& opt_;
  std::vector<std::string> templates_;  // sampled once from the clean model
};

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

// Returns the summaries after every `sequential_every` edits.
json run_sequential(Model& m, Evaluator& ev, const std::vector<const EvalRecord*>& recs, const RunOptions& opt,
                    RunResult& res) {
  const auto layers = edit_layers(opt.edit);
  const uint64_t clean = fingerprint(m, layers);
  std::vector<CaseMetrics> pre;
  for (const auto* r : recs) pre.push_back(ev.metrics(*r));
  std::vector<EditResult> applied;
  std::vector<json> cases;
  json curve = json::array();
  fs::create_directories(opt.out_dir + "/sequential");
  for (size_t i = 0; i < recs.size(); ++i) {
    applied.push_back(ev.edit(*recs[i]));
    const CaseMetrics post = ev.metrics(*recs[i]);
    cases.push_back(ev.case_json(*recs[i], applied.back(), pre[i], post));
    write_file_atomic(case_path(opt.out_dir, recs[i]->case_id), cases.back().dump(1) + "\n");
    ++res.evaluated;
    if (opt.progress) opt.progress(int(i + 1), int(recs.size()));
    if ((i + 1) % size_t(opt.sequential_every) != 0 && i + 1 != recs.size()) continue;
    // Every case edited so far, re-scored on the model carrying all i + 1 edits.
    std::vector<json> now = cases;
    for (size_t k = 0; k <= i; ++k) now[k]["post"] = ev.metrics(*recs[k]).values;
    json point = summarize(now);
    point["edits"] = i + 1;
    write_file_atomic(opt.out_dir + "/sequential/after_" + std::to_string(i + 1) + ".json", point.dump(2) + "\n");
    curve.push_back(std::move(point));
  }
  revert_all(m, applied);
  ev.check_revert(clean, layers, -1);
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
  require_input(opt.sequential_every == 0 || (!opt.resume && opt.n_shards == 1),
                "--sequential runs cannot be resumed or sharded (the edits accumulate in one process)");
  const size_t n = opt.limit >= 0 ? std::min(records.size(), size_t(opt.limit)) : records.size();
  std::vector<const EvalRecord*> mine;
  std::vector<int> ids;
  for (size_t i = 0; i < n; ++i)
    if (int(i % size_t(opt.n_shards)) == opt.shard) {
      mine.push_back(&records[i]);
      ids.push_back(records[i].case_id);
    }
  for (const auto* r : mine) normalized_prompt(edit_request(*r));  // every request validated before any work
  prepare_dir(opt, ids);

  Evaluator ev(m, tok, opt);
  RunResult res;
  json curve;
  if (opt.sequential_every > 0) {
    curve = run_sequential(m, ev, mine, opt, res);
  } else {
    const auto layers = edit_layers(opt.edit);
    for (size_t i = 0; i < mine.size(); ++i) {
      const EvalRecord& rec = *mine[i];
      if (opt.resume && fs::exists(case_path(opt.out_dir, rec.case_id))) {
        ++res.skipped;
      } else {
        const uint64_t clean = fingerprint(m, layers);
        const CaseMetrics pre = ev.metrics(rec);
        const EditResult r = ev.edit(rec);
        const CaseMetrics post = ev.metrics(rec);
        revert(m, r);
        ev.check_revert(clean, layers, rec.case_id);
        write_file_atomic(case_path(opt.out_dir, rec.case_id), ev.case_json(rec, r, pre, post).dump(1) + "\n");
        ++res.evaluated;
      }
      if (opt.progress) opt.progress(int(i + 1), int(mine.size()));
    }
  }
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
