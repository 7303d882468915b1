// CudaBackend::moe_experts: the MoE step of a whole batch on the device, in the CPU backend's order of operations —
// group the (token, slot) pairs by expert (stable, tokens ascending), gather each group's rows, one grouped gate and
// one grouped up product over every active expert (one launch each), SwiGLU, one grouped down product, each row
// times its routing weight, the per-token sum in ascending expert id. The host sees nothing unless a tap is set;
// then that stage's rows come to the host, each active expert's tap runs on its rows, and the rows go back.
#include <algorithm>
#include <stdexcept>
#include <vector>

#include "kernels/cuda/backend_impl.h"
#include "kernels/cuda/check.h"

namespace moedit::cuda {

void CudaBackend::moe_experts(const float* a, int N, const ExpertsView& ex, const int* ids, const float* w, int k,
                              float* y, const MoeTaps* taps) const {
  if (N <= 0) return;
  const int E = ex.E, I = ex.I, H = ex.H;
  if (E <= 0 || I <= 0 || H <= 0 || k <= 0 || k > 64)
    throw std::invalid_argument("cuda moe_experts: E " + std::to_string(E) + ", I " + std::to_string(I) + ", H " +
                                std::to_string(H) + ", top-" + std::to_string(k));
  if (int64_t(N) * k > int64_t(1) << 30) throw std::invalid_argument("cuda moe_experts: too many (token, slot) pairs");
  enter();
  const int P = N * k;
  const size_t Pz = size_t(P);

  // Grouping: start [E+1], tile_start [E+1], tok [P], pair [P], pos [P].
  const int tile_rows = grouped_tile_rows(P, E);
  const int max_tiles = P / tile_rows + std::min(E, P) + 1;  // ≥ Σ_e ceil(n_e / tile_rows)
  const Buf ints(*this, sizeof(int) * (2 * (size_t(E) + 1) + 3 * Pz));
  int* start = ints.as<int>();
  int* tile_start = start + E + 1;
  int* tok = tile_start + E + 1;
  int* pair = tok + Pz;
  int* pos = pair + Pz;
  moe_group(ids, P, k, E, tile_rows, start, tile_start, tok, pair, pos, st_);

  // The experts' weight descriptors: gate [E] ‖ up [E] ‖ down [E].
  std::vector<DevWeight> desc;
  desc.reserve(3 * size_t(E));
  for (const ops::WeightView* bank : {ex.gate, ex.up, ex.down})
    for (int e = 0; e < E; ++e) desc.push_back(dev_weight(bank[e]));
  const Buf dbuf(*this, sizeof(DevWeight) * desc.size());
  DevWeight* dw = dbuf.as<DevWeight>();
  to_device(dw, desc.data(), sizeof(DevWeight) * desc.size());

  // One grouped product per bank: in bf16, the banks' 16- and 8-bit experts on tensor cores, then the fp32 ones
  // (an edited expert's copy) in fp32; the two kernels write disjoint groups.
  const bool tc = precision_ == Precision::bf16;
  auto grouped = [&](const float* X, int in, int bank, int out, float* Y, size_t ldy) {
    const ops::WeightView* views = bank == 0 ? ex.gate : bank == 1 ? ex.up : ex.down;
    const auto f32 = [](const ops::WeightView& v) { return v.type == ops::WType::F32; };
    const bool any_f32 = std::any_of(views, views + E, f32), all_f32 = std::all_of(views, views + E, f32);
    const DevWeight* d = dw + size_t(bank) * size_t(E);
    if (tc && !all_f32)
      grouped_linear_bf16(X, size_t(in), in, d, out, Y, ldy, start, tile_start, E, tile_rows, max_tiles, st_);
    if (!tc || any_f32)
      grouped_linear(X, size_t(in), in, d, out, Y, ldy, start, tile_start, E, tile_rows, max_tiles, st_, tc);
  };

  // Rows of every group at once (groups are disjoint row ranges): gathered inputs, gate‖up, keys, outputs.
  const Buf xg(*this, sizeof(float) * Pz * size_t(H)), gu(*this, sizeof(float) * Pz * 2 * size_t(I)),
      key(*this, sizeof(float) * Pz * size_t(I)), out(*this, sizeof(float) * Pz * size_t(H));
  moe_gather(a, H, tok, start, E, P, xg.as<float>(), st_);
  grouped(xg.as<float>(), H, 0, I, gu.as<float>(), 2 * size_t(I));
  grouped(xg.as<float>(), H, 1, I, gu.as<float>() + I, 2 * size_t(I));
  cuda::silu_mul(gu.as<float>(), P, I, key.as<float>(), st_);

  // The groups' row ranges on the host (only where a tap needs them).
  std::vector<int> hstart, htok;
  auto groups = [&] {
    if (!hstart.empty()) return;
    hstart.resize(size_t(E) + 1);
    to_host(hstart.data(), start, sizeof(int) * hstart.size());
  };
  // Readers: each active expert's key rows where they are (no copy).
  if (taps && taps->key_rows) {
    groups();
    for (int e = 0; e < E; ++e)
      if (const int n = hstart[size_t(e) + 1] - hstart[size_t(e)]; n > 0)
        taps->key_rows(e, key.as<float>() + size_t(hstart[size_t(e)]) * size_t(I), n);
  }
  // A tap: the stage's rows to the host, f(e, rows of e, tokens of e) for each active expert in ascending id, back.
  auto tap = [&](const std::function<void(int, MapMatR, const std::vector<int>&)>& f, float* rows, int width) {
    groups();
    if (htok.empty()) {
      htok.resize(size_t(hstart[size_t(E)]));
      to_host(htok.data(), tok, sizeof(int) * htok.size());
    }
    const size_t bytes = sizeof(float) * htok.size() * size_t(width);
    std::vector<float> h(htok.size() * size_t(width));
    to_host(h.data(), rows, bytes);
    std::vector<int> tokens;
    for (int e = 0; e < E; ++e) {
      const int r0 = hstart[size_t(e)], n = hstart[size_t(e) + 1] - r0;
      if (n == 0) continue;
      tokens.assign(htok.begin() + r0, htok.begin() + r0 + n);
      f(e, MapMatR(h.data() + size_t(r0) * width, n, width), tokens);
    }
    to_device(rows, h.data(), bytes);
  };
  if (taps && taps->key) tap(taps->key, key.as<float>(), I);

  grouped(key.as<float>(), I, 2, H, out.as<float>(), size_t(H));
  moe_scale_rows(out.as<float>(), H, pair, w, start, E, P, st_);
  if (taps && taps->out) tap(taps->out, out.as<float>(), H);
  moe_combine(out.as<float>(), H, ids, pos, N, k, y, st_);
  done();
}

}  // namespace moedit::cuda
