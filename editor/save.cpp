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

// Edited (layer, expert) pairs → the down-projection tensors to write: every shared expert of a layer maps to the
// one shared block (kSharedExpert), written whole from the model's current weights.
std::set<std::pair<int, int>> edited_tensors(const std::vector<std::pair<int, int>>& edited) {
  std::set<std::pair<int, int>> out;
  for (const auto& [l, e] : edited) out.insert({l, is_shared_expert(e) ? kSharedExpert : e});
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
  const ModelConfig& c = m.config();
  require_input(fs::is_directory(source_dir), "source checkpoint '" + source_dir + "' is not a folder");
  require_input(!out_dir.empty(), "no output folder given");
  const fs::path src = fs::canonical(source_dir);
  fs::path out = fs::absolute(out_dir).lexically_normal();
  if (out.filename().empty()) out = out.parent_path();
  if (fs::exists(out)) {
    require_input(!fs::equivalent(src, out), "refusing to save over the source checkpoint '" + source_dir + "'");
    require_input(fs::is_directory(out), "'" + out_dir + "' exists and is not a folder");
    require_input(opt.overwrite || fs::is_empty(out),
                  "'" + out_dir + "' exists and is not empty (pass --overwrite to replace it)");
  }
  {
    const auto rel = out.lexically_relative(src);
    require_input(rel.empty() || *rel.begin() == "..", "the output folder may not lie inside the source checkpoint");
  }
  TensorStore store(src.string());

  // Edited tensors: name → [(slice, layer, expert)].
  struct Patch {
    int slice, layer, expert;
  };
  std::map<std::string, std::vector<Patch>> patches;
  for (const auto& [l, e] : edited_tensors(edited)) {
    const DownProjLocation loc = locate_down_proj(c, store, l, e);
    const TensorView& t = store.get(loc.tensor);
    const ExpertBank& b = e == kSharedExpert ? m.weights().layers[size_t(l)].ffn.shared
                                             : m.weights().layers[size_t(l)].ffn.experts;
    const std::vector<int64_t> want2 = {b.H, b.I}, want3 = {c.n_experts, b.H, b.I};
    require_input(loc.slice < 0 ? t.shape == want2 : t.shape == want3,
                  t.file + ": tensor '" + loc.tensor + "' does not have the expected shape");
    patches[loc.tensor].push_back({loc.slice, l, e});
  }

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
        OwnedTensor t;
        t.dtype = view.dtype;
        t.shape = view.shape;
        const auto it = patches.find(tname);
        if (it == patches.end()) {
          t.bytes.assign(view.data, view.data + view.nbytes);
          tensors.emplace(tname, std::move(t));
          continue;
        }
        // An edited tensor: the source values (ΔW is measured against them), written in its dtype or in fp32.
        const std::vector<float> source = view.to_f32();
        if (opt.f32) {
          t = make_f32_tensor(view.shape, source.data());
        } else {
          t.bytes.assign(view.data, view.data + view.nbytes);
        }
        SavedTensor rep{tname, dtype_name(t.dtype), 0, 0};
        for (const Patch& p : it->second) {
          const ExpertBank& b = p.expert == kSharedExpert ? m.weights().layers[size_t(p.layer)].ffn.shared
                                                          : m.weights().layers[size_t(p.layer)].ffn.experts;
          const size_t n = size_t(b.H) * size_t(b.I), first = p.slice < 0 ? 0 : size_t(p.slice) * n;
          const MatR cur = down_weight(m.weights(), p.layer, p.expert).to_f32();
          convert_into(t.dtype, cur.data(), n, t.bytes.data() + first * dtype_size(t.dtype));
          for (size_t i = 0; i < n; ++i) {  // ΔW = W − W_source; what the file holds minus ΔW = round(W) − W
            rep.max_delta = std::max(rep.max_delta, std::abs(double(cur.data()[i]) - source[first + i]));
            rep.max_rounding =
                std::max(rep.max_rounding, std::abs(double(round_trip(t.dtype, cur.data()[i])) - cur.data()[i]));
          }
        }
        report.tensors.push_back(std::move(rep));
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

std::vector<std::string> round_to_checkpoint_dtype(Model& m, const std::string& source_dir,
                                                   const std::vector<std::pair<int, int>>& edited) {
  TensorStore store(source_dir);
  std::set<std::string> seen;
  for (const auto& [l, e] : edited_tensors(edited)) {
    const DownProjLocation loc = locate_down_proj(m.config(), store, l, e);
    const DType dt = store.get(loc.tensor).dtype;
    seen.insert(dtype_name(dt));
    FFNWeights& f = m.mutable_weights().layers[size_t(l)].ffn;
    ExpertBank& b = e == kSharedExpert ? f.shared : f.experts;
    float* d = b.down[size_t(e == kSharedExpert ? 0 : e)].mutable_f32();
    for (size_t i = 0; i < size_t(b.H) * size_t(b.I); ++i) d[i] = round_trip(dt, d[i]);
  }
  return {seen.begin(), seen.end()};
}

}  // namespace moedit
