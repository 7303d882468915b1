// class Model: loading, tokens, logits, generation, and the hook API (run_with_cache / run_with_hooks).
#include "model_py.h"

#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include <chrono>
#include <filesystem>

#include "io/errors.h"
#include "kernels/device.h"
#include "model/generate.h"

namespace moedit::py {

PyModel::PyModel(const std::string& p, const std::string& device, const std::string& precision) : path(p) {
  const Backend* be = nullptr;
  try {
    be = &backend_named(device);
  } catch (const std::exception& e) {
    throw InputError("device " + device + ": " + e.what());
  }
  try {
    set_precision_named(*be, precision);
  } catch (const std::invalid_argument& e) {
    throw InputError("precision " + precision + ": " + e.what());
  }
  m = Model::load(path);
  m->set_backend(*be);
}

const Tokenizer& PyModel::tokenizer() {
  if (!tok_) {
    require_input(std::filesystem::exists(std::filesystem::path(path) / "tokenizer.json"),
                  path + ": no tokenizer.json (text needs one; pass token ids instead)");
    tok_ = Tokenizer::from_file(path);
  }
  return *tok_;
}

std::vector<int32_t> PyModel::ids(const Tokens& t) {
  std::vector<int32_t> out = std::holds_alternative<std::string>(t)
                                 ? tokenizer().encode_ids(std::get<std::string>(t), true)
                                 : std::get<std::vector<int32_t>>(t);
  require_input(!out.empty(), "tokens: no tokens given (or the text encodes to none)");
  return out;
}

KeyStatsCache& PyModel::key_stats() {
  if (!stats_) stats_ = std::make_unique<KeyStatsCache>(*m, tokenizer(), KeyStatsOptions{});
  return *stats_;
}

std::vector<HookPoint> hook_points(const Model& m) {
  const ModelConfig& c = m.config();
  const int H = c.hidden;
  std::vector<HookPoint> out{{hook_names::embed(), H}};
  for (int l = 0; l < c.n_layers; ++l) {
    const FFNWeights& f = m.weights().layers[size_t(l)].ffn;
    out.insert(out.end(), {{hook_names::resid_pre(l), H}, {hook_names::attn_out(l), H}, {hook_names::ffn_in(l), H}});
    if (f.moe) {
      out.insert(out.end(), {{hook_names::router_logits(l), c.n_experts},
                             {hook_names::expert_ids(l), c.top_k},
                             {hook_names::expert_weights(l), c.top_k}});
      for (int e = 0; e < c.n_experts; ++e) out.push_back({hook_names::expert_key(l, e), f.experts.I});
      for (int e = 0; e < c.n_experts; ++e) out.push_back({hook_names::expert_out(l, e), H});
      if (f.has_shared) {
        out.push_back({hook_names::shared_key(l), f.shared.I});
        for (int j = 0; j < c.n_shared_experts; ++j) out.push_back({hook_names::shared_expert_out(l, j), H});
        out.push_back({hook_names::shared_out(l), H});
      }
    }
    out.insert(out.end(), {{hook_names::moe_out(l), H}, {hook_names::resid_post(l), H}});
  }
  out.push_back({hook_names::final_norm(), H});
  return out;
}

namespace {

// The hook points a names_filter keeps: None (all), a name, a list of names or a predicate name → bool.
std::vector<HookPoint> select_hooks(const Model& m, const nb::object& filter) {
  std::vector<HookPoint> all = hook_points(m), out;
  if (filter.is_none()) return all;
  if (PyCallable_Check(filter.ptr()) && !nb::isinstance<nb::str>(filter)) {
    for (auto& h : all)
      if (nb::cast<bool>(filter(h.name))) out.push_back(h);
    return out;
  }
  const auto names = nb::isinstance<nb::str>(filter) ? std::vector<std::string>{nb::cast<std::string>(filter)}
                                                     : nb::cast<std::vector<std::string>>(filter);
  for (const auto& n : names) {
    auto it = std::find_if(all.begin(), all.end(), [&](const HookPoint& h) { return h.name == n; });
    require_input(it != all.end(), "unknown hook name '" + n + "' (Model.hook_names() lists them)");
    out.push_back(*it);
  }
  return out;
}

struct HookInfo {  // the second argument of a run_with_hooks function
  std::string name;
  int layer, expert;
  std::vector<int> rows;  // token index of each activation row
};

// fn(view, info) may change the view in place or return a replacement of the same shape (anything NumPy converts).
void call_hook(const nb::object& fn, Eigen::Ref<MatR> act, const HookContext& ctx) {
  HookInfo info{ctx.name, ctx.layer, ctx.expert, std::vector<int>(size_t(act.rows()))};
  for (int r = 0; r < int(act.rows()); ++r) info.rows[size_t(r)] = ctx.token(r);
  nb::object view = hook_view(act);
  nb::object ret = fn(view, info);
  if (ret.is_none() || ret.is(view)) return;
  nb::object arr = nb::module_::import_("numpy").attr("ascontiguousarray")(ret, "float32");
  auto a = nb::cast<nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu>>(arr);
  require_input(a.shape(0) == size_t(act.rows()) && a.shape(1) == size_t(act.cols()),
                "hook " + ctx.name + ": the returned array has shape [" + std::to_string(a.shape(0)) + ", " +
                    std::to_string(a.shape(1)) + "], the activation [" + std::to_string(act.rows()) + ", " +
                    std::to_string(act.cols()) + "]");
  act = Eigen::Map<const MatR>(a.data(), act.rows(), act.cols());
}

nb::object run_with_cache(PyModel& pm, const Tokens& t, const nb::object& names_filter, bool return_rows) {
  const std::vector<int32_t> ids = pm.ids(t);
  const std::vector<HookPoint> chosen = select_hooks(*pm.m, names_filter);
  Hooks hooks;
  std::vector<std::shared_ptr<Hooks::Capture>> caps;
  for (const HookPoint& h : chosen) caps.push_back(hooks.capture(h.name));
  ForwardOptions fo;
  fo.hooks = hooks.empty() ? nullptr : &hooks;
  ForwardOutput f;
  {
    nb::gil_scoped_release nogil;  // captures are C++ only
    f = pm.m->forward({ids}, fo);
  }
  nb::dict cache, rows;
  for (size_t i = 0; i < chosen.size(); ++i) {
    if (return_rows && chosen[i].name.find(".experts.") != std::string::npos)
      rows[chosen[i].name.c_str()] = nb::cast(caps[i]->tokens);
    cache[chosen[i].name.c_str()] = capture_array(caps[i], chosen[i].cols);
  }
  nb::object logits = nb::cast(owned_array(std::move(f.logits)));
  return return_rows ? nb::make_tuple(logits, cache, rows) : nb::make_tuple(logits, cache);
}

Array run_with_hooks(PyModel& pm, const Tokens& t, const std::vector<std::pair<std::string, nb::object>>& fwd_hooks) {
  const std::vector<int32_t> ids = pm.ids(t);
  Hooks hooks;
  for (const auto& [name, fn] : fwd_hooks) {
    select_hooks(*pm.m, nb::str(name.c_str()));  // InputError for a name the model has no hook of
    hooks.add(name, [fn = fn](Eigen::Ref<MatR> act, const HookContext& ctx) { call_hook(fn, act, ctx); });
  }
  ForwardOptions fo;
  fo.hooks = hooks.empty() ? nullptr : &hooks;
  return owned_array(std::move(pm.m->forward({ids}, fo).logits));
}

// Seconds per forward of the same captures run_with_cache makes, timed in C++ (the binding's overhead anchor).
double time_forward(PyModel& pm, const Tokens& t, const nb::object& names_filter, int repeats) {
  const std::vector<int32_t> ids = pm.ids(t);
  const std::vector<HookPoint> chosen = select_hooks(*pm.m, names_filter);
  nb::gil_scoped_release release;
  const auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < repeats; ++r) {
    Hooks hooks;
    std::vector<std::shared_ptr<Hooks::Capture>> caps;
    for (const HookPoint& h : chosen) caps.push_back(hooks.capture(h.name));
    ForwardOptions fo;
    fo.hooks = hooks.empty() ? nullptr : &hooks;
    pm.m->forward({ids}, fo);
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / repeats;
}

}  // namespace

nb::class_<PyModel> bind_model(nb::module_& mod) {
  nb::class_<HookInfo>(mod, "HookInfo", "What a run_with_hooks function is told about the activation it gets")
      .def_ro("name", &HookInfo::name)
      .def_ro("layer", &HookInfo::layer, "-1 outside blocks")
      .def_ro("expert", &HookInfo::expert, "-1 unless an expert hook")
      .def_ro("rows", &HookInfo::rows, "token index of each activation row")
      .def("__repr__", [](const HookInfo& h) { return "HookInfo('" + h.name + "')"; });

  return nb::class_<PyModel>(mod, "Model", "A Hugging Face MoE checkpoint folder, loaded (weights memory-mapped)")
      .def(nb::init<const std::string&, const std::string&, const std::string&>(), nb::arg("path"),
           nb::arg("device") = "cpu", nb::arg("precision") = "fp32",
           "Loads config.json and the safetensors weights; device: cpu, cuda or cuda:N; precision: fp32, or bf16 "
           "(GPU: matrix products on tensor cores)")
      .def_ro("path", &PyModel::path)
      .def_prop_ro("n_layers", [](PyModel& p) { return p.m->config().n_layers; })
      .def_prop_ro("d_model", [](PyModel& p) { return p.m->config().hidden; })
      .def_prop_ro("vocab_size", [](PyModel& p) { return p.m->config().vocab_size; })
      .def_prop_ro("n_experts", [](PyModel& p) { return p.m->config().n_experts; })
      .def_prop_ro("top_k", [](PyModel& p) { return p.m->config().top_k; })
      .def_prop_ro("moe_layers",
                   [](PyModel& p) {
                     std::vector<int> ls;
                     for (int l = 0; l < p.m->config().n_layers; ++l)
                       if (p.m->config().is_moe(l)) ls.push_back(l);
                     return ls;
                   })
      .def("tokenize", [](PyModel& p, const std::string& text) { return p.tokenizer().encode_ids(text, true); },
           nb::arg("text"), "Token ids of the text, special tokens added as the tokenizer does (the CLI's --prompt)")
      .def("decode",
           [](PyModel& p, const std::vector<int32_t>& ids, bool skip) { return p.tokenizer().decode(ids, skip); },
           nb::arg("ids"), nb::arg("skip_special_tokens") = false)
      .def("hook_names",
           [](PyModel& p) {
             std::vector<std::string> n;
             for (const auto& h : hook_points(*p.m)) n.push_back(h.name);
             return n;
           },
           "Every hook point of a forward, in forward order")
      .def("logits",
           [](PyModel& p, const Tokens& t) {
             const std::vector<int32_t> ids = p.ids(t);
             MatR logits;
             {
               nb::gil_scoped_release nogil;
               logits = std::move(p.m->forward({ids}).logits);
             }
             return owned_array(std::move(logits));
           },
           nb::arg("tokens"), "Logits of every position [n_tokens, vocab] (float32)")
      .def("generate",
           [](PyModel& p, const Tokens& t, int n, int top_k, uint64_t seed) -> nb::object {
             GenerateOptions o;
             o.max_new_tokens = n;
             o.top_k = top_k;
             o.seed = seed;
             const std::vector<int32_t> out = generate(*p.m, p.ids(t), o);
             if (std::holds_alternative<std::string>(t)) return nb::str(p.tokenizer().decode(out).c_str());
             return nb::cast(out);
           },
           nb::arg("tokens"), nb::arg("max_new_tokens") = 16, nb::arg("top_k") = 0, nb::arg("seed") = 0,
           "The continuation (new tokens only): text for a text prompt, else ids. top_k 0: greedy (the CLI's generate)")
      .def("run_with_cache", &run_with_cache, nb::arg("tokens"), nb::arg("names_filter") = nb::none(),
           nb::arg("return_rows") = false,
           "(logits, cache): cache maps hook names to float32 arrays [rows, width] (no copies). names_filter: None "
           "(every hook), a name, a list of names or a predicate. Expert hooks hold only the rows routed to that "
           "expert; return_rows=True adds a third dict: expert hook name -> token index of each row")
      .def("run_with_hooks", &run_with_hooks, nb::arg("tokens"), nb::arg("fwd_hooks"),
           "Logits of a forward where each fn(activation, info) of fwd_hooks [(name, fn)] runs at its hook: it may "
           "change the float32 view in place (valid only during the call) or return a replacement")
      .def("_time_forward", &time_forward, nb::arg("tokens"), nb::arg("names_filter") = nb::none(),
           nb::arg("repeats") = 10, "Benchmark anchor: seconds per C++ forward with the same captures");
}

}  // namespace moedit::py
