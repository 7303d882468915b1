// Routing: every router kind of the architecture table, for one token, and its backward (see model/router.h).
#include "model/router.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "model/backward.h"

namespace moedit::grad {

WeightMode weight_mode(const ModelConfig& c) {
  const bool replaces = c.arch->norm_replaces_scaling;
  const bool norm = c.norm_topk_prob && !(replaces && c.top_k == 1);
  return {norm, !(norm && replaces) && c.routed_scaling != 1.f, c.arch->deepseek_router ? 1e-20 : 0.0};
}

namespace {

template <class T>
T sigmoid_t(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// Selection scores with group-limited routing applied: experts outside the topk_group best groups get 0
// (MaxScore: group score = max) or −inf (TopTwoSum: group score = sum of the two largest).
template <class T>
void limit_groups(const ModelConfig& c, T* x) {
  if (c.group_limit == GroupLimit::None) return;
  const int G = c.n_group, per = c.n_experts / G;
  std::vector<T> gs(static_cast<size_t>(G));
  for (int g = 0; g < G; ++g) {
    const T* v = x + size_t(g) * per;
    if (c.group_limit == GroupLimit::MaxScore) {
      gs[size_t(g)] = *std::max_element(v, v + per);
    } else {
      T a = -std::numeric_limits<T>::infinity(), b = a;  // two largest
      for (int i = 0; i < per; ++i)
        if (v[i] > a) {
          b = a;
          a = v[i];
        } else if (v[i] > b) {
          b = v[i];
        }
      gs[size_t(g)] = a + b;
    }
  }
  std::vector<int> order(static_cast<size_t>(G));
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + c.topk_group, order.end(), [&](int a, int b) {
    return gs[size_t(a)] > gs[size_t(b)] || (gs[size_t(a)] == gs[size_t(b)] && a < b);
  });
  std::vector<bool> keep(static_cast<size_t>(G), false);
  for (int i = 0; i < c.topk_group; ++i) keep[size_t(order[size_t(i)])] = true;
  const T masked = c.group_limit == GroupLimit::MaxScore ? T(0) : -std::numeric_limits<T>::infinity();
  for (int g = 0; g < G; ++g)
    if (!keep[size_t(g)]) std::fill(x + size_t(g) * per, x + size_t(g + 1) * per, masked);
}

}  // namespace

template <class T>
void route(const ModelConfig& c, const T* z, int* ids, T* w, const float* bias) {
  const int E = c.n_experts, k = c.top_k;
  std::vector<T> p(z, z + E);
  auto topk = [&](const T* x) {
    std::vector<int> order(static_cast<size_t>(E));
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(),
                      [x](int a, int b) { return x[a] > x[b] || (x[a] == x[b] && a < b); });
    std::copy(order.begin(), order.begin() + k, ids);
  };
  if (c.router == RouterKind::TopKSoftmax) {
    topk(p.data());
    for (int j = 0; j < k; ++j) w[j] = p[size_t(ids[j])];
    softmax(w, k);
  } else {
    // scores p (softmax or sigmoid); selection on p (+ bias), group-limited; weights from p
    if (c.router == RouterKind::SoftmaxTopK) softmax(p.data(), E);
    else
      for (auto& v : p) v = sigmoid_t(v);
    std::vector<T> sel(p);
    if (bias)
      for (int e = 0; e < E; ++e) sel[size_t(e)] += T(bias[e]);
    limit_groups(c, sel.data());
    topk(sel.data());
    for (int j = 0; j < k; ++j) w[j] = p[size_t(ids[j])];
  }
  const WeightMode mode = weight_mode(c);
  if (mode.norm && c.router != RouterKind::TopKSoftmax) {
    T sum = 0;
    for (int j = 0; j < k; ++j) sum += w[j];
    sum += T(mode.eps);
    for (int j = 0; j < k; ++j) w[j] /= sum;
  }
  if (mode.scale)
    for (int j = 0; j < k; ++j) w[j] *= T(c.routed_scaling);
}

template <class T>
void route_backward(const ModelConfig& c, const T* z, const int* ids, const T* dw_in, T* dz) {
  const int E = c.n_experts, k = c.top_k;
  const WeightMode mode = weight_mode(c);
  std::vector<T> dw(dw_in, dw_in + k);
  if (mode.scale)
    for (auto& d : dw) d *= T(c.routed_scaling);
  std::fill(dz, dz + E, T(0));
  if (c.router == RouterKind::TopKSoftmax) {
    std::vector<T> sm(static_cast<size_t>(k)), dsel(static_cast<size_t>(k));
    for (int j = 0; j < k; ++j) sm[size_t(j)] = z[ids[j]];
    softmax(sm.data(), k);
    softmax_backward(sm.data(), dw.data(), k, dsel.data());
    for (int j = 0; j < k; ++j) dz[ids[j]] = dsel[size_t(j)];
    return;
  }
  std::vector<T> p(z, z + E), dp(static_cast<size_t>(E), T(0));
  if (c.router == RouterKind::SoftmaxTopK) softmax(p.data(), E);
  else
    for (auto& v : p) v = sigmoid_t(v);
  if (mode.norm) {  // w_j = p_j / S, S = Σ_sel p + eps:  dp_i = dw_i/S − (Σ_j dw_j p_j)/S²
    T S = T(mode.eps), dot = 0;
    for (int j = 0; j < k; ++j) {
      S += p[size_t(ids[j])];
      dot += dw[size_t(j)] * p[size_t(ids[j])];
    }
    for (int j = 0; j < k; ++j) dp[size_t(ids[j])] = dw[size_t(j)] / S - dot / (S * S);
  } else {
    for (int j = 0; j < k; ++j) dp[size_t(ids[j])] = dw[size_t(j)];
  }
  if (c.router == RouterKind::SoftmaxTopK) {
    softmax_backward(p.data(), dp.data(), E, dz);
  } else {
    for (int e = 0; e < E; ++e) dz[e] = dp[size_t(e)] * p[size_t(e)] * (T(1) - p[size_t(e)]);
  }
}

#define MOEDIT_ROUTER_INSTANTIATE(T)                                                    \
  template void route<T>(const ModelConfig&, const T*, int*, T*, const float*);         \
  template void route_backward<T>(const ModelConfig&, const T*, const int*, const T*, T*);

MOEDIT_ROUTER_INSTANTIATE(float)
MOEDIT_ROUTER_INSTANTIATE(double)

}  // namespace moedit::grad
