// CudaBackend: the Backend seam on one CUDA device (kernels/cuda/backend.cpp: memory and ops; residency.cpp: resident
// copies, the memory cap and layer staging; moe_experts.cpp: the MoE step; solver.cpp: solve_spd). Ops enqueue kernels on the backend's stream and return; to_host and synchronize wait. Set
// MOEDIT_CUDA_SYNC=1 to make every op wait and check for faults (a fault then names the op that caused it).
//
// Pointers passed to the ops are device memory: activations in Bufs of this backend, weights, norms, biases and
// RoPE frequencies through resident(). An ops::WeightView's data and its FP8 scales point to resident copies; the
// arrays of an ExpertsView (the views themselves) stay in host memory.
#pragma once
#include <cuda_runtime_api.h>

#include <atomic>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cuda/launch.h"

namespace moedit::cuda {

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device);
  ~CudaBackend() override;

  std::string name() const override { return "cuda:" + std::to_string(dev_); }
  int threads() const override { return sms_; }  // multiprocessors
  Workspace& workspace() const override;

  bool host_memory() const override { return false; }
  void* allocate(size_t bytes) const override;
  void deallocate(void* p, size_t bytes) const override;
  void to_device(void* dst, const void* host, size_t bytes) const override;
  void to_host(void* host, const void* src, size_t bytes) const override;
  const void* resident(const void* host, size_t bytes) const override;
  void forget(const void* host) const override;
  void synchronize() const override;
  void set_memory_limit(size_t bytes) const override;
  size_t memory_limit() const override;
  void stage(const std::vector<HostRange>& now, const std::vector<HostRange>& next) const override;
  void set_precision(Precision p) const override { precision_ = p; }
  Precision precision() const override { return precision_; }

  void copy2d(const float* x, size_t ldx, float* y, size_t ldy, int rows, int cols) const override;
  void copy_rows(const float* x, size_t ldx, const int* rows, int n, float* y, size_t ldy, int cols) const override;
  void add(float* y, const float* x, size_t n) const override;
  void scale(float* x, size_t n, float s) const override;
  void clamp(float* x, size_t n, float c) const override;
  void sigmoid(float* x, size_t n) const override;
  void scale_rows(float* y, int rows, int cols, const float* g) const override;
  void fill(float* x, size_t n, float v) const override;
  void gather_rows(const ops::WeightView& table, const int* ids, int n, int H, float* y) const override;
  void linear(const float* X, size_t ldx, int n, int in, const ops::WeightView& W, int out, float* Y, size_t ldy,
              const float* bias) const override;
  void rmsnorm(const float* x, const float* w, float* y, int rows, int dim, float eps) const override;
  void rope(float* x, int rows, int row_stride, int n_heads, int head_stride, int rot_dim, const int* pos,
            const float* inv_freq, float attn_scaling) const override;
  void attention(const float* q, int n_q, int q_stride, int q_pos0, const float* k, int k_stride, const float* v,
                 int v_stride, int n_k, const ops::AttnShape& s, float* out, int out_stride) const override;
  void silu_mul(const float* gu, int rows, int I, float* key) const override;
  void linear_backward(const float* dY, size_t lddy, int n, int out, const ops::WeightView& W, int in, float* dX,
                       size_t lddx, bool accumulate) const override;
  void rmsnorm_backward(const float* x, const float* w, const float* dy, float* dx, int rows, int dim, float eps,
                        bool accumulate) const override;
  void silu_mul_backward(const float* gu, const float* dkey, int rows, int I, float* dgu) const override;
  void attention_backward(const float* q, int n_q, int q_stride, int q_pos0, const float* k, int k_stride,
                          const float* v, int v_stride, int n_k, const ops::AttnShape& s, const float* dout,
                          int dout_stride, float* dq, float* dk, float* dv) const override;
  void clamp_backward(float* dx, const float* x, size_t n, float c) const override;
  void sigmoid_gate_backward(const float* dy, const float* y, const float* g, int rows, int cols,
                             float* ds) const override;
  void route(const float* z, int N, const ops::RouteSpec& spec, const float* bias, int* ids,
             float* w) const override;
  void moe_experts(const float* a, int N, const ExpertsView& experts, const int* ids, const float* w, int k,
                   float* y, const MoeTaps* taps) const override;
  void route_backward(const float* z, int N, const ops::RouteSpec& spec, const int* ids, const float* dw,
                      float* dz) const override;
  void moe_experts_backward(const float* a, int N, const ExpertsView& experts, const int* ids, const float* w, int k,
                            const float* dy, float* da, float* dw, bool accumulate) const override;
  void gram(const float* K, int n, int cols, size_t ld, double* C, bool accumulate) const override;
  bool solve_spd(double* A, int n, double* B, int m) const override;  // solver.cpp

  int device() const { return dev_; }
  cudaStream_t stream() const { return st_; }
  size_t resident_bytes() const;  // held by resident copies
  // Device memory this backend holds now (copies, pool, caches), and the most it held since reset_peak().
  size_t allocated_bytes() const { return allocated_; }
  size_t peak_bytes() const { return peak_; }
  void reset_peak() const { peak_ = size_t(allocated_); }

 private:
  void enter() const;  // makes this backend's device current for the calling thread
  void done() const;   // after an op: waits and checks when MOEDIT_CUDA_SYNC=1
  void wait() const;   // the compute stream, without issuing staged uploads
  void* raw_allocate(size_t bytes) const;

  // A resident copy of [host, host + bytes). Under a cap: `used` orders copies by their last read (resident(), or
  // a layer staged as `now`); `next_of` is the stage that listed it as the coming layer; `ready` (null once read)
  // is the event of an upload on the copy stream that the compute stream must wait for.
  struct Copy {
    void* dev;
    size_t bytes;
    uint64_t used = 0, next_of = 0;
    cudaEvent_t ready = nullptr;
  };
  using Copies = std::map<uintptr_t, Copy>;  // by host address
  // residency.cpp, with mu_ held:
  Copies::iterator covering(uintptr_t h, size_t bytes) const;  // the copy that holds the range, or end()
  void drop(Copies::iterator it) const;                         // frees it (cudaFree waits for its readers)
  size_t held_bytes(size_t* all) const;                         // held by the running layer; *all: every copy
  bool make_room(size_t bytes, bool prefetch) const;            // under the cap; false: no room (see residency.cpp)
  void issue_staged() const;                                    // the coming layer's uploads, on the copy stream

  const int dev_;
  int sms_ = 0;
  cudaStream_t st_ = nullptr, copy_st_ = nullptr;  // ops and copies; staged uploads
  bool sync_each_ = false;
  mutable std::mutex mu_;  // resident_, staging state, the cap, solver_
  mutable void* solver_ = nullptr;  // the cuSOLVER handle (solver.cpp), created on the first solve
  mutable Copies resident_;
  mutable size_t largest_ = 0;                // the largest copy ever made (forget's search window)
  mutable size_t limit_ = 0;                  // 0: no cap
  mutable uint64_t tick_ = 0, stage_ = 0, stage_tick_ = 0;  // a clock of reads; stages so far; tick of the last
  mutable std::vector<HostRange> staged_;     // the coming layer's ranges, uploaded at the next wait
  mutable std::atomic<size_t> allocated_{0}, peak_{0};
  mutable std::atomic<Precision> precision_{Precision::fp32};
};

// An ops::WeightView (device pointers) as the kernels' plain descriptor.
DevWeight dev_weight(const ops::WeightView& W);

}  // namespace moedit::cuda
