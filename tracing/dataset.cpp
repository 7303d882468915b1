// Dataset mode: trace every fact of a CounterFact / known-facts file, average the indirect effects in ROME's six
// token groups (average_causal_effects.ipynb), and tabulate single-expert effects at the last subject token.
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "io/errors.h"
#include "tokenizer/tokenizer.h"
#include "tracing/report.h"
#include "tracing/svg.h"
#include "tracing/trace.h"

namespace moedit::trace {

namespace {

namespace fs = std::filesystem;

struct Record {
  std::string id, prompt, subject, expected;
};

std::vector<Record> read_records(const std::string& file) {
  std::ifstream f(file);
  if (!f) throw InputError("cannot open dataset " + file);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(f);
  } catch (const std::exception& e) {
    throw InputError(file + ": malformed JSON (" + e.what() + ")");
  }
  if (!j.is_array()) throw InputError(file + ": expected a JSON list of records");
  std::vector<Record> out;
  for (size_t i = 0; i < j.size(); ++i) {
    const auto& r = j[i];
    const std::string where = file + " record " + std::to_string(i);
    auto str = [&](const nlohmann::json& o, const char* key) {
      if (!o.is_object() || !o.contains(key) || !o[key].is_string())
        throw InputError(where + ": missing string field '" + key + "'");
      return o[key].get<std::string>();
    };
    Record rec;
    if (r.is_object() && r.contains("requested_rewrite")) {  // CounterFact
      const auto& rw = r["requested_rewrite"];
      rec.id = r.contains("case_id") ? r["case_id"].dump() : std::to_string(i);
      rec.subject = str(rw, "subject");
      std::string p = str(rw, "prompt");
      const size_t at = p.find("{}");
      if (at == std::string::npos) throw InputError(where + ": requested_rewrite.prompt has no {}");
      p.replace(at, 2, rec.subject);
      rec.prompt = p;
      if (!rw.contains("target_true")) throw InputError(where + ": missing requested_rewrite.target_true");
      rec.expected = str(rw["target_true"], "str");
    } else {  // known facts (ROME's known_1000.json)
      rec.id = r.is_object() && r.contains("known_id") ? r["known_id"].dump() : std::to_string(i);
      rec.prompt = str(r, "prompt");
      rec.subject = str(r, "subject");
      rec.expected = str(r, "attribute");
    }
    if (rec.id.size() > 2 && rec.id.front() == '"') rec.id = rec.id.substr(1, rec.id.size() - 2);
    for (char& c : rec.id)
      if (!std::isalnum((unsigned char)c) && c != '-' && c != '_') c = '_';
    out.push_back(std::move(rec));
  }
  return out;
}

// Running mean/std per layer.
struct Avg {
  std::vector<double> sum, sq;
  std::vector<int64_t> n;
  void add(const std::vector<double>& row) {
    if (sum.empty()) {
      sum.assign(row.size(), 0);
      sq.assign(row.size(), 0);
      n.assign(row.size(), 0);
    }
    for (size_t i = 0; i < row.size() && i < sum.size(); ++i) {
      if (!std::isfinite(row[i])) continue;
      sum[i] += row[i];
      sq[i] += row[i] * row[i];
      n[i] += 1;
    }
  }
  double mean(size_t i) const { return n.empty() || n[i] == 0 ? NAN : sum[i] / double(n[i]); }
  double ci95(size_t i) const {
    if (n.empty() || n[i] < 2) return NAN;
    const double m = mean(i), var = std::max(0.0, sq[i] / double(n[i]) - m * m);
    return 1.96 * std::sqrt(var) / std::sqrt(double(n[i]));
  }
};

const char* const kGroups[6] = {"first_subject", "middle_subject", "last_subject",
                                "first_subsequent", "further", "last"};
const char* const kGroupTitles[6] = {"First subject token", "Middle subject tokens", "Last subject token",
                                     "First subsequent token", "Further tokens", "Last token"};

struct KindAcc {
  Avg groups[6];
};

struct ExpertAcc {  // per layer at one token position
  std::map<int, Avg> dominant;              // layer → [1]
  std::map<int, std::vector<Avg>> rank;     // layer → per rank [1]
  std::map<int, std::map<int, Avg>> by_id;  // layer → expert → [1]
  std::map<int, Avg> shared;
  std::map<int, std::map<int, Avg>> shared_alone;  // layer → shared expert j (restored alone) → [1]
};

std::vector<double> row_of(const nlohmann::json& scores, int r) {
  std::vector<double> v;
  for (const auto& x : scores[size_t(r)]) v.push_back(x.is_number() ? x.get<double>() : NAN);
  return v;
}

}  // namespace

DatasetSummary trace_dataset(const Model& m, const Tokenizer& tok, const std::string& file, const TraceOptions& opt_in,
                             const DatasetOptions& dopt) {
  if (dopt.out_dir.empty()) throw InputError("dataset mode needs --out DIR");
  const std::vector<Record> all = read_records(file);
  std::vector<Record> recs = all;
  if (dopt.limit >= 0 && size_t(dopt.limit) < recs.size()) recs.resize(size_t(dopt.limit));
  const fs::path out(dopt.out_dir), cases = out / "cases";
  std::error_code ec;
  fs::create_directories(cases, ec);
  if (ec) throw InputError("cannot create " + cases.string() + ": " + ec.message());

  TraceOptions opt = opt_in;
  opt.tokens.clear();  // the six token groups need every token
  if (opt.noise_file.empty() && opt.embedding_std < 0 && parse_noise_rule(opt.noise).type == NoiseRule::ScaledStd) {
    std::vector<std::string> subjects;
    for (const Record& r : all) subjects.push_back(r.subject);
    opt.embedding_std = subject_embedding_std(m, tok, subjects);
    opt.embedding_std_source = "dataset subjects (" + std::to_string(subjects.size()) + ")";
  }
  const bool bar = opt.progress && ::isatty(2);
  opt.progress = false;
  // Cases from an earlier run are reused only if they were traced with the same settings.
  nlohmann::json fingerprint = {{"noise", opt.noise_file.empty() ? opt.noise : "file:" + opt.noise_file},
                                {"embedding_std", opt.embedding_std},
                                {"samples", opt.samples},
                                {"seed", opt.seed},
                                {"replace", opt.replace},
                                {"window", opt.window},
                                {"expert_tokens", opt.expert_tokens},
                                {"expert_all_tokens", opt.expert_all_tokens},
                                {"model", m.path()}};
  for (Kind k : opt.kinds) fingerprint["kinds"].push_back(kind_name(k));

  DatasetSummary sum;
  sum.facts = int(recs.size());
  std::map<std::string, KindAcc> acc;
  ExpertAcc ex_subj, ex_last;
  Avg hs, ls;
  nlohmann::json skipped = nlohmann::json::array(), fact_list = nlohmann::json::array();
  int L = m.config().n_layers;

  // Facts are traced dopt.together at a time (Tracer::together: shared forwards and batches, the same scores);
  // the averages run over them in record order.
  const size_t together = size_t(std::max(1, dopt.together));
  std::vector<nlohmann::json> rjs(recs.size());
  std::vector<std::string> errs(recs.size());
  auto trace_chunk = [&](size_t c0, size_t c1) {
    std::vector<TraceRequest> reqs;
    std::vector<size_t> which;
    for (size_t i = c0; i < c1; ++i) {
      const Record& rec = recs[i];
      const fs::path marker = cases / (rec.id + ".json");
      if (dopt.resume && fs::exists(marker)) {
        try {
          std::ifstream f(marker);
          nlohmann::json rj = nlohmann::json::parse(f);
          if (rj.contains("kinds") && rj.contains("options") && rj["options"] == fingerprint) {
            rjs[i] = std::move(rj);
            continue;
          }
        } catch (const std::exception&) {
        }
      }
      reqs.push_back({rec.prompt, rec.subject, "", rec.expected, rec.id});
      which.push_back(i);
    }
    if (reqs.empty()) return;
    std::vector<std::string> e;
    const std::vector<TraceReport> reps = trace_facts_together(m, tok, reqs, opt, &e);
    for (size_t j = 0; j < which.size(); ++j) {
      const size_t i = which[j];
      const Record& rec = recs[i];
      if (!e[j].empty()) {
        errs[i] = e[j];
        continue;
      }
      const TraceReport& rep = reps[j];
      nlohmann::json rj = report_json(rep);
      rj["options"] = fingerprint;
      for (const KindResult& k : rep.kinds) {
        std::ofstream f(cases / (rec.id + "_" + kind_name(k.kind) + ".json"));
        f << kind_json(rep, k).dump(1) << "\n";
      }
      if (int(i) < dopt.plots) write_trace_outputs(rep, (cases / rec.id).string());
      const fs::path marker = cases / (rec.id + ".json");
      std::ofstream f(marker.string() + ".tmp");
      f << rj.dump() << "\n";
      f.close();
      fs::rename(marker.string() + ".tmp", marker);
      rjs[i] = std::move(rj);
    }
  };

  for (size_t i = 0; i < recs.size(); ++i) {
    const Record& rec = recs[i];
    if (i % together == 0) {
      if (bar) {
        std::fprintf(stderr, "\rtrace dataset: facts %zu-%zu of %zu", i + 1, std::min(recs.size(), i + together),
                     recs.size());
        std::fflush(stderr);
      }
      trace_chunk(i, std::min(recs.size(), i + together));
    }
    if (!errs[i].empty()) {
      skipped.push_back({{"id", rec.id}, {"error", errs[i]}});
      sum.skipped += 1;
      continue;
    }
    const nlohmann::json rj = std::move(rjs[i]);
    sum.traced += 1;
    const bool correct = rj.value("correct_prediction", true);
    fact_list.push_back({{"id", rec.id},
                         {"prompt", rec.prompt},
                         {"answer", rj["answer"]["text"]},
                         {"expected", rec.expected},
                         {"correct_prediction", correct},
                         {"high_score", rj["high_score"]},
                         {"low_score", rj["low_score"]},
                         {"report", int(i) < dopt.plots ? "cases/" + rec.id + "/trace_report.html" : ""}});
    if (correct) sum.correct += 1;
    if (!correct && dopt.only_correct) continue;
    hs.add({rj["high_score"].get<double>()});
    ls.add({rj["low_score"].get<double>()});
    const int S = int(rj["input_ids"].size());
    const int b = rj["subject_range"][0], e = rj["subject_range"][1];
    for (auto& [kname, kj] : rj["kinds"].items()) {
      if (kname == "expert") continue;
      KindAcc& ka = acc[kname];
      const auto& sc = kj["scores"];
      ka.groups[0].add(row_of(sc, b));
      for (int t = b + 1; t < e - 1; ++t) ka.groups[1].add(row_of(sc, t));
      ka.groups[2].add(row_of(sc, e - 1));
      if (e < S) ka.groups[3].add(row_of(sc, e));
      for (int t = e + 1; t < S - 1; ++t) ka.groups[4].add(row_of(sc, t));
      ka.groups[5].add(row_of(sc, S - 1));
    }
    const double low = rj["low_score"].get<double>();
    if (rj["kinds"].contains("expert")) {
      const auto& kj = rj["kinds"]["expert"];
      for (auto [tok_pos, ea] : {std::pair<int, ExpertAcc*>{e - 1, &ex_subj}, {S - 1, &ex_last}}) {
        std::map<int, double> best;
        for (const auto& x : kj["experts"]) {
          if (x["token"].get<int>() != tok_pos) continue;
          const int l = x["layer"], id = x["expert"], rank = x["rank"];
          const double ie = x["score"].get<double>() - low;
          auto& rv = ea->rank[l];
          if (int(rv.size()) <= rank) rv.resize(size_t(rank + 1));
          rv[size_t(rank)].add({ie});
          ea->by_id[l][id].add({ie});
          best[l] = best.count(l) ? std::max(best[l], ie) : ie;
        }
        for (auto [l, v] : best) ea->dominant[l].add({v});
        if (rj["kinds"].contains("shared")) {
          const std::vector<double> row = row_of(rj["kinds"]["shared"]["scores"], tok_pos);
          for (int l = 0; l < int(row.size()); ++l)
            if (std::isfinite(row[size_t(l)])) ea->shared[l].add({row[size_t(l)] - low});
          for (const auto& x : rj["kinds"]["shared"].value("shared_experts", nlohmann::json::array()))
            if (x["token"].get<int>() == tok_pos)
              ea->shared_alone[x["layer"].get<int>()][x["expert"].get<int>()].add({x["score"].get<double>() - low});
        }
      }
    }
  }
  if (bar) std::fprintf(stderr, "\n");

  // ---- summary JSON ----
  const double avg_low = ls.mean(0), avg_high = hs.mean(0);
  nlohmann::json j;
  j["schema"] = "moedit.trace_summary/1";
  j["model"] = m.path();
  j["dataset"] = file;
  j["facts"] = sum.facts;
  j["traced"] = sum.traced;
  j["correct"] = sum.correct;
  j["averaged_over"] = dopt.only_correct ? "correctly predicted facts" : "all traced facts";
  j["n_averaged"] = ls.n.empty() ? 0 : ls.n[0];
  j["skipped"] = skipped;
  j["avg_high_score"] = std::isfinite(avg_high) ? nlohmann::json(avg_high) : nlohmann::json(nullptr);
  j["avg_low_score"] = std::isfinite(avg_low) ? nlohmann::json(avg_low) : nlohmann::json(nullptr);
  j["average_total_effect"] =
      std::isfinite(avg_high - avg_low) ? nlohmann::json(avg_high - avg_low) : nlohmann::json(nullptr);
  j["noise"] = {{"rule", opt.noise_file.empty() ? opt.noise : "file"},
                {"embedding_std", opt.embedding_std},
                {"source", opt.embedding_std_source},
                {"samples", opt.samples},
                {"seed", opt.seed},
                {"replace", opt.replace}};
  j["window"] = opt.window;
  auto jnum = [](double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); };
  j["kinds"] = nlohmann::json::object();
  for (auto& [kname, ka] : acc) {
    nlohmann::json kj;
    nlohmann::json groups = nlohmann::json::object();
    for (int g = 0; g < 6; ++g) {
      nlohmann::json aie = nlohmann::json::array(), ci = nlohmann::json::array(), n = nlohmann::json::array();
      for (int l = 0; l < L; ++l) {
        const Avg& a = ka.groups[g];
        aie.push_back(jnum(a.mean(size_t(l)) - avg_low));
        ci.push_back(jnum(a.ci95(size_t(l))));
        n.push_back(a.n.empty() ? 0 : a.n[size_t(l)]);
      }
      groups[kGroups[g]] = {{"aie", aie}, {"ci95", ci}, {"n", n}};
    }
    kj["groups"] = groups;
    double best_s = NAN, best_l = NAN;
    int arg_s = -1, arg_l = -1;
    for (int l = 0; l < L; ++l) {
      const double s = ka.groups[2].mean(size_t(l)) - avg_low, t = ka.groups[5].mean(size_t(l)) - avg_low;
      if (std::isfinite(s) && (!std::isfinite(best_s) || s > best_s)) best_s = s, arg_s = l;
      if (std::isfinite(t) && (!std::isfinite(best_l) || t > best_l)) best_l = t, arg_l = l;
    }
    kj["best_aie_last_subject"] = {{"aie", jnum(best_s)}, {"layer", arg_s}};
    kj["best_aie_last_token"] = {{"aie", jnum(best_l)}, {"layer", arg_l}};
    j["kinds"][kname] = kj;
  }
  auto expert_table = [&](const ExpertAcc& ea) {
    nlohmann::json rows = nlohmann::json::array();
    for (int l = 0; l < L; ++l) {
      if (!ea.dominant.count(l)) continue;
      nlohmann::json r;
      r["layer"] = l;
      r["dominant_aie"] = jnum(ea.dominant.at(l).mean(0));
      r["dominant_ci95"] = jnum(ea.dominant.at(l).ci95(0));
      nlohmann::json rk = nlohmann::json::array();
      for (const Avg& a : ea.rank.at(l)) rk.push_back(jnum(a.mean(0)));
      r["rank_aie"] = rk;
      r["shared_aie"] = ea.shared.count(l) ? jnum(ea.shared.at(l).mean(0)) : nlohmann::json(nullptr);
      if (ea.shared_alone.count(l)) {  // several shared experts: each restored alone, by index j
        nlohmann::json sa = nlohmann::json::array();
        for (const auto& [sj, a] : ea.shared_alone.at(l)) sa.push_back(jnum(a.mean(0)));
        r["shared_expert_aie"] = sa;
      }
      std::vector<std::pair<int, const Avg*>> ids;
      for (const auto& [id, a] : ea.by_id.at(l)) ids.emplace_back(id, &a);
      std::sort(ids.begin(), ids.end(), [](const auto& a, const auto& b) {
        return a.second->sum[0] > b.second->sum[0];  // total effect: frequency × mean
      });
      nlohmann::json ex = nlohmann::json::array();
      for (const auto& [id, a] : ids) ex.push_back({{"expert", id}, {"n", a->n[0]}, {"aie", jnum(a->mean(0))}});
      r["experts"] = ex;
      rows.push_back(r);
    }
    return rows;
  };
  j["expert_last_subject"] = expert_table(ex_subj);
  j["expert_last_token"] = expert_table(ex_last);
  j["facts_list"] = fact_list;
  sum.json = j;
  {
    std::ofstream f(out / "summary.json");
    f << j.dump(1) << "\n";
  }

  // ---- summary figures + HTML ----
  std::ostringstream h;
  h << html_head("moedit trace summary");
  h << "<h1>Average causal effects</h1>\n<table>";
  h << "<tr><th class=\"l\">model</th><td class=\"l\">" << html_escape(m.path()) << "</td></tr>";
  h << "<tr><th class=\"l\">dataset</th><td class=\"l\">" << html_escape(file) << "</td></tr>";
  h << "<tr><th class=\"l\">facts</th><td class=\"l\">" << sum.facts << " (traced " << sum.traced << ", correctly predicted "
    << sum.correct << ", skipped " << sum.skipped << "; averaged over " << j["n_averaged"].get<int64_t>() << " "
    << j["averaged_over"].get<std::string>() << ")</td></tr>";
  char buf[256];
  std::snprintf(buf, sizeof buf, "%.4f / %.4f / %.4f", avg_high, avg_low, avg_high - avg_low);
  h << "<tr><th class=\"l\">avg high / low / total effect</th><td class=\"l\">" << buf << "</td></tr></table>\n";
  const std::map<std::string, std::pair<svg::Palette, std::string>> look = {
      {"resid", {svg::Palette::Purples, "single restored hidden state"}},
      {"attn", {svg::Palette::Reds, "run of " + std::to_string(opt.window) + " Attn modules"}},
      {"moe", {svg::Palette::Greens, "run of " + std::to_string(opt.window) + " MoE modules"}},
      {"shared", {svg::Palette::Oranges, "single restored shared expert"}}};
  for (auto& [kname, ka] : acc) {
    svg::Heatmap hm;
    hm.title = "Average indirect effect: " + look.at(kname).second;
    hm.palette = look.at(kname).first;
    hm.colorbar_title = "AIE";
    hm.xlabel = "layer";
    for (int l = 0; l < L; ++l) hm.col_labels.push_back(std::to_string(l));
    double mx = 0;
    for (int g = 0; g < 6; ++g) {
      hm.row_labels.push_back(kGroupTitles[g]);
      std::vector<double> row;
      for (int l = 0; l < L; ++l) {
        const double v = ka.groups[g].mean(size_t(l)) - avg_low;
        row.push_back(v);
        if (std::isfinite(v)) mx = std::max(mx, v);
      }
      hm.values.push_back(row);
    }
    hm.vmin = 0;
    hm.vmax = mx > 0 ? mx : 1;
    const std::string svgtext = svg::heatmap(hm);
    std::ofstream(out / ("summary_" + kname + ".svg")) << svgtext;
    h << "<h2>" << html_escape(look.at(kname).second) << " (" << kname << ")</h2>\n<div>" << svgtext << "</div>\n";
    h << "<table><tr><th class=\"l\">group \\ layer</th>";
    for (int l = 0; l < L; ++l) h << "<th>" << l << "</th>";
    h << "</tr>\n";
    for (int g = 0; g < 6; ++g) {
      h << "<tr><td class=\"l\">" << kGroupTitles[g] << "</td>";
      for (int l = 0; l < L; ++l) {
        const double v = ka.groups[g].mean(size_t(l)) - avg_low;
        std::snprintf(buf, sizeof buf, "%.4f", v);
        h << "<td>" << (std::isfinite(v) ? buf : "–") << "</td>";
      }
      h << "</tr>\n";
    }
    h << "</table>\n";
  }
  auto expert_html = [&](const char* title, const nlohmann::json& rows) {
    if (rows.empty()) return;
    h << "<h2>" << title << "</h2>\n<table><tr><th>layer</th><th>dominant expert AIE</th>";
    size_t k = 0;
    for (const auto& r : rows) k = std::max(k, r["rank_aie"].size());
    for (size_t i = 0; i < k; ++i) h << "<th>rank-" << i + 1 << " expert AIE</th>";
    h << "<th>shared AIE</th><th class=\"l\">experts by total effect (id: n facts, AIE)</th></tr>\n";
    auto f4 = [&](const nlohmann::json& v) {
      if (!v.is_number()) return std::string("–");
      std::snprintf(buf, sizeof buf, "%.4f", v.get<double>());
      return std::string(buf);
    };
    for (const auto& r : rows) {
      h << "<tr><td>" << r["layer"].get<int>() << "</td><td>" << f4(r["dominant_aie"]) << "</td>";
      for (size_t i = 0; i < k; ++i) h << "<td>" << (i < r["rank_aie"].size() ? f4(r["rank_aie"][i]) : "–") << "</td>";
      h << "<td>" << f4(r["shared_aie"]) << "</td><td class=\"l\">";
      for (size_t i = 0; i < std::min<size_t>(r["experts"].size(), 6); ++i) {
        const auto& x = r["experts"][i];
        h << (i ? "; " : "") << "e" << x["expert"].get<int>() << ": " << x["n"].get<int64_t>() << ", "
          << f4(x["aie"]);
      }
      h << "</td></tr>\n";
    }
    h << "</table>\n";
  };
  expert_html("Last subject token, per expert", j["expert_last_subject"]);
  expert_html("Last token, per expert", j["expert_last_token"]);
  h << "<h2>Facts</h2>\n<table><tr><th class=\"l\">id</th><th class=\"l\">prompt</th><th class=\"l\">answer</th>"
       "<th class=\"l\">expected</th><th>high</th><th>low</th></tr>\n";
  for (const auto& f : fact_list) {
    const std::string rp = f["report"].get<std::string>();
    h << "<tr><td class=\"l\">"
      << (rp.empty() ? html_escape(f["id"].get<std::string>())
                     : "<a href=\"" + html_escape(rp) + "\">" + html_escape(f["id"].get<std::string>()) + "</a>")
      << "</td><td class=\"l\">" << html_escape(f["prompt"].get<std::string>()) << "</td><td class=\"l\">"
      << html_escape(f["answer"].get<std::string>()) << (f["correct_prediction"].get<bool>() ? "" : " ✗")
      << "</td><td class=\"l\">" << html_escape(f["expected"].get<std::string>()) << "</td>";
    std::snprintf(buf, sizeof buf, "<td>%.4f</td><td>%.4f</td>", f["high_score"].get<double>(),
                  f["low_score"].get<double>());
    h << buf << "</tr>\n";
  }
  h << "</table>\n</body></html>\n";
  std::ofstream(out / "report.html") << h.str();
  return sum;
}

}  // namespace moedit::trace
