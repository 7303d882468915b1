// k-sparse probes (see tracing/probe.h).
#include "tracing/probe.h"

#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>

namespace moedit {

double f1_score(const std::vector<uint8_t>& truth, const std::vector<uint8_t>& pred) {
  if (truth.size() != pred.size()) throw std::invalid_argument("f1_score: sizes differ");
  double tp = 0, fp = 0, fn = 0;
  for (size_t i = 0; i < truth.size(); ++i) {
    tp += truth[i] && pred[i];
    fp += !truth[i] && pred[i];
    fn += truth[i] && !pred[i];
  }
  return tp > 0 ? 2 * tp / (2 * tp + fp + fn) : 0.0;
}

std::vector<int> rank_by_mean_difference(const MatR& x, const std::vector<uint8_t>& y, const std::vector<uint8_t>& use) {
  Eigen::VectorXd s1 = Eigen::VectorXd::Zero(x.cols()), s0 = s1;
  double n1 = 0, n0 = 0;
  for (Eigen::Index r = 0; r < x.rows(); ++r) {
    if (!use.empty() && !use[size_t(r)]) continue;
    (y[size_t(r)] ? s1 : s0) += x.row(r).transpose().cast<double>();
    (y[size_t(r)] ? n1 : n0) += 1;
  }
  const Eigen::VectorXd diff = (s1 / std::max(n1, 1.0) - s0 / std::max(n0, 1.0)).cwiseAbs();
  std::vector<int> order(size_t(x.cols()));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return diff[a] > diff[b]; });
  return order;
}

std::vector<uint8_t> Logistic::predict(const Eigen::MatrixXd& x) const {
  std::vector<uint8_t> out(size_t(x.rows()));
  for (Eigen::Index r = 0; r < x.rows(); ++r) {
    const Eigen::VectorXd z = (x.row(r).transpose() - mu).cwiseQuotient(sd);
    out[size_t(r)] = z.dot(w) + b >= 0;  // σ(·) ≥ 0.5
  }
  return out;
}

Logistic fit_logistic(const Eigen::MatrixXd& x, const std::vector<uint8_t>& y, double l2) {
  const Eigen::Index n = x.rows(), k = x.cols();
  Logistic m;
  m.mu = x.colwise().mean().transpose();
  m.sd = ((x.rowwise() - m.mu.transpose()).array().square().colwise().sum() / double(std::max<Eigen::Index>(n, 1)))
             .sqrt()
             .transpose();
  for (Eigen::Index j = 0; j < k; ++j)
    if (!(m.sd[j] > 1e-12)) m.sd[j] = 1;  // a constant column stays constant (0 after centring)
  Eigen::MatrixXd z(n, k + 1);  // standardised inputs, then a column of ones for the bias
  z.leftCols(k) = (x.rowwise() - m.mu.transpose()).array().rowwise() / m.sd.transpose().array();
  z.col(k).setOnes();
  Eigen::VectorXd t(n), beta = Eigen::VectorXd::Zero(k + 1);
  for (Eigen::Index r = 0; r < n; ++r) t[r] = y[size_t(r)];
  Eigen::VectorXd pen = Eigen::VectorXd::Constant(k + 1, 2 * l2 * double(n));  // λ·n·|w|², scaled with n
  pen[k] = 1e-9;                                                            // (bias: unpenalised, kept invertible)
  for (int it = 0; it < 100; ++it) {
    const Eigen::VectorXd p = (1.0 + (-(z * beta)).array().exp()).inverse().matrix();  // σ(zβ)
    const Eigen::VectorXd g = z.transpose() * (p - t) + pen.cwiseProduct(beta);
    const Eigen::VectorXd wt = p.array() * (1 - p.array());
    Eigen::MatrixXd h = z.transpose() * wt.asDiagonal() * z;
    h.diagonal() += pen;
    const Eigen::VectorXd step = h.ldlt().solve(g);
    beta -= step;
    if (!step.allFinite() || step.norm() < 1e-8) break;
  }
  m.w = beta.head(k);
  m.b = beta[k];
  return m;
}

std::vector<ProbeResult> k_sparse_probes(const MatR& x, const std::vector<uint8_t>& y, const std::vector<uint8_t>& test,
                                         const std::vector<int>& ks) {
  if (y.size() != size_t(x.rows()) || test.size() != y.size()) throw std::invalid_argument("k_sparse_probes: sizes");
  std::vector<uint8_t> train(test.size());
  std::vector<uint8_t> ytr, yte;
  for (size_t r = 0; r < test.size(); ++r) {
    train[r] = !test[r];
    (test[r] ? yte : ytr).push_back(y[r]);
  }
  const std::vector<int> rank = rank_by_mean_difference(x, y, train);
  std::vector<ProbeResult> out;
  for (int k : ks) {
    if (k < 1 || k > x.cols()) continue;
    ProbeResult pr;
    pr.k = k;
    pr.neurons.assign(rank.begin(), rank.begin() + k);
    Eigen::MatrixXd xtr(Eigen::Index(ytr.size()), k), xte(Eigen::Index(yte.size()), k);
    Eigen::Index a = 0, b = 0;
    for (Eigen::Index r = 0; r < x.rows(); ++r) {
      auto& dst = test[size_t(r)] ? xte : xtr;
      const Eigen::Index row = test[size_t(r)] ? b++ : a++;
      for (int j = 0; j < k; ++j) dst(row, j) = x(r, pr.neurons[size_t(j)]);
    }
    pr.train_pos = int(std::count(ytr.begin(), ytr.end(), 1));
    pr.test_pos = int(std::count(yte.begin(), yte.end(), 1));
    pr.f1 = ytr.empty() || yte.empty() ? 0.0 : f1_score(yte, fit_logistic(xtr, ytr).predict(xte));
    out.push_back(std::move(pr));
  }
  return out;
}

}  // namespace moedit
