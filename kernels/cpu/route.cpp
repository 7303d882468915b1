// Routing rows (kernels/route.h): every router kind as RouteSpec describes it, and its backward.
#include "kernels/route.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

namespace moedit::ops {

template <class T>
void softmax_row(T* x, int n) {
  T m = -std::numeric_limits<T>::infinity();
  for (int i = 0; i < n; ++i) m = std::max(m, x[i]);
  if (m == -std::numeric_limits<T>::infinity()) {  // everything masked: keep zeros
    std::fill(x, x + n, T(0));
    return;
  }
  T s = 0;
  for (int i = 0; i < n; ++i) s += (x[i] = std::exp(x[i] - m));
  const T inv = T(1) / s;
  for (int i = 0; i < n; ++i) x[i] *= inv;
}

template <class T>
void softmax_row_backward(const T* p, const T* dp, int n, T* dz) {
  T s = 0;
  for (int i = 0; i < n; ++i) s += p[i] * dp[i];
  for (int i = 0; i < n; ++i) dz[i] = p[i] * (dp[i] - s);
}

namespace {

template <class T>
T sigmoid_t(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// Selection scores with group-limited routing applied: experts outside the topk_group best groups get 0
// (MaxScore) or −inf (TopTwoSum).
template <class T>
void limit_groups(const RouteSpec& s, T* x) {
  if (s.groups == RouteSpec::Groups::None) return;
  const int G = s.n_group, per = s.E / G;
  std::vector<T> gs(static_cast<size_t>(G));
  for (int g = 0; g < G; ++g) {
    const T* v = x + size_t(g) * per;
    if (s.groups == RouteSpec::Groups::MaxScore) {
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
  std::partial_sort(order.begin(), order.begin() + s.topk_group, order.end(), [&](int a, int b) {
    return gs[size_t(a)] > gs[size_t(b)] || (gs[size_t(a)] == gs[size_t(b)] && a < b);
  });
  std::vector<bool> keep(static_cast<size_t>(G), false);
  for (int i = 0; i < s.topk_group; ++i) keep[size_t(order[size_t(i)])] = true;
  const T masked = s.groups == RouteSpec::Groups::MaxScore ? T(0) : -std::numeric_limits<T>::infinity();
  for (int g = 0; g < G; ++g)
    if (!keep[size_t(g)]) std::fill(x + size_t(g) * per, x + size_t(g + 1) * per, masked);
}

// The k largest of x[E] in descending order, ties to the lower index.
template <class T>
void select_topk(const T* x, int E, int k, int* ids) {
  std::vector<int> order(static_cast<size_t>(E));
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + k, order.end(),
                    [x](int a, int b) { return x[a] > x[b] || (x[a] == x[b] && a < b); });
  std::copy(order.begin(), order.begin() + k, ids);
}

// The scores p [E] the weights are read from (softmax or sigmoid of z).
template <class T>
void scores(const RouteSpec& s, const T* z, T* p) {
  std::copy(z, z + s.E, p);
  if (s.score == RouteSpec::Score::Softmax) softmax_row(p, s.E);
  else
    for (int e = 0; e < s.E; ++e) p[e] = sigmoid_t(p[e]);
}

}  // namespace

template <class T>
void route_row(const RouteSpec& s, const T* z, const float* bias, int* ids, T* w) {
  const int E = s.E, k = s.k;
  if (s.score == RouteSpec::Score::TopKThenSoftmax) {
    select_topk(z, E, k, ids);
    for (int j = 0; j < k; ++j) w[j] = z[ids[j]];
    softmax_row(w, k);
  } else {
    std::vector<T> p(static_cast<size_t>(E));
    scores(s, z, p.data());
    std::vector<T> sel(p);
    if (bias)
      for (int e = 0; e < E; ++e) sel[size_t(e)] += T(bias[e]);
    limit_groups(s, sel.data());
    select_topk(sel.data(), E, k, ids);
    for (int j = 0; j < k; ++j) w[j] = p[size_t(ids[j])];
    if (s.renorm) {
      T sum = 0;
      for (int j = 0; j < k; ++j) sum += w[j];
      sum += T(s.renorm_eps);
      for (int j = 0; j < k; ++j) w[j] /= sum;
    }
  }
  if (s.scale)
    for (int j = 0; j < k; ++j) w[j] *= T(s.scaling);
}

template <class T>
void route_row_backward(const RouteSpec& s, const T* z, const int* ids, const T* dw_in, T* dz) {
  const int E = s.E, k = s.k;
  std::vector<T> dw(dw_in, dw_in + k);
  if (s.scale)
    for (auto& d : dw) d *= T(s.scaling);
  std::fill(dz, dz + E, T(0));
  if (s.score == RouteSpec::Score::TopKThenSoftmax) {
    std::vector<T> sm(static_cast<size_t>(k)), dsel(static_cast<size_t>(k));
    for (int j = 0; j < k; ++j) sm[size_t(j)] = z[ids[j]];
    softmax_row(sm.data(), k);
    softmax_row_backward(sm.data(), dw.data(), k, dsel.data());
    for (int j = 0; j < k; ++j) dz[ids[j]] = dsel[size_t(j)];
    return;
  }
  std::vector<T> p(static_cast<size_t>(E)), dp(static_cast<size_t>(E), T(0));
  scores(s, z, p.data());
  if (s.renorm) {  // w_j = p_j / S, S = Σ_sel p + eps:  dp_i = dw_i/S − (Σ_j dw_j p_j)/S²
    T S = T(s.renorm_eps), dot = 0;
    for (int j = 0; j < k; ++j) {
      S += p[size_t(ids[j])];
      dot += dw[size_t(j)] * p[size_t(ids[j])];
    }
    for (int j = 0; j < k; ++j) dp[size_t(ids[j])] = dw[size_t(j)] / S - dot / (S * S);
  } else {
    for (int j = 0; j < k; ++j) dp[size_t(ids[j])] = dw[size_t(j)];
  }
  if (s.score == RouteSpec::Score::Softmax) {
    softmax_row_backward(p.data(), dp.data(), E, dz);
  } else {
    for (int e = 0; e < E; ++e) dz[e] = dp[size_t(e)] * p[size_t(e)] * (T(1) - p[size_t(e)]);
  }
}

#define MOEDIT_ROUTE_INSTANTIATE(T)                                                      \
  template void softmax_row<T>(T*, int);                                                 \
  template void softmax_row_backward<T>(const T*, const T*, int, T*);                    \
  template void route_row<T>(const RouteSpec&, const T*, const float*, int*, T*);        \
  template void route_row_backward<T>(const RouteSpec&, const T*, const int*, const T*, T*);

MOEDIT_ROUTE_INSTANTIATE(float)
MOEDIT_ROUTE_INSTANTIATE(double)

}  // namespace moedit::ops
