// Backend memory with an owner (Buf) and the caching pool behind it (kernels/backend.h).
#include <algorithm>
#include <bit>
#include <stdexcept>
#include <utility>

#include "kernels/backend.h"

namespace moedit {

Buf::Buf(const Backend& be, size_t bytes) : be_(&be), p_(bytes ? be.pool().get(bytes) : nullptr), bytes_(bytes) {}

Buf& Buf::operator=(Buf&& o) noexcept {
  if (this != &o) {
    drop();
    be_ = std::exchange(o.be_, nullptr);
    p_ = std::exchange(o.p_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
  }
  return *this;
}

void Buf::drop() {
  if (p_) be_->pool().put(p_, bytes_);
  p_ = nullptr;
  bytes_ = 0;
}

size_t BufferPool::size_class(size_t bytes) {
  if (bytes <= 4096) return std::max<size_t>(256, (bytes + 255) / 256 * 256);
  // 8 classes per power of two: at most 12.5 % more than asked.
  const size_t top = std::bit_floor(bytes - 1), step = top / 8;
  return (bytes + step - 1) / step * step;
}

void* BufferPool::get(size_t bytes) {
  const size_t c = size_class(bytes);
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = free_.find(c);
    if (it != free_.end() && !it->second.empty()) {
      void* p = it->second.back();
      it->second.pop_back();
      cached_ -= c;
      return p;
    }
  }
  return be_.allocate(c);
}

void BufferPool::put(void* p, size_t bytes) {
  const size_t c = size_class(bytes);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (cached_ + c <= limit_) {
      free_[c].push_back(p);
      cached_ += c;
      return;
    }
  }
  be_.deallocate(p, c);
}

void BufferPool::trim() {
  std::map<size_t, std::vector<void*>> all;
  {
    std::lock_guard<std::mutex> lock(mu_);
    all.swap(free_);
    cached_ = 0;
  }
  for (auto& [c, ps] : all)
    for (void* p : ps) be_.deallocate(p, c);
}

void Backend::set_memory_limit(size_t bytes) const {
  if (bytes) throw std::invalid_argument("the " + name() + " backend has no device memory to cap");
}

void Backend::set_precision(Precision p) const {
  if (p != Precision::fp32)
    throw std::invalid_argument("bf16 runs on a GPU's tensor cores; the " + name() + " backend computes in fp32");
}

size_t BufferPool::cached() const {
  std::lock_guard<std::mutex> lock(mu_);
  return cached_;
}

}  // namespace moedit
