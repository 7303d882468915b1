// Routing as a kernel: router logits z [E] of one token → the top-k experts and their weights, for every router kind
// the architecture table uses, described as data (RouteSpec) so the kernels need no model config; and the backward
// with the selection held fixed. Backend::route runs it over a batch; the taped blocks use the row functions (in
// double for the finite-difference tests).
#pragma once
#include <cstdint>

namespace moedit::ops {

struct RouteSpec {
  enum class Score : uint8_t {
    Softmax,         // p = softmax(z) (fp32); select the top-k of p (+ bias); weights p
    Sigmoid,         // p = sigmoid(z); select the top-k of p (+ bias), group-limited; weights p (DeepSeek-V3)
    TopKThenSoftmax  // select the top-k of z; weights = softmax over the k selected logits (GraniteMoE)
  };
  // Group-limited selection (DeepSeek): experts form n_group equal groups; only the topk_group best groups compete.
  enum class Groups : uint8_t {
    None,
    MaxScore,   // group score = max selection score in the group; other groups' scores set to 0 (V2)
    TopTwoSum,  // group score = sum of the two largest selection scores; others set to −inf (V3 noaux_tc)
  };
  Score score = Score::Softmax;
  int E = 0, k = 0;
  Groups groups = Groups::None;
  int n_group = 1, topk_group = 1;
  bool renorm = false;   // weights /= (Σ selected + renorm_eps) (not for TopKThenSoftmax, already normalised)
  double renorm_eps = 0;  // DeepSeek adds 1e-20
  bool scale = false;    // weights *= scaling
  float scaling = 1.f;
};

// One token: ids[k] in top-k order (descending selection score; ties: lower index first) and weights w[k]. bias [E]
// (or null): a selection-only bias (DeepSeek-V3's e_score_correction_bias).
template <class T>
void route_row(const RouteSpec& s, const T* z, const float* bias, int* ids, T* w);
// Backward with the selection fixed: dz[E] (=) from dw[k].
template <class T>
void route_row_backward(const RouteSpec& s, const T* z, const int* ids, const T* dw, T* dz);

// Softmax of n entries in place (ops::softmax_inplace's sequence; entries equal to −inf get probability 0) and its
// backward dz = p ⊙ (dp − Σ p·dp), in float or double.
template <class T>
void softmax_row(T* x, int n);
template <class T>
void softmax_row_backward(const T* p, const T* dp, int n, T* dz);

}  // namespace moedit::ops
