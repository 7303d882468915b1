// The block backward over the backend's ops (kernels/backend.h), for v* where the weights are: the forward is the
// model's own block (model/block.h) recording a SeamTape — its intermediate rows kept in the model backend's memory —
// and the backward runs every op through the same backend (device memory on a GPU, host memory on the CPU), fp32.
//
// Unlike the taped stack of model/backward.h it keeps neither attention probabilities nor the experts' rows: the
// backend's attention_backward and moe_experts_backward recompute them. The residual stream crosses to the host
// between blocks (as Model::forward's does), so a stack of these blocks holds one layer's rows per layer and nothing
// of the vocabulary but the logits asked for. Routing is held fixed in the backward (the gradient flows through the
// selected experts and their routing weights, not the selection), as in model/backward.h; no weight gradients.
#pragma once
#include <vector>

#include "model/block_ops.h"

namespace moedit::grad {

// What the backward of one block reads, in the model backend's memory (fp32 rows [N, ·]).
struct SeamTape {
  Act<float> x_in, a1;              // block input; input-norm output [N, H]
  Act<float> q_raw, k_raw;          // before q/k-norm (with q/k-norm only)
  Act<float> q_pre, k_pre, v_pre;   // before clipping (with clip_qkv only)
  Act<float> mla_qa, mla_ckv;       // MLA: q_a output [N, q_lora] (q_lora only); kv_a output [N, kv_lora + dr]
  Act<float> q;                     // queries after RoPE [N, Hq·Dk]
  std::vector<Act<float>> kf, vf;   // per segment: keys/values after RoPE, prefix + this call's rows [n_k, ·]
  std::vector<int> seg_begin, seg_end, seg_seq;  // segments = runs of one sequence's rows
  std::vector<int> pos;             // the rows' positions (host)
  Act<float> x_mid, a2;             // residual after attention; FFN input [N, H]
  Act<float> z, z_raw, w;           // router logits as routed [N, E]; before the model's router edit (where it
                                    // edits this layer); routing weights [N, k]
  Buf ids;                          // routed experts [N, k] (int)
  Act<float> s_y, s_gate;           // shared expert's output before its gate [N, H]; the gate σ(a·w_g) [N, 1]

  void clear_segments() {
    kf.clear();
    vf.clear();
    seg_begin.clear();
    seg_end.clear();
    seg_seq.clear();
  }
};

// A PrefixKV's rows in the backend's memory, k[l][s], v[l][s] as its host rows (PrefixKV::dev).
struct DevicePrefix {
  std::vector<std::vector<Act<float>>> k, v;
};

// Block l forward on x [N, H] (host, in place) through the model's backend, recording `tape`; prefix: constant K/V of
// earlier tokens (as in model/backward.h).
void seam_block_forward(const Model& m, int l, MatR& x, const TokenLayout& layout, const PrefixKV<float>* prefix,
                        SeamTape& tape);
// dx [N, H] (host): in = ∂loss/∂(block output), out = ∂loss/∂(block input).
void seam_block_backward(const Model& m, int l, const SeamTape& tape, MatR& dx);

// Layers first..n-1, final norm and lm_head through the model's backend: TapedStack's interface (model/backward.h)
// for the input gradient.
class SeamStack {
 public:
  SeamStack(const Model& m, int first_layer);
  int first_layer() const { return first_; }
  // x: input of layer first_layer [N, H].
  void forward(MatR x, const TokenLayout& layout, const PrefixKV<float>* prefix = nullptr);
  const MatR& hidden() const { return h_; }
  // Final norm + lm_head (+ logits_scaling) of the given rows of hidden() → [rows.size(), V]; remembers the rows.
  MatR logits(const std::vector<int>& rows);
  // ∂loss/∂(stack input) [N, H] from ∂loss/∂logits [rows.size(), V] of the last logits() call.
  MatR backward(const MatR& dlogits) const;
  // K/V of every layer and sequence of the last forward (prefix + its tokens), on the host and (dev) in the
  // backend's memory.
  PrefixKV<float> kv() const;

 private:
  const Model& m_;
  int first_;
  std::vector<SeamTape> tapes_;
  MatR h_;
  std::vector<int> rows_;
  Act<float> xr_;  // the rows of the last logits() call, before the final norm [R, H]
};

}  // namespace moedit::grad
