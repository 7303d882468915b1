// The CPU backend: ops from kernels/cpu/ops.cpp and route.cpp, and the MoE expert step over a whole batch.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>
#include <vector>

#include "kernels/backend.h"
#include "kernels/grad_ops.h"

namespace moedit {

void Workspace::Free::operator()(float* p) const { ::operator delete[](p, std::align_val_t(64)); }

void Workspace::reset() {
  used_ = 0;
  old_.clear();
}

float* Workspace::take(size_t n) {
  n = (n + 15) / 16 * 16;  // keep every piece 64-byte aligned
  if (used_ + n > capacity_) {
    // Earlier pieces stay valid: the outgrown block lives until reset().
    if (block_) old_.push_back(std::move(block_));
    capacity_ = std::max(2 * capacity_, used_ + n);
    block_.reset(static_cast<float*>(::operator new[](sizeof(float) * capacity_, std::align_val_t(64))));
    used_ = 0;
  }
  float* p = block_.get() + used_;
  used_ += n;
  return p;
}

namespace {

class CpuBackend final : public Backend {
 public:
  ~CpuBackend() override { pool().trim(); }
  std::string name() const override { return "cpu"; }
  int threads() const override { return ops::num_threads(); }
  Workspace& workspace() const override {
    thread_local Workspace ws;
    return ws;
  }

  bool host_memory() const override { return true; }
  void* allocate(size_t bytes) const override { return ::operator new[](bytes, std::align_val_t(256)); }
  void deallocate(void* p, size_t) const override { ::operator delete[](p, std::align_val_t(256)); }
  void to_device(void* dst, const void* host, size_t bytes) const override { std::memcpy(dst, host, bytes); }
  void to_host(void* host, const void* src, size_t bytes) const override { std::memcpy(host, src, bytes); }
  const void* resident(const void* host, size_t) const override { return host; }

  void copy2d(const float* x, size_t ldx, float* y, size_t ldy, int rows, int cols) const override {
    for (int r = 0; r < rows; ++r) std::copy_n(x + size_t(r) * ldx, cols, y + size_t(r) * ldy);
  }
  void copy_rows(const float* x, size_t ldx, const int* rows, int n, float* y, size_t ldy,
                 int cols) const override {
    for (int i = 0; i < n; ++i)
      if (rows[i] >= 0) std::copy_n(x + size_t(rows[i]) * ldx, cols, y + size_t(i) * ldy);
  }
  void add(float* y, const float* x, size_t n) const override {
    for (size_t i = 0; i < n; ++i) y[i] += x[i];
  }
  void scale(float* x, size_t n, float s) const override {
    for (size_t i = 0; i < n; ++i) x[i] *= s;
  }
  void clamp(float* x, size_t n, float c) const override {
    for (size_t i = 0; i < n; ++i) x[i] = std::min(std::max(x[i], -c), c);
  }
  void sigmoid(float* x, size_t n) const override {
    for (size_t i = 0; i < n; ++i) x[i] = 1.f / (1.f + std::exp(-x[i]));
  }
  void scale_rows(float* y, int rows, int cols, const float* g) const override {
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < cols; ++c) y[size_t(r) * cols + c] *= g[r];
  }
  void fill(float* x, size_t n, float v) const override { std::fill_n(x, n, v); }
  void gather_rows(const ops::WeightView& table, const int* ids, int n, int H, float* y) const override {
    for (int i = 0; i < n; ++i) ops::widen_row(table, ids[i], 0, H, y + size_t(i) * H);
  }

  void linear(const float* X, size_t ldx, int n, int in, const ops::WeightView& W, int out, float* Y, size_t ldy,
              const float* bias) const override {
    ops::linear(X, ldx, n, in, W, out, Y, ldy, bias);
  }
  void rmsnorm(const float* x, const float* w, float* y, int rows, int dim, float eps) const override {
    ops::rmsnorm(x, w, y, rows, dim, eps);
  }
  void rope(float* x, int rows, int row_stride, int n_heads, int head_stride, int rot_dim, const int* pos,
            const float* inv_freq, float attn_scaling) const override {
    ops::rope_neox(x, rows, row_stride, n_heads, head_stride, rot_dim, pos, inv_freq, attn_scaling);
  }
  void attention(const float* q, int n_q, int q_stride, int q_pos0, const float* k, int k_stride, const float* v,
                 int v_stride, int n_k, const ops::AttnShape& s, float* out, int out_stride) const override {
    ops::attention(q, n_q, q_stride, q_pos0, k, k_stride, v, v_stride, n_k, s, out, out_stride);
  }
  void silu_mul(const float* gu, int rows, int I, float* key) const override { ops::silu_mul(gu, rows, I, key); }

  // The backward ops: the float instances of kernels/grad_ops.h (what the taped v* stack runs).
  void linear_backward(const float* dY, size_t lddy, int n, int out, const ops::WeightView& W, int in, float* dX,
                       size_t lddx, bool accumulate) const override;
  void rmsnorm_backward(const float* x, const float* w, const float* dy, float* dx, int rows, int dim, float eps,
                        bool accumulate) const override {
    grad::rmsnorm_backward(x, w, dy, dx, rows, dim, eps, accumulate);
  }
  void silu_mul_backward(const float* gu, const float* dkey, int rows, int I, float* dgu) const override {
    grad::swiglu_backward(gu, dkey, rows, I, dgu);
  }
  void attention_backward(const float* q, int n_q, int q_stride, int q_pos0, const float* k, int k_stride,
                          const float* v, int v_stride, int n_k, const ops::AttnShape& s, const float* dout,
                          int dout_stride, float* dq, float* dk, float* dv) const override {
    std::vector<float> probs(size_t(s.Hq) * n_q * size_t(n_k)), out(size_t(n_q) * s.Hq * s.Dv);
    grad::attention(q, n_q, q_stride, q_pos0, k, k_stride, v, v_stride, n_k, s, out.data(), s.Hq * s.Dv,
                    probs.data());
    grad::attention_backward(q, n_q, q_stride, k, k_stride, v, v_stride, n_k, s, probs.data(), dout, dout_stride, dq,
                             dk, dv);
  }

  void clamp_backward(float* dx, const float* x, size_t n, float c) const override {
    for (size_t i = 0; i < n; ++i)
      if (x[i] < -c || x[i] > c) dx[i] = 0.f;
  }
  void sigmoid_gate_backward(const float* dy, const float* y, const float* g, int rows, int cols,
                             float* ds) const override {
    for (int r = 0; r < rows; ++r) {
      float s = 0.f;
      for (int c = 0; c < cols; ++c) s += dy[size_t(r) * cols + c] * y[size_t(r) * cols + c];
      ds[r] = s * g[r] * (1.f - g[r]);
    }
  }

  void route(const float* z, int N, const ops::RouteSpec& spec, const float* bias, int* ids,
             float* w) const override {
    for (int t = 0; t < N; ++t)
      ops::route_row(spec, z + size_t(t) * spec.E, bias, ids + size_t(t) * spec.k, w + size_t(t) * spec.k);
  }

  void route_backward(const float* z, int N, const ops::RouteSpec& spec, const int* ids, const float* dw,
                      float* dz) const override {
    for (int t = 0; t < N; ++t)
      ops::route_row_backward(spec, z + size_t(t) * spec.E, ids + size_t(t) * spec.k, dw + size_t(t) * spec.k,
                              dz + size_t(t) * spec.E);
  }

  void moe_experts(const float* a, int N, const ExpertsView& ex, const int* ids, const float* w, int k, float* y,
                   const MoeTaps* taps) const override;
  void moe_experts_backward(const float* a, int N, const ExpertsView& ex, const int* ids, const float* w, int k,
                            const float* dy, float* da, float* dw, bool accumulate) const override;

  bool solve_spd(double* A, int n, double* B, int m) const override {
    Eigen::Map<Eigen::MatrixXd> a(A, n, n), b(B, n, m);  // column-major: B's rows are the columns here
    Eigen::LLT<Eigen::Ref<Eigen::MatrixXd>> llt(a);      // in place
    if (llt.info() != Eigen::Success) return false;
    llt.solveInPlace(b);
    return true;
  }

  void gram(const float* K, int n, int cols, size_t ld, double* C, bool accumulate) const override {
    Eigen::Map<Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>> c(C, cols, cols);
    if (!accumulate) c.triangularView<Eigen::Lower>().setZero();
    if (n <= 0) return;
    using Rows = Eigen::Map<const MatR, 0, Eigen::OuterStride<>>;
    const Eigen::MatrixXd kt = Rows(K, n, cols, Eigen::OuterStride<>(long(ld))).cast<double>().transpose();  // [cols, n]
    c.selfadjointView<Eigen::Lower>().rankUpdate(kt);
  }
};

void CpuBackend::linear_backward(const float* dY, size_t lddy, int n, int out, const ops::WeightView& W, int in,
                                 float* dX, size_t lddx, bool accumulate) const {
  // grad::linear_backward on contiguous fp32 operands: a typed or strided W widened, strided rows packed.
  std::vector<float> w, dy, dx;
  const float* wp = static_cast<const float*>(W.data);
  if (W.type != ops::WType::F32 || W.ld != size_t(in)) {
    w.resize(size_t(out) * size_t(in));
    for (int r = 0; r < out; ++r) ops::widen_row(W, r, 0, in, w.data() + size_t(r) * in);
    wp = w.data();
  }
  const float* dyp = dY;
  if (lddy != size_t(out)) {
    dy.resize(size_t(n) * size_t(out));
    copy2d(dY, lddy, dy.data(), size_t(out), n, out);
    dyp = dy.data();
  }
  if (lddx == size_t(in)) return grad::linear_backward(dyp, n, in, wp, out, dX, accumulate);
  dx.resize(size_t(n) * size_t(in));
  if (accumulate) copy2d(dX, lddx, dx.data(), size_t(in), n, in);
  grad::linear_backward(dyp, n, in, wp, out, dx.data(), accumulate);
  copy2d(dx.data(), size_t(in), dX, lddx, n, in);
}

// The (token, slot) pairs grouped by expert with a counting sort: row r of the grouped order is token tok[r], pair
// pair[r] = t·k + j; expert e's rows are start[e] .. start[e+1] (tokens ascending); active: the experts with rows.
struct PairGroups {
  std::vector<int> start, tok, pair, active;
  PairGroups(const int* ids, int N, int k, int E) : start(size_t(E) + 1, 0), tok(size_t(N) * k), pair(size_t(N) * k) {
    for (int p = 0; p < N * k; ++p) ++start[size_t(ids[p]) + 1];
    for (int e = 0; e < E; ++e) start[size_t(e) + 1] += start[size_t(e)];
    std::vector<int> fill(start.begin(), start.end() - 1);
    for (int t = 0; t < N; ++t)
      for (int j = 0; j < k; ++j) {
        const int e = ids[size_t(t) * k + j], r = fill[size_t(e)]++;
        tok[size_t(r)] = t;
        pair[size_t(r)] = t * k + j;
      }
    for (int e = 0; e < E; ++e)
      if (start[size_t(e) + 1] > start[size_t(e)]) active.push_back(e);
  }
};

void CpuBackend::moe_experts(const float* a, int N, const ExpertsView& ex, const int* ids, const float* w, int k,
                             float* y, const MoeTaps* taps) const {
  const int I = ex.I, H = ex.H;
  const PairGroups groups(ids, N, k, ex.E);
  const std::vector<int>&start = groups.start, &tok = groups.tok, &pair = groups.pair, &active = groups.active;

  // Scratch for every group at once (groups are disjoint row ranges): gathered rows, gate‖up, keys, outputs.
  Workspace& ws = workspace();
  ws.reset();
  const size_t P = size_t(N) * k;
  float* xg = ws.take(P * H);
  float* gu = ws.take(P * 2 * size_t(I));
  float* key = ws.take(P * I);
  float* out = ws.take(P * H);

  // A parallel region costs more than a decoding step's few expert rows: parallel over experts only with real work.
  const bool par = !omp_in_parallel() && 2.0 * P * 3.0 * H * I > 4e6;
  auto group = [&](int e) { return std::pair<size_t, int>(size_t(start[size_t(e)]), start[size_t(e) + 1] - start[size_t(e)]); };
  // Phase 1: keys (gate‖up GEMMs, SwiGLU).
#pragma omp parallel for schedule(dynamic) num_threads(ops::num_threads()) if (par)
  for (int i = 0; i < int(active.size()); ++i) {
    const int e = active[size_t(i)];
    const auto [r0, n] = group(e);
    for (int j = 0; j < n; ++j)
      std::memcpy(xg + (r0 + j) * H, a + size_t(tok[r0 + j]) * H, sizeof(float) * size_t(H));
    float* g = gu + r0 * 2 * I;
    ops::linear(xg + r0 * H, size_t(H), n, H, ex.gate[e], I, g, 2 * size_t(I));
    ops::linear(xg + r0 * H, size_t(H), n, H, ex.up[e], I, g + I, 2 * size_t(I));
    ops::silu_mul(g, n, I, key + r0 * I);
  }
  std::vector<int> rows;
  auto tap = [&](const std::function<void(int, MapMatR, const std::vector<int>&)>& f, float* base, int width) {
    for (int e : active) {
      const auto [r0, n] = group(e);
      rows.assign(tok.begin() + long(r0), tok.begin() + long(r0) + n);
      f(e, MapMatR(base + r0 * width, n, width), rows);
    }
  };
  if (taps && taps->key_rows)
    for (int e : active) taps->key_rows(e, key + group(e).first * I, group(e).second);
  if (taps && taps->key) tap(taps->key, key, I);
  // Phase 2: down projections, each row scaled by its routing weight.
#pragma omp parallel for schedule(dynamic) num_threads(ops::num_threads()) if (par)
  for (int i = 0; i < int(active.size()); ++i) {
    const int e = active[size_t(i)];
    const auto [r0, n] = group(e);
    float* o = out + r0 * H;
    ops::linear(key + r0 * I, size_t(I), n, I, ex.down[e], H, o, size_t(H));
    for (int j = 0; j < n; ++j) {
      const float wt = w[pair[r0 + j]];
      for (int h = 0; h < H; ++h) o[size_t(j) * H + h] *= wt;
    }
  }
  if (taps && taps->out) tap(taps->out, out, H);
  // Combine per token in ascending expert id.
  std::fill(y, y + size_t(N) * H, 0.f);
  for (int e : active) {
    const auto [r0, n] = group(e);
    for (int j = 0; j < n; ++j) {
      float* yt = y + size_t(tok[r0 + j]) * H;
      const float* o = out + (r0 + j) * H;
      for (int h = 0; h < H; ++h) yt[h] += o[h];
    }
  }
}

void CpuBackend::moe_experts_backward(const float* a, int N, const ExpertsView& ex, const int* ids, const float* w,
                                      int k, const float* dy, float* da, float* dw, bool accumulate) const {
  const int I = ex.I, H = ex.H;
  const PairGroups g(ids, N, k, ex.E);
  const size_t P = size_t(N) * k;
  std::vector<float> dxg(P * H);  // each pair's ∂/∂(expert input), in grouped order
  const bool par = !omp_in_parallel() && 2.0 * P * 3.0 * H * I > 4e6;  // moe_experts' threshold
#pragma omp parallel for schedule(dynamic) num_threads(ops::num_threads()) if (par)
  for (int i = 0; i < int(g.active.size()); ++i) {
    const int e = g.active[size_t(i)], r0 = g.start[size_t(e)], n = g.start[size_t(e) + 1] - r0;
    const size_t nz = size_t(n);
    std::vector<float> x(nz * H), gu(nz * 2 * I), key(nz * I), y(nz * H), dye(nz * H), dkey(nz * I), dgu(nz * 2 * I);
    for (int j = 0; j < n; ++j) std::copy_n(a + size_t(g.tok[size_t(r0 + j)]) * H, H, x.data() + size_t(j) * H);
    // The expert's forward: gate‖up [n, 2I], key [n, I], unweighted output y [n, H].
    ops::linear(x.data(), size_t(H), n, H, ex.gate[e], I, gu.data(), 2 * size_t(I));
    ops::linear(x.data(), size_t(H), n, H, ex.up[e], I, gu.data() + I, 2 * size_t(I));
    ops::silu_mul(gu.data(), n, I, key.data());
    ops::linear(key.data(), size_t(I), n, I, ex.down[e], H, y.data(), size_t(H));
    // dw = dy·y per pair; the rows' output gradient w·dy back through down, SwiGLU, gate and up.
    for (int j = 0; j < n; ++j) {
      const int t = g.tok[size_t(r0 + j)], p = g.pair[size_t(r0 + j)];
      const float* d = dy + size_t(t) * H;
      float s = 0.f;
      for (int h = 0; h < H; ++h) {
        s += d[h] * y[size_t(j) * H + h];
        dye[size_t(j) * H + h] = w[p] * d[h];
      }
      dw[p] = s;
    }
    float* dx = dxg.data() + size_t(r0) * H;
    linear_backward(dye.data(), size_t(H), n, H, ex.down[e], I, dkey.data(), size_t(I), false);
    silu_mul_backward(gu.data(), dkey.data(), n, I, dgu.data());
    linear_backward(dgu.data(), 2 * size_t(I), n, I, ex.gate[e], H, dx, size_t(H), false);
    linear_backward(dgu.data() + I, 2 * size_t(I), n, I, ex.up[e], H, dx, size_t(H), true);
  }
  // Σ over each token's pairs in ascending expert id.
  std::vector<float> dsum(size_t(N) * H, 0.f);
  for (int e : g.active)
    for (int r = g.start[size_t(e)]; r < g.start[size_t(e) + 1]; ++r) {
      float* o = dsum.data() + size_t(g.tok[size_t(r)]) * H;
      const float* d = dxg.data() + size_t(r) * H;
      for (int h = 0; h < H; ++h) o[h] += d[h];
    }
  for (size_t i = 0; i < dsum.size(); ++i) da[i] = accumulate ? da[i] + dsum[i] : dsum[i];
}

}  // namespace

const Backend& cpu_backend() {
  static const CpuBackend b;
  return b;
}

}  // namespace moedit
