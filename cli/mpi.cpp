// `--mpi` (see cli/mpi.h): the one file of moedit that talks to MPI.
#include "cli/mpi.h"

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <stdexcept>
#include <string>

#include "cli/common.h"
#include "io/errors.h"

#ifdef MOEDIT_HAVE_MPI
#include <mpi.h>
#endif

namespace moedit::cli::mpi {

namespace {

enum Status : int { kOk = 0, kRuntimeFailure = 1, kBadInput = 2 };

#ifdef MOEDIT_HAVE_MPI
// MPI_Init / MPI_Finalize around one command.
struct Session {
  Session() {
    int done = 0;
    MPI_Initialized(&done);
    if (!done) MPI_Init(nullptr, nullptr);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
  }
  ~Session() { finish(); }
  void barrier() const { MPI_Barrier(MPI_COMM_WORLD); }
  void finish() {
    if (!finished) MPI_Finalize();
    finished = true;
  }
  // The worst status over all ranks (every rank waits for the others here).
  int worst(int status) const {
    int w = status;
    MPI_Allreduce(&status, &w, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    return w;
  }
  int rank = 0, size = 1;
  bool finished = false;
};
#else
struct Session {
  Session() {
    throw InputError("--mpi: this moedit was built without MPI (install Open MPI, e.g. openmpi-bin libopenmpi-dev "
                     "through tools/setup.sh, and re-run cmake)");
  }
  int worst(int status) const { return status; }
  void barrier() const {}
  void finish() {}
  int rank = 0, size = 1;
};
#endif

}  // namespace

bool available() {
#ifdef MOEDIT_HAVE_MPI
  return true;
#else
  return false;
#endif
}

void run_then_merge(const std::function<void(int rank, int size)>& work, const std::function<void(int size)>& merge) {
  Session s;
  std::exception_ptr error;
  int status = kOk;
  try {
    work(s.rank, s.size);
  } catch (const InputError&) {
    error = std::current_exception();
    status = kBadInput;
  } catch (...) {
    error = std::current_exception();
    status = kRuntimeFailure;
  }
  const int worst = s.worst(status);
  if (worst != kOk) {
    // Every rank writes its message before any rank exits: mpirun aborts the job as soon as one rank exits non-zero,
    // which could cut another off before its message is out. So: report, wait for all, finalize, exit.
    if (!error)
      error = worst == kBadInput
                  ? std::make_exception_ptr(
                        InputError("--mpi: another rank stopped on bad input (its message above); nothing merged"))
                  : std::make_exception_ptr(
                        std::runtime_error("--mpi: another rank failed (its message above); nothing merged"));
    const int code = report_error(error);
    std::fflush(stderr);
    s.barrier();
    s.finish();
    std::exit(code);
  }
  if (s.rank == 0) merge(s.size);
}

}  // namespace moedit::cli::mpi
