// CudaBackend's resident copies of host data (weights, norms, biases, RoPE frequencies), the device memory cap and
// layer staging (kernels/backend.h, "streaming").
//
// Without a cap a range is uploaded on its first use and kept. Under a cap (--max-gpu-memory), room for a new copy or
// pool buffer is made in this order: (1) copies that the layer running now has not read and the coming layer does not
// need, the most recently read first (forwards read the layers in turn, so the layer just finished is the one needed
// last, and the layers read long ago stay resident: hits the next time round); (2) the pool's cached buffers; (3)
// copies of the coming layer that no op has read yet (uploaded only ahead of time). What the running layer has read
// is never dropped; when it does not fit, the call throws, naming the cap and what holds the memory.
//
// Double buffering: stage(now, next) before layer l's ops marks `now` as read (uploaded ahead of time by the stage
// before, or on demand) and lists `next`; the next wait for the device (to_host, synchronize: at the latest when the
// block brings its result back) uploads `next` on the copy stream after layer l's ops are queued, so the copies
// overlap them; the first read of such a copy makes the compute stream wait for its upload's event. Dropping a copy
// frees it with cudaFree, which waits for the device: no queued op reads freed memory.
#include <algorithm>
#include <cstdio>
#include <stdexcept>
#include <vector>

#include "kernels/cuda/backend_impl.h"
#include "kernels/cuda/check.h"

namespace moedit::cuda {

namespace {
std::string gb(size_t bytes) {
  char s[32];
  std::snprintf(s, sizeof s, "%.2f GB", double(bytes) / 1e9);
  return s;
}
}  // namespace

CudaBackend::Copies::iterator CudaBackend::covering(uintptr_t h, size_t bytes) const {
  auto it = resident_.upper_bound(h);
  if (it == resident_.begin()) return resident_.end();
  --it;
  return h + bytes <= it->first + it->second.bytes ? it : resident_.end();
}

void CudaBackend::drop(Copies::iterator it) const {
  if (it->second.ready) cudaEventDestroy(it->second.ready);
  deallocate(it->second.dev, it->second.bytes);
  resident_.erase(it);
}

// Bytes of the copies the running layer holds (read since the last stage; with no stage yet, every copy); *all: of
// every copy.
size_t CudaBackend::held_bytes(size_t* all) const {
  size_t held = 0;
  *all = 0;
  for (const auto& [h, c] : resident_) {
    *all += c.bytes;
    if (stage_ == 0 || c.used >= stage_tick_) held += c.bytes;
  }
  return held;
}

bool CudaBackend::make_room(size_t bytes, bool prefetch) const {
  auto over = [&] { return limit_ && allocated_ + bytes > limit_; };
  if (!over()) return true;
  // A copy is held while the running layer has read it (used since the last stage; with no stage yet, always).
  std::vector<Copies::iterator> idle, coming;
  for (auto it = resident_.begin(); it != resident_.end(); ++it) {
    const Copy& c = it->second;
    if (stage_ == 0 || c.used >= stage_tick_) continue;
    (c.next_of == stage_ ? coming : idle).push_back(it);
  }
  std::sort(idle.begin(), idle.end(), [](auto a, auto b) { return a->second.used > b->second.used; });
  for (auto it : idle) {
    if (!over()) break;
    drop(it);
  }
  if (over()) pool().trim();
  if (!prefetch)
    for (auto it : coming) {
      if (!over()) break;
      drop(it);
    }
  if (!over()) return true;
  if (prefetch) return false;
  size_t weights = 0;
  const size_t held = held_bytes(&weights);
  throw std::runtime_error("the device memory cap (--max-gpu-memory) of " + gb(limit_) + " on " + name() +
                           " is reached: the running layer's weights hold " + gb(held) + ", activations and caches " +
                           gb(allocated_ - weights) + ", and " + gb(bytes) + " more are needed; raise the cap");
}

// The copy that holds [host, host + bytes): a range inside an earlier upload is served from it (a view of a stacked
// tensor uploaded whole); otherwise the range is uploaded once, replacing a shorter copy at the same address.
const void* CudaBackend::resident(const void* host, size_t bytes) const {
  if (!host || !bytes) return nullptr;
  const uintptr_t h = reinterpret_cast<uintptr_t>(host);
  std::lock_guard<std::mutex> lock(mu_);
  const uint64_t t = ++tick_;
  if (auto it = covering(h, bytes); it != resident_.end()) {
    Copy& c = it->second;
    c.used = t;
    if (c.ready) {  // uploaded ahead of time on the copy stream
      MOEDIT_CUDA_CHECK(cudaStreamWaitEvent(st_, c.ready, 0));
      cudaEventDestroy(c.ready);
      c.ready = nullptr;
    }
    return static_cast<const char*>(c.dev) + (h - it->first);
  }
  if (auto same = resident_.find(h); same != resident_.end()) drop(same);
  enter();
  make_room(bytes, false);
  void* d = raw_allocate(bytes);
  try {
    MOEDIT_CUDA_CHECK(cudaMemcpyAsync(d, host, bytes, cudaMemcpyHostToDevice, st_));
  } catch (...) {
    deallocate(d, bytes);
    throw;
  }
  resident_[h] = Copy{d, bytes, t, 0, nullptr};
  largest_ = std::max(largest_, bytes);
  done();
  return d;
}

// Drops every copy that holds `host` (the data changed in place): the next resident() uploads it again.
void CudaBackend::forget(const void* host) const {
  const uintptr_t h = reinterpret_cast<uintptr_t>(host);
  std::lock_guard<std::mutex> lock(mu_);
  // Only copies that start less than the largest copy's size below h can hold it (a model's end forgets every tensor:
  // this keeps that linear in the copies, not quadratic).
  auto it = resident_.lower_bound(h >= largest_ ? h - largest_ + 1 : 0);
  while (it != resident_.end() && it->first <= h) {
    auto here = it++;
    if (h < here->first + here->second.bytes) drop(here);
  }
}

size_t CudaBackend::resident_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  size_t n = 0;
  for (const auto& [h, c] : resident_) n += c.bytes;
  return n;
}

void CudaBackend::set_memory_limit(size_t bytes) const {
  std::lock_guard<std::mutex> lock(mu_);
  limit_ = bytes;
  if (!bytes) staged_.clear();
}

size_t CudaBackend::memory_limit() const {
  std::lock_guard<std::mutex> lock(mu_);
  return limit_;
}

void CudaBackend::stage(const std::vector<HostRange>& now, const std::vector<HostRange>& next) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (!limit_) return;  // without a cap every copy stays: nothing to stage
  ++stage_;
  stage_tick_ = ++tick_;
  staged_.clear();
  size_t missing = 0;
  for (const HostRange& r : now) {
    if (!r.p || !r.bytes) continue;
    if (auto it = covering(reinterpret_cast<uintptr_t>(r.p), r.bytes); it != resident_.end())
      it->second.used = stage_tick_;
    else
      missing += r.bytes;
  }
  make_room(0, true);  // down to the cap with what no one holds (a cap lowered while copies were resident)
  size_t weights = 0;
  const size_t held = held_bytes(&weights);
  const size_t other = allocated_ - weights, in_use = other - std::min(other, pool().cached());
  if (held + missing + in_use > limit_)
    throw std::runtime_error("the device memory cap (--max-gpu-memory) of " + gb(limit_) + " on " + name() +
                             " is below one layer's weights (" + gb(held + missing) +
                             ") and the activations and caches in use (" + gb(in_use) + "); raise the cap");
  for (const HostRange& r : next) {
    if (!r.p || !r.bytes) continue;
    if (auto it = covering(reinterpret_cast<uintptr_t>(r.p), r.bytes); it != resident_.end())
      it->second.next_of = stage_;
    else
      staged_.push_back(r);
  }
}

// With mu_ held. A range that does not fit without dropping what the running layer reads waits for its first use.
void CudaBackend::issue_staged() const {
  if (staged_.empty()) return;
  std::vector<HostRange> todo;
  todo.swap(staged_);
  enter();
  for (const HostRange& r : todo) {
    const uintptr_t h = reinterpret_cast<uintptr_t>(r.p);
    if (covering(h, r.bytes) != resident_.end() || resident_.count(h)) continue;
    if (!make_room(r.bytes, true)) return;
    void* d = nullptr;
    try {
      d = raw_allocate(r.bytes);
    } catch (const std::runtime_error&) {
      return;  // the device is fuller than the cap says (other processes): upload on first use
    }
    cudaEvent_t ev = nullptr;
    try {
      MOEDIT_CUDA_CHECK(cudaMemcpyAsync(d, r.p, r.bytes, cudaMemcpyHostToDevice, copy_st_));
      MOEDIT_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
      MOEDIT_CUDA_CHECK(cudaEventRecord(ev, copy_st_));
    } catch (...) {
      if (ev) cudaEventDestroy(ev);
      deallocate(d, r.bytes);
      throw;
    }
    resident_[h] = Copy{d, r.bytes, 0, stage_, ev};
    largest_ = std::max(largest_, r.bytes);
  }
}

}  // namespace moedit::cuda
