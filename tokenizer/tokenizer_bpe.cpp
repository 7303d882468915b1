// The BPE model of `tokenizers` (models/bpe): initial symbols per character (or per byte in byte-level mode), byte
// fallback, unk fusing, then merging by a min-heap on (rank, position) with the same stale-entry rule, so the result
// is identical even for vocabularies where different pairs merge into the same token.
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>

#include "tokenizer/tokenizer_internal.h"

namespace moedit::tok_detail {

void MergeMap::reserve(size_t n) {
  size_t cap = 16;
  unsigned bits = 4;
  while (cap < n * 2) {
    cap <<= 1;
    ++bits;
  }
  table_.assign(cap, Entry{});
  mask_ = cap - 1;
  shift_ = 64 - bits;
  size_ = 0;
}

void MergeMap::insert(uint32_t a, uint32_t b, uint32_t rank, int32_t merged) {
  if ((size_ + 1) * 2 > table_.size()) {
    std::vector<Entry> old = std::move(table_);
    reserve(std::max<size_t>(16, (size_ + 1) * 2));
    for (const Entry& en : old)
      if (en.key != kEmpty) insert(uint32_t(en.key >> 32), uint32_t(en.key), en.rank, en.merged);
  }
  const uint64_t key = (uint64_t(a) << 32) | b;
  size_t i = slot(key);
  while (table_[i].key != kEmpty && table_[i].key != key) i = (i + 1) & mask_;
  if (table_[i].key == kEmpty) ++size_;
  table_[i].key = key;
  table_[i].rank = rank;
  table_[i].merged = merged;
}

void Bpe::finalize() {
  static std::atomic<uint64_t> next_uid{1};
  uid = next_uid.fetch_add(1);
  char_ids.assign(0x30000, -1);
  for (const auto& [tok, id] : vocab) {
    if (tok.empty()) continue;
    unsigned l;
    char32_t c = utf8_decode(tok.data(), 0, l);
    if (l == tok.size() && c < char_ids.size()) char_ids[c] = id;
  }
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    auto it = vocab.find(std::string_view(name));
    fallback_ids[b] = it == vocab.end() ? -1 : it->second;
  }
}

void Bpe::build_bigrams() const {
  std::call_once(bigram_once, [this]() {
    std::vector<uint64_t> keys;
    first_cp.assign(vocab_r.size(), 0);
    last_cp.assign(vocab_r.size(), 0);
    for (size_t id = 0; id < vocab_r.size(); ++id) {
      const std::string& t = vocab_r[id];
      char32_t prev = 0;
      bool have_prev = false;
      for (size_t i = 0; i < t.size();) {
        unsigned l;
        char32_t c = utf8_decode(t.data(), i, l);
        if (!have_prev) first_cp[id] = c;
        if (have_prev) keys.push_back((uint64_t(prev) << 32) | uint64_t(c) | (uint64_t(1) << 63));
        prev = c;
        have_prev = true;
        i += l;
      }
      last_cp[id] = prev;
    }
    size_t cap = 16;
    while (cap < keys.size() * 2) cap <<= 1;
    bigrams.assign(cap, 0);
    for (uint64_t k : keys) {
      size_t i = size_t((k * 0x9E3779B97F4A7C15ULL) >> 20) & (cap - 1);
      while (bigrams[i] != 0 && bigrams[i] != k) i = (i + 1) & (cap - 1);
      bigrams[i] = k;
    }
  });
}

bool Bpe::has_bigram(char32_t a, char32_t b) const {
  const uint64_t k = (uint64_t(a) << 32) | uint64_t(b) | (uint64_t(1) << 63);
  const size_t mask = bigrams.size() - 1;
  size_t i = size_t((k * 0x9E3779B97F4A7C15ULL) >> 20) & mask;
  while (true) {
    if (bigrams[i] == k) return true;
    if (bigrams[i] == 0) return false;
    i = (i + 1) & mask;
  }
}

void Bpe::enable_raw_bytes() {
  if ((prefix && !prefix->empty()) || (suffix && !suffix->empty())) return;  // they change the initial symbols
  const char32_t* b2c = bytes_to_chars();
  bool needs_check = false;
  for (int b = 0; b < 256; ++b) {
    std::string key;
    utf8_append(key, b2c[b]);
    auto it = vocab.find(key);
    if (it != vocab.end()) {
      raw_byte_ids[b] = it->second;
      continue;
    }
    raw_byte_ids[b] = -1;
    const bool never_in_utf8 = b == 0xC0 || b == 0xC1 || b >= 0xF5;
    if (!never_in_utf8) needs_check = true;
  }
  raw_needs_check = needs_check;
  if (ignore_merges) {
    for (const auto& [tok, id] : vocab)
      if (std::optional<std::string> raw = byte_level_bytes(tok)) raw_vocab.emplace(std::move(*raw), id);
  }
  raw_bytes = true;
}

namespace {

struct Sym {
  int32_t c;
  int32_t prev, next;
  uint32_t len;
};
struct HeapEnt {
  uint32_t rank;
  uint32_t pos;
  int32_t merged;
};
struct HeapGreater {
  bool operator()(const HeapEnt& a, const HeapEnt& b) const {
    return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
  }
};

struct Scratch {
  std::vector<Sym> syms, chunk;
  std::vector<HeapEnt> heap;
  std::string key;
};

// Per-thread word cache of one Bpe instance: open addressing over (hash, key bytes) -> token list.
class WordCache {
 public:
  static constexpr size_t kMaxWords = 200000;
  static constexpr size_t kMaxLen = 256;
  // Returns the cached tokens of `key` (start, count into pool()), or false.
  bool find(std::string_view key, uint64_t h, uint32_t& start, uint32_t& count) const {
    if (slots_.empty()) return false;
    size_t i = size_t(h) & mask_;
    while (true) {
      const Slot& s = slots_[i];
      if (s.len == kEmpty) return false;
      if (s.hash == h && s.len == key.size() && std::memcmp(keys_.data() + s.key, key.data(), key.size()) == 0) {
        start = s.val;
        count = s.count;
        return true;
      }
      i = (i + 1) & mask_;
    }
  }
  bool full() const { return size_ >= kMaxWords; }
  void insert(std::string_view key, uint64_t h, const BpeToken* toks, size_t n) {
    if ((size_ + 1) * 2 > slots_.size()) grow();
    size_t i = size_t(h) & mask_;
    while (slots_[i].len != kEmpty) i = (i + 1) & mask_;
    Slot& s = slots_[i];
    s.hash = h;
    s.key = uint32_t(keys_.size());
    s.len = uint32_t(key.size());
    s.val = uint32_t(pool_.size());
    s.count = uint32_t(n);
    keys_.append(key);
    for (size_t k = 0; k < n; ++k) pool_.emplace_back(toks[k].id, toks[k].e - toks[k].b);
    ++size_;
  }
  const std::pair<int32_t, uint32_t>* pool() const { return pool_.data(); }

 private:
  static constexpr uint32_t kEmpty = ~uint32_t(0);
  struct Slot {
    uint64_t hash = 0;
    uint32_t key = 0, len = kEmpty, val = 0, count = 0;
  };
  void grow() {
    std::vector<Slot> old = std::move(slots_);
    const size_t cap = old.empty() ? 4096 : old.size() * 2;
    slots_.assign(cap, Slot{});
    mask_ = cap - 1;
    for (const Slot& s : old) {
      if (s.len == kEmpty) continue;
      size_t i = size_t(s.hash) & mask_;
      while (slots_[i].len != kEmpty) i = (i + 1) & mask_;
      slots_[i] = s;
    }
  }
  std::vector<Slot> slots_;
  size_t mask_ = 0, size_ = 0;
  std::string keys_;
  std::vector<std::pair<int32_t, uint32_t>> pool_;  // (id, byte length)
};

WordCache& cache_for(uint64_t uid) {
  thread_local std::unordered_map<uint64_t, std::unique_ptr<WordCache>> caches;
  thread_local uint64_t last_uid = 0;
  thread_local WordCache* last = nullptr;
  if (uid == last_uid && last) return *last;
  auto it = caches.find(uid);
  if (it == caches.end()) {
    if (caches.size() >= 16) caches.clear();  // bound memory held for tokenizers that are gone
    it = caches.emplace(uid, std::make_unique<WordCache>()).first;
  }
  last_uid = uid;
  last = it->second.get();
  return *last;
}

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

}  // namespace

namespace {
// Word::merge_all of `tokenizers`: repeatedly merge the pair with the lowest (rank, position).
void merge_all_impl(const MergeMap& merges, std::vector<Sym>& syms, std::vector<HeapEnt>& heap) {
  heap.clear();
  const int32_t n = static_cast<int32_t>(syms.size());
  uint32_t rank;
  int32_t merged;
  for (int32_t i = 0; i + 1 < n; ++i)
    if (merges.find(uint32_t(syms[i].c), uint32_t(syms[i + 1].c), rank, merged))
      heap.push_back({rank, uint32_t(i), merged});
  std::make_heap(heap.begin(), heap.end(), HeapGreater{});
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), HeapGreater{});
    const HeapEnt top = heap.back();
    heap.pop_back();
    Sym& cur = syms[top.pos];
    if (cur.len == 0 || cur.next == -1) continue;
    const int32_t next_pos = cur.next;
    const Sym right = syms[next_pos];
    if (!merges.find(uint32_t(cur.c), uint32_t(right.c), rank, merged) || merged != top.merged) continue;
    cur.c = top.merged;
    cur.len += right.len;
    cur.next = right.next;
    syms[next_pos].len = 0;
    if (right.next > -1 && right.next < n) syms[right.next].prev = int32_t(top.pos);
    if (cur.prev >= 0) {
      if (merges.find(uint32_t(syms[cur.prev].c), uint32_t(cur.c), rank, merged)) {
        heap.push_back({rank, uint32_t(cur.prev), merged});
        std::push_heap(heap.begin(), heap.end(), HeapGreater{});
      }
    }
    if (cur.next >= 0 && cur.next < n) {
      if (merges.find(uint32_t(cur.c), uint32_t(syms[cur.next].c), rank, merged)) {
        heap.push_back({rank, top.pos, merged});
        std::push_heap(heap.begin(), heap.end(), HeapGreater{});
      }
    }
  }
}
}  // namespace

void Bpe::merge_word(std::string_view w, std::vector<BpeToken>& out, bool raw) const {
  auto merge_all = [this](std::vector<Sym>& v, std::vector<HeapEnt>& heap) { merge_all_impl(merges, v, heap); };
  Scratch& sc = scratch();
  std::vector<Sym>& syms = sc.syms;
  syms.clear();
  auto add = [&](int32_t c, uint32_t len) {
    int32_t n = static_cast<int32_t>(syms.size());
    if (n > 0) syms.back().next = n;
    syms.push_back({c, n - 1, -1, len});
  };

  if (raw) {
    for (size_t i = 0; i < w.size(); ++i) add(raw_byte_ids[static_cast<unsigned char>(w[i])], 1);
  } else {
    const bool plain = (!prefix || prefix->empty()) && (!suffix || suffix->empty());
    bool have_unk = false;
    int32_t unk_id = -1;
    uint32_t unk_len = 0;
    size_t i = 0;
    while (i < w.size()) {
      unsigned l;
      char32_t cp = utf8_decode(w.data(), i, l);
      const bool is_first = i == 0, is_last = i + l == w.size();
      int32_t id = -1;
      std::string_view s(w.data() + i, l);
      if (plain) {
        if (cp < char_ids.size()) {
          id = char_ids[cp];
        } else {
          auto it = vocab.find(s);
          if (it != vocab.end()) id = it->second;
        }
      } else {
        sc.key.clear();
        if (!is_first && prefix) sc.key += *prefix;
        sc.key.append(s);
        if (is_last && suffix) sc.key += *suffix;
        s = sc.key;
        auto it = vocab.find(s);
        if (it != vocab.end()) id = it->second;
      }
      if (id >= 0) {
        if (have_unk) {
          add(unk_id, unk_len);
          have_unk = false;
        }
        add(id, l);
      } else {
        bool done = false;
        if (byte_fallback) {
          bool all = true;
          for (char ch : s) all &= fallback_ids[static_cast<unsigned char>(ch)] >= 0;
          if (all) {
            for (char ch : s) add(fallback_ids[static_cast<unsigned char>(ch)], 1);
            done = true;
          }
        }
        if (!done && unk_token) {
          auto it = vocab.find(std::string_view(*unk_token));
          if (it == vocab.end())
            throw std::runtime_error("tokenizer: unk_token '" + *unk_token + "' is not in the vocab");
          if (have_unk && fuse_unk) {
            unk_len += l;
          } else {
            if (have_unk) add(unk_id, unk_len);
            have_unk = true;
            unk_id = it->second;
            unk_len = l;
          }
        }
      }
      i += l;
    }
    if (have_unk) add(unk_id, unk_len);
  }

  // Long words: merge independent chunks separately (see Bpe::bigrams).
  constexpr size_t kChunkMin = 48;
  uint32_t pos = 0;
  auto emit = [&](const std::vector<Sym>& v) {
    for (const Sym& s : v) {
      if (s.len == 0) continue;
      out.push_back({s.c, pos, pos + s.len});
      pos += s.len;
    }
  };
  if (syms.size() >= kChunkMin && merges.size() > 0 && (!prefix || prefix->empty())) {
    build_bigrams();
    std::vector<Sym>& chunk = sc.chunk;
    size_t b = 0;
    for (size_t i = 1; i <= syms.size(); ++i) {
      if (i < syms.size() && has_bigram(last_cp[size_t(syms[i - 1].c)], first_cp[size_t(syms[i].c)])) continue;
      chunk.clear();
      for (size_t k = b; k < i; ++k) {
        Sym s = syms[k];
        s.prev = int32_t(k - b) - 1;
        s.next = k + 1 < i ? int32_t(k - b) + 1 : -1;
        chunk.push_back(s);
      }
      merge_all(chunk, sc.heap);
      emit(chunk);
      b = i;
    }
    return;
  }
  merge_all(syms, sc.heap);
  emit(syms);
}
void Bpe::tokenize(std::string_view piece, std::vector<BpeToken>& out, bool raw) const {
  if (piece.empty()) return;
  if (ignore_merges) {
    const StrMap<int32_t>& m = raw ? raw_vocab : vocab;
    auto it = m.find(piece);
    if (it != m.end()) {
      out.push_back({it->second, 0, uint32_t(piece.size())});
      return;
    }
  }
  // the cache holds words of the model's main mode only (a raw and a normalized piece may be the same bytes)
  if (piece.size() >= WordCache::kMaxLen || raw != raw_bytes) {
    merge_word(piece, out, raw);
    return;
  }
  WordCache& cache = cache_for(uid);
  const uint64_t h = hash_bytes(piece.data(), piece.size());
  uint32_t start, count;
  if (cache.find(piece, h, start, count)) {
    const auto* pool = cache.pool();
    uint32_t pos = 0;
    for (uint32_t k = 0; k < count; ++k) {
      const auto& [id, len] = pool[start + k];
      out.push_back({id, pos, pos + len});
      pos += len;
    }
    return;
  }
  const size_t first = out.size();
  merge_word(piece, out, raw);
  if (!cache.full()) cache.insert(piece, h, out.data() + first, out.size() - first);
}

}  // namespace moedit::tok_detail
