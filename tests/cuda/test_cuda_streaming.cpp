// Streaming (issue 23, --max-gpu-memory): under a device memory cap below the model's weights, layers give way and
// come back as the forward reaches them, and every number stays what it was without the cap — bit for bit, since the
// same kernels run on the same weights in the same order — while the device never holds more than the cap. A cap
// below one layer fails with a message naming the flag, and the model runs as before once the cap is lifted.
#include <gtest/gtest.h>

#include <algorithm>

#include "tests/cuda/cuda_test_util.h"
#include "tests/invariance.h"
#include "tracing/trace.h"

namespace moedit {
namespace {

using namespace trace;

// Lifts the process-wide backend's cap when a test ends, passed or not.
struct NoCapAfter {
  ~NoCapAfter() { test::gpu().set_memory_limit(0); }
};

// Bytes of the largest layer's resident copies (its ranges and the RoPE frequencies every layer reads).
size_t largest_layer_bytes(const Model& m) {
  size_t largest = 0;
  for (int l = 0; l < m.config().n_layers; ++l) {
    size_t n = sizeof(float) * m.inv_freq().size();
    for (const auto& r : layer_ranges(m.weights(), l)) n += r.bytes;
    largest = std::max(largest, n);
  }
  return largest;
}

// The policy on four 256 KiB "layers" under a cap with room for three: the idle copy read last gives way (layers
// are read in turn, so the one just finished is needed last), a staged next layer uploads at the next wait and is
// then read from its copy, and a layer larger than the cap fails naming the flag.
TEST(CudaResidency, UnderACapTheMostRecentlyReadIdleCopyGivesWay) {
  MOEDIT_REQUIRE_GPU();
  NoCapAfter lift;
  const Backend& be = test::gpu();
  const size_t n = size_t(1) << 16, bytes = sizeof(float) * n;
  std::vector<std::vector<float>> layer(4, std::vector<float>(n));
  for (int i = 0; i < 4; ++i) std::fill(layer[size_t(i)].begin(), layer[size_t(i)].end(), float(i + 1));
  auto range = [&](int i) { return Backend::HostRange{layer[size_t(i)].data(), bytes}; };
  auto read = [&](int i) {  // the device copy's contents
    std::vector<float> h(n);
    be.to_host(h.data(), be.resident(layer[size_t(i)].data(), bytes), bytes);
    return h;
  };
  const size_t resident0 = cuda_resident_bytes();
  be.set_memory_limit(cuda_memory().allocated + 3 * bytes);
  EXPECT_EQ(be.memory_limit(), cuda_memory().allocated + 3 * bytes);
  for (int i = 0; i < 4; ++i) {
    be.stage({range(i)}, {});
    EXPECT_EQ(read(i), layer[size_t(i)]) << "layer " << i;
  }
  EXPECT_EQ(cuda_resident_bytes() - resident0, 3 * bytes);
  // Layers 0, 1 and 3 stayed (2 gave way): reading 0 again uploads nothing.
  const size_t before = cuda_memory().allocated;
  be.stage({range(0)}, {range(2)});
  EXPECT_EQ(read(0), layer[0]);
  EXPECT_EQ(cuda_memory().allocated, before);
  // The wait of that read uploaded layer 2 ahead of time in place of layer 3 (idle, read last).
  be.stage({range(2)}, {});
  EXPECT_EQ(cuda_memory().allocated, before);
  EXPECT_EQ(read(2), layer[2]);
  EXPECT_EQ(cuda_memory().allocated, before);
  EXPECT_EQ(read(1), layer[1]);  // held copies: 2 (this layer) and 1; 0 gave way
  EXPECT_EQ(cuda_resident_bytes() - resident0, 3 * bytes);
  be.set_memory_limit(bytes / 2);
  try {
    be.stage({range(3)}, {});
    ADD_FAILURE() << "a layer larger than the cap was staged";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("--max-gpu-memory"), std::string::npos) << e.what();
  }
  be.set_memory_limit(0);
  for (int i = 0; i < 4; ++i) be.forget(layer[size_t(i)].data());
  EXPECT_LE(cuda_resident_bytes(), resident0);
}

class CudaStreaming : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaStreaming, ACapBelowTheWeightsGivesTheSameLogitsAndTraceScores) {
  MOEDIT_REQUIRE_GPU();
  NoCapAfter lift;
  const std::string dir = test::fixture("models/" + GetParam());
  const auto seqs = test::reference_inputs(dir);
  const auto m = Model::load(dir);
  const size_t resident0 = cuda_resident_bytes();
  m->set_backend(test::gpu());
  test::gpu().pool().trim();
  cuda_reset_peak();
  const ForwardOutput free_run = m->forward(seqs);
  const TraceReport free_trace = test::fixture_trace(*m, dir);
  const size_t weights = cuda_resident_bytes() - resident0;
  // What the runs held besides the weights (the pool keeps its buffers, so this bounds every moment's activations).
  const size_t other = cuda_memory().peak - weights;
  const size_t largest = largest_layer_bytes(*m);
  ASSERT_GE(m->config().n_layers, 2) << "a one-layer fixture cannot stream";
  ASSERT_LT(largest, weights);

  // Room for everything else the runs held (other models' copies, pool, caches) and the largest layer: the rest
  // must stream.
  const size_t cap = other + largest;
  test::gpu().set_memory_limit(cap);
  m->forward(seqs);  // the copies past the cap give way as the layers run
  cuda_reset_peak();
  ASSERT_LE(cuda_memory().peak, cap);
  const ForwardOutput capped_run = m->forward(seqs);
  const TraceReport capped_trace = test::fixture_trace(*m, dir);
  EXPECT_LE(cuda_memory().peak, cap) << GetParam();
  EXPECT_LT(cuda_resident_bytes() - resident0, weights) << GetParam() << ": nothing was dropped";

  EXPECT_TRUE(capped_run.logits == free_run.logits) << GetParam() << ": logits differ under the cap";
  for (size_t l = 0; l < free_run.routing.size(); ++l)
    EXPECT_EQ(capped_run.routing[l].ids, free_run.routing[l].ids) << GetParam() << " layer " << l;
  EXPECT_EQ(capped_trace.high_score, free_trace.high_score);
  EXPECT_EQ(capped_trace.low_score, free_trace.low_score);
  ASSERT_EQ(capped_trace.kinds.size(), free_trace.kinds.size());
  for (size_t k = 0; k < free_trace.kinds.size(); ++k) {
    const auto &a = capped_trace.kinds[k].scores, &b = free_trace.kinds[k].scores;
    ASSERT_EQ(a.size(), b.size());
    for (size_t r = 0; r < b.size(); ++r)
      for (size_t l = 0; l < b[r].size(); ++l)
        if (!(std::isnan(a[r][l]) && std::isnan(b[r][l]))) {
          EXPECT_EQ(a[r][l], b[r][l]) << GetParam() << " " << kind_name(free_trace.kinds[k].kind) << " row " << r
                                      << " layer " << l;
        }
  }
}

TEST_P(CudaStreaming, ACapBelowOneLayerFailsClearlyAndTheModelRunsAfterIt) {
  MOEDIT_REQUIRE_GPU();
  NoCapAfter lift;
  const std::string dir = test::fixture("models/" + GetParam());
  const auto seqs = test::reference_inputs(dir);
  const auto m = Model::load(dir);
  m->set_backend(test::gpu());
  const ForwardOutput free_run = m->forward(seqs);
  const size_t largest = largest_layer_bytes(*m);

  test::gpu().set_memory_limit(largest / 2);
  try {
    m->forward(seqs);
    ADD_FAILURE() << GetParam() << ": a cap below the largest layer did not fail";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("--max-gpu-memory"), std::string::npos) << e.what();
  }
  test::gpu().set_memory_limit(0);
  EXPECT_TRUE(m->forward(seqs).logits == free_run.logits) << GetParam();
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaStreaming, ::testing::ValuesIn(test::fixture_names()),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace moedit
