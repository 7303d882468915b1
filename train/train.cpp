// The answer-token loss and a training step (see train/train.h).
#include "train/train.h"

#include <string>

#include "io/errors.h"

namespace moedit {

namespace {

void check_batch(const Model& m, const TrainBatch& batch) {
  require_input(!batch.empty(), "training batch: no examples");
  const int V = m.config().vocab_size;
  for (size_t i = 0; i < batch.size(); ++i) {
    const std::string at = "training example " + std::to_string(i) + ": ";
    require_input(!batch[i].prompt.empty(), at + "empty prompt (the first answer token needs a position before it)");
    require_input(!batch[i].answer.empty(), at + "empty answer");
    for (const auto* ids : {&batch[i].prompt, &batch[i].answer})
      for (int32_t id : *ids)
        require_input(id >= 0 && id < V, at + "token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                                             std::to_string(V) + ")");
  }
}

}  // namespace

template <class T>
double answer_loss(const Model& m, const TrainBatch& batch, WeightGrads<T>* grads) {
  check_batch(m, batch);
  // Each example runs as prompt ‖ answer[:-1] (the last answer token is only a label); row r of the packed batch
  // predicts the token after it, so the answer tokens are predicted by rows P−1 … P+A−2 of their sequence.
  std::vector<std::vector<int32_t>> seqs;
  std::vector<int32_t> flat, targets;
  std::vector<int> rows;
  for (const TrainExample& ex : batch) {
    const int P = int(ex.prompt.size()), A = int(ex.answer.size()), row0 = int(flat.size());
    std::vector<int32_t> s = ex.prompt;
    s.insert(s.end(), ex.answer.begin(), ex.answer.end() - 1);
    flat.insert(flat.end(), s.begin(), s.end());
    seqs.push_back(std::move(s));
    for (int j = 0; j < A; ++j) {
      rows.push_back(row0 + P - 1 + j);
      targets.push_back(ex.answer[size_t(j)]);
    }
  }
  const TokenLayout layout = make_layout(seqs, nullptr);
  grad::TapedStack<T> stack(m, 0);
  stack.forward(m.embed(flat, layout, nullptr).template cast<T>(), layout);
  const MatT<T> logits = stack.logits(rows);  // [R, V]
  const int R = int(rows.size()), V = int(logits.cols());

  // loss = −(1/R) Σ_r log p_r[target_r];  ∂loss/∂logits_r = (p_r − onehot(target_r)) / R.
  double loss = 0;
  MatT<T> dlogits(R, V);
  for (int r = 0; r < R; ++r) {
    grad::log_softmax(logits.row(r).data(), V, dlogits.row(r).data());
    loss -= double(dlogits(r, targets[size_t(r)]));
    dlogits.row(r) = dlogits.row(r).array().exp() / T(R);
    dlogits(r, targets[size_t(r)]) -= T(1) / T(R);
  }
  if (grads) stack.backward_weights(dlogits, *grads);
  return loss / R;
}

double train_step(Model& m, const TrainBatch& batch, const ParamSelection& sel, AdamW& opt) {
  WeightGrads<float> grads(m, sel);
  const double loss = answer_loss(m, batch, &grads);
  opt.step(m, grads);
  return loss;
}

template double answer_loss<float>(const Model&, const TrainBatch&, WeightGrads<float>*);
template double answer_loss<double>(const Model&, const TrainBatch&, WeightGrads<double>*);

}  // namespace moedit
