// k-sparse linear probes (issue 20; after Gurnee et al. 2023 as used by Herbst, Lee & Wermter, "The Expert Strikes
// Back"): how well can k neurons of one expert (or of the shared expert) predict a binary token feature?
//
// For each k: the k neurons with the largest |mean(x | y = 1) − mean(x | y = 0)| on the training rows (ties: lower
// index) are kept, a logistic regression on them (standardised with the training rows' mean and sd; L2 penalty
// λ·|w|² on the weights, not the bias; Newton/IRLS steps until the step is below 1e-8 or 100 steps) is fitted on
// the training rows, and its F1 (threshold 0.5, positive class 1) is measured on the held-out rows.
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/ops.h"

namespace moedit {

// F1 = 2·tp / (2·tp + fp + fn); 0 when there is no positive in truth or prediction.
double f1_score(const std::vector<uint8_t>& truth, const std::vector<uint8_t>& pred);

// Columns of x [n, d] ranked by |mean over rows with y = 1 − mean over rows with y = 0|, descending, using only
// the rows where use[r] is set (empty: all rows).
std::vector<int> rank_by_mean_difference(const MatR& x, const std::vector<uint8_t>& y, const std::vector<uint8_t>& use = {});

struct Logistic {
  Eigen::VectorXd w;        // [k] on standardised inputs
  double b = 0;
  Eigen::VectorXd mu, sd;   // [k] standardisation
  std::vector<uint8_t> predict(const Eigen::MatrixXd& x) const;  // x [n, k] raw → p ≥ 0.5
};
// x [n, k] (raw), y [n] ∈ {0, 1}.
Logistic fit_logistic(const Eigen::MatrixXd& x, const std::vector<uint8_t>& y, double l2 = 1e-3);

struct ProbeResult {
  int k = 0;
  std::vector<int> neurons;  // the k columns used, best first
  double f1 = 0;             // held-out
  int train_pos = 0, test_pos = 0;
};
// x [n, d], y [n], test [n] (1: held out). k values above d are skipped.
std::vector<ProbeResult> k_sparse_probes(const MatR& x, const std::vector<uint8_t>& y, const std::vector<uint8_t>& test,
                                         const std::vector<int>& ks = {1, 2, 4, 8, 16, 32, 64});

}  // namespace moedit
