// MEMIT / AlphaEdit over a range of MoE layers, the edit itself (see editor/memit.h): z* from ROME's v* at the last
// layer, then per layer the residuals of the current model, their split over each request's target experts, the
// per-expert closed forms (editor/batch_update.h) and copy-on-write updates; revert. Parsing, reports: memit_report.cpp.
#include "editor/memit.h"

#include <chrono>
#include <cmath>
#include <exception>
#include <set>

#include "editor/rome_internal.h"
#include "editor/router_guard.h"
#include "io/errors.h"
#include "tokenizer/tokenizer.h"

namespace moedit {

using namespace rome_detail;

namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// One request on the current model: the FFN inputs of `layer` at every template's subject token, the routing of the
// bare prompt's subject token there, and the residual after block `last` at that token.
struct Probe {
  MatR ffn_in;                 // [templates, H] (bare prompt first)
  std::vector<int> routed;     // top-k order
  std::vector<float> weights;
  IdxMat t_ids;                // every template's top-k at its subject token [templates, k] (moeedit)
  MatR t_weights;              // and their routing weights [templates, k]
  Eigen::VectorXd h;           // [H]
};

std::vector<Probe> probe(const Model& m, const std::vector<EditIds>& ids, int layer, int last, int per_forward) {
  const int H = m.config().hidden, K = m.config().top_k;
  std::vector<Probe> out(ids.size());
  for (size_t b = 0; b < ids.size(); b += size_t(per_forward)) {
    const size_t e = std::min(ids.size(), b + size_t(per_forward));
    std::vector<std::vector<int32_t>> seqs;
    std::vector<int> rows;  // subject-last rows of every template, request by request
    int off = 0;
    for (size_t i = b; i < e; ++i)
      for (size_t t = 0; t < ids[i].prompts.size(); ++t) {
        rows.push_back(off + ids[i].subject_last[t]);
        seqs.push_back(ids[i].prompts[t]);
        off += int(seqs.back().size());
      }
    Hooks h;
    auto ffn_in = h.capture(hook_names::ffn_in(layer));
    ForwardOptions fo;
    fo.hooks = &h;
    fo.stop_after_layer = last;
    const ForwardOutput f = m.forward(seqs, fo);
    const LayerRouting& rt = f.routing[size_t(layer)];
    size_t q = 0;
    for (size_t i = b; i < e; ++i) {
      Probe& p = out[i];
      const int n = int(ids[i].prompts.size()), r0 = rows[q];
      p.ffn_in.resize(n, H);
      p.t_ids.resize(n, K);
      p.t_weights.resize(n, K);
      for (int t = 0; t < n; ++t) {
        p.ffn_in.row(t) = ffn_in->value.row(rows[q + size_t(t)]);
        p.t_ids.row(t) = rt.ids.row(rows[q + size_t(t)]);
        p.t_weights.row(t) = rt.weights.row(rows[q + size_t(t)]);
      }
      for (int j = 0; j < K; ++j) {
        p.routed.push_back(rt.ids(r0, j));
        p.weights.push_back(rt.weights(r0, j));
      }
      p.h = f.hidden.row(r0).transpose().cast<double>();
      q += size_t(n);
    }
  }
  return out;
}

// The columns one expert collects at a layer.
struct Columns {
  std::vector<int> requests;
  std::vector<double> weights, scales;
  std::vector<Eigen::VectorXd> r, k;  // [H], [I]
};

void check_options(const Model& m, const std::vector<EditIds>& ids, const BatchOptions& opt) {
  const ModelConfig& c = m.config();
  require_input(!ids.empty(), "no requests to edit");
  require_input(!opt.layers.empty(), "no layers to edit: give --layers (e.g. 1-3)");
  for (size_t j = 0; j < opt.layers.size(); ++j) {
    check_layer(c, opt.layers[j]);
    require_input(j == 0 || opt.layers[j] > opt.layers[j - 1], "--layers must be ascending and distinct");
  }
  if (opt.method == BatchMethod::MoeEdit) {
    require_input(opt.edit.target.kind == TargetKind::Dominant || opt.edit.target.kind == TargetKind::Routed,
                  "--target " + target_name(opt.edit.target) +
                      ": moeedit edits the routed experts each template's subject token uses (dominant or routed)");
    require_input(opt.bcd_sweeps >= 1, "--bcd-sweeps must be at least 1");
  }
  require_input(opt.edit.target.kind != TargetKind::Expert,
                "--target " + target_name(opt.edit.target) +
                    " names one layer's expert; " + method_name(opt.method) + " takes dominant, routed or shared");
  require_input(opt.edit.v.objective == VStarObjective::Rome,
                "--objective exact spreads δ as one rank-one update would; " + method_name(opt.method) +
                    " uses ROME's objective");
  if (opt.edit.target.kind == TargetKind::Shared)
    for (int l : opt.layers)
      require_input(m.weights().layers[size_t(l)].ffn.has_shared,
                    "--target shared: layer " + std::to_string(l) + " has no shared expert (model_type " +
                        c.model_type + ")");
  if (opt.method == BatchMethod::Memit) {
    require_input(opt.mom2_weight > 0 && std::isfinite(opt.mom2_weight), "--mom2-weight must be > 0");
  } else {
    require_input(opt.edit.mom2_adjustment, method_name(opt.method) +
                                                " projects onto the null space of the key statistics C: drop --no-mom2");
    require_input(opt.nullspace_threshold > 0, "--nullspace-threshold must be > 0");
    require_input(opt.nullspace_relative >= 0 && std::isfinite(opt.nullspace_relative),
                  "--nullspace-relative must be ≥ 0");
    require_input(opt.l2 > 0 && std::isfinite(opt.l2), "--l2 must be > 0");
  }
  require_input(!opt.edit.mom2_adjustment || bool(opt.edit.moments),
                "key statistics are required (mom2 adjustment is on)");
  require_input(opt.forward_requests >= 1, "forward_requests must be ≥ 1");
  require_input(opt.passes >= 1, "--passes must be at least 1");
  require_input(opt.bare_key_weight < 0 || opt.bare_key_weight <= 1, "--bare-key-weight must be in [0, 1]");
  for (const EditIds& i : ids) validate(i, c);
}

// The templates' weights a_t in k* = Σ_t a_t k_t (bare prompt first): 1/T (w < 0), or w for the bare prompt and
// (1 − w)/(T − 1) for each other template.
Eigen::VectorXd template_weights(int T, double w) {
  if (w < 0 || T == 1) return Eigen::VectorXd::Constant(T, 1.0 / T);
  Eigen::VectorXd a = Eigen::VectorXd::Constant(T, (1 - w) / double(T - 1));
  a[0] = w;
  return a;
}

// Request i's columns at layer l: r_i split over its targets, each with its key k* (or one column per template key).
void collect(const Model& m, int l, const BatchOptions& opt, int i, const Probe& p, const Eigen::VectorXd& r,
             std::map<int, Columns>* cols) {
  for (const TargetShare& t : target_shares(m, l, opt.edit.target, p.routed, p.weights, p.ffn_in.row(0))) {
    const MatD keys = target_keys(m, l, t.expert, p.ffn_in).cast<double>();  // [templates, I]
    const Eigen::VectorXd a = template_weights(int(keys.rows()), opt.bare_key_weight);
    Columns& c = (*cols)[t.expert];
    auto add = [&](double scale, Eigen::VectorXd k) {
      c.requests.push_back(i);
      c.weights.push_back(t.weight);
      c.scales.push_back(scale);
      c.r.push_back(scale * t.share * r);
      c.k.push_back(std::move(k));
    };
    if (opt.key_columns == KeyColumns::Mean)
      add(1.0, keys.transpose() * a);
    else
      for (int tt = 0; tt < keys.rows(); ++tt)
        if (a[tt] > 0) add(std::sqrt(a[tt]), std::sqrt(a[tt]) * keys.row(tt).transpose());
  }
}

// P_e from C_e: eigenvalues below the absolute threshold, or below nullspace_relative × the mean eigenvalue.
NullSpace expert_null_space(const MatD& C, const BatchOptions& opt) {
  return null_space(C, opt.nullspace_relative > 0 ? opt.nullspace_relative * C.trace() / double(C.rows())
                                                  : opt.nullspace_threshold);
}

// The record of one expert's update from its columns (R [H, n], K [I, n]), before the solve.
BatchExpertUpdate expert_update(int l, int expert, int pass, const Columns& c) {
  BatchExpertUpdate up;
  up.layer = l;
  up.expert = expert;
  up.pass = pass;
  up.requests = c.requests;
  up.weights = c.weights;
  up.scales = c.scales;
  const int n = int(c.r.size()), H = int(c.r[0].size()), I = int(c.k[0].size());
  up.R.resize(H, n);
  up.K.resize(I, n);
  for (int j = 0; j < n; ++j) {
    up.R.col(j) = c.r[size_t(j)];
    up.K.col(j) = c.k[size_t(j)];
  }
  return up;
}

// One expert's solve and update at layer l.
BatchExpertUpdate solve_expert(Model& m, int l, int expert, int pass, const Columns& c, const BatchOptions& opt,
                               const KeyCache* cache, int n_shared) {
  BatchExpertUpdate up = expert_update(l, expert, pass, c);
  const int I = int(up.K.rows());
  const MatD C = opt.edit.mom2_adjustment ? MatD(moment_matrix(opt.edit, l, expert, I, n_shared, &up.stats_count))
                                          : MatD(MatD::Identity(I, I));
  MatD delta;
  if (opt.method == BatchMethod::Memit) {
    delta = memit_delta(up.R, up.K, C, opt.mom2_weight, m.backend());
  } else {
    const NullSpace ns = expert_null_space(C, opt);
    up.null_dim = ns.dim;
    const auto it = cache ? cache->find({l, expert}) : KeyCache::const_iterator{};
    delta = alphaedit_delta(up.R, up.K, ns, cache && it != cache->end() ? it->second : MatD(), opt.l2);
  }
  if (!delta.allFinite())
    throw std::runtime_error(method_name(opt.method) + ": the update of layer " + std::to_string(l) + " expert " +
                             expert_label(expert, n_shared) + " is not finite");
  up.delta_norm = delta.norm();
  DownMap Wd = save_down(m, l, expert, &up.original);
  Wd += delta.cast<float>();
  return up;
}

// MoEEdit at layer l (editor/memit.h step 2, moeedit): columns (request, template), each template's routed experts
// coupled through the layer output, solved by block-coordinate descent; the updates applied. r[i]: request i's
// residual share for this layer (MoE-output units).
void moeedit_layer(Model& m, int l, int pass, const std::vector<Probe>& p, const std::vector<Eigen::VectorXd>& r,
                   const BatchOptions& opt, const KeyCache* cache, BatchEditResult* res) {
  std::map<int, int> block_of;  // expert → block
  std::vector<int> experts;
  std::vector<CoupledColumn> cols;
  std::vector<Columns> block_cols;  // per block: the columns it is active in (its residual r_c, its weighted key)
  for (size_t i = 0; i < p.size(); ++i) {
    const Eigen::VectorXd a = template_weights(int(p[i].ffn_in.rows()), opt.bare_key_weight);
    for (int t = 0; t < p[i].ffn_in.rows(); ++t) {
      if (a[t] <= 0) continue;
      const double s = std::sqrt(a[t]);
      CoupledColumn c;
      c.r = s * r[i];
      for (int j = 0; j < p[i].t_ids.cols(); ++j) {
        const int e = p[i].t_ids(t, j);
        const double w = p[i].t_weights(t, j);
        if (w == 0) continue;
        const auto [it, fresh] = block_of.emplace(e, int(experts.size()));
        if (fresh) {
          experts.push_back(e);
          block_cols.emplace_back();
        }
        const MatR key = target_keys(m, l, e, p[i].ffn_in.row(t));  // [1, I]
        c.keys.push_back({it->second, s * w * key.row(0).transpose().cast<double>()});
        Columns& bc = block_cols[size_t(it->second)];
        bc.requests.push_back(int(i));
        bc.weights.push_back(w);
        bc.scales.push_back(s);
        bc.r.push_back(c.r);
        bc.k.push_back(c.keys.back().second);
      }
      if (!c.keys.empty()) cols.push_back(std::move(c));
    }
  }
  if (cols.empty()) return;
  const int n_shared = shared_expert_count(m, l);
  std::vector<BatchExpertUpdate> ups;
  std::vector<CoupledBlock> blocks(experts.size());
  for (size_t b = 0; b < experts.size(); ++b) {
    ups.push_back(expert_update(l, experts[b], pass, block_cols[b]));
    const int I = int(ups[b].K.rows());
    const MatD C(moment_matrix(opt.edit, l, experts[b], I, n_shared, &ups[b].stats_count));
    blocks[b].ns = expert_null_space(C, opt);
    ups[b].null_dim = blocks[b].ns.dim;
    if (cache)
      if (const auto it = cache->find({l, experts[b]}); it != cache->end()) blocks[b].A = it->second;
  }
  CoupledSolution sol = coupled_bcd(cols, blocks, opt.l2, opt.bcd_sweeps);
  res->bcd_objective.push_back(std::move(sol.objective));
  for (size_t b = 0; b < experts.size(); ++b) {
    if (!sol.delta[b].allFinite())
      throw std::runtime_error("moeedit: the update of layer " + std::to_string(l) + " expert " +
                               expert_label(experts[b], n_shared) + " is not finite");
    BatchExpertUpdate& u = ups[b];
    u.delta_norm = sol.delta[b].norm();
    DownMap Wd = save_down(m, l, u.expert, &u.original);
    Wd += sol.delta[b].cast<float>();
    res->updates.push_back(std::move(u));
  }
}

std::vector<double> residual_norms(const std::vector<Probe>& p, const std::vector<Eigen::VectorXd>& z) {
  std::vector<double> out;
  for (size_t i = 0; i < p.size(); ++i) out.push_back((z[i] - p[i].h).norm());
  return out;
}

}  // namespace

BatchEditResult apply_batch_edit_ids(Model& m, const std::vector<EditIds>& ids, const BatchOptions& opt,
                                     KeyCache* cache) {
  const auto t0 = Clock::now();
  check_options(m, ids, opt);
  BatchEditResult res;
  res.method = opt.method;
  res.target = opt.edit.target;
  res.layers = opt.layers;
  res.lambda = opt.method == BatchMethod::Memit ? opt.mom2_weight : opt.l2;
  res.bare_key_weight = opt.bare_key_weight;
  res.key_columns = opt.key_columns;
  res.passes = opt.passes;
  res.bcd_sweeps = opt.method == BatchMethod::MoeEdit ? opt.bcd_sweeps : 0;
  const int last = opt.layers.back(), n_layers = int(opt.layers.size());
  res.n_shared_experts = shared_expert_count(m, last);
  const double rho = m.config().residual_multiplier;

  // C of the unedited model: every layer's statistics are asked for (a cache computes or loads a whole layer) before
  // any update, as MEMIT's precomputed statistics are.
  if (opt.edit.mom2_adjustment)
    for (int l : opt.layers) opt.edit.moments(l, opt.edit.target.kind == TargetKind::Shared ? kSharedExpert : 0);

  // The router guard's directions per layer, from the unedited routers (edits change only down-projections).
  std::map<int, Eigen::MatrixXd> guard;
  VStarOptions vopt = opt.edit.v;
  if (opt.router_guard) {
    for (int l : opt.layers) {
      guard[l] = router_directions(m, l, opt.router_guard_layers);
      res.router_guard_dims[l] = int(guard[l].cols());
    }
    vopt.exclude = std::make_shared<const Eigen::MatrixXd>(guard[last]);
  }

  // z*_i = h_i + ρ·δ_i on the model before the batch (its probe serves the first layer as well).
  std::vector<Probe> p = probe(m, ids, opt.layers[0], last, opt.forward_requests);
  // The requests' v* problems are independent: they run side by side, one request per thread (each one's ops then
  // run on its thread alone, as they do for one small request anyway), the first failure rethrown afterwards.
  const auto tv = Clock::now();
  const int n_req = int(ids.size());
  res.vstar.resize(ids.size());
  std::vector<std::exception_ptr> failed(ids.size());
#pragma omp parallel for schedule(dynamic) num_threads(ops::num_threads()) if (n_req > 1)
  for (int i = 0; i < n_req; ++i) {
    try {
      res.vstar[size_t(i)] = compute_vstar(m, last, ids[size_t(i)], vopt);
    } catch (...) {
      failed[size_t(i)] = std::current_exception();
    }
  }
  for (const auto& e : failed)
    if (e) std::rethrow_exception(e);
  std::vector<Eigen::VectorXd> z;
  for (size_t i = 0; i < ids.size(); ++i) {
    z.push_back(p[i].h + rho * res.vstar[i].delta.cast<double>());
    res.z.push_back(z.back().cast<float>());
  }
  res.vstar_seconds = since(tv);

  try {  // all or nothing
    for (int pass = 0; pass < opt.passes; ++pass)
      for (int j = 0; j < n_layers; ++j) {
        const int l = opt.layers[size_t(j)];
        if (pass > 0 || j > 0) p = probe(m, ids, l, last, opt.forward_requests);
        res.residual_norms.push_back(residual_norms(p, z));
        std::vector<Eigen::VectorXd> r;
        for (size_t i = 0; i < ids.size(); ++i) {
          r.push_back((z[i] - p[i].h) / (rho * double(n_layers - j)));  // the layers left share it
          if (opt.router_guard) remove_directions(guard[l], r.back());
        }
        if (opt.method == BatchMethod::MoeEdit) {
          moeedit_layer(m, l, pass, p, r, opt, cache, &res);
          continue;
        }
        std::map<int, Columns> cols;  // by expert id
        for (size_t i = 0; i < ids.size(); ++i) collect(m, l, opt, int(i), p[i], r[i], &cols);
        const int n_shared = shared_expert_count(m, l);
        for (const auto& [expert, c] : cols)
          res.updates.push_back(solve_expert(m, l, expert, pass, c, opt, cache, n_shared));
      }
  } catch (...) {
    revert(m, res);
    throw;
  }
  p = probe(m, ids, last, last, opt.forward_requests);
  res.residual_norms.push_back(residual_norms(p, z));
  if (cache && opt.method != BatchMethod::Memit)
    for (const BatchExpertUpdate& u : res.updates) {
      if (u.pass > 0) continue;  // later passes revisit the same keys
      MatD& A = (*cache)[{u.layer, u.expert}];
      if (A.size() == 0) A = MatD::Zero(u.K.rows(), u.K.rows());
      A += u.K * u.K.transpose();
    }
  res.seconds = since(t0);
  return res;
}

BatchEditResult apply_batch_edit(Model& m, const Tokenizer& tok, const std::vector<EditRequest>& reqs,
                                 const BatchOptions& opt, std::vector<std::string>* templates_cache,
                                 KeyCache* cache) {
  std::vector<std::string> local;
  std::vector<std::string>& tm = templates_cache ? *templates_cache : local;
  for (const EditRequest& r : reqs) normalized_prompt(r);  // validate before sampling templates
  if (tm.empty()) tm = context_templates(m, tok, opt.edit);
  std::vector<EditIds> ids;
  for (const EditRequest& r : reqs) ids.push_back(build_edit_ids(tok, r, tm, opt.edit.kl_prompt));
  BatchEditResult res = apply_batch_edit_ids(m, ids, opt, cache);
  res.templates = tm;
  return res;
}

void revert(Model& m, const BatchEditResult& r) {
  for (auto it = r.updates.rbegin(); it != r.updates.rend(); ++it) restore_down(m, it->layer, it->expert, it->original);
}

std::vector<std::pair<int, int>> edited_experts(const BatchEditResult& r, int request) {
  std::set<std::pair<int, int>> s;
  for (const BatchExpertUpdate& u : r.updates)
    if (request < 0 || std::find(u.requests.begin(), u.requests.end(), request) != u.requests.end())
      s.insert({u.layer, u.expert});
  return {s.begin(), s.end()};
}

}  // namespace moedit
