// Training (train/train.h, train/adamw.h): AdamW against values worked out by hand, steps that change exactly the
// selected tensors (every other tensor bit for bit the checkpoint's, still a view of it), and one router-tuning and
// one expert fine-tuning step against PyTorch (tools/train_reference.py: HF transformers in float64 with
// torch.optim.AdamW).
#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <set>
#include <sstream>

#include "reference_util.h"
#include "io/errors.h"
#include "test_util.h"
#include "train/train.h"

namespace moedit {
namespace {

// ---- AdamW -------------------------------------------------------------------------------------------------------

// Two steps on four values, lr 0.1, betas (0.9, 0.999), eps 1e-8, weight decay 0.01. Step 1: m̂ = g and v̂ = g², so
// every value with g ≠ 0 moves by lr·g/(|g| + eps) = ±0.1 after decaying by the factor 1 − lr·wd = 0.999; w[2] has
// g = 0 and only decays. Step 2 (g₂): m = 0.09·g₁ + 0.1·g₂, v = 0.000999·g₁² + 0.001·g₂², bias corrections 1 − 0.9² =
// 0.19 and 1 − 0.999² = 0.001999; the expected values below are those formulas evaluated in float64 (torch.optim.
// AdamW in float64 gives the same digits).
TEST(AdamW, TwoStepsMatchHandComputedValues) {
  AdamWOptions o;
  o.lr = 0.1;
  o.weight_decay = 0.01;
  std::vector<float> w = {0.5f, -1.0f, 2.0f, 0.25f}, m(4, 0.f), v(4, 0.f);
  const std::vector<float> g1 = {0.1f, -0.2f, 0.0f, 3.0f}, g2 = {-0.3f, 0.05f, 1e-3f, 3.0f};
  adamw_update(w.data(), g1.data(), m.data(), v.data(), 4, 1, o);
  const double after1[4] = {0.5 * 0.999 - 0.1, -1.0 * 0.999 + 0.1, 2.0 * 0.999, 0.25 * 0.999 - 0.1};
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(w[size_t(i)], after1[i], 1e-6) << "step 1, value " << i;
  adamw_update(w.data(), g2.data(), m.data(), v.data(), 4, 2, o);
  // w₂ = 0.999·w₁ − (0.1/0.19)·m / (√v/√0.001999 + 1e-8)
  const double after2[4] = {0.4485194917586884, -0.8511541910954468, 1.92158936973364, 0.04960025066633403};
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(w[size_t(i)], after2[i], 1e-6 * std::max(1.0, std::abs(after2[i])))
                                  << "step 2, value " << i;
}

TEST(AdamW, BadOptionsAreInputErrors) {
  for (auto set : std::vector<std::function<void(AdamWOptions&)>>{
           [](AdamWOptions& o) { o.lr = -1; }, [](AdamWOptions& o) { o.beta1 = 1; },
           [](AdamWOptions& o) { o.beta2 = -0.1; }, [](AdamWOptions& o) { o.eps = -1e-8; },
           [](AdamWOptions& o) { o.weight_decay = -0.1; }}) {
    AdamWOptions o;
    set(o);
    EXPECT_THROW(AdamW{o}, InputError);
  }
}

// ---- which tensors a step changes --------------------------------------------------------------------------------

// Every tensor of a model, in for_each_tensor order, as (bytes, whether an owned copy) — a Weight by its fp32 values.
struct TensorBytes {
  std::vector<std::vector<char>> bytes;
  std::vector<bool> copy;
};
TensorBytes snapshot(const Model& m) {
  TensorBytes s;
  auto raw = [&](const float* p, size_t n, bool copy) {
    s.bytes.emplace_back(reinterpret_cast<const char*>(p), reinterpret_cast<const char*>(p + n));
    s.copy.push_back(copy);
  };
  for_each_tensor(
      m.weights(), [&](const Weight& w) { const MatR f = w.to_f32(); raw(f.data(), size_t(f.size()), w.is_copy()); },
      [&](const VecF& v) { raw(v.data(), size_t(v.size()), true); },
      [&](const MatR& r) { raw(r.data(), size_t(r.size()), true); });
  return s;
}

// The indices (for_each_tensor order) of the given parameters' tensors.
std::set<size_t> tensor_indices(const Model& m, const std::vector<ParamId>& params) {
  std::set<const void*> want;
  const auto& Ls = m.weights().layers;
  for (const ParamId& p : params) {
    const FFNWeights& f = Ls[size_t(p.layer)].ffn;
    const ExpertBank& b = p.expert == kSharedBlock ? f.shared : f.experts;
    const size_t e = size_t(p.expert == kSharedBlock ? 0 : p.expert);
    switch (p.kind) {
      case ParamId::Kind::Router: want.insert(&f.router); break;
      case ParamId::Kind::SharedGate: want.insert(&f.shared_gate); break;
      case ParamId::Kind::Gate: want.insert(&b.gate[e]); break;
      case ParamId::Kind::Up: want.insert(&b.up[e]); break;
      case ParamId::Kind::Down: want.insert(&b.down[e]); break;
    }
  }
  std::set<size_t> out;
  size_t i = 0;
  auto visit = [&](const void* t) {
    if (want.count(t)) out.insert(i);
    ++i;
  };
  for_each_tensor(m.weights(), [&](const Weight& w) { visit(&w); }, [&](const VecF& v) { visit(&v); },
                  [&](const MatR& r) { visit(&r); });
  return out;
}

// A step with `sel` changes exactly the selected tensors; the others keep their bytes and their storage (a view of
// the checkpoint stays a view). Selected expert matrices become owned copies.
void expect_step_changes_only(const ParamSelection& sel) {
  const auto m = Model::load(test::fixture("models/qwen2_moe"));
  const TensorBytes before = snapshot(*m);
  AdamW opt;
  const TrainBatch batch = {{{5, 17, 3, 58, 42}, {7, 1}}, {{9, 2, 33}, {34}}};
  train_step(*m, batch, sel, opt);
  const TensorBytes after = snapshot(*m);
  const WeightGrads<float> g(*m, sel);
  const std::set<size_t> changed = tensor_indices(*m, g.params());
  ASSERT_EQ(changed.size(), g.params().size());
  ASSERT_EQ(before.bytes.size(), after.bytes.size());
  for (size_t i = 0; i < before.bytes.size(); ++i) {
    if (changed.count(i)) {
      EXPECT_NE(before.bytes[i], after.bytes[i]) << "tensor " << i << " was selected but did not change";
      EXPECT_TRUE(after.copy[i]);
    } else {
      EXPECT_EQ(before.bytes[i], after.bytes[i]) << "tensor " << i << " is frozen but changed";
      EXPECT_EQ(before.copy[i], after.copy[i]) << "tensor " << i << " is frozen but changed storage";
    }
  }
  EXPECT_EQ(opt.state_bytes(), 2 * g.bytes());
  for (const ParamId& p : g.params()) EXPECT_EQ(opt.steps(p), 1) << p.name();
}

TEST(TrainStep, RouterStepChangesOnlyRouters) {
  const auto m = Model::load(test::fixture("models/qwen2_moe"));
  expect_step_changes_only(ParamSelection::all_routers(*m));
}

TEST(TrainStep, ExpertStepChangesOnlyTheChosenExperts) {
  ParamSelection sel;
  sel.experts = {{0, 4}, {1, 2}, {3, kSharedBlock}, {2, 0}};  // routed, routed, a shared MLP, the dense MLP
  sel.shared_gates = {3};
  expect_step_changes_only(sel);
}

// The loss goes down over a few steps of router tuning and of expert fine-tuning.
TEST(TrainStep, LossDecreases) {
  const TrainBatch batch = {{{5, 17, 3, 58, 42}, {7, 1}}, {{9, 2, 33}, {34}}, {{11, 12, 13}, {40, 41, 44}}};
  for (bool routers : {true, false}) {
    const auto m = Model::load(test::fixture("models/qwen2_moe"));
    ParamSelection sel = routers ? ParamSelection::all_routers(*m) : ParamSelection{};
    if (!routers) sel.experts = {{0, 4}, {1, 4}, {1, 1}};
    AdamWOptions o;
    o.lr = 1e-2;
    AdamW opt(o);
    const double first = train_step(*m, batch, sel, opt);
    double last = first;
    for (int i = 0; i < 5; ++i) last = train_step(*m, batch, sel, opt);
    EXPECT_LT(last, first) << (routers ? "routers" : "experts");
  }
}

// ---- PyTorch reference -------------------------------------------------------------------------------------------

double max_rel(const MatR& got, const std::vector<double>& want) {
  const Eigen::Map<const MatT<double>> w(want.data(), got.rows(), got.cols());
  return (got.cast<double>() - w).cwiseAbs().maxCoeff() / w.cwiseAbs().maxCoeff();
}

// tools/train_reference.py's router step and CEFT step on qwen2_moe, run by train_step (fp32): the loss, every
// gradient (‖g − g_ref‖ / ‖g_ref‖) and every updated tensor (max |w − w_ref| / max |w_ref|) to 1e-5.
TEST(TrainReference, RouterAndExpertStepsMatchPyTorch) {
  const edit_test::Reference ref("train/qwen2_moe_train_step.safetensors");
  TrainBatch batch;
  for (int i = 0; i < ref.meta_int("n_examples"); ++i) {
    const std::string b = "batch." + std::to_string(i) + ".";
    batch.push_back({ref.ids(b + "prompt"), ref.ids(b + "answer")});
  }
  AdamWOptions o;
  o.lr = ref.meta_double("lr");
  o.beta1 = ref.meta_double("beta1");
  o.beta2 = ref.meta_double("beta2");
  o.eps = ref.meta_double("eps");
  o.weight_decay = ref.meta_double("weight_decay");
  const double want_loss = ref.values("loss")[0];

  for (const std::string step : {"router", "ceft"}) {
    const auto m = Model::load(test::fixture("models/qwen2_moe"));
    ParamSelection sel;
    if (step == "router") {
      sel = ParamSelection::all_routers(*m);
    } else {
      std::stringstream ss(ref.meta("ceft_experts"));  // "l:e,l:e"
      std::string item;
      while (std::getline(ss, item, ','))
        sel.experts.push_back({std::stoi(item.substr(0, item.find(':'))), std::stoi(item.substr(item.find(':') + 1))});
      ASSERT_EQ(sel.experts.size(), 2u);
    }
    WeightGrads<float> g(*m, sel);
    EXPECT_NEAR(answer_loss(*m, batch, &g), want_loss, 1e-5 * want_loss) << step;
    for (size_t i = 0; i < g.params().size(); ++i) {
      const std::string name = step + ".grad." + g.params()[i].name();
      const std::vector<double> want = ref.values(name);
      const Eigen::Map<const MatT<double>> w(want.data(), g.grad(i).rows(), g.grad(i).cols());
      const double err = (g.grad(i).cast<double>() - w).norm() / w.norm();
      std::printf("  [ref] %s: gradient relative error %.2e\n", name.c_str(), err);
      EXPECT_LE(err, 1e-5) << name;
    }
    AdamW opt(o);
    EXPECT_NEAR(train_step(*m, batch, sel, opt), want_loss, 1e-5 * want_loss) << step;
    for (const ParamId& p : g.params()) {
      const std::string name = step + "." + p.name();
      const MatR got = MatR::Map(mutable_param(*m, p), param_rows(*m, p), param_cols(*m, p));
      const double err = max_rel(got, ref.values(name));
      std::printf("  [ref] %s: updated weights max relative error %.2e\n", name.c_str(), err);
      EXPECT_LE(err, 1e-5) << name;
    }
  }
}

}  // namespace
}  // namespace moedit
