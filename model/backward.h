// Gradients through the blocks of a Model with its weights frozen: the backward pass of every op the forward
// uses, and a taped forward/backward over a stack of blocks (layers first..n-1, final norm, lm_head).
//
// What it is for: ROME's v* needs ∂loss/∂δ where δ is added to the MoE output of layer L and the loss is read
// from the logits; TapedStack runs layers L+1.. with a tape and returns ∂loss/∂(input of layer L+1). Later
// features (router tuning, expert fine-tuning) need weight gradients: block_backward and TapedStack::backward take
// an optional WeightGrads (model/weight_grads.h) and add ∂loss/∂(router, shared gate, expert gate/up/down) of the
// selected parameters to it, from what the tape keeps (a2, per-expert gate‖up outputs, keys, routing). Without one
// they compute exactly what they computed before (the input gradient only).
//
// Everything is templated on the scalar: float in production, double in tests (finite-difference checks at 1e-4
// relative). The taped forward is the model's own block (model/block.h) run with a tape: in fp32 it computes what
// Model::forward computes except where the tape needs more than the backend op gives (attention keeps its
// probabilities, the routed experts their unweighted outputs: those two differ by fp32 reassociation). Weights stay
// in the model's storage dtype; they are widened on use (to fp32, and to double in double mode). Routing is
// recomputed in the forward and held fixed in the backward (the gradient flows through the selected experts'
// weights, not the selection).
#pragma once
#include <algorithm>
#include <memory>
#include <vector>

#include "kernels/grad_ops.h"
#include "model/model.h"
#include "model/router.h"

namespace moedit {

using IdxMat = Eigen::Matrix<int, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

template <class T>
class WeightGrads;

namespace grad {

// ---- op level: kernels/grad_ops.h; here the same Linear on a model weight in its storage dtype --------------

// Y = X·Wᵀ and dX (+)= dY·W for a model weight (out = W.rows()); bf16/f16/FP8 weights are widened on use (exact).
template <class T>
void linear(const T* X, int n, int in, const Weight& W, T* Y, const float* b = nullptr);
template <class T>
void linear_backward(const T* dY, int n, int in, const Weight& W, T* dX, bool accumulate);

// ---- block level ------------------------------------------------------------------------------------------------

// K/V (after norms, clipping and RoPE) of constant prefix tokens: k[l][s], v[l][s] = rows [n_prefix_s, Hkv·D] for
// layer l and sequence (batch row) s. A forward over the remaining tokens of each sequence attends to them as a
// KV cache would, and the backward treats them as constants.
struct DevicePrefix;  // the same rows in a backend's memory (model/seam_backward.h)
template <class T>
struct PrefixKV {
  std::vector<std::vector<MatT<T>>> k, v;  // indexed [layer][seq]; layers below the stack's first are empty
  // fp32 prefixes of a SeamStack: k and v already in the backend's memory, read from there instead of uploaded by
  // every forward (null: upload k, v).
  std::shared_ptr<const DevicePrefix> dev;
  int n_prefix(int l, int s) const;
};

// The K/V of a stack's last forward as a prefix: tapes[l − first] of layers first..n_layers−1 (BlockTape, or
// SeamTape of model/seam_backward.h) hold per segment its sequence (seg_seq) and K/V rows (kf, vf); host(rows) gives
// their host copy.
template <class T, class Tape, class Host>
PrefixKV<T> prefix_of(int n_layers, int first, const std::vector<Tape>& tapes, Host host) {
  PrefixKV<T> p;
  p.k.assign(size_t(n_layers), {});
  p.v.assign(size_t(n_layers), {});
  for (int l = first; l < n_layers; ++l) {
    const Tape& tp = tapes[size_t(l - first)];
    int n_seqs = 0;
    for (int s : tp.seg_seq) n_seqs = std::max(n_seqs, s + 1);
    p.k[size_t(l)].assign(size_t(n_seqs), {});
    p.v[size_t(l)].assign(size_t(n_seqs), {});
    for (size_t g = 0; g < tp.seg_seq.size(); ++g) {
      p.k[size_t(l)][size_t(tp.seg_seq[g])] = host(tp.kf[g]);
      p.v[size_t(l)][size_t(tp.seg_seq[g])] = host(tp.vf[g]);
    }
  }
  return p;
}

// Everything a block's backward reads (and a weight gradient would).
template <class T>
struct BlockTape {
  MatT<T> x_in, a1;                  // block input, input-norm output [N, H]
  MatT<T> q_raw, k_raw;              // projections before q/k-norm (kept only with q/k-norm)
  MatT<T> q_pre, k_pre, v_pre;       // after q/k-norm, before clipping (kept only with clip_qkv)
  MatT<T> mla_qa, mla_ckv;           // MLA: q_a output before its norm [N, q_lora] (q_lora only); kv_a output
                                     // [N, kv_lora + dr] (latent before its norm ‖ the shared k_pe before RoPE)
  MatT<T> q;                         // queries after RoPE [N, Hq·D] (MLA: [N, Hq·dq])
  std::vector<MatT<T>> kf, vf;       // per segment: keys/values after RoPE, prefix + active [n_k, Hkv·D]
  std::vector<MatT<T>> probs;        // per segment: [Hq·n_q, n_k]
  std::vector<int> seg_begin, seg_end, seg_seq;  // segments = runs of one sequence's rows
  MatT<T> o;                         // attention output before o_proj [N, Hq·D]
  MatT<T> x_mid, a2;                 // residual after attention; FFN input (post-attention norm) [N, H]
  // FFN: dense layers use expert slot 0 with every token.
  MatT<T> z;                         // router logits [N, E], as the router used them
  MatT<T> z_raw;                     // before the model's router edit [N, E] (kept only where it edits layer l)
  IdxMat ids;                        // [N, k]
  MatT<T> w;                         // routing weights [N, k]
  std::vector<std::vector<int>> tok, slot;  // per expert: tokens routed to it (ascending) and their top-k slot
  std::vector<MatT<T>> gu, key, y;   // per expert: gate‖up output [n_e, 2I], key [n_e, I], unweighted output [n_e, H]
  MatT<T> s_gu, s_key, s_y;          // shared expert, all tokens
  VecT<T> s_logit;                   // shared-expert gate logits [N] (sigmoid-gated only)
};

// The backward of the attention projections (the forward is model/block.cpp, recording q_raw/k_raw, q_pre/k_pre/
// v_pre, mla_qa/mla_ckv as needed): takes ∂/∂q, k, v after RoPE (dq, and for standard attention dk/dv, modified in
// place) and adds ∂/∂a1 to da1. pos: the rows' positions.
template <class T>
void qkv_backward(const Model& m, int l, const BlockTape<T>& tape, const int* pos, MatT<T>& dq, MatT<T>& dk,
                  MatT<T>& dv, MatT<T>& da1);
template <class T>
void mla_backward(const Model& m, int l, const BlockTape<T>& tape, const int* pos, MatT<T>& dq, const MatT<T>& dk,
                  const MatT<T>& dv, MatT<T>& da1);

// One block forward on rows x [N, H] (in place) whose seq/pos are given by `layout` (a sequence's rows are
// contiguous with consecutive positions; with a prefix, its first position equals the prefix length): the model's
// own block code (model/block.h) with a tape.
template <class T>
void block_forward(const Model& m, int l, MatT<T>& x, const TokenLayout& layout, const PrefixKV<T>* prefix,
                   BlockTape<T>& tape);
// dx: in = ∂loss/∂(block output), out = ∂loss/∂(block input). grads: adds ∂loss/∂(layer l's selected
// parameters).
template <class T>
void block_backward(const Model& m, int l, const BlockTape<T>& tape, MatT<T>& dx, WeightGrads<T>* grads = nullptr);

// Layers first..n-1, final norm and lm_head, with tapes.
template <class T>
class TapedStack {
 public:
  TapedStack(const Model& m, int first_layer);
  int first_layer() const { return first_; }

  // x: input of layer first_layer [N, H].
  void forward(MatT<T> x, const TokenLayout& layout, const PrefixKV<T>* prefix = nullptr);
  const MatT<T>& hidden() const { return h_; }  // residual stream after the last layer [N, H]
  // Final norm + lm_head (+ logits_scaling) on the given rows of hidden() → [rows.size(), V]; remembers the rows.
  MatT<T> logits(const std::vector<int>& rows);
  // ∂loss/∂(stack input) [N, H] given ∂loss/∂logits [rows.size(), V] for the rows of the last logits() call;
  // grads (parameters of layers ≥ first_layer only): adds ∂loss/∂(selected parameters) as well.
  MatT<T> backward(const MatT<T>& dlogits, WeightGrads<T>* grads = nullptr) const;
  // Only the weight gradients: the backward stops at the lowest layer with a selected parameter.
  void backward_weights(const MatT<T>& dlogits, WeightGrads<T>& grads) const;
  // K/V of every layer and sequence of the last forward (prefix + this forward's tokens): a prefix for a later
  // forward that continues these sequences.
  PrefixKV<T> kv() const;

 private:
  const Model& m_;
  int first_;
  // The backward through layers n-1..stop (dx of layer stop's input).
  MatT<T> backward_to(const MatT<T>& dlogits, WeightGrads<T>* grads, int stop) const;

  std::vector<BlockTape<T>> tapes_;
  MatT<T> h_;
  std::vector<int> rows_;
  MatT<T> hn_;  // final-normed rows
};

}  // namespace grad
}  // namespace moedit
