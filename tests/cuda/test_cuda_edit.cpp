// Editing and key statistics with the model on the GPU (issue 23's GPU checks at the model level): key statistics
// equal the CPU's (≤ 1e-5 relative), and ROME edits of the dominant, routed and shared experts — applied one after
// another, so later edits rewrite matrices the device already holds — give the CPU's post-edit logits (≤ 1e-4 of the
// largest |logit|); after revert the GPU's logits are its unedited ones bit for bit, and an edit after the revert
// (edited copies freed, their addresses free for reuse) matches the CPU again. v* runs taped on the host either way;
// the forwards around it run on the device.
#include <gtest/gtest.h>

#include "editor/keystats.h"
#include "editor/rome.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/edit_util.h"

namespace moedit {
namespace {

using namespace edit_test;

std::vector<float> flat(const MatR& m) { return {m.data(), m.data() + m.size()}; }

TEST(CudaKeyStats, MatchTheCpu) {
  MOEDIT_REQUIRE_GPU();
  for (const std::string fx : {"qwen2_moe", "deepseek_v3_fp8"}) {
    const auto m = Model::load(fixture_model(fx));
    const auto corpus = random_corpus(6, 24, m->config().vocab_size, 3);
    const int layer = m->config().n_layers - 1;  // an MoE layer in both
    ASSERT_TRUE(m->config().is_moe(layer)) << fx;
    const std::vector<SecondMoment> cpu = compute_key_stats(*m, layer, corpus, 64);
    m->set_backend(test::gpu());
    const std::vector<SecondMoment> gpu = compute_key_stats(*m, layer, corpus, 64);
    ASSERT_EQ(gpu.size(), cpu.size()) << fx;
    for (size_t i = 0; i < cpu.size(); ++i) {
      EXPECT_EQ(gpu[i].count, cpu[i].count) << fx << " expert " << cpu[i].expert;
      const double scale = std::max(double(cpu[i].mom2.norm()), 1e-30);
      EXPECT_LE(double((gpu[i].mom2 - cpu[i].mom2).norm()) / scale, 1e-5) << fx << " expert " << cpu[i].expert;
    }
  }
}

TEST(CudaEdit, PostEditLogitsMatchTheCpu) {
  MOEDIT_REQUIRE_GPU();
  const int layer = 1;
  const std::string dir = fixture_model("qwen2_moe");
  const auto cpu = Model::load(dir), gpu = Model::load(dir);
  gpu->set_backend(test::gpu());
  const auto probe = test::reference_inputs(dir);
  EditOptions opt;
  opt.layer = layer;
  opt.moments = moments_from(compute_key_stats(*cpu, layer, random_corpus(6, 24, cpu->config().vocab_size, 3), 64));
  const EditIds ids = fixed_ids();
  const MatR unedited = gpu->forward(probe).logits;

  std::vector<EditResult> on_cpu, on_gpu;
  for (const std::string tgt : {"dominant", "routed", "shared"}) {
    opt.target = parse_edit_target(tgt);
    on_cpu.push_back(apply_edit_ids(*cpu, ids, opt));
    on_gpu.push_back(apply_edit_ids(*gpu, ids, opt));
    test::expect_near_scaled(flat(gpu->forward(probe).logits), flat(cpu->forward(probe).logits), 1e-4,
                             "after the " + tgt + " edit");
  }
  revert_all(*cpu, on_cpu);
  revert_all(*gpu, on_gpu);
  EXPECT_TRUE(gpu->forward(probe).logits == unedited) << "revert on the GPU";

  opt.target = parse_edit_target("routed");
  apply_edit_ids(*cpu, ids, opt);
  apply_edit_ids(*gpu, ids, opt);
  test::expect_near_scaled(flat(gpu->forward(probe).logits), flat(cpu->forward(probe).logits), 1e-4,
                           "an edit after the revert");
}

}  // namespace
}  // namespace moedit
