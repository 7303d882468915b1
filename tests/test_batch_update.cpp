// The batch editors' closed forms (editor/batch_update.h): MEMIT with one request is ROME's update up to the
// documented λ factor, a full-rank batch meets its residuals as λ → 0, and the null-space update leaves the
// preserved keys' outputs where they were.
#include <gtest/gtest.h>

#include <Eigen/Cholesky>
#include <random>

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

}  // namespace
}  // namespace moedit
