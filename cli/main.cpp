// moedit: locate and edit facts inside Mixture-of-Experts language models.
// Exit codes: 0 ok, 1 runtime failure, 2 bad input (malformed file, missing field, bad flag).
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <cctype>
#include <string>
#include <filesystem>
#include <vector>

#include "cli/commands.h"
#include "cli/common.h"
#include "io/errors.h"
#include "kernels/device.h"
#include "model/memory.h"

namespace moedit::cli {

std::string default_model_path() {
  if (const char* env = std::getenv("MOEDIT_MODEL"); env && *env) return env;
  return std::string(MOEDIT_SOURCE_DIR) + "/models/moedit-demo";
}

namespace {
LoadOptions g_load;  // set by the loading flags of the one command this process runs
std::string g_device;  // --device; empty: default_device()
std::string g_max_gpu_memory;  // --max-gpu-memory; empty: no cap
std::string g_precision = "fp32";  // --precision

// "40GB", "40 GiB", "512MB", "1.5e9", "4096": bytes (decimal units, binary with an i; a bare number is bytes).
size_t parse_bytes(const std::string& flag, const std::string& s) {
  const auto bad = [&] {
    return InputError(flag + " " + s + ": expected a size such as 40GB, 512MiB or a number of bytes");
  };
  size_t used = 0;
  double v = 0;
  try {
    v = std::stod(s, &used);
  } catch (const std::exception&) {
    throw bad();
  }
  std::string unit = s.substr(used);
  unit.erase(std::remove(unit.begin(), unit.end(), ' '), unit.end());
  std::transform(unit.begin(), unit.end(), unit.begin(), [](unsigned char c) { return char(std::toupper(c)); });
  if (!unit.empty() && unit.back() == 'B') unit.pop_back();
  static const std::pair<const char*, double> units[] = {
      {"", 1}, {"K", 1e3}, {"M", 1e6}, {"G", 1e9}, {"T", 1e12},
      {"KI", 1024.}, {"MI", 1048576.}, {"GI", 1073741824.}, {"TI", 1099511627776.}};
  for (const auto& [name, scale] : units)
    if (unit == name) {
      const double bytes = v * scale;
      if (!(bytes >= 1) || bytes > 1e18) throw bad();
      return size_t(bytes);
    }
  throw bad();
}
}  // namespace

void add_load_options(CLI::App* cmd, bool paging) {
  cmd->add_flag("--deepseek-v2-transformers-norm", g_load.deepseek_v2_transformers_norm,
                "DeepSeek-V2 with norm_topk_prob: true: ignore it as transformers' native DeepseekV2 does (default: "
                "renormalise the top-k weights, as DeepSeek's remote code does)");
  cmd->add_option("--device", g_device,
                  "cpu, cuda or cuda:N: where the forward passes run (default: cuda where this build has CUDA and a GPU "
                  "is present, else cpu; taped runs such as ROME's v* stay on the CPU)");
  cmd->add_option("--max-gpu-memory", g_max_gpu_memory,
                  "Cap the GPU memory moedit holds (e.g. 40GB, 40GiB): models larger than it stream their layers from "
                  "the mapped checkpoint, the next layer uploading while one runs");
  cmd->add_option("--precision", g_precision,
                  "fp32 or bf16: the arithmetic of matrix products. fp32 (default) is the CPU's; bf16 (GPU) rounds "
                  "activations and 16/8-bit weights to bf16 on tensor cores, sums in fp32; norms, attention, routing, "
                  "scores and fp32 weights (routers, edits) stay fp32");
  if (!paging) return;
  cmd->add_flag("--mlock", g_load.mlock, "Lock the mapped weights in RAM at load (read them all in now)");
  cmd->add_flag("--prefetch", g_load.prefetch,
                "Read the next layer's weights ahead while a layer runs (models larger than RAM)");
}

void add_model_arg(CLI::App* cmd, std::string& model) {
  model = default_model_path();
  cmd->add_option("MODEL", model, "Hugging Face checkpoint folder (default: the bundled demo model)");
}

CLI::App* add_model_command(CLI::App& app, const std::string& name, const std::string& about, std::string& model,
                            bool paging) {
  CLI::App* cmd = app.add_subcommand(name, about);
  add_model_arg(cmd, model);
  add_load_options(cmd, paging);
  return cmd;
}

CLI::Option* add_json_flag(CLI::App* cmd, bool& json, const std::string& what) {
  return cmd->add_flag("--json", json, what.empty() ? "Print JSON" : "Print JSON: " + what);
}

const LoadOptions& load_options() { return g_load; }

std::shared_ptr<Model> load_model(const std::string& path) {
  const std::string device = g_device.empty() ? default_device() : g_device;
  const Backend* be = nullptr;
  try {
    be = &backend_named(device);
  } catch (const std::exception& e) {
    throw InputError("--device " + device + ": " + e.what());
  }
  if (!g_max_gpu_memory.empty()) {
    const size_t cap = parse_bytes("--max-gpu-memory", g_max_gpu_memory);
    if (be->host_memory()) throw InputError("--max-gpu-memory: --device " + device + " has no GPU memory to cap");
    be->set_memory_limit(cap);
  }
  try {
    set_precision_named(*be, g_precision);
  } catch (const std::invalid_argument& e) {
    throw InputError("--precision " + g_precision + ": " + e.what());
  }
  std::shared_ptr<Model> m = Model::load(path, g_load);
  m->set_backend(*be);
  return m;
}

namespace {
std::vector<std::pair<int, RegisterFn>>& registry() {
  static std::vector<std::pair<int, RegisterFn>> r;
  return r;
}
}  // namespace

CommandRegistrar::CommandRegistrar(int order, RegisterFn fn) { registry().emplace_back(order, fn); }

int report_error(const std::exception_ptr& error) {
  try {
    std::rethrow_exception(error);
  } catch (const InputError& e) {
    std::fprintf(stderr, "moedit: error: %s\n", e.what());
    return 2;
  } catch (const ResourceError& e) {
    std::fprintf(stderr, "moedit: not enough memory: %s\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    const MachineMemory m = machine_memory();
    std::fprintf(stderr, "moedit: out of memory (%s of %s RAM available%s%s)\n", gb(m.available).c_str(),
                 gb(m.ram).c_str(), m.as_limit ? ", address-space limit " : "", m.as_limit ? gb(m.as_limit).c_str() : "");
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moedit: runtime failure: %s\n", e.what());
    return 1;
  } catch (...) {
    std::fprintf(stderr, "moedit: runtime failure: an unknown exception\n");
    return 1;
  }
}

void register_all(CLI::App& app) {
  auto r = registry();
  std::stable_sort(r.begin(), r.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  for (const auto& [order, fn] : r) fn(app);
}

}  // namespace moedit::cli

int main(int argc, char** argv) {
  CLI::App app{"moedit — locate and edit facts inside Mixture-of-Experts language models"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "moedit 0.1.0");
  moedit::cli::register_all(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  } catch (...) {
    return moedit::cli::report_error(std::current_exception());
  }
  return 0;
}
