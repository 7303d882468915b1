// Model weights in their checkpoint dtype.
//
// A Weight is a row-major matrix [rows, cols] that the kernels read in place: a view into the memory-mapped
// safetensors file (f32, bf16 or f16, widened to fp32 in registers — exact; FP8 E4M3 with its fp32 block scales,
// dequantised a block of rows at a time), or an owned fp32 matrix (random weights, de-interleaved MLA rotary rows,
// and every matrix an edit changed: edits are copy-on-write). Loading converts nothing else, so a bf16 checkpoint takes its file size in page cache, and a model
// larger than RAM runs with the kernel paging weights in and out.
//
// Canonical structure (whatever the checkpoint's layout): experts are banks of per-expert gate [I, H], up [I, H] and
// down [H, I] matrices — views into the Hub's per-expert tensors or slices of transformers v5's fused
// gate_up_proj [E, 2I, H] / down_proj [E, H, I]. A dense MLP is a bank with E = 1, so one SwiGLU path serves routed
// experts, shared experts and dense layers. Norm weights, biases and routers (small) are fp32 copies.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "kernels/backend.h"
#include "kernels/ops.h"

namespace moedit {

class Backend;
class TensorStore;
struct ModelConfig;

class Weight {
 public:
  Weight() = default;
  explicit Weight(MatR m);  // owned fp32
  // A view of rows × cols elements of type t, rows ld elements apart (kept alive by Weights::storage); FP8 views
  // carry their block scales (mapped too).
  static Weight view(const void* data, ops::WType t, int64_t rows, int64_t cols, size_t ld,
                     ops::BlockScales scales = {});

  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  int64_t size() const { return rows_ * cols_; }
  bool empty() const { return size() == 0; }
  // What the kernels read now: the owned copy when there is one, else the view.
  ops::WeightView kernel() const;
  ops::WType type() const { return kernel().type; }
  // kernel() in a backend's memory: the same view on the CPU, the backend's resident copy on a device.
  ops::WeightView on(const Backend& be) const;
  // The host ranges on() asks a device backend for (the elements; FP8 block scales), appended to out.
  void ranges(std::vector<Backend::HostRange>& out) const;
  bool is_copy() const { return copy_; }
  // Bytes of the checkpoint view (0 for an owned matrix).
  size_t view_bytes() const { return view_ ? size_t(size()) * ops::wtype_size(vtype_) : 0; }
  // The checkpoint bytes of the view (null when owned): rows × ld elements from view_data().
  const void* view_data() const { return view_; }

  float operator()(int64_t r, int64_t c) const { return ops::widen(kernel(), r, c); }
  void row(int64_t r, float* out) const { ops::widen_row(kernel(), r, 0, cols_, out); }
  MatR to_f32() const;
  // Contiguous fp32 data, or nullptr when the matrix is stored otherwise (a bf16/f16 view).
  const float* f32() const;

  // Copy-on-write: an owned fp32 copy of the current values (made on the first call) to change in place.
  float* mutable_f32();
  // Drops the owned copy when it equals the checkpoint view bit for bit (an edit reverted); returns whether it did.
  bool drop_copy_if_unchanged();

 private:
  MatR own_;
  const void* view_ = nullptr;
  ops::WType vtype_ = ops::WType::F32;
  size_t ld_ = 0;
  ops::BlockScales scales_;
  int64_t rows_ = 0, cols_ = 0;
  bool copy_ = false;  // own_ holds the values (an owned matrix, or a view's copy-on-write copy)
};

// Same shape and the same values, bit for bit (whatever the storage: a view equals its fp32 copy).
bool operator==(const Weight& a, const Weight& b);

struct ExpertBank {
  int E = 0, I = 0, H = 0;
  std::vector<Weight> gate, up, down;  // per expert: [I, H], [I, H], [H, I]
};

struct AttnWeights {
  Weight wq, wk, wv, wo;   // [Hq·D, H], [Hkv·D, H] ×2, [H, Hq·D]  (MLA: wq [Hq·dq, H] or empty, wo [H, Hq·dv])
  VecF bq, bk, bv, bo;     // empty when absent
  VecF q_norm, k_norm;     // per-head [D] or whole-projection [Hq·D]/[Hkv·D]; empty when absent
  // MLA (dq = qk_nope + qk_rope, dr = qk_rope). Rotary rows (each head's last dr rows of wq / wq_b, the last dr rows
  // of wkv_a) are stored de-interleaved when rope_interleave is set ([x0,x2,…,x1,x3,…]), so rotate-half RoPE
  // applies; q·k is unchanged because q and k are permuted alike (those matrices are owned fp32 copies).
  Weight wq_a, wq_b;       // [q_lora, H], [Hq·dq, q_lora] (q_lora_rank > 0)
  VecF q_a_norm;           // [q_lora]
  Weight wkv_a;            // [kv_lora + dr, H]
  VecF bq_a, bkv_a;        // attention_bias: [q_lora], [kv_lora + dr]; empty when absent
  VecF kv_a_norm;          // [kv_lora]
  Weight wkv_b;            // [Hq·(dn + dv), kv_lora]
};

struct FFNWeights {
  bool moe = false;
  MatR router;             // [E, H] (MoE layers)
  VecF router_bias;        // [E] selection-only bias (DeepSeek-V3 e_score_correction_bias), empty otherwise
  ExpertBank experts;      // routed experts (MoE) or the dense MLP (E = 1)
  bool has_shared = false;
  ExpertBank shared;       // E = 1, I = shared_width: every shared expert side by side (config.shared_slice)
  VecF shared_gate;        // [H] (sigmoid-gated shared expert), empty otherwise
};

struct LayerWeights {
  VecF ln_in, ln_post;     // [H]
  AttnWeights attn;
  FFNWeights ffn;
};

struct Weights {
  Weight embed;            // [V, H]
  Weight lm_head;          // [V, H]; empty when tied (embed is used)
  VecF final_norm;         // [H]
  std::vector<LayerWeights> layers;
  std::shared_ptr<const void> storage;  // what the views point into (the mapped checkpoint); null: all owned
  const Weight& output_matrix() const { return lm_head.empty() ? embed : lm_head; }
};

// The checkpoint's tensors in the canonical structure, as views where the dtype allows; InputError names any missing
// or misshapen tensor.
Weights load_weights(const ModelConfig& cfg, std::shared_ptr<const TensorStore> store);

// Random weights with the given config (benchmarks and tests): uniform entries of standard deviation std,
// norm weights around 1. All owned fp32; with dtype BF16 the matrices are bf16 views of memory the Weights own
// (storage) — the size of a bf16 checkpoint of that config, filled in parallel, one stream per matrix row — and
// norms, biases and routers fp32, as a loaded checkpoint has them.
Weights random_weights(const ModelConfig& cfg, uint64_t seed, float std = 0.02f, ops::WType dtype = ops::WType::F32);

// Calls fw(Weight&) for every matrix, fv(VecF&) for every vector and fm(MatR&) for every router (const or not).
// The same for one layer (LayerWeights, const or not).
template <class Lw, class FW, class FV, class FM>
void for_each_layer_tensor(Lw& L, FW&& fw, FV&& fv, FM&& fm) {
  auto& a = L.attn;
  for (auto* x : {&a.wq, &a.wk, &a.wv, &a.wo, &a.wq_a, &a.wq_b, &a.wkv_a, &a.wkv_b}) fw(*x);
  for (auto* v : {&L.ln_in, &L.ln_post, &a.bq, &a.bk, &a.bv, &a.bo, &a.q_norm, &a.k_norm, &a.q_a_norm, &a.bq_a,
                  &a.bkv_a, &a.kv_a_norm, &L.ffn.router_bias, &L.ffn.shared_gate})
    fv(*v);
  fm(L.ffn.router);
  for (auto* b : {&L.ffn.experts, &L.ffn.shared})
    for (auto* v : {&b->gate, &b->up, &b->down})
      for (auto& x : *v) fw(x);
}
template <class Ws, class FW, class FV, class FM>
void for_each_tensor(Ws& w, FW&& fw, FV&& fv, FM&& fm) {
  fw(w.embed);
  fw(w.lm_head);
  fv(w.final_norm);
  for (auto& L : w.layers) for_each_layer_tensor(L, fw, fv, fm);
}

// The same weights with every matrix rounded to t (bf16 or f16, round to nearest even) and held as views into
// buffers the result owns (benchmarks and tests: a checkpoint-dtype model without a file); vectors stay fp32.
Weights narrowed(const Weights& w, ops::WType t);

// Asks the kernel to read layer l's mapped weights into the page cache now (madvise WILLNEED; returns at once).
void prefetch_layer(const Weights& w, int l);

// The host ranges layer l's ops ask a device backend for (every matrix as Weight::ranges, vectors, the router):
// what Backend::stage keeps resident while the layer runs.
std::vector<Backend::HostRange> layer_ranges(const Weights& w, int l);

// Storage of the weights: bytes read in place from the checkpoint, bytes of owned fp32 copies.
struct WeightBytes {
  size_t mapped = 0, owned = 0;
};
WeightBytes weight_bytes(const Weights& w);

// The SwiGLU of expert e of a bank on rows x [n, H] (rows ldx floats apart): gate‖up gu [n, 2I] (columns 0..I-1 the
// gate, I..2I-1 up) and the key silu(gate) ⊙ up [n, I] (the input of down_proj).
void expert_gate_up(const ExpertBank& b, int e, const float* x, size_t ldx, int n, float* gu);
void expert_key(const ExpertBank& b, int e, const float* x, size_t ldx, int n, float* key);

}  // namespace moedit
