// PCA and exact t-SNE (see tracing/tsne.h).
#include "tracing/tsne.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace moedit {

Eigen::MatrixXd pca(const Eigen::MatrixXd& x, int dims) {
  const Eigen::Index n = x.rows(), d = x.cols();
  if (dims < 1 || dims > d) throw std::invalid_argument("pca: dims out of range");
  const Eigen::MatrixXd c = x.rowwise() - x.colwise().mean();  // [n, d]
  const Eigen::MatrixXd cov = c.transpose() * c / double(std::max<Eigen::Index>(n - 1, 1));
  Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> es(cov);  // eigenvalues ascending
  Eigen::MatrixXd comp(d, dims);                           // [d, dims], largest variance first
  for (int k = 0; k < dims; ++k) {
    Eigen::VectorXd v = es.eigenvectors().col(d - 1 - k);
    Eigen::Index at = 0;
    v.cwiseAbs().maxCoeff(&at);
    comp.col(k) = v[at] < 0 ? Eigen::VectorXd(-v) : v;
  }
  return c * comp;
}

namespace {

// Squared Euclidean distances [n, n].
Eigen::MatrixXd squared_distances(const Eigen::MatrixXd& x) {
  const Eigen::VectorXd sq = x.rowwise().squaredNorm();
  Eigen::MatrixXd d = (-2.0 * x * x.transpose()).colwise() + sq;
  d.rowwise() += sq.transpose();
  return d.cwiseMax(0.0);
}

}  // namespace

Eigen::MatrixXd tsne_affinities(const Eigen::MatrixXd& x, double perplexity) {
  const Eigen::Index n = x.rows();
  const Eigen::MatrixXd d = squared_distances(x);
  const double target = std::log(perplexity);  // entropy in nats
  Eigen::MatrixXd p = Eigen::MatrixXd::Zero(n, n);
#pragma omp parallel for schedule(dynamic, 16)
  for (Eigen::Index i = 0; i < n; ++i) {
    double beta = 1, lo = 0, hi = INFINITY;
    Eigen::VectorXd row(n);
    for (int it = 0; it < 100; ++it) {
      double sum = 0, dot = 0;
      for (Eigen::Index j = 0; j < n; ++j) {
        row[j] = j == i ? 0.0 : std::exp(-d(i, j) * beta);
        sum += row[j];
        dot += row[j] * d(i, j);
      }
      if (sum <= 0) sum = 1e-300;
      const double h = std::log(sum) + beta * dot / sum;  // entropy of the row distribution
      row /= sum;
      if (std::abs(h - target) < 1e-5) break;
      if (h > target) {  // too flat: sharpen
        lo = beta;
        beta = std::isinf(hi) ? beta * 2 : (beta + hi) / 2;
      } else {
        hi = beta;
        beta = (beta + lo) / 2;
      }
    }
    p.row(i) = row.transpose();
  }
  Eigen::MatrixXd s = (p + p.transpose()) / (2.0 * double(n));
  return s.cwiseMax(1e-12);
}

Eigen::MatrixXd tsne(const Eigen::MatrixXd& x, const TsneOptions& opt) {
  const Eigen::Index n = x.rows();
  if (n < 5) return pca(x, std::min<int>(2, int(x.cols())));
  Eigen::MatrixXd y = pca(x, 2);  // [n, 2]
  const double sd = std::sqrt((y.col(0).array() - y.col(0).mean()).square().sum() / double(n));
  y *= sd > 0 ? 1e-4 / sd : 0.0;
  const Eigen::MatrixXd p = tsne_affinities(x, std::min(opt.perplexity, double(n - 1) / 3.0));
  const double lr = opt.learning_rate > 0 ? opt.learning_rate : std::max(double(n) / opt.exaggeration / 4.0, 50.0);
  Eigen::MatrixXd update = Eigen::MatrixXd::Zero(n, 2), gains = Eigen::MatrixXd::Ones(n, 2);
  Eigen::MatrixXd num(n, n), grad(n, 2);
  for (int it = 0; it < opt.iterations; ++it) {
    const bool early = it < opt.exaggeration_iterations;
    const double ex = early ? opt.exaggeration : 1.0, momentum = early ? 0.5 : 0.8;
    // Student-t kernel num_ij = 1 / (1 + |y_i − y_j|²); Q = num / Σ_{i≠j} num.
    double z = 0;
#pragma omp parallel for reduction(+ : z)
    for (Eigen::Index i = 0; i < n; ++i)
      for (Eigen::Index j = 0; j < n; ++j) {
        num(i, j) = i == j ? 0.0 : 1.0 / (1.0 + (y.row(i) - y.row(j)).squaredNorm());
        z += num(i, j);
      }
    // ∂KL/∂y_i = 4 Σ_j (ex·p_ij − q_ij)·num_ij·(y_i − y_j)
#pragma omp parallel for
    for (Eigen::Index i = 0; i < n; ++i) {
      double g0 = 0, g1 = 0;
      for (Eigen::Index j = 0; j < n; ++j) {
        const double w = (ex * p(i, j) - num(i, j) / z) * num(i, j);
        g0 += w * (y(i, 0) - y(j, 0));
        g1 += w * (y(i, 1) - y(j, 1));
      }
      grad(i, 0) = 4 * g0;
      grad(i, 1) = 4 * g1;
    }
    for (Eigen::Index i = 0; i < n; ++i)
      for (int c = 0; c < 2; ++c) {
        const bool same = (grad(i, c) > 0) == (update(i, c) > 0);
        gains(i, c) = std::max(same ? gains(i, c) * 0.8 : gains(i, c) + 0.2, 0.01);
        update(i, c) = momentum * update(i, c) - lr * gains(i, c) * grad(i, c);
      }
    y += update;
  }
  return y.rowwise() - y.colwise().mean();
}

}  // namespace moedit
