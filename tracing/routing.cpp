#include "tracing/routing.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <map>
#include <memory>
#include <sstream>

#include "datasets/counterfact.h"
#include "io/errors.h"
#include "tokenizer/tokenizer.h"
#include "tracing/svg.h"

namespace moedit {

using json = nlohmann::json;

std::vector<int> moe_layers(const ModelConfig& cfg) {
  std::vector<int> v;
  for (int l = 0; l < cfg.n_layers; ++l)
    if (cfg.is_moe(l)) v.push_back(l);
  return v;
}

std::vector<SequenceRouting> capture_routing(const Model& m, const std::vector<std::vector<int32_t>>& seqs,
                                             const RoutingOptions& opt) {
  const ModelConfig& c = m.config();
  const std::vector<int> layers = moe_layers(c);
  if (layers.empty()) throw InputError(c.source + ": the model has no MoE layers (nothing is routed)");
  for (size_t s = 0; s < seqs.size(); ++s)
    if (seqs[s].empty()) throw InputError("sequence " + std::to_string(s) + " is empty");
  if (opt.interventions) validate_interventions(*opt.interventions, c);
  const int E = c.n_experts;
  std::vector<SequenceRouting> out(seqs.size());
  const size_t budget = size_t(std::max(1, opt.max_batch_tokens));
  size_t i = 0;
  while (i < seqs.size()) {
    size_t j = i, ntok = 0;
    while (j < seqs.size() && (j == i || ntok + seqs[j].size() <= budget)) ntok += seqs[j++].size();
    const std::vector<std::vector<int32_t>> batch(seqs.begin() + long(i), seqs.begin() + long(j));

    Hooks hooks;
    if (opt.interventions) install_interventions(*opt.interventions, c, hooks);
    std::vector<std::shared_ptr<MatR>> z(size_t(c.n_layers));
    if (opt.probabilities)
      for (int l : layers) {
        auto slot = std::make_shared<MatR>();
        z[size_t(l)] = slot;
        hooks.add(hook_names::router_logits(l), [slot](Eigen::Ref<MatR> act, const HookContext&) { *slot = act; });
      }
    ForwardOptions fo;
    fo.hooks = hooks.empty() ? nullptr : &hooks;
    fo.logits_all = false;
    fo.stop_after_layer = layers.back();  // nothing above the last router is needed
    fo.record_routing = true;
    ForwardOutput f = m.forward(batch, fo);

    int row = 0;
    for (size_t b = 0; b < batch.size(); ++b) {
      SequenceRouting& r = out[i + b];
      const int n = int(batch[b].size());
      r.ids = batch[b];
      r.experts.assign(size_t(c.n_layers), IdMat());
      r.weights.assign(size_t(c.n_layers), MatR());
      r.probs.assign(size_t(c.n_layers), MatR());
      for (int l : layers) {
        const LayerRouting& lr = f.routing[size_t(l)];
        r.experts[size_t(l)] = lr.ids.middleRows(row, n);
        r.weights[size_t(l)] = lr.weights.middleRows(row, n);
        if (opt.probabilities) {
          MatR p = z[size_t(l)]->middleRows(row, n);
          for (int t = 0; t < n; ++t) ops::softmax_inplace(p.row(t).data(), E);
          r.probs[size_t(l)] = std::move(p);
        }
      }
      row += n;
    }
    i = j;
    if (opt.progress) opt.progress(i, seqs.size());
  }
  return out;
}

// ---- the numbers ------------------------------------------------------------------------------------------------

double router_entropy(const float* p, int E) {
  double h = 0;
  for (int e = 0; e < E; ++e)
    if (p[e] > 0) h -= double(p[e]) * std::log(double(p[e]));
  return h;
}

double kl_divergence(const float* p, const float* q, int E) {
  double kl = 0;
  for (int e = 0; e < E; ++e) {
    if (!(p[e] > 0)) continue;
    if (!(q[e] > 0)) return std::numeric_limits<double>::infinity();
    kl += double(p[e]) * (std::log(double(p[e])) - std::log(double(q[e])));
  }
  return std::max(0.0, kl);
}

double symmetric_kl(const float* p, const float* q, int E) { return kl_divergence(p, q, E) + kl_divergence(q, p, E); }

TopKOverlap compare_topk(const int* a, const int* b, int k) {
  TopKOverlap o;
  o.k = k;
  for (int i = 0; i < k; ++i)
    for (int j = 0; j < k; ++j)
      if (a[i] == b[j]) {
        ++o.shared;
        break;
      }
  o.overlap = k ? double(o.shared) / k : 0.0;
  o.jaccard = k ? double(o.shared) / double(2 * k - o.shared) : 0.0;
  o.consistent = o.shared >= k - 1;
  return o;
}

std::vector<LayerComparison> compare_tokens(const SequenceRouting& a, int ta, const SequenceRouting& b, int tb,
                                            const ModelConfig& cfg) {
  if (ta < 0 || ta >= a.n_tokens() || tb < 0 || tb >= b.n_tokens())
    throw std::out_of_range("compare_tokens: token index out of range");
  std::vector<LayerComparison> out;
  const int k = cfg.top_k, E = cfg.n_experts;
  for (int l : moe_layers(cfg)) {
    LayerComparison lc;
    lc.layer = l;
    const int* ia = a.experts[size_t(l)].row(ta).data();
    const int* ib = b.experts[size_t(l)].row(tb).data();
    lc.a_ids.assign(ia, ia + k);
    lc.b_ids.assign(ib, ib + k);
    lc.topk = compare_topk(ia, ib, k);
    const bool have = a.probs.size() > size_t(l) && a.probs[size_t(l)].rows() && b.probs.size() > size_t(l) &&
                      b.probs[size_t(l)].rows();
    lc.sym_kl = have ? symmetric_kl(a.probs[size_t(l)].row(ta).data(), b.probs[size_t(l)].row(tb).data(), E)
                     : std::numeric_limits<double>::quiet_NaN();
    out.push_back(std::move(lc));
  }
  return out;
}

// ---- per-token reports --------------------------------------------------------------------------------------------

namespace {

json num(double v) { return std::isfinite(v) ? json(v) : json(nullptr); }

double entropy_at(const SequenceRouting& r, int l, int t, int E) {
  if (r.probs.size() <= size_t(l) || !r.probs[size_t(l)].rows()) return std::numeric_limits<double>::quiet_NaN();
  return router_entropy(r.probs[size_t(l)].row(t).data(), E);
}

std::string printable(const std::string& s) {
  std::string o;
  for (unsigned char ch : s) {
    if (ch == '\n') o += "\\n";
    else if (ch == '\t') o += "\\t";
    else if (ch < 0x20) o += '?';
    else o += char(ch);
  }
  return o;
}

}  // namespace

json routing_json(const SequenceRouting& r, const ModelConfig& cfg, const std::vector<std::string>& pieces) {
  const int k = cfg.top_k, E = cfg.n_experts;
  json toks = json::array();
  for (int t = 0; t < r.n_tokens(); ++t) {
    json tj = {{"pos", t}, {"id", r.ids[size_t(t)]}};
    if (size_t(t) < pieces.size()) tj["token"] = pieces[size_t(t)];
    json lj = json::array();
    for (int l : moe_layers(cfg)) {
      const int* ids = r.experts[size_t(l)].row(t).data();
      const float* w = r.weights[size_t(l)].row(t).data();
      const int d = dominant_slot(w, k);
      lj.push_back({{"layer", l},
                    {"experts", std::vector<int>(ids, ids + k)},
                    {"weights", std::vector<float>(w, w + k)},
                    {"entropy", num(entropy_at(r, l, t, E))},
                    {"dominant", ids[d]},
                    {"dominant_weight", w[d]}});
    }
    tj["layers"] = std::move(lj);
    toks.push_back(std::move(tj));
  }
  return {{"ids", r.ids}, {"tokens", std::move(toks)}};
}

std::string routing_table(const SequenceRouting& r, const ModelConfig& cfg, const std::vector<std::string>& pieces) {
  std::ostringstream o;
  const int k = cfg.top_k, E = cfg.n_experts;
  char buf[256];
  for (int l : moe_layers(cfg)) {
    o << "layer " << l << " (top-" << k << " of " << E << ", entropy in nats, max ln E = ";
    std::snprintf(buf, sizeof buf, "%.3f", std::log(double(E)));
    o << buf << ")\n";
    o << "  pos  token                 experts:weight" << std::string(size_t(std::max(0, k * 10 - 14)), ' ')
      << "  entropy  dominant\n";
    for (int t = 0; t < r.n_tokens(); ++t) {
      std::string tok = size_t(t) < pieces.size() ? "'" + printable(pieces[size_t(t)]) + "'" : "";
      tok = std::to_string(r.ids[size_t(t)]) + (tok.empty() ? "" : " " + tok);
      // Pad to 20 display columns, counting UTF-8 code points (not bytes); cut longer ones at a character boundary.
      std::string cell;
      int cols = 0;
      for (size_t i = 0; i < tok.size();) {
        size_t n = 1;
        while (i + n < tok.size() && (static_cast<unsigned char>(tok[i + n]) & 0xC0) == 0x80) ++n;
        if (cols == 19 && i + n < tok.size()) {
          cell += "…";
          ++cols;
          break;
        }
        cell += tok.substr(i, n);
        ++cols;
        i += n;
      }
      cell += std::string(size_t(std::max(0, 20 - cols)), ' ');
      std::snprintf(buf, sizeof buf, "  %3d  ", t);
      o << buf << cell << ' ';
      for (int j = 0; j < k; ++j) {
        std::snprintf(buf, sizeof buf, " %3d:%.3f", r.experts[size_t(l)](t, j), r.weights[size_t(l)](t, j));
        o << buf;
      }
      const double h = entropy_at(r, l, t, E);
      const int d = r.experts[size_t(l)](t, dominant_slot(r.weights[size_t(l)].row(t).data(), k));
      if (std::isfinite(h)) std::snprintf(buf, sizeof buf, "  %7.4f  %d\n", h, d);
      else std::snprintf(buf, sizeof buf, "  %7s  %d\n", "-", d);
      o << buf;
    }
  }
  return o.str();
}

json comparison_json(const std::vector<LayerComparison>& c) {
  json a = json::array();
  for (const auto& lc : c)
    a.push_back({{"layer", lc.layer},
                 {"a_experts", lc.a_ids},
                 {"b_experts", lc.b_ids},
                 {"shared", lc.topk.shared},
                 {"overlap", lc.topk.overlap},
                 {"jaccard", lc.topk.jaccard},
                 {"consistent", lc.topk.consistent},
                 {"sym_kl", num(lc.sym_kl)}});
  return a;
}

// ---- paraphrase consistency ---------------------------------------------------------------------------------------

std::vector<ParaphrasePair> counterfact_pairs(const std::vector<CounterFactRecord>& recs, const Tokenizer& tok,
                                              int limit) {
  std::vector<ParaphrasePair> out;
  const size_t n = limit > 0 ? std::min(recs.size(), size_t(limit)) : recs.size();
  for (size_t i = 0; i < n; ++i) {
    const CounterFactRecord& r = recs[i];
    const std::string text = r.rewrite_prompt();
    const Tokenizer::Encoding enc = tok.encode(text);
    if (enc.ids.empty()) continue;
    const auto span = tok.find_span(enc, text, r.subject);
    for (size_t p = 0; p < r.paraphrase_prompts.size(); ++p) {
      const std::string& ptext = r.paraphrase_prompts[p];
      const Tokenizer::Encoding penc = tok.encode(ptext);
      if (penc.ids.empty()) continue;
      const auto pspan = tok.find_span(penc, ptext, r.subject);
      ParaphrasePair pp;
      pp.case_id = r.case_id;
      pp.paraphrase = int(p);
      pp.prompt_text = text;
      pp.paraphrase_text = ptext;
      pp.subject = r.subject;
      pp.prompt_ids = enc.ids;
      pp.paraphrase_ids = penc.ids;
      pp.prompt_subject_last = span ? span->second - 1 : -1;
      pp.paraphrase_subject_last = pspan ? pspan->second - 1 : -1;
      out.push_back(std::move(pp));
    }
  }
  return out;
}

double ConsistencyTally::overall_rate() const {
  long c = 0, t = 0;
  for (size_t i = 0; i < n.size(); ++i) {
    c += consistent[i];
    t += n[i];
  }
  return t ? double(c) / double(t) : 0.0;
}

ConsistencyReport paraphrase_consistency(const Model& m, const std::vector<ParaphrasePair>& pairs,
                                         const ConsistencyOptions& opt) {
  const ModelConfig& c = m.config();
  ConsistencyReport rep;
  rep.k = c.top_k;
  rep.n_experts = c.n_experts;
  rep.layers = moe_layers(c);
  if (opt.routing.interventions) rep.interventions = describe(*opt.routing.interventions);
  const size_t L = rep.layers.size();
  for (auto& t : rep.tally) {
    t.n.assign(L, 0);
    t.consistent.assign(L, 0);
    t.overlap_sum.assign(L, 0);
    t.jaccard_sum.assign(L, 0);
    t.sym_kl_sum.assign(L, 0);
  }
  for (size_t i = 0; i < pairs.size(); ++i) {
    const auto& p = pairs[i];
    const std::string where = "pair " + std::to_string(i) + " (case " + std::to_string(p.case_id) + ")";
    require_input(!p.prompt_ids.empty() && !p.paraphrase_ids.empty(), where + ": empty token sequence");
    require_input(p.prompt_subject_last < int(p.prompt_ids.size()) &&
                      p.paraphrase_subject_last < int(p.paraphrase_ids.size()),
                  where + ": subject position beyond the sequence");
  }

  RoutingOptions ro = opt.routing;
  ro.probabilities = true;
  ProgressFn progress = ro.progress;
  ro.progress = nullptr;
  std::vector<ConsistencyCase> cases;
  cases.reserve(pairs.size());

  // Chunks of pairs; within a chunk each distinct prompt runs once.
  const size_t budget = size_t(std::max(1, ro.max_batch_tokens));
  size_t i = 0;
  while (i < pairs.size()) {
    std::vector<std::vector<int32_t>> seqs;
    std::map<std::vector<int32_t>, int> index;
    std::vector<std::pair<int, int>> which;  // (prompt seq, paraphrase seq) per pair of the chunk
    size_t ntok = 0, j = i;
    auto add = [&](const std::vector<int32_t>& ids) {
      auto it = index.find(ids);
      if (it != index.end()) return it->second;
      seqs.push_back(ids);
      ntok += ids.size();
      return index[ids] = int(seqs.size()) - 1;
    };
    while (j < pairs.size() && (j == i || ntok < budget * 4)) {
      const int a = add(pairs[j].prompt_ids), b = add(pairs[j].paraphrase_ids);
      which.emplace_back(a, b);
      ++j;
    }
    const std::vector<SequenceRouting> r = capture_routing(m, seqs, ro);
    for (size_t q = 0; q < which.size(); ++q) {
      const ParaphrasePair& p = pairs[i + q];
      const SequenceRouting &A = r[size_t(which[q].first)], &B = r[size_t(which[q].second)];
      ConsistencyCase cc;
      cc.pair = p;
      cc.last = compare_tokens(A, A.n_tokens() - 1, B, B.n_tokens() - 1, c);
      const bool subj = p.prompt_subject_last >= 0 && p.paraphrase_subject_last >= 0;
      if (subj) cc.subject_last = compare_tokens(A, p.prompt_subject_last, B, p.paraphrase_subject_last, c);
      else ++rep.subject_missing;
      double ov = 0, kl = 0;
      int cells = 0;
      for (int w = 0; w < 2; ++w) {
        const auto& comps = w == int(Where::SubjectLast) ? cc.subject_last : cc.last;
        if (comps.empty()) continue;
        ConsistencyTally& t = rep.tally[w];
        ++t.n_pairs;
        bool all = true;
        for (size_t li = 0; li < comps.size(); ++li) {
          const auto& lc = comps[li];
          ++t.n[li];
          t.consistent[li] += lc.topk.consistent;
          t.overlap_sum[li] += lc.topk.overlap;
          t.jaccard_sum[li] += lc.topk.jaccard;
          t.sym_kl_sum[li] += lc.sym_kl;
          all = all && lc.topk.consistent;
          ov += lc.topk.overlap;
          kl += lc.sym_kl;
          ++cells;
        }
        t.all_layers_consistent += all;
      }
      cc.mean_overlap = cells ? ov / cells : 0;
      cc.mean_sym_kl = cells ? kl / cells : 0;
      cases.push_back(std::move(cc));
    }
    i = j;
    if (progress) progress(i, pairs.size());
  }
  rep.n_pairs = int(pairs.size());
  auto worse = [](const ConsistencyCase& a, const ConsistencyCase& b) {
    if (a.mean_overlap != b.mean_overlap) return a.mean_overlap < b.mean_overlap;
    if (a.mean_sym_kl != b.mean_sym_kl) return a.mean_sym_kl > b.mean_sym_kl;
    if (a.pair.case_id != b.pair.case_id) return a.pair.case_id < b.pair.case_id;
    return a.pair.paraphrase < b.pair.paraphrase;
  };
  const size_t keep = std::min(cases.size(), size_t(std::max(0, opt.top_cases)));
  std::partial_sort(cases.begin(), cases.begin() + long(keep), cases.end(), worse);
  cases.resize(keep);
  rep.most_different = std::move(cases);
  return rep;
}

json ConsistencyReport::to_json() const {
  json pos = json::object();
  for (int w = 0; w < 2; ++w) {
    const ConsistencyTally& t = tally[w];
    json per = json::array();
    for (size_t i = 0; i < layers.size(); ++i)
      per.push_back({{"layer", layers[i]},
                     {"n", t.n[i]},
                     {"consistent", t.consistent[i]},
                     {"rate", t.rate(i)},
                     {"mean_overlap", t.mean_overlap(i)},
                     {"mean_jaccard", t.mean_jaccard(i)},
                     {"mean_sym_kl", num(t.mean_sym_kl(i))}});
    pos[where_name(Where(w))] = {{"per_layer", std::move(per)},
                                 {"n_pairs", t.n_pairs},
                                 {"overall_rate", t.overall_rate()},
                                 {"all_layers_rate", t.all_layers_rate()}};
  }
  json worst = json::array();
  for (const auto& cc : most_different)
    worst.push_back({{"case_id", cc.pair.case_id},
                     {"paraphrase", cc.pair.paraphrase},
                     {"prompt", cc.pair.prompt_text},
                     {"paraphrase_prompt", cc.pair.paraphrase_text},
                     {"subject", cc.pair.subject},
                     {"mean_overlap", cc.mean_overlap},
                     {"mean_sym_kl", num(cc.mean_sym_kl)},
                     {"subject_last", comparison_json(cc.subject_last)},
                     {"last", comparison_json(cc.last)}});
  return {{"k", k},
          {"n_experts", n_experts},
          {"consistent_if_shared_at_least", k - 1},
          {"layers", layers},
          {"n_pairs", n_pairs},
          {"subject_missing", subject_missing},
          {"interventions", interventions},
          {"positions", std::move(pos)},
          {"most_different", std::move(worst)}};
}

std::string ConsistencyReport::table() const {
  std::ostringstream o;
  char buf[512];
  o << "Paraphrase routing consistency: " << n_pairs << " pairs, top-" << k << " of " << n_experts
    << " experts; consistent = at least " << (k - 1) << " of " << k << " experts shared";
  if (subject_missing) o << "; subject not found in " << subject_missing << " pairs (last token only)";
  if (!interventions.empty()) o << "\ninterventions: " << interventions;
  o << "\n\n";
  std::snprintf(buf, sizeof buf, "%-7s | %-36s | %-36s\n", "", "subject's last token", "last token");
  o << buf;
  std::snprintf(buf, sizeof buf, "%-7s | %7s %8s %8s %9s | %7s %8s %8s %9s\n", "layer", "consist", "overlap",
                "jaccard", "sym KL", "consist", "overlap", "jaccard", "sym KL");
  o << buf;
  const ConsistencyTally &s = tally[0], &l = tally[1];
  for (size_t i = 0; i < layers.size(); ++i) {
    std::snprintf(buf, sizeof buf, "%-7d | %7.3f %8.3f %8.3f %9.4f | %7.3f %8.3f %8.3f %9.4f\n", layers[i], s.rate(i),
                  s.mean_overlap(i), s.mean_jaccard(i), s.mean_sym_kl(i), l.rate(i), l.mean_overlap(i),
                  l.mean_jaccard(i), l.mean_sym_kl(i));
    o << buf;
  }
  std::snprintf(buf, sizeof buf, "%-7s | %7.3f %35s | %7.3f\n", "overall", s.overall_rate(), "", l.overall_rate());
  o << buf;
  std::snprintf(buf, sizeof buf, "%-7s | %7.3f %35s | %7.3f\n", "all L", s.all_layers_rate(), "", l.all_layers_rate());
  o << buf;
  o << "(overall: consistent (pair, layer) cells / all cells; all L: pairs consistent at every MoE layer)\n";
  if (!most_different.empty()) {
    o << "\nMost different cases (lowest mean overlap over layers and both positions):\n";
    for (const auto& cc : most_different) {
      std::snprintf(buf, sizeof buf, "  case %d paraphrase %d: mean overlap %.3f, mean sym KL %.4f\n", cc.pair.case_id,
                    cc.pair.paraphrase, cc.mean_overlap, cc.mean_sym_kl);
      o << buf << "    prompt:     " << printable(cc.pair.prompt_text) << "\n"
        << "    paraphrase: " << printable(cc.pair.paraphrase_text) << "\n";
    }
  }
  return o.str();
}

// ---- SVG ----------------------------------------------------------------------------------------------------------

using trace::svg::escape;

std::string consistency_svg(const ConsistencyReport& rep, const std::string& title) {
  const int nL = int(rep.layers.size());
  const double left = 60, right = 170, top = 50, bottom = 55, plot_h = 260;
  const double group_w = std::max(40.0, std::min(130.0, 700.0 / std::max(1, nL)));
  const double plot_w = group_w * std::max(1, nL);
  const double W = std::max(760.0, left + plot_w + right), Hh = top + plot_h + bottom;
  const char* colors[2] = {"#7b3294", "#e66101"};  // subject's last token, last token
  const char* labels[2] = {"subject's last token", "last token"};
  auto y = [&](double v) { return top + plot_h * (1.0 - std::clamp(v, 0.0, 1.0)); };
  std::ostringstream o;
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" viewBox=\"0 0 %.0f %.0f\" "
                "font-family=\"sans-serif\" font-size=\"12\">\n",
                W, Hh, W, Hh);
  o << buf << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  std::snprintf(buf, sizeof buf, "<text x=\"%.1f\" y=\"22\" font-size=\"14\" font-weight=\"bold\">", left);
  o << buf << escape(title) << "</text>\n";
  std::snprintf(buf, sizeof buf,
                "<text x=\"%.1f\" y=\"38\" fill=\"#555\" font-size=\"11\">bars: consistency rate (≥ %d of %d experts shared); "
                "dashed: mean overlap |A∩B|/k; %d pairs</text>\n",
                left, rep.k - 1, rep.k, rep.n_pairs);
  o << buf;
  // Axes and grid.
  for (int g = 0; g <= 5; ++g) {
    const double v = g / 5.0, yy = y(v);
    std::snprintf(buf, sizeof buf,
                  "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/>"
                  "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%.1f</text>\n",
                  left, yy, left + plot_w, yy, left - 6, yy + 4, v);
    o << buf;
  }
  std::snprintf(buf, sizeof buf,
                "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"black\"/>"
                "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"black\"/>\n",
                left, top, left, top + plot_h, left, top + plot_h, left + plot_w, top + plot_h);
  o << buf;
  std::snprintf(buf, sizeof buf,
                "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">MoE layer</text>"
                "<text transform=\"translate(16 %.1f) rotate(-90)\" text-anchor=\"middle\">rate / overlap</text>\n",
                left + plot_w / 2, top + plot_h + 40, top + plot_h / 2);
  o << buf;
  const double bar_w = group_w * 0.32;
  for (int i = 0; i < nL; ++i) {
    const double gx = left + group_w * i;
    for (int w = 0; w < 2; ++w) {
      const ConsistencyTally& t = rep.tally[w];
      const double v = t.rate(size_t(i));
      const double x = gx + group_w * 0.16 + bar_w * w;
      std::snprintf(buf, sizeof buf,
                    "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"%s\" fill-opacity=\"0.8\">"
                    "<title>layer %d, %s: rate %.3f (%d/%d), mean overlap %.3f</title></rect>"
                    "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\" font-size=\"10\">%.2f</text>\n",
                    x, y(v), bar_w, top + plot_h - y(v), colors[w], rep.layers[size_t(i)], labels[w], v,
                    t.consistent[size_t(i)], t.n[size_t(i)], t.mean_overlap(size_t(i)), x + bar_w / 2, y(v) - 3, v);
      o << buf;
    }
    std::snprintf(buf, sizeof buf, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%d</text>\n", gx + group_w / 2,
                  top + plot_h + 18, rep.layers[size_t(i)]);
    o << buf;
  }
  for (int w = 0; w < 2; ++w) {
    const ConsistencyTally& t = rep.tally[w];
    if (!t.n_pairs) continue;
    o << "<polyline fill=\"none\" stroke=\"" << colors[w] << "\" stroke-width=\"2\" stroke-dasharray=\"5,3\" points=\"";
    for (int i = 0; i < nL; ++i) {
      std::snprintf(buf, sizeof buf, "%s%.1f,%.1f", i ? " " : "", left + group_w * i + group_w / 2,
                    y(t.mean_overlap(size_t(i))));
      o << buf;
    }
    o << "\"/>\n";
    for (int i = 0; i < nL; ++i) {
      std::snprintf(buf, sizeof buf, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3\" fill=\"%s\"/>\n",
                    left + group_w * i + group_w / 2, y(t.mean_overlap(size_t(i))), colors[w]);
      o << buf;
    }
  }
  // Legend.
  for (int w = 0; w < 2; ++w) {
    const double lx = left + plot_w + 15, ly = top + 10 + 40 * w;
    std::snprintf(buf, sizeof buf,
                  "<rect x=\"%.1f\" y=\"%.1f\" width=\"12\" height=\"12\" fill=\"%s\" fill-opacity=\"0.8\"/>"
                  "<text x=\"%.1f\" y=\"%.1f\">%s</text>"
                  "<text x=\"%.1f\" y=\"%.1f\" fill=\"#555\" font-size=\"11\">overall %.3f</text>\n",
                  lx, ly, colors[w], lx + 17, ly + 10, labels[w], lx + 17, ly + 25, rep.tally[w].overall_rate());
    o << buf;
  }
  o << "</svg>\n";
  return o.str();
}

}  // namespace moedit
