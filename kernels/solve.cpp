// solve_spd on host matrices through a backend (see kernels/backend.h).
#include <Eigen/Cholesky>

#include "kernels/backend.h"

namespace moedit {

std::optional<Eigen::MatrixXd> solve_spd(const Backend& be, const Eigen::MatrixXd& A, const Eigen::MatrixXd& B) {
  const int n = int(A.rows()), m = int(B.cols());
  if (A.cols() != n || B.rows() != n) throw std::invalid_argument("solve_spd: A [n, n] and B [n, m] disagree");
  Eigen::MatrixXd a = A, x = B;  // column-major: x's columns are the op's rows of B
  if (be.host_memory()) {
    if (!be.solve_spd(a.data(), n, x.data(), m)) return std::nullopt;
    return x;
  }
  const size_t na = sizeof(double) * size_t(a.size()), nx = sizeof(double) * size_t(x.size());
  Buf da(be, na), dx(be, nx);
  be.to_device(da.as<void>(), a.data(), na);
  be.to_device(dx.as<void>(), x.data(), nx);
  if (!be.solve_spd(da.as<double>(), n, dx.as<double>(), m)) return std::nullopt;
  be.to_host(x.data(), dx.as<void>(), nx);
  return x;
}

}  // namespace moedit
