// Host EMULATION of CUDA device code for tests/cuda/emu/run.sh: one std::thread per CUDA thread, blocks one after
// another, std::barrier for __syncthreads and for the warp shuffles and ballots (never on a real build's include path).
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <bit>
#include <cmath>
#include <functional>
#include <memory>
#include <thread>
#include <vector>
#include "cuda_runtime_api.h"
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using std::max;
using std::min;
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
namespace emu {
inline thread_local dim3 tIdx, bIdx;
inline dim3 bDim, gDim;
inline std::barrier<>* block_bar = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
inline std::vector<uint64_t> slots(1024);
inline std::vector<char> dyn;
struct Cfg {
  dim3 g, b;
  size_t smem;
};
inline Cfg cfg(dim3 g, dim3 b, size_t smem = 0, cudaStream_t = nullptr) { return {g, b, smem}; }
inline void launch(Cfg c, const std::function<void()>& body) {
  gDim = c.g;
  bDim = c.b;
  const unsigned n = c.b.x * c.b.y * c.b.z;
  for (unsigned bz = 0; bz < c.g.z; ++bz)
    for (unsigned by = 0; by < c.g.y; ++by)
      for (unsigned bx = 0; bx < c.g.x; ++bx) {
        dyn.assign(c.smem, char(0xff));
        std::barrier<> bar(n);
        block_bar = &bar;
        warp_bars.clear();
        for (unsigned w = 0; w < (n + 31) / 32; ++w) warp_bars.push_back(std::make_unique<std::barrier<>>(std::min(32u, n - 32 * w)));
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < n; ++t)
          ts.emplace_back([&, t, bx, by, bz] {
            tIdx = dim3(t % c.b.x, (t / c.b.x) % c.b.y, t / (c.b.x * c.b.y));
            bIdx = dim3(bx, by, bz);
            body();
            warp_bars[t / 32]->arrive_and_drop();
            block_bar->arrive_and_drop();
          });
        for (auto& th : ts) th.join();
      }
}
inline unsigned linear_tid() { return tIdx.x + bDim.x * (tIdx.y + bDim.y * tIdx.z); }
template <class T>
T shfl_xor(T v, int o) {
  const unsigned t = linear_tid(), base = t / 32 * 32, lane = t % 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  slots[t] = bits;
  warp_bars[t / 32]->arrive_and_wait();
  const uint64_t got = slots[base + (lane ^ unsigned(o))];
  warp_bars[t / 32]->arrive_and_wait();
  T r;
  std::memcpy(&r, &got, sizeof(T));
  return r;
}
inline unsigned ballot(bool p) {
  const unsigned t = linear_tid(), base = t / 32 * 32;
  slots[t] = p;
  warp_bars[t / 32]->arrive_and_wait();
  unsigned b = 0;
  for (unsigned l = 0; l < 32 && base + l < bDim.x * bDim.y * bDim.z; ++l) b |= unsigned(slots[base + l] != 0) << l;
  warp_bars[t / 32]->arrive_and_wait();
  return b;
}
}  // namespace emu
#define threadIdx (::emu::tIdx)
#define blockIdx (::emu::bIdx)
#define blockDim (::emu::bDim)
#define gridDim (::emu::gDim)
#define __syncthreads() (::emu::block_bar->arrive_and_wait())
template <class T>
T __shfl_xor_sync(unsigned, T v, int o) { return ::emu::shfl_xor(v, o); }
inline unsigned __ballot_sync(unsigned, bool p) { return ::emu::ballot(p); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
template <class T>
T __ldg(const T* p) { return *p; }
inline float __uint_as_float(uint32_t u) { return std::bit_cast<float>(u); }
inline uint32_t __float_as_uint(float f) { return std::bit_cast<uint32_t>(f); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
