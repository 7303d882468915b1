// Which shard of a sharded run this process is: `--shard i/n`, or `--shard auto` from the scheduler's environment.
#pragma once
#include <string>

namespace moedit::cli {

struct Shard {
  int index = 0, count = 1;
  std::string source;  // where `auto` found it, e.g. "SLURM_ARRAY_TASK_ID=3, SLURM_ARRAY_TASK_COUNT=4"
  std::string str() const { return std::to_string(index) + "/" + std::to_string(count); }
};

// `flag` ("--shard") "i/n" with 0 <= i < n, or "auto": a Slurm job array (SLURM_ARRAY_TASK_ID minus
// SLURM_ARRAY_TASK_MIN, divided by SLURM_ARRAY_TASK_STEP when set, of SLURM_ARRAY_TASK_COUNT tasks), else an MPI
// launcher's rank and size (OMPI_COMM_WORLD_RANK/OMPI_COMM_WORLD_SIZE, PMI_RANK/PMI_SIZE, PMIX_RANK/SLURM_NTASKS).
// InputError naming the variable for a malformed or out-of-range value, or listing those it looked for.
Shard parse_shard(const std::string& s, const std::string& flag = "--shard");

}  // namespace moedit::cli
