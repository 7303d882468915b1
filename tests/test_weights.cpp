// Typed weights: bf16/f16 matrices read in place and widened in registers give the same bits as fp32 copies of the
// same values; bf16 copies of every fixture run bit for bit like the fp32 model with bf16-rounded weights (and
// keep batched = separate, cached = full); edits are copy-on-write and revert drops the copy.
#include <gtest/gtest.h>

#include <filesystem>
#include <random>

#include "editor/save.h"
#include "io/safetensors.h"
#include "invariance.h"
#include "kernels/half.h"
#include "model/memory.h"
#include "model/model.h"
#include "test_util.h"

namespace moedit {
namespace {

namespace fs = std::filesystem;

float round_bf16(float x) { return bf16_to_f32(f32_to_bf16(x)); }

// y = x·Wᵀ with W given as 16-bit patterns (bf16 or f16) read in place, against the same values widened first.
void expect_typed_equals_f32(ops::WType t, int n, int in, int out, size_t ld, size_t col0, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.f, 1.f);
  std::vector<uint16_t> w16(size_t(out) * ld + col0);
  for (auto& v : w16) v = t == ops::WType::BF16 ? f32_to_bf16(d(rng)) : f32_to_f16(d(rng));
  MatR x(n, in), wide(out, in);
  for (int64_t i = 0; i < x.size(); ++i) x.data()[i] = d(rng);
  const ops::WeightView view(w16.data() + col0, t, ld);
  for (int r = 0; r < out; ++r) ops::widen_row(view, r, 0, in, wide.row(r).data());
  for (int r = 0; r < out; ++r)
    for (int c = 0; c < in; ++c) {
      const uint16_t b = w16[col0 + size_t(r) * ld + size_t(c)];
      ASSERT_EQ(wide(r, c), t == ops::WType::BF16 ? bf16_to_f32(b) : f16_to_f32(b));
      ASSERT_EQ(ops::widen(view, r, c), wide(r, c));
    }
  std::vector<float> bias(static_cast<size_t>(out));
  for (auto& b : bias) b = d(rng);
  MatR typed(n, out), ref(n, out);
  ops::linear(x.data(), size_t(in), n, in, view, out, typed.data(), size_t(out), bias.data());
  ops::linear(x.data(), n, in, wide.data(), out, ref.data(), bias.data());
  ASSERT_EQ((typed - ref).cwiseAbs().maxCoeff(), 0.f) << "n " << n << " in " << in << " out " << out;
}

TEST(TypedWeights, Bf16AndF16ViewsGiveTheBitsOfTheirFp32Values) {
  uint32_t seed = 1;
  for (ops::WType t : {ops::WType::BF16, ops::WType::F16})
    for (int n : {1, 2, 3, 4, 7})
      for (int in : {1, 7, 8, 9, 33, 64})
        for (int out : {1, 3, 4, 5, 9, 17}) {
          expect_typed_equals_f32(t, n, in, out, size_t(in), 0, seed++);
          expect_typed_equals_f32(t, n, in, out, size_t(in) + 5, 1, seed++);  // strided rows, odd start
        }
  // Large enough for the threaded column split.
  expect_typed_equals_f32(ops::WType::BF16, 5, 256, 4096, 256, 0, seed++);
}

// Every floating-point tensor of a checkpoint converted to bf16 (FP8 scales and other dtypes kept), in dir.
void write_bf16_copy(const std::string& src, const std::string& dir) {
  TensorStore st(src);
  for (const auto& f : st.files()) {
    std::map<std::string, OwnedTensor> out;
    for (const auto& [name, v] : f->tensors()) {
      const bool convert = (v.dtype == DType::F32 || v.dtype == DType::F16 || v.dtype == DType::F64) &&
                           name.find("_scale_inv") == std::string::npos;
      if (convert) {
        out.emplace(name, make_tensor(DType::BF16, v.shape, v.to_f32().data()));
      } else {
        OwnedTensor t{v.dtype, v.shape, std::vector<uint8_t>(v.data, v.data + v.nbytes)};
        out.emplace(name, std::move(t));
      }
    }
    write_safetensors(dir + "/" + fs::path(f->path()).filename().string(), out, f->metadata());
  }
  for (const auto& e : fs::directory_iterator(src))
    if (e.path().extension() == ".json") fs::copy_file(e.path(), dir + "/" + e.path().filename().string());
}

class Bf16Copy : public ::testing::TestWithParam<std::string> {};

TEST_P(Bf16Copy, RunsBitForBitLikeRoundedFp32Weights) {
  const std::string src = test::fixture("models/" + GetParam());
  test::TempDir tmp;
  write_bf16_copy(src, tmp.path.string());
  const auto bf16 = Model::load(tmp.path.string());

  // The bf16 checkpoint is read in place: its matrices are views (only de-interleaved MLA rows are copies).
  const WeightBytes wb = weight_bytes(bf16->weights());
  EXPECT_GT(wb.mapped, 0u);
  const Weight& e0 = bf16->weights().layers.back().ffn.experts.down[0];
  EXPECT_FALSE(e0.is_copy());
  EXPECT_EQ(e0.type(), ops::WType::BF16);

  // The same model from the original file with every value rounded to bf16, held as fp32.
  auto orig = Model::load(src);
  Weights w = orig->weights();
  for_each_tensor(
      w, [](Weight& x) { if (!x.empty()) x = Weight(x.to_f32().unaryExpr(&round_bf16)); },
      [](VecF& v) { v = v.unaryExpr(&round_bf16); }, [](MatR& m) { m = m.unaryExpr(&round_bf16); });
  const Model rounded(orig->config(), std::move(w));

  const auto seqs = test::reference_inputs(src);
  const ForwardOutput a = bf16->forward(seqs), b = rounded.forward(seqs);
  EXPECT_EQ((a.logits - b.logits).cwiseAbs().maxCoeff(), 0.f);
  for (size_t l = 0; l < a.routing.size(); ++l) EXPECT_EQ(a.routing[l].ids, b.routing[l].ids) << "layer " << l;
  test::expect_batch_and_cache_invariant(*bf16, seqs);
}

// FP8 fixtures have their own test below (a bf16 copy would not be a rounding of the same values).
std::vector<std::string> non_fp8_fixtures() {
  std::vector<std::string> v;
  for (const auto& n : test::fixture_names())
    if (n.find("fp8") == std::string::npos) v.push_back(n);
  return v;
}
INSTANTIATE_TEST_SUITE_P(Fixtures, Bf16Copy, ::testing::ValuesIn(non_fp8_fixtures()),
                         [](const auto& info) { return info.param; });

// FP8 E4M3 with block scales, read in place: each product equals the product with the dequantised matrix bit for
// bit — odd block sizes, partial blocks at the edges, sub-views that start inside a block, every row count.
TEST(TypedWeights, Fp8ViewsGiveTheBitsOfTheirDequantisedValues) {
  std::mt19937 rng(7);
  for (auto [out, in, br, bc] : {std::tuple{5, 7, 2, 3}, {17, 33, 4, 8}, {300, 40, 128, 16}, {70, 300, 8, 128}}) {
    std::vector<uint8_t> q(size_t(out) * in);
    for (auto& b : q) {
      b = uint8_t(rng());
      if ((b & 0x7f) == 0x7f) b &= 0xfe;  // every finite E4M3 value (0x7f / 0xff are NaN)
    }
    const int sr = (out + br - 1) / br, sc = (in + bc - 1) / bc;
    std::vector<float> scale(size_t(sr) * sc);
    for (auto& x : scale) x = std::ldexp(1.f + float(rng() % 1000) / 1000.f, int(rng() % 9) - 4);
    const ops::WeightView W(q.data(), ops::WType::F8E4M3, size_t(in), {scale.data(), size_t(sc), br, bc, 0, 0});
    MatR deq(out, in);
    for (int r = 0; r < out; ++r)
      for (int c = 0; c < in; ++c)
        deq(r, c) = f8e4m3_to_f32(q[size_t(r) * in + c]) * scale[size_t(r / br) * sc + size_t(c / bc)];
    for (int n : {1, 2, 3, 5}) {
      MatR X = MatR::Random(n, in), got(n, out), want(n, out);
      ops::linear(X.data(), size_t(in), n, in, W, out, got.data(), size_t(out));
      ops::linear(X.data(), size_t(in), n, in, ops::WeightView(deq.data(), size_t(in)), out, want.data(), size_t(out));
      ASSERT_EQ(std::memcmp(got.data(), want.data(), sizeof(float) * size_t(got.size())), 0) << out << "x" << in;
      // The view of rows 1.. and columns 3.. (inside the first scale block): the same values, the same bits.
      const int r0 = 1, c0 = 3, o2 = out - r0, i2 = in - c0;
      MatR got2(n, o2), want2(n, o2);
      ops::linear(X.data(), size_t(in), n, i2, W.at(r0, c0), o2, got2.data(), size_t(o2));
      ops::linear(X.data(), size_t(in), n, i2, ops::WeightView(deq.data(), size_t(in)).at(r0, c0), o2, want2.data(),
                  size_t(o2));
      ASSERT_EQ(std::memcmp(got2.data(), want2.data(), sizeof(float) * size_t(got2.size())), 0) << "sub-view";
      for (int c = 0; c < i2; c += 5) ASSERT_EQ(ops::widen(W.at(r0, c0), 0, c), deq(r0, c0 + c));
    }
  }
}

// An FP8 checkpoint runs from the mapped bytes (its expert matrices are FP8 views, not copies) and gives, bit for bit,
// the logits and routing of the same model with every matrix dequantised into an fp32 copy.
TEST(TypedWeights, Fp8CheckpointRunsInPlaceLikeItsDequantisedCopy) {
  const auto fp8 = Model::load(test::fixture("models/deepseek_v3_fp8"));
  const Weight& d = fp8->weights().layers.back().ffn.experts.down[0];
  EXPECT_EQ(d.type(), ops::WType::F8E4M3);
  EXPECT_FALSE(d.is_copy());
  Weights w = fp8->weights();
  size_t views = 0;
  for_each_tensor(
      w, [&](Weight& x) {
        if (x.empty()) return;
        views += x.type() == ops::WType::F8E4M3;
        x = Weight(x.to_f32());
      },
      [](VecF&) {}, [](MatR&) {});
  EXPECT_GT(views, 0u);
  const Model copied(fp8->config(), std::move(w));
  const auto seqs = test::reference_inputs(test::fixture("models/deepseek_v3_fp8"));
  const ForwardOutput a = fp8->forward(seqs), b = copied.forward(seqs);
  EXPECT_EQ((a.logits - b.logits).cwiseAbs().maxCoeff(), 0.f);
  for (size_t l = 0; l < a.routing.size(); ++l) EXPECT_EQ(a.routing[l].ids, b.routing[l].ids) << "layer " << l;
  test::expect_batch_and_cache_invariant(*fp8, seqs);
}

// Random bf16 weights (the GPU benchmarks' models of real configs): every matrix a bf16 view of the fp32 version's
// shape, the bytes a function of the seed, entries of the requested spread; a model runs on them.
TEST(TypedWeights, RandomBf16WeightsAreSeededViewsOfTheRightShape) {
  for (const char* fam : test::kFamilies) {
    const ModelConfig c = test::tiny_config(fam);
    const Weights f = random_weights(c, 5, 0.3f), a = random_weights(c, 5, 0.3f, ops::WType::BF16),
                  b = random_weights(c, 5, 0.3f, ops::WType::BF16), d = random_weights(c, 6, 0.3f, ops::WType::BF16);
    std::vector<const Weight*> fw, aw, bw, dw;
    for_each_tensor(f, [&](const Weight& x) { fw.push_back(&x); }, [](const VecF&) {}, [](const MatR&) {});
    for_each_tensor(a, [&](const Weight& x) { aw.push_back(&x); }, [](const VecF&) {}, [](const MatR&) {});
    for_each_tensor(b, [&](const Weight& x) { bw.push_back(&x); }, [](const VecF&) {}, [](const MatR&) {});
    for_each_tensor(d, [&](const Weight& x) { dw.push_back(&x); }, [](const VecF&) {}, [](const MatR&) {});
    ASSERT_EQ(aw.size(), fw.size());
    double sq = 0, n = 0;
    bool differs = false;
    for (size_t i = 0; i < aw.size(); ++i) {
      ASSERT_EQ(aw[i]->rows(), fw[i]->rows()) << fam << " matrix " << i;
      ASSERT_EQ(aw[i]->cols(), fw[i]->cols()) << fam << " matrix " << i;
      if (aw[i]->empty()) continue;
      EXPECT_EQ(aw[i]->type(), ops::WType::BF16) << fam << " matrix " << i;
      EXPECT_TRUE(*aw[i] == *bw[i]) << fam << " matrix " << i << ": same seed, other values";
      differs |= !(*aw[i] == *dw[i]);
      const MatR m = aw[i]->to_f32();
      sq += m.squaredNorm();
      n += double(m.size());
    }
    EXPECT_TRUE(differs) << fam << ": another seed gave the same weights";
    EXPECT_NEAR(std::sqrt(sq / n), 0.3, 0.3 * 0.03) << fam;
    const Model m(c, random_weights(c, 7, 0.3f, ops::WType::BF16));
    EXPECT_TRUE(m.forward({{5, 17, 3, 88}, {9, 2}}).logits.allFinite()) << fam;
  }
}

TEST(TypedWeights, EditsAreCopyOnWriteAndRevertingDropsTheCopy) {
  auto m = Model::load(test::source_dir() + "/models/moedit-demo");
  Weight& w = m->mutable_weights().layers[0].ffn.experts.down[3];
  ASSERT_FALSE(w.is_copy());
  ASSERT_EQ(w.type(), ops::WType::BF16);
  const Weight before = w;
  const size_t owned0 = weight_bytes(m->weights()).owned;
  float* p = w.mutable_f32();
  EXPECT_TRUE(w.is_copy());
  EXPECT_EQ(w.type(), ops::WType::F32);
  EXPECT_EQ(weight_bytes(m->weights()).owned, owned0 + sizeof(float) * size_t(w.size()));
  EXPECT_TRUE(w == before);  // the copy holds the widened values
  const float old = p[7];
  p[7] += 0.5f;
  EXPECT_FALSE(w == before);
  EXPECT_FALSE(w.drop_copy_if_unchanged());  // still edited: kept
  EXPECT_TRUE(w.is_copy());
  p[7] = old;
  EXPECT_TRUE(w.drop_copy_if_unchanged());
  EXPECT_FALSE(w.is_copy());
  EXPECT_EQ(w.type(), ops::WType::BF16);
  EXPECT_EQ(weight_bytes(m->weights()).owned, owned0);
  // Other experts were never copied.
  for (const Weight& x : m->weights().layers[0].ffn.experts.down) EXPECT_FALSE(x.is_copy());
}

TEST(TypedWeights, SaveReportsTheRoundingOfTheUpdateOrWritesF32) {
  const std::string demo = test::source_dir() + "/models/moedit-demo";
  auto m = Model::load(demo);
  const int l = 0, e = 3;
  Weight& w = m->mutable_weights().layers[l].ffn.experts.down[e];
  const Eigen::MatrixXd w0 = w.to_f32().cast<double>();
  float* p = w.mutable_f32();
  std::mt19937 rng(5);
  std::normal_distribution<float> d(0.f, 1e-3f);
  for (int64_t i = 0; i < w.size(); ++i) p[i] += d(rng);  // ΔW
  const MatR w1 = w.to_f32();
  const std::vector<std::vector<int32_t>> seqs = {{5, 17, 3, 99, 42}};

  test::TempDir tmp;
  const SaveReport r = save_edited_checkpoint(*m, demo, tmp / "bf16", {{l, e}});
  ASSERT_EQ(r.tensors.size(), 1u);
  EXPECT_EQ(r.tensors[0].dtype, "BF16");
  const MatR written = Model::load(tmp / "bf16")->weights().layers[l].ffn.experts.down[e].to_f32();
  const double max_delta = (w1.cast<double>() - w0).cwiseAbs().maxCoeff();
  const double max_rounding = (written.cast<double>() - w1.cast<double>()).cwiseAbs().maxCoeff();
  EXPECT_EQ(r.tensors[0].max_delta, max_delta);
  EXPECT_EQ(r.tensors[0].max_rounding, max_rounding);
  EXPECT_GT(max_rounding, 0.0);
  EXPECT_DOUBLE_EQ(r.rounding_ratio(), max_rounding / max_delta);
  std::printf("  [save] bf16 rounding of dW: %.3g of max |dW| (%.3g)\n", r.rounding_ratio(), max_delta);

  // F32: the update is written exactly; a reload computes what the edited model in memory computes.
  const SaveReport r32 = save_edited_checkpoint(*m, demo, tmp / "f32", {{l, e}}, {false, true});
  ASSERT_EQ(r32.tensors.size(), 1u);
  EXPECT_EQ(r32.tensors[0].dtype, "F32");
  EXPECT_EQ(r32.tensors[0].max_rounding, 0.0);
  EXPECT_EQ(r32.rounding_ratio(), 0.0);
  auto re = Model::load(tmp / "f32");
  EXPECT_TRUE(re->weights().layers[l].ffn.experts.down[e] == w);
  EXPECT_EQ(re->weights().layers[l].ffn.experts.down[e].type(), ops::WType::F32);
  EXPECT_EQ(re->weights().layers[l].ffn.experts.down[e + 1].type(), ops::WType::BF16);  // the others as stored
  EXPECT_EQ((re->forward(seqs).logits - m->forward(seqs).logits).cwiseAbs().maxCoeff(), 0.f);
}

// Paging options change where the weights are, never a result: --mlock reads and pins the mapping, --prefetch
// advises the next layer while one runs.
TEST(Memory, MlockAndPrefetchGiveTheSameLogits) {
  const std::string demo = test::source_dir() + "/models/moedit-demo";
  LoadOptions paged;
  paged.mlock = true;
  paged.prefetch = true;
  const std::vector<std::vector<int32_t>> seqs = {{5, 17, 3, 99, 42}, {7, 8}};
  const ForwardOutput a = Model::load(demo)->forward(seqs), b = Model::load(demo, paged)->forward(seqs);
  EXPECT_EQ((a.logits - b.logits).cwiseAbs().maxCoeff(), 0.f);
}

TEST(Memory, AModelThatCannotFitSaysWhatItNeedsAndWhatIsAvailable) {
  const std::string dir = test::fixture("models/olmoe");
  const CheckpointMemory need = checkpoint_memory(load_config(dir), dir);
  EXPECT_EQ(need.file_bytes, fs::file_size(dir + "/model.safetensors"));
  EXPECT_GT(need.fp32_bytes, 0u);  // norms and routers
  MachineMemory have{64ull << 30, 32ull << 30, (need.file_bytes + need.fp32_bytes) / 2};
  try {
    check_fits(dir, need, have);
    ADD_FAILURE() << "no error";
  } catch (const ResourceError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(dir + ": the model needs " + gb(need.file_bytes + need.fp32_bytes) + " of address space"),
              std::string::npos) << msg;
    EXPECT_NE(msg.find("the address-space limit (ulimit -v) is " + gb(have.as_limit)), std::string::npos) << msg;
  }
  have.as_limit = 0;
  EXPECT_NO_THROW(check_fits(dir, need, have));
  // FP8 weights are read in place: the fp32 copies are the small ones (norms, routers, de-interleaved MLA rows), an
  // upper bound of what loading makes; they are checked against the available RAM.
  const std::string fp8 = test::fixture("models/deepseek_v3_fp8");
  const ModelConfig c8 = load_config(fp8);
  const CheckpointMemory n8 = checkpoint_memory(c8, fp8);
  EXPECT_LT(n8.fp32_bytes, uint64_t(c8.total_params()) * 4);
  EXPECT_GE(n8.fp32_bytes, weight_bytes(Model::load(fp8)->weights()).owned);
  have.available = n8.fp32_bytes - 1;
  try {
    check_fits(fp8, n8, have);
    ADD_FAILURE() << "no error";
  } catch (const ResourceError& e) {
    EXPECT_NE(std::string(e.what()).find("of RAM for fp32 copies"), std::string::npos) << e.what();
  }
  // Training state: 16 bytes per trainable parameter, checked against the available RAM and the address space.
  const MachineMemory roomy{64ull << 30, 32ull << 30, 0};
  EXPECT_NO_THROW(check_training_fits(dir, 1ull << 31, need, roomy));  // 2^31 × 16 B: exactly what is available
  try {
    check_training_fits(dir, (1ull << 31) + 1, need, roomy);
    ADD_FAILURE() << "no error";
  } catch (const ResourceError& e) {
    EXPECT_NE(std::string(e.what()).find(dir + ": training 2147483649 parameters needs 34.36 GB"), std::string::npos)
        << e.what();
    EXPECT_NE(std::string(e.what()).find("only 34.36 GB of 68.72 GB is available"), std::string::npos) << e.what();
  }
  const MachineMemory limited{64ull << 30, 32ull << 30, need.file_bytes + need.fp32_bytes + 1600};
  EXPECT_NO_THROW(check_training_fits(dir, 100, need, limited));
  EXPECT_THROW(check_training_fits(dir, 101, need, limited), ResourceError);
  // This machine's numbers are read.
  const MachineMemory mine = machine_memory();
  EXPECT_GT(mine.ram, 0u);
  EXPECT_GT(mine.available, 0u);
  EXPECT_LE(mine.available, mine.ram);
}

}  // namespace
}  // namespace moedit
