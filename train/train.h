// Training selected parameters of a model: router tuning (the routers) and expert fine-tuning (chosen experts'
// gate/up/down), on a batch of prompt ‖ answer examples.
//
//   ParamSelection sel = ParamSelection::all_routers(model);      // or sel.experts = {{layer, expert}, ...}
//   AdamW opt({.lr = 1e-4, .weight_decay = 0.0});                 // train/adamw.h
//   for (...) double loss = train_step(model, batch, sel, opt);   // forward + backward + update
//
// The loss is causal-LM cross-entropy on the answer tokens only: for every answer token, −log softmax(logits at the
// previous position)[token], summed over the batch and divided by the number of answer tokens in the batch — what
// Hugging Face's CausalLM loss computes with labels = −100 on the prompt tokens. Sequences of different lengths run
// as one packed batch (no padding). There is no router load-balancing (auxiliary) loss: HF adds one only when
// output_router_logits is set, and a few steps of tuning on a handful of facts do not need it.
//
// The gradient runs through every layer from the embeddings (model/backward.h's taped stack from layer 0; its
// backward stops at the lowest layer holding a selected parameter), routing held fixed as PyTorch's autograd holds
// top-k. Updates are written through copy-on-write: only the selected tensors change (an expert matrix becomes an
// owned fp32 copy), every other tensor stays the checkpoint's bytes.
#pragma once
#include <cstdint>
#include <vector>

#include "model/weight_grads.h"
#include "train/adamw.h"

namespace moedit {

// One example: the model reads prompt ‖ answer and is scored on the answer's tokens (both non-empty).
struct TrainExample {
  std::vector<int32_t> prompt, answer;
};
using TrainBatch = std::vector<TrainExample>;

// The batch's answer-token cross-entropy (mean over its answer tokens). With grads, adds ∂loss/∂(selected
// parameters) to it. T = float in production, double for finite-difference checks. InputError for an empty batch,
// prompt or answer, or a token outside the vocabulary.
template <class T>
double answer_loss(const Model& m, const TrainBatch& batch, WeightGrads<T>* grads = nullptr);

// One optimiser step on the selected parameters: the loss and its gradients (float), then opt.step. Returns the loss
// before the update.
double train_step(Model& m, const TrainBatch& batch, const ParamSelection& sel, AdamW& opt);

}  // namespace moedit
