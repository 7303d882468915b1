// Per-expert key statistics and their disk cache (see editor/keystats.h).
#include "editor/keystats.h"

#include <omp.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>

#include "editor/keystats_shards.h"
#include "io/errors.h"
#include "io/safetensors.h"
#include "tokenizer/tokenizer.h"

namespace fs = std::filesystem;

namespace moedit {

// ---- hashing ----------------------------------------------------------------------------------------------------

namespace {
inline uint64_t mix(uint64_t a, uint64_t b) {
  const __uint128_t r = static_cast<__uint128_t>(a) * b;
  return uint64_t(r) ^ uint64_t(r >> 64);
}
constexpr uint64_t P0 = 0xa0761d6478bd642full, P1 = 0xe7037ed1a0b428dbull, P2 = 0x8ebc6af09c88c6e3ull,
                   P3 = 0x589965cc75374cc3ull;
inline uint64_t load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
}  // namespace

uint64_t hash_bytes(const void* data, size_t n, uint64_t seed) {
  const uint8_t* s = static_cast<const uint8_t*>(data);
  uint64_t h[4] = {seed ^ P0, seed ^ P1, seed ^ P2, seed ^ P3};
  size_t i = 0;
  for (; i + 32 <= n; i += 32)
    for (int j = 0; j < 4; ++j) h[j] = mix(h[j] ^ load64(s + i + 8 * size_t(j)), P1 ^ (uint64_t(j) << 32 | 1));
  for (; i + 8 <= n; i += 8) h[0] = mix(h[0] ^ load64(s + i), P2);
  uint64_t tail = 0;
  for (size_t k = 0; i < n; ++i, ++k) tail |= uint64_t(s[i]) << (8 * k);
  h[1] = mix(h[1] ^ tail, P3);
  uint64_t r = mix(h[0] ^ P0, h[1] ^ P1) ^ mix(h[2] ^ P2, h[3] ^ P3);
  return mix(r ^ uint64_t(n), P0);
}

std::string hex64(uint64_t h) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

uint64_t key_weights_hash(const Model& m, int layer) {
  const ModelConfig& c = m.config();
  const Weights& w = m.weights();
  uint64_t h = hash_bytes(c.model_type.data(), c.model_type.size(), 1);
  const std::string raw = c.raw.dump();
  h = hash_bytes(raw.data(), raw.size(), h);
  const int dims[] = {c.vocab_size, c.hidden, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.n_experts,
                      c.top_k, c.expert_width, c.shared_width, layer};
  h = hash_bytes(dims, sizeof dims, h);
  // Values, not storage: a checkpoint view and its fp32 copy (an edit made and reverted) hash alike.
  auto add = [&h](const void* p, size_t n) { h = hash_bytes(p, n, h); };
  std::vector<float> row;
  auto addw = [&](const Weight& x) {
    row.resize(size_t(x.cols()));
    for (int64_t r = 0; r < x.rows(); ++r) {
      x.row(r, row.data());
      add(row.data(), sizeof(float) * row.size());
    }
  };
  auto addm = [&](const MatR& x) { add(x.data(), sizeof(float) * size_t(x.size())); };
  auto addv = [&](const VecF& x) { add(x.data(), sizeof(float) * size_t(x.size())); };
  auto addb = [&](const std::vector<Weight>& b) {
    for (const Weight& x : b) addw(x);
  };
  addw(w.embed);
  for (int l = 0; l <= layer; ++l) {
    const LayerWeights& L = w.layers[size_t(l)];
    addv(L.ln_in);
    addv(L.ln_post);
    const AttnWeights& a = L.attn;
    for (const Weight* x : {&a.wq, &a.wk, &a.wv, &a.wo, &a.wq_a, &a.wq_b, &a.wkv_a, &a.wkv_b}) addw(*x);
    for (const VecF* x : {&a.bq, &a.bk, &a.bv, &a.bo, &a.q_norm, &a.k_norm}) addv(*x);
    const FFNWeights& f = L.ffn;
    addm(f.router);
    for (const ExpertBank* b : {&f.experts, &f.shared}) {
      addb(b->gate);
      addb(b->up);
    }
    addv(f.shared_gate);
    if (const RouterEdit* re = m.router_edit(); re && re->touches(l)) {  // a standing router edit changes the keys
      const std::string fp = re->fingerprint(l);
      add(fp.data(), fp.size());
    }
    if (l < layer) {  // layer L's down projections do not change its keys
      addb(f.experts.down);
      addb(f.shared.down);
    }
  }
  return h;
}

int shared_expert_count(const Model& m, int layer) {
  const FFNWeights& f = m.weights().layers[size_t(layer)].ffn;
  return f.moe && f.has_shared ? std::max(1, m.config().n_shared_experts) : 0;
}

std::string expert_label(int id, int n_shared) {
  if (!is_shared_expert(id)) return std::to_string(id);
  return n_shared > 1 ? "shared" + std::to_string(shared_index(id)) : std::string("shared");
}

nlohmann::json expert_json(int id, int n_shared) {
  return is_shared_expert(id) ? nlohmann::json(expert_label(id, n_shared)) : nlohmann::json(id);
}

// ---- computing ----------------------------------------------------------------------------------------------------

std::vector<KeySum> compute_key_sums(const Model& m, int layer, const std::vector<std::vector<int32_t>>& seqs,
                                     int batch_tokens, const KeyStatsProgress& progress) {
  const ModelConfig& c = m.config();
  require_input(layer >= 0 && layer < c.n_layers, "layer " + std::to_string(layer) + " is out of range [0, " +
                                                      std::to_string(c.n_layers) + ")");
  require_input(c.is_moe(layer), "layer " + std::to_string(layer) + " is a dense layer, not an MoE layer");
  const FFNWeights& f = m.weights().layers[size_t(layer)].ffn;
  const int E = c.n_experts, I = f.experts.I;
  const int n_shared = shared_expert_count(m, layer);
  const bool shared = n_shared > 0;
  const int n_out = E + n_shared;
  auto slice = [&](int j) {  // shared expert j's columns of the shared key
    return n_shared == 1 ? std::pair<int, int>{0, f.shared.I} : c.shared_slice(j);
  };
  std::vector<Eigen::MatrixXd> acc(static_cast<size_t>(n_out));
  std::vector<int64_t> count(static_cast<size_t>(n_out), 0);
  for (int e = 0; e < E; ++e) acc[size_t(e)] = Eigen::MatrixXd::Zero(I, I);
  for (int j = 0; j < n_shared; ++j) {
    const auto [b, e] = slice(j);
    acc[size_t(E + j)] = Eigen::MatrixXd::Zero(e - b, e - b);
  }

  // On a device backend the keys stay there: readers at the key hooks add each batch's Kᵀ·K to fp64 sums in device
  // memory (Backend::gram), allocated at an expert's first key and copied to the host once at the end.
  const Backend& be = m.backend();
  const bool on_device = !be.host_memory();
  std::vector<Buf> dsum(on_device ? size_t(n_out) : 0);
  auto width = [&](int e) { return e < E ? I : slice(e - E).second - slice(e - E).first; };
  auto device_add = [&](int e, const float* rows, int n, size_t ld) {
    if (n <= 0) return;
    const int w = width(e);
    const bool first = dsum[size_t(e)].bytes() == 0;
    if (first) dsum[size_t(e)] = Buf(be, sizeof(double) * size_t(w) * size_t(w));
    be.gram(rows, n, w, ld, dsum[size_t(e)].as<double>(), !first);
    count[size_t(e)] += n;
  };

  int64_t total = 0, done = 0;
  for (const auto& s : seqs) total += int64_t(s.size());
  size_t next = 0;
  while (next < seqs.size()) {
    std::vector<std::vector<int32_t>> batch;
    int64_t ntok = 0;
    while (next < seqs.size() && (batch.empty() || ntok + int64_t(seqs[next].size()) <= batch_tokens)) {
      if (!seqs[next].empty()) {
        ntok += int64_t(seqs[next].size());
        batch.push_back(seqs[next]);
      }
      ++next;
    }
    if (batch.empty()) continue;
    Hooks hooks;
    std::vector<std::shared_ptr<Hooks::Capture>> keys(static_cast<size_t>(E));
    std::shared_ptr<Hooks::Capture> skey;
    if (on_device) {
      for (int e = 0; e < E; ++e)
        hooks.add_reader(hook_names::expert_key(layer, e),
                         [&, e](const float* rows, int n, int, size_t ld) { device_add(e, rows, n, ld); });
      if (shared)
        hooks.add_reader(hook_names::shared_key(layer), [&](const float* rows, int n, int, size_t ld) {
          for (int j = 0; j < n_shared; ++j) device_add(E + j, rows + slice(j).first, n, ld);
        });
    } else {
      for (int e = 0; e < E; ++e) keys[size_t(e)] = hooks.capture(hook_names::expert_key(layer, e));
      if (shared) skey = hooks.capture(hook_names::shared_key(layer));
    }
    ForwardOptions fo;
    fo.hooks = &hooks;
    fo.stop_after_layer = layer;
    fo.record_routing = false;
    m.forward(batch, fo);
    if (!on_device) {
      std::vector<MatR> blocks(static_cast<size_t>(n_out));
      for (int e = 0; e < E; ++e) blocks[size_t(e)] = std::move(keys[size_t(e)]->value);
      for (int j = 0; j < n_shared; ++j) {  // shared expert j's columns of the forward's shared key
        const auto [b, e] = slice(j);
        blocks[size_t(E + j)] = skey->value.middleCols(b, e - b);
      }
#pragma omp parallel for schedule(dynamic) num_threads(ops::num_threads())
      for (int e = 0; e < n_out; ++e) {
        const MatR& k = blocks[size_t(e)];
        if (k.rows() == 0) continue;
        // One fp64 rank-k update per batch (the lower triangle: as much arithmetic as a full fp32 GEMM), so the
        // sums do not depend on how the windows were batched: corpus shards add up to one pass
        // (editor/keystats_shards.h).
        const Eigen::MatrixXd kd = k.cast<double>().transpose();
        acc[size_t(e)].selfadjointView<Eigen::Lower>().rankUpdate(kd);
        count[size_t(e)] += k.rows();
      }
    }
    done += ntok;
    if (progress) progress(done, total);
  }
  for (int e = 0; e < int(dsum.size()); ++e) {  // the device's lower triangles (rows ≥ columns are what is read)
    if (dsum[size_t(e)].bytes() == 0) continue;
    const int w = width(e);
    Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> h(w, w);
    be.to_host(h.data(), dsum[size_t(e)].as<void>(), sizeof(double) * size_t(w) * size_t(w));
    acc[size_t(e)].triangularView<Eigen::Lower>() = h;
  }
  std::vector<KeySum> out(static_cast<size_t>(n_out));
  for (int e = 0; e < n_out; ++e) {
    KeySum& s = out[size_t(e)];
    s.layer = layer;
    s.expert = e < E ? e : shared_expert_id(e - E);
    s.count = count[size_t(e)];
    s.sum = acc[size_t(e)].selfadjointView<Eigen::Lower>();  // the full symmetric matrix
  }
  return out;
}

SecondMoment moment_from_sum(const KeySum& k) {
  SecondMoment s;
  s.layer = k.layer;
  s.expert = k.expert;
  s.count = k.count;
  Eigen::MatrixXd full = 0.5 * (k.sum + k.sum.transpose());
  if (s.count > 0) full /= double(s.count);
  s.mom2 = full.cast<float>();
  return s;
}

std::vector<SecondMoment> compute_key_stats(const Model& m, int layer, const std::vector<std::vector<int32_t>>& seqs,
                                            int batch_tokens, const KeyStatsProgress& progress) {
  std::vector<SecondMoment> out;
  for (const KeySum& k : compute_key_sums(m, layer, seqs, batch_tokens, progress)) out.push_back(moment_from_sum(k));
  return out;
}

std::vector<std::vector<int32_t>> corpus_windows(const Tokenizer& tok, const std::string& text, int seq_len,
                                                 int64_t max_tokens) {
  require_input(seq_len >= 2, "--seq-len must be at least 2");
  std::optional<int32_t> bos;
  {
    const auto e = tok.encode("a", true);
    if (!e.ids.empty() && !e.special_mask.empty() && e.special_mask[0]) bos = e.ids[0];
  }
  const int body = bos ? seq_len - 1 : seq_len;
  std::vector<std::vector<int32_t>> out;
  std::vector<int32_t> cur;
  int64_t total = 0;
  auto flush = [&](bool final) {
    if (cur.empty() || (final && cur.size() < 2)) return;
    std::vector<int32_t> w;
    if (bos) w.push_back(*bos);
    w.insert(w.end(), cur.begin(), cur.end());
    out.push_back(std::move(w));
    cur.clear();
  };
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const auto ids = tok.encode_ids(line + "\n", false);
    for (int32_t id : ids) {
      if (max_tokens > 0 && total >= max_tokens) break;
      cur.push_back(id);
      ++total;
      if (int(cur.size()) == body) flush(false);
    }
    if (max_tokens > 0 && total >= max_tokens) break;
  }
  flush(true);
  return out;
}

std::string default_corpus_path() { return std::string(MOEDIT_SOURCE_DIR) + "/datasets/data/wikitext-2/wiki.test.raw"; }

std::string default_cache_dir() {
  if (const char* e = std::getenv("MOEDIT_CACHE"); e && *e) return e;
  if (const char* e = std::getenv("XDG_CACHE_HOME"); e && *e) return std::string(e) + "/moedit";
  if (const char* e = std::getenv("HOME"); e && *e) return std::string(e) + "/.cache/moedit";
  return "/tmp/moedit-cache";
}

// ---- files --------------------------------------------------------------------------------------------------------

std::shared_ptr<SecondMoment> read_moment_file(const std::string& path) {
  if (!fs::exists(path)) return nullptr;
  SafeTensorsFile f(path);
  const TensorView& t = f.get("mom2");
  require_input(t.shape.size() == 2 && t.shape[0] == t.shape[1] && t.dtype == DType::F32,
                path + ": tensor 'mom2' must be a square F32 matrix");
  auto s = std::make_shared<SecondMoment>();
  s->mom2.resize(t.shape[0], t.shape[1]);
  t.to_f32(s->mom2.data());
  const auto& md = f.metadata();
  auto num = [&](const char* k) -> int64_t {
    auto it = md.find(k);
    require_input(it != md.end(), path + ": metadata '" + k + "' missing");
    try {
      return std::stoll(it->second);
    } catch (const std::exception&) {
      throw InputError(path + ": metadata '" + k + "' is not a number");
    }
  };
  s->count = num("count");
  s->layer = int(num("layer"));
  s->expert = int(num("expert"));
  return s;
}

void write_moment_file(const std::string& path, const SecondMoment& s,
                       const std::map<std::string, std::string>& metadata) {
  std::map<std::string, OwnedTensor> t;
  t["mom2"] = make_f32_tensor({s.mom2.rows(), s.mom2.cols()}, s.mom2.data());
  auto md = metadata;
  md["count"] = std::to_string(s.count);
  md["layer"] = std::to_string(s.layer);
  md["expert"] = std::to_string(s.expert);
  fs::create_directories(fs::path(path).parent_path());
  write_safetensors(path, t, md);
}

// ---- the cache ----------------------------------------------------------------------------------------------------

struct KeyStatsCache::Impl {
  const Model& m;
  const Tokenizer& tok;
  KeyStatsOptions opt;
  std::map<int, uint64_t> model_hash;
  bool corpus_ready = false;
  uint64_t corpus_hash = 0;
  std::string corpus_text;
  std::map<std::pair<int, int>, std::shared_ptr<const SecondMoment>> mem;
  std::map<int, bool> from_disk;
  std::map<int, int64_t> tokens;

  Impl(const Model& mm, const Tokenizer& t, KeyStatsOptions o) : m(mm), tok(t), opt(std::move(o)) {}

  void read_corpus() {
    if (corpus_ready) return;
    std::ifstream in(opt.corpus, std::ios::binary);
    require_input(bool(in), "corpus '" + opt.corpus + "' cannot be read");
    corpus_text.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    require_input(!corpus_text.empty(), "corpus '" + opt.corpus + "' is empty");
    corpus_hash = hash_bytes(corpus_text.data(), corpus_text.size(), 7);
    corpus_ready = true;
  }
  std::string dir(int layer) { return opt.cache_dir + "/" + subdir(layer); }
  std::string subdir(int layer) {
    const ModelConfig& c = m.config();
    require_input(layer >= 0 && layer < c.n_layers, "layer " + std::to_string(layer) + " is out of range [0, " +
                                                        std::to_string(c.n_layers) + ")");
    require_input(c.is_moe(layer), "layer " + std::to_string(layer) + " is a dense layer, not an MoE layer");
    read_corpus();
    auto it = model_hash.find(layer);
    if (it == model_hash.end()) it = model_hash.emplace(layer, key_weights_hash(m, layer)).first;
    return hex64(it->second) + "/layer" + std::to_string(layer) + "/" + hex64(corpus_hash) +
           "-s" + std::to_string(opt.seq_len) + "-n" +
           (opt.max_tokens > 0 ? std::to_string(opt.max_tokens) : std::string("all"));
  }
  // expert<E>, shared (a single shared expert) or shared<j> (one of several): distinct names, distinct entries.
  std::string file_name(int expert) const {
    const std::string stem = is_shared_expert(expert) ? expert_label(expert, m.config().n_shared_experts)
                                                      : "expert" + std::to_string(expert);
    return stem + ".safetensors";
  }
  std::vector<int> experts_of(int layer) const {
    std::vector<int> v;
    for (int e = 0; e < m.config().n_experts; ++e) v.push_back(e);
    for (int j = 0; j < shared_expert_count(m, layer); ++j) v.push_back(shared_expert_id(j));
    return v;
  }
  std::shared_ptr<const SecondMoment> load(int layer, int expert) {
    auto it = mem.find({layer, expert});
    if (it != mem.end()) return it->second;
    if (!opt.use_cache) return nullptr;
    const std::string path = dir(layer) + "/" + file_name(expert);
    auto s = read_moment_file(path);
    if (!s) return nullptr;
    require_input(s->layer == layer && s->expert == expert, path + ": layer/expert metadata disagree with its name");
    SafeTensorsFile f(path);
    if (auto t = f.metadata().find("tokens"); t != f.metadata().end()) tokens[layer] = std::stoll(t->second);
    from_disk[layer] = true;
    mem[{layer, expert}] = s;
    return s;
  }
  std::vector<std::vector<int32_t>> windows() {
    auto wins = corpus_windows(tok, corpus_text, opt.seq_len, opt.max_tokens);
    require_input(!wins.empty(), "corpus '" + opt.corpus + "' gives no tokens");
    return wins;
  }
  static int64_t count_tokens(const std::vector<std::vector<int32_t>>& wins) {
    int64_t n = 0;
    for (const auto& w : wins) n += int64_t(w.size());
    return n;
  }
  // The metadata of a layer's files (dir(layer) must have run: it fills the hashes).
  std::map<std::string, std::string> metadata(int layer, int64_t ntok) const {
    return {{"model_hash", hex64(model_hash.at(layer))}, {"corpus_hash", hex64(corpus_hash)},
            {"corpus", opt.corpus},                      {"seq_len", std::to_string(opt.seq_len)},
            {"max_tokens", std::to_string(opt.max_tokens)}, {"tokens", std::to_string(ntok)},
            {"format", kMomentFileFormat}};
  }
  void compute(int layer) {
    const std::string d = dir(layer);
    const auto wins = windows();
    const int64_t ntok = count_tokens(wins);
    auto stats = compute_key_stats(m, layer, wins, opt.batch_tokens, opt.progress);
    const auto md = metadata(layer, ntok);
    for (auto& s : stats) {
      write_moment_file(d + "/" + file_name(s.expert), s, md);
      mem[{layer, s.expert}] = std::make_shared<const SecondMoment>(std::move(s));
    }
    from_disk[layer] = false;
    tokens[layer] = ntok;
  }
};

KeyStatsCache::KeyStatsCache(const Model& m, const Tokenizer& tok, KeyStatsOptions opt)
    : impl_(std::make_unique<Impl>(m, tok, std::move(opt))) {}
KeyStatsCache::~KeyStatsCache() = default;

std::shared_ptr<const SecondMoment> KeyStatsCache::get(int layer, int expert) {
  const ModelConfig& c = impl_->m.config();
  require_input((is_shared_expert(expert) && shared_index(expert) < std::max(1, c.n_shared_experts)) ||
                    (expert >= 0 && expert < c.n_experts),
                "expert " + std::to_string(expert) + " is out of range [0, " + std::to_string(c.n_experts) + ")");
  if (auto s = impl_->load(layer, expert)) return s;
  impl_->compute(layer);
  auto it = impl_->mem.find({layer, expert});
  require_input(it != impl_->mem.end(), "layer " + std::to_string(layer) + " has no shared expert");
  return it->second;
}

std::vector<std::shared_ptr<const SecondMoment>> KeyStatsCache::layer(int layer, bool force) {
  impl_->dir(layer);  // validates the layer
  const auto ids = impl_->experts_of(layer);
  bool all = !force;
  if (all)
    for (int e : ids)
      if (!impl_->load(layer, e)) {
        all = false;
        break;
      }
  if (!all) impl_->compute(layer);
  std::vector<std::shared_ptr<const SecondMoment>> out;
  for (int e : ids) out.push_back(impl_->mem.at({layer, e}));
  return out;
}

std::string KeyStatsCache::layer_dir(int layer) { return impl_->dir(layer); }
std::string KeyStatsCache::layer_subdir(int layer) { return impl_->subdir(layer); }

int64_t KeyStatsCache::write_shard(int layer, int shard, int n_shards, const std::string& out_dir) {
  const std::string sub = impl_->subdir(layer);
  const auto all = impl_->windows();
  require_input(n_shards >= 1 && shard >= 0 && shard < n_shards,
                "shard " + std::to_string(shard) + "/" + std::to_string(n_shards) + ": expected 0 <= i < n");
  std::vector<std::vector<int32_t>> wins;  // empty when there are more shards than windows: zero sums, still exact
  for (size_t w = size_t(shard); w < all.size(); w += size_t(n_shards)) wins.push_back(all[w]);
  const int64_t ntok = Impl::count_tokens(wins);
  const auto md = impl_->metadata(layer, ntok);
  for (const KeySum& s : compute_key_sums(impl_->m, layer, wins, impl_->opt.batch_tokens, impl_->opt.progress))
    write_sum_file(out_dir + "/" + sub + "/" + impl_->file_name(s.expert), s, md, shard, n_shards);
  return ntok;
}
bool KeyStatsCache::loaded_from_disk(int layer) const {
  auto it = impl_->from_disk.find(layer);
  return it != impl_->from_disk.end() && it->second;
}
int64_t KeyStatsCache::corpus_tokens(int layer) const {
  auto it = impl_->tokens.find(layer);
  return it == impl_->tokens.end() ? 0 : it->second;
}

}  // namespace moedit
