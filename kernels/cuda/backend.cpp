// CudaBackend: device memory (cudaMalloc, 256-byte aligned), copies on the backend's stream, and the ops, each a
// launch of a kernel from kernels/cuda/*.cu (see backend_impl.h; resident copies and the memory cap: residency.cpp).
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <vector>

#include "kernels/cuda/backend_impl.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/cuda_backend.h"

namespace moedit {

namespace cuda {

DevWeight dev_weight(const ops::WeightView& W) {
  DevWeight d;
  d.data = W.data;
  d.ld = W.ld;
  d.type = int32_t(W.type);
  if (W.type == ops::WType::F8E4M3) {
    if (W.data && (!W.scales.data || W.scales.br <= 0 || W.scales.bc <= 0))
      throw std::invalid_argument("cuda: an FP8 weight without block scales");
    d.scales = W.scales.data;
    d.sld = W.scales.ld;
    d.r0 = W.scales.r0;
    d.c0 = W.scales.c0;
    d.br = W.scales.br;
    d.bc = W.scales.bc;
  }
  return d;
}

CudaBackend::CudaBackend(int device) : dev_(device) {
  MOEDIT_CUDA_CHECK(cudaSetDevice(dev_));
  MOEDIT_CUDA_CHECK(cudaDeviceGetAttribute(&sms_, cudaDevAttrMultiProcessorCount, dev_));
  MOEDIT_CUDA_CHECK(cudaStreamCreateWithFlags(&st_, cudaStreamNonBlocking));
  MOEDIT_CUDA_CHECK(cudaStreamCreateWithFlags(&copy_st_, cudaStreamNonBlocking));
  const char* s = std::getenv("MOEDIT_CUDA_SYNC");
  sync_each_ = s && std::strcmp(s, "0") != 0 && *s;
}

// Backends live as long as the process (cuda_backend() never destroys one); this is for completeness. Errors are
// ignored: at exit the CUDA runtime may already be gone.
CudaBackend::~CudaBackend() {
  cudaSetDevice(dev_);
  cudaStreamSynchronize(st_);
  cudaStreamSynchronize(copy_st_);
  pool().trim();  // now, while deallocate() is still this class's (~Backend would call the pure virtual)
  for (auto& [h, c] : resident_) {
    if (c.ready) cudaEventDestroy(c.ready);
    cudaFree(c.dev);
  }
  cudaStreamDestroy(copy_st_);
  cudaStreamDestroy(st_);
}

void CudaBackend::enter() const {
  int cur = -1;
  MOEDIT_CUDA_CHECK(cudaGetDevice(&cur));
  if (cur != dev_) MOEDIT_CUDA_CHECK(cudaSetDevice(dev_));
}

void CudaBackend::done() const {
  if (sync_each_) wait();
}

Workspace& CudaBackend::workspace() const {
  thread_local Workspace ws;  // host scratch (the ops' device scratch comes from the pool)
  return ws;
}

// The pool's memory (activations, KV caches): under a cap, resident copies give way first (make_room).
void* CudaBackend::allocate(size_t bytes) const {
  {
    std::lock_guard<std::mutex> lock(mu_);
    make_room(bytes, false);
  }
  return raw_allocate(bytes);
}

void* CudaBackend::raw_allocate(size_t bytes) const {
  enter();
  void* p = nullptr;
  const cudaError_t e = cudaMalloc(&p, bytes);  // 256-byte aligned (at least)
  if (e != cudaSuccess) {
    cudaGetLastError();  // not sticky: clear it
    throw std::runtime_error("CUDA: cannot allocate " + std::to_string(bytes) + " bytes on " + name() + ": " +
                             cudaGetErrorString(e) + " (--max-gpu-memory caps what moedit holds there)");
  }
  const size_t now = allocated_ += bytes;
  for (size_t p0 = peak_; now > p0 && !peak_.compare_exchange_weak(p0, now);) {
  }
  return p;
}

// Never throws (Buf destructors call it); cudaFree waits for the work that may still use p.
void CudaBackend::deallocate(void* p, size_t bytes) const {
  if (!p) return;
  cudaSetDevice(dev_);
  cudaFree(p);
  allocated_ -= bytes;
}

void CudaBackend::to_device(void* dst, const void* host, size_t bytes) const {
  if (!bytes) return;
  enter();
  // From pageable memory the copy is staged before the call returns, so `host` may go right after it.
  MOEDIT_CUDA_CHECK(cudaMemcpyAsync(dst, host, bytes, cudaMemcpyHostToDevice, st_));
  done();
}

// A wait for the device: first the staged uploads of the coming layer (on the copy stream, while the queued ops run).
void CudaBackend::to_host(void* host, const void* src, size_t bytes) const {
  if (!bytes) return;
  enter();
  MOEDIT_CUDA_CHECK(cudaMemcpyAsync(host, src, bytes, cudaMemcpyDeviceToHost, st_));
  {
    std::lock_guard<std::mutex> lock(mu_);
    issue_staged();
  }
  MOEDIT_CUDA_CHECK(cudaStreamSynchronize(st_));
}

void CudaBackend::synchronize() const {
  {
    std::lock_guard<std::mutex> lock(mu_);
    issue_staged();
  }
  wait();
}

void CudaBackend::wait() const {
  enter();
  MOEDIT_CUDA_CHECK(cudaStreamSynchronize(st_));
}

// ---- ops ---------------------------------------------------------------------------------------------------------

void CudaBackend::copy2d(const float* x, size_t ldx, float* y, size_t ldy, int rows, int cols) const {
  enter();
  cuda::copy2d(x, ldx, y, ldy, rows, cols, st_);
  done();
}

void CudaBackend::copy_rows(const float* x, size_t ldx, const int* rows, int n, float* y, size_t ldy, int cols) const {
  enter();
  cuda::copy_rows(x, ldx, rows, n, y, ldy, cols, st_);
  done();
}

void CudaBackend::add(float* y, const float* x, size_t n) const {
  enter();
  cuda::add(y, x, n, st_);
  done();
}

void CudaBackend::scale(float* x, size_t n, float s) const {
  enter();
  cuda::scale(x, n, s, st_);
  done();
}

void CudaBackend::clamp(float* x, size_t n, float c) const {
  enter();
  cuda::clamp(x, n, c, st_);
  done();
}

void CudaBackend::sigmoid(float* x, size_t n) const {
  enter();
  cuda::sigmoid(x, n, st_);
  done();
}

void CudaBackend::scale_rows(float* y, int rows, int cols, const float* g) const {
  enter();
  cuda::scale_rows(y, rows, cols, g, st_);
  done();
}

void CudaBackend::fill(float* x, size_t n, float v) const {
  enter();
  cuda::fill(x, n, v, st_);
  done();
}

void CudaBackend::gather_rows(const ops::WeightView& table, const int* ids, int n, int H, float* y) const {
  enter();
  cuda::gather_rows(dev_weight(table), ids, n, H, y, st_);
  done();
}

void CudaBackend::linear(const float* X, size_t ldx, int n, int in, const ops::WeightView& W, int out, float* Y,
                         size_t ldy, const float* bias) const {
  enter();
  if (precision_ == Precision::bf16 && W.type != ops::WType::F32)
    cuda::linear_bf16(X, ldx, n, in, dev_weight(W), out, Y, ldy, bias, st_);
  else
    cuda::linear(X, ldx, n, in, dev_weight(W), out, Y, ldy, bias, st_);
  done();
}

void CudaBackend::gram(const float* K, int n, int cols, size_t ld, double* C, bool accumulate) const {
  enter();
  cuda::gram(K, n, cols, ld, C, accumulate, st_);
  done();
}

void CudaBackend::rmsnorm(const float* x, const float* w, float* y, int rows, int dim, float eps) const {
  enter();
  cuda::rmsnorm(x, w, y, rows, dim, eps, st_);
  done();
}

void CudaBackend::rope(float* x, int rows, int row_stride, int n_heads, int head_stride, int rot_dim, const int* pos,
                       const float* inv_freq, float attn_scaling) const {
  enter();
  cuda::rope_neox(x, rows, row_stride, n_heads, head_stride, rot_dim, pos, inv_freq, attn_scaling, st_);
  done();
}

namespace {

// ops::AttnShape as the kernels' plain data.
DevAttn dev_attn(const ops::AttnShape& s) { return {s.Hq, s.Hkv, s.Dk, s.Dv, s.scale, s.window}; }

// ops::RouteSpec as the kernels' plain data.
DevRoute dev_route(const ops::RouteSpec& spec) {
  using S = ops::RouteSpec;
  DevRoute r;
  r.score = spec.score == S::Score::Softmax ? 0 : spec.score == S::Score::Sigmoid ? 1 : 2;
  r.groups = spec.groups == S::Groups::None ? 0 : spec.groups == S::Groups::MaxScore ? 1 : 2;
  r.E = spec.E;
  r.k = spec.k;
  r.n_group = spec.n_group > 0 ? spec.n_group : 1;
  r.topk_group = spec.topk_group;
  r.renorm = spec.renorm;
  r.renorm_eps = float(spec.renorm_eps);  // route_row<float> adds T(renorm_eps)
  r.scale = spec.scale;
  r.scaling = spec.scaling;
  return r;
}

}  // namespace

void CudaBackend::attention(const float* q, int n_q, int q_stride, int q_pos0, const float* k, int k_stride,
                            const float* v, int v_stride, int n_k, const ops::AttnShape& s, float* out,
                            int out_stride) const {
  enter();
  const DevAttn a = dev_attn(s);
  cuda::attention(q, n_q, q_stride, q_pos0, k, k_stride, v, v_stride, n_k, a, out, out_stride, st_);
  done();
}

void CudaBackend::silu_mul(const float* gu, int rows, int I, float* key) const {
  enter();
  cuda::silu_mul(gu, rows, I, key, st_);
  done();
}

void CudaBackend::linear_backward(const float* dY, size_t lddy, int n, int out, const ops::WeightView& W, int in,
                                  float* dX, size_t lddx, bool accumulate) const {
  enter();
  cuda::linear_backward(dY, lddy, n, out, dev_weight(W), in, dX, lddx, accumulate, st_);
  done();
}

void CudaBackend::rmsnorm_backward(const float* x, const float* w, const float* dy, float* dx, int rows, int dim,
                                   float eps, bool accumulate) const {
  enter();
  cuda::rmsnorm_backward(x, w, dy, dx, rows, dim, eps, accumulate, st_);
  done();
}

void CudaBackend::silu_mul_backward(const float* gu, const float* dkey, int rows, int I, float* dgu) const {
  enter();
  cuda::silu_mul_backward(gu, dkey, rows, I, dgu, st_);
  done();
}

void CudaBackend::attention_backward(const float* q, int n_q, int q_stride, int q_pos0, const float* k,
                                     int k_stride, const float* v, int v_stride, int n_k, const ops::AttnShape& s,
                                     const float* dout, int dout_stride, float* dq, float* dk, float* dv) const {
  enter();
  const DevAttn a = dev_attn(s);
  Buf scratch(*this, sizeof(float) * cuda::attention_backward_scratch(n_q, n_k, a));
  cuda::attention_backward(q, n_q, q_stride, q_pos0, k, k_stride, v, v_stride, n_k, a, dout, dout_stride, dq, dk, dv,
                           scratch.as<float>(), st_);
  done();
}

void CudaBackend::clamp_backward(float* dx, const float* x, size_t n, float c) const {
  enter();
  cuda::clamp_backward(dx, x, n, c, st_);
  done();
}

void CudaBackend::sigmoid_gate_backward(const float* dy, const float* y, const float* g, int rows, int cols,
                                        float* ds) const {
  enter();
  cuda::sigmoid_gate_backward(dy, y, g, rows, cols, ds, st_);
  done();
}

void CudaBackend::route(const float* z, int N, const ops::RouteSpec& spec, const float* bias, int* ids,
                        float* w) const {
  if (N <= 0) return;
  enter();
  const DevRoute r = dev_route(spec);
  // Scratch: scores p [N, E], selection scores [N, E], group scores [N, n_group].
  const Buf scratch(*this, sizeof(float) * size_t(N) * (2 * size_t(spec.E > 0 ? spec.E : 0) + size_t(r.n_group)));
  cuda::route(z, N, r, bias, ids, w, scratch.as<float>(), st_);
  done();
}

void CudaBackend::route_backward(const float* z, int N, const ops::RouteSpec& spec, const int* ids, const float* dw,
                                 float* dz) const {
  if (N <= 0) return;
  enter();
  const Buf scratch(*this, sizeof(float) * size_t(N) * 2 * size_t(spec.E > 0 ? spec.E : 0));  // p, dp [N, E]
  cuda::route_backward(z, N, dev_route(spec), ids, dw, dz, scratch.as<float>(), st_);
  done();
}

}  // namespace cuda

// ---- the registry of devices ------------------------------------------------------------------------------------

namespace {

// The device count and, where it is 0, why.
struct Probe {
  int count = 0;
  std::string why;
};
const Probe& probe() {
  static const Probe p = [] {
    Probe r;
    const cudaError_t e = cudaGetDeviceCount(&r.count);
    if (e != cudaSuccess) {
      cudaGetLastError();
      r.count = 0;
      r.why = std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
    } else if (r.count == 0) {
      r.why = "the driver reports no CUDA device";
    }
    return r;
  }();
  return p;
}

}  // namespace

int cuda_device_count() {
  try {
    return probe().count;
  } catch (...) {
    return 0;
  }
}

const Backend& cuda_backend(int device) {
  const Probe& p = probe();
  if (device < 0 || device >= p.count)
    throw std::runtime_error("no CUDA device " + std::to_string(device) + ": this machine has " +
                             std::to_string(p.count) + " CUDA device(s)" + (p.why.empty() ? "" : " (" + p.why + ")"));
  static std::mutex mu;
  static std::vector<cuda::CudaBackend*> backends;  // never destroyed: ops may run until exit
  std::lock_guard<std::mutex> lock(mu);
  if (backends.empty()) backends.assign(size_t(p.count), nullptr);
  auto& b = backends[size_t(device)];
  if (!b) b = new cuda::CudaBackend(device);
  return *b;
}

size_t cuda_resident_bytes(int device) {
  return static_cast<const cuda::CudaBackend&>(cuda_backend(device)).resident_bytes();
}

CudaMemory cuda_memory(int device) {
  const auto& b = static_cast<const cuda::CudaBackend&>(cuda_backend(device));
  return {b.allocated_bytes(), b.peak_bytes(), b.resident_bytes()};
}

void cuda_reset_peak(int device) { static_cast<const cuda::CudaBackend&>(cuda_backend(device)).reset_peak(); }

}  // namespace moedit
