// The naive engine: each batch of restorations re-runs the whole corrupted forward from the embeddings, noise and
// patches hooked in. Slow, and kept as the reference the cached engine is tested against.
#include "tracing/trace_internal.h"

namespace moedit::trace {

std::vector<double> Tracer::Impl::run_naive(const std::vector<const Restoration*>& batch) {
  const int nr = int(batch.size()), nseq = nr * samples;
  std::vector<std::vector<int32_t>> seqs(size_t(nseq), ids);
  std::vector<std::pair<int, int>> owner;
  for (int j = 0; j < nseq; ++j) owner.emplace_back(0, j % samples);
  Hooks h;
  h.add(hook_names::embed(), noise_hook({this}, owner));
  std::vector<Item> items;
  for (const Restoration* r : batch) items.push_back({this, r});
  add_patch_hooks(h, items, [](int, const Patch&) { return false; });
  ForwardOptions fo;
  fo.hooks = &h;
  fo.logits_all = false;
  fo.record_routing = false;
  ForwardOutput f = m.forward(seqs, fo);
  stats.flops += full_forward_flops(nseq);
  stats.rows += int64_t(nseq) * S * L;
  std::vector<double> out(size_t(nr), 0.0);
  for (int r = 0; r < nr; ++r) {
    double s = 0;
    for (int n = 0; n < samples; ++n)
      s += prob_of(f.logits.row(r * samples + n).data(), int(f.logits.cols()), answer);
    out[size_t(r)] = s / samples;
  }
  return out;
}

}  // namespace moedit::trace
