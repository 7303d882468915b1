// ROME on MoE experts: v*, keys, rank-one updates, revert, templates, report (see editor/rome.h).
#include "editor/rome.h"

#include <utf8proc.h>

#include <Eigen/Cholesky>
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <set>

#include "io/errors.h"
#include "model/generate.h"
#include "tokenizer/tokenizer.h"

namespace moedit {

namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

void check_layer(const ModelConfig& c, int layer) {
  require_input(layer >= 0 && layer < c.n_layers, "layer " + std::to_string(layer) + " is out of range [0, " +
                                                      std::to_string(c.n_layers) + ")");
  require_input(c.is_moe(layer), "layer " + std::to_string(layer) +
                                     " is a dense layer (no experts to edit); choose an MoE layer");
}

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  const auto e = s.find_last_not_of(" \t\r\n");
  return s.substr(b, e - b + 1);
}

// Offsets of a packed batch: row of (sequence s, position p) = off[s] + p.
std::vector<int> offsets(const std::vector<std::vector<int32_t>>& seqs) {
  std::vector<int> off(seqs.size());
  int o = 0;
  for (size_t s = 0; s < seqs.size(); ++s) {
    off[s] = o;
    o += int(seqs[s].size());
  }
  return off;
}

// FFN inputs (post-attention norm) at layer L for the given rows, as the forward computes them.
MatR ffn_inputs(const Model& m, int layer, const MatR& resid_pre, const MatR& attn_out, const std::vector<int>& rows) {
  const ModelConfig& c = m.config();
  MatR x(int(rows.size()), c.hidden);
  for (size_t i = 0; i < rows.size(); ++i) {
    Eigen::RowVectorXf a = attn_out.row(rows[i]);
    if (c.residual_multiplier != 1.f) a *= c.residual_multiplier;
    x.row(int(i)) = resid_pre.row(rows[i]) + a;
  }
  MatR a2(x.rows(), c.hidden);
  ops::rmsnorm(x.data(), m.weights().layers[size_t(layer)].ln_post.data(), a2.data(), int(x.rows()), c.hidden,
               c.rms_eps);
  return a2;
}

// Keys k = silu(x·Gᵀ) ⊙ (x·Uᵀ) of expert e of a bank for rows x [n, H] → [n, I].
// [begin, end) of shared expert `expert` (an id ≤ kSharedExpert) in the shared block's intermediate dimension.
std::pair<int, int> shared_columns(const Model& m, int layer, int expert) {
  const int n = shared_expert_count(m, layer);
  require_input(shared_index(expert) < n, "layer " + std::to_string(layer) + " has no shared expert " +
                                              std::to_string(shared_index(expert)));
  return n == 1 ? std::pair<int, int>{0, m.weights().layers[size_t(layer)].ffn.shared.I}
                : m.config().shared_slice(shared_index(expert));
}

// The shared expert's gate g(x) = σ(x·w_g) at one FFN input row (1 when the family has no shared gate).
double shared_gate(const FFNWeights& f, const Eigen::Ref<const Eigen::RowVectorXf>& x) {
  return f.shared_gate.size() ? 1.0 / (1.0 + std::exp(-double(x.dot(f.shared_gate.transpose())))) : 1.0;
}

MatR bank_keys(const ExpertBank& b, int e, const MatR& x) {
  MatR k(x.rows(), b.I);
  expert_key(b, e, x.data(), size_t(x.cols()), int(x.rows()), k.data());
  return k;
}

std::string json_str(const nlohmann::json& j, const char* key, const std::string& where, bool required) {
  if (!j.contains(key)) {
    require_input(!required, where + ": field '" + key + "' is missing");
    return "";
  }
  const auto& v = j.at(key);
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("str") && v.at("str").is_string()) return v.at("str").get<std::string>();
  throw InputError(where + ": field '" + key + "' must be a string or {\"str\": ...}");
}

std::vector<std::string> json_strings(const nlohmann::json& j, const char* key, const std::string& where) {
  std::vector<std::string> out;
  if (!j.contains(key)) return out;
  require_input(j.at(key).is_array(), where + ": field '" + key + "' must be a list of strings");
  for (const auto& v : j.at(key)) {
    require_input(v.is_string(), where + ": field '" + key + "' must be a list of strings");
    out.push_back(v.get<std::string>());
  }
  return out;
}

std::string nfkd(const std::string& s) {
  utf8proc_uint8_t* r = utf8proc_NFKD(reinterpret_cast<const utf8proc_uint8_t*>(s.c_str()));
  if (!r) return s;
  std::string out(reinterpret_cast<char*>(r));
  std::free(r);
  return out;
}

void replace_all(std::string& s, const std::string& from, const std::string& to) {
  for (size_t p = s.find(from); p != std::string::npos; p = s.find(from, p + to.size())) s.replace(p, from.size(), to);
}

std::string with_space(const std::string& t) { return (!t.empty() && t[0] == ' ') ? t : " " + t; }

}  // namespace

// ---- parsing ------------------------------------------------------------------------------------------------------

EditTarget parse_edit_target(const std::string& s) {
  EditTarget t;
  if (s == "dominant") return t;
  if (s == "routed") {
    t.kind = TargetKind::Routed;
    return t;
  }
  if (s == "shared") {
    t.kind = TargetKind::Shared;
    return t;
  }
  const auto colon = s.find(':');
  if (colon != std::string::npos) {
    try {
      size_t u1 = 0, u2 = 0;
      const std::string a = s.substr(0, colon), b = s.substr(colon + 1);
      t.layer = std::stoi(a, &u1);
      t.expert = std::stoi(b, &u2);
      if (u1 == a.size() && u2 == b.size() && t.layer >= 0 && t.expert >= 0) {
        t.kind = TargetKind::Expert;
        return t;
      }
    } catch (const std::exception&) {
    }
  }
  throw InputError("--target '" + s + "': expected dominant, routed, shared or LAYER:EXPERT (e.g. 3:5)");
}

std::string target_name(const EditTarget& t) {
  switch (t.kind) {
    case TargetKind::Dominant: return "dominant";
    case TargetKind::Routed: return "routed";
    case TargetKind::Shared: return "shared";
    case TargetKind::Expert: return std::to_string(t.layer) + ":" + std::to_string(t.expert);
  }
  return "?";
}

VStarObjective parse_objective(const std::string& s) {
  if (s == "rome") return VStarObjective::Rome;
  if (s == "exact") return VStarObjective::Exact;
  throw InputError("--objective '" + s + "': expected rome or exact");
}

KeyMode parse_key_mode(const std::string& s) {
  if (s == "rome") return KeyMode::Rome;
  if (s == "consistent" || s == "r-rome") return KeyMode::Consistent;
  throw InputError("--keys '" + s + "': expected rome or consistent");
}

EditRequest parse_request(const nlohmann::json& j, const std::string& where) {
  require_input(j.is_object(), where + ": a request must be a JSON object");
  EditRequest r;
  const nlohmann::json* rr = &j;
  if (j.contains("requested_rewrite")) {
    rr = &j.at("requested_rewrite");
    require_input(rr->is_object(), where + ": 'requested_rewrite' must be an object");
    r.paraphrases = json_strings(j, "paraphrase_prompts", where);
    r.neighbors = json_strings(j, "neighborhood_prompts", where);
  }
  r.paraphrases = r.paraphrases.empty() ? json_strings(*rr, "paraphrase_prompts", where) : r.paraphrases;
  r.neighbors = r.neighbors.empty() ? json_strings(*rr, "neighborhood_prompts", where) : r.neighbors;
  if (j.contains("case_id")) r.case_id = j.at("case_id").is_string() ? j.at("case_id").get<std::string>() : j.at("case_id").dump();
  r.prompt = json_str(*rr, "prompt", where, true);
  r.subject = json_str(*rr, "subject", where, true);
  r.target_new = json_str(*rr, "target_new", where, true);
  r.target_true = json_str(*rr, "target_true", where, false);
  require_input(!trim(r.target_new).empty(), where + ": target_new is empty");
  require_input(!trim(r.subject).empty(), where + ": subject is empty");
  return r;
}

std::vector<EditRequest> load_requests(const std::string& path) {
  std::ifstream in(path);
  require_input(bool(in), "requests file '" + path + "' cannot be read");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw InputError(path + ": malformed JSON (" + std::string(e.what()) + ")");
  }
  std::vector<EditRequest> out;
  if (j.is_object()) {
    out.push_back(parse_request(j, path));
  } else {
    require_input(j.is_array(), path + ": expected a JSON list of requests");
    for (size_t i = 0; i < j.size(); ++i) out.push_back(parse_request(j[i], path + "[" + std::to_string(i) + "]"));
  }
  require_input(!out.empty(), path + ": no requests");
  return out;
}

void validate(const EditIds& ids, const ModelConfig& c) {
  require_input(!ids.prompts.empty(), "no rewriting prompts");
  require_input(ids.subject_last.size() == ids.prompts.size(), "one subject index per prompt is required");
  require_input(!ids.target.empty(), "the target is empty (no target tokens)");
  auto check_ids = [&](const std::vector<int32_t>& v, const std::string& what) {
    require_input(!v.empty(), what + " is empty");
    for (int32_t id : v)
      require_input(id >= 0 && id < c.vocab_size, what + ": token id " + std::to_string(id) + " is outside [0, " +
                                                      std::to_string(c.vocab_size) + ")");
  };
  for (size_t i = 0; i < ids.prompts.size(); ++i) {
    check_ids(ids.prompts[i], "prompt " + std::to_string(i));
    require_input(ids.subject_last[i] >= 0 && ids.subject_last[i] < int(ids.prompts[i].size()),
                  "prompt " + std::to_string(i) + ": subject index out of range");
  }
  check_ids(ids.kl_prompt, "the KL prompt");
  require_input(ids.kl_subject_last >= 0 && ids.kl_subject_last < int(ids.kl_prompt.size()),
                "the KL prompt's subject index is out of range");
  check_ids(ids.target, "the target");
}

// ---- v* -------------------------------------------------------------------------------------------------------------

namespace {
int first_above(const Model& m, int layer) {
  check_layer(m.config(), layer);
  return layer + 1;
}
}  // namespace

template <class T>
VStarProblem<T>::VStarProblem(const Model& m, int layer, const EditIds& ids, const VStarOptions& opt,
                              const DeltaSpread& spread)
    : m_(m), layer_(layer), opt_(opt), ids_(ids), stack_(m, first_above(m, layer)) {
  const ModelConfig& c = m.config();
  validate(ids, c);
  const int nt = int(ids.prompts.size()), nT = int(ids.target.size());
  std::vector<std::vector<int32_t>> seqs;
  std::vector<int> idx;
  for (int i = 0; i < nt; ++i) {
    auto s = ids.prompts[size_t(i)];
    s.insert(s.end(), ids.target.begin(), ids.target.end() - 1);
    seqs.push_back(std::move(s));
    idx.push_back(ids.subject_last[size_t(i)]);
  }
  seqs.push_back(ids.kl_prompt);
  idx.push_back(ids.kl_subject_last);
  const int ns = int(seqs.size());

  // Layers ≤ L once.
  const bool exact = opt.objective == VStarObjective::Exact;
  require_input(!exact || bool(spread), "the exact v* objective needs the edit's spread");
  Hooks h;
  auto mo = h.capture(hook_names::moe_out(layer));
  auto pre = exact ? h.capture(hook_names::resid_pre(layer)) : nullptr;
  auto att = exact ? h.capture(hook_names::attn_out(layer)) : nullptr;
  ForwardOptions fo;
  fo.hooks = &h;
  fo.stop_after_layer = layer;
  fo.record_routing = exact;
  ForwardOutput f = m.forward(seqs, fo);
  const auto off = offsets(seqs);
  target_init_ = mo->value.row(off[0] + idx[0]).transpose();
  ti_norm2_ = T(target_init_.squaredNorm());
  require_input(ti_norm2_ > 0, "the MoE output at the subject's last token is zero");

  // s_t per packed row: Rome 1 at each subject-last row; Exact the edit's spread.
  const int N = int(f.hidden.rows());
  VecF scale = VecF::Zero(N);
  if (exact) {
    std::vector<int> all(static_cast<size_t>(N));
    for (int i = 0; i < N; ++i) all[size_t(i)] = i;
    scale = spread(ffn_inputs(m, layer, pre->value, att->value, all), f.routing[size_t(layer)]);
    require_input(scale.size() == N && scale.allFinite(), "the edit's spread must give one finite factor per token");
  } else {
    for (int s = 0; s < ns; ++s) scale[off[size_t(s)] + idx[size_t(s)]] = 1.f;
  }

  // Active rows: from each sequence's subject token, or its first token δ reaches if earlier (all tokens without
  // cache_prefix); the earlier tokens' K/V are constants.
  const size_t nsz = static_cast<size_t>(ns);
  std::vector<int> np(nsz), na(nsz), pre_rows, act_rows, act_off(nsz);
  for (int s = 0; s < ns; ++s) {
    int first = idx[size_t(s)];
    for (int p = 0; p < idx[size_t(s)]; ++p)
      if (scale[off[size_t(s)] + p] != 0.f) {
        first = p;
        break;
      }
    np[size_t(s)] = opt.cache_prefix ? first : 0;
    na[size_t(s)] = int(seqs[size_t(s)].size()) - np[size_t(s)];
    act_off[size_t(s)] = int(act_rows.size());
    for (int p = 0; p < int(seqs[size_t(s)].size()); ++p)
      (p < np[size_t(s)] ? pre_rows : act_rows).push_back(off[size_t(s)] + p);
  }
  auto gather = [&](const std::vector<int>& rows) {
    MatT<T> g(int(rows.size()), c.hidden);
    for (size_t i = 0; i < rows.size(); ++i) g.row(int(i)) = f.hidden.row(rows[i]).template cast<T>();
    return g;
  };
  base_ = gather(act_rows);
  lay_ = layout_from_lengths(na, np);
  if (!pre_rows.empty()) {
    grad::TapedStack<T> pre(m, layer + 1);
    pre.forward(gather(pre_rows), layout_from_lengths(np, std::vector<int>(size_t(ns), 0)));
    prefix_ = pre.kv();
  }
  for (int i = 0; i < int(act_rows.size()); ++i)
    if (scale[act_rows[size_t(i)]] != 0.f) {
      delta_rows_.push_back(i);
      delta_scale_.push_back(T(scale[act_rows[size_t(i)]]));
    }
  auto act_row = [&](int s, int p) { return act_off[size_t(s)] + p - np[size_t(s)]; };
  tmpl_rows_.assign(size_t(nt), {});
  for (int i = 0; i < nt; ++i)
    for (int j = 0; j < nT; ++j) {
      const int pos = int(ids.prompts[size_t(i)].size()) - 1 + j;
      tmpl_rows_[size_t(i)].push_back(int(logit_rows_.size()));
      logit_rows_.push_back(act_row(i, pos));
    }
  logit_rows_.push_back(act_row(nt, idx[size_t(nt)]));  // the KL row: the KL prompt's subject token

  // p_0 at δ = 0.
  stack_.forward(base_, lay_, prefix_.k.empty() ? nullptr : &prefix_);
  MatT<T> lg = stack_.logits({logit_rows_.back()});
  kl_init_.resize(lg.cols());
  grad::log_softmax(lg.data(), int(lg.cols()), kl_init_.data());
}

template <class T>
int VStarProblem<T>::hidden() const {
  return m_.config().hidden;
}

template <class T>
int64_t VStarProblem<T>::tokens_per_step() const {
  return int64_t(base_.rows());
}

template <class T>
typename VStarProblem<T>::Value VStarProblem<T>::eval(const VecT<T>& delta) {
  const ModelConfig& c = m_.config();
  const T rm = T(c.residual_multiplier);
  delta_ = delta;
  MatT<T> x = base_;
  for (size_t i = 0; i < delta_rows_.size(); ++i) x.row(delta_rows_[i]) += (rm * delta_scale_[i]) * delta.transpose();
  stack_.forward(std::move(x), lay_, prefix_.k.empty() ? nullptr : &prefix_);
  const MatT<T> lg = stack_.logits(logit_rows_);
  const int V = int(lg.cols()), nt = int(tmpl_rows_.size()), nT = int(ids_.target.size());
  dlogits_ = MatT<T>::Zero(lg.rows(), V);
  Value out;
  VecT<T> ls(V);
  for (int i = 0; i < nt; ++i) {
    T s = 0;
    for (int j = 0; j < nT; ++j) {
      const int row = tmpl_rows_[size_t(i)][size_t(j)];
      const int t = ids_.target[size_t(j)];
      grad::log_softmax(lg.row(row).data(), V, ls.data());
      s -= ls[t];
      auto d = dlogits_.row(row);
      d = ls.array().exp().matrix().transpose() / T(nT * nt);
      d[t] -= T(1) / T(nT * nt);
    }
    out.nll += s / T(nT);
    out.p_target += std::exp(-s / T(nT));
  }
  out.nll /= T(nt);
  out.p_target /= T(nt);
  {
    const int row = int(lg.rows()) - 1;
    grad::log_softmax(lg.row(row).data(), V, ls.data());
    const VecT<T> p = ls.array().exp();
    const VecT<T> diff = ls - kl_init_;
    const T kl = p.dot(diff);
    out.kl = T(opt_.kl_factor) * kl;
    dlogits_.row(row) = (T(opt_.kl_factor) * p.cwiseProduct(diff.array().matrix() - VecT<T>::Constant(V, kl))).transpose();
  }
  out.wd = T(opt_.weight_decay) * delta.norm() / ti_norm2_;
  out.loss = out.nll + out.kl + out.wd;
  return out;
}

template <class T>
VecT<T> VStarProblem<T>::grad() const {
  const T rm = T(m_.config().residual_multiplier);
  const MatT<T> dx = stack_.backward(dlogits_);
  VecT<T> g = VecT<T>::Zero(delta_.size());
  for (size_t i = 0; i < delta_rows_.size(); ++i) g += (rm * delta_scale_[i]) * dx.row(delta_rows_[i]).transpose();
  const T n = delta_.norm();
  if (n > 0) g += T(opt_.weight_decay) / (n * ti_norm2_) * delta_;
  return g;
}

template class VStarProblem<float>;
template class VStarProblem<double>;

VStarResult compute_vstar(const Model& m, int layer, const EditIds& ids, const VStarOptions& opt,
                          const DeltaSpread& spread) {
  require_input(opt.steps >= 1, "--steps must be at least 1");
  VStarProblem<float> P(m, layer, ids, opt, spread);
  const int H = P.hidden();
  VStarResult r;
  r.target_init = P.target_init();
  r.tokens_per_step = P.tokens_per_step();
  Eigen::VectorXd delta = Eigen::VectorXd::Zero(H), m1 = delta, v1 = delta;
  const double b1 = 0.9, b2 = 0.999, eps = 1e-8;
  const double max_norm = opt.clamp_norm_factor * double(r.target_init.norm());
  for (int it = 0; it < opt.steps; ++it) {
    const auto val = P.eval(delta.cast<float>());
    r.loss.push_back(val.loss);
    r.nll.push_back(val.nll);
    r.kl.push_back(val.kl);
    r.wd.push_back(val.wd);
    r.p_target.push_back(val.p_target);
    if (val.loss < opt.early_stop_loss || it == opt.steps - 1) break;
    const Eigen::VectorXd g = P.grad().cast<double>();
    const int t = ++r.updates;
    m1 = b1 * m1 + (1 - b1) * g;
    v1 = b2 * v1 + (1 - b2) * g.cwiseProduct(g);
    const double bc1 = 1 - std::pow(b1, t), bc2 = 1 - std::pow(b2, t);
    const Eigen::VectorXd denom = (v1.cwiseSqrt() / std::sqrt(bc2)).array() + eps;
    delta -= (opt.lr / bc1) * m1.cwiseQuotient(denom);
    const double n = delta.norm();
    if (n > max_norm) delta *= max_norm / n;
  }
  r.delta = delta.cast<float>();
  return r;
}

// ---- the edit -------------------------------------------------------------------------------------------------------

EditResult apply_edit_ids(Model& m, const EditIds& ids, const EditOptions& opt) {
  const auto t0 = Clock::now();
  const ModelConfig& c = m.config();
  EditResult res;
  res.target = opt.target;
  int layer = opt.layer;
  if (opt.target.kind == TargetKind::Expert) {
    require_input(layer < 0 || layer == opt.target.layer,
                  "--layer " + std::to_string(layer) + " disagrees with --target " + target_name(opt.target));
    layer = opt.target.layer;
  }
  require_input(layer >= 0, "no layer to edit: give --layer L (or a target LAYER:EXPERT)");
  check_layer(c, layer);
  res.layer = layer;
  const FFNWeights& f0 = m.weights().layers[size_t(layer)].ffn;
  if (opt.target.kind == TargetKind::Expert)
    require_input(opt.target.expert < c.n_experts, "expert " + std::to_string(opt.target.expert) +
                                                       " does not exist: layer " + std::to_string(layer) + " has " +
                                                       std::to_string(c.n_experts) + " experts");
  if (opt.target.kind == TargetKind::Shared)
    require_input(f0.has_shared, "--target shared: this model has no shared expert (model_type " + c.model_type + ")");
  const int n_shared = shared_expert_count(m, layer);
  res.n_shared_experts = n_shared;
  require_input(!opt.mom2_adjustment || bool(opt.moments), "key statistics are required (mom2 adjustment is on)");
  validate(ids, c);

  // Keys and routing at L for every template's subject token (bare prompt first).
  Hooks h;
  auto pre = h.capture(hook_names::resid_pre(layer));
  auto att = h.capture(hook_names::attn_out(layer));
  ForwardOptions fo;
  fo.hooks = &h;
  fo.stop_after_layer = layer;
  ForwardOutput f = m.forward(ids.prompts, fo);
  const auto off = offsets(ids.prompts);
  std::vector<int> rows;
  for (size_t i = 0; i < ids.prompts.size(); ++i) rows.push_back(off[i] + ids.subject_last[i]);
  const MatR a2 = ffn_inputs(m, layer, pre->value, att->value, rows);
  const LayerRouting& rt = f.routing[size_t(layer)];
  const int K = c.top_k;
  for (int j = 0; j < K; ++j) {
    res.routed.push_back(rt.ids(rows[0], j));
    res.routed_weights.push_back(rt.weights(rows[0], j));
  }

  // Targets and their residual shares (r = share·δ).
  struct Tgt {
    int expert;
    double weight, share;
  };
  std::vector<Tgt> tg;
  switch (opt.target.kind) {
    case TargetKind::Dominant: tg.push_back({res.routed[0], res.routed_weights[0], 1.0 / res.routed_weights[0]}); break;
    case TargetKind::Expert: {
      const auto it = std::find(res.routed.begin(), res.routed.end(), opt.target.expert);
      require_input(it != res.routed.end(),
                    "expert " + std::to_string(opt.target.expert) + " of layer " + std::to_string(layer) +
                        " is not routed at the subject's last token (its top-" + std::to_string(K) +
                        " there: " + [&] {
                          std::string s;
                          for (int e : res.routed) s += (s.empty() ? "" : ",") + std::to_string(e);
                          return s;
                        }() + "); editing it would not change this fact");
      const double w = res.routed_weights[size_t(it - res.routed.begin())];
      tg.push_back({opt.target.expert, w, 1.0 / w});
      break;
    }
    case TargetKind::Routed: {
      double s2 = 0;
      for (float w : res.routed_weights) s2 += double(w) * w;
      for (int j = 0; j < K; ++j) tg.push_back({res.routed[size_t(j)], res.routed_weights[size_t(j)], res.routed_weights[size_t(j)] / s2});
      break;
    }
    case TargetKind::Shared: {  // each shared expert j takes r_j = δ/(n·g): the minimum-norm split of Σ g·r_j = δ
      const double g = shared_gate(f0, a2.row(0));
      for (int j = 0; j < n_shared; ++j) tg.push_back({shared_expert_id(j), g, 1.0 / (g * n_shared)});
      break;
    }
  }
  for (const Tgt& t : tg) require_input(std::isfinite(t.share) && t.weight > 0, "routing weight of the target is zero");

  // Keys and C⁻¹k* per target expert (ROME's compute_u), before v*: the exact objective needs them.
  const FFNWeights& fw = m.weights().layers[size_t(layer)].ffn;
  auto expert_keys = [&](int expert, const MatR& x) {  // [rows, I] (shared expert j: its columns of the shared keys)
    if (!is_shared_expert(expert)) return bank_keys(fw.experts, expert, x);
    const auto [b, e] = shared_columns(m, layer, expert);
    return MatR(bank_keys(fw.shared, 0, x).middleCols(b, e - b));
  };
  for (const Tgt& t : tg) {
    const MatR keys = expert_keys(t.expert, a2);  // [templates, I]
    const int I = int(keys.cols());
    ExpertUpdate up;
    up.layer = layer;
    up.expert = t.expert;
    up.weight = t.weight;
    const Eigen::VectorXd k = keys.row(0).transpose().cast<double>();
    const Eigen::VectorXd kstar = keys.cast<double>().colwise().mean().transpose();
    Eigen::VectorXd ck;
    if (opt.mom2_adjustment) {
      auto mom = opt.moments(layer, t.expert);
      require_input(mom && mom->mom2.rows() == I && mom->mom2.cols() == I,
                    "key statistics for layer " + std::to_string(layer) + " expert " +
                        expert_label(t.expert, n_shared) + " are missing or have the wrong size");
      up.stats_count = mom->count;
      Eigen::MatrixXd C = mom->mom2.cast<double>();
      if (opt.ridge > 0) C.diagonal().array() += opt.ridge * std::max(C.diagonal().mean(), 1e-30);
      Eigen::LLT<Eigen::MatrixXd> llt(C);
      if (llt.info() == Eigen::Success) {
        ck = llt.solve(kstar);
      } else {
        Eigen::LDLT<Eigen::MatrixXd> ldlt(C);
        const auto d = ldlt.vectorD();
        require_input(ldlt.info() == Eigen::Success && d.minCoeff() > 1e-12 * std::max(d.maxCoeff(), 1e-300),
                      "the key statistics of layer " + std::to_string(layer) + " expert " +
                          expert_label(t.expert, n_shared) + " are singular (" + std::to_string(mom->count) +
                          " tokens for a key of size " + std::to_string(I) + "): use a larger corpus or --ridge");
        ck = ldlt.solve(kstar);
      }
    } else {
      ck = kstar;
    }
    const double denom = ck.dot(opt.keys == KeyMode::Rome ? k : kstar);
    if (!(std::abs(denom) > 0) || !std::isfinite(denom) || !ck.allFinite())
      throw std::runtime_error("rank-one update: (C⁻¹k*)ᵀk is zero or not finite for expert " +
                               expert_label(t.expert, n_shared));
    up.u = (ck / denom).cast<float>();
    up.k = (opt.keys == KeyMode::Rome ? k : kstar).cast<float>();
    up.k_star = kstar.cast<float>();
    res.updates.push_back(std::move(up));
  }

  // v*; the exact objective spreads δ as the updates will: s_t = Σ_j gate_j(t)·share_j·u_jᵀk_j(t).
  const DeltaSpread spread = [&](const MatR& x, const LayerRouting& routing) {
    VecF s = VecF::Zero(x.rows());
    for (size_t j = 0; j < tg.size(); ++j) {
      const VecF uk = expert_keys(tg[j].expert, x) * res.updates[j].u;  // [rows]
      for (int i = 0; i < int(x.rows()); ++i) {
        double gate = 0;
        if (is_shared_expert(tg[j].expert)) {
          gate = shared_gate(fw, x.row(i));
        } else {
          for (int q = 0; q < K; ++q)
            if (routing.ids(i, q) == tg[j].expert) gate = routing.weights(i, q);
        }
        s[i] += float(gate * tg[j].share * double(uk[i]));
      }
    }
    return s;
  };
  const auto tv = Clock::now();
  res.vstar = compute_vstar(m, layer, ids, opt.v, spread);
  res.vstar_seconds = since(tv);

  // Rank-one updates: ΔW = r·uᵀ, r = share·δ.
  try {  // all or nothing: a failing target reverts the ones already applied
    for (size_t j = 0; j < tg.size(); ++j) {
      ExpertUpdate& up = res.updates[j];
      DownMap Wd = expert_down(m, layer, up.expert);
      up.r = (res.vstar.delta.cast<double>() * tg[j].share).cast<float>();
      up.original.resize(size_t(Wd.rows()) * size_t(Wd.cols()));
      Eigen::Map<MatR>(up.original.data(), Wd.rows(), Wd.cols()) = Wd;
      Wd.noalias() += up.r * up.u.transpose();
    }
  } catch (...) {
    revert(m, res);
    throw;
  }

  // Which templates route through the edited experts.
  for (size_t i = 0; i < rows.size(); ++i) {
    int hits = 0;
    for (const Tgt& t : tg)
      if (is_shared_expert(t.expert))
        ++hits;
      else
        for (int j = 0; j < K; ++j) hits += rt.ids(rows[i], j) == t.expert;
    res.template_hits.push_back(hits);
    res.template_route_share += hits > 0 ? 1.0 : 0.0;
  }
  res.template_route_share /= double(rows.size());
  res.seconds = since(t0);
  return res;
}

Weight& down_weight(Model& m, int layer, int expert) {
  FFNWeights& f = m.mutable_weights().layers[size_t(layer)].ffn;
  return is_shared_expert(expert) ? f.shared.down[0] : f.experts.down[size_t(expert)];
}

DownMap expert_down(Model& m, int layer, int expert) {
  Weight& w = down_weight(m, layer, expert);
  const auto [b, e] = is_shared_expert(expert) ? shared_columns(m, layer, expert)
                                               : std::pair<int, int>{0, int(w.cols())};
  return DownMap(w.mutable_f32() + b, w.rows(), e - b, Eigen::OuterStride<>(w.cols()));
}

void revert(Model& m, const EditResult& r) {
  for (auto it = r.updates.rbegin(); it != r.updates.rend(); ++it) {
    if (it->original.empty()) continue;  // not applied (an edit that failed part-way)
    DownMap dn = expert_down(m, r.layer, it->expert);
    dn = CMapMatR(it->original.data(), dn.rows(), dn.cols());
    down_weight(m, r.layer, it->expert).drop_copy_if_unchanged();  // back to the checkpoint's own bytes
  }
}

void revert_all(Model& m, const std::vector<EditResult>& edits) {
  for (auto it = edits.rbegin(); it != edits.rend(); ++it) revert(m, *it);
}

std::vector<std::pair<int, int>> edited_experts(const std::vector<EditResult>& edits) {
  std::set<std::pair<int, int>> s;
  for (const auto& e : edits)
    for (const auto& u : e.updates) s.insert({u.layer, u.expert});
  return {s.begin(), s.end()};
}

// ---- text level -----------------------------------------------------------------------------------------------------

std::vector<std::string> context_templates(const Model& m, const Tokenizer& tok, const EditOptions& opt) {
  std::vector<std::string> out = {"{}"};
  if (!opt.templates.empty()) {
    for (const auto& t : opt.templates) {
      const auto p = t.find("{}");
      require_input(p != std::string::npos && t.find("{}", p + 2) == std::string::npos,
                    "context template '" + t + "' must contain exactly one {}");
      if (t != "{}") out.push_back(t);
    }
    return out;
  }
  std::optional<int> start = tok.bos_id();
  if (!start) start = tok.eos_id();
  if (!start) start = tok.token_to_id("<|endoftext|>");
  require_input(bool(start), tok.source() +
                                 ": no BOS/EOS token to sample context templates from; pass a templates file instead");
  uint64_t i = 0;
  for (const auto& [len, n] : opt.template_lengths) {
    for (int j = 0; j < n; ++j, ++i) {
      GenerateOptions g;
      g.max_new_tokens = std::max(1, len - 1);  // ROME's max_out_len counts the prompt token
      g.top_k = opt.template_top_k;
      g.seed = opt.template_seed + i;
      g.eos_token_id = -1;
      const auto ids = generate(m, {int32_t(*start)}, g);
      std::string s = tok.decode(ids, true);
      replace_all(s, "\n\n", " ");
      s = nfkd(s);
      std::replace(s.begin(), s.end(), '{', ' ');
      std::replace(s.begin(), s.end(), '}', ' ');
      out.push_back(s + ". {}");
    }
  }
  return out;
}

std::string normalized_prompt(const EditRequest& req) {
  require_input(!trim(req.subject).empty(), "the subject is empty");
  require_input(!trim(req.target_new).empty(), "the new target is empty");
  require_input(!trim(req.prompt).empty(), "the prompt is empty");
  const auto p = req.prompt.find("{}");
  if (p != std::string::npos) {
    require_input(req.prompt.find("{}", p + 2) == std::string::npos,
                  "the prompt '" + req.prompt + "' has more than one {}");
    return req.prompt;
  }
  const auto s = req.prompt.find(req.subject);
  require_input(s != std::string::npos, "the subject '" + req.subject + "' is not in the prompt '" + req.prompt +
                                            "' (write {} where the subject goes)");
  std::string out = req.prompt;
  out.replace(s, req.subject.size(), "{}");
  return out;
}

namespace {
// Encodes template ∘ prompt ∘ subject; returns ids and the subject's last token.
std::pair<std::vector<int32_t>, int> encode_with_subject(const Tokenizer& tok, const std::string& tmpl,
                                                         const std::string& prompt, const std::string& subject) {
  const auto tp = tmpl.find("{}");
  const std::string t1 = tmpl.substr(0, tp) + prompt + tmpl.substr(tp + 2);
  const size_t sp = tp + prompt.find("{}");
  const std::string text = t1.substr(0, sp) + subject + t1.substr(sp + 2);
  const auto enc = tok.encode(text, true);
  const auto span = Tokenizer::span_for_bytes(enc, sp, sp + subject.size());
  require_input(bool(span) && span->second > span->first,
                "the subject '" + subject + "' does not map to tokens in '" + text + "'");
  return {enc.ids, span->second - 1};
}
}  // namespace

EditIds build_edit_ids(const Tokenizer& tok, const EditRequest& req, const std::vector<std::string>& templates,
                       const std::string& kl_prompt) {
  const std::string prompt = normalized_prompt(req);
  EditIds ids;
  ids.target = tok.encode_ids(with_space(req.target_new), false);
  require_input(!ids.target.empty(), "the new target '" + req.target_new + "' encodes to no tokens");
  require_input(!templates.empty() && templates[0] == "{}", "the first context template must be {}");
  for (const auto& t : templates) {
    auto [v, last] = encode_with_subject(tok, t, prompt, req.subject);
    ids.prompts.push_back(std::move(v));
    ids.subject_last.push_back(last);
  }
  require_input(kl_prompt.find("{}") != std::string::npos, "the KL prompt '" + kl_prompt + "' has no {}");
  auto [kv, kl] = encode_with_subject(tok, "{}", kl_prompt, req.subject);
  ids.kl_prompt = std::move(kv);
  ids.kl_subject_last = kl;
  return ids;
}

EditResult apply_edit(Model& m, const Tokenizer& tok, const EditRequest& req, const EditOptions& opt,
                      std::vector<std::string>* templates_cache) {
  std::vector<std::string> local;
  std::vector<std::string>& tm = templates_cache ? *templates_cache : local;
  normalized_prompt(req);  // validate before sampling templates
  if (tm.empty()) tm = context_templates(m, tok, opt);
  const EditIds ids = build_edit_ids(tok, req, tm, opt.kl_prompt);
  EditResult r = apply_edit_ids(m, ids, opt);
  r.templates = tm;
  return r;
}

// ---- report ---------------------------------------------------------------------------------------------------------

std::vector<PromptScore> score_prompts(const Model& m, const Tokenizer& tok, const std::vector<std::string>& prompts,
                                       const std::string& subject, const std::string& target_new,
                                       const std::string& target_true, int layer,
                                       const std::vector<std::pair<int, int>>& edited) {
  const ModelConfig& c = m.config();
  const auto tn = tok.encode_ids(with_space(target_new), false);
  const bool has_true = !trim(target_true).empty();
  const auto tt = has_true ? tok.encode_ids(with_space(target_true), false) : std::vector<int32_t>{};
  std::vector<PromptScore> out(prompts.size());
  struct Item {
    size_t prompt;
    bool is_new;
    int plen;
  };
  std::vector<std::vector<int32_t>> seqs;
  std::vector<Item> items;
  for (size_t i = 0; i < prompts.size(); ++i) {
    out[i].prompt = prompts[i];
    const auto enc = tok.encode(prompts[i], true);
    if (const auto sp = prompts[i].find(subject); !subject.empty() && sp != std::string::npos)
      if (const auto span = Tokenizer::span_for_bytes(enc, sp, sp + subject.size()); span && span->second > span->first)
        out[i].subject_last = span->second - 1;
    for (int v = 0; v < (has_true ? 2 : 1); ++v) {
      auto s = enc.ids;
      const auto& t = v == 0 ? tn : tt;
      s.insert(s.end(), t.begin(), t.end());
      seqs.push_back(std::move(s));
      items.push_back({i, v == 0, int(enc.ids.size())});
    }
  }
  const bool has_shared = c.is_moe(layer) && m.weights().layers[size_t(layer)].ffn.has_shared;
  const size_t chunk = 16;
  for (size_t b = 0; b < seqs.size(); b += chunk) {
    const size_t e = std::min(seqs.size(), b + chunk);
    std::vector<std::vector<int32_t>> part(seqs.begin() + long(b), seqs.begin() + long(e));
    const ForwardOutput f = m.forward(part);
    const auto off = offsets(part);
    for (size_t q = b; q < e; ++q) {
      const Item& it = items[q];
      const auto& t = it.is_new ? tn : tt;
      double nll = 0;
      Eigen::VectorXf ls(f.logits.cols());
      for (size_t j = 0; j < t.size(); ++j) {
        const int row = off[q - b] + it.plen + int(j) - 1;
        grad::log_softmax(f.logits.row(row).data(), int(f.logits.cols()), ls.data());
        nll -= ls[t[j]];
      }
      nll /= double(t.size());
      PromptScore& ps = out[it.prompt];
      if (it.is_new) {
        ps.nll_new = nll;
        ps.p_new = std::exp(-nll);
        if (ps.subject_last >= 0 && c.is_moe(layer)) {
          const auto& r = f.routing[size_t(layer)];
          const int row = off[q - b] + ps.subject_last;
          for (int j = 0; j < c.top_k; ++j) ps.experts.push_back(r.ids(row, j));
          for (const auto& [l, ex] : edited) {
            if (l != layer) continue;
            if (is_shared_expert(ex))
              ps.edited_hits += has_shared ? 1 : 0;
            else
              ps.edited_hits += int(std::count(ps.experts.begin(), ps.experts.end(), ex));
          }
        }
      } else {
        ps.nll_true = nll;
        ps.p_true = std::exp(-nll);
      }
    }
  }
  return out;
}

namespace {
nlohmann::json score_json(const PromptScore& s, bool has_true, bool neighbor) {
  nlohmann::json j = {{"prompt", s.prompt}, {"p_new", s.p_new}};
  if (has_true) {
    j["p_true"] = s.p_true;
    // CounterFact: rewrite/paraphrase success = P(new) > P(true); neighbourhood success = P(true) > P(new).
    j["success"] = neighbor ? s.nll_true < s.nll_new : s.nll_new < s.nll_true;
  }
  if (s.subject_last >= 0) {
    j["subject_last_token"] = s.subject_last;
    j["experts"] = s.experts;
    j["routes_through_edited"] = s.edited_hits > 0;
    j["edited_experts_hit"] = s.edited_hits;
  } else {
    j["routes_through_edited"] = nullptr;  // subject not found in this prompt
  }
  return j;
}
}  // namespace

nlohmann::json EditReport::to_json(bool has_true) const {
  nlohmann::json j;
  j["rewrite"] = score_json(rewrite, has_true, false);
  j["paraphrases"] = nlohmann::json::array();
  for (const auto& p : paraphrases) j["paraphrases"].push_back(score_json(p, has_true, false));
  j["neighborhood"] = nlohmann::json::array();
  for (const auto& p : neighbors) j["neighborhood"].push_back(score_json(p, has_true, true));
  return j;
}

EditReport report_edit(const Model& m, const Tokenizer& tok, const EditRequest& req, const EditResult& r) {
  const auto edited = edited_experts({r});
  std::string rewrite = normalized_prompt(req);
  rewrite.replace(rewrite.find("{}"), 2, req.subject);
  std::vector<std::string> prompts = {rewrite};
  prompts.insert(prompts.end(), req.paraphrases.begin(), req.paraphrases.end());
  prompts.insert(prompts.end(), req.neighbors.begin(), req.neighbors.end());
  const auto sc = score_prompts(m, tok, prompts, req.subject, req.target_new, req.target_true, r.layer, edited);
  EditReport rep;
  rep.rewrite = sc[0];
  rep.paraphrases.assign(sc.begin() + 1, sc.begin() + 1 + long(req.paraphrases.size()));
  rep.neighbors.assign(sc.begin() + 1 + long(req.paraphrases.size()), sc.end());
  return rep;
}

nlohmann::json edit_json(const EditResult& r) {
  nlohmann::json j;
  j["layer"] = r.layer;
  j["target"] = target_name(r.target);
  j["routed_experts"] = r.routed;
  j["routed_weights"] = r.routed_weights;
  j["updates"] = nlohmann::json::array();
  for (const auto& u : r.updates) {
    j["updates"].push_back({{"layer", u.layer},
                            {"expert", expert_json(u.expert, r.n_shared_experts)},
                            {"weight", u.weight},
                            {"residual_norm", u.r.norm()},
                            {"update_norm", double(u.r.norm()) * double(u.u.norm())},
                            {"key_norm", u.k.norm()},
                            {"stats_tokens", u.stats_count}});
  }
  j["vstar"] = {{"loss", r.vstar.loss},
                {"nll", r.vstar.nll},
                {"kl", r.vstar.kl},
                {"weight_decay", r.vstar.wd},
                {"p_target", r.vstar.p_target},
                {"updates", r.vstar.updates},
                {"delta_norm", r.vstar.delta.norm()},
                {"target_init_norm", r.vstar.target_init.norm()},
                {"tokens_per_step", r.vstar.tokens_per_step}};
  j["template_route_share"] = r.template_route_share;
  j["template_hits"] = r.template_hits;
  j["seconds"] = r.seconds;
  j["vstar_seconds"] = r.vstar_seconds;
  return j;
}

}  // namespace moedit
