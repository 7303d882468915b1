#include "tracing/routing_profile.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>

#include "datasets/counterfact.h"
#include "io/errors.h"
#include "io/files.h"
#include "io/npy.h"
#include "io/text.h"
#include "tokenizer/tokenizer.h"

namespace moedit {

using json = nlohmann::json;

namespace {

bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

std::string trim(const std::string& s) {
  size_t a = 0, b = s.size();
  while (a < b && std::isspace(static_cast<unsigned char>(s[a]))) ++a;
  while (b > a && std::isspace(static_cast<unsigned char>(s[b - 1]))) --b;
  return s.substr(a, b - a);
}

json num(double v) { return std::isfinite(v) ? json(v) : json(nullptr); }

// Appends a document's ids as chunks; returns false once the token budget is spent.
bool append_doc(std::vector<std::vector<int32_t>>& out, const std::vector<int32_t>& ids, const CorpusOptions& opt,
                int64_t& total) {
  const size_t chunk = size_t(std::max(1, opt.max_seq_len));
  for (size_t i = 0; i < ids.size(); i += chunk) {
    size_t n = std::min(chunk, ids.size() - i);
    if (opt.max_tokens > 0) n = size_t(std::min<int64_t>(int64_t(n), opt.max_tokens - total));
    if (n == 0) return false;
    out.emplace_back(ids.begin() + long(i), ids.begin() + long(i + n));
    total += int64_t(n);
    if (opt.max_tokens > 0 && total >= opt.max_tokens) return false;
  }
  return true;
}

std::vector<int32_t> parse_id_line(const std::string& line, const std::string& where) {
  std::vector<int32_t> ids;
  for (const std::string& tok : split_list(line)) ids.push_back(parse_token_id(trim(tok), where));
  return ids;
}

}  // namespace

std::vector<std::vector<int32_t>> load_corpus(const std::string& path, const Tokenizer* tok, const CorpusOptions& opt) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError(path + ": cannot open");
  std::vector<std::vector<int32_t>> out;
  int64_t total = 0;
  int docs = 0;
  auto text_doc = [&](const std::string& text) {
    if (!tok) throw InputError(path + ": a text corpus needs a tokenizer (the model folder has no tokenizer.json; "
                               "give a .ids file of comma-separated token ids instead)");
    if (opt.max_docs > 0 && docs >= opt.max_docs) return false;
    ++docs;
    return append_doc(out, tok->encode(text).ids, opt, total);
  };
  if (ends_with(path, ".ids")) {
    std::string line;
    int ln = 0;
    while (std::getline(in, line)) {
      ++ln;
      if (trim(line).empty()) continue;
      if (opt.max_docs > 0 && docs >= opt.max_docs) break;
      ++docs;
      if (!append_doc(out, parse_id_line(line, path + ": line " + std::to_string(ln)), opt, total)) break;
    }
  } else if (ends_with(path, ".jsonl")) {
    std::string line;
    int ln = 0;
    while (std::getline(in, line)) {
      ++ln;
      if (trim(line).empty()) continue;
      const json j = json::parse(line, nullptr, false);
      std::string text;
      if (j.is_string()) text = j.get<std::string>();
      else if (j.is_object() && j.contains("text") && j["text"].is_string()) text = j["text"].get<std::string>();
      else throw InputError(path + ": line " + std::to_string(ln) + ": expected a JSON object with a \"text\" string");
      if (!text_doc(text)) break;
    }
  } else if (ends_with(path, ".json")) {
    const json j = json::parse(in, nullptr, false);
    if (j.is_discarded()) throw InputError(path + ": not valid JSON");
    if (!j.is_array()) throw InputError(path + ": expected a JSON list of strings or of CounterFact records");
    if (!j.empty() && j[0].is_object()) {
      for (const auto& r : load_counterfact(path)) {
        bool more = text_doc(r.rewrite_prompt());
        for (size_t i = 0; more && i < r.neighborhood_prompts.size(); ++i) more = text_doc(r.neighborhood_prompts[i]);
        if (!more) break;
      }
    } else {
      for (size_t i = 0; i < j.size(); ++i) {
        if (!j[i].is_string()) throw InputError(path + ": item " + std::to_string(i) + " is not a string");
        if (!text_doc(j[i].get<std::string>())) break;
      }
    }
  } else {
    std::string line;
    while (std::getline(in, line)) {
      const std::string t = trim(line);
      if (t.empty()) continue;
      if (!text_doc(t)) break;
    }
  }
  if (out.empty()) throw InputError(path + ": no tokens (empty corpus)");
  return out;
}

// ---- activation profiles ------------------------------------------------------------------------------------------

ActivationProfile ActivationProfile::empty_for(const ModelConfig& cfg) {
  ActivationProfile p;
  p.n_layers = cfg.n_layers;
  p.n_experts = cfg.n_experts;
  p.top_k = cfg.top_k;
  p.layers = moe_layers(cfg);
  p.counts = Eigen::MatrixXd::Zero(long(p.layers.size()), cfg.n_experts);
  p.weight_sum = Eigen::MatrixXd::Zero(long(p.layers.size()), cfg.n_experts);
  return p;
}

void count_experts(const SequenceRouting& r, const std::vector<int>& layers, int t0, int t1, Eigen::MatrixXd& counts,
                   Eigen::MatrixXd* weight_sum) {
  for (size_t i = 0; i < layers.size(); ++i) {
    const IdMat& ids = r.experts[size_t(layers[i])];
    const MatR* w = weight_sum ? &r.weights[size_t(layers[i])] : nullptr;
    for (int t = t0; t < t1; ++t)
      for (int j = 0; j < int(ids.cols()); ++j) {
        counts(long(i), ids(t, j)) += 1;
        if (w) (*weight_sum)(long(i), ids(t, j)) += (*w)(t, j);
      }
  }
}

void ActivationProfile::add(const SequenceRouting& r) {
  count_experts(r, layers, 0, r.n_tokens(), counts, &weight_sum);
  tokens += r.n_tokens();
}

void ActivationProfile::add(const ActivationProfile& o) {
  if (o.layers != layers || o.n_experts != n_experts)
    throw std::invalid_argument("ActivationProfile::add: profiles of different models");
  counts += o.counts;
  weight_sum += o.weight_sum;
  tokens += o.tokens;
}

Eigen::MatrixXd ActivationProfile::frequency() const {
  return tokens ? Eigen::MatrixXd(counts / double(tokens)) : Eigen::MatrixXd::Zero(counts.rows(), counts.cols());
}

Eigen::MatrixXd ActivationProfile::load() const {
  return tokens ? Eigen::MatrixXd(counts / (double(tokens) * top_k))
                : Eigen::MatrixXd::Zero(counts.rows(), counts.cols());
}

std::vector<double> ActivationProfile::max_over_uniform() const {
  std::vector<double> v;
  const Eigen::MatrixXd ld = load();
  for (long i = 0; i < ld.rows(); ++i) v.push_back(ld.row(i).maxCoeff() * n_experts);
  return v;
}

json ActivationProfile::to_json() const {
  const Eigen::MatrixXd f = frequency(), ld = load();
  json fj = json::array(), lj = json::array(), cj = json::array(), wj = json::array();
  for (long i = 0; i < f.rows(); ++i) {
    std::vector<double> fr(static_cast<size_t>(f.cols())), lr(size_t(f.cols())), cr(size_t(f.cols())), wr(size_t(f.cols()));
    for (long e = 0; e < f.cols(); ++e) {
      fr[size_t(e)] = f(i, e);
      lr[size_t(e)] = ld(i, e);
      cr[size_t(e)] = counts(i, e);
      wr[size_t(e)] = weight_sum(i, e);
    }
    fj.push_back(fr);
    lj.push_back(lr);
    cj.push_back(cr);
    wj.push_back(wr);
  }
  return {{"layers", layers},   {"n_experts", n_experts}, {"top_k", top_k},       {"tokens", tokens},
          {"frequency", fj},    {"load", lj},             {"counts", cj},         {"weight_sum", wj},
          {"max_load_over_uniform", max_over_uniform()}};
}

std::string ActivationProfile::to_csv() const {
  std::ostringstream o;
  o << "layer";
  for (int e = 0; e < n_experts; ++e) o << ",e" << e;
  o << "\n";
  const Eigen::MatrixXd f = frequency();
  char buf[64];
  for (long i = 0; i < f.rows(); ++i) {
    o << layers[size_t(i)];
    for (long e = 0; e < f.cols(); ++e) {
      std::snprintf(buf, sizeof buf, ",%.9g", f(i, e));
      o << buf;
    }
    o << "\n";
  }
  return o.str();
}

void ActivationProfile::write_npy(const std::string& path) const {
  const Eigen::MatrixXd f = frequency();
  std::vector<float> v;
  for (long i = 0; i < f.rows(); ++i)
    for (long e = 0; e < f.cols(); ++e) v.push_back(float(f(i, e)));
  write_file_atomic(path, npy_f32({layers.size(), size_t(n_experts)}, v));
}

std::string ActivationProfile::table() const {
  std::ostringstream o;
  char buf[64];
  o << "Activation frequency (tokens routed to the expert / " << tokens << " tokens; top-" << top_k << ", so each "
    << "row sums to " << top_k << ")\n";
  o << "layer ";
  for (int e = 0; e < n_experts; ++e) {
    char name[16];
    std::snprintf(name, sizeof name, "e%d", e);
    std::snprintf(buf, sizeof buf, " %6s", name);
    o << buf;
  }
  o << "  max/uniform\n";
  const Eigen::MatrixXd f = frequency();
  const auto imb = max_over_uniform();
  for (long i = 0; i < f.rows(); ++i) {
    std::snprintf(buf, sizeof buf, "%5d ", layers[size_t(i)]);
    o << buf;
    for (long e = 0; e < f.cols(); ++e) {
      std::snprintf(buf, sizeof buf, " %6.3f", f(i, e));
      o << buf;
    }
    std::snprintf(buf, sizeof buf, "  %6.2f\n", imb[size_t(i)]);
    o << buf;
  }
  return o.str();
}

ActivationProfile activation_profile(const Model& m, const std::vector<std::vector<int32_t>>& seqs,
                                     const RoutingOptions& opt) {
  ActivationProfile p = ActivationProfile::empty_for(m.config());
  RoutingOptions ro = opt;
  ro.probabilities = false;
  // In chunks, so that memory stays bounded for large corpora.
  const size_t chunk = 256;
  for (size_t i = 0; i < seqs.size(); i += chunk) {
    const std::vector<std::vector<int32_t>> part(seqs.begin() + long(i),
                                                 seqs.begin() + long(std::min(seqs.size(), i + chunk)));
    ro.progress = nullptr;
    for (const auto& r : capture_routing(m, part, ro)) p.add(r);
    if (opt.progress) opt.progress(std::min(seqs.size(), i + chunk), seqs.size());
  }
  return p;
}

// ---- comparison ---------------------------------------------------------------------------------------------------

ProfileComparison compare_profiles(const ActivationProfile& a, const ActivationProfile& b, const std::string& name_a,
                                   const std::string& name_b) {
  if (a.layers != b.layers || a.n_experts != b.n_experts)
    throw std::invalid_argument("compare_profiles: profiles of different models");
  ProfileComparison c;
  c.name_a = name_a;
  c.name_b = name_b;
  c.tokens_a = a.tokens;
  c.tokens_b = b.tokens;
  const Eigen::MatrixXd fa = a.frequency(), fb = b.frequency();
  const double eps = 1e-4;
  for (size_t i = 0; i < a.layers.size(); ++i)
    for (int e = 0; e < a.n_experts; ++e) {
      ExpertDiff d;
      d.layer = a.layers[i];
      d.expert = e;
      d.freq_a = fa(long(i), e);
      d.freq_b = fb(long(i), e);
      d.diff = d.freq_a - d.freq_b;
      d.log2_ratio = std::log2((d.freq_a + eps) / (d.freq_b + eps));
      c.experts.push_back(d);
    }
  std::stable_sort(c.experts.begin(), c.experts.end(),
                   [](const ExpertDiff& x, const ExpertDiff& y) { return x.diff > y.diff; });
  return c;
}

std::vector<ExpertDiff> ProfileComparison::more_in(bool a, int n) const {
  std::vector<ExpertDiff> v;
  if (a) {
    for (const auto& d : experts)
      if (d.diff > 0 && int(v.size()) < n) v.push_back(d);
  } else {
    for (auto it = experts.rbegin(); it != experts.rend(); ++it)
      if (it->diff < 0 && int(v.size()) < n) v.push_back(*it);
  }
  return v;
}

json ProfileComparison::to_json(int top) const {
  auto arr = [](const std::vector<ExpertDiff>& v) {
    json a = json::array();
    for (const auto& d : v)
      a.push_back({{"layer", d.layer}, {"expert", d.expert}, {"freq_a", d.freq_a}, {"freq_b", d.freq_b},
                   {"diff", d.diff}, {"log2_ratio", d.log2_ratio}});
    return a;
  };
  return {{"a", name_a},         {"b", name_b},
          {"tokens_a", tokens_a}, {"tokens_b", tokens_b},
          {"more_in_a", arr(more_in(true, top))}, {"more_in_b", arr(more_in(false, top))},
          {"all", arr(experts)}};
}

std::string ProfileComparison::table(int top) const {
  std::ostringstream o;
  char buf[256];
  for (int side = 0; side < 2; ++side) {
    const bool a = side == 0;
    o << "Experts used more by " << (a ? name_a : name_b) << " (" << (a ? tokens_a : tokens_b) << " tokens) than by "
      << (a ? name_b : name_a) << " (" << (a ? tokens_b : tokens_a) << " tokens):\n";
    o << "  layer expert   freq_" << (a ? "A" : "B") << "   freq_" << (a ? "B" : "A") << "     diff  log2 ratio\n";
    for (const auto& d : more_in(a, top)) {
      std::snprintf(buf, sizeof buf, "  %5d %6d  %7.4f  %7.4f  %+7.4f  %+9.3f\n", d.layer, d.expert,
                    a ? d.freq_a : d.freq_b, a ? d.freq_b : d.freq_a, a ? d.diff : -d.diff,
                    a ? d.log2_ratio : -d.log2_ratio);
      o << buf;
    }
  }
  return o.str();
}

// ---- domain experts -----------------------------------------------------------------------------------------------

DomainAnalysis domain_experts(const std::vector<std::string>& names, const std::vector<ActivationProfile>& profiles,
                              double min_score, double min_rate) {
  if (profiles.size() < 2 || names.size() != profiles.size())
    throw InputError("domain experts need at least two labelled text sets");
  const ActivationProfile& p0 = profiles[0];
  for (const auto& p : profiles) {
    if (p.layers != p0.layers || p.n_experts != p0.n_experts)
      throw std::invalid_argument("domain_experts: profiles of different models");
    if (p.tokens == 0) throw InputError("domain experts: a text set has no tokens");
  }
  DomainAnalysis a;
  a.domains = names;
  a.min_score = min_score;
  a.min_rate = min_rate;
  const int D = int(profiles.size());
  std::vector<Eigen::MatrixXd> f;
  for (const auto& p : profiles) {
    f.push_back(p.frequency());
    a.tokens.push_back(p.tokens);
  }
  for (size_t i = 0; i < p0.layers.size(); ++i)
    for (int e = 0; e < p0.n_experts; ++e) {
      DomainExpertScore s;
      s.layer = p0.layers[i];
      s.expert = e;
      double sum = 0;
      for (int d = 0; d < D; ++d) {
        s.rates.push_back(f[size_t(d)](long(i), e));
        sum += s.rates.back();
      }
      s.share.assign(size_t(D), 0.0);
      if (sum > 0) {
        for (int d = 0; d < D; ++d) s.share[size_t(d)] = s.rates[size_t(d)] / sum;
        for (int d = 0; d < D; ++d)
          if (s.share[size_t(d)] > 0) s.entropy -= s.share[size_t(d)] * std::log(s.share[size_t(d)]);
        s.certainty = std::max(0.0, 1.0 - s.entropy / std::log(double(D)));
        s.domain = int(std::max_element(s.share.begin(), s.share.end()) - s.share.begin());
        s.score = s.share[size_t(s.domain)] * s.certainty;
      } else {
        s.entropy = std::log(double(D));  // never used anywhere: no preference
      }
      s.strong = sum > 0 && s.score >= min_score && s.rates[size_t(s.domain)] >= min_rate;
      a.experts.push_back(std::move(s));
    }
  std::stable_sort(a.experts.begin(), a.experts.end(),
                   [](const DomainExpertScore& x, const DomainExpertScore& y) { return x.score > y.score; });
  return a;
}

std::vector<DomainExpertScore> DomainAnalysis::strong_for(int domain) const {
  std::vector<DomainExpertScore> v;
  for (const auto& s : experts)
    if (s.strong && s.domain == domain) v.push_back(s);
  return v;
}

json DomainAnalysis::to_json() const {
  auto one = [&](const DomainExpertScore& s) {
    return json{{"layer", s.layer},         {"expert", s.expert},     {"domain", domains[size_t(s.domain)]},
                {"rates", s.rates},         {"share", s.share},       {"entropy", s.entropy},
                {"certainty", s.certainty}, {"score", s.score},       {"strong", s.strong}};
  };
  json per = json::object();
  for (size_t d = 0; d < domains.size(); ++d) {
    json a = json::array();
    for (const auto& s : strong_for(int(d))) a.push_back(one(s));
    per[domains[d]] = std::move(a);
  }
  json all = json::array();
  for (const auto& s : experts) all.push_back(one(s));
  return {{"domains", domains}, {"tokens", tokens},          {"min_score", min_score},
          {"min_rate", min_rate}, {"domain_experts", per}, {"all", all}};
}

std::string DomainAnalysis::table(int top) const {
  std::ostringstream o;
  char buf[256];
  o << "Domain experts: score = share of the preferred domain × (1 − H/ln " << domains.size()
    << "), H = entropy of the expert's activation rates across domains; strong: score ≥ " << min_score
    << (min_rate > 0 ? " and rate ≥ " + std::to_string(min_rate) : std::string()) << "\n";
  for (size_t d = 0; d < domains.size(); ++d) {
    const auto v = strong_for(int(d));
    o << "\n" << domains[d] << " (" << tokens[d] << " tokens): " << v.size() << " strong experts\n";
    o << "  layer expert    score  certainty  rates (";
    for (size_t q = 0; q < domains.size(); ++q) o << (q ? " / " : "") << domains[q];
    o << ")\n";
    int shown = 0;
    for (const auto& s : v) {
      if (shown++ >= top) break;
      std::snprintf(buf, sizeof buf, "  %5d %6d  %7.4f  %9.4f  ", s.layer, s.expert, s.score, s.certainty);
      o << buf;
      for (size_t q = 0; q < s.rates.size(); ++q) {
        std::snprintf(buf, sizeof buf, "%s%.4f", q ? " / " : "", s.rates[q]);
        o << buf;
      }
      o << "\n";
    }
  }
  return o.str();
}

// ---- driver experts -----------------------------------------------------------------------------------------------

std::vector<double> next_token_kl(const MatR& P, const MatR& Q) {
  std::vector<double> out(static_cast<size_t>(P.rows()));
  const int V = int(P.cols());
  std::vector<double> lp(static_cast<size_t>(V)), lq(static_cast<size_t>(V));
  auto log_softmax = [V](const float* z, std::vector<double>& o) {
    double m = -std::numeric_limits<double>::infinity();
    for (int v = 0; v < V; ++v) m = std::max(m, double(z[v]));
    double s = 0;
    for (int v = 0; v < V; ++v) s += std::exp(double(z[v]) - m);
    const double lse = m + std::log(s);
    for (int v = 0; v < V; ++v) o[size_t(v)] = double(z[v]) - lse;
  };
  for (int t = 0; t < int(P.rows()); ++t) {
    log_softmax(P.row(t).data(), lp);
    log_softmax(Q.row(t).data(), lq);
    double kl = 0;
    for (int v = 0; v < V; ++v) {
      const double p = std::exp(lp[size_t(v)]);
      if (p > 0) kl += p * (lp[size_t(v)] - lq[size_t(v)]);
    }
    out[size_t(t)] = std::max(0.0, kl);
  }
  return out;
}

DriverAnalysis driver_experts(const Model& m, const std::vector<std::vector<int32_t>>& seqs, const DriverOptions& opt) {
  const ModelConfig& c = m.config();
  std::vector<int> layers = opt.layers.empty() ? moe_layers(c) : opt.layers;
  for (int l : layers)
    require_input(l >= 0 && l < c.n_layers && c.is_moe(l), "--layers: " + std::to_string(l) + " is not an MoE layer");
  if (layers.empty()) throw InputError(c.source + ": the model has no MoE layers");
  std::sort(layers.begin(), layers.end());
  if (opt.interventions) validate_interventions(*opt.interventions, c);
  for (size_t s = 0; s < seqs.size(); ++s)
    if (seqs[s].empty()) throw InputError("sequence " + std::to_string(s) + " is empty");
  if (seqs.empty()) throw InputError("driver experts: no texts");
  if (opt.kind == Perturbation::Scale && !std::isfinite(opt.scale)) throw InputError("--scale must be finite");
  const int E = c.n_experts;

  // Which experts can be perturbed: a mask needs the expert unmasked and at least k others left.
  std::vector<std::vector<char>> base_masked(size_t(c.n_layers), std::vector<char>(size_t(E), 0));
  if (opt.interventions)
    for (const auto& r : opt.interventions->mask) base_masked[size_t(r.layer)][size_t(r.expert)] = 1;

  DriverAnalysis out;
  out.kind = opt.kind;
  out.scale = opt.scale;
  for (int l : layers)
    for (int e = 0; e < E; ++e) {
      DriverExpert d;
      d.layer = l;
      d.expert = e;
      int n_masked = 0;
      for (char b : base_masked[size_t(l)]) n_masked += b;
      d.skipped = base_masked[size_t(l)][size_t(e)] ||
                  (opt.kind == Perturbation::Mask && E - n_masked - 1 < c.top_k);
      out.experts.push_back(d);
    }
  std::vector<double> kl_sum(out.experts.size(), 0.0);
  std::vector<int64_t> count(out.experts.size(), 0);  // routed-token counts in the clean run (activation rate)

  Hooks base;
  if (opt.interventions) install_interventions(*opt.interventions, c, base);
  const size_t budget = size_t(std::max(1, opt.max_batch_tokens));
  std::vector<std::pair<size_t, size_t>> batches;
  for (size_t i = 0; i < seqs.size();) {
    size_t j = i, ntok = 0;
    while (j < seqs.size() && (j == i || ntok + seqs[j].size() <= budget)) ntok += seqs[j++].size();
    batches.emplace_back(i, j);
    i = j;
  }
  const size_t total_work = batches.size() * out.experts.size();
  size_t done = 0;
  int64_t tokens = 0;
  for (const auto& [i, j] : batches) {
    const std::vector<std::vector<int32_t>> batch(seqs.begin() + long(i), seqs.begin() + long(j));
    const TokenLayout layout = make_layout(batch, nullptr);
    std::vector<int32_t> flat;
    for (const auto& s : batch) flat.insert(flat.end(), s.begin(), s.end());
    const Hooks* bh = base.empty() ? nullptr : &base;

    // Clean run, keeping the residual entering each perturbed layer.
    std::vector<MatR> resid(size_t(c.n_layers));
    MatR x = m.embed(flat, layout, bh);
    std::vector<LayerRouting> routing(size_t(c.n_layers));
    for (int l = 0; l < c.n_layers; ++l) {
      if (std::binary_search(layers.begin(), layers.end(), l)) resid[size_t(l)] = x;
      m.block(l, x, layout, nullptr, bh, &routing[size_t(l)]);
    }
    const MatR clean = m.logits(x, layout, bh);
    for (size_t q = 0; q < out.experts.size(); ++q) {
      const LayerRouting& r = routing[size_t(out.experts[q].layer)];
      for (int t = 0; t < int(r.ids.rows()); ++t)
        for (int s = 0; s < int(r.ids.cols()); ++s) count[q] += r.ids(t, s) == out.experts[q].expert;
    }

    for (size_t q = 0; q < out.experts.size(); ++q) {
      DriverExpert& d = out.experts[q];
      if (!d.skipped) {
        Hooks h = base;
        const int le = d.layer, ee = d.expert;
        if (opt.kind == Perturbation::Mask) {
          h.add(hook_names::router_logits(le), [ee](Eigen::Ref<MatR> z, const HookContext&) {
            z.col(ee).setConstant(-std::numeric_limits<float>::infinity());
          });
        } else {
          const float s = opt.scale;
          h.add(hook_names::router_logits(le), [ee, s](Eigen::Ref<MatR> z, const HookContext&) { z.col(ee) *= s; });
        }
        MatR y = resid[size_t(le)];
        for (int l = le; l < c.n_layers; ++l) m.block(l, y, layout, nullptr, &h, nullptr);
        const MatR pert = m.logits(y, layout, &h);
        for (double v : next_token_kl(clean, pert)) {
          kl_sum[q] += v;
          d.max_kl = std::max(d.max_kl, v);
        }
      }
      if (opt.progress) opt.progress(++done, total_work);
    }
    tokens += int64_t(flat.size());
  }
  out.tokens = tokens;
  for (size_t q = 0; q < out.experts.size(); ++q) {
    out.experts[q].mean_kl = tokens ? kl_sum[q] / double(tokens) : 0.0;
    out.experts[q].activation_rate = tokens ? double(count[q]) / double(tokens) : 0.0;
  }
  std::stable_sort(out.experts.begin(), out.experts.end(), [](const DriverExpert& a, const DriverExpert& b) {
    if (a.skipped != b.skipped) return !a.skipped;
    return a.mean_kl > b.mean_kl;
  });
  return out;
}

json DriverAnalysis::to_json(int top) const {
  json a = json::array();
  int n = 0;
  for (const auto& d : experts) {
    if (top > 0 && n++ >= top) break;
    a.push_back({{"layer", d.layer}, {"expert", d.expert}, {"mean_kl", d.mean_kl}, {"max_kl", num(d.max_kl)},
                 {"activation_rate", d.activation_rate}, {"skipped", d.skipped}});
  }
  return {{"tokens", tokens},
          {"perturbation", kind == Perturbation::Mask ? "mask" : "scale"},
          {"scale", kind == Perturbation::Scale ? json(scale) : json(nullptr)},
          {"experts", a}};
}

std::string DriverAnalysis::table(int top) const {
  std::ostringstream o;
  char buf[256];
  o << "Driver experts: mean KL(clean ‖ perturbed) of the next-token distribution over " << tokens
    << " positions; perturbation: "
    << (kind == Perturbation::Mask ? std::string("mask (router logit → −∞)")
                                   : "scale (router logit × " + std::to_string(scale) + ")")
    << "\n  rank  layer expert     mean KL      max KL  activation rate\n";
  int n = 0;
  for (const auto& d : experts) {
    if (n >= top) break;
    ++n;
    if (d.skipped) std::snprintf(buf, sizeof buf, "  %4d  %5d %6d  (skipped: already masked / would leave < k)\n", n,
                                 d.layer, d.expert);
    else std::snprintf(buf, sizeof buf, "  %4d  %5d %6d  %10.6f  %10.6f  %15.4f\n", n, d.layer, d.expert, d.mean_kl,
                       d.max_kl, d.activation_rate);
    o << buf;
  }
  return o.str();
}

}  // namespace moedit
