// --shard i/n | auto (see cli/shard.h).
#include "cli/shard.h"

#include <cstdlib>
#include <optional>

#include "io/errors.h"

namespace moedit::cli {

namespace {

std::optional<std::string> env(const std::string& name) {
  const char* v = std::getenv(name.c_str());
  if (!v || !*v) return std::nullopt;
  return std::string(v);
}

long long env_int(const std::string& name) {
  const auto v = env(name);
  require_input(v.has_value(), "--shard auto: " + name + " is not set");
  size_t used = 0;
  long long x = 0;
  try {
    x = std::stoll(*v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  require_input(used > 0 && used == v->size(), "--shard auto: " + name + "='" + *v + "' is not a number");
  return x;
}

std::string show(const std::string& name) { return name + "=" + env(name).value_or("(unset)"); }

Shard from_slurm_array() {
  const long long id = env_int("SLURM_ARRAY_TASK_ID"), count = env_int("SLURM_ARRAY_TASK_COUNT");
  const long long min = env("SLURM_ARRAY_TASK_MIN") ? env_int("SLURM_ARRAY_TASK_MIN") : 0;
  const long long step = env("SLURM_ARRAY_TASK_STEP") ? env_int("SLURM_ARRAY_TASK_STEP") : 1;
  require_input(count >= 1, "--shard auto: SLURM_ARRAY_TASK_COUNT=" + std::to_string(count) + " must be >= 1");
  require_input(step >= 1, "--shard auto: SLURM_ARRAY_TASK_STEP=" + std::to_string(step) + " must be >= 1");
  const long long off = id - min, i = off / step;
  require_input(off >= 0 && off % step == 0 && i < count,
                "--shard auto: SLURM_ARRAY_TASK_ID=" + std::to_string(id) + " is not one of the " +
                    std::to_string(count) + " tasks " + std::to_string(min) + ", " + std::to_string(min + step) +
                    ", ..., " + std::to_string(min + (count - 1) * step) + " of the job array (" +
                    show("SLURM_ARRAY_TASK_MIN") + ", " + show("SLURM_ARRAY_TASK_STEP") + ", SLURM_ARRAY_TASK_COUNT=" +
                    std::to_string(count) + "): use a contiguous array such as --array=0-" +
                    std::to_string(count - 1));
  return {int(i), int(count), show("SLURM_ARRAY_TASK_ID") + ", " + show("SLURM_ARRAY_TASK_COUNT")};
}

Shard from_rank(const std::string& rank_var, const std::string& size_var) {
  const long long rank = env_int(rank_var), size = env_int(size_var);
  require_input(size >= 1, "--shard auto: " + size_var + "=" + std::to_string(size) + " must be >= 1");
  require_input(rank >= 0 && rank < size, "--shard auto: " + rank_var + "=" + std::to_string(rank) +
                                              " is outside 0.." + std::to_string(size - 1) + " (" + size_var + "=" +
                                              std::to_string(size) + ")");
  return {int(rank), int(size), show(rank_var) + ", " + show(size_var)};
}

Shard from_environment() {
  if (env("SLURM_ARRAY_TASK_ID")) return from_slurm_array();
  for (const auto& [rank, size] : {std::pair{"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"},
                                   std::pair{"PMI_RANK", "PMI_SIZE"}, std::pair{"PMIX_RANK", "SLURM_NTASKS"}})
    if (env(rank)) return from_rank(rank, size);
  throw InputError("--shard auto: no Slurm job array or MPI launcher found (looked for SLURM_ARRAY_TASK_ID with "
                   "SLURM_ARRAY_TASK_COUNT, OMPI_COMM_WORLD_RANK with OMPI_COMM_WORLD_SIZE, PMI_RANK with PMI_SIZE, "
                   "PMIX_RANK with SLURM_NTASKS); give --shard i/n");
}

}  // namespace

Shard parse_shard(const std::string& s, const std::string& flag) {
  if (s == "auto") return from_environment();
  const auto slash = s.find('/');
  try {
    require_input(slash != std::string::npos, "");
    size_t ui = 0, un = 0;
    const std::string a = s.substr(0, slash), b = s.substr(slash + 1);
    const int i = std::stoi(a, &ui), n = std::stoi(b, &un);
    require_input(ui == a.size() && un == b.size() && n >= 1 && i >= 0 && i < n, "");
    return {i, n, flag + " " + s};
  } catch (const std::exception&) {
    throw InputError(flag + " '" + s + "': expected i/n with 0 <= i < n, or auto");
  }
}

}  // namespace moedit::cli
