// Helpers of the CUDA backend's tests: the skip where there is no GPU, device copies of host vectors, and the
// comparison of a device result with the CPU backend's.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cuda/cuda_backend.h"
#include "tests/invariance.h"
#include "tracing/trace.h"

// Every test starts here: without a GPU it reports the skip and runs nothing.
#define MOEDIT_REQUIRE_GPU()                                                                            \
  if (::moedit::cuda_device_count() == 0)                                                                \
  GTEST_SKIP() << "no CUDA device: the CUDA backend's op tests need a GPU (built with -DMOEDIT_CUDA=ON; " \
                  "run tools/gpu_check.sh on a GPU machine)"

namespace moedit::test {

inline const Backend& gpu() { return cuda_backend(0); }

// A device copy of h (at least one element, so the pointer is never null).
template <class T>
Buf up(const std::vector<T>& h) {
  Buf b(gpu(), sizeof(T) * std::max<size_t>(1, h.size()));
  gpu().to_device(b.as<void>(), h.data(), sizeof(T) * h.size());
  return b;
}

// The first n elements of a device buffer.
template <class T>
std::vector<T> down(const Buf& b, size_t n) {
  std::vector<T> h(n);
  gpu().to_host(h.data(), b.as<void>(), sizeof(T) * n);
  return h;
}

// Every element of got within tol·max|want| of want: the tolerance is relative to the scale of the CPU's result.
inline void expect_near_scaled(const std::vector<float>& got, const std::vector<float>& want, double tol,
                               const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double scale = 0;
  for (float x : want) scale = std::max(scale, std::abs(double(x)));
  const double bound = tol * std::max(scale, 1e-30);
  size_t bad = 0, first = 0;
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double d = std::abs(double(got[i]) - double(want[i]));
    if (!(d <= bound)) {  // NaN counts as off
      if (!bad) first = i;
      ++bad;
    }
    if (d > worst) worst = d;
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size() << " elements differ by more than " << bound
                     << " (" << tol << " × scale " << scale << "); first at " << first << ": cuda " << got[first]
                     << ", cpu " << want[first] << "; worst difference " << worst;
}

// Rows 0, 37 and n − 1 of X [n, in]·Wᵀ on the GPU, each computed alone, equal bit for bit the same rows of one call
// over all n rows (W [out, in] in device memory; whatever precision the backend is set to).
inline void expect_linear_batch_invariant(const ops::WeightView& w, int out, const std::vector<float>& X, int n,
                                          int in) {
  Buf dX = up(X), dY(gpu(), sizeof(float) * size_t(n) * out), d1(gpu(), sizeof(float) * size_t(out));
  gpu().linear(dX.as<float>(), size_t(in), n, in, w, out, dY.as<float>(), size_t(out));
  const auto all = down<float>(dY, size_t(n) * out);
  for (int r : {0, 37, n - 1}) {
    gpu().linear(dX.as<float>() + size_t(r) * in, size_t(in), 1, in, w, out, d1.as<float>(), size_t(out));
    const auto one = down<float>(d1, size_t(out));
    EXPECT_TRUE(std::equal(one.begin(), one.end(), all.begin() + long(r) * out)) << "row " << r;
  }
}

// The attention shapes the op tests run (forward and backward): GQA, windows, Dk ≠ Dv, queries at an offset, many
// keys, one decoded query, a query that sees no key.
struct AttnCase {
  const char* name;
  ops::AttnShape s;
  int n_q, n_k, q_pos0;
};
inline std::vector<AttnCase> attention_cases() {
  return {
      {"mha prefill", {4, 4, 16, 16, 0.25f, 0}, 7, 7, 0},
      {"gqa, queries at 7..11 of 12", {8, 2, 32, 32, 0.18f, 0}, 5, 12, 7},
      {"window 3", {4, 2, 8, 6, 0.3f, 3}, 4, 9, 5},
      {"mla-like Dk 24, Dv 16", {6, 3, 24, 16, 0.2f, 0}, 3, 10, 7},
      {"300 keys (5 chunks), window 100", {4, 1, 64, 64, 0.125f, 100}, 2, 300, 298},
      {"decode one query of 150", {8, 4, 32, 48, 0.17f, 0}, 1, 150, 149},
      {"every key outside the window", {2, 1, 8, 8, 0.3f, 3}, 2, 4, 10},
  };
}

// The causal trace the model tests compare: a fixture's first reference sequence, subject tokens 1..2, 3 samples.
inline trace::TraceReport fixture_trace(const Model& m, const std::string& dir) {
  trace::TraceInput in;
  in.ids = reference_inputs(dir)[0];
  in.subject_begin = 1;
  in.subject_end = std::min<int>(3, int(in.ids.size()) - 1);
  trace::TraceOptions opt;
  opt.samples = 3;
  return trace::trace_ids(m, in, opt);
}

}  // namespace moedit::test
