// CudaBackend::solve_spd: cuSOLVER's Cholesky (potrf) and solve (potrs) in fp64 on the backend's stream. cuSOLVER is
// opened at run time (dlopen, the first solve): the binaries stay self-contained and run where no cuSOLVER is
// installed, and then — or where it fails to load — the solve runs on the host (the CPU backend's, on copies), which
// cuda_solver() reports.
#include <dlfcn.h>

#include <cusolverDn.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/cuda/backend_impl.h"
#include "kernels/cuda/cuda_backend.h"

namespace moedit {

namespace {

// The entry points moedit uses, from the first library that loads.
struct Cusolver {
  decltype(&cusolverDnCreate) create = nullptr;
  decltype(&cusolverDnSetStream) set_stream = nullptr;
  decltype(&cusolverDnDpotrf_bufferSize) potrf_size = nullptr;
  decltype(&cusolverDnDpotrf) potrf = nullptr;
  decltype(&cusolverDnDpotrs) potrs = nullptr;
  std::string library, error;  // what loaded; why it cannot be used (empty: it can)
  bool ok() const { return !library.empty() && error.empty(); }
};

const Cusolver& cusolver() {
  static const Cusolver lib = [] {
    Cusolver c;
#ifdef MOEDIT_EMU_NO_CUSOLVER
    c.error = "the CUDA emulation has no cuSOLVER";
#else
    void* h = nullptr;
    for (const char* name : {"libcusolver.so.12", "libcusolver.so.11", "libcusolver.so"})
      if ((h = dlopen(name, RTLD_NOW | RTLD_LOCAL))) {
        c.library = name;
        break;
      }
    if (!h) {
      const char* e = dlerror();
      c.error = e ? e : "libcusolver.so not found";
      return c;
    }
    auto sym = [&](auto& f, const char* name) {  // the first missing entry point makes the library unusable
      f = reinterpret_cast<std::remove_reference_t<decltype(f)>>(dlsym(h, name));
      if (!f && c.error.empty()) c.error = c.library + " has no " + name;
    };
    sym(c.create, "cusolverDnCreate");
    sym(c.set_stream, "cusolverDnSetStream");
    sym(c.potrf_size, "cusolverDnDpotrf_bufferSize");
    sym(c.potrf, "cusolverDnDpotrf");
    sym(c.potrs, "cusolverDnDpotrs");
#endif
    return c;
  }();
  return lib;
}

void check(cusolverStatus_t st, const char* what) {
  if (st != CUSOLVER_STATUS_SUCCESS)
    throw std::runtime_error(std::string("cuSOLVER ") + what + " failed (status " + std::to_string(int(st)) + ")");
}

}  // namespace

std::string cuda_solver() {
  const Cusolver& c = cusolver();
  return c.ok() ? "cuSOLVER (" + c.library + ")" : "the host (no cuSOLVER: " + c.error + ")";
}

namespace cuda {

bool CudaBackend::solve_spd(double* A, int n, double* B, int m) const {
  if (n <= 0 || m <= 0) return true;
  const Cusolver& cs = cusolver();
  const size_t na = sizeof(double) * size_t(n) * size_t(n), nb = sizeof(double) * size_t(n) * size_t(m);
  if (!cs.ok()) {  // on the host: the CPU backend's factorization on copies
    std::vector<double> a(size_t(n) * size_t(n)), b(size_t(n) * size_t(m));
    to_host(a.data(), A, na);
    to_host(b.data(), B, nb);
    if (!cpu_backend().solve_spd(a.data(), n, b.data(), m)) return false;
    to_device(B, b.data(), nb);
    return true;
  }
  enter();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!solver_) {
      cusolverDnHandle_t h = nullptr;
      check(cs.create(&h), "handle creation");
      solver_ = h;
    }
  }
  auto* h = static_cast<cusolverDnHandle_t>(solver_);
  check(cs.set_stream(h, st_), "stream");
  // Column-major: A is symmetric, so its lower triangle is the row-major one's transpose; B [n, m], ld n.
  int lwork = 0;
  check(cs.potrf_size(h, CUBLAS_FILL_MODE_LOWER, n, A, n, &lwork), "potrf_bufferSize");
  Buf work(*this, sizeof(double) * size_t(std::max(lwork, 1))), info(*this, sizeof(int));
  check(cs.potrf(h, CUBLAS_FILL_MODE_LOWER, n, A, n, work.as<double>(), lwork, info.as<int>()), "potrf");
  int fact = 0;
  to_host(&fact, info.as<void>(), sizeof(int));  // waits for the factorization
  if (fact > 0) return false;                    // the leading minor of order `fact` is not positive definite
  if (fact < 0) throw std::runtime_error("cuSOLVER potrf: argument " + std::to_string(-fact) + " is invalid");
  check(cs.potrs(h, CUBLAS_FILL_MODE_LOWER, n, m, A, n, B, n, info.as<int>()), "potrs");
  int solved = 0;
  to_host(&solved, info.as<void>(), sizeof(int));
  if (solved != 0) throw std::runtime_error("cuSOLVER potrs: argument " + std::to_string(-solved) + " is invalid");
  done();
  return true;
}

}  // namespace cuda
}  // namespace moedit
