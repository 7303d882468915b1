// The backend seam: one object per device that owns its scratch memory and threads and implements every op the
// model layer runs — Linear on typed weights, RMSNorm, RoPE, causal attention, SwiGLU, and the two MoE ops for a
// whole batch: route (router logits → top-k ids and weights) and moe_experts (group the (token, slot) pairs by
// expert, one grouped GEMM per active expert, weighted combine). The model calls only these, so no MoE step needs
// the host between kernels; a CUDA backend is a second implementation of this interface, tested op by op against
// the CPU one (tests/test_backend_ops.cpp).
//
// Pointers passed to a backend's ops address its own memory (host memory for the CPU backend): activations are Bufs
// from the backend's pool, and weights, norms and biases reach it through resident(). Shapes are given in comments
// as [rows, columns] of row-major float matrices; weights are ops::WeightView (fp32, bf16, f16 or FP8-E4M3 with
// block scales, read in place). Every CPU op keeps the batch invariance of kernels/ops.h: a row's result is the same
// whatever else the call holds.
#pragma once
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "kernels/ops.h"
#include "kernels/route.h"

namespace moedit {

// A bank of E SwiGLU experts: expert e has gate [I, H], up [I, H], down [H, I] (views of the checkpoint).
struct ExpertsView {
  int E = 0, I = 0, H = 0;
  const ops::WeightView* gate = nullptr;  // [E]
  const ops::WeightView* up = nullptr;    // [E]
  const ops::WeightView* down = nullptr;  // [E]
};

// What moe_experts shows its caller, only when asked: expert e's key rows (the input of its down projection, [n_e, I])
// and its weighted output rows ([n_e, H]); tokens[j] is the batch row of row j (ascending). A tap may change the rows
// in place; the op goes on with what it leaves. A device backend copies to the host only for a set tap.
struct MoeTaps {
  std::function<void(int e, MapMatR rows, const std::vector<int>& tokens)> key, out;
  // Expert e's key rows where they are (this backend's memory, [n_e, I] contiguous), read only, before `key` runs:
  // no host copy (key statistics accumulate them on the device with gram()).
  std::function<void(int e, const float* rows, int n)> key_rows;
};

// Scratch memory that grows to the largest request and is then reused: no allocation per call in steady state.
// Ops take their scratch from the calling thread's workspace and reset it when they start, so no workspace pointer
// outlives the op that took it.
class Workspace {
 public:
  // n floats, valid until the next reset() (64-byte aligned).
  float* take(size_t n);
  void reset();
  size_t capacity() const { return capacity_; }

 private:
  struct Free {
    void operator()(float* p) const;
  };
  using Block = std::unique_ptr<float[], Free>;
  std::vector<Block> old_;  // blocks outgrown since the last reset (earlier pieces stay valid until it)
  Block block_;
  size_t capacity_ = 0, used_ = 0;
};

class Backend;

// Backend memory with an owner: n bytes from the backend's caching pool, back to the pool when dropped (so a forward
// that asks for the same shapes every layer allocates nothing in steady state). Movable, not copyable.
class Buf {
 public:
  Buf() = default;
  Buf(const Backend& be, size_t bytes);
  Buf(Buf&& o) noexcept { *this = std::move(o); }
  Buf& operator=(Buf&& o) noexcept;
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  ~Buf() { drop(); }
  template <class T = float>
  T* as() const {
    return static_cast<T*>(p_);
  }
  size_t bytes() const { return bytes_; }
  const Backend* backend() const { return be_; }

 private:
  void drop();
  const Backend* be_ = nullptr;
  void* p_ = nullptr;
  size_t bytes_ = 0;  // as asked
};

// Freed buffers by size class, reused by the next request of that class (bounded: beyond `limit` cached bytes a
// freed buffer goes back to the backend). Thread-safe. The owning backend's destructor calls trim() (the pool cannot:
// it is destroyed after the backend's allocator is gone).
class BufferPool {
 public:
  explicit BufferPool(const Backend& be, size_t limit = size_t(1) << 31) : be_(be), limit_(limit) {}
  void* get(size_t bytes);
  void put(void* p, size_t bytes);
  void trim();                 // hand every cached buffer back
  size_t cached() const;       // bytes held for reuse
  static size_t size_class(size_t bytes);  // 256 B granularity up to 4 KiB, then 8 classes per power of two

 private:
  const Backend& be_;
  const size_t limit_;
  mutable std::mutex mu_;
  std::map<size_t, std::vector<void*>> free_;
  size_t cached_ = 0;
};

// The arithmetic of matrix products (Backend::linear, moe_experts). fp32: fp32 operands (typed weights widened
// exactly), fp32 sums — the CPU's arithmetic. bf16 (a device backend's tensor cores): a product whose weights are
// stored in 16 or 8 bits rounds both operands to bf16 (nearest even) and sums the exact products in fp32; weights
// held in fp32 (routers, edited matrices, fp32 checkpoints) are multiplied in fp32 either way, and everything outside
// matrix products (norms, attention, routing, the residual stream, scores) stays fp32.
enum class Precision { fp32, bf16 };

class Backend {
 public:
  Backend() : pool_(*this) {}
  virtual ~Backend() = default;
  virtual std::string name() const = 0;  // "cpu", "cuda:0", ...
  virtual int threads() const = 0;
  // Scratch memory of the calling thread (calls on different threads never share it).
  virtual Workspace& workspace() const = 0;

  // ---- memory ------------------------------------------------------------------------------------------------
  // Whether this backend's pointers are host pointers (the CPU backend) or a device's.
  virtual bool host_memory() const = 0;
  // Raw memory (256-byte aligned) and its release; Buf and the pool call these, the model does not.
  virtual void* allocate(size_t bytes) const = 0;
  virtual void deallocate(void* p, size_t bytes) const = 0;
  // Copies between the host and this backend's memory (plain memcpy on the CPU).
  virtual void to_device(void* dst, const void* host, size_t bytes) const = 0;
  virtual void to_host(void* host, const void* src, size_t bytes) const = 0;
  // The backend's copy of host data that stays as it is between calls (weights, norms, biases, RoPE frequencies):
  // the CPU returns `host` itself; a device backend uploads the range once and returns its device address. The
  // model calls forget(host) after it changes such data in place (an edit), so the next call uploads it again.
  virtual const void* resident(const void* host, size_t bytes) const = 0;
  virtual void forget(const void* host) const { (void)host; }
  // Wait until every op issued so far has finished (a no-op where ops are synchronous).
  virtual void synchronize() const {}

  // ---- streaming: models larger than a device's memory ---------------------------------------------------------
  // A cap on the device memory this backend allocates (resident copies, activations, KV caches); 0: none. Under a
  // cap, resident copies give way when room is needed (the most recently used of those no staged layer holds first:
  // the right victim when layers are read in turn, as every forward does), and the model stages each layer
  // (stage()). Host backends have no device memory to cap: set_memory_limit throws std::invalid_argument there.
  virtual void set_memory_limit(size_t bytes) const;
  virtual size_t memory_limit() const { return 0; }
  // Before a layer's ops, with a cap: `now` (the host ranges that layer reads through resident()) stays resident
  // through its ops, and `next` (the following layer's) starts uploading on a second stream at the next wait for
  // the device, so it overlaps the layer's kernels (double buffering); copies neither holds may be dropped. Throws
  // std::runtime_error naming both sizes when `now` alone does not fit under the cap.
  struct HostRange {
    const void* p;
    size_t bytes;
  };
  virtual void stage(const std::vector<HostRange>& now, const std::vector<HostRange>& next) const {
    (void)now;
    (void)next;
  }
  BufferPool& pool() const { return pool_; }

  // ---- precision -----------------------------------------------------------------------------------------------
  // The CPU computes in fp32 only: set_precision(bf16) throws std::invalid_argument there, naming the backend.
  virtual void set_precision(Precision p) const;
  virtual Precision precision() const { return Precision::fp32; }

  // ---- elementwise ops on activations (row-major float matrices in this backend's memory) ---------------------
  // y[rows, cols] (rows ldy apart) = x[rows, cols] (rows ldx apart); x and y do not overlap.
  virtual void copy2d(const float* x, size_t ldx, float* y, size_t ldy, int rows, int cols) const = 0;
  // y[i, :cols] (rows ldy apart) = x[rows[i], :cols] (rows ldx apart) for each i < n with rows[i] ≥ 0; y's other rows
  // are untouched; rows[] in this backend's memory; x and y do not overlap. Many scattered copies in one op (the
  // K/V prefixes a causal-tracing batch continues).
  virtual void copy_rows(const float* x, size_t ldx, const int* rows, int n, float* y, size_t ldy, int cols) const = 0;
  // y[n] += x[n]
  virtual void add(float* y, const float* x, size_t n) const = 0;
  // x[n] *= s
  virtual void scale(float* x, size_t n, float s) const = 0;
  // x[n] = min(max(x, −c), c)
  virtual void clamp(float* x, size_t n, float c) const = 0;
  // x[n] ← 1 / (1 + exp(−x))
  virtual void sigmoid(float* x, size_t n) const = 0;
  // y[r, :cols] *= g[r] for r < rows (rows of y contiguous)
  virtual void scale_rows(float* y, int rows, int cols, const float* g) const = 0;
  // x[n] = v
  virtual void fill(float* x, size_t n, float v) const = 0;
  // y[n, H] = rows ids[n] of a typed table (the embedding), widened to fp32; ids in backend memory.
  virtual void gather_rows(const ops::WeightView& table, const int* ids, int n, int H, float* y) const = 0;

  // Y[n, out] = X[n, in]·Wᵀ (+ bias[out]); rows of X, Y are ldx, ldy floats apart.
  virtual void linear(const float* X, size_t ldx, int n, int in, const ops::WeightView& W, int out, float* Y,
                      size_t ldy, const float* bias = nullptr) const = 0;
  // y[rows, dim] = w ⊙ x·rsqrt(mean(x²) + eps) (x and y may alias).
  virtual void rmsnorm(const float* x, const float* w, float* y, int rows, int dim, float eps) const = 0;
  // Rotate-half RoPE in place (ops::rope_neox). Its backward is the same op at the negated positions (the rotation
  // by −angle, the transposed rotation: cos and sin are even and odd, and the angle is an exact fp32 product).
  virtual void rope(float* x, int rows, int row_stride, int n_heads, int head_stride, int rot_dim, const int* pos,
                    const float* inv_freq, float attn_scaling) const = 0;
  // Causal attention of one sequence (ops::attention).
  virtual void attention(const float* q, int n_q, int q_stride, int q_pos0, const float* k, int k_stride,
                         const float* v, int v_stride, int n_k, const ops::AttnShape& s, float* out,
                         int out_stride) const = 0;
  // key[rows, I] = silu(gu[:, :I]) ⊙ gu[:, I:] for gate‖up rows gu [rows, 2I].
  virtual void silu_mul(const float* gu, int rows, int I, float* key) const = 0;

  // ---- backward ops: ∂loss/∂(input) of the ops above (v*, weight gradients) --------------------------------------
  // dX[n, in] (= or += when accumulate) dY[n, out]·W for W [out, in] (the backward of linear's X); rows of dY and dX
  // are lddy, lddx floats apart.
  virtual void linear_backward(const float* dY, size_t lddy, int n, int out, const ops::WeightView& W, int in,
                               float* dX, size_t lddx, bool accumulate) const = 0;
  // dx[rows, dim] (= or +=) of rmsnorm from dy: with r = rsqrt(mean(x²) + eps),
  // dx_j = r·w_j·dy_j − x_j·r³/dim·Σ_i w_i·dy_i·x_i.
  virtual void rmsnorm_backward(const float* x, const float* w, const float* dy, float* dx, int rows, int dim,
                                float eps, bool accumulate) const = 0;
  // dgu[rows, 2I] of silu_mul from dkey [rows, I]: ∂g = dk·u·σ(g)·(1 + g·(1 − σ(g))), ∂u = dk·silu(g).
  virtual void silu_mul_backward(const float* gu, const float* dkey, int rows, int I, float* dgu) const = 0;
  // The backward of attention (the same arguments; its probabilities recomputed): dq [n_q, q_stride] (=),
  // dk [n_k, k_stride] and dv [n_k, v_stride] (+=) from dout [n_q, dout_stride]. With P the probabilities and
  // dP = dO·Vᵀ per head: dS = P ⊙ (dP − rowsum(P ⊙ dP)), dQ = scale·dS·K, dK += scale·dSᵀ·Q, dV += Pᵀ·dO (the query
  // heads of a kv group summed into its dK, dV).
  virtual void attention_backward(const float* q, int n_q, int q_stride, int q_pos0, const float* k, int k_stride,
                                  const float* v, int v_stride, int n_k, const ops::AttnShape& s, const float* dout,
                                  int dout_stride, float* dq, float* dk, float* dv) const = 0;

  // The backward of clamp(x, c): dx[i] = 0 where x[i] < −c or x[i] > c (dx[i] kept inside [−c, c]).
  virtual void clamp_backward(float* dx, const float* x, size_t n, float c) const = 0;
  // The backward of a sigmoid row gate y_r·g_r with g_r = σ(s_r) (the shared expert's gate) with respect to the
  // logit s: ds[r] = (Σ_c dy[r, c]·y[r, c])·g[r]·(1 − g[r]) for dy, y [rows, cols] (y ungated) and g [rows].
  virtual void sigmoid_gate_backward(const float* dy, const float* y, const float* g, int rows, int cols,
                                     float* ds) const = 0;

  // The backward of route with its selection held fixed: dz [N, E] = ∂loss/∂z from dw [N, k] = ∂loss/∂w for the ids
  // [N, k] route chose from z (ops::route_row_backward; the selection bias and group limits only choose, so they pass
  // no gradient).
  virtual void route_backward(const float* z, int N, const ops::RouteSpec& spec, const int* ids, const float* dw,
                              float* dz) const = 0;
  // The backward of moe_experts with the routing held fixed (each expert's forward recomputed, in fp32): for the rows
  // a [N, H], ids and w [N, k] and ∂loss/∂y dy [N, H], da [N, H] (= or += when accumulate) Σ_j w[t, j]·J_e(a[t])ᵀ·dy[t]
  // with e = ids[t, j], summed per token in ascending expert id, and dw [N, k] = dy[t]·E_e(a[t]) (the gradient of the
  // routing weights: the experts' unweighted outputs).
  virtual void moe_experts_backward(const float* a, int N, const ExpertsView& experts, const int* ids, const float* w,
                                    int k, const float* dy, float* da, float* dw, bool accumulate) const = 0;

  // Routing of N tokens: router logits z [N, E] → ids [N, k] (top-k order) and weights w [N, k]; bias [E] or null.
  virtual void route(const float* z, int N, const ops::RouteSpec& spec, const float* bias, int* ids,
                     float* w) const = 0;
  // y [N, H] = Σ_j w[t, j]·E_{ids[t, j]}(a[t]) for the rows a [N, H]: tokens grouped by expert (ascending within
  // each), one gate‖up and one down GEMM per active expert, each output row scaled by its routing weight and summed
  // per token in ascending expert id (the order transformers accumulates in). taps may be null.
  virtual void moe_experts(const float* a, int N, const ExpertsView& experts, const int* ids, const float* w, int k,
                           float* y, const MoeTaps* taps = nullptr) const = 0;

  // ---- key statistics ------------------------------------------------------------------------------------------
  // C [cols, cols] (fp64, row-major, this backend's memory) = (accumulate ? C : 0) + Kᵀ·K for the rows K [n, cols]
  // (ld floats apart), every product and sum in fp64; only the lower triangle (row ≥ column) is written.
  virtual void gram(const float* K, int n, int cols, size_t ld, double* C, bool accumulate) const = 0;

  // ---- dense solves (ROME's C⁻¹k*, MEMIT's (λC + KKᵀ)⁻¹KRᵀ) --------------------------------------------------------
  // A·X = B for a symmetric positive definite A [n, n] (fp64, this backend's memory, both triangles stored; A is
  // overwritten) and m right-hand sides B (fp64, m rows of n: each row one right-hand side, overwritten by its
  // solution): a Cholesky factorization (the CPU: Eigen's LLT; CUDA: cuSOLVER's potrf/potrs) and two triangular
  // solves. Returns false, B then unspecified, where the factorization finds A not numerically positive definite.
  virtual bool solve_spd(double* A, int n, double* B, int m) const = 0;

 private:
  mutable BufferPool pool_;
};

// solve_spd on host matrices: A [n, n] and B [n, m] (column j one right-hand side) copied to `be`'s memory and the
// solution back (on the CPU, in place on copies); nullopt where A is not numerically positive definite.
std::optional<Eigen::MatrixXd> solve_spd(const Backend& be, const Eigen::MatrixXd& A, const Eigen::MatrixXd& B);

// The CPU backend (kernels/cpu/): OpenMP threads (ops::num_threads()), a workspace per calling thread.
const Backend& cpu_backend();

}  // namespace moedit
