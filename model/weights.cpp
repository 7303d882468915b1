// Checkpoint tensors → canonical weights, in place where the dtype allows (see model/weights.h).
#include "model/weights.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <memory>
#include <optional>
#include <stdexcept>

#include "kernels/backend.h"
#include "kernels/half.h"
#include "model/config.h"
#include "io/errors.h"
#include "io/safetensors.h"

namespace moedit {

// ---- Weight -----------------------------------------------------------------------------------------------------

Weight::Weight(MatR m) : own_(std::move(m)), rows_(own_.rows()), cols_(own_.cols()), copy_(true) {}

Weight Weight::view(const void* data, ops::WType t, int64_t rows, int64_t cols, size_t ld, ops::BlockScales scales) {
  Weight w;
  w.view_ = data;
  w.vtype_ = t;
  w.ld_ = ld;
  w.scales_ = scales;
  w.rows_ = rows;
  w.cols_ = cols;
  return w;
}

ops::WeightView Weight::kernel() const {
  if (copy_) return {own_.data(), size_t(cols_)};
  return {view_, vtype_, ld_, scales_};
}

namespace {
// The bytes of a view's rows (rows − 1 strides and one row) and of every block row of scales they span.
size_t data_bytes(const ops::WeightView& v, int64_t rows, int64_t cols) {
  return (size_t(rows - 1) * v.ld + size_t(cols)) * ops::wtype_size(v.type);
}
size_t scale_bytes(const ops::WeightView& v, int64_t rows) {
  return size_t((v.scales.r0 + rows - 1) / v.scales.br + 1) * v.scales.ld * sizeof(float);
}
}  // namespace

ops::WeightView Weight::on(const Backend& be) const {
  ops::WeightView v = kernel();
  if (be.host_memory() || empty()) return v;
  const ops::WeightView host = v;
  v.data = be.resident(host.data, data_bytes(host, rows_, cols_));
  if (v.scales.data)
    v.scales.data = static_cast<const float*>(be.resident(host.scales.data, scale_bytes(host, rows_)));
  return v;
}

void Weight::ranges(std::vector<Backend::HostRange>& out) const {
  if (empty()) return;
  const ops::WeightView v = kernel();
  out.push_back({v.data, data_bytes(v, rows_, cols_)});
  if (v.scales.data) out.push_back({v.scales.data, scale_bytes(v, rows_)});
}

MatR Weight::to_f32() const {
  if (copy_) return own_;
  MatR m(rows_, cols_);
  for (int64_t r = 0; r < rows_; ++r) row(r, m.row(r).data());
  return m;
}

const float* Weight::f32() const {
  if (copy_) return own_.data();
  return vtype_ == ops::WType::F32 && ld_ == size_t(cols_) ? static_cast<const float*>(view_) : nullptr;
}

float* Weight::mutable_f32() {
  if (!copy_) {
    own_ = to_f32();
    copy_ = true;
  }
  return own_.data();
}

bool Weight::drop_copy_if_unchanged() {
  if (!copy_ || !view_ || !(*this == view(view_, vtype_, rows_, cols_, ld_, scales_))) return false;
  own_ = MatR();
  copy_ = false;
  return true;
}

bool operator==(const Weight& a, const Weight& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return false;
  std::vector<float> ra(static_cast<size_t>(a.cols())), rb(ra.size());
  for (int64_t r = 0; r < a.rows(); ++r) {
    a.row(r, ra.data());
    b.row(r, rb.data());
    if (std::memcmp(ra.data(), rb.data(), sizeof(float) * ra.size()) != 0) return false;
  }
  return true;
}

void expert_gate_up(const ExpertBank& b, int e, const float* x, size_t ldx, int n, float* gu) {
  const size_t ld = 2 * size_t(b.I);
  ops::linear(x, ldx, n, b.H, b.gate[size_t(e)].kernel(), b.I, gu, ld);
  ops::linear(x, ldx, n, b.H, b.up[size_t(e)].kernel(), b.I, gu + b.I, ld);
}

void expert_key(const ExpertBank& b, int e, const float* x, size_t ldx, int n, float* key) {
  MatR gu(n, 2 * b.I);
  expert_gate_up(b, e, x, ldx, n, gu.data());
  ops::silu_mul(gu.data(), n, b.I, key);
}

void prefetch_layer(const Weights& w, int l) {
  const uintptr_t page = uintptr_t(::sysconf(_SC_PAGESIZE));
  auto advise = [page](const Weight& x) {
    if (!x.view_data() || x.is_copy()) return;
    const auto a = reinterpret_cast<uintptr_t>(x.view_data()), start = a / page * page;
    ::madvise(reinterpret_cast<void*>(start), a + x.view_bytes() - start, MADV_WILLNEED);
  };
  for_each_layer_tensor(w.layers[size_t(l)], advise, [](const VecF&) {}, [](const MatR&) {});
}

std::vector<Backend::HostRange> layer_ranges(const Weights& w, int l) {
  std::vector<Backend::HostRange> r;
  for_each_layer_tensor(
      w.layers[size_t(l)], [&r](const Weight& x) { x.ranges(r); },
      [&r](const VecF& v) {
        if (v.size()) r.push_back({v.data(), sizeof(float) * size_t(v.size())});
      },
      [&r](const MatR& m) {
        if (m.size()) r.push_back({m.data(), sizeof(float) * size_t(m.size())});
      });
  return r;
}

WeightBytes weight_bytes(const Weights& w) {
  WeightBytes b;
  for_each_tensor(
      w,
      [&b](const Weight& x) {
        b.mapped += x.view_bytes();
        if (x.is_copy()) b.owned += sizeof(float) * size_t(x.size());
      },
      [&b](const VecF& v) { b.owned += sizeof(float) * size_t(v.size()); },
      [&b](const MatR& m) { b.owned += sizeof(float) * size_t(m.size()); });
  return b;
}

Weights narrowed(const Weights& w, ops::WType t) {
  if (t == ops::WType::F32) throw std::invalid_argument("narrowed: F32 is not a narrow type");
  Weights out = w;
  auto buffers = std::make_shared<std::vector<std::vector<uint16_t>>>();
  for_each_tensor(
      out,
      [&](Weight& x) {
        if (x.empty()) return;
        std::vector<uint16_t> b(size_t(x.size()));
        std::vector<float> row(static_cast<size_t>(x.cols()));
        for (int64_t r = 0; r < x.rows(); ++r) {
          x.row(r, row.data());
          for (int64_t c = 0; c < x.cols(); ++c)
            b[size_t(r * x.cols() + c)] = t == ops::WType::BF16 ? f32_to_bf16(row[size_t(c)]) : f32_to_f16(row[size_t(c)]);
        }
        buffers->push_back(std::move(b));
        x = Weight::view(buffers->back().data(), t, x.rows(), x.cols(), size_t(x.cols()));
      },
      [](VecF&) {}, [](MatR&) {});
  out.storage = std::move(buffers);  // every non-empty matrix now points into these
  return out;
}

namespace {

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

const TensorView& expect(const TensorStore& st, const std::string& name, const std::vector<int64_t>& shape) {
  const TensorView& t = st.get(name);
  if (t.shape != shape)
    throw InputError(t.file + ": tensor '" + name + "' has shape " + shape_str(t.shape) + ", expected " +
                     shape_str(shape));
  return t;
}

// Block size of FP8 weight scales (quantization_config.weight_block_size; DeepSeek-V3: 128 × 128).
struct Fp8Blocks {
  int64_t rows = 128, cols = 128;
};
thread_local Fp8Blocks g_fp8;

// A tensor of the expected shape into out (fp32). An F8_E4M3 matrix "<x>.weight" is dequantised with its
// "<x>.weight_scale_inv" [ceil(out/br), ceil(in/bc)]: W[i, j] = fp8(W)[i, j] · scale_inv[i / br, j / bc].
void load_into(const TensorStore& st, const std::string& name, const std::vector<int64_t>& shape, float* out) {
  const TensorView& t = expect(st, name, shape);
  t.to_f32(out);
  if (t.dtype != DType::F8_E4M3) return;
  const std::string sname = name + "_scale_inv";
  if (shape.size() != 2 || !st.has(sname))
    throw InputError(t.file + ": FP8 tensor '" + name + "' has no 2-D companion '" + sname + "'");
  const int64_t R = shape[0], C = shape[1], br = g_fp8.rows, bc = g_fp8.cols;
  const int64_t sr = (R + br - 1) / br, sc = (C + bc - 1) / bc;
  const std::vector<float> scale = expect(st, sname, {sr, sc}).to_f32();
  for (int64_t i = 0; i < R; ++i)
    for (int64_t j = 0; j < C; ++j) out[i * C + j] *= scale[size_t((i / br) * sc + j / bc)];
}

MatR load_matrix(const TensorStore& st, const std::string& name, int64_t rows, int64_t cols) {
  MatR m(rows, cols);
  load_into(st, name, {rows, cols}, m.data());
  return m;
}

// The kernels read f32, bf16 and f16 in place when the data is naturally aligned (safetensors does not promise it).
std::optional<ops::WType> view_type(const TensorView& t) {
  const auto aligned = [&](size_t a) { return reinterpret_cast<uintptr_t>(t.data) % a == 0; };
  switch (t.dtype) {
    case DType::F32: return aligned(4) ? std::optional(ops::WType::F32) : std::nullopt;
    case DType::BF16: return aligned(2) ? std::optional(ops::WType::BF16) : std::nullopt;
    case DType::F16: return aligned(2) ? std::optional(ops::WType::F16) : std::nullopt;
    default: return std::nullopt;
  }
}

// The block scales of an FP8 matrix [rows, cols] when they can be read in place (an aligned F32 companion
// "<name>_scale_inv" [ceil(rows/br), ceil(cols/bc)]); nullopt otherwise (the matrix is then dequantised at load).
std::optional<ops::BlockScales> fp8_scales(const TensorStore& st, const std::string& name, int64_t rows, int64_t cols) {
  const std::string sname = name + "_scale_inv";
  if (!st.has(sname)) return std::nullopt;
  const int64_t br = g_fp8.rows, bc = g_fp8.cols, sc = (cols + bc - 1) / bc;
  const TensorView& s = expect(st, sname, {(rows + br - 1) / br, sc});
  if (s.dtype != DType::F32 || reinterpret_cast<uintptr_t>(s.data) % 4 != 0) return std::nullopt;
  return ops::BlockScales{reinterpret_cast<const float*>(s.data), size_t(sc), int32_t(br), int32_t(bc), 0, 0};
}

// A weight matrix: a view into the mapped file (FP8 with its block scales), or an fp32 copy (other dtypes).
Weight load_weight(const TensorStore& st, const std::string& name, int64_t rows, int64_t cols) {
  const TensorView& t = expect(st, name, {rows, cols});
  if (const auto wt = view_type(t)) return Weight::view(t.data, *wt, rows, cols, size_t(cols));
  if (t.dtype == DType::F8_E4M3)
    if (const auto sc = fp8_scales(st, name, rows, cols))
      return Weight::view(t.data, ops::WType::F8E4M3, rows, cols, size_t(cols), *sc);
  return Weight(load_matrix(st, name, rows, cols));
}

// Rows [r0, r0 + n) of every expert's slice of a fused [E, R, C] tensor.
std::vector<Weight> fused_rows(const TensorStore& st, const std::string& name, int64_t E, int64_t R, int64_t C,
                               int64_t r0, int64_t n) {
  const TensorView& t = expect(st, name, {E, R, C});
  std::vector<Weight> out;
  if (const auto wt = view_type(t)) {
    for (int64_t e = 0; e < E; ++e)
      out.push_back(Weight::view(t.data + size_t((e * R + r0) * C) * dtype_size(t.dtype), *wt, n, C, size_t(C)));
    return out;
  }
  if (t.dtype == DType::F8_E4M3)
    throw InputError(t.file + ": FP8 tensor '" + name + "' has no 2-D companion '" + name + "_scale_inv'");
  const std::vector<float> all = t.to_f32();
  for (int64_t e = 0; e < E; ++e) out.push_back(Weight(CMapMatR(all.data() + (e * R + r0) * C, n, C)));
  return out;
}

VecF load_vector(const TensorStore& st, const std::string& name, int64_t n) {
  VecF v(n);
  load_into(st, name, {n}, v.data());
  return v;
}

VecF load_vector_if(const TensorStore& st, const std::string& name, int64_t n) {
  return st.has(name) ? load_vector(st, name, n) : VecF();
}

std::string with_expert(std::string_view tmpl, int e) {
  std::string s(tmpl);
  const auto p = s.find("{e}");
  if (p != std::string::npos) s.replace(p, 3, std::to_string(e));
  return s;
}

// A SwiGLU MLP with separate gate/up/down tensors appended to a bank as its next expert.
void add_swiglu(const TensorStore& st, ExpertBank& b, const std::string& gate, const std::string& up,
                const std::string& down) {
  b.gate.push_back(load_weight(st, gate, b.I, b.H));
  b.up.push_back(load_weight(st, up, b.I, b.H));
  b.down.push_back(load_weight(st, down, b.H, b.I));
}

ExpertBank load_dense_mlp(const TensorStore& st, const std::string& prefix, int I, int H) {
  ExpertBank b{1, I, H, {}, {}, {}};
  add_swiglu(st, b, prefix + "gate_proj.weight", prefix + "up_proj.weight", prefix + "down_proj.weight");
  return b;
}


// Interleaved-pair RoPE ([x0,x1,x2,x3,…] pairs (2i, 2i+1)) → rotate-half layout ([x0,x2,…,x1,x3,…]): permutes the
// dr rows starting at `first` of every block of `stride` rows (one block per head).
template <class M>
void deinterleave_rows(M& w, int first, int dr, int stride) {
  const M old = w;
  for (int64_t b = 0; b < int64_t(w.rows()) / stride; ++b)
    for (int i = 0; i < dr / 2; ++i) {
      w.row(b * stride + first + i) = old.row(b * stride + first + 2 * i);
      w.row(b * stride + first + dr / 2 + i) = old.row(b * stride + first + 2 * i + 1);
    }
}

// An owned copy of w with its rotary rows de-interleaved (see deinterleave_rows).
Weight deinterleaved(const Weight& w, int first, int dr, int stride) {
  MatR m = w.to_f32();
  deinterleave_rows(m, first, dr, stride);
  return Weight(std::move(m));
}

// DeepSeek MLA projections (see AttnWeights).
void load_mla(const ModelConfig& c, const TensorStore& st, const std::string& ap, AttnWeights& at) {
  const int64_t H = c.hidden, Hq = c.n_heads, dq = c.qk_dim(), rq = c.q_lora_rank, rkv = c.kv_lora_rank,
                dr = c.qk_rope_dim;
  Weight& wq = rq ? at.wq_b : at.wq;
  if (rq) {
    at.wq_a = load_weight(st, ap + "q_a_proj.weight", rq, H);
    at.bq_a = load_vector_if(st, ap + "q_a_proj.bias", rq);
    at.q_a_norm = load_vector(st, ap + "q_a_layernorm.weight", rq);
    at.wq_b = load_weight(st, ap + "q_b_proj.weight", Hq * dq, rq);
  } else {
    at.wq = load_weight(st, ap + "q_proj.weight", Hq * dq, H);
  }
  at.wkv_a = load_weight(st, ap + "kv_a_proj_with_mqa.weight", rkv + dr, H);
  at.bkv_a = load_vector_if(st, ap + "kv_a_proj_with_mqa.bias", rkv + dr);
  at.kv_a_norm = load_vector(st, ap + "kv_a_layernorm.weight", rkv);
  at.wkv_b = load_weight(st, ap + "kv_b_proj.weight", Hq * (c.qk_nope_dim + c.v_head_dim), rkv);
  at.wo = load_weight(st, ap + "o_proj.weight", H, Hq * c.v_head_dim);
  at.bo = load_vector_if(st, ap + "o_proj.bias", H);
  if (c.rope_interleave) {
    wq = deinterleaved(wq, c.qk_nope_dim, int(dr), int(dq));
    at.wkv_a = deinterleaved(at.wkv_a, int(rkv), int(dr), int(rkv + dr));
    if (at.bkv_a.size()) deinterleave_rows(at.bkv_a, int(rkv), int(dr), int(rkv + dr));
  }
}

}  // namespace

Weights load_weights(const ModelConfig& c, std::shared_ptr<const TensorStore> store) {
  const TensorStore& st = *store;
  const ArchSpec& a = *c.arch;
  const int64_t H = c.hidden, D = c.head_dim, Hq = c.n_heads, Hkv = c.n_kv_heads, V = c.vocab_size;
  g_fp8 = {};
  if (c.raw.contains("quantization_config") && c.raw["quantization_config"].is_object()) {
    const auto& q = c.raw["quantization_config"];
    if (q.contains("weight_block_size")) {
      const auto& b = q["weight_block_size"];
      if (!b.is_array() || b.size() != 2 || !b[0].is_number_integer() || !b[1].is_number_integer() ||
          b[0].get<int64_t>() < 1 || b[1].get<int64_t>() < 1)
        throw InputError(c.source + ": field 'quantization_config.weight_block_size' must be two positive integers");
      g_fp8 = {b[0].get<int64_t>(), b[1].get<int64_t>()};
    }
  }
  Weights w;
  w.storage = std::move(store);
  w.embed = load_weight(st, "model.embed_tokens.weight", V, H);
  if (!c.tie_word_embeddings) w.lm_head = load_weight(st, "lm_head.weight", V, H);
  w.final_norm = load_vector(st, "model.norm.weight", H);
  w.layers.resize(size_t(c.n_layers));
  for (int l = 0; l < c.n_layers; ++l) {
    LayerWeights& L = w.layers[size_t(l)];
    const std::string p = "model.layers." + std::to_string(l) + ".";
    L.ln_in = load_vector(st, p + "input_layernorm.weight", H);
    L.ln_post = load_vector(st, p + "post_attention_layernorm.weight", H);

    AttnWeights& at = L.attn;
    const std::string ap = p + "self_attn.";
    if (a.attention == AttentionKind::MLA) {
      load_mla(c, st, ap, at);
    } else {
      at.wq = load_weight(st, ap + "q_proj.weight", Hq * D, H);
      at.wk = load_weight(st, ap + "k_proj.weight", Hkv * D, H);
      at.wv = load_weight(st, ap + "v_proj.weight", Hkv * D, H);
      at.wo = load_weight(st, ap + "o_proj.weight", H, Hq * D);
      if (c.qkv_bias) {
        at.bq = load_vector(st, ap + "q_proj.bias", Hq * D);
        at.bk = load_vector(st, ap + "k_proj.bias", Hkv * D);
        at.bv = load_vector(st, ap + "v_proj.bias", Hkv * D);
      }
      at.bo = load_vector_if(st, ap + "o_proj.bias", H);
      if (a.qk_norm == QKNorm::PerHead) {
        at.q_norm = load_vector(st, ap + "q_norm.weight", D);
        at.k_norm = load_vector(st, ap + "k_norm.weight", D);
      } else if (a.qk_norm == QKNorm::WholeProjection) {
        at.q_norm = load_vector(st, ap + "q_norm.weight", Hq * D);
        at.k_norm = load_vector(st, ap + "k_norm.weight", Hkv * D);
      }
    }

    FFNWeights& f = L.ffn;
    f.moe = c.is_moe(l);
    if (!f.moe) {
      f.experts = load_dense_mlp(st, p + "mlp.", c.dense_width, int(H));
      continue;
    }
    // The MoE module and router: the first candidate names that exist.
    std::string mp, router;
    for (auto m : a.moe_modules)
      for (auto rw : a.router_weights)
        if (mp.empty() && st.has(p + std::string(m) + "." + std::string(rw))) {
          mp = p + std::string(m) + ".";
          router = mp + std::string(rw);
        }
    if (mp.empty()) {  // report the canonical name as missing
      mp = p + std::string(a.moe_modules.front()) + ".";
      router = mp + std::string(a.router_weights.front());
    }
    const int E = c.n_experts, I = c.expert_width;
    f.router = load_matrix(st, router, E, H);
    if (!a.router_bias.empty()) f.router_bias = load_vector(st, mp + std::string(a.router_bias), E);
    f.experts = {E, I, int(H), {}, {}, {}};
    bool packed = false;
    for (const auto& [gu, dn] : a.packed) {
      if (!st.has(mp + std::string(gu))) continue;
      f.experts.gate = fused_rows(st, mp + std::string(gu), E, 2 * I, H, 0, I);
      f.experts.up = fused_rows(st, mp + std::string(gu), E, 2 * I, H, I, I);
      f.experts.down = fused_rows(st, mp + std::string(dn), E, H, I, 0, H);
      packed = true;
      break;
    }
    if (!packed) {
      if (a.expert_gate.empty())
        throw InputError(st.files().front()->path() + ": missing tensor '" + mp +
                         std::string(a.packed.front().first) + "'");
      for (int e = 0; e < E; ++e)
        add_swiglu(st, f.experts, mp + with_expert(a.expert_gate, e), mp + with_expert(a.expert_up, e),
                   mp + with_expert(a.expert_down, e));
    }
    if (c.shared_width > 0) {
      f.has_shared = true;
      f.shared = load_dense_mlp(st, mp + std::string(a.shared_module) + ".", c.shared_width, int(H));
      if (a.shared == SharedExpertKind::SigmoidGated) {
        f.shared_gate.resize(H);
        load_into(st, mp + std::string(a.shared_gate), {1, H}, f.shared_gate.data());
      }
    }
  }
  return w;
}

namespace {

// splitmix64's output for the state after `state += golden`.
uint64_t splitmix(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// bf16 matrices of random weights, owned by Weights::storage.
struct Bf16Arena {
  std::vector<std::unique_ptr<uint16_t[]>> blocks;
};

}  // namespace

Weights random_weights(const ModelConfig& c, uint64_t seed, float std, ops::WType dtype) {
  if (dtype != ops::WType::F32 && dtype != ops::WType::BF16)
    throw std::invalid_argument("random_weights: fp32 or bf16 only");
  // Uniform(-a, a) with a = √3·std (variance std²), from splitmix64: fast enough for GB-sized benchmark models.
  uint64_t state = seed;
  const float a = std * 1.7320508f;
  auto uniform = [a](uint64_t z) { return (float(z >> 40) * (1.f / 16777216.f) * 2.f - 1.f) * a; };
  auto next = [&]() { return uniform(splitmix(state)); };
  auto mat = [&](int64_t r, int64_t k) {
    MatR m(r, k);
    for (int64_t i = 0; i < m.size(); ++i) m.data()[i] = next();
    return m;
  };
  const auto arena = dtype == ops::WType::BF16 ? std::make_shared<Bf16Arena>() : nullptr;
  auto wmat = [&](int64_t rr, int64_t k) {
    if (!arena) return Weight(mat(rr, k));
    auto block = std::make_unique_for_overwrite<uint16_t[]>(size_t(rr * k));
    uint16_t* p = block.get();
    const uint64_t base = splitmix(state);  // row i draws from its own stream, seeded by (base, i)
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < rr; ++i) {
      uint64_t s = base ^ (uint64_t(i) * 0xd1b54a32d192ed03ull);
      for (int64_t j = 0; j < k; ++j) p[i * k + j] = f32_to_bf16(uniform(splitmix(s)));
    }
    arena->blocks.push_back(std::move(block));
    return Weight::view(p, ops::WType::BF16, rr, k, size_t(k));
  };
  // A bank drawn as one gate‖up block [E, 2I, H] then one down block [E, H, I] (the order earlier versions used).
  auto bank = [&](int E, int I, int64_t Hh) {
    ExpertBank b{E, I, int(Hh), {}, {}, {}};
    for (int e = 0; e < E; ++e) {
      b.gate.push_back(wmat(I, Hh));
      b.up.push_back(wmat(I, Hh));
    }
    for (int e = 0; e < E; ++e) b.down.push_back(wmat(Hh, I));
    return b;
  };
  auto ones = [&](int64_t n) {
    VecF v(n);
    for (int64_t i = 0; i < n; ++i) v[i] = 1.f + next();
    return v;
  };
  const int64_t H = c.hidden, D = c.head_dim, Hq = c.n_heads, Hkv = c.n_kv_heads, V = c.vocab_size;
  Weights w;
  w.embed = wmat(V, H);
  if (!c.tie_word_embeddings) w.lm_head = wmat(V, H);
  w.final_norm = ones(H);
  w.layers.resize(size_t(c.n_layers));
  for (int l = 0; l < c.n_layers; ++l) {
    LayerWeights& L = w.layers[size_t(l)];
    L.ln_in = ones(H);
    L.ln_post = ones(H);
    if (c.arch->attention == AttentionKind::MLA) {
      const int64_t dq = c.qk_dim(), rq = c.q_lora_rank, rkv = c.kv_lora_rank;
      if (rq) {
        L.attn.wq_a = wmat(rq, H);
        L.attn.q_a_norm = ones(rq);
        L.attn.wq_b = wmat(Hq * dq, rq);
      } else {
        L.attn.wq = wmat(Hq * dq, H);
      }
      L.attn.wkv_a = wmat(rkv + c.qk_rope_dim, H);
      L.attn.kv_a_norm = ones(rkv);
      L.attn.wkv_b = wmat(Hq * (c.qk_nope_dim + c.v_head_dim), rkv);
      L.attn.wo = wmat(H, Hq * c.v_head_dim);
    } else {
      L.attn.wq = wmat(Hq * D, H);
      L.attn.wk = wmat(Hkv * D, H);
      L.attn.wv = wmat(Hkv * D, H);
      L.attn.wo = wmat(H, Hq * D);
    }
    if (c.qkv_bias) {
      L.attn.bq = mat(Hq * D, 1).col(0);
      L.attn.bk = mat(Hkv * D, 1).col(0);
      L.attn.bv = mat(Hkv * D, 1).col(0);
    }
    if (c.arch->qk_norm == QKNorm::PerHead) {
      L.attn.q_norm = ones(D);
      L.attn.k_norm = ones(D);
    } else if (c.arch->qk_norm == QKNorm::WholeProjection) {
      L.attn.q_norm = ones(Hq * D);
      L.attn.k_norm = ones(Hkv * D);
    }
    FFNWeights& f = L.ffn;
    f.moe = c.is_moe(l);
    if (!f.moe) {
      f.experts = bank(1, c.dense_width, H);
      continue;
    }
    f.router = mat(c.n_experts, H);
    if (!c.arch->router_bias.empty()) f.router_bias = mat(c.n_experts, 1).col(0);
    f.experts = bank(c.n_experts, c.expert_width, H);
    if (c.shared_width > 0) {
      f.has_shared = true;
      f.shared = bank(1, c.shared_width, H);
      if (c.arch->shared == SharedExpertKind::SigmoidGated) f.shared_gate = mat(H, 1).col(0);
    }
  }
  w.storage = arena;
  return w;
}

}  // namespace moedit
