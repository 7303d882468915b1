// Key statistics over corpus shards, merged exactly (see editor/keystats_shards.h).
#include "editor/keystats_shards.h"

#include <cstring>
#include <filesystem>

#include "io/errors.h"
#include "io/safetensors.h"

namespace fs = std::filesystem;

namespace moedit {

namespace {

constexpr const char* kShardFormat = "moedit key statistics shard: sum = sum of k k^T over count keys (fp64, row-major)";
using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

int64_t meta_int(const std::map<std::string, std::string>& md, const std::string& path, const char* key) {
  const auto it = md.find(key);
  require_input(it != md.end(), path + ": metadata '" + key + "' missing");
  size_t used = 0;
  int64_t v = 0;
  try {
    v = std::stoll(it->second, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  require_input(used > 0 && used == it->second.size(), path + ": metadata '" + key + "' is not a number");
  return v;
}

struct ShardFile {
  std::string path;
  int shard = 0, n_shards = 0;
  int64_t tokens = 0;
  KeySum sum;
  std::map<std::string, std::string> common;  // the metadata every shard of the file shares
};

ShardFile read_shard_file(const std::string& path) {
  SafeTensorsFile f(path);
  require_input(f.has("sum"), path + ": no tensor 'sum' (not a statistics shard of `moedit stats --shard i/n`)");
  const TensorView& t = f.get("sum");
  require_input(t.dtype == DType::F64 && t.shape.size() == 2 && t.shape[0] == t.shape[1],
                path + ": tensor 'sum' must be a square F64 matrix");
  ShardFile s;
  s.path = path;
  s.common = f.metadata();
  s.shard = int(meta_int(s.common, path, "shard"));
  s.n_shards = int(meta_int(s.common, path, "n_shards"));
  require_input(s.n_shards >= 1 && s.shard >= 0 && s.shard < s.n_shards,
                path + ": metadata 'shard' " + std::to_string(s.shard) + " is outside 0.." +
                    std::to_string(s.n_shards - 1) + " (n_shards " + std::to_string(s.n_shards) + ")");
  s.tokens = meta_int(s.common, path, "tokens");
  s.sum.count = meta_int(s.common, path, "count");
  s.sum.layer = int(meta_int(s.common, path, "layer"));
  s.sum.expert = int(meta_int(s.common, path, "expert"));
  MatD m(t.shape[0], t.shape[1]);
  std::memcpy(m.data(), t.data, sizeof(double) * size_t(m.size()));
  s.sum.sum = m;
  for (const char* k : {"shard", "tokens", "count"}) s.common.erase(k);
  return s;
}

// The first metadata entry in which two shard files of one statistics file differ.
std::string differing_key(const ShardFile& a, const ShardFile& b) {
  for (const auto& [k, v] : a.common)
    if (!b.common.count(k) || b.common.at(k) != v) return k;
  for (const auto& [k, v] : b.common)
    if (!a.common.count(k)) return k;
  return "";
}

}  // namespace

void write_sum_file(const std::string& path, const KeySum& s, std::map<std::string, std::string> md, int shard,
                    int n_shards) {
  const MatD m = s.sum;
  OwnedTensor t;
  t.dtype = DType::F64;
  t.shape = {m.rows(), m.cols()};
  t.bytes.resize(sizeof(double) * size_t(m.size()));
  std::memcpy(t.bytes.data(), m.data(), t.bytes.size());
  md["format"] = kShardFormat;
  md["shard"] = std::to_string(shard);
  md["n_shards"] = std::to_string(n_shards);
  md["count"] = std::to_string(s.count);
  md["layer"] = std::to_string(s.layer);
  md["expert"] = std::to_string(s.expert);
  fs::create_directories(fs::path(path).parent_path());
  write_safetensors(path, {{"sum", t}}, md);
}

std::vector<MergedKeyStats> merge_key_stat_shards(const std::vector<std::string>& shard_dirs,
                                                  const std::string& cache_dir) {
  require_input(!shard_dirs.empty(), "stats merge: no shard folders given");
  std::map<std::string, std::vector<std::string>> files;  // path relative to its shard folder → its shard files
  for (const std::string& d : shard_dirs) {
    require_input(fs::is_directory(d), "stats merge: '" + d + "' is not a folder");
    bool any = false;
    for (const auto& e : fs::recursive_directory_iterator(d)) {
      if (!e.is_regular_file() || e.path().extension() != ".safetensors") continue;  // skips *.tmp.<pid> leftovers
      files[fs::relative(e.path(), d).string()].push_back(e.path().string());
      any = true;
    }
    require_input(any, "stats merge: '" + d + "' holds no statistics shard (written by `moedit stats --shard i/n "
                       "--out DIR`)");
  }
  std::map<std::string, MergedKeyStats> merged;  // by cache folder
  for (const auto& [rel, paths] : files) {
    std::vector<ShardFile> parts;
    for (const std::string& p : paths) parts.push_back(read_shard_file(p));
    const ShardFile& first = parts[0];
    std::vector<const ShardFile*> by_shard(size_t(first.n_shards), nullptr);
    for (const ShardFile& p : parts) {
      const std::string k = differing_key(first, p);
      require_input(k.empty(), "stats merge: metadata '" + k + "' differs between " + first.path + " and " + p.path +
                                   " (only shards of one statistics run can be merged)");
      require_input(p.sum.sum.rows() == first.sum.sum.rows(),
                    "stats merge: tensor 'sum' of " + p.path + " and of " + first.path + " differ in shape");
      const ShardFile*& slot = by_shard[size_t(p.shard)];
      require_input(!slot, "stats merge: shard " + std::to_string(p.shard) + " of " + rel + " is given twice: " +
                               (slot ? slot->path : "") + " and " + p.path);
      slot = &p;
    }
    for (size_t i = 0; i < by_shard.size(); ++i)
      require_input(by_shard[i] != nullptr, "stats merge: shard " + std::to_string(i) + "/" +
                                                std::to_string(first.n_shards) + " of " + rel + " is missing");
    KeySum total = first.sum;
    total.sum.setZero();
    total.count = 0;
    int64_t tokens = 0;
    for (const ShardFile* p : by_shard) {  // in shard order: the same sum whatever order the folders came in
      total.sum += p->sum.sum;
      total.count += p->sum.count;
      tokens += p->tokens;
    }
    std::map<std::string, std::string> md = first.common;
    md.erase("n_shards");
    md["tokens"] = std::to_string(tokens);
    md["format"] = kMomentFileFormat;
    const fs::path target = fs::path(cache_dir) / rel;
    write_moment_file(target.string(), moment_from_sum(total), md);
    MergedKeyStats& m = merged[target.parent_path().string()];
    m.dir = target.parent_path().string();
    m.layer = total.layer;
    m.n_shards = first.n_shards;
    m.tokens = tokens;
    ++m.experts;
  }
  std::vector<MergedKeyStats> out;
  for (auto& [dir, m] : merged) out.push_back(std::move(m));
  return out;
}

}  // namespace moedit
