// Per-expert key statistics for ROME's rank-one update: C = E[k kᵀ] (uncentered second moment) of the keys
// k = silu(W_gate x) ⊙ (W_up x) entering one expert's down-projection at one MoE layer — over the tokens routed to
// that expert (every token for a shared expert). Several shared experts (DeepSeek: one MLP of width n·I in the
// checkpoint) each get their own C over their slice of the shared key (ModelConfig::shared_slice).
//
// Streaming: token windows run through blocks 0..L only (ForwardOptions::stop_after_layer); routed keys are read
// at blocks.{L}.moe.experts.{e}.hook_key, shared-expert keys are recomputed from the block's FFN input
// (resid_pre + attn_out → post-attention norm), exactly as the forward computes them. Each forward batch's KᵀK is
// one fp64 rank-k update (SYRK: the arithmetic of a full fp32 GEMM), so the sums do not depend on how windows were
// batched and corpus shards merge to the one-pass matrix (editor/keystats_shards.h);
// the result is rounded to fp32 (ROME's mom2_dtype) so a freshly computed and a cached matrix are identical.
//
// Disk cache (KeyStatsCache): one safetensors file per expert,
//   <cache>/<key-weights hash>/layer<L>/<corpus hash>-s<seq_len>-n<max_tokens|all>/expert<E>.safetensors
//   (shared.safetensors for a single shared expert; shared<j>.safetensors for shared expert j of several), tensor
//   "mom2" [I, I] F32, metadata: count, tokens, layer, expert,
//   model_hash, corpus_hash, corpus, seq_len, max_tokens.
// The model hash covers exactly the weights the keys at L depend on (embeddings, layers < L, and layer L's norms,
// attention, router and gate/up projections — not its down projections, so editing layer L keeps its cache valid)
// plus the config's shape and the model's standing router edit on layers ≤ L (RouterEdit::fingerprint). The cache is written atomically (temp file + rename).
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "model/model.h"

namespace moedit {

class Tokenizer;

// Expert ids in statistics and edits: routed experts 0..E−1; shared expert j is kSharedExpert − j (−1, −2, …), its
// key the slice ModelConfig::shared_slice(j) of the shared block's key (the whole block when there is one).
constexpr int kSharedExpert = -1;
constexpr int shared_expert_id(int j) { return kSharedExpert - j; }
constexpr bool is_shared_expert(int id) { return id <= kSharedExpert; }
// The down projection an expert id names at a layer (every shared id: the whole shared down-projection), of a
// Weights or const Weights.
template <class Ws>
auto& down_weight(Ws& w, int layer, int expert) {
  auto& f = w.layers[size_t(layer)].ffn;
  return is_shared_expert(expert) ? f.shared.down[0] : f.experts.down[size_t(expert)];
}
constexpr int shared_index(int id) { return kSharedExpert - id; }
// Shared experts a layer's shared block holds (0 without one).
int shared_expert_count(const Model& m, int layer);
// "shared" (n_shared ≤ 1: a single shared expert), "shared<j>" (one of several), or the routed expert's number.
std::string expert_label(int id, int n_shared);
nlohmann::json expert_json(int id, int n_shared);  // the label (a string) for shared experts, else the number

struct SecondMoment {
  int layer = -1;
  int expert = 0;      // shared_expert_id(j) for shared expert j
  int64_t count = 0;   // keys accumulated (tokens routed to the expert)
  MatR mom2;           // [I, I] E[k kᵀ] (zero matrix when count = 0)
};

using KeyStatsProgress = std::function<void(int64_t tokens_done, int64_t tokens_total)>;

// The fp64 sum behind a SecondMoment, before symmetrising and dividing: sum = Σ k kᵀ over `count` keys. Sums over
// disjoint sets of windows add up to the sum over their union (corpus shards, editor/keystats_shards.h).
struct KeySum {
  int layer = -1;
  int expert = 0;
  int64_t count = 0;
  Eigen::MatrixXd sum;  // [I, I]
};
// What compute_key_stats returns for these sums: (sum + sumᵀ) / 2 / count, rounded to fp32 (zero when count = 0).
SecondMoment moment_from_sum(const KeySum& s);
// The "format" metadata entry of a statistics file.
inline constexpr const char* kMomentFileFormat = "moedit key statistics: mom2 = E[k k^T] (uncentered), fp64 accumulation";

// Second moments of every routed expert (index e) and, when the layer has them, each shared expert j (entry E + j,
// expert = shared_expert_id(j)) at MoE layer `layer`, over the given token sequences (each runs from position 0).
// Sequences are packed into forward batches of about batch_tokens tokens. InputError for a dense layer.
std::vector<SecondMoment> compute_key_stats(const Model& m, int layer, const std::vector<std::vector<int32_t>>& seqs,
                                            int batch_tokens = 4096, const KeyStatsProgress& progress = {});
// The same pass, returning the sums (compute_key_stats = moment_from_sum of each).
std::vector<KeySum> compute_key_sums(const Model& m, int layer, const std::vector<std::vector<int32_t>>& seqs,
                                     int batch_tokens = 4096, const KeyStatsProgress& progress = {});

// A text corpus as token windows: paragraphs (non-blank lines) are tokenized without special tokens, concatenated
// into one stream and cut into windows of seq_len tokens (the last, shorter one kept if ≥ 2 tokens). When the
// tokenizer's template adds a BOS, each window starts with it (inside seq_len). max_tokens > 0 caps the total.
std::vector<std::vector<int32_t>> corpus_windows(const Tokenizer& tok, const std::string& text, int seq_len,
                                                 int64_t max_tokens);

// 64-bit content hashes.
uint64_t hash_bytes(const void* data, size_t n, uint64_t seed = 0);
uint64_t key_weights_hash(const Model& m, int layer);
std::string hex64(uint64_t h);

// Bundled corpus: <source>/datasets/data/wikitext-2/wiki.test.raw.
std::string default_corpus_path();
// $MOEDIT_CACHE if set, else $XDG_CACHE_HOME/moedit, else ~/.cache/moedit, else /tmp/moedit-cache.
std::string default_cache_dir();

struct KeyStatsOptions {
  std::string cache_dir = default_cache_dir();
  std::string corpus = default_corpus_path();
  int seq_len = 256;
  int64_t max_tokens = 0;  // 0: the whole corpus
  int batch_tokens = 4096;
  bool use_cache = true;   // read cached files (they are always written)
  KeyStatsProgress progress;
};

// Loads statistics from the disk cache, computing (and caching) a whole layer on a miss. The model hash of a layer
// is computed on first use and memoised: statistics used by a sequence of edits are those of the model as it was
// when the layer was first asked for (ROME's semantics: C of the unedited model).
class KeyStatsCache {
 public:
  KeyStatsCache(const Model& m, const Tokenizer& tok, KeyStatsOptions opt);
  ~KeyStatsCache();
  // The moment of one expert (shared_expert_id(j): shared expert j).
  std::shared_ptr<const SecondMoment> get(int layer, int expert);
  // Every expert of the layer (routed 0..E-1, then the shared ones if any); computes on a miss or when force.
  std::vector<std::shared_ptr<const SecondMoment>> layer(int layer, bool force = false);
  // Cache folder of a layer; whether the layer was loaded from disk (vs computed) on its last request.
  std::string layer_dir(int layer);
  bool loaded_from_disk(int layer) const;
  int64_t corpus_tokens(int layer) const;  // tokens streamed when the layer was computed (from metadata if loaded)
  // The cache folder of a layer relative to the cache root (what a shard folder mirrors).
  std::string layer_subdir(int layer);
  // Computes shard `shard` of n (corpus windows w with w mod n == shard) of a layer and writes its sums under
  // out_dir/layer_subdir(layer) (editor/keystats_shards.h); returns the tokens of its windows. Nothing is cached.
  int64_t write_shard(int layer, int shard, int n_shards, const std::string& out_dir);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Reads / writes one statistics file (the cache format above). read returns nullptr when the file is absent;
// InputError when it is malformed.
std::shared_ptr<SecondMoment> read_moment_file(const std::string& path);
void write_moment_file(const std::string& path, const SecondMoment& s,
                       const std::map<std::string, std::string>& metadata);

}  // namespace moedit
