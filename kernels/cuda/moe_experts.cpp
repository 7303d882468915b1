// CudaBackend::moe_experts: the MoE step of a whole batch on the device, in the CPU backend's order of operations —
// group the (token, slot) pairs by expert (stable, tokens ascending), gather each group's rows, one grouped gate and
// one grouped up product over every active expert (one launch each), SwiGLU, one grouped down product, each row
// times its routing weight, the per-token sum in ascending expert id. The host sees nothing unless a tap is set;
// then that stage's rows come to the host, each active expert's tap runs on its rows, and the rows go back.
// moe_experts_backward: the same grouping and forward (fp32), then dw = dy·y per pair and the rows' gradient back
// through down, SwiGLU, gate and up (grouped_linear_backward), summed per token in ascending expert id.
#include <algorithm>
#include <stdexcept>
#include <vector>

#include "kernels/cuda/backend_impl.h"
#include "kernels/cuda/check.h"

namespace moedit::cuda {

namespace {

// The (token, slot) pairs of a batch grouped by expert on the device (moe_group), and the bank's weight descriptors
// gate [E] ‖ up [E] ‖ down [E] in device memory.
struct Grouping {
  int P, tile_rows, max_tiles;
  Buf ints, dbuf;
  int *start, *tile_start, *tok, *pair, *pos;  // [E+1], [E+1], [P], [P], [P]
  DevWeight* desc;                              // [3E]
  Grouping(const CudaBackend& be, const ExpertsView& ex, const int* ids, int N, int k, const char* op) {
    const int E = ex.E;
    if (E <= 0 || ex.I <= 0 || ex.H <= 0 || k <= 0 || k > 64)
      throw std::invalid_argument(std::string("cuda ") + op + ": E " + std::to_string(E) + ", I " +
                                  std::to_string(ex.I) + ", H " + std::to_string(ex.H) + ", top-" + std::to_string(k));
    if (int64_t(N) * k > int64_t(1) << 30)
      throw std::invalid_argument(std::string("cuda ") + op + ": too many (token, slot) pairs");
    P = N * k;
    const size_t Pz = size_t(P);
    tile_rows = grouped_tile_rows(P, E);
    max_tiles = P / tile_rows + std::min(E, P) + 1;  // ≥ Σ_e ceil(n_e / tile_rows)
    ints = Buf(be, sizeof(int) * (2 * (size_t(E) + 1) + 3 * Pz));
    start = ints.as<int>();
    tile_start = start + E + 1;
    tok = tile_start + E + 1;
    pair = tok + Pz;
    pos = pair + Pz;
    moe_group(ids, P, k, E, tile_rows, start, tile_start, tok, pair, pos, be.stream());
    std::vector<DevWeight> d;
    d.reserve(3 * size_t(E));
    for (const ops::WeightView* bank : {ex.gate, ex.up, ex.down})
      for (int e = 0; e < E; ++e) d.push_back(dev_weight(bank[e]));
    dbuf = Buf(be, sizeof(DevWeight) * d.size());
    desc = dbuf.as<DevWeight>();
    be.to_device(desc, d.data(), sizeof(DevWeight) * d.size());
  }
  const DevWeight* bank(int b, int E) const { return desc + size_t(b) * size_t(E); }
};

}  // namespace

void CudaBackend::moe_experts(const float* a, int N, const ExpertsView& ex, const int* ids, const float* w, int k,
                              float* y, const MoeTaps* taps) const {
  if (N <= 0) return;
  enter();
  const int E = ex.E, I = ex.I, H = ex.H;
  const Grouping g(*this, ex, ids, N, k, "moe_experts");
  const int P = g.P, tile_rows = g.tile_rows, max_tiles = g.max_tiles;
  const size_t Pz = size_t(P);
  const int *start = g.start, *tile_start = g.tile_start, *tok = g.tok, *pair = g.pair, *pos = g.pos;

  // One grouped product per bank: in bf16, the banks' 16- and 8-bit experts on tensor cores, then the fp32 ones
  // (an edited expert's copy) in fp32; the two kernels write disjoint groups.
  const bool tc = precision_ == Precision::bf16;
  auto grouped = [&](const float* X, int in, int bank, int out, float* Y, size_t ldy) {
    const ops::WeightView* views = bank == 0 ? ex.gate : bank == 1 ? ex.up : ex.down;
    const auto f32 = [](const ops::WeightView& v) { return v.type == ops::WType::F32; };
    const bool any_f32 = std::any_of(views, views + E, f32), all_f32 = std::all_of(views, views + E, f32);
    const DevWeight* d = g.bank(bank, E);
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

void CudaBackend::moe_experts_backward(const float* a, int N, const ExpertsView& ex, const int* ids, const float* w,
                                       int k, const float* dy, float* da, float* dw, bool accumulate) const {
  if (N <= 0) return;
  enter();
  const int E = ex.E, I = ex.I, H = ex.H;
  const Grouping g(*this, ex, ids, N, k, "moe_experts_backward");
  const int P = g.P;
  const size_t Pz = size_t(P);
  auto forward = [&](const float* X, int in, int b, int out, float* Y, size_t ldy) {
    grouped_linear(X, size_t(in), in, g.bank(b, E), out, Y, ldy, g.start, g.tile_start, E, g.tile_rows, g.max_tiles,
                   st_);
  };
  auto backward = [&](const float* dY, size_t lddy, int out, int b, int in, float* dX, bool acc) {
    grouped_linear_backward(dY, lddy, out, g.bank(b, E), in, dX, size_t(in), g.start, g.tile_start, E, g.tile_rows,
                            g.max_tiles, acc, st_);
  };
  // The experts' forward on the grouped rows (fp32): gate‖up [P, 2I], key [P, I], unweighted output y [P, H].
  const Buf xg(*this, sizeof(float) * Pz * size_t(H)), gu(*this, sizeof(float) * Pz * 2 * size_t(I)),
      key(*this, sizeof(float) * Pz * size_t(I)), yg(*this, sizeof(float) * Pz * size_t(H)),
      dyg(*this, sizeof(float) * Pz * size_t(H)), dgu(*this, sizeof(float) * Pz * 2 * size_t(I));
  moe_gather(a, H, g.tok, g.start, E, P, xg.as<float>(), st_);
  forward(xg.as<float>(), H, 0, I, gu.as<float>(), 2 * size_t(I));
  forward(xg.as<float>(), H, 1, I, gu.as<float>() + I, 2 * size_t(I));
  cuda::silu_mul(gu.as<float>(), P, I, key.as<float>(), st_);
  forward(key.as<float>(), I, 2, H, yg.as<float>(), size_t(H));
  // dw = dy·y per pair; the rows' output gradient w·dy back through down (into key's rows), SwiGLU, gate and up.
  moe_gather(dy, H, g.tok, g.start, E, P, dyg.as<float>(), st_);
  moe_row_dot(dyg.as<float>(), yg.as<float>(), H, g.pair, g.start, E, P, dw, st_);
  moe_scale_rows(dyg.as<float>(), H, g.pair, w, g.start, E, P, st_);
  float* dkey = key.as<float>();
  backward(dyg.as<float>(), size_t(H), H, 2, I, dkey, false);
  cuda::silu_mul_backward(gu.as<float>(), dkey, P, I, dgu.as<float>(), st_);
  float* dxg = xg.as<float>();
  backward(dgu.as<float>(), 2 * size_t(I), I, 0, H, dxg, false);
  backward(dgu.as<float>() + I, 2 * size_t(I), I, 1, H, dxg, true);
  // Per token in ascending expert id (moe_combine); accumulate through a scratch sum.
  if (!accumulate) {
    moe_combine(dxg, H, ids, g.pos, N, k, da, st_);
  } else {
    const Buf sum(*this, sizeof(float) * size_t(N) * size_t(H));
    moe_combine(dxg, H, ids, g.pos, N, k, sum.as<float>(), st_);
    cuda::add(da, sum.as<float>(), size_t(N) * size_t(H), st_);
  }
  done();
}

}  // namespace moedit::cuda
