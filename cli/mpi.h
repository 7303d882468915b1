// `--mpi`: one shard per MPI rank, merged on rank 0. cli/mpi.cpp is the only file that includes <mpi.h>; it is
// compiled with MOEDIT_HAVE_MPI when CMake finds MPI, and without it `--mpi` is an input error saying so.
#pragma once
#include <functional>

namespace moedit::cli::mpi {

// Whether this build has MPI.
bool available();

// Runs work(rank, size) on every rank (MPI_Init first, MPI_Finalize at the end, even on errors). When every rank
// succeeded, rank 0 then runs merge(size). When a rank's work threw, every rank reports an error and exits (the
// failing rank its own; the others an input error when the failing rank's was one, else a runtime failure) after
// all ranks have written their message, and nothing is merged.
void run_then_merge(const std::function<void(int rank, int size)>& work, const std::function<void(int size)>& merge);

}  // namespace moedit::cli::mpi
