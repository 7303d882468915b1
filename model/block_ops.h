// The ops of a block run, shared by the block forward (model/block.cpp) and the backward over the backend's ops
// (model/seam_backward.cpp): activations in the model backend's memory, fp32 through the backend, double through
// the reference gradient ops (kernels/grad_ops.h). Internal to model/.
#pragma once
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "model/backward.h"

namespace moedit {

// An activation [rows, cols], row-major: fp32 rows live in the model backend's memory (a Buf from its pool, so a
// forward asks the same sizes every layer and allocates nothing in steady state), double rows (taped runs, the
// finite-difference tests) in host memory. view() wraps memory the caller owns (the residual stream).
template <class T>
struct Act {
  Buf buf;
  T* p = nullptr;
  int rows = 0, cols = 0;
  T* data() const { return p; }
  T* row(int r) const { return p + size_t(r) * size_t(cols); }
  size_t size() const { return size_t(rows) * size_t(cols); }
  static Act view(T* p, int rows, int cols) { return {Buf(), p, rows, cols}; }
};

// The ops of a block run: fp32 through the model's backend; double through the reference ops of model/backward.h.
template <class T>
struct Ops {
  const Model& m;
  const Backend& be;
  static constexpr bool f32 = std::is_same_v<T, float>;

  // Where activations live: the backend's memory (fp32), the host (double).
  const Backend& mem() const {
    if constexpr (f32) return be;
    else return cpu_backend();
  }
  Act<T> act(int rows, int cols) const {
    Buf b(mem(), sizeof(T) * size_t(rows) * size_t(cols));
    T* p = b.template as<T>();
    return {std::move(b), p, rows, cols};
  }
  // A host copy of an activation (the tape, hooks on a device).
  MatT<T> host(const Act<T>& a) const {
    MatT<T> h(a.rows, a.cols);
    mem().to_host(h.data(), a.data(), sizeof(T) * a.size());
    return h;
  }
  // A copy of an activation in the same memory.
  Act<T> copy(const Act<T>& a) const {
    Act<T> c = act(a.rows, a.cols);
    copy2d(a.data(), size_t(a.cols), c.data(), size_t(a.cols), a.rows, a.cols);
    return c;
  }
  // Host data that does not change between calls (norms, biases, routers), in the backend's memory.
  const float* on(const float* host, size_t n) const { return static_cast<const float*>(be.resident(host, 4 * n)); }
  const float* on(const VecF& v) const { return v.size() ? on(v.data(), size_t(v.size())) : nullptr; }

  // y [n, W.rows()] = x [n, in]·Wᵀ (+ b)
  void linear(const T* x, int n, int in, const Weight& W, T* y, const VecF& b = VecF()) const {
    if constexpr (f32)
      be.linear(x, size_t(in), n, in, W.on(be), int(W.rows()), y, size_t(W.rows()), on(b));
    else
      grad::linear(x, n, in, W, y, b.size() ? b.data() : nullptr);
  }
  // y [n, out] = x [n, in]·Wᵀ for a small fp32 matrix W [out, in] (router, shared-expert gate)
  void linear(const T* x, int n, int in, const float* W, int out, T* y) const {
    if constexpr (f32)
      be.linear(x, size_t(in), n, in, ops::WeightView(on(W, size_t(out) * in), size_t(in)), out, y, size_t(out));
    else
      grad::linear(x, n, in, W, out, y);
  }
  void rmsnorm(const T* x, const VecF& w, T* y, int rows, int dim, float eps) const {
    if constexpr (f32)
      be.rmsnorm(x, on(w), y, rows, dim, eps);
    else
      grad::rmsnorm(x, w.data(), y, rows, dim, eps);
  }
  // pos: the rows' positions in the activations' memory (staged by the block).
  void rope(T* x, int rows, int row_stride, int heads, int head_stride, int rot, const int* pos) const {
    const ModelConfig& c = m.config();
    const std::vector<float>& f = m.inv_freq();
    if constexpr (f32)
      be.rope(x, rows, row_stride, heads, head_stride, rot, pos, on(f.data(), f.size()), c.rope_attn_factor);
    else
      grad::rope(x, rows, row_stride, heads, head_stride, rot, pos, f.data(), false, c.rope_attn_factor);
  }
  void silu_mul(const T* gu, int rows, int I, T* key) const {
    if constexpr (f32)
      be.silu_mul(gu, rows, I, key);
    else
      grad::swiglu(gu, rows, I, key);
  }
  void route(const T* z, int N, const VecF& bias, int* ids, T* w) const {
    const ops::RouteSpec& spec = m.route_spec();
    if constexpr (f32) {
      be.route(z, N, spec, on(bias), ids, w);
    } else {
      const float* b = bias.size() ? bias.data() : nullptr;
      for (int t = 0; t < N; ++t) ops::route_row(spec, z + size_t(t) * spec.E, b, ids + size_t(t) * spec.k, w + size_t(t) * spec.k);
    }
  }
  // Elementwise ops (kernels/backend.h); double runs on the host.
  void copy2d(const T* x, size_t ldx, T* y, size_t ldy, int rows, int cols) const {
    if constexpr (f32)
      be.copy2d(x, ldx, y, ldy, rows, cols);
    else
      for (int r = 0; r < rows; ++r) std::copy_n(x + size_t(r) * ldx, cols, y + size_t(r) * ldy);
  }
  void add(const Act<T>& y, const Act<T>& x) const {
    if constexpr (f32)
      be.add(y.data(), x.data(), y.size());
    else
      for (size_t i = 0; i < y.size(); ++i) y.p[i] += x.p[i];
  }
  void scale(const Act<T>& x, T s) const {
    if constexpr (f32)
      be.scale(x.data(), x.size(), s);
    else
      for (size_t i = 0; i < x.size(); ++i) x.p[i] *= s;
  }
  void clamp(const Act<T>& x, T c) const {
    if constexpr (f32)
      be.clamp(x.data(), x.size(), c);
    else
      for (size_t i = 0; i < x.size(); ++i) x.p[i] = std::min(std::max(x.p[i], -c), c);
  }
  // g ← sigmoid(g) [rows]; y[r, :] *= g[r]
  void sigmoid_gate(const Act<T>& y, const Act<T>& g) const {
    if constexpr (f32) {
      be.sigmoid(g.data(), g.size());
      be.scale_rows(y.data(), y.rows, y.cols, g.data());
    } else {
      for (int r = 0; r < y.rows; ++r) {
        g.p[r] = T(1) / (T(1) + std::exp(-g.p[r]));
        for (int c = 0; c < y.cols; ++c) y.p[size_t(r) * y.cols + c] *= g.p[r];
      }
    }
  }
  // Expert e of a bank on rows x [n, H]: gate‖up [n, 2I] and key [n, I].
  void gate_up_key(const ExpertBank& b, int e, const T* x, int n, Act<T>& gu, Act<T>& key) const {
    gu = act(n, 2 * b.I);
    key = act(n, b.I);
    if constexpr (f32) {
      be.linear(x, size_t(b.H), n, b.H, b.gate[size_t(e)].on(be), b.I, gu.data(), 2 * size_t(b.I));
      be.linear(x, size_t(b.H), n, b.H, b.up[size_t(e)].on(be), b.I, gu.data() + b.I, 2 * size_t(b.I));
    } else {
      MatT<T> g(n, b.I), u(n, b.I);
      grad::linear(x, n, b.H, b.gate[size_t(e)], g.data());
      grad::linear(x, n, b.H, b.up[size_t(e)], u.data());
      Eigen::Map<MatT<T>>(gu.data(), n, 2 * b.I) << g, u;
    }
    silu_mul(gu.data(), n, b.I, key.data());
  }
};

}  // namespace moedit
