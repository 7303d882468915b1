// `--mpi` (see cli/mpi.h): the one file of moedit that talks to MPI.
#include "cli/mpi.h"

#include <exception>
#include <stdexcept>
#include <string>

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
  ~Session() { MPI_Finalize(); }
  // The worst status over all ranks (every rank waits for the others here).
  int worst(int status) const {
    int w = status;
    MPI_Allreduce(&status, &w, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    return w;
  }
  int rank = 0, size = 1;
};
#else
struct Session {
  Session() {
    throw InputError("--mpi: this moedit was built without MPI (install Open MPI, e.g. openmpi-bin libopenmpi-dev "
                     "through tools/setup.sh, and re-run cmake)");
  }
  int worst(int status) const { return status; }
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
  if (error) std::rethrow_exception(error);
  if (worst == kBadInput) throw InputError("--mpi: another rank stopped on bad input (its message above); nothing merged");
  if (worst != kOk) throw std::runtime_error("--mpi: another rank failed (its message above); nothing merged");
  if (s.rank == 0) merge(s.size);
}

}  // namespace moedit::cli::mpi
