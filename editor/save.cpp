// Saving edited checkpoints (see editor/save.h).
#include "editor/save.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>

#include "editor/keystats.h"
#include "io/errors.h"

namespace fs = std::filesystem;

namespace moedit {

namespace {

std::string with_expert(std::string_view tmpl, int e) {
  std::string s(tmpl);
  const auto p = s.find("{e}");
  if (p != std::string::npos) s.replace(p, 3, std::to_string(e));
  return s;
}

// The MoE module prefix of a layer, found as load_weights finds it (first module × router name present).
std::string moe_prefix(const ModelConfig& c, const TensorStore& st, int layer) {
  const std::string p = "model.layers." + std::to_string(layer) + ".";
  for (auto m : c.arch->moe_modules)
    for (auto rw : c.arch->router_weights)
      if (st.has(p + std::string(m) + "." + std::string(rw))) return p + std::string(m) + ".";
  throw InputError("layer " + std::to_string(layer) + ": no MoE router tensor found in the source checkpoint");
}

void convert_into(DType dt, const float* src, size_t n, uint8_t* dst) {
  if (dt == DType::F64) {
    for (size_t i = 0; i < n; ++i) {
      const double d = src[i];
      std::memcpy(dst + 8 * i, &d, 8);
    }
    return;
  }
  if (dt != DType::F32 && dt != DType::F16 && dt != DType::BF16)
    throw InputError(std::string("cannot write edited weights back as ") + dtype_name(dt));
  const OwnedTensor t = make_tensor(dt, {int64_t(n)}, src);
  std::memcpy(dst, t.bytes.data(), t.bytes.size());
}

float round_trip(DType dt, float v) {
  switch (dt) {
    case DType::BF16: return bf16_to_f32(f32_to_bf16(v));
    case DType::F16: return f16_to_f32(f32_to_f16(v));
    default: return v;
  }
}

// Edited (layer, expert) pairs → their down-projection parameters: every shared expert of a layer maps to the one
// shared block, written whole from the model's current weights.
std::vector<ParamId> down_params(const std::vector<std::pair<int, int>>& edited) {
  std::vector<ParamId> out;
  for (const auto& [l, e] : edited) out.push_back({ParamId::Kind::Down, l, is_shared_expert(e) ? kSharedBlock : e});
  return out;
}

// The parameters to write, grouped by tensor (duplicates dropped).
struct Patch {
  ParamId param;
  int64_t offset = 0, count = 0;
};
std::map<std::string, std::vector<Patch>> plan(const Model& m, const TensorStore& st,
                                               const std::vector<ParamId>& params) {
  std::map<std::string, std::vector<Patch>> out;
  std::vector<ParamId> seen;
  for (const ParamId& p : params) {
    if (std::find(seen.begin(), seen.end(), p) != seen.end()) continue;
    seen.push_back(p);
    const ParamLocation loc = locate_param(m, st, p);
    out[loc.tensor].push_back({p, loc.offset, loc.count});
  }
  return out;
}

// The tensor as written: the source's bytes (or its values as F32) with the patched parameters' current values.
OwnedTensor patched_tensor(const Model& m, const std::string& name, const TensorView& view,
                           const std::vector<Patch>& patches, const SaveOptions& opt, SaveReport& report) {
  const std::vector<float> source = view.to_f32();  // ΔW is measured against these
  OwnedTensor t;
  if (opt.f32) {
    t = make_f32_tensor(view.shape, source.data());
  } else {
    t.dtype = view.dtype;
    t.shape = view.shape;
    t.bytes.assign(view.data, view.data + view.nbytes);
  }
  SavedTensor rep{name, dtype_name(t.dtype), 0, 0};
  for (const Patch& p : patches) {
    const MatR cur = param_values(m, p.param);  // [rows, cols] row-major = the tensor's elements [offset, +count)
    const size_t n = size_t(p.count), first = size_t(p.offset);
    convert_into(t.dtype, cur.data(), n, t.bytes.data() + first * dtype_size(t.dtype));
    for (size_t i = 0; i < n; ++i) {  // ΔW = W − W_source; what the file holds minus ΔW = round(W) − W
      rep.max_delta = std::max(rep.max_delta, std::abs(double(cur.data()[i]) - source[first + i]));
      rep.max_rounding =
          std::max(rep.max_rounding, std::abs(double(round_trip(t.dtype, cur.data()[i])) - cur.data()[i]));
    }
  }
  report.tensors.push_back(std::move(rep));
  return t;
}

const char* proj_name(ParamId::Kind k) {
  return k == ParamId::Kind::Gate ? "gate_proj" : k == ParamId::Kind::Up ? "up_proj" : "down_proj";
}

// out_dir as an absolute folder path (no trailing separator).
fs::path folder_path(const std::string& out_dir) {
  fs::path out = fs::absolute(out_dir).lexically_normal();
  if (out.filename().empty()) out = out.parent_path();
  return out;
}

}  // namespace

DownProjLocation locate_down_proj(const ModelConfig& c, const TensorStore& st, int layer, int expert) {
  require_input(layer >= 0 && layer < c.n_layers && c.is_moe(layer),
                "layer " + std::to_string(layer) + " is not an MoE layer");
  const std::string mp = moe_prefix(c, st, layer);
  DownProjLocation loc;
  if (is_shared_expert(expert)) {  // every shared expert lives in the shared block's one tensor
    require_input(!c.arch->shared_module.empty(), "this architecture has no shared expert");
    loc.tensor = mp + std::string(c.arch->shared_module) + ".down_proj.weight";
    return loc;
  }
  for (const auto& [gu, dn] : c.arch->packed)
    if (st.has(mp + std::string(gu))) {
      loc.tensor = mp + std::string(dn);
      loc.slice = expert;
      return loc;
    }
  require_input(!c.arch->expert_down.empty(), "layer " + std::to_string(layer) + ": no expert tensors found");
  loc.tensor = mp + with_expert(c.arch->expert_down, expert);
  return loc;
}

ParamLocation locate_param(const Model& m, const TensorStore& st, const ParamId& p) {
  using K = ParamId::Kind;
  const ModelConfig& c = m.config();
  const std::string what = "parameter " + p.name();
  require_input(p.layer >= 0 && p.layer < c.n_layers, what + ": no such layer");
  const FFNWeights& f = m.weights().layers[size_t(p.layer)].ffn;
  const bool expert = p.kind == K::Gate || p.kind == K::Up || p.kind == K::Down;
  if (!f.moe) require_input(expert && p.expert == 0, what + ": layer " + std::to_string(p.layer) + " is dense");
  if (p.kind == K::SharedGate) require_input(f.shared_gate.size() > 0, what + ": the layer has no shared-expert gate");
  if (expert && f.moe)
    require_input(p.expert == kSharedBlock ? f.has_shared : p.expert >= 0 && p.expert < f.experts.E,
                  what + ": no such expert");
  const int64_t rows = param_rows(m, p), cols = param_cols(m, p);
  ParamLocation loc{"", 0, rows * cols};
  std::vector<int64_t> shape = {rows, cols};
  const std::string lp = "model.layers." + std::to_string(p.layer) + ".";
  if (!f.moe) {
    loc.tensor = lp + "mlp." + proj_name(p.kind) + ".weight";
  } else {
    const std::string mp = moe_prefix(c, st, p.layer);
    if (p.kind == K::Router) {
      for (auto rw : c.arch->router_weights)
        if (loc.tensor.empty() && st.has(mp + std::string(rw))) loc.tensor = mp + std::string(rw);
    } else if (p.kind == K::SharedGate) {
      loc.tensor = mp + std::string(c.arch->shared_gate);
    } else if (p.expert == kSharedBlock) {
      loc.tensor = mp + std::string(c.arch->shared_module) + "." + proj_name(p.kind) + ".weight";
    } else {
      for (const auto& [gu, dn] : c.arch->packed)  // gate‖up [E, 2I, H] (gate rows first), down [E, H, I]
        if (loc.tensor.empty() && st.has(mp + std::string(gu))) {
          const int64_t E = c.n_experts, n = rows * cols;
          if (p.kind == K::Down) {
            loc.tensor = mp + std::string(dn);
            loc.offset = p.expert * n;
            shape = {E, rows, cols};
          } else {
            loc.tensor = mp + std::string(gu);
            loc.offset = p.expert * 2 * n + (p.kind == K::Up ? n : 0);
            shape = {E, 2 * rows, cols};
          }
        }
      if (loc.tensor.empty()) {
        require_input(!c.arch->expert_gate.empty(), what + ": no expert tensors found in the source checkpoint");
        const std::string_view t = p.kind == K::Gate ? c.arch->expert_gate
                                   : p.kind == K::Up ? c.arch->expert_up
                                                     : c.arch->expert_down;
        loc.tensor = mp + with_expert(t, p.expert);
      }
    }
  }
  require_input(!loc.tensor.empty() && st.has(loc.tensor),
                what + ": tensor '" + loc.tensor + "' not found in the source checkpoint");
  const TensorView& t = st.get(loc.tensor);
  require_input(t.shape == shape, t.file + ": tensor '" + loc.tensor + "' does not have the expected shape");
  return loc;
}

void check_save_folder(const std::string& source_dir, const std::string& out_dir, const SaveOptions& opt) {
  require_input(fs::is_directory(source_dir), "source checkpoint '" + source_dir + "' is not a folder");
  require_input(!out_dir.empty(), "no output folder given");
  const fs::path src = fs::canonical(source_dir), out = folder_path(out_dir);
  if (fs::exists(out)) {
    require_input(!fs::equivalent(src, out), "refusing to save over the source checkpoint '" + source_dir + "'");
    require_input(fs::is_directory(out), "'" + out_dir + "' exists and is not a folder");
    require_input(opt.overwrite || fs::is_empty(out),
                  "'" + out_dir + "' exists and is not empty (pass --overwrite to replace it)");
  }
  const auto rel = out.lexically_relative(src);
  require_input(rel.empty() || *rel.begin() == "..", "the output folder may not lie inside the source checkpoint");
}

void check_save_file(const std::string& source_dir, const std::string& out_file) {
  require_input(fs::is_directory(source_dir), "source checkpoint '" + source_dir + "' is not a folder");
  require_input(!out_file.empty(), "no output file given");
  const fs::path src = fs::canonical(source_dir), out = fs::absolute(out_file).lexically_normal();
  const auto rel = out.lexically_relative(src);
  require_input(rel.empty() || *rel.begin() == "..",
                "'" + out_file + "': the output file may not lie inside the source checkpoint");
  require_input(!fs::is_directory(out), "'" + out_file + "' is a folder");
}

double SaveReport::rounding_ratio() const {
  double d = 0, r = 0;
  for (const SavedTensor& t : tensors) {
    d = std::max(d, t.max_delta);
    r = std::max(r, t.max_rounding);
  }
  return d > 0 ? r / d : 0.0;
}

SaveReport save_edited_checkpoint(const Model& m, const std::string& source_dir, const std::string& out_dir,
                                  const std::vector<std::pair<int, int>>& edited, const SaveOptions& opt) {
  return save_trained_checkpoint(m, source_dir, out_dir, down_params(edited), opt);
}

SaveReport save_trained_checkpoint(const Model& m, const std::string& source_dir, const std::string& out_dir,
                                   const std::vector<ParamId>& params, const SaveOptions& opt) {
  check_save_folder(source_dir, out_dir, opt);
  const fs::path src = fs::canonical(source_dir), out = folder_path(out_dir);
  TensorStore store(src.string());
  const std::map<std::string, std::vector<Patch>> patches = plan(m, store, params);

  const fs::path parent = out.parent_path();
  fs::create_directories(parent);
  const fs::path stage = parent / ("." + out.filename().string() + ".moedit-tmp-" + std::to_string(::getpid()));
  fs::remove_all(stage);
  fs::create_directories(stage);
  SaveReport report;
  try {
    std::set<std::string> written;
    for (const auto& file : store.files()) {
      const fs::path fp(file->path());
      const std::string name = fp.filename().string();
      written.insert(name);
      bool touched = false;
      for (const auto& [tname, view] : file->tensors()) touched |= patches.count(tname) != 0;
      if (!touched) {
        fs::copy_file(fp, stage / name);
        continue;
      }
      std::map<std::string, OwnedTensor> tensors;
      for (const auto& [tname, view] : file->tensors()) {
        const auto it = patches.find(tname);
        if (it != patches.end()) {
          tensors.emplace(tname, patched_tensor(m, tname, view, it->second, opt, report));
          continue;
        }
        OwnedTensor t;
        t.dtype = view.dtype;
        t.shape = view.shape;
        t.bytes.assign(view.data, view.data + view.nbytes);
        tensors.emplace(tname, std::move(t));
      }
      write_safetensors((stage / name).string(), tensors, file->metadata());
    }
    for (const auto& ent : fs::directory_iterator(src)) {
      if (!ent.is_regular_file()) continue;
      const std::string name = ent.path().filename().string();
      if (written.count(name)) continue;
      fs::copy_file(ent.path(), stage / name);
    }
    if (fs::exists(out)) {
      const fs::path old = parent / ("." + out.filename().string() + ".moedit-old-" + std::to_string(::getpid()));
      fs::rename(out, old);
      fs::rename(stage, out);
      fs::remove_all(old);
    } else {
      fs::rename(stage, out);
    }
  } catch (...) {
    std::error_code ec;
    fs::remove_all(stage, ec);
    throw;
  }
  return report;
}

SaveReport save_param_delta(const Model& m, const std::string& source_dir, const std::string& out_file,
                            const std::vector<ParamId>& params, const SaveOptions& opt) {
  check_save_file(source_dir, out_file);
  TensorStore store(fs::canonical(source_dir).string());
  SaveReport report;
  std::map<std::string, OwnedTensor> tensors;
  for (const auto& [name, patches] : plan(m, store, params))
    tensors.emplace(name, patched_tensor(m, name, store.get(name), patches, opt, report));
  const fs::path out = fs::absolute(out_file).lexically_normal();
  if (!out.parent_path().empty()) fs::create_directories(out.parent_path());
  const fs::path tmp = out.string() + ".moedit-tmp-" + std::to_string(::getpid());
  try {
    write_safetensors(tmp.string(), tensors, {{"format", "pt"}});
    fs::rename(tmp, out);
  } catch (...) {
    std::error_code ec;
    fs::remove(tmp, ec);
    throw;
  }
  return report;
}

std::vector<std::string> round_params_to_checkpoint_dtype(Model& m, const std::string& source_dir,
                                                          const std::vector<ParamId>& params) {
  TensorStore store(source_dir);
  std::set<std::string> seen;
  std::vector<ParamId> done;
  for (const ParamId& p : params) {
    if (std::find(done.begin(), done.end(), p) != done.end()) continue;
    done.push_back(p);
    const DType dt = store.get(locate_param(m, store, p).tensor).dtype;
    seen.insert(dtype_name(dt));
    float* d = mutable_param(m, p);
    const size_t n = size_t(param_rows(m, p) * param_cols(m, p));
    for (size_t i = 0; i < n; ++i) d[i] = round_trip(dt, d[i]);
    param_changed(m, p);
  }
  return {seen.begin(), seen.end()};
}

std::vector<std::string> round_to_checkpoint_dtype(Model& m, const std::string& source_dir,
                                                   const std::vector<std::pair<int, int>>& edited) {
  return round_params_to_checkpoint_dtype(m, source_dir, down_params(edited));
}

}  // namespace moedit
