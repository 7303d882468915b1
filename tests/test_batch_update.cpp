// The batch editors' closed forms (editor/batch_update.h): MEMIT with one request is ROME's update up to the
// documented λ factor, a full-rank batch meets its residuals as λ → 0, and the null-space update leaves the
// preserved keys' outputs where they were.
#include <gtest/gtest.h>

#include <Eigen/Cholesky>
#include <random>
#include <stdexcept>

#include "editor/batch_update.h"

namespace moedit {
namespace {

MatD random(int r, int c, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> d;
  MatD m(r, c);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = d(rng);
  return m;
}

// A covariance E[k kᵀ] of 400 random keys [I].
MatD covariance(int I, uint64_t seed) {
  const MatD K = random(I, 400, seed);
  return K * K.transpose() / 400.0;
}

TEST(BatchUpdate, MemitWithOneRequestIsRomesUpdateUpToLambda) {
  const int H = 7, I = 5;
  const MatD C = covariance(I, 1), r = random(H, 1, 2), k = random(I, 1, 3);
  for (double lambda : {1.0, 1e4}) {
    const MatD got = memit_delta(r, k, C, lambda);
    const Eigen::VectorXd u = C.ldlt().solve(k.col(0));  // C⁻¹k
    const double kCk = k.col(0).dot(u);
    const MatD rome = r * u.transpose() / kCk;
    const MatD want = rome * (kCk / (lambda + kCk));  // Sherman–Morrison: the λ in the denominator
    EXPECT_LE((got - want).norm(), 1e-10 * want.norm()) << lambda;
  }
}

TEST(BatchUpdate, MemitMeetsEveryResidualAsLambdaVanishes) {
  const int H = 6, I = 12, n = 4;
  const MatD C = covariance(I, 4), R = random(H, n, 5), K = random(I, n, 6);
  const MatD d = memit_delta(R, K, C, 1e-9);
  EXPECT_LE((d * K - R).norm(), 1e-6 * R.norm());
  // Larger λ: smaller updates that meet the residuals less.
  EXPECT_LT(memit_delta(R, K, C, 10).norm(), d.norm());
}

TEST(BatchUpdate, NullSpaceUpdateLeavesPreservedKeysAlone) {
  const int H = 9, I = 16, rank = 10, n = 3;
  // Preserved keys span a 10-dimensional subspace of the 16-dimensional key space.
  const MatD basis = random(I, rank, 7);
  const MatD Kp = basis * random(rank, 300, 8);
  const MatD Cp = Kp * Kp.transpose() / 300.0;
  const NullSpace ns = null_space(Cp, 1e-8);
  EXPECT_EQ(ns.dim, I - rank);
  EXPECT_LE((ns.P * ns.P - ns.P).norm(), 1e-10);  // a projector
  const MatD R = random(H, n, 9), K = random(I, n, 10);
  for (const MatD& A : {MatD(), covariance(I, 11)}) {
    const MatD d = alphaedit_delta(R, K, ns, A, 1.0);
    EXPECT_LE((d * Kp).norm(), 1e-5 * d.norm() * Kp.norm());
    EXPECT_GT(d.norm(), 0.0);
  }
  // Without the projection (P = I, A = 0, λ = 1) the solve is MEMIT's with C = I, and it moves the preserved keys.
  NullSpace all;
  all.P = MatD::Identity(I, I);
  all.dim = I;
  const MatD free = alphaedit_delta(R, K, all, MatD(), 1.0);
  EXPECT_GT((free * Kp).norm(), 1e-2 * free.norm() * Kp.norm());
  EXPECT_LE((free - memit_delta(R, K, MatD::Identity(I, I), 1.0)).norm(), 1e-10 * free.norm());
}

// MoEEdit's coupled problem: 3 experts of different key widths, 12 columns each with 1–3 active experts.
struct Coupled {
  std::vector<CoupledColumn> cols;
  std::vector<CoupledBlock> blocks;
  std::vector<int> widths{4, 6, 3};
};
Coupled coupled_problem(int H, bool null_spaces) {
  Coupled p;
  std::mt19937_64 rng(21);
  for (size_t b = 0; b < p.widths.size(); ++b) {
    const int I = p.widths[b];
    CoupledBlock blk;
    if (null_spaces) {  // preserved keys in a subspace of dimension I − 2: a 2-dimensional null space
      const MatD Kp = random(I, I - 2, 30 + b) * random(I - 2, 100, 40 + b);
      blk.ns = null_space(Kp * Kp.transpose() / 100.0, 1e-8);
      blk.A = covariance(I, 50 + b) * 0.1;
    } else {
      blk.ns.P = MatD::Identity(I, I);
      blk.ns.dim = I;
    }
    p.blocks.push_back(blk);
  }
  for (int c = 0; c < 12; ++c) {
    CoupledColumn col;
    col.r = random(H, 1, 100 + c).col(0);
    for (int b = 0; b < 3; ++b)
      if (b == c % 3 || rng() % 2) col.keys.push_back({b, random(p.widths[size_t(b)], 1, 200 + 3 * c + b).col(0)});
    p.cols.push_back(col);
  }
  return p;
}

// With P = I the sweeps converge to the stacked ridge solution X = R Φᵀ (Φ Φᵀ + λ I)⁻¹ (Φ: each column's keys
// stacked over the blocks, zeros for inactive ones), and the objective never rises.
TEST(BatchUpdate, CoupledBcdConvergesToTheJointSolve) {
  const int H = 5;
  const double lambda = 0.3;
  const Coupled p = coupled_problem(H, false);
  const int total = 4 + 6 + 3, n = int(p.cols.size());
  MatD Phi = MatD::Zero(total, n), R(H, n);
  for (int c = 0; c < n; ++c) {
    R.col(c) = p.cols[size_t(c)].r;
    for (const auto& [b, k] : p.cols[size_t(c)].keys) Phi.block(b == 0 ? 0 : b == 1 ? 4 : 10, c, k.size(), 1) = k;
  }
  const MatD X = (Phi * Phi.transpose() + lambda * MatD::Identity(total, total)).ldlt().solve(Phi * R.transpose()).transpose();
  const CoupledSolution s = coupled_bcd(p.cols, p.blocks, lambda, 400);
  MatD got(H, total);
  got << s.delta[0], s.delta[1], s.delta[2];
  EXPECT_LE((got - X).norm(), 1e-8 * X.norm());
  for (size_t i = 1; i < s.objective.size(); ++i) EXPECT_LE(s.objective[i], s.objective[i - 1] * (1 + 1e-12)) << i;
  EXPECT_LT(s.objective.back(), 0.5 * s.objective.front());
  // One sweep is not the joint solve yet: the coupling matters.
  const CoupledSolution one = coupled_bcd(p.cols, p.blocks, lambda, 1);
  MatD first(H, total);
  first << one.delta[0], one.delta[1], one.delta[2];
  EXPECT_GT((first - X).norm(), 1e-3 * X.norm());
}

// With null spaces every block's rows stay in its P's range (preserved keys keep their outputs) while the objective,
// A's term included, falls sweep by sweep; one block alone is AlphaEdit's update.
TEST(BatchUpdate, CoupledBcdKeepsEachBlockInItsNullSpace) {
  const int H = 5;
  const Coupled p = coupled_problem(H, true);
  const CoupledSolution s = coupled_bcd(p.cols, p.blocks, 0.5, 30);
  for (size_t b = 0; b < s.delta.size(); ++b) {
    const MatD& d = s.delta[b];
    EXPECT_GT(d.norm(), 0.0);
    EXPECT_LE((d - d * p.blocks[b].ns.P).norm(), 1e-10 * d.norm()) << b;
  }
  for (size_t i = 1; i < s.objective.size(); ++i) EXPECT_LE(s.objective[i], s.objective[i - 1] * (1 + 1e-12)) << i;
  std::vector<CoupledColumn> only0;
  MatD R(H, 0), K(4, 0);
  for (const CoupledColumn& c : p.cols)
    for (const auto& [b, k] : c.keys)
      if (b == 0) {
        only0.push_back({c.r, {{0, k}}});
        R.conservativeResize(H, R.cols() + 1);
        K.conservativeResize(4, K.cols() + 1);
        R.col(R.cols() - 1) = c.r;
        K.col(K.cols() - 1) = k;
      }
  const CoupledSolution single = coupled_bcd(only0, {p.blocks[0]}, 0.5, 1);
  const MatD want = alphaedit_delta(R, K, p.blocks[0].ns, p.blocks[0].A, 0.5);
  EXPECT_LE((single.delta[0] - want).norm(), 1e-12 * want.norm());
  EXPECT_THROW(coupled_bcd(only0, p.blocks, 0.5, 1), std::invalid_argument);  // blocks 1 and 2 are never active
}

}  // namespace
}  // namespace moedit
