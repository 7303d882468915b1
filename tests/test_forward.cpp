// Forward-pass invariants on random weights for every family: grouped expert GEMMs = the per-token reference
// loop, one packed batch of mixed lengths = separate runs, KV-cached decoding = full recompute, hooks behave.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "model/generate.h"
#include "model/model.h"
#include "test_util.h"

namespace moedit {
namespace {


using test::kFamilies;
ModelConfig tiny(const std::string& type) { return test::tiny_config(type); }

std::vector<std::vector<int32_t>> batch() { return {{5, 17, 3, 88, 42, 7, 7, 1, 60}, {9, 2}, {33, 34, 35, 36, 0, 96}}; }

float max_abs(const MatR& m) { return m.cwiseAbs().maxCoeff(); }

TEST(Forward, GroupedExpertsMatchPerTokenReference) {
  for (const char* fam : kFamilies) {
    Model m(tiny(fam), random_weights(tiny(fam), 1, 0.3f));
    MatR a = MatR::Random(11, 32);
    TokenLayout lay = make_layout({std::vector<int32_t>(11, 1)}, nullptr);
    for (int l = 0; l < m.config().n_layers; ++l) {
      MatR got = m.ffn(l, a, lay, nullptr, nullptr), want = m.ffn_reference(l, a);
      EXPECT_LE((got - want).cwiseAbs().maxCoeff(), 1e-6 * max_abs(want)) << fam << " layer " << l;
    }
  }
}

TEST(Forward, BatchedEqualsSeparate) {
  for (const char* fam : kFamilies) {
    Model m(tiny(fam), random_weights(tiny(fam), 2, 0.3f));
    const auto seqs = batch();
    ForwardOutput all = m.forward(seqs);
    int row = 0;
    for (size_t b = 0; b < seqs.size(); ++b) {
      ForwardOutput one = m.forward({seqs[b]});
      const int n = int(seqs[b].size());
      // The kernels are batch-invariant (kernels/ops.h): a sequence's logits do not depend on its batch mates.
      EXPECT_EQ((all.logits.middleRows(row, n) - one.logits).cwiseAbs().maxCoeff(), 0.f) << fam << " seq " << b;
      for (int l = 0; l < m.config().n_layers; ++l)
        if (m.config().is_moe(l)) EXPECT_EQ(all.routing[size_t(l)].ids.middleRows(row, n), one.routing[size_t(l)].ids);
      row += n;
    }
  }
}

TEST(Forward, KvCachedDecodeEqualsFullRecompute) {
  for (const char* fam : kFamilies) {
    Model m(tiny(fam), random_weights(tiny(fam), 3, 0.3f));
    const auto seqs = batch();
    ForwardOutput full = m.forward(seqs);
    // One cache for the whole batch: a first chunk of every sequence, then one token at a time for the sequences
    // that still have tokens (the others get none).
    KVCache cache;
    ForwardOptions o;
    o.cache = &cache;
    std::vector<MatR> got(seqs.size());
    std::vector<std::vector<int32_t>> step;
    for (size_t b = 0; b < seqs.size(); ++b) {
      step.push_back({seqs[b].begin(), seqs[b].begin() + 1 + long(seqs[b].size()) / 3});
      got[b].resize(0, m.config().vocab_size);
    }
    size_t fed_max = 0;
    while (true) {
      ForwardOutput f = m.forward(step, o);
      int r = 0;
      for (size_t b = 0; b < seqs.size(); ++b) {
        const long n = long(step[b].size());
        got[b].conservativeResize(got[b].rows() + n, Eigen::NoChange);
        got[b].bottomRows(n) = f.logits.middleRows(r, n);
        r += int(n);
      }
      bool more = false;
      for (size_t b = 0; b < seqs.size(); ++b) {
        const size_t done = size_t(cache.length(int(b)));
        step[b].clear();
        if (done < seqs[b].size()) {
          step[b].push_back(seqs[b][done]);
          more = true;
        }
      }
      if (!more) break;
      ++fed_max;
    }
    EXPECT_GT(fed_max, 3u);
    int r = 0;
    for (size_t b = 0; b < seqs.size(); ++b) {
      const MatR want = full.logits.middleRows(r, long(seqs[b].size()));
      ASSERT_EQ(got[b].rows(), want.rows());
      // Batch-invariant kernels: decoding through the cache changes no bit.
      EXPECT_EQ((got[b] - want).cwiseAbs().maxCoeff(), 0.f) << fam << " seq " << b;
      r += int(seqs[b].size());
    }
  }
}

// The cache is one contiguous block per layer: reserved up front, decoding allocates nothing (its capacity stays) and
// gives the same logits, bit for bit, as a cache that grows; a reservation of another shape is refused.
TEST(Forward, KvCacheReservedUpFrontKeepsItsCapacity) {
  for (const char* fam : {"qwen2_moe", "deepseek_v2"}) {  // GQA widths; MLA widths (a fixture checkpoint)
    const std::string f = fam;
    const std::shared_ptr<Model> loaded = f == "deepseek_v2" ? Model::load(test::fixture("models/" + f)) : nullptr;
    const Model& m = loaded ? *loaded : Model(tiny(fam), random_weights(tiny(fam), 4, 0.3f));
    const ops::AttnShape sh = attn_shape(m.config());
    const auto seqs = batch();
    KVCache grown, reserved;
    reserved.reserve(m.config().n_layers, int(seqs.size()), 12, sh.Hkv * sh.Dk, sh.Hkv * sh.Dv);
    EXPECT_EQ(reserved.capacity(), 12);
    EXPECT_THROW(reserved.reserve(m.config().n_layers, 1, 4, sh.Hkv * sh.Dk + 1, sh.Hkv * sh.Dv), std::invalid_argument);
    for (size_t t = 0; t < 9; ++t) {
      std::vector<std::vector<int32_t>> step;
      for (const auto& s : seqs) step.push_back(t < s.size() ? std::vector<int32_t>{s[t]} : std::vector<int32_t>{});
      ForwardOptions a, b;
      a.cache = &grown;
      b.cache = &reserved;
      const MatR la = m.forward(step, a).logits, lb = m.forward(step, b).logits;
      ASSERT_EQ(la.rows(), lb.rows());
      EXPECT_EQ(max_abs(la - lb), 0.f) << fam << " step " << t;
      EXPECT_EQ(reserved.capacity(), 12) << fam;
    }
    EXPECT_GE(grown.capacity(), 9);
    EXPECT_EQ(reserved.length(0), 9);
    EXPECT_EQ(reserved.length(1), 2);
  }
}

TEST(Hooks, ExpertContributionsSumToMoeOutput) {
  for (const char* fam : kFamilies) {
    Model m(tiny(fam), random_weights(tiny(fam), 4, 0.3f));
    const int l = 2;
    Hooks h;
    auto moe = h.capture(hook_names::moe_out(l));
    auto shared = h.capture(hook_names::shared_out(l));
    std::vector<std::shared_ptr<Hooks::Capture>> ex;
    for (int e = 0; e < m.config().n_experts; ++e) ex.push_back(h.capture(hook_names::expert_out(l, e)));
    ForwardOptions o;
    o.hooks = &h;
    ForwardOutput f = m.forward(batch(), o);
    MatR sum = shared->value.size() ? shared->value : MatR::Zero(moe->value.rows(), moe->value.cols());
    int routed_rows = 0;
    for (const auto& c : ex)
      for (int r = 0; r < int(c->value.rows()); ++r, ++routed_rows) sum.row(c->tokens[size_t(r)]) += c->value.row(r);
    EXPECT_EQ(routed_rows, int(f.layout.seq.size()) * m.config().top_k) << fam;
    EXPECT_LE((sum - moe->value).cwiseAbs().maxCoeff(), 1e-5 * max_abs(moe->value)) << fam;
    EXPECT_EQ(bool(shared->value.size()), std::string(fam) == "qwen2_moe");
  }
}

// hook_ffn_in is the post-attention norm of resid_pre + attn_out; hook_shared_key is the shared expert's
// down_proj input (its product with the down projection, gated, is hook_shared_out).
TEST(Hooks, FfnInputAndSharedKey) {
  const ModelConfig c = tiny("qwen2_moe");
  Model m(c, random_weights(c, 8, 0.3f));
  const int l = 2, H = c.hidden;
  Hooks h;
  auto pre = h.capture(hook_names::resid_pre(l)), att = h.capture(hook_names::attn_out(l));
  auto in = h.capture(hook_names::ffn_in(l)), key = h.capture(hook_names::shared_key(l));
  auto out = h.capture(hook_names::shared_out(l));
  ForwardOptions o;
  o.hooks = &h;
  m.forward(batch(), o);
  const MatR x = pre->value + att->value;
  MatR a(x.rows(), H);
  ops::rmsnorm(x.data(), m.weights().layers[size_t(l)].ln_post.data(), a.data(), int(x.rows()), H, c.rms_eps);
  EXPECT_EQ(in->value, a);
  const FFNWeights& f = m.weights().layers[size_t(l)].ffn;
  ASSERT_EQ(key->value.cols(), f.shared.I);
  const MatR y = key->value * f.shared.down[0].to_f32().transpose();
  for (int t = 0; t < int(y.rows()); ++t) {
    const float g = ops::sigmoid(a.row(t).dot(f.shared_gate.transpose()));
    EXPECT_LE((g * y.row(t) - out->value.row(t)).cwiseAbs().maxCoeff(), 1e-5f * max_abs(out->value)) << t;
  }
}

// Readers see the activation where it is, before the hooks of the same name: the routed key rows of each expert and
// the shared key, equal to what captures record; a forward with only readers gives the logits of one without hooks.
TEST(Hooks, ReadersSeeTheKeysCapturesRecord) {
  const ModelConfig c = tiny("qwen2_moe");
  Model m(c, random_weights(c, 8, 0.3f));
  const int l = 1;
  Hooks h, readers_only;
  std::vector<std::shared_ptr<Hooks::Capture>> caps;
  std::vector<MatR> seen(size_t(c.n_experts) + 1);
  for (int e = 0; e <= c.n_experts; ++e) {
    const std::string name = e < c.n_experts ? hook_names::expert_key(l, e) : hook_names::shared_key(l);
    caps.push_back(h.capture(name));
    auto read = [&seen, e](const float* rows, int n, int cols, size_t ld) {
      MatR& s = seen[size_t(e)];
      s.resize(s.rows() + n, cols);
      for (int r = 0; r < n; ++r)
        for (int j = 0; j < cols; ++j) s(s.rows() - n + r, j) = rows[size_t(r) * ld + size_t(j)];
    };
    h.add_reader(name, read);
    readers_only.add_reader(name, [](const float*, int, int, size_t) {});
  }
  ForwardOptions o;
  o.hooks = &h;
  m.forward(batch(), o);
  int routed = 0;
  for (int e = 0; e <= c.n_experts; ++e) {
    EXPECT_EQ(seen[size_t(e)], caps[size_t(e)]->value) << "expert " << e;
    if (e < c.n_experts) routed += int(seen[size_t(e)].rows());
  }
  EXPECT_EQ(routed, int(seen.back().rows()) * c.top_k);  // every token's top-k rows; the shared key has every token
  o.hooks = &readers_only;
  EXPECT_EQ(m.forward(batch(), o).logits, m.forward(batch()).logits);
}

TEST(Hooks, CaptureMatchesOutputAndPatchingIsCausal) {
  Model m(tiny("qwen2_moe"), random_weights(tiny("qwen2_moe"), 5, 0.3f));
  const auto seqs = batch();
  ForwardOutput clean = m.forward(seqs);
  Hooks cap;
  auto last = cap.capture(hook_names::resid_post(2));
  ForwardOptions o;
  o.hooks = &cap;
  ForwardOutput f = m.forward(seqs, o);
  EXPECT_EQ(last->value, f.hidden);
  EXPECT_EQ(f.logits, clean.logits);

  // Adding a delta to the residual of (row 0, position 4) changes logits at positions ≥ 4 of row 0 only.
  Hooks patch;
  patch.add_delta(hook_names::resid_pre(1), {{0, 4}}, VecF::Constant(32, 0.5f));
  o.hooks = &patch;
  ForwardOutput p = m.forward(seqs, o);
  for (int t = 0; t < int(p.layout.seq.size()); ++t) {
    const bool affected = p.layout.seq[size_t(t)] == 0 && p.layout.pos[size_t(t)] >= 4;
    const float d = (p.logits.row(t) - clean.logits.row(t)).cwiseAbs().maxCoeff();
    if (affected) EXPECT_GT(d, 1e-4) << t;
    else EXPECT_EQ(d, 0.f) << t;
  }
  // Replacing with the clean value is a no-op; negative positions count from the end.
  Hooks same;
  same.replace(hook_names::resid_pre(1), {{2, -1}}, VecF::Zero(32));
  auto seen = same.capture(hook_names::resid_pre(1));
  o.hooks = &same;
  ForwardOutput z = m.forward(seqs, o);
  EXPECT_TRUE(seen->value.row(int(z.layout.seq.size()) - 1).isZero());
}

TEST(Hooks, MaskingARouterLogitNeverRoutesThere) {
  Model m(tiny("olmoe"), random_weights(tiny("olmoe"), 6, 0.3f));
  ForwardOutput f = m.forward(batch());
  const int l = 1, e = f.routing[size_t(l)].ids(0, 0);  // the top expert of the first token
  Hooks h;
  h.add(hook_names::router_logits(l), [e](Eigen::Ref<MatR> z, const HookContext&) {
    z.col(e).setConstant(-std::numeric_limits<float>::infinity());
  });
  ForwardOptions o;
  o.hooks = &h;
  ForwardOutput g = m.forward(batch(), o);
  EXPECT_FALSE((g.routing[size_t(l)].ids.array() == e).any());
  EXPECT_TRUE((f.routing[size_t(l)].ids.array() == e).any());
}

TEST(Generate, GreedyMatchesArgmaxOfFullRecompute) {
  Model m(tiny("mixtral"), random_weights(tiny("mixtral"), 7, 0.3f));
  std::vector<int32_t> seq = {3, 1, 4, 1, 5};
  GenerateOptions g;
  g.max_new_tokens = 8;
  const auto out = generate(m, seq, g);
  ASSERT_EQ(out.size(), 8u);
  for (int32_t next : out) {
    ForwardOutput f = m.forward({seq});
    EXPECT_EQ(next, argmax(f.logits.row(f.logits.rows() - 1).data(), m.config().vocab_size));
    seq.push_back(next);
  }
  g.top_k = 5;
  g.seed = 11;
  EXPECT_EQ(generate(m, {3, 1, 4}, g), generate(m, {3, 1, 4}, g));  // seeded sampling is reproducible
}

}  // namespace
}  // namespace moedit
