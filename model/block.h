// The one block forward: attention and the FFN/MoE block of every family, run by Model::forward (fp32, through the
// model's backend, with hooks and a KV cache) and by the taped stack of model/backward.h (fp32 or, for the
// finite-difference tests, double), which records what its backward reads. There is no second copy of the block.
//
// With a tape, two ops are taped variants of the backend's: attention keeps its probabilities, and the routed
// experts keep every expert's gate‖up, key and unweighted output. Everything else — norms, projections, q/k-norm,
// clipping, RoPE, MLA, routing, the shared expert and its gate, residual scaling — is the same code on both paths.
#pragma once
#include "model/backward.h"

namespace moedit {

namespace grad {
struct SeamTape;  // model/seam_backward.h
}

// What a block run reads and writes besides the residual stream.
template <class T>
struct BlockIO {
  KVCache* cache = nullptr;                    // continue cached sequences (and append to them)
  const grad::PrefixKV<T>* prefix = nullptr;   // or: constant prefix K/V (taped runs)
  const Hooks* hooks = nullptr;                // fp32 runs only
  LayerRouting* routing = nullptr;             // record the router's choices
  grad::BlockTape<T>* tape = nullptr;          // record for the backward (host memory)
  grad::SeamTape* seam = nullptr;              // or: record for the backward over the backend's ops (fp32, the
                                               // model backend's memory)
};

// Block l on x [N, H] in place.
template <class T>
void run_block(const Model& m, int l, MatT<T>& x, const TokenLayout& layout, const BlockIO<T>& io);
// The FFN/MoE block of layer l alone on its input a [N, H] (the post-attention norm's output) → [N, H].
template <class T>
MatT<T> run_ffn(const Model& m, int l, const MatT<T>& a, const TokenLayout& layout, const BlockIO<T>& io);

}  // namespace moedit
